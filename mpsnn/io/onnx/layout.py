"""How an ONNX tensor lives in an MPS image (no ``onnx`` import here).

An MPS image is an NHWC tensor ``[N, H, W, C]``: N images of H x W pixels with C feature
channels. An ONNX tensor of rank r is held by one image plus its **axes**: for every ONNX
dimension, the image axis that stores it (``"n"``, ``"h"``, ``"w"``, ``"c"``) or None for a
dimension of size 1 that the image does not store. Image axes that no ONNX dimension uses
have size 1. The standard axes, used for graph inputs and by every operator that gives
dimension 1 the meaning "channels", are

=====  ======================  ======================
rank   ONNX shape              axes
=====  ======================  ======================
4      (N, C, H, W)            n, c, h, w
3      (N, C, L)               n, c, w  (H = 1)
2      (N, C)                  n, c     (H = W = 1: what a fully connected layer makes)
1      (C,)                    c        (one image)
=====  ======================  ======================

A Transpose only permutes the axes (no data moves); an operator that needs the standard
axes of a tensor that has others gets a relayout node (:mod:`.nodes`) first.

The batch: dimension 0 of an image tensor with the standard axes is the image count, and
an encode may use any image count (the ONNX input shape's batch is a hint). Operators that
would move data across images (a Reshape that changes dimension 0, a Transpose that moves
``n``) are refused at load time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

IMAGE_AXES = ("n", "h", "w", "c")

STANDARD_AXES: dict[int, tuple[str, ...]] = {4: ("n", "c", "h", "w"), 3: ("n", "c", "w"), 2: ("n", "c"), 1: ("c",), 0: ()}

def standard_axes(rank: int) -> tuple[str, ...] | None:
    """The standard axes of a rank (None: no image layout for that rank)."""
    return STANDARD_AXES.get(rank)


def std_axes(rank: int) -> tuple[str, ...]:
    """The standard axes of a rank that has them (ValueError otherwise)."""
    ax = STANDARD_AXES.get(rank)
    if ax is None:
        raise ValueError(f"a tensor of rank {rank} has no image layout")
    return ax


@dataclass
class Value:
    """One ONNX tensor during import.

    Exactly one of ``node`` (an :class:`~mpsnn.MPSNNImageNode`, with ``axes``) and ``const``
    (a NumPy array, folded at load time) is set. ``shape`` is the ONNX shape, None for a
    dimension not known at load time (a symbolic batch). ``dtype`` is the ONNX element type as
    a NumPy dtype (images hold real numbers in the graph's format; the result is cast back).
    """

    name: str
    shape: tuple[Any, ...]
    dtype: np.dtype
    node: Any = None
    axes: tuple[Any, ...] | None = None
    const: np.ndarray | None = None
    #: data-movement operators not applied yet (an importer ``Pending``), else None
    pending: Any = None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def rank(self) -> int:
        return len(self.shape)

    def axis_of(self, dim: int) -> Any:
        assert self.axes is not None
        return self.axes[dim]

    def is_standard(self) -> bool:
        return self.axes is not None and tuple(self.axes) == standard_axes(self.rank)

    def image_dims(self) -> dict[str, Any]:
        """Size of each image axis (None where unknown; 1 for unused axes)."""
        assert self.axes is not None
        sizes: dict[str, Any] = {a: 1 for a in IMAGE_AXES}
        for d, a in zip(self.shape, self.axes):
            if a is not None:
                sizes[a] = d
        return sizes


def image_permutation(axes: Sequence[Any]) -> list[int]:
    """The ONNX dimensions in image order (n, h, w, c); used axes only."""
    where = {a: d for d, a in enumerate(axes) if a is not None}
    return [where[a] for a in IMAGE_AXES if a in where]


def onnx_to_nhwc(array: np.ndarray, axes: Sequence[Any]) -> np.ndarray:
    """An ONNX-shaped array as the NHWC array of the image that holds it."""
    arr = np.asarray(array)
    if arr.ndim != len(axes):
        raise ValueError(f"array of rank {arr.ndim} for axes {tuple(axes)}")
    for d, a in enumerate(axes):
        if a is None and arr.shape[d] != 1:
            raise ValueError(f"dimension {d} has size {arr.shape[d]} but is not stored")
    kept = [a for a in axes if a is not None]
    arr = arr.reshape([s for s, a in zip(arr.shape, axes) if a is not None])  # drop the unstored size-1 dims
    where = {a: k for k, a in enumerate(kept)}
    used = [a for a in IMAGE_AXES if a in where]
    perm = [where[a] for a in used]
    moved = np.transpose(arr, perm) if perm else arr.reshape(())
    sizes = dict(zip(used, moved.shape))
    return np.ascontiguousarray(moved.reshape([sizes.get(a, 1) for a in IMAGE_AXES]))


def nhwc_to_onnx(array: np.ndarray, axes: Sequence[Any], shape: Sequence[Any]) -> np.ndarray:
    """The inverse of :func:`onnx_to_nhwc`; ``shape`` may hold None (taken from the image)."""
    arr = np.asarray(array)
    sizes = dict(zip(IMAGE_AXES, arr.shape))
    used = [a for a in IMAGE_AXES if a in axes]
    for a in IMAGE_AXES:
        if a not in used and sizes[a] != 1:
            raise ValueError(f"image axis {a} has size {sizes[a]} but holds no ONNX dimension")
    squeezed = arr.reshape([sizes[a] for a in used])
    # squeezed is in image order; put it back in ONNX order
    perm = image_permutation(axes)
    out = np.transpose(squeezed, np.argsort(perm)) if perm else squeezed
    real_shape = [sizes[a] if a is not None else 1 for a in axes]
    for d, s in enumerate(shape):  # the batch (axis n) may differ from the declared one
        if s is not None and axes[d] != "n" and s != real_shape[d]:
            raise ValueError(f"dimension {d} is {real_shape[d]}, expected {s}")
    return out.reshape(real_shape)


def broadcast_shapes(owner: str, *shapes: Sequence[Any]) -> tuple[Any, ...]:
    """NumPy broadcasting of shapes that may hold None (unknown, assumed to match)."""
    rank = max(len(s) for s in shapes)
    out: list[Any] = []
    for k in range(rank):
        dims = [s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0]
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            raise ValueError(f"{owner}: shapes {[tuple(s) for s in shapes]} do not broadcast")
        if known:
            out.append(known.pop())
        elif any(d is None for d in dims):
            out.append(None)
        else:
            out.append(1)
    return tuple(out)
