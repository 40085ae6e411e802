"""Float64 NumPy references for the softmax family, written from spec/softmax.md.

Same function names as ``mpsnn.backends.softmax`` (:func:`softmax_nhwc`,
:func:`softmax_gradient_nhwc`), but nothing shared with it: plain NumPy, float64, the spec's
formulas written out (the forward over an explicit loop of channels). The coordinate
reference of the forward kernels is :func:`mpsnn.testing.reference.unary_kernel_reference`
with ``fn=softmax_nhwc``; :func:`destination_aligned_gradient_reference` is the coordinate
reference of gradient kernels whose second input lives in the forward *destination*'s
coordinates (the softmax gradients' forward result, the dropout mask).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .reference import _effective_region, _region, _xyz

__all__ = ["destination_aligned_gradient_reference", "softmax_gradient_nhwc", "softmax_nhwc"]


def softmax_nhwc(x: Any, log: bool = False) -> np.ndarray:
    """softmax.md §2-3 over the last axis: ``y_k = exp(x_k - m) / sum_j exp(x_j - m)`` or
    ``y_k = x_k - m - ln sum_j exp(x_j - m)`` with ``m = max_j x_j``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    m = x[..., 0].copy()
    for j in range(1, n):
        m = np.maximum(m, x[..., j])
    with np.errstate(all="ignore"):
        total = np.zeros(x.shape[:-1])
        for j in range(n):
            total += np.exp(x[..., j] - m)
        out = np.empty_like(x)
        for k in range(n):
            if log:
                out[..., k] = x[..., k] - m - np.log(total)
            else:
                out[..., k] = np.exp(x[..., k] - m) / total
    return out


def softmax_gradient_nhwc(dy: Any, y: Any, log: bool = False) -> np.ndarray:
    """softmax.md §4-5 over the last axis, from the incoming gradient ``g`` and the forward
    result: ``dx_k = s_k (g_k - sum_j g_j s_j)`` or ``dx_k = g_k - exp(l_k) sum_j g_j``."""
    g = np.asarray(dy, dtype=np.float64)
    s = np.asarray(y, dtype=np.float64)
    if log:
        return g - np.exp(s) * np.einsum("...j->...", g)[..., None]
    return s * (g - np.einsum("...j,...j->...", g, s)[..., None])


def destination_aligned_gradient_reference(
    dy: Any,
    aux: Any,
    forward_source_shape: tuple[int, int, int, int],
    result: Any,
    *,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """What a gradient kernel writes when both of its inputs are read in the forward
    destination's coordinates (mpsnn's documented gradient-state rule).

    Args:
        dy: ``[Nd, Hd, Wd, Cd]`` incoming gradient (the forward destination's size).
        aux: ``[Nd, Hd, Wd, Ca]`` the second input, also in destination coordinates, read at
            channels ``[dst_c_off, dst_c_off + Nin)``.
        forward_source_shape: ``(Ns, Hs, Ws, Cs)`` of the forward source.
        result: previous contents of the result (the forward source's size); a float64 copy
            is returned.
        offset, clip_rect, src_c_off, src_c_max, dst_c_off: the forward kernel's properties.
        fn: ``(g [Nin], a [Nin]) -> [Nin]`` for one pixel.

    Result pixel ``p`` of image ``n``, channels ``[src_c_off, src_c_off + Nin)``::

        d = p - forward.offset + forward.clip_rect.origin
        result[n, p] = fn(dy[n, d, dst window], aux[n, d, dst window])   if d lies in R
                       0                                                 otherwise
    """
    g = np.asarray(dy, dtype=np.float64)
    a = np.asarray(aux, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    ns, hs, ws, cs = forward_source_shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, rz), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(g.shape, ns, oz, clip_rect)
    for n in range(min(out.shape[0], ns)):
        for py in range(min(out.shape[1], hs)):
            for px in range(min(out.shape[2], ws)):
                dx_, dy_ = px - ox + rx, py - oy + ry
                if z0 <= n < z0 + depth and y0 <= dy_ < y1 and x0 <= dx_ < x1:
                    val = fn(g[n, dy_, dx_, dst_c_off:dst_c_off + nin], a[n, dy_, dx_, dst_c_off:dst_c_off + nin])
                else:
                    val = np.zeros(nin)
                out[n, py, px, src_c_off:src_c_off + nin] = val
    return out
