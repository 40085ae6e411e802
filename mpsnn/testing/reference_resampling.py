"""Float64 NumPy references for MPSImageBilinearScale / MPSImageLanczosScale, written from
upsampling-resampling.md §6, independent of ``backends/``.

:func:`image_scale_reference` evaluates every destination pixel directly in two dimensions
with Python loops: the source coordinate from the scale transform, then a 2-D sum over the
taps (bilinear: four taps; Lanczos: every source pixel within the stretched window, weights
``L(dx/fx) * L(dy/fy)`` normalised by their 2-D sum), reads clamped to the edge.

Conventions (spec §6, inferred there): ``u = offset.x + (i + 0.5 - translate_x)/scale_x -
0.5`` with ``i`` counted from the clip origin; no transform = fit the source into ``R``;
Lanczos ``a = 3``, stretch ``f = max(1, 1/scale)``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reference import _effective_region, _region, _xyz

__all__ = ["LANCZOS_A", "image_scale_reference", "lanczos"]

LANCZOS_A = 3


def lanczos(t: float, a: int = LANCZOS_A) -> float:
    """``sinc(t) * sinc(t/a)`` for ``|t| < a``, else 0, ``sinc(t) = sin(pi t)/(pi t)``."""
    if abs(t) >= a:
        return 0.0
    if t == 0.0:
        return 1.0
    if t == round(t):
        return 0.0
    pt = math.pi * t
    return (math.sin(pt) / pt) * (math.sin(pt / a) / (pt / a))


def _clamp(k: int, n: int) -> int:
    return min(max(k, 0), n - 1)


def _pixel(s: np.ndarray, n: int, u: float, v: float, c0: int, nin: int, method: str, fx: float, fy: float) -> np.ndarray:
    _, hs, ws, _ = s.shape
    if method == "bilinear":
        i0, j0 = math.floor(u), math.floor(v)
        t, w = u - i0, v - j0
        acc = np.zeros(nin)
        for j, wj in ((j0, 1.0 - w), (j0 + 1, w)):
            for i, wi in ((i0, 1.0 - t), (i0 + 1, t)):
                acc += wj * wi * s[n, _clamp(j, hs), _clamp(i, ws), c0:c0 + nin]
        return acc
    if method != "lanczos":
        raise ValueError(f"unknown method {method!r}")
    rx, ry = LANCZOS_A * fx, LANCZOS_A * fy
    acc = np.zeros(nin)
    total = 0.0
    for j in range(math.floor(v - ry), math.ceil(v + ry) + 1):
        wy = lanczos((j - v) / fy)
        if wy == 0.0:
            continue
        for i in range(math.floor(u - rx), math.ceil(u + rx) + 1):
            wgt = wy * lanczos((i - u) / fx)
            if wgt == 0.0:
                continue
            acc += wgt * s[n, _clamp(j, hs), _clamp(i, ws), c0:c0 + nin]
            total += wgt
    return acc / total


def image_scale_reference(
    src: Any,
    dest: Any,
    *,
    method: str,
    transform: Any = None,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What ``MPSImage{Bilinear,Lanczos}Scale`` writes into ``dest`` (float64 copy returned).

    Args:
        src: ``[N, H, W, C]`` source values.
        dest: previous destination contents.
        method: ``"bilinear"`` or ``"lanczos"``.
        transform: ``(scale_x, scale_y, translate_x, translate_y)`` (or an object with those
            attributes), None = fit the source into the written region.
        offset, clip_rect, src_c_off, src_c_max, dst_c_off: as in :mod:`reference`.
    """
    s = np.asarray(src, dtype=np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    ns, hs, ws, cs = s.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, _), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(out.shape, ns, oz, clip_rect)
    if depth == 0 or x1 == x0 or y1 == y0:
        return out
    if transform is None:
        sx, sy, tx, ty = (x1 - x0) / ws, (y1 - y0) / hs, 0.0, 0.0
    elif hasattr(transform, "scale_x"):
        sx, sy, tx, ty = transform.scale_x, transform.scale_y, transform.translate_x, transform.translate_y
    else:
        sx, sy, tx, ty = transform
    fx, fy = max(1.0, 1.0 / sx), max(1.0, 1.0 / sy)
    for m in range(depth):
        for y in range(y0, y1):
            v = oy + ((y - ry) + 0.5 - ty) / sy - 0.5
            for x in range(x0, x1):
                u = ox + ((x - rx) + 0.5 - tx) / sx - 0.5
                out[z0 + m, y, x, dst_c_off:dst_c_off + nin] = _pixel(s, oz + m, u, v, src_c_off, nin, method, fx, fy)
    return out
