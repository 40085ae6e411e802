"""Float64 NumPy references for the MPSNNReduce* kernels and MPSNNLocalCorrelation, written
from spec/reduce-reshape-slice-concat.md §2-3 with plain loops (nothing shared with
``mpsnn.backends``).

Every function takes NHWC arrays and returns the *block* the kernel computes (before it is
placed in the destination); :func:`place` writes a block into a copy of a destination the
way the spec places results (``clip_rect.origin``, clipped by ``clip_rect.size`` and the
destination bounds, from ``destination_feature_channel_offset``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["local_correlation", "place", "reduce_feature_channels", "reduce_feature_channels_and_weights", "reduce_unary", "region"]

_BIG = 1 << 62


def region(shape: tuple[int, ...], origin: tuple[int, int, int] = (0, 0, 0), size: tuple[int, int, int] | None = None) -> tuple[int, int, int, int, int, int]:
    """``(x0, y0, z0, w, h, d)``: the region ``origin``/``size`` (x, y, z order; None = no clip)
    intersected with an ``[N, H, W, C]`` image."""
    n, hh, ww, _ = shape
    sx, sy, sz = size if size is not None else (_BIG, _BIG, _BIG)
    x0, y0, z0 = origin
    return x0, y0, z0, min(x0 + sx, ww) - x0, min(y0 + sy, hh) - y0, min(z0 + sz, n) - z0


def _op(values: list[float], op: str, weight: float = 1.0) -> float:
    v = np.array(values, dtype=np.float64)
    if op == "min":
        return float(v.min())
    if op == "max":
        return float(v.max())
    if op == "sum":
        return float(sum(weight * a for a in values))
    if op == "mean":
        return float(sum(values) / len(values))
    if op in ("argmin", "argmax"):
        best = 0
        for i, a in enumerate(values):  # strict comparison: ties keep the lowest index
            if (op == "argmax" and a > values[best]) or (op == "argmin" and a < values[best]):
                best = i
        return float(best)
    raise ValueError(op)


def reduce_unary(x: Any, axis: str, op: str, src_region: tuple[int, int, int, int, int, int] | None = None,
                 c0: int = 0, channels: int | None = None, weight: float = 1.0) -> np.ndarray:
    """Block ``[d, bh, bw, nout]`` of a unary reduction of ``x[z0:z0+d, y0:y0+h, x0:x0+w,
    c0:c0+channels]`` along ``axis`` (``row`` over x, ``column`` over y, ``featureChannels``)."""
    x = np.asarray(x, dtype=np.float64)
    x0, y0, z0, w, h, d = src_region if src_region is not None else region(x.shape)
    nc = channels if channels is not None else x.shape[3] - c0
    if axis == "row":
        out = np.zeros((d, h, 1, nc))
        for m in range(d):
            for j in range(h):
                for c in range(nc):
                    out[m, j, 0, c] = _op([x[z0 + m, y0 + j, x0 + i, c0 + c] for i in range(w)], op, weight)
    elif axis == "column":
        out = np.zeros((d, 1, w, nc))
        for m in range(d):
            for i in range(w):
                for c in range(nc):
                    out[m, 0, i, c] = _op([x[z0 + m, y0 + j, x0 + i, c0 + c] for j in range(h)], op, weight)
    else:
        out = np.zeros((d, h, w, 1))
        for m in range(d):
            for j in range(h):
                for i in range(w):
                    out[m, j, i, 0] = _op([x[z0 + m, y0 + j, x0 + i, c0 + c] for c in range(nc)], op, weight)
    return out


def reduce_feature_channels(x: Any, op: str, weight: float = 1.0) -> np.ndarray:
    """Whole-image feature-channel reduction ``[N, H, W, 1]``."""
    return reduce_unary(x, "featureChannels", op, weight=weight)


def reduce_feature_channels_and_weights(p: Any, q: Any, mode: str) -> np.ndarray:
    """``[N, H, W, 1]``: ``sum`` Σ p·q, ``mean`` Σ p·q / C, ``nonzero`` Σ p·q / #(q != 0) (0 if none)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    n, h, w, c = p.shape
    out = np.zeros((n, h, w, 1))
    for a in range(n):
        for j in range(h):
            for i in range(w):
                dot = sum(p[a, j, i, k] * q[a, j, i, k] for k in range(c))
                if mode == "sum":
                    out[a, j, i, 0] = dot
                elif mode == "mean":
                    out[a, j, i, 0] = dot / c
                else:
                    nz = sum(1 for k in range(c) if q[a, j, i, k] != 0)
                    out[a, j, i, 0] = dot / nz if nz else 0.0
    return out


def local_correlation(a: Any, b: Any, bx0: int, by0: int, wx: int, wy: int, sx: int, sy: int) -> np.ndarray:
    """``O[n, y, x, k·(2wx+1) + m] = Σ_z a[n, y, x, z]·b[n, by0 + y + (k−wy)·sy, bx0 + x + (m−wx)·sx, z]``
    (``b`` reads 0 outside its image); ``a`` is the primary block."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, h, w, c = a.shape
    out = np.zeros((n, h, w, (2 * wx + 1) * (2 * wy + 1)))
    for t in range(n):
        for y in range(h):
            for x in range(w):
                for k in range(2 * wy + 1):
                    for m in range(2 * wx + 1):
                        yy, xx = by0 + y + (k - wy) * sy, bx0 + x + (m - wx) * sx
                        if 0 <= yy < b.shape[1] and 0 <= xx < b.shape[2]:
                            out[t, y, x, k * (2 * wx + 1) + m] = sum(a[t, y, x, z] * b[t, yy, xx, z] for z in range(c))
    return out


def place(dest: Any, block: Any, origin: tuple[int, int, int] = (0, 0, 0), clip_size: tuple[int, int, int] | None = None, c0: int = 0) -> np.ndarray:
    """A copy of ``dest`` with ``block`` written at ``origin`` (x, y, z) from channel ``c0``;
    the part outside ``clip_size`` (x, y, z extents) or the destination is dropped."""
    out = np.array(dest, dtype=np.float64, copy=True)
    block = np.asarray(block, np.float64)
    cs = clip_size if clip_size is not None else (_BIG, _BIG, _BIG)
    for m in range(block.shape[0]):
        for j in range(block.shape[1]):
            for i in range(block.shape[2]):
                z, y, x = origin[2] + m, origin[1] + j, origin[0] + i
                if m < cs[2] and j < cs[1] and i < cs[0] and z < out.shape[0] and y < out.shape[1] and x < out.shape[2]:
                    out[z, y, x, c0:c0 + block.shape[3]] = block[m, j, i]
    return out
