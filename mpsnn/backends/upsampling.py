"""Integer-factor upsampling and its adjoint in torch, on whole NHWC tensors.

Entry points (pure functions, no host <-> device synchronisation; a faster engine may replace
any of them with the same signature):

* :func:`upsample_nearest_nhwc` ``(x, sx, sy)``: ``out[y][x] = in[y // sy][x // sx]``
  (``[N, H, W, C]`` -> ``[N, sy*H, sx*W, C]``, same dtype, always a new tensor).
* :func:`upsample_nearest_gradient_nhwc` ``(g, sx, sy)``: the block sum
  ``d[y][x] = sum_{dy < sy, dx < sx} g[sy*y + dy][sx*x + dx]``.
* :func:`upsample_bilinear_nhwc` ``(x, sx, sy, align_corners)``: per axis, output index
  ``i`` samples ``u = i / s`` clamped to ``n_in - 1`` (``align_corners=False``) or
  ``u = i * (n_in - 1) / (s*n_in - 1)`` (``True``; 0 when ``s*n_in == 1``); taps
  ``floor(u)`` and ``min(floor(u) + 1, n_in - 1)`` (upsampling-resampling.md §4).
* :func:`upsample_bilinear_gradient_nhwc` ``(g, sx, sy, align_corners)``: the exact adjoint
  of the bilinear forward (transposed tap tables, deterministic order).

Results of the interpolating functions and of both gradients are float32 (float64 for
float64 input); callers round once on store.
"""
from __future__ import annotations

import numpy as np
import torch

from . import dispatch
from .resampling import Table, bilinear_taps, compute_dtype, device_table, resample_axis, transpose_taps

__all__ = [
    "bilinear_upsample_taps",
    "upsample_bilinear_gradient_nhwc",
    "upsample_bilinear_nhwc",
    "upsample_nearest_gradient_nhwc",
    "upsample_nearest_nhwc",
]


def bilinear_upsample_taps(n_in: int, s: int, align_corners: bool) -> Table:
    """Tap table of one axis of bilinear upsampling by the integer factor ``s``."""
    n_out = s * n_in
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        u = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    else:
        u = i / s
    return bilinear_taps(np.minimum(u, n_in - 1), n_in)


def _taps(n_in: int, s: int, align_corners: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return device_table(("upsample", n_in, s, align_corners), lambda: bilinear_upsample_taps(n_in, s, align_corners), device, dtype)


def _taps_t(n_in: int, s: int, align_corners: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return device_table(("upsample-T", n_in, s, align_corners),
                        lambda: transpose_taps(*bilinear_upsample_taps(n_in, s, align_corners), n_in), device, dtype)


def upsample_nearest_nhwc(x: torch.Tensor, sx: int, sy: int, out_dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Replicate every pixel into an ``sx`` x ``sy`` block. On CUDA the Triton engine
    (``mpsnn.backends.triton.upsampling``) writes ``out_dtype`` into ``out`` where given."""
    n, h, w, c = x.shape
    tri = dispatch.triton_engine("upsampling", x)
    if tri is not None:
        y = dispatch.engine_out(out, (n, h * sy, w * sx, c), out_dtype or x.dtype, x.device)
        tri.nearest_forward(x, y, sx, sy)
        return y
    if sx == 1 and sy == 1:
        return x.clone(memory_format=torch.contiguous_format)
    return x[:, :, None, :, None, :].expand(n, h, sy, w, sx, c).reshape(n, h * sy, w * sx, c)


def upsample_nearest_gradient_nhwc(g: torch.Tensor, sx: int, sy: int, out_dtype: torch.dtype | None = None,
                                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each ``sx`` x ``sy`` block of ``g`` (``[N, sy*H, sx*W, C]`` -> ``[N, H, W, C]``),
    accumulated in float32 (float64 for float64 input)."""
    n, hh, ww, c = g.shape
    h, w = hh // sy, ww // sx
    tri = dispatch.triton_engine("upsampling", g)
    if tri is not None:
        d = dispatch.engine_out(out, (n, h, w, c), out_dtype or compute_dtype(g), g.device)
        tri.nearest_gradient(g, d, sx, sy)
        return d
    return g.reshape(n, h, sy, w, sx, c).sum(dim=(2, 4), dtype=compute_dtype(g))


def upsample_bilinear_nhwc(x: torch.Tensor, sx: int, sy: int, align_corners: bool, out_dtype: torch.dtype | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear upsampling by integer factors (module docstring for the sampling rule)."""
    n, h, w, c = x.shape
    dt = compute_dtype(x)
    tri = dispatch.triton_engine("upsampling", x)
    if tri is not None:
        y = dispatch.engine_out(out, (n, h * sy, w * sx, c), out_dtype or dt, x.device)
        tri.bilinear_forward(x, y, sx, sy, align_corners)
        return y
    xc = x if x.dtype == dt else x.to(dt)
    if sx == 1 and sy == 1:
        return xc.clone(memory_format=torch.contiguous_format)
    ix, wx = _taps(w, sx, align_corners, x.device, dt)
    iy, wy = _taps(h, sy, align_corners, x.device, dt)
    return resample_axis(resample_axis(xc, 2, ix, wx), 1, iy, wy)


def upsample_bilinear_gradient_nhwc(g: torch.Tensor, sx: int, sy: int, align_corners: bool, out_dtype: torch.dtype | None = None,
                                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The adjoint of :func:`upsample_bilinear_nhwc`: ``g`` is ``[N, sy*H, sx*W, C]``, the
    result ``[N, H, W, C]``; every ``g`` value goes to the (up to four) source pixels its
    forward sample read, with the forward weights."""
    n, hh, ww, c = g.shape
    h, w = hh // sy, ww // sx
    dt = compute_dtype(g)
    tri = dispatch.triton_engine("upsampling", g)
    if tri is not None:
        d = dispatch.engine_out(out, (n, h, w, c), out_dtype or dt, g.device)
        tri.bilinear_gradient(g, d, sx, sy, align_corners)
        return d
    gc = g if g.dtype == dt else g.to(dt)
    if sx == 1 and sy == 1:
        return gc.clone(memory_format=torch.contiguous_format)
    iy, wy = _taps_t(h, sy, align_corners, g.device, dt)
    ix, wx = _taps_t(w, sx, align_corners, g.device, dt)
    return resample_axis(resample_axis(gc, 1, iy, wy), 2, ix, wx)
