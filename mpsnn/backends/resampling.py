"""Separable resampling in torch on NHWC tensors: gather-and-weight along one axis at a time.

A 1-D resampling along an axis is a *tap table*: output index ``i`` reads the input indices
``idx[i, t]`` with weights ``w[i, t]`` (``t < T``; on the device stored tap-major, ``[T, L]``)::

    out[..., i, ...] = sum_t w[i, t] * in[..., idx[i, t], ...]

Tables depend only on sizes and transform parameters (never on tensor values). They are
built on the host in float64, then cached on the device per (table, device, dtype): the
first encode of a geometry copies a small table to the device, later encodes do no
host <-> device traffic and never synchronise. Arithmetic is float32 (float64 in, float64
out); callers round once when they store.

Tables here (upsampling-resampling.md §6):

* :func:`scale_coordinates`: the source coordinate, in pixel-index units, that destination
  index ``i`` samples: ``u = offset + (i + 0.5 - translate) / scale - 0.5``.
* :func:`bilinear_taps`: ``i0 = floor(u)``, taps ``i0`` and ``i0 + 1`` each clamped into
  ``[0, n_in)``, weights ``1 - t`` and ``t`` with ``t = u - i0``.
* :func:`lanczos_taps`: ``L(x) = sinc(x) sinc(x / a)`` for ``|x| < a`` (``a`` =
  :data:`LANCZOS_LOBES` = 3), stretched by ``f = max(1, 1 / scale)`` when down-scaling:
  tap ``k`` has weight ``L((k - u) / f)``; weights normalised to sum 1; taps clamped into
  the image.
* :func:`transpose_taps`: the adjoint table (used by gradients): input index ``k`` gathers
  every output ``i`` that read it, with the same weight, in a fixed order (deterministic,
  no atomics).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "LANCZOS_LOBES",
    "bilinear_taps",
    "compute_dtype",
    "device_table",
    "image_scale_nhwc",
    "lanczos_taps",
    "lanczos_weight",
    "resample_axis",
    "scale_coordinates",
    "transpose_taps",
]

#: lobes of the Lanczos window (``a``; inferred, upsampling-resampling.md §6)
LANCZOS_LOBES = 3

Table = tuple[np.ndarray, np.ndarray]  # (idx int64 [L, T], w float64 [L, T])

_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_TABLE_CACHE_MAX = 512


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def device_table(key: tuple, build: Callable[[], Table], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The table ``build()`` (``[L, T]`` arrays) on ``device``, tap-major (``[T, L]``, each
    tap's row contiguous, as :func:`resample_axis` takes it), weights in ``dtype``; cached
    under ``key``."""
    k = (key, device, dtype)
    hit = _TABLES.get(k)
    if hit is None:
        idx, w = build()
        hit = (torch.from_numpy(np.ascontiguousarray(idx.T, dtype=np.int64)).to(device),
               torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float64)).to(device=device, dtype=dtype))
        if len(_TABLES) >= _TABLE_CACHE_MAX:
            _TABLES.clear()
        _TABLES[k] = hit
    return hit


def scale_coordinates(n_out: int, scale: float, translate: float, offset: float = 0.0) -> np.ndarray:
    """``u[i] = offset + (i + 0.5 - translate) / scale - 0.5`` for ``i < n_out`` (float64)."""
    i = np.arange(n_out, dtype=np.float64)
    return offset + (i + 0.5 - translate) / scale - 0.5


def bilinear_taps(u: np.ndarray, n_in: int) -> Table:
    """Two taps per coordinate: ``floor(u)`` and ``floor(u) + 1``, clamped into ``[0, n_in)``."""
    f = np.floor(u)
    t = u - f
    i0 = f.astype(np.int64)
    idx = np.stack([np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1)], axis=1)
    return idx, np.stack([1.0 - t, t], axis=1)


def lanczos_weight(x: np.ndarray, a: int = LANCZOS_LOBES) -> np.ndarray:
    """``sinc(x) * sinc(x / a)`` for ``|x| < a``, else 0 (``sinc(x) = sin(pi x) / (pi x)``)."""
    x = np.asarray(x, dtype=np.float64)
    # exact zeros at the non-zero integers (np.sinc leaves ~1e-17 there): an integral shift copies exactly
    zero = (x != 0) & (x == np.round(x))
    return np.where((np.abs(x) < a) & ~zero, np.sinc(x) * np.sinc(x / a), 0.0)


def lanczos_taps(u: np.ndarray, n_in: int, scale: float, a: int = LANCZOS_LOBES) -> Table:
    """Every integer ``k`` with ``|k - u| < a * f`` (``f = max(1, 1 / scale)``), weight
    ``L((k - u) / f)``, normalised per output; indices clamped into ``[0, n_in)``."""
    f = max(1.0, 1.0 / scale)
    support = a * f
    taps = int(math.ceil(2.0 * support)) + 1
    k0 = np.floor(u - support) + 1.0
    ks = k0[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    w = lanczos_weight((ks - u[:, None]) / f, a)
    w = w / w.sum(axis=1, keepdims=True)
    return np.clip(ks, 0, n_in - 1).astype(np.int64), w


def transpose_taps(idx: np.ndarray, w: np.ndarray, n_in: int) -> Table:
    """The adjoint of a tap table of ``L`` outputs over ``n_in`` inputs: ``n_in`` rows, row
    ``k`` lists the outputs ``i`` with ``idx[i, t] == k`` (weight ``w[i, t]``) in increasing
    ``i``; rows are padded with index 0, weight 0. Zero weights are dropped."""
    n_out, taps = idx.shape
    rows = idx.reshape(-1)
    cols = np.repeat(np.arange(n_out, dtype=np.int64), taps)
    vals = w.reshape(-1)
    keep = vals != 0.0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(rows, minlength=n_in)
    width = max(1, int(counts.max()) if counts.size else 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rows.size) - starts[rows]
    idx_t = np.zeros((n_in, width), np.int64)
    w_t = np.zeros((n_in, width), np.float64)
    idx_t[rows, pos] = cols
    w_t[rows, pos] = vals
    return idx_t, w_t


def resample_axis(x: torch.Tensor, axis: int, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[..., i, ...] = sum_t w[t, i] * x[..., idx[t, i], ...]`` along ``axis`` of an NHWC
    tensor (``axis`` 1 = rows, 2 = columns), with tap-major tables ``idx``, ``w`` of shape
    ``[T, L]`` (see :func:`device_table`); ``x`` should already be in the compute dtype.
    Taps are summed in increasing ``t`` (deterministic)."""
    shape = [1] * x.dim()
    shape[axis] = idx.shape[1]
    out: torch.Tensor | None = None
    for t in range(idx.shape[0]):
        term = x.index_select(axis, idx[t]) * w[t].view(shape)
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def _scale_table(method: str, n_in: int, n_out: int, scale: float, translate: float, offset: float) -> Table:
    u = scale_coordinates(n_out, scale, translate, offset)
    if method == "bilinear":
        return bilinear_taps(u, n_in)
    if method == "lanczos":
        return lanczos_taps(u, n_in, scale)
    raise ValueError(f"unknown resampling method {method!r}")


def image_scale_nhwc(
    x: torch.Tensor,
    out_width: int,
    out_height: int,
    scale_x: float,
    scale_y: float,
    translate_x: float,
    translate_y: float,
    method: str = "bilinear",
    offset_x: float = 0.0,
    offset_y: float = 0.0,
) -> torch.Tensor:
    """Resample ``x`` (``[N, H, W, C]``) to ``[N, out_height, out_width, C]``: destination pixel
    ``(i, j)`` samples source coordinate ``u = offset_x + (i + 0.5 - translate_x) / scale_x -
    0.5`` (and ``v`` likewise) with ``method`` ``"bilinear"`` or ``"lanczos"``, samples clamped
    to the edge. Returns the compute dtype (float32, float64 for float64 input)."""
    n, h, w, c = x.shape
    dt = compute_dtype(x)
    xc = x if x.dtype == dt else x.to(dt)
    args_x = (method, w, out_width, float(scale_x), float(translate_x), float(offset_x))
    args_y = (method, h, out_height, float(scale_y), float(translate_y), float(offset_y))
    ix, wx = device_table(("scale",) + args_x, lambda: _scale_table(*args_x), x.device, dt)
    iy, wy = device_table(("scale",) + args_y, lambda: _scale_table(*args_y), x.device, dt)
    # shrink along the axis that shrinks more first (less data for the second pass)
    if out_width * h <= out_height * w:
        return resample_axis(resample_axis(xc, 2, ix, wx), 1, iy, wy)
    return resample_axis(resample_axis(xc, 1, iy, wy), 2, ix, wx)
