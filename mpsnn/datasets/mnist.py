"""MNIST loader for the original gzip'd IDX files bundled in ``mpsnn/data/mnist/``.

IDX format (big-endian): a 4-byte magic number ``0x0000 <type> <ndim>`` — 2051 (0x0803:
unsigned bytes, 3 dimensions) for images, 2049 (0x0801: unsigned bytes, 1 dimension) for
labels — then one 4-byte size per dimension, then the values row-major. Images are
``count x 28 x 28`` uint8 (0 background, 255 ink), labels ``count`` uint8 in ``[0, 9]``.

Every read checks, in this order: the file exists; its MD5 matches the published one
(``verify=True``, the default); it is valid gzip; the magic number; the header sizes
(60000 or 10000 items, 28 x 28, so images and labels agree in count); the payload length;
labels lie in ``[0, 9]``. Any failure raises :class:`~mpsnn.MPSValueError` naming the file.

With ``limit`` only the first ``16 + limit*784`` (images) / ``8 + limit`` (labels)
decompressed bytes are read, so a small slice of the training set costs milliseconds.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import MPSTypeError, value_error

_OWNER = "load_mnist"

#: Mean and standard deviation of the training pixels scaled to [0, 1] (the usual
#: normalisation constants: x_norm = (x - MNIST_MEAN) / MNIST_STD).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
ROWS = COLS = 28

#: split -> (images file, labels file, item count)
MNIST_SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

#: MD5 of each compressed file as first published (the data folder's README lists them).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def mnist_data_dir() -> Path:
    """The folder holding the bundled IDX files.

    Found through :mod:`importlib.resources` (works for a source checkout on ``PYTHONPATH``
    and for regular or editable installs), falling back to the module's own path.
    """
    try:
        candidate = Path(str(importlib.resources.files("mpsnn").joinpath("data", "mnist")))
        if candidate.is_dir():
            return candidate
    except (ModuleNotFoundError, TypeError, ValueError):  # pragma: no cover - exotic loaders
        pass
    return Path(__file__).resolve().parent.parent / "data" / "mnist"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_idx(path: Path, magic: int, ndim: int, expected_count: int, limit: int | None,
              verify: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """Check one IDX file and return ``(header sizes, first items as uint8)``."""
    if not path.is_file():
        raise value_error(_OWNER, "root", str(path.parent), f"hold the MNIST file {path.name}", "no such file")
    if verify:
        want = MNIST_MD5.get(path.name)
        got = _md5(path)
        if want is not None and got != want:
            raise value_error(_OWNER, "file", str(path), f"have the published MD5 {want}", f"{got} (corrupt or altered copy)")
    header_len = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(header_len)
            if len(header) < header_len:
                raise value_error(_OWNER, "file", str(path), f"start with a {header_len}-byte IDX header", f"{len(header)} bytes")
            got_magic, *sizes = struct.unpack(f">{1 + ndim}I", header)
            if got_magic != magic:
                raise value_error(_OWNER, "file", str(path), f"have the IDX magic number {magic}", f"{got_magic}")
            if sizes[0] != expected_count:
                raise value_error(_OWNER, "file", str(path), f"hold {expected_count} items", f"a header saying {sizes[0]}")
            if ndim == 3 and (sizes[1], sizes[2]) != (ROWS, COLS):
                raise value_error(_OWNER, "file", str(path), f"hold {ROWS}x{COLS} images", f"{sizes[1]}x{sizes[2]}")
            item = int(np.prod(sizes[1:], dtype=np.int64)) if ndim > 1 else 1
            count = sizes[0] if limit is None else min(limit, sizes[0])
            want_bytes = count * item
            payload = f.read(want_bytes)
            if len(payload) < want_bytes:
                raise value_error(_OWNER, "file", str(path), f"hold {want_bytes} bytes of data after the header",
                                  f"{len(payload)} (truncated)")
            if limit is None and f.read(1):
                raise value_error(_OWNER, "file", str(path), "end after its last item", "trailing data")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise value_error(_OWNER, "file", str(path), "be a readable gzip'd IDX file", f"{type(exc).__name__}: {exc}") from exc
    return tuple(sizes), np.frombuffer(payload, dtype=np.uint8).reshape((count, *sizes[1:]))


def load_mnist(split: str = "train", limit: int | None = None, *, root: str | Path | None = None,
               verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits from the bundled IDX files.

    Args:
        split: ``"train"`` (60000 digits) or ``"test"`` (10000 digits).
        limit: keep only the first ``limit`` digits (default: all); ``limit >= 0``.
        root: folder holding the four ``*-idx?-ubyte.gz`` files (default:
            :func:`mnist_data_dir`, the copy shipped inside the package).
        verify: check each file's MD5 against the published value (default True).

    Returns:
        ``(images, labels)``: ``images`` uint8 ``[N, 28, 28]`` (writable, C-contiguous),
        ``labels`` uint8 ``[N]``, in file order. The first test labels are 7, 2, 1, 0, 4.

    Raises:
        MPSValueError: an unknown split, a negative limit, a missing, corrupt or inconsistent file.
        MPSTypeError: a limit that is not an int.

    Example::

        images, labels = load_mnist("test", limit=8)   # (8, 28, 28) uint8, (8,) uint8
    """
    if not isinstance(split, str) or split not in MNIST_SPLITS:
        raise value_error(_OWNER, "split", split, f"be one of {sorted(MNIST_SPLITS)}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
            raise MPSTypeError(f"{_OWNER}: `limit` must be an int or None, but got {type(limit).__name__}")
        limit = int(limit)
        if limit < 0:
            raise value_error(_OWNER, "limit", limit, "be >= 0 or None")
    folder = mnist_data_dir() if root is None else Path(root)
    image_file, label_file, count = MNIST_SPLITS[split]
    _, images = _read_idx(folder / image_file, IMAGE_MAGIC, 3, count, limit, verify)
    _, labels = _read_idx(folder / label_file, LABEL_MAGIC, 1, count, limit, verify)
    if labels.size and int(labels.max()) > 9:
        raise value_error(_OWNER, "file", str(folder / label_file), "hold labels in [0, 9]", f"a label {int(labels.max())}")
    return images.copy(), labels.copy()


__all__ = ["IMAGE_MAGIC", "LABEL_MAGIC", "MNIST_MD5", "MNIST_MEAN", "MNIST_SPLITS", "MNIST_STD", "load_mnist", "mnist_data_dir"]
