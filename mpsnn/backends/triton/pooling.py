"""Triton pooling over NHWC images: max / average / L2-norm forward and the max and average
gradients, float32 arithmetic in registers.

Geometry (spec/pooling.md §2.1, §6), per axis: output ``i``'s first tap is at
``first + stride·i`` and its taps are ``dilation`` apart (``k`` of them); ``first`` is the
window centre of output 0 minus ``floor(E/2)``, ``E = dilation·(k−1) + 1``. Off-image taps:

* edge mode zero: they read 0 (max, L2) / count as zeros in the divisor ``kw·kh`` (average);
* edge mode clamp: max and L2 read the nearest edge pixel; average skips them and divides by
  the taps inside the image widened by ``zero_pad`` (0 when no tap is inside).

Max ties go to the first maximal tap in scan order (rows top to bottom, each left to
right); NaN inputs are ignored like Metal's ``fmax``; a window of NaNs gives NaN and passes
no gradient.

The max gradient runs in two passes: every window's winning tap (an int8 tap index, -1 for
an off-image zero) is found once, then every source pixel visits its taps ``(ky, kx)``, finds
the window that has that tap on it, and adds the window's incoming gradient when that tap won
(a gather: no atomics, the same bits every run). The average gradient is one gather pass
(``dx = Σ g / N`` over the windows containing the pixel). Strides, dilations and window sizes
are compile-time constants of the gather (a network has few pooling geometries).
"""
from __future__ import annotations

import torch

from ..pooling import PoolAxis
from .neuron import available, tl, triton

__all__ = ["Axis", "available", "gradient_supported", "pool_forward", "pool_max_gradient", "pool_average_gradient", "MAX", "AVERAGE", "L2"]

MAX, AVERAGE, L2 = 0, 1, 2


#: one axis of a pooling geometry (the torch path's type: size, out, first, stride, dilation,
#: taps, zero_pad)
Axis = PoolAxis


if triton is not None:
    @triton.jit
    def _tap(pos, size, CLAMP: tl.constexpr):
        if CLAMP:
            return tl.minimum(tl.maximum(pos, 0), size - 1), pos == pos
        return tl.where((pos >= 0) & (pos < size), pos, 0), (pos >= 0) & (pos < size)

    @triton.jit
    def _pixel_tile(P, C, W, H, BP: tl.constexpr, BC: tl.constexpr):
        """This program's tile of ``BP`` pixels (flat over ``[N, H, W]``) by ``BC`` channels:
        (channels, pixel mask, channel mask, column, row, image index as int64)."""
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        x = p % W
        t = p // W
        return c, p < P, c < C, x, t % H, (t // H).to(tl.int64)

    @triton.jit
    def _pool_forward_kernel(x_ptr, y_ptr, P, C, H, W, OH, OW, xs_n, xs_h, xs_w, ys_n, ys_h, ys_w,
                             fy, fx, sy, sx, dy, dx, zpy, zpx,
                             KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr, CLAMP: tl.constexpr, TAPCLAMP: tl.constexpr,
                             BP: tl.constexpr, BC: tl.constexpr):
        c, pm, cm, ow, oh, n = _pixel_tile(P, C, OW, OH, BP, BC)
        y0 = fy + oh * sy
        x0 = fx + ow * sx
        base = x_ptr + n * xs_n
        seen = tl.zeros([BP, BC], tl.int1)
        if MODE == 0:
            acc = tl.full([BP, BC], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BP, BC], tl.float32)
        for ky in tl.static_range(KH):
            yy, vy = _tap(y0 + ky * dy, H, TAPCLAMP)
            for kx in tl.static_range(KW):
                xx, vx = _tap(x0 + kx * dx, W, TAPCLAMP)
                ok = vy & vx
                v = tl.load(base[:, None] + (yy.to(tl.int64) * xs_h + xx.to(tl.int64) * xs_w)[:, None] + c[None, :],
                            mask=(pm & ok)[:, None] & cm[None, :], other=0.0).to(tl.float32)
                if MODE == 0:
                    # NaN never wins (Metal fmax); the first number of the window is taken
                    acc = tl.where((v > acc) | ((v == v) & ~seen), v, acc)
                    seen = seen | (v == v)
                elif MODE == 1:
                    acc += v
                else:
                    acc += v * v
        if MODE == 1:
            if CLAMP:
                ya = tl.maximum(y0, -zpy)
                yb = tl.minimum(y0 + (KH - 1) * dy, H - 1 + zpy)
                xa = tl.maximum(x0, -zpx)
                xb = tl.minimum(x0 + (KW - 1) * dx, W - 1 + zpx)
                cnt = tl.maximum(yb - ya + 1, 0) * tl.maximum(xb - xa + 1, 0)
                inside = (y0 + (KH - 1) * dy >= 0) & (y0 < H) & (x0 + (KW - 1) * dx >= 0) & (x0 < W)
                div = tl.where(inside & (cnt > 0), cnt, 0).to(tl.float32)
                acc = tl.where(div[:, None] > 0, acc / tl.maximum(div, 1.0)[:, None], 0.0)
            else:
                acc = acc * (1.0 / (KH * KW))
        elif MODE == 2:
            acc = tl.sqrt(acc)
        if MODE == 0:
            acc = tl.where(seen, acc, float("nan"))   # every tap NaN
        yp = y_ptr + n * ys_n + (oh.to(tl.int64) * ys_h + ow.to(tl.int64) * ys_w)
        tl.store(yp[:, None] + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])

    @triton.jit
    def _pool_argmax_kernel(x_ptr, a_ptr, P, C, H, W, OH, OW, xs_n, xs_h, xs_w,
                            fy, fx, sy, sx, dy, dx,
                            KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        c, pm, cm, ow, oh, n = _pixel_tile(P, C, OW, OH, BP, BC)
        y0 = fy + oh * sy
        x0 = fx + ow * sx
        base = x_ptr + n * xs_n
        best = tl.full([BP, BC], float("-inf"), tl.float32)
        arg = tl.full([BP, BC], -2, tl.int32)          # -2: no number seen yet
        for ky in tl.static_range(KH):
            yy, vy = _tap(y0 + ky * dy, H, CLAMP)
            for kx in tl.static_range(KW):
                xx, vx = _tap(x0 + kx * dx, W, CLAMP)
                ok = vy & vx
                v = tl.load(base[:, None] + (yy.to(tl.int64) * xs_h + xx.to(tl.int64) * xs_w)[:, None] + c[None, :],
                            mask=(pm & ok)[:, None] & cm[None, :], other=0.0).to(tl.float32)
                # the first number, then strictly greater ones: the first maximal tap in scan
                # order wins; NaN never wins
                better = (v > best) | ((v == v) & (arg == -2))
                best = tl.where(better, v, best)
                code = tl.where(ok, ky * KW + kx, -1)
                arg = tl.where(better, code[:, None], arg)
        arg = tl.where(arg == -2, -1, arg)             # every tap NaN: no gradient
        if CLAMP:
            # an off-image winner read the edge pixel: name the in-image tap on that pixel
            # (windows overlap the image and taps are adjacent: see `gradient_supported`)
            argc = tl.maximum(arg, 0)
            wy = argc // KW
            wx = argc - wy * KW
            ty = tl.minimum(tl.maximum(y0[:, None] + wy, 0), H - 1) - y0[:, None]
            tx = tl.minimum(tl.maximum(x0[:, None] + wx, 0), W - 1) - x0[:, None]
            arg = tl.where(arg >= 0, ty * KW + tx, arg)
        ap = a_ptr + ((n * OH + oh) * OW + ow) * C
        tl.store(ap[:, None] + c[None, :], arg.to(tl.int8), mask=pm[:, None] & cm[None, :])

    @triton.jit
    def _pool_gather_kernel(g_ptr, a_ptr, d_ptr, Q, C, H, W, OH, OW, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                            fy, fx, zpy, zpx,
                            KH: tl.constexpr, KW: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr,
                            MAXG: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        # Every source pixel visits the (ky, kx) taps: window j has tap ky on row y iff
        # y - fy - ky·DY = j·SY with 0 <= j < OH. All divisions see non-negative numerators.
        c, qm, cm, x, y, n = _pixel_tile(Q, C, W, H, BP, BC)
        acc = tl.zeros([BP, BC], tl.float32)
        for ky in tl.static_range(KH):
            ny = y - fy - ky * DY
            nyc = tl.maximum(ny, 0)
            j = nyc // SY
            vy = (ny >= 0) & (nyc % SY == 0) & (j < OH)
            for kx in tl.static_range(KW):
                nx = x - fx - kx * DX
                nxc = tl.maximum(nx, 0)
                i = nxc // SX
                ok = qm & vy & (nx >= 0) & (nxc % SX == 0) & (i < OW)
                m2 = ok[:, None] & cm[None, :]
                gv = tl.load(g_ptr + n[:, None] * gs_n + (j.to(tl.int64) * gs_h + i.to(tl.int64) * gs_w)[:, None] + c[None, :],
                             mask=m2, other=0.0).to(tl.float32)
                if MAXG:
                    code = tl.load(a_ptr + ((n * OH + j) * OW + i)[:, None] * C + c[None, :], mask=m2, other=-1).to(tl.int32)
                    acc += tl.where(code == ky * KW + kx, gv, 0.0)
                else:
                    if CLAMP:
                        wy0 = fy + j * SY
                        wx0 = fx + i * SX
                        ya = tl.maximum(wy0, -zpy)
                        yb = tl.minimum(wy0 + (KH - 1) * DY, H - 1 + zpy)
                        xa = tl.maximum(wx0, -zpx)
                        xb = tl.minimum(wx0 + (KW - 1) * DX, W - 1 + zpx)
                        cnt = (tl.maximum(yb - ya + 1, 0) * tl.maximum(xb - xa + 1, 0)).to(tl.float32)
                        inv = tl.where(cnt > 0, 1.0 / tl.maximum(cnt, 1.0), 0.0)
                        acc += gv * inv[:, None]
                    else:
                        acc += gv * (1.0 / (KH * KW))
        dp = d_ptr + n * ds_n + (y.to(tl.int64) * ds_h + x.to(tl.int64) * ds_w)
        tl.store(dp[:, None] + c[None, :], acc.to(d_ptr.dtype.element_ty), mask=qm[:, None] & cm[None, :])


def _blocks(c: int) -> tuple[int, int]:
    """(pixels, channels) per program: two channel widths only, so that few variants compile."""
    bc = 16 if c <= 16 else 64
    return 4096 // bc // 2, bc


def _check(t: torch.Tensor) -> None:
    if t.dim() != 4 or t.stride(3) != 1:
        raise ValueError("pooling engine: NHWC tensors with contiguous channels only")


def pool_forward(x: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, mode: int, clamp: bool) -> None:
    """``out[n, j, i, c]`` = the pooled window ``(j, i)`` of ``x`` (NHWC views with contiguous
    channels; ``out`` has ``ay.out`` rows and ``ax.out`` columns)."""
    _check(x)
    _check(out)
    n, h, w, c = x.shape
    p = n * ay.out * ax.out
    bp, bc = _blocks(c)
    _pool_forward_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, out, p, c, h, w, ay.out, ax.out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ay.first, ax.first, ay.stride, ax.stride, ay.dilation, ax.dilation, ay.zero_pad, ax.zero_pad,
        KH=ay.taps, KW=ax.taps, MODE=mode, CLAMP=clamp, TAPCLAMP=clamp and mode != AVERAGE, BP=bp, BC=bc, num_warps=4)


def pool_max_gradient(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool) -> None:
    """``out`` (``x``'s shape) = the max-pooling gradient for the incoming gradient ``g``
    (``[N, ay.out, ax.out, C]``), the winners recomputed from the forward source ``x``."""
    for t in (g, x, out):
        _check(t)
    n, h, w, c = x.shape
    if not gradient_supported(ay, ax, clamp):
        raise ValueError("pooling engine: geometry not covered (see gradient_supported)")
    p = n * ay.out * ax.out
    arg = torch.empty((n, ay.out, ax.out, c), dtype=torch.int8, device=x.device)
    bp, bc = _blocks(c)
    _pool_argmax_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, arg, p, c, h, w, ay.out, ax.out, x.stride(0), x.stride(1), x.stride(2),
        ay.first, ax.first, ay.stride, ax.stride, ay.dilation, ax.dilation,
        KH=ay.taps, KW=ax.taps, CLAMP=clamp, BP=bp, BC=bc, num_warps=4)
    _gather(g, arg, out, ay, ax, clamp, True)


def pool_average_gradient(g: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool) -> None:
    """``out`` (the forward source's shape) = the average-pooling gradient for ``g``."""
    _check(g)
    _check(out)
    _gather(g, g, out, ay, ax, clamp, False)


def _gather(g: torch.Tensor, arg: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool, maxg: bool) -> None:
    n, h, w, c = out.shape
    q = n * h * w
    bp, bc = _blocks(c)
    _pool_gather_kernel[(triton.cdiv(q, bp), triton.cdiv(c, bc))](
        g, arg, out, q, c, h, w, ay.out, ax.out, g.stride(0), g.stride(1), g.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ay.first, ax.first, ay.zero_pad, ax.zero_pad,
        KH=ay.taps, KW=ax.taps, SY=ay.stride, SX=ax.stride, DY=ay.dilation, DX=ax.dilation, MAXG=maxg, CLAMP=clamp, BP=bp, BC=bc,
        num_warps=4)


def gradient_supported(ay: Axis, ax: Axis, clamp: bool) -> bool:
    """Whether :func:`pool_max_gradient` covers this geometry: at most 127 taps, and with edge
    mode clamp adjacent taps (dilation 1) and windows that all overlap the image (an edge
    pixel then is always one of the taps that read it)."""
    if ay.taps * ax.taps > 127:
        return False
    if not clamp:
        return True
    return all(a.dilation == 1 and a.first + a.extent - 1 >= 0 and a.first + (a.out - 1) * a.stride <= a.size - 1 for a in (ay, ax))
