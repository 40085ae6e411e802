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

The max gradient runs in two passes: every window's winning tap (tap index, -1 for an
off-image zero) is found once (the running ``maxnum`` moves only for the first number and
for strictly greater ones, which is the first maximal tap), then a gather adds each window's
incoming gradient to the winning tap's pixel (no atomics, the same bits every run). Windows of
fewer than 16 taps keep the winners as 4-bit codes, two a byte (15: none), else as int8. The
average gradient is the same gather (``dx = Σ g / N`` over the windows containing the pixel).
The gather works on cells of ``stride_y x stride_x`` source pixels, the cell's pixel phases
along an axis of the tile: each window that can reach the cell (two per axis for 3x3 stride
2, one for 2x2 stride 2) is read once, and added to the phases on its taps. A phase ``py``
lies on tap ``ky`` of the window at offset ``e`` from the cell's exactly when
``py − (first mod stride) − stride·e = ky·dilation``, a compile-time fact, so there is no
division and no test per pixel. Strides, dilations, window sizes and ``first mod stride``
are compile-time constants (a network has few pooling geometries).
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
    def _winners(x_ptr, base, xs_h, xs_w, y0, x0, pm, c, C, H, W, dy, dx,
                 KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        """Each window's winning tap for channels ``c``: an int32 code ``ky·KW + kx``, -1 for
        none (every tap NaN)."""
        cm = c < C
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
        return arg

    @triton.jit
    def _pool_argmax_kernel(x_ptr, a_ptr, P, C, CA, H, W, OH, OW, xs_n, xs_h, xs_w,
                            fy, fx, sy, sx, dy, dx,
                            KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, PACK: tl.constexpr,
                            BP: tl.constexpr, BC: tl.constexpr):
        """Winners of ``BP`` windows by ``BC`` channels into row ``p`` of the ``[P, CA]`` int8
        table. ``PACK``: two 4-bit codes a byte (``BC/2`` bytes per channel block: low nibble
        channel ``k``, high nibble channel ``k + BC/2`` of the block; 15 is "none")."""
        c, pm, _, ow, oh, n = _pixel_tile(P, C, OW, OH, BP, BC)
        y0 = fy + oh * sy
        x0 = fx + ow * sx
        base = x_ptr + n * xs_n
        ap = a_ptr + (tl.program_id(0) * BP + tl.arange(0, BP))[:, None].to(tl.int64) * CA
        if PACK:
            h = tl.program_id(1) * BC + tl.arange(0, BC // 2)
            lo = _winners(x_ptr, base, xs_h, xs_w, y0, x0, pm, h, C, H, W, dy, dx, KH, KW, CLAMP, BP, BC // 2)
            hi = _winners(x_ptr, base, xs_h, xs_w, y0, x0, pm, h + BC // 2, C, H, W, dy, dx, KH, KW, CLAMP, BP, BC // 2)
            byte = (lo & 15) | ((hi & 15) << 4)
            k = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
            tl.store(ap + k[None, :], byte.to(tl.int8), mask=pm[:, None] & (k < CA)[None, :])
        else:
            arg = _winners(x_ptr, base, xs_h, xs_w, y0, x0, pm, c, C, H, W, dy, dx, KH, KW, CLAMP, BP, BC)
            tl.store(ap + c[None, :], arg.to(tl.int8), mask=pm[:, None] & (c < C)[None, :])

    @triton.jit
    def _pool_gather_kernel(g_ptr, a_ptr, d_ptr, Q, C, CA, H, W, OH, OW, gs_n, gs_h, gs_w, ds_n, ds_h, ds_w,
                            fy, fx, zpy, zpx, jq, iq,
                            KH: tl.constexpr, KW: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr,
                            FYM: tl.constexpr, FXM: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                            MAXG: tl.constexpr, CLAMP: tl.constexpr, PACK: tl.constexpr, PH: tl.constexpr,
                            BQ: tl.constexpr, BC: tl.constexpr):
        """The gradient of ``BQ`` cells (flat over ``[N, CH, CW]``) by ``BC`` channels. A cell
        ``(j, i)`` holds the ``SY·SX`` source pixels ``(SY·j + py, SX·i + px)``, its phases along
        the tile's middle axis. Each window that can reach the cell is read once (gradient and
        winner) and added to the phases that lie on one of its taps: window row
        ``jw = j − jq + e`` holds phase ``py`` at tap ``ky`` when ``py − FYM − SY·e = ky·DY``
        (columns likewise), a compile-time fact per ``(e, phase)``. ``PACK``: the winners are
        4-bit codes, channel ``k`` of a block in the low nibble of byte ``k mod BC/2``."""
        q = tl.program_id(0) * BQ + tl.arange(0, BQ)
        qm = q < Q
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        if PACK:
            k = tl.program_id(1) * (BC // 2) + tl.arange(0, BC) % (BC // 2)
            shift = (tl.arange(0, BC) // (BC // 2)) * 4
        CW = (W + SX - 1) // SX
        CH = (H + SY - 1) // SY
        ci = q % CW
        t = q // CW
        cj = t % CH
        n = (t // CH).to(tl.int64)
        ph = tl.arange(0, PH)
        py = ph // SX
        px = ph % SX
        y = cj[:, None] * SY + py[None, :]                                            # [BQ, PH]
        x = ci[:, None] * SX + px[None, :]
        pm = qm[:, None] & (ph < SY * SX)[None, :] & (y < H) & (x < W)
        cm3 = (c < C)[None, None, :]
        acc = tl.zeros([BQ, PH, BC], tl.float32)
        for e in tl.static_range(E0, E1 + 1):
            ry = py - FYM - SY * e
            okt_y = (ry >= 0) & (ry % DY == 0) & (ry // DY < KH)
            j = cj - jq + e
            vj = (j >= 0) & (j < OH)
            for f in tl.static_range(F0, F1 + 1):
                rx = px - FXM - SX * f
                okt = okt_y & (rx >= 0) & (rx % DX == 0) & (rx // DX < KW)                  # [PH]
                i = ci - iq + f
                ok = qm & vj & (i >= 0) & (i < OW)                                       # [BQ]
                m3 = ok[:, None, None] & cm3
                gv = tl.load(g_ptr + (n * gs_n + j.to(tl.int64) * gs_h + i.to(tl.int64) * gs_w)[:, None, None] + c[None, None, :],
                             mask=m3, other=0.0).to(tl.float32)                          # [BQ, 1, BC]
                if MAXG:
                    row = (((n * OH + j) * OW + i) * CA)[:, None, None]
                    if PACK:
                        code = (tl.load(a_ptr + row + k[None, None, :], mask=m3, other=-1).to(tl.int32) >> shift[None, None, :]) & 15
                    else:
                        code = tl.load(a_ptr + row + c[None, None, :], mask=m3, other=-1).to(tl.int32)
                    want = tl.where(okt, (ry // DY) * KW + rx // DX, -2)                        # never a code
                    acc += tl.where(code == want[None, :, None], gv, 0.0)
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
                    else:
                        inv = tl.full([BQ], 1.0 / (KH * KW), tl.float32)
                    acc += gv * tl.where(okt[None, :], inv[:, None], 0.0)[:, :, None]
        dp = d_ptr + n[:, None] * ds_n + y.to(tl.int64) * ds_h + x.to(tl.int64) * ds_w
        tl.store(dp[:, :, None] + c[None, None, :], acc.to(d_ptr.dtype.element_ty), mask=pm[:, :, None] & cm3)


#: (channels per program, pixels per program, warps) of each pooling kernel, by channel
#: width: 16 channels when C <= 16, else the width given (few compiled variants). Chosen by
#: ``bench/tune_memory_bound.py`` on an H100 (bfloat16, 64 channels).
POOL_TILES = {"forward": (64, 16, 4), "argmax": (64, 16, 4), "gather": (64, 16, 4)}

#: windows of fewer than 16 taps keep their winners as two 4-bit codes a byte (half the
#: winner table's traffic)
PACK_WINNERS = True


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
    bp, bc = _blocks(c, "argmax")
    if bc != _blocks(c, "gather")[1]:
        raise ValueError("pooling engine: the winner and gather tiles must share their channel block")
    pack = PACK_WINNERS and ay.taps * ax.taps < 16
    ca = triton.cdiv(c, bc) * bc // 2 if pack else c
    arg = torch.empty((p, ca), dtype=torch.int8, device=x.device)
    _pool_argmax_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, arg, p, c, ca, h, w, ay.out, ax.out, x.stride(0), x.stride(1), x.stride(2),
        ay.first, ax.first, ay.stride, ax.stride, ay.dilation, ax.dilation,
        KH=ay.taps, KW=ax.taps, CLAMP=clamp, PACK=pack, BP=bp, BC=bc, num_warps=_warps("argmax"))
    _gather(g, arg, out, ay, ax, clamp, True, pack)


def pool_average_gradient(g: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool) -> None:
    """``out`` (the forward source's shape) = the average-pooling gradient for ``g``."""
    _check(g)
    _check(out)
    _gather(g, g, out, ay, ax, clamp, False, False)


def _reach(a: Axis) -> tuple[int, int, int]:
    """(first window offset, last window offset, ``(first − first mod stride) / stride``) of
    the gather along one axis: window ``cell − that + e`` for ``e`` in the offsets can hold a
    pixel of the cell (see ``_pool_gather_kernel``)."""
    fm = a.first % a.stride
    return -((fm + (a.taps - 1) * a.dilation) // a.stride), (a.stride - 1 - fm) // a.stride, (a.first - fm) // a.stride


def _gather(g: torch.Tensor, arg: torch.Tensor, out: torch.Tensor, ay: Axis, ax: Axis, clamp: bool, maxg: bool,
            pack: bool) -> None:
    n, h, w, c = out.shape
    q = n * -(-h // ay.stride) * -(-w // ax.stride)
    bq, bc = _blocks(c, "gather")
    (e0, e1, jq), (f0, f1, iq) = _reach(ay), _reach(ax)
    _pool_gather_kernel[(triton.cdiv(q, bq), triton.cdiv(c, bc))](
        g, arg, out, q, c, arg.shape[-1] if maxg else c, h, w, ay.out, ax.out, g.stride(0), g.stride(1), g.stride(2),
        out.stride(0), out.stride(1), out.stride(2), ay.first, ax.first, ay.zero_pad, ax.zero_pad, jq, iq,
        KH=ay.taps, KW=ax.taps, SY=ay.stride, SX=ax.stride, DY=ay.dilation, DX=ax.dilation,
        FYM=ay.first % ay.stride, FXM=ax.first % ax.stride, E0=e0, E1=e1, F0=f0, F1=f1, MAXG=maxg, CLAMP=clamp, PACK=pack,
        PH=triton.next_power_of_2(ay.stride * ax.stride), BQ=bq, BC=bc, num_warps=_warps("gather"))


def gradient_supported(ay: Axis, ax: Axis, clamp: bool) -> bool:
    """Whether :func:`pool_max_gradient` covers this geometry: at most 127 taps, and with edge
    mode clamp adjacent taps (dilation 1) and windows that all overlap the image (an edge
    pixel then is always one of the taps that read it)."""
    if ay.taps * ax.taps > 127:
        return False
    if not clamp:
        return True
    return all(a.dilation == 1 and a.first + a.extent - 1 >= 0 and a.first + (a.out - 1) * a.stride <= a.size - 1 for a in (ay, ax))
