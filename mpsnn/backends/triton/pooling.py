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
no gradient. Max pooling folds the taps with ``maxnum`` in the source's own type (exact, and
one instruction per tap), starting from NaN; +0 and −0 compare equal, so a window whose
maximum is a zero of both signs may give either sign.

The max gradient runs in two passes: every window's winning tap (an int8 tap index, -1 for
an off-image zero) is found once (the running ``maxnum`` moves only for the first number
and for strictly greater ones, which is the first maximal tap), then a gather adds each
window's incoming gradient to the winning tap's pixel (no atomics, the same bits every run).
The average gradient is the same gather (``dx = Σ g / N`` over the windows containing the
pixel). The gather works on cells of ``stride_y x stride_x`` source pixels: a pixel of phase
``(py, px)`` in its cell lies on tap ``ky`` of a window exactly when
``(py − first_y − ky·dilation_y) ≡ 0 (mod stride_y)``, a compile-time fact, so each pixel
visits only its own taps (on average ``taps/stride`` per axis), with no division. Strides,
dilations, window sizes and ``first mod stride`` are compile-time constants (a network has few
pooling geometries).
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
        if MODE == 0:
            # NaN start; maxnum ignores NaN (Metal's fmax): a window of NaNs stays NaN
            acc = tl.full([BP, BC], float("nan"), tl.float32).to(x_ptr.dtype.element_ty)
        else:
            acc = tl.zeros([BP, BC], tl.float32)
        for ky in tl.static_range(KH):
            yy, vy = _tap(y0 + ky * dy, H, TAPCLAMP)
            for kx in tl.static_range(KW):
                xx, vx = _tap(x0 + kx * dx, W, TAPCLAMP)
                ok = vy & vx
                v = tl.load(base[:, None] + (yy.to(tl.int64) * xs_h + xx.to(tl.int64) * xs_w)[:, None] + c[None, :],
                            mask=(pm & ok)[:, None] & cm[None, :], other=0.0)
                if MODE == 0:
                    acc = tl.maximum(acc, v)             # in the source's own type: exact
                elif MODE == 1:
                    acc += v.to(tl.float32)
                else:
                    v = v.to(tl.float32)
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
        best = tl.full([BP, BC], float("nan"), tl.float32).to(x_ptr.dtype.element_ty)
        arg = tl.full([BP, BC], -1, tl.int32)
        for ky in tl.static_range(KH):
            yy, vy = _tap(y0 + ky * dy, H, CLAMP)
            for kx in tl.static_range(KW):
                xx, vx = _tap(x0 + kx * dx, W, CLAMP)
                ok = vy & vx
                v = tl.load(base[:, None] + (yy.to(tl.int64) * xs_h + xx.to(tl.int64) * xs_w)[:, None] + c[None, :],
                            mask=(pm & ok)[:, None] & cm[None, :], other=0.0)
                # maxnum moves `best` only for the first number and for strictly greater ones
                # (equal values, ±0 included, compare equal): the first maximal tap in scan
                # order wins; a NaN tap while `best` is still NaN also "moves" it, which the
                # all-NaN fix below undoes
                nb = tl.maximum(best, v)
                code = tl.where(ok, ky * KW + kx, -1)
                arg = tl.where(nb != best, code[:, None], arg)
                best = nb
        arg = tl.where(best != best, -1, arg)          # every tap NaN: no gradient
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
    def _pool_gather_kernel(g_ptr, a_ptr, d_ptr, Q, C, H, W, OH, OW, CH, CW, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                            fy, fx, zpy, zpx,
                            KH: tl.constexpr, KW: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr,
                            FYM: tl.constexpr, FXM: tl.constexpr,
                            MAXG: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        # A cell (j, i) of the ``CH x CW`` grid holds the SY·SX source pixels (SY·j + py,
        # SX·i + px). Tap ky of window jw is on row y iff y − fy − ky·DY = SY·jw, so a pixel of
        # phase py has tap ky exactly when (py − fy − ky·DY) ≡ 0 (mod SY) — a compile-time
        # fact (FYM = fy mod SY) — and then jw = j + (py − fy − ky·DY)/SY. Every pixel visits
        # only its own taps, with no division.
        c, qm, cm, ci, cj, n = _pixel_tile(Q, C, CW, CH, BP, BC)
        for py in tl.static_range(SY):
            y = cj * SY + py
            for px in tl.static_range(SX):
                x = ci * SX + px
                pm = qm & (y < H) & (x < W)
                acc = tl.zeros([BP, BC], tl.float32)
                for ky in tl.static_range(KH):
                    if (py - FYM - ky * DY) % SY == 0:
                        j = cj + (py - fy - ky * DY) // SY
                        vy = (j >= 0) & (j < OH)
                        for kx in tl.static_range(KW):
                            if (px - FXM - kx * DX) % SX == 0:
                                i = ci + (px - fx - kx * DX) // SX
                                ok = pm & vy & (i >= 0) & (i < OW)
                                m2 = ok[:, None] & cm[None, :]
                                gv = tl.load(g_ptr + n[:, None] * gs_n + (j.to(tl.int64) * gs_h + i.to(tl.int64) * gs_w)[:, None]
                                             + c[None, :], mask=m2, other=0.0).to(tl.float32)
                                if MAXG:
                                    code = tl.load(a_ptr + ((n * OH + j) * OW + i)[:, None] * C + c[None, :], mask=m2, other=-1)
                                    acc += tl.where(code.to(tl.int32) == ky * KW + kx, gv, 0.0)
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
                tl.store(dp[:, None] + c[None, :], acc.to(d_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


#: (channels per program, pixels per program, warps) of each pooling kernel, by channel
#: width: 16 channels when C <= 16, else the width given (few compiled variants). Chosen by
#: ``bench/tune_memory_bound.py`` on an H100 (bfloat16, 64 channels).
POOL_TILES = {"forward": (64, 16, 4), "argmax": (64, 64, 8), "gather": (64, 16, 4)}


def _blocks(c: int, kind: str = "forward") -> tuple[int, int]:
    """(pixels, channels) per program."""
    bc, bp, _ = POOL_TILES[kind]
    if c <= 16:
        return bp * bc // 16, 16
    return bp, bc


def _warps(kind: str) -> int:
    return POOL_TILES[kind][2]


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
    bp, bc = _blocks(c, "forward")
    _pool_forward_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, out, p, c, h, w, ay.out, ax.out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ay.first, ax.first, ay.stride, ax.stride, ay.dilation, ax.dilation, ay.zero_pad, ax.zero_pad,
        KH=ay.taps, KW=ax.taps, MODE=mode, CLAMP=clamp, TAPCLAMP=clamp and mode != AVERAGE, BP=bp, BC=bc, num_warps=_warps("forward"))


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
    bp, bc = _blocks(c, "argmax")
    _pool_argmax_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, arg, p, c, h, w, ay.out, ax.out, x.stride(0), x.stride(1), x.stride(2),
        ay.first, ax.first, ay.stride, ax.stride, ay.dilation, ax.dilation,
        KH=ay.taps, KW=ax.taps, CLAMP=clamp, BP=bp, BC=bc, num_warps=_warps("argmax"))
    _gather(g, arg, out, ay, ax, clamp, True)


def pool_average_gradient(g: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool) -> None:
    """``out`` (the forward source's shape) = the average-pooling gradient for ``g``."""
    _check(g)
    _check(out)
    _gather(g, g, out, ay, ax, clamp, False)


def _gather(g: torch.Tensor, arg: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool, maxg: bool) -> None:
    n, h, w, c = out.shape
    ch, cw = -(-h // ay.stride), -(-w // ax.stride)
    q = n * ch * cw
    bp, bc = _blocks(c, "gather")
    _pool_gather_kernel[(triton.cdiv(q, bp), triton.cdiv(c, bc))](
        g, arg, out, q, c, h, w, ay.out, ax.out, ch, cw, g.stride(0), g.stride(1), g.stride(2),
        out.stride(0), out.stride(1), out.stride(2), ay.first, ax.first, ay.zero_pad, ax.zero_pad,
        KH=ay.taps, KW=ax.taps, SY=ay.stride, SX=ax.stride, DY=ay.dilation, DX=ax.dilation,
        FYM=ay.first % ay.stride, FXM=ax.first % ax.stride, MAXG=maxg, CLAMP=clamp, BP=bp, BC=bc, num_warps=_warps("gather"))


def gradient_supported(ay: Axis, ax: Axis, clamp: bool) -> bool:
    """Whether :func:`pool_max_gradient` covers this geometry: at most 127 taps, and with edge
    mode clamp adjacent taps (dilation 1) and windows that all overlap the image (an edge
    pixel then is always one of the taps that read it)."""
    if ay.taps * ax.taps > 127:
        return False
    if not clamp:
        return True
    return all(a.dilation == 1 and a.first + a.extent - 1 >= 0 and a.first + (a.out - 1) * a.stride <= a.size - 1 for a in (ay, ax))
