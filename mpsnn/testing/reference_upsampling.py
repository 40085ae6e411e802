"""Float64 NumPy references for integer-factor upsampling, written from
upsampling-resampling.md §2-5 and kernel-base.md §2.2-2.5, independent of ``backends/``.

Same names as ``mpsnn.backends.upsampling`` for the whole-image functions
(:func:`upsample_nearest_nhwc`, :func:`upsample_bilinear_nhwc` and their gradients), plus the
coordinate references :func:`upsampling_kernel_reference` and
:func:`upsampling_gradient_reference`, which apply the formulas pixel by pixel with Python
loops (slow and obvious on purpose): the bilinear sample of destination pixel ``x`` is computed
directly from the spec's formula at ``q = offset.x*sX + x - clip.x`` (not through an upsampled
intermediate as the production code does).

Conventions (mpsnn's documented decisions): nearest reads outside the upsampled grid follow
the edge mode; bilinear taps are clamped into the image (``u <= W - 1`` and ``i1 <=
W - 1``, ``i0 >= 0``); the gradient drops incoming values of reads outside the grid.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reference import _edge, _effective_region, _region, _xyz

__all__ = [
    "bilinear_coordinate",
    "upsample_bilinear_gradient_nhwc",
    "upsample_bilinear_nhwc",
    "upsample_nearest_gradient_nhwc",
    "upsample_nearest_nhwc",
    "upsampling_gradient_reference",
    "upsampling_kernel_reference",
]


def bilinear_coordinate(q: int, n_in: int, s: int, align_corners: bool) -> float:
    """Source coordinate ``u`` of upsampled index ``q`` (spec §4), clamped to ``<= n_in - 1``."""
    n_out = s * n_in
    if align_corners:
        u = 0.0 if n_out == 1 else q * (n_in - 1) / (n_out - 1)
    else:
        u = q / s
    return min(u, float(n_in - 1))


def _taps_1d(q: int, n_in: int, s: int, align_corners: bool) -> list[tuple[int, float]]:
    """``[(index, weight)]`` of the two bilinear taps of upsampled index ``q``."""
    u = bilinear_coordinate(q, n_in, s, align_corners)
    i0 = math.floor(u)
    t = u - i0
    lo = min(max(i0, 0), n_in - 1)
    hi = min(max(i0 + 1, 0), n_in - 1)
    return [(lo, 1.0 - t), (hi, t)]


def upsample_nearest_nhwc(x: Any, sx: int, sy: int) -> np.ndarray:
    """``out[n, y, x, c] = in[n, floor(y/sy), floor(x/sx), c]``."""
    a = np.asarray(x, dtype=np.float64)
    n, h, w, c = a.shape
    out = np.empty((n, sy * h, sx * w, c))
    for yy in range(sy * h):
        for xx in range(sx * w):
            out[:, yy, xx, :] = a[:, yy // sy, xx // sx, :]
    return out


def upsample_bilinear_nhwc(x: Any, sx: int, sy: int, align_corners: bool) -> np.ndarray:
    """The four-tap formula of spec §4 for every output pixel."""
    a = np.asarray(x, dtype=np.float64)
    n, h, w, c = a.shape
    out = np.zeros((n, sy * h, sx * w, c))
    for yy in range(sy * h):
        for xx in range(sx * w):
            for j, wv in _taps_1d(yy, h, sy, align_corners):
                for i, wu in _taps_1d(xx, w, sx, align_corners):
                    out[:, yy, xx, :] += wv * wu * a[:, j, i, :]
    return out


def upsample_nearest_gradient_nhwc(g: Any, sx: int, sy: int) -> np.ndarray:
    """Block sums: ``d[y][x] = sum_{dy<sy, dx<sx} g[sy*y+dy][sx*x+dx]``."""
    a = np.asarray(g, dtype=np.float64)
    n, hh, ww, c = a.shape
    h, w = hh // sy, ww // sx
    out = np.zeros((n, h, w, c))
    for y in range(h):
        for x in range(w):
            for dy in range(sy):
                for dx in range(sx):
                    out[:, y, x, :] += a[:, sy * y + dy, sx * x + dx, :]
    return out


def upsample_bilinear_gradient_nhwc(g: Any, sx: int, sy: int, align_corners: bool) -> np.ndarray:
    """Scatter every ``g`` value to its four forward taps with the forward weights."""
    a = np.asarray(g, dtype=np.float64)
    n, hh, ww, c = a.shape
    h, w = hh // sy, ww // sx
    out = np.zeros((n, h, w, c))
    for yy in range(hh):
        for xx in range(ww):
            for j, wv in _taps_1d(yy, h, sy, align_corners):
                for i, wu in _taps_1d(xx, w, sx, align_corners):
                    out[:, j, i, :] += wv * wu * a[:, yy, xx, :]
    return out


def _sample(s: np.ndarray, n: int, qx: int, qy: int, c0: int, nin: int, method: str, sx: int, sy: int,
            align_corners: bool, mode: str) -> np.ndarray:
    """The value destination pixel reading upsampled position ``(qx, qy)`` receives."""
    _, hs, ws, _ = s.shape
    if method == "nearest":
        ix, iy = math.floor(qx / sx), math.floor(qy / sy)
        if not (0 <= ix < ws and 0 <= iy < hs):
            if mode == "zero":
                return np.zeros(nin)
            ix, iy = min(max(ix, 0), ws - 1), min(max(iy, 0), hs - 1)
        return s[n, iy, ix, c0:c0 + nin].copy()
    # bilinear: spec formula at q (also off the grid), u <= W - 1, taps clamped into the image
    v = np.zeros(nin)
    for j, wv in _taps_1d(qy, hs, sy, align_corners):
        for i, wu in _taps_1d(qx, ws, sx, align_corners):
            v += wv * wu * s[n, j, i, c0:c0 + nin]
    return v


def upsampling_kernel_reference(
    src: Any,
    dest: Any,
    *,
    method: str,
    sx: int,
    sy: int,
    align_corners: bool = False,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
    edge_mode: Any = "zero",
) -> np.ndarray:
    """What an upsampling kernel writes into ``dest`` (a float64 copy is returned).

    Destination pixel ``(x, y)`` of ``R`` (clip rectangle ∩ destination), image slot ``m``:
    upsampled position ``q = (offset.x*sX + x - clip.x, offset.y*sY + y - clip.y)`` of source
    image ``offset.z + m``, sampled by ``method`` ("nearest" / "bilinear"), written to image
    ``clip.z + m``, channels ``[dst_c_off, dst_c_off + Nin)``. Nothing else changes.
    """
    s = np.asarray(src, dtype=np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    cs = s.shape[3]
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, _), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(out.shape, s.shape[0], oz, clip_rect)
    mode = _edge(edge_mode)
    for m in range(depth):
        for y in range(y0, y1):
            for x in range(x0, x1):
                qx, qy = ox * sx + x - rx, oy * sy + y - ry
                out[z0 + m, y, x, dst_c_off:dst_c_off + nin] = _sample(s, oz + m, qx, qy, src_c_off, nin, method, sx, sy, align_corners, mode)
    return out


def upsampling_gradient_reference(
    dy: Any,
    x: Any,
    result: Any,
    *,
    method: str,
    sx: int,
    sy: int,
    align_corners: bool = False,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What the upsampling gradient writes into ``result`` (the forward source's size; a float64
    copy is returned), for a forward pass with the given (*forward*) properties.

    Every forward destination pixel ``(x, y)`` of ``R`` that read upsampled position ``q``
    inside the grid hands ``dy[x, y, dst_c_off + k]`` to the source pixels ``q`` sampled, with
    the sampling weights; reads outside the grid contribute nothing. Result channels
    ``[src_c_off, src_c_off + Nin)`` of every image are overwritten; the others are untouched.
    """
    g = np.asarray(dy, dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    ns, hs, ws, cs = xs.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, _), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(g.shape, ns, oz, clip_rect)
    acc = np.zeros((ns, hs, ws, nin))
    for m in range(depth):
        for y in range(y0, y1):
            for x in range(x0, x1):
                qx, qy = ox * sx + x - rx, oy * sy + y - ry
                if not (0 <= qx < sx * ws and 0 <= qy < sy * hs):
                    continue
                val = g[z0 + m, y, x, dst_c_off:dst_c_off + nin]
                if method == "nearest":
                    acc[oz + m, qy // sy, qx // sx] += val
                else:
                    for j, wv in _taps_1d(qy, hs, sy, align_corners):
                        for i, wu in _taps_1d(qx, ws, sx, align_corners):
                            acc[oz + m, j, i] += wv * wu * val
    out[:ns, :hs, :ws, src_c_off:src_c_off + nin] = acc
    return out
