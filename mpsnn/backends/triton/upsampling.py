"""Triton integer-factor upsampling over NHWC images: nearest and bilinear, forward and
gradient (the adjoint), float32 arithmetic in registers, one pass each.

Sampling (spec/upsampling-resampling.md §4, as ``mpsnn.backends.upsampling`` reads it), per
axis of ``n`` source pixels and factor ``s``: nearest reads ``i // s``; bilinear reads
``u = i / s`` clamped to ``n − 1`` (``align_corners`` NO) or ``u = i·(n−1)/(s·n−1)`` (YES),
taps ``floor(u)`` and ``min(floor(u) + 1, n − 1)`` with weights ``1 − f`` and ``f``. Tap
positions and weights come from integer arithmetic (``floor(u)`` and ``f`` exactly), so they
agree with a float64 table.

Nearest: one output pixel per program row, and the gradient a gather of each source pixel's
``s x s`` block. Bilinear works on rectangles: the forward computes each output row's and
column's taps once per rectangle; the gradient is separable (see
``_bilinear_gradient_kernel``): the output columns reading a rectangle of source pixels are
contracted onto its columns by a small matrix product per output row, then added to its rows
with the row weights. No atomics anywhere: the same bits every run.
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
    def _nearest_forward_kernel(x_ptr, y_ptr, P, C, H, W, OH, OW, xs_n, xs_h, xs_w, ys_n, ys_h, ys_w,
                                SY: tl.constexpr, SX: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        c, pm, cm, ox, oy, n = _pixel_tile(P, C, OW, OH, BP, BC)
        m2 = pm[:, None] & cm[None, :]
        src = (oy // SY).to(tl.int64) * xs_h + (ox // SX).to(tl.int64) * xs_w
        v = tl.load(x_ptr + (n * xs_n + src)[:, None] + c[None, :], mask=m2, other=0.0)
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
    def _nearest_gradient_kernel(g_ptr, d_ptr, Q, C, H, W, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                                 SY: tl.constexpr, SX: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        c, qm, cm, px, py, n = _pixel_tile(Q, C, W, H, BP, BC)
        base = g_ptr + n * gs_n
        acc = tl.zeros([BP, BC], tl.float32)
        for a in tl.static_range(SY):
            for b in tl.static_range(SX):
                src = (py * SY + a).to(tl.int64) * gs_h + (px * SX + b).to(tl.int64) * gs_w
                acc += tl.load(base[:, None] + src[:, None] + c[None, :], mask=qm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        dp = d_ptr + n * ds_n + py.to(tl.int64) * ds_h + px.to(tl.int64) * ds_w
        tl.store(dp[:, None] + c[None, :], acc.to(d_ptr.dtype.element_ty), mask=qm[:, None] & cm[None, :])

    @triton.jit
    def _tile3(C, TBY, TBX, TY: tl.constexpr, TX: tl.constexpr, BC: tl.constexpr):
        """This program's ``TY x TX`` pixel rectangle by ``BC`` channels: (rows, columns,
        channels, image index as int64)."""
        pid = tl.program_id(0)
        bx = pid % TBX
        t = pid // TBX
        by = t % TBY
        return by * TY + tl.arange(0, TY), bx * TX + tl.arange(0, TX), tl.program_id(1) * BC + tl.arange(0, BC), (t // TBY).to(tl.int64)

    @triton.jit
    def _bilinear_forward_kernel(x_ptr, y_ptr, C, H, W, OH, OW, TBY, TBX, xs_n, xs_h, xs_w, ys_n, ys_h, ys_w,
                                 SY: tl.constexpr, SX: tl.constexpr, ALIGN: tl.constexpr,
                                 TY: tl.constexpr, TX: tl.constexpr, BC: tl.constexpr):
        """A rectangle of output rows x columns: the taps and weights of each row and of each
        column are computed once, not per pixel."""
        oy, ox, c, n = _tile3(C, TBY, TBX, TY, TX, BC)
        m3 = (oy < OH)[:, None, None] & (ox < OW)[None, :, None] & (c < C)[None, None, :]
        y0, y1, fy = _axis_taps(oy, H, OH, SY, ALIGN)
        x0, x1, fx = _axis_taps(ox, W, OW, SX, ALIGN)
        base = x_ptr + n * xs_n + c[None, None, :]
        r0 = (y0.to(tl.int64) * xs_h)[:, None, None]
        r1 = (y1.to(tl.int64) * xs_h)[:, None, None]
        c0 = (x0.to(tl.int64) * xs_w)[None, :, None]
        c1 = (x1.to(tl.int64) * xs_w)[None, :, None]
        v00 = tl.load(base + r0 + c0, mask=m3, other=0.0).to(tl.float32)
        v01 = tl.load(base + r0 + c1, mask=m3, other=0.0).to(tl.float32)
        v10 = tl.load(base + r1 + c0, mask=m3, other=0.0).to(tl.float32)
        v11 = tl.load(base + r1 + c1, mask=m3, other=0.0).to(tl.float32)
        wx = fx[None, :, None]
        top = v00 + (v01 - v00) * wx
        bot = v10 + (v11 - v10) * wx
        v = top + (bot - top) * fy[:, None, None]
        yp = y_ptr + n * ys_n + (oy.to(tl.int64) * ys_h)[:, None, None] + (ox.to(tl.int64) * ys_w)[None, :, None] + c[None, None, :]
        tl.store(yp, v.to(y_ptr.dtype.element_ty), mask=m3)

    @triton.jit
    def _bilinear_gradient_kernel(g_ptr, d_ptr, C, H, W, OH, OW, TBY, TBX, TXO, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                                  SY: tl.constexpr, SX: tl.constexpr, ALIGN: tl.constexpr, SPLIT: tl.constexpr,
                                  TY: tl.constexpr, TX: tl.constexpr, KX: tl.constexpr, BC: tl.constexpr):
        """The adjoint, separably, for a rectangle of ``TY x TXO`` source pixels (computed as
        ``TY x TX``, the last ``TX − TXO`` columns unused: see ``_gradient_tile``). The output
        columns that read the rectangle's columns are ``s0 + [0, KX)``; their weights onto
        the rectangle's columns form a ``[TX, KX]`` matrix ``Wx`` built once. Then for every
        output row ``t`` that reads one of the rectangle's rows: ``h = Wx @ g[t, s0:s0+KX]``
        (a matrix product on the tensor cores: ``Wx`` split into a high and a low part in
        the gradient's 16-bit type so that the weights keep float32 precision, float32
        products for float32 gradients) and ``dx[y] += wy(t, y)·h`` for the rectangle's rows
        (``wy`` from the row's two taps)."""
        y, x, c, n = _tile3(C, TBY, TBX, TY, TX, BC)
        cm = c < C
        bx = tl.program_id(0) % TBX
        x = bx * TXO + tl.arange(0, TX)                # the first TXO columns are this program's
        xm = (x < W) & (tl.arange(0, TX) < TXO)
        ylo = tl.program_id(0) // TBX % TBY * TY
        yhi = tl.minimum(ylo + TY - 1, H - 1)
        t_first = _first_reader(ylo, H, OH, SY, ALIGN)
        t_end = tl.where(yhi + 2 <= H - 1, _first_reader(yhi + 2, H, OH, SY, ALIGN), OH)
        s0 = _first_reader(bx * TXO, W, OW, SX, ALIGN)
        s = s0 + tl.arange(0, KX)
        sx0, sx1, fx = _axis_taps(s, W, OW, SX, ALIGN)
        wx = tl.where(sx0[None, :] == x[:, None], 1.0 - fx[None, :], 0.0) + tl.where(sx1[None, :] == x[:, None], fx[None, :], 0.0)
        wx = tl.where((s < OW)[None, :] & xm[:, None], wx, 0.0)               # [TX, KX]
        if SPLIT:
            w_hi = wx.to(g_ptr.dtype.element_ty)
            w_lo = (wx - w_hi.to(tl.float32)).to(g_ptr.dtype.element_ty)
        sm = (s < OW)[:, None] & cm[None, :]
        tile = g_ptr + n * gs_n + (s.to(tl.int64) * gs_w)[:, None] + c[None, :]
        acc = tl.zeros([TY, TX, BC], tl.float32)
        for t_ in range(t_first, t_end):
            t = t_ + ylo * 0                      # a tensor also under the interpreter
            ty0, ty1, fy = _axis_taps(t, H, OH, SY, ALIGN)
            wy = tl.where(y == ty0, 1.0 - fy, 0.0) + tl.where(y == ty1, fy, 0.0)
            gt = tl.load(tile + t.to(tl.int64) * gs_h, mask=sm, other=0.0)       # [KX, BC]
            if SPLIT:
                h = tl.dot(w_hi, gt, out_dtype=tl.float32)
                h = tl.dot(w_lo, gt, acc=h, out_dtype=tl.float32)
            else:
                h = tl.dot(wx, gt.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            acc += wy[:, None, None] * h[None, :, :]
        dp = d_ptr + n * ds_n + (y.to(tl.int64) * ds_h)[:, None, None] + (x.to(tl.int64) * ds_w)[None, :, None] + c[None, None, :]
        tl.store(dp, acc.to(d_ptr.dtype.element_ty), mask=(y < H)[:, None, None] & xm[None, :, None] & cm[None, None, :])


def _gradient_columns(w: int, ow: int, sx: int, align: bool, tx: int) -> int:
    """Most output columns that read ``tx`` adjacent source columns (bilinear): the span from
    the first reader of the first column to the first reader of the column after the next."""
    if not align:
        return sx * (tx + 1)
    if w == 1:
        return ow                  # every output reads the one column
    return -(-(tx + 1) * (ow - 1) // (w - 1)) + 2


def _gradient_tile(w: int, ow: int, sx: int, align: bool, tx: int) -> tuple[int, int]:
    """(source columns a gradient program owns, output columns it reads: the product's ``KX``)
    for a ``tx``-column rectangle. The readers of ``tx`` columns span a little more than a
    power of two (``2·tx + 2`` at factor 2), which would double ``KX`` for a few columns:
    when owning at least three quarters of ``tx`` keeps the span within half that power of
    two, the program owns only those columns (its last ones stay unused)."""
    kx = max(16, triton.next_power_of_2(_gradient_columns(w, ow, sx, align, tx)))
    own = tx
    while own > 1 and _gradient_columns(w, ow, sx, align, own) > kx // 2:
        own -= 1
    if kx // 2 >= 16 and 4 * own >= 3 * tx:
        return own, kx // 2
    return tx, kx


#: rectangle of the bilinear kernels: (rows, columns, channels, warps, pipeline stages),
#: chosen by ``bench/tune_memory_bound.py`` on an H100 (bfloat16, 64 channels)
BILINEAR_TILES = {"forward": (16, 4, 64, 4, 1), "gradient": (4, 32, 64, 2, 4)}


def _rectangles(rows: int, cols: int, c: int, kind: str, least: int = 1) -> tuple[int, int, int, int, int, int, int]:
    """(rows, columns, channels, warps, stages, row blocks, column blocks) of the ``kind``
    kernel's rectangles over a ``rows x cols x c`` image; columns and channels at least
    ``least`` (a matrix product's smallest size)."""
    ty, tx, bc, warps, stages = BILINEAR_TILES[kind]
    bc = max(least, min(bc, max(16, triton.next_power_of_2(c))))
    ty = min(ty, triton.next_power_of_2(rows))
    tx = max(least, min(tx, triton.next_power_of_2(cols)))
    return ty, tx, bc, warps, stages, triton.cdiv(rows, ty), triton.cdiv(cols, tx)


def _launch_forward(x: torch.Tensor, out: torch.Tensor, sx: int, sy: int, bilinear: bool, align: bool) -> None:
    n, h, w, c = x.shape
    oh, ow = out.shape[1], out.shape[2]
    strides = (x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2))
    if bilinear:
        ty, tx, bc, warps, stages, tby, tbx = _rectangles(oh, ow, c, "forward")
        _bilinear_forward_kernel[(n * tby * tbx, triton.cdiv(c, bc))](
            x, out, c, h, w, oh, ow, tby, tbx, *strides, SY=sy, SX=sx, ALIGN=align, TY=ty, TX=tx, BC=bc, num_warps=warps,
            num_stages=stages)
        return
    p = n * oh * ow
    bp, bc = _blocks(c)
    _nearest_forward_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, out, p, c, h, w, oh, ow, *strides, SY=sy, SX=sx, BP=bp, BC=bc, num_warps=4)


def _launch_gradient(g: torch.Tensor, out: torch.Tensor, sx: int, sy: int, bilinear: bool, align: bool) -> None:
    n, h, w, c = out.shape
    oh, ow = g.shape[1], g.shape[2]
    strides = (g.stride(0), g.stride(1), g.stride(2), out.stride(0), out.stride(1), out.stride(2))
    if bilinear:
        ty, tx, bc, warps, stages, tby, _ = _rectangles(h, w, c, "gradient", least=16)
        txo, kx = _gradient_tile(w, ow, sx, align, tx)
        _bilinear_gradient_kernel[(n * tby * triton.cdiv(w, txo), triton.cdiv(c, bc))](
            g, out, c, h, w, oh, ow, tby, triton.cdiv(w, txo), txo, *strides, SY=sy, SX=sx, ALIGN=align, SPLIT=g.dtype != torch.float32,
            TY=ty, TX=tx, KX=kx, BC=bc, num_warps=warps, num_stages=stages)
        return
    q = n * h * w
    bp, bc = _blocks(c)
    _nearest_gradient_kernel[(triton.cdiv(q, bp), triton.cdiv(c, bc))](
        g, out, q, c, h, w, *strides, SY=sy, SX=sx, BP=bp, BC=bc, num_warps=4)


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
