"""``mpsnn run MODEL.onnx --input FILE``: load an ONNX model with :func:`mpsnn.io.onnx.load`,
run it on NumPy arrays or images, print every output, save them.

Usage::

    mpsnn run resnet18.onnx --input cat.png --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    mpsnn run model.onnx --input x.npy --output out.npz --device cpu --format float16
    mpsnn run two_inputs.onnx --input a=a.npy --input b=b.npy

Inputs (``--input``, repeatable):

* ``FILE`` feeds the model's only input; a model with several inputs needs ``NAME=FILE`` for
  each (``NAME`` an ONNX input name; a ``FILE`` whose own name holds ``=`` is read as a file
  when the part before ``=`` names no input and the whole text is an existing file).
* ``.npy`` files are fed as they are (any real dtype; cast to float32 by
  :meth:`~mpsnn.io.onnx.ONNXGraph.predict`); an array with one dimension less than the input
  gets a batch axis of 1 in front.
* Images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, ``.webp``) are read
  with Pillow when it is importable, else with :func:`matplotlib.image.imread` (PNG only then),
  and become float32 NCHW with values in [0, 1] (8-bit / 255, 16-bit / 65535). Channels: an
  alpha channel is dropped unless the input takes 4 channels; a grey image is repeated for a
  3-channel input; an RGB image becomes its luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B,
  Pillow's ``convert("L")``) for a 1-channel input. Images are **not resized**: the input's
  height and width must be the image's or dynamic, because a silent resize (which filter,
  which crop) would change the result without saying so. Several images for one input are
  stacked into a batch (same size), in the order given.
* ``--mean`` / ``--std``: per-channel normalisation ``(x - mean) / std`` of image inputs (one
  value for every channel, or one per channel, comma separated); off by default (the model
  gets [0, 1] pixels), ``--imagenet`` sets ImageNet's values. ``.npy`` inputs are never
  normalised.

Outputs: each output's name, shape, dtype and range; for an output of shape ``(N, K)`` (or
``(N, K, 1, ..., 1)``) with ``K >= 5`` the ``--top`` classes (default 5, 0: none) of every
image with their probabilities. The probabilities are the values themselves when every value
lies in [0, 1] and every row sums to 1 (within 1e-3: a softmax output), ``exp`` of the values
when every value is <= 0 and every row's ``exp`` sums to 1 (a log-softmax output), and the
softmax of the values otherwise (logits). ``--output OUT.npz`` saves every output under its
ONNX name (:func:`numpy.savez`).

Exit status: 0 after a run, 2 for bad arguments or any :class:`~mpsnn.MPSError` (unreadable
files, unsupported models, shape mismatches: the message goes to stderr, without traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence, TextIO

import numpy as np

from ...core.errors import MPSError, MPSValueError, value_error

CMD = "run"
FORMATS = ("float32", "float16", "bfloat16")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601, as Pillow's convert("L")
#: a row is already a distribution when its sum is within this of 1
PROB_TOL = 1e-3


# -- arguments ---------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise argparse.ArgumentTypeError("give at least one number")
    return vals


def _top(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"{k} is negative (0 prints no classes)")
    return k


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--input", "-i", action="append", required=True, metavar="[NAME=]FILE",
                   help="a .npy array or an image (PNG, JPEG, ...) for the model's input NAME (NAME= may be left out when the "
                        "model has one input); repeat for several inputs, or several images for one input (a batch)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda' or 'cuda:N' (default: mpsnn.default_device())")
    p.add_argument("--format", choices=FORMATS, default="float32", help="graph storage format of the images (default float32)")
    p.add_argument("--output", "-o", default=None, metavar="OUT.npz", help="save every output to this .npz file (by ONNX name)")
    p.add_argument("--top", type=_top, default=5, metavar="K",
                   help="classes to print for each (N, K >= 5) output (default 5; 0: none)")
    p.add_argument("--mean", type=_floats, default=None, metavar="M[,M...]",
                   help="per-channel mean subtracted from image inputs (pixels in [0, 1]; default: none)")
    p.add_argument("--std", type=_floats, default=None, metavar="S[,S...]",
                   help="per-channel standard deviation dividing image inputs after --mean (default: none)")
    p.add_argument("--imagenet", action="store_true", help="shorthand for ImageNet's --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")


# -- inputs ------------------------------------------------------------------------------------------
def declared_inputs(model: Any) -> dict[str, tuple[Any, ...]]:
    """The model's graph inputs (initializers excluded) and their shapes (None: symbolic)."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, tuple[Any, ...]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        out[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    return out


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _pil_image() -> Any:
    """Pillow's Image module, or None when Pillow is not importable."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def read_image(path: str) -> np.ndarray:
    """An image file as float32 ``(H, W, C)`` in [0, 1] (C = 1, 2, 3 or 4 as stored)."""
    if not os.path.isfile(path):
        raise value_error(CMD, "--input", path, "name an existing image file")
    Image = _pil_image()
    try:
        if Image is not None:
            with Image.open(path) as im:
                if im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "F"):
                    im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
                arr = np.asarray(im)
                if im.mode in ("I;16", "I;16B", "I"):
                    arr = arr.astype(np.float64) / 65535.0
        else:
            import matplotlib.image as mpimg
            arr = mpimg.imread(path)
    except MPSError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's / matplotlib's own error types
        raise MPSValueError(f"{CMD}: cannot read image {path!r}: {exc}") from exc
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        arr = arr / 255.0
    elif arr.dtype == np.uint16:
        arr = arr / 65535.0
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise value_error(CMD, "--input", path, "be a grey, grey+alpha, RGB or RGBA image", f"an array of shape {arr.shape}")
    return np.asarray(arr, dtype=np.float32)


def image_to_input(img: np.ndarray, path: str, name: str, shape: tuple[Any, ...]) -> np.ndarray:
    """``(H, W, C)`` pixels as ``(1, C', H, W)`` for the input ``name`` of ONNX shape ``shape``
    (channel rules in the module docstring; no resize)."""
    if len(shape) != 4:
        raise value_error(CMD, f"--input {name}=", path, f"go to an image input of shape (N, C, H, W); input {name!r} has shape "
                          f"{_shape_text(shape)}")
    want_c, want_h, want_w = shape[1], shape[2], shape[3]
    h, w, c = img.shape
    if c in (2, 4) and want_c != c:
        img, c = img[:, :, :c - 1], c - 1  # drop alpha
    if want_c is not None and want_c != c:
        if c == 1 and want_c == 3:
            img = np.repeat(img, 3, axis=2)
        elif c == 3 and want_c == 1:
            img = (img.astype(np.float64) @ LUMA)[:, :, None].astype(np.float32)
        else:
            raise value_error(CMD, "--input", path, f"have the {want_c} channels of input {name!r}", f"an image of {c} channels")
    if (want_h is not None and want_h != h) or (want_w is not None and want_w != w):
        raise value_error(CMD, "--input", path, f"be {want_w}x{want_h} (width x height) for input {name!r}; mpsnn run does not resize images",
                          f"{w}x{h}")
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def read_npy(path: str, name: str, shape: tuple[Any, ...]) -> np.ndarray:
    if not os.path.isfile(path):
        raise value_error(CMD, "--input", path, "name an existing .npy file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy's own error types
        raise MPSValueError(f"{CMD}: cannot read {path!r} as a .npy array: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise value_error(CMD, "--input", path, "hold one array (.npy), not an archive")
    if arr.dtype.kind not in "fiub":
        raise value_error(CMD, "--input", path, "hold real numbers", f"dtype {arr.dtype}")
    if shape and arr.ndim == len(shape) - 1:
        arr = arr[None]  # the batch axis left out
    return arr


def normalise(x: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None, path: str) -> np.ndarray:
    c = x.shape[1]
    out = x.astype(np.float32)
    for what, vals in (("--mean", mean), ("--std", std)):
        if vals is None:
            continue
        if len(vals) not in (1, c):
            raise value_error(CMD, what, ",".join(f"{v:g}" for v in vals), f"give 1 or {c} values (the channels of {path})")
        v = np.asarray(vals, np.float32).reshape(1, -1, 1, 1)
        if what == "--mean":
            out = out - v
        else:
            if np.any(v <= 0):
                raise value_error(CMD, "--std", ",".join(f"{s:g}" for s in vals), "be > 0")
            out = out / v
    return out


def gather_inputs(specs: Sequence[str], declared: dict[str, tuple[Any, ...]], needed: Sequence[str], mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The feeds of ``predict`` from the ``--input`` texts, and one line per input describing it."""
    pairs: list[tuple[str, str]] = []
    for text in specs:
        name, sep, path = text.partition("=")
        if sep and name in declared:
            pairs.append((name, path))
        elif sep and not os.path.exists(text) and name and os.path.sep not in name:
            raise value_error(CMD, "--input", text, f"name one of the model's inputs {list(declared)} before '='")
        else:
            if len(needed) != 1:
                raise value_error(CMD, "--input", text, f"be given as NAME=FILE: the model has {len(needed)} inputs {list(needed)}")
            pairs.append((needed[0], text))
    files: dict[str, list[str]] = {}
    for name, path in pairs:
        files.setdefault(name, []).append(path)
    missing = [n for n in needed if n not in files]
    if missing:
        raise value_error(CMD, "--input", specs, f"give a file for every input {list(needed)}", f"none for {missing}")
    feeds: dict[str, np.ndarray] = {}
    lines: list[str] = []
    any_image = False
    for name, paths in files.items():
        shape = declared[name]
        if len(paths) > 1 and not all(is_image(p) for p in paths):
            raise value_error(CMD, "--input", paths, f"give one .npy file for input {name!r} (only images stack into a batch)")
        if is_image(paths[0]):
            any_image = True
            arrays = [image_to_input(read_image(p), p, name, shape) for p in paths]
            if len({a.shape for a in arrays}) > 1:
                raise value_error(CMD, "--input", paths, f"have one size to make a batch for input {name!r}",
                                  f"shapes {[a.shape[1:] for a in arrays]}")
            x = normalise(np.concatenate(arrays), mean, std, paths[0])
            note = f"{len(paths)} image{'s' if len(paths) > 1 else ''} {', '.join(paths)}, pixels in [0, 1]"
            if mean is not None or std is not None:
                note += f", normalised (x - {_vals(mean, 0)}) / {_vals(std, 1)}"
        else:
            x = read_npy(paths[0], name, shape)
            note = paths[0]
        feeds[name] = x
        lines.append(f"input   {name}: {_shape_text(x.shape)} {x.dtype} from {note}")
    if (mean is not None or std is not None) and not any_image:
        raise value_error(CMD, "--mean/--std", f"{mean}/{std}", "go with an image input (.npy inputs are fed as they are)")
    return feeds, lines


def _vals(v: Sequence[float] | None, default: float) -> str:
    if v is None:
        return f"{default:g}"
    return f"{v[0]:g}" if len(v) == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]"


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


# -- outputs ------------------------------------------------------------------------------------------
def class_scores(values: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Per-row probabilities of an (N, K[, 1, ...]) output with K >= 5, and how they were
    obtained (the rule is in the module docstring); None for other outputs."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2 or any(d != 1 for d in v.shape[2:]) or v.shape[1] < 5 or v.shape[0] < 1:
        return None
    v = v.reshape(v.shape[0], v.shape[1])
    if not np.isfinite(v).all():
        return None
    if v.min() >= 0 and v.max() <= 1 and np.allclose(v.sum(axis=1), 1, atol=PROB_TOL, rtol=0):
        return v, "the values are probabilities"
    if v.max() <= 0 and np.allclose(np.exp(v).sum(axis=1), 1, atol=PROB_TOL, rtol=0):
        return np.exp(v), "exp of the values: log-probabilities"
    e = np.exp(v - v.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), "softmax of the values: logits"


def report_output(name: str, arr: np.ndarray, top: int, out: TextIO) -> None:
    a = np.asarray(arr)
    line = f"output  {name}: {_shape_text(a.shape)} {a.dtype}"
    if a.size and a.dtype.kind in "fiub":
        f = a.astype(np.float64)
        line += f"  min {f.min():.6g}  max {f.max():.6g}  mean {f.mean():.6g}"
    print(line, file=out)
    scores = class_scores(a) if top > 0 and a.dtype.kind == "f" else None
    if scores is None:
        return
    probs, how = scores
    k = min(top, probs.shape[1])
    print(f"  top-{k} classes ({how}):", file=out)
    for n, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:k]
        print(f"    image {n}: " + "  ".join(f"{int(c)} ({row[c]:.4f})" for c in order), file=out)


# -- the command --------------------------------------------------------------------------------------
def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``mpsnn run``: exit 0 after a run (errors raise MPSError; the CLI maps them to 2)."""
    from . import load, read_model

    stream = out if out is not None else sys.stdout
    mean, std = args.mean, args.std
    if args.imagenet:
        if mean is not None or std is not None:
            raise value_error(CMD, "--imagenet", True, "not be combined with --mean / --std")
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if args.output is not None and not str(args.output).endswith(".npz"):
        raise value_error(CMD, "--output", args.output, "end in .npz")
    model = read_model(args.model)
    graph = load(model, device=args.device, format=args.format)
    declared = declared_inputs(model)
    feeds, lines = gather_inputs(args.input, declared, graph.input_names, mean, std)
    print(f"model   {args.model}  (opset {graph.opset}, {len(model.graph.node)} nodes, {len(graph.plan.steps)} graph steps)", file=stream)
    print(f"device  {graph.device.name}, format {graph.format.name}", file=stream)
    for line in lines:
        print(line, file=stream)
    outputs = graph.predict(feeds)
    for name in graph.output_names:
        report_output(name, outputs[name], args.top, stream)
    if args.output is not None:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise value_error(CMD, "--output", args.output, "be in an existing folder")
        try:
            arrays: dict[str, Any] = dict(outputs)
            np.savez(args.output, **arrays)
        except OSError as exc:
            raise MPSValueError(f"{CMD}: cannot write {args.output!r}: {exc}") from exc
        print(f"saved   {len(outputs)} output{'s' if len(outputs) != 1 else ''} to {args.output}", file=stream)
    return 0


__all__ = ["add_arguments", "class_scores", "declared_inputs", "gather_inputs", "read_image", "run"]
