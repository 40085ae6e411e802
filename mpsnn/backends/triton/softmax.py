"""Triton softmax and log-softmax over the feature channels of NHWC images (the last,
contiguous dimension), forward and gradient, float32 arithmetic in registers.

Every pixel's channels are one row: a program loads ``BM`` whole rows (the row length padded
to a power of two, up to :data:`MAX_CHANNELS`), so the data is read once and written once.
Rows are addressed as ``base + row * row_stride`` (``row_stride`` >= channels), which covers
channel windows of wider images; other layouts go to the torch path.

Formulas (spec/softmax.md): ``y = exp(x - m) / Σ exp(x - m)``, ``log y = x - m - ln Σ exp(x - m)``
with ``m`` the row maximum; gradients ``dx = s · (g - Σ g·s)`` (softmax, ``s`` the forward
result) and ``dx = g - exp(l) · Σ g`` (log-softmax, ``l`` the forward result).
"""
from __future__ import annotations

import torch

from .neuron import available, tl, triton

__all__ = ["MAX_CHANNELS", "available", "rows_view", "softmax_forward", "softmax_gradient"]

#: longest row (feature channels) a program holds in registers
MAX_CHANNELS = 8192

if triton is not None:
    @triton.jit
    def _softmax_forward_kernel(x_ptr, y_ptr, M, C, xs, ys, LOG: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BC)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r64 * xs + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        m = tl.where(rows < M, m, 0.0)   # rows past the end: no -inf - -inf
        z = x - m[:, None]
        e = tl.where(mask, tl.exp(z), 0.0)
        s = tl.sum(e, axis=1)
        s = tl.where(rows < M, s, 1.0)
        if LOG:
            y = z - tl.log(s)[:, None]
        else:
            y = e / s[:, None]
        tl.store(y_ptr + r64 * ys + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_gradient_kernel(g_ptr, s_ptr, d_ptr, M, C, gs, ss, ds, LOG: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BC)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * gs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + r64 * ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if LOG:
            d = g - tl.exp(s) * tl.sum(g, axis=1)[:, None]
        else:
            d = s * (g - tl.sum(g * s, axis=1)[:, None])
        tl.store(d_ptr + r64 * ds + cols[None, :], d.to(d_ptr.dtype.element_ty), mask=mask)


def rows_view(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(rows, channels, row_stride)`` when the NHWC tensor ``t``'s pixels are equally spaced
    rows of contiguous channels (a whole image or a channel window of one), else None."""
    if t.dim() != 4 or t.stride(3) != 1:
        return None
    n, h, w, c = t.shape
    rs = t.stride(2)
    if (h > 1 and t.stride(1) != w * rs) or (n > 1 and t.stride(0) != h * w * rs):
        return None
    return n * h * w, c, rs


def _blocks(c: int, element_size: int) -> tuple[int, int, int]:
    bc = triton.next_power_of_2(max(c, 1))
    bm = max(1, min(64, 8192 // bc))
    warps = 4 if bc * bm <= 4096 else 8
    return bc, bm, warps


def softmax_forward(x: torch.Tensor, out: torch.Tensor, log: bool) -> None:
    """``out = softmax(x)`` (``log_softmax`` when ``log``) over the last dimension of NHWC
    CUDA tensors of one shape whose :func:`rows_view` is not None and whose channel count is at
    most :data:`MAX_CHANNELS`."""
    mx, c, xs = rows_view(x)  # type: ignore[misc]
    _, _, ys = rows_view(out)  # type: ignore[misc]
    bc, bm, warps = _blocks(c, x.element_size())
    _softmax_forward_kernel[(triton.cdiv(mx, bm),)](x, out, mx, c, xs, ys, LOG=log, BM=bm, BC=bc, num_warps=warps)


def softmax_gradient(g: torch.Tensor, s: torch.Tensor, out: torch.Tensor, log: bool) -> None:
    """``out = dL/dx`` from the incoming gradient ``g`` and the forward result ``s``."""
    mx, c, gs = rows_view(g)  # type: ignore[misc]
    _, _, ss = rows_view(s)  # type: ignore[misc]
    _, _, ds = rows_view(out)  # type: ignore[misc]
    bc, bm, warps = _blocks(c, g.element_size())
    _softmax_gradient_kernel[(triton.cdiv(mx, bm),)](g, s, out, mx, c, gs, ss, ds, LOG=log, BM=bm, BC=bc, num_warps=warps)
