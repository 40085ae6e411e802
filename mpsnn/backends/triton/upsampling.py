"""Triton integer-factor upsampling over NHWC images: nearest and bilinear, forward and
gradient (the adjoint), float32 arithmetic in registers, one pass each.

Sampling (spec/upsampling-resampling.md §4, as ``mpsnn.backends.upsampling`` reads it), per
axis of ``n`` source pixels and factor ``s``: nearest reads ``i // s``; bilinear reads
``u = i / s`` clamped to ``n − 1`` (``align_corners`` NO) or ``u = i·(n−1)/(s·n−1)`` (YES),
taps ``floor(u)`` and ``min(floor(u) + 1, n − 1)`` with weights ``1 − f`` and ``f``. Tap
positions and weights come from integer arithmetic (``floor(u)`` and ``f`` exactly), so they
agree with a float64 table.

The gradients are gathers: every source pixel visits the outputs that can read it (``s`` per
axis for nearest; ``2s`` or ``2s + 2`` for bilinear) and sums their values with the forward
weights — no atomics, the same bits every run.
"""
from __future__ import annotations

import torch

from .neuron import available, tl, triton
from .pooling import _blocks

__all__ = ["available", "bilinear_forward", "bilinear_gradient", "nearest_forward", "nearest_gradient"]

if triton is not None:
    from .pooling import _pixel_tile

    @triton.jit
    def _axis_taps(i, n_in, n_out, S: tl.constexpr, ALIGN: tl.constexpr):
        """(first tap, second tap, weight of the second) of output index ``i`` (i >= 0)."""
        if ALIGN:
            num = i * (n_in - 1)
            den = tl.maximum(n_out - 1, 1)
            i0 = num // den
            f = (num - i0 * den).to(tl.float32) / den.to(tl.float32)
        else:
            i0 = i // S
            f = (i - i0 * S).to(tl.float32) * (1.0 / S)
            last = i0 >= n_in - 1
            i0 = tl.where(last, n_in - 1, i0)
            f = tl.where(last, 0.0, f)
        i1 = tl.minimum(i0 + 1, n_in - 1)
        return i0, i1, f

    @triton.jit
    def _up_forward_kernel(x_ptr, y_ptr, P, C, H, W, OH, OW, xs_n, xs_h, xs_w, ys_n, ys_h, ys_w,
                           SY: tl.constexpr, SX: tl.constexpr, BILINEAR: tl.constexpr, ALIGN: tl.constexpr,
                           BP: tl.constexpr, BC: tl.constexpr):
        c, pm, cm, ox, oy, n = _pixel_tile(P, C, OW, OH, BP, BC)
        m2 = pm[:, None] & cm[None, :]
        base = x_ptr + n * xs_n
        if BILINEAR:
            y0, y1, fy = _axis_taps(oy, H, OH, SY, ALIGN)
            x0, x1, fx = _axis_taps(ox, W, OW, SX, ALIGN)
            r0 = y0.to(tl.int64) * xs_h
            r1 = y1.to(tl.int64) * xs_h
            c0 = x0.to(tl.int64) * xs_w
            c1 = x1.to(tl.int64) * xs_w
            v00 = tl.load(base[:, None] + (r0 + c0)[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            v01 = tl.load(base[:, None] + (r0 + c1)[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            v10 = tl.load(base[:, None] + (r1 + c0)[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            v11 = tl.load(base[:, None] + (r1 + c1)[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            wx = fx[:, None]
            top = v00 + (v01 - v00) * wx
            bot = v10 + (v11 - v10) * wx
            v = top + (bot - top) * fy[:, None]
        else:
            src = (oy // SY).to(tl.int64) * xs_h + (ox // SX).to(tl.int64) * xs_w
            v = tl.load(base[:, None] + src[:, None] + c[None, :], mask=m2, other=0.0)
        yp = y_ptr + n * ys_n + oy.to(tl.int64) * ys_h + ox.to(tl.int64) * ys_w
        tl.store(yp[:, None] + c[None, :], v.to(y_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _first_reader(q, n_in, n_out, S: tl.constexpr, ALIGN: tl.constexpr):
        """The first output index whose bilinear taps can include source pixel ``q`` (>= 0)."""
        if ALIGN:
            qm = tl.maximum(q - 1, 0)
            den = tl.maximum(n_in - 1, 1)
            start = (qm * (n_out - 1) + den - 1) // den
            return tl.where(q >= 1, start, 0)
        return tl.maximum(q - 1, 0) * S

    @triton.jit
    def _up_gradient_kernel(g_ptr, d_ptr, Q, C, H, W, OH, OW, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                            SY: tl.constexpr, SX: tl.constexpr, NY: tl.constexpr, NX: tl.constexpr,
                            BILINEAR: tl.constexpr, ALIGN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        c, qm, cm, px, py, n = _pixel_tile(Q, C, W, H, BP, BC)
        base = g_ptr + n * gs_n
        acc = tl.zeros([BP, BC], tl.float32)
        if BILINEAR:
            iy0 = _first_reader(py, H, OH, SY, ALIGN)
            ix0 = _first_reader(px, W, OW, SX, ALIGN)
            for a in tl.static_range(NY):
                oy = iy0 + a
                y0, y1, fy = _axis_taps(oy, H, OH, SY, ALIGN)
                wy = tl.where(y0 == py, 1.0 - fy, 0.0) + tl.where(y1 == py, fy, 0.0)
                wy = tl.where(oy < OH, wy, 0.0)
                for b in tl.static_range(NX):
                    ox = ix0 + b
                    x0, x1, fx = _axis_taps(ox, W, OW, SX, ALIGN)
                    wx = tl.where(x0 == px, 1.0 - fx, 0.0) + tl.where(x1 == px, fx, 0.0)
                    w = wy * tl.where(ox < OW, wx, 0.0)
                    ok = qm & (w != 0.0)
                    gv = tl.load(base[:, None] + (oy.to(tl.int64) * gs_h + ox.to(tl.int64) * gs_w)[:, None] + c[None, :],
                                 mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    acc += gv * w[:, None]
        else:
            for a in tl.static_range(SY):
                for b in tl.static_range(SX):
                    src = (py * SY + a).to(tl.int64) * gs_h + (px * SX + b).to(tl.int64) * gs_w
                    acc += tl.load(base[:, None] + src[:, None] + c[None, :], mask=qm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        dp = d_ptr + n * ds_n + py.to(tl.int64) * ds_h + px.to(tl.int64) * ds_w
        tl.store(dp[:, None] + c[None, :], acc.to(d_ptr.dtype.element_ty), mask=qm[:, None] & cm[None, :])


def _readers(n_in: int, n_out: int, s: int, bilinear: bool, align: bool) -> int:
    """Most outputs along one axis that read one source pixel (the gather's loop length)."""
    if not bilinear:
        return s
    if not align:
        return 2 * s
    if n_in == 1:
        return n_out
    return -(-2 * (n_out - 1) // (n_in - 1)) + 1


def _launch_forward(x: torch.Tensor, out: torch.Tensor, sx: int, sy: int, bilinear: bool, align: bool) -> None:
    n, h, w, c = x.shape
    oh, ow = out.shape[1], out.shape[2]
    p = n * oh * ow
    bp, bc = _blocks(c)
    _up_forward_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, out, p, c, h, w, oh, ow, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        SY=sy, SX=sx, BILINEAR=bilinear, ALIGN=align, BP=bp, BC=bc, num_warps=4)


def _launch_gradient(g: torch.Tensor, out: torch.Tensor, sx: int, sy: int, bilinear: bool, align: bool) -> None:
    n, h, w, c = out.shape
    oh, ow = g.shape[1], g.shape[2]
    q = n * h * w
    bp, bc = _blocks(c)
    ny, nx = _readers(h, oh, sy, bilinear, align), _readers(w, ow, sx, bilinear, align)
    _up_gradient_kernel[(triton.cdiv(q, bp), triton.cdiv(c, bc))](
        g, out, q, c, h, w, oh, ow, g.stride(0), g.stride(1), g.stride(2), out.stride(0), out.stride(1), out.stride(2),
        SY=sy, SX=sx, NY=ny, NX=nx, BILINEAR=bilinear, ALIGN=align, BP=bp, BC=bc, num_warps=4)


def nearest_forward(x: torch.Tensor, out: torch.Tensor, sx: int, sy: int) -> None:
    """``out[n, i, j] = x[n, i // sy, j // sx]`` (NHWC, channels contiguous; ``out`` is
    ``[N, sy·H, sx·W, C]`` or any view of that shape)."""
    _launch_forward(x, out, sx, sy, False, False)


def bilinear_forward(x: torch.Tensor, out: torch.Tensor, sx: int, sy: int, align_corners: bool) -> None:
    _launch_forward(x, out, sx, sy, True, align_corners)


def nearest_gradient(g: torch.Tensor, out: torch.Tensor, sx: int, sy: int) -> None:
    """``out[n, y, x] = Σ`` of ``g``'s ``sy x sx`` block at ``(sy·y, sx·x)``."""
    _launch_gradient(g, out, sx, sy, False, False)


def bilinear_gradient(g: torch.Tensor, out: torch.Tensor, sx: int, sy: int, align_corners: bool) -> None:
    """The adjoint of :func:`bilinear_forward` (``out`` has the forward source's shape)."""
    _launch_gradient(g, out, sx, sy, True, align_corners)
