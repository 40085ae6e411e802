"""Float64 NumPy references for MPSNNReshape, MPSNNSlice, MPSNNPad and their gradients,
written from spec/reduce-reshape-slice-concat.md §5-8 (nothing shared with ``mpsnn.backends``
or the kernel module's index rules).

The pad references find "which source index does each destination position read" by padding
an *index array* with ``numpy.pad``: ``reflect`` is Mirror (edge not repeated),
``symmetric`` is MirrorWithEdge, ``edge`` is Clamp, ``constant`` marks fill positions. The
gradient scatters with ``numpy.add.at`` through the same index map.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pad", "pad_gradient", "pad_index_map", "reshape", "reshape_gradient", "slice_"]

_NUMPY_MODE: dict[str, Any] = {"clamp": "edge", "mirror": "reflect", "mirrorWithEdge": "symmetric", "zero": "constant", "constant": "constant"}


def reshape(x: Any, width: int, height: int, channels: int) -> np.ndarray:
    """``[N, H, W, C] -> [N, height, width, channels]`` with ``flat = (y·W + x)·C + c``."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    out = np.zeros((n, height, width, channels))
    for b in range(n):
        for y in range(h):
            for xx in range(w):
                for k in range(c):
                    flat = (y * w + xx) * c + k
                    out[b, flat // (width * channels), (flat // channels) % width, flat % channels] = x[b, y, xx, k]
    return out


def reshape_gradient(g: Any, width: int, height: int, channels: int) -> np.ndarray:
    """The inverse permutation: ``g [N, H', W', C'] -> [N, height, width, channels]``."""
    g = np.asarray(g, np.float64)
    n, h2, w2, c2 = g.shape
    out = np.zeros((n, height, width, channels))
    for b in range(n):
        for y in range(height):
            for xx in range(width):
                for k in range(channels):
                    flat = (y * width + xx) * channels + k
                    out[b, y, xx, k] = g[b, flat // (w2 * c2), (flat // c2) % w2, flat % c2]
    return out


def slice_(x: Any, ox: int, oy: int, width: int, height: int, c0: int, channels: int, edge: str = "zero") -> np.ndarray:
    """``out[n, j, i, c] = x[n, oy + j, ox + i, c0 + c]`` (off-image: 0 or the clamped pixel)."""
    x = np.asarray(x, np.float64)
    n, h, w, _ = x.shape
    out = np.zeros((n, height, width, channels))
    for j in range(height):
        for i in range(width):
            y, xx = oy + j, ox + i
            if edge == "clamp":
                y, xx = min(max(y, 0), h - 1), min(max(xx, 0), w - 1)
            elif not (0 <= y < h and 0 <= xx < w):
                continue
            out[:, j, i, :] = x[:, y, xx, c0:c0 + channels]
    return out


def pad_index_map(n: int, start: int, count: int, mode: str) -> np.ndarray:
    """Source index (or -1 = fill) read by positions ``start .. start+count-1`` of an axis whose
    active range is ``[0, n)``."""
    margin = max(0, -start) + max(0, start + count - n) + 1
    idx = np.arange(n)
    if _NUMPY_MODE[mode] == "constant":
        padded = np.pad(idx, margin, mode="constant", constant_values=-1)
    else:
        padded = np.pad(idx, margin, mode=_NUMPY_MODE[mode])
    return padded[start + margin:start + margin + count]


def pad(x: Any, offset: tuple[int, int], size: tuple[int, int], c0: int, channels: int, before_c: int, after_c: int,
        mode: str, fill: Any = 0.0) -> np.ndarray:
    """The padded block ``[N, size_h, size_w, before_c + channels + after_c]``: position
    ``(j, i, k)`` reads source ``(offset.y + j, offset.x + i, c0 + (k − before_c))`` under
    ``mode``; ``fill`` is a scalar or one value per written channel (``constant`` only)."""
    x = np.asarray(x, np.float64)
    n, h, w, _ = x.shape
    iy = pad_index_map(h, offset[1], size[1], mode)
    ix = pad_index_map(w, offset[0], size[0], mode)
    ic = pad_index_map(channels, -before_c, before_c + channels + after_c, mode)
    fv = np.broadcast_to(np.asarray(fill, np.float64) if mode == "constant" else np.float64(0.0), (len(ic),))
    out = np.zeros((n, len(iy), len(ix), len(ic)))
    for j, yy in enumerate(iy):
        for i, xx in enumerate(ix):
            for k, cc in enumerate(ic):
                out[:, j, i, k] = fv[k] if min(yy, xx, cc) < 0 else x[:, yy, xx, c0 + cc]
    return out


def pad_gradient(g: Any, source_shape: tuple[int, int, int, int], offset: tuple[int, int], c0: int, channels: int,
                 before_c: int, after_c: int, mode: str) -> np.ndarray:
    """Adjoint of :func:`pad` for the block ``g`` ``[N, h, w, before_c + channels + after_c]``:
    a ``source_shape`` array where every source element sums the ``g`` entries that read it."""
    g = np.asarray(g, np.float64)
    n, h, w, _ = source_shape
    iy = pad_index_map(h, offset[1], g.shape[1], mode)
    ix = pad_index_map(w, offset[0], g.shape[2], mode)
    ic = pad_index_map(channels, -before_c, before_c + channels + after_c, mode)
    out = np.zeros(source_shape)
    for j, yy in enumerate(iy):
        for i, xx in enumerate(ix):
            for k, cc in enumerate(ic):
                if min(yy, xx, cc) >= 0:
                    out[:, yy, xx, c0 + cc] += g[:, j, i, k]
    return out
