"""Pooling numerics in torch (CPU and CUDA) on NHWC tensors: max / average / L2-norm forward
and their gradients (spec/pooling.md).

Geometry, per axis (:class:`PoolAxis`, the same fields as the Triton engine's ``Axis`` in
``backends/triton/pooling.py`` so that engine can be slotted in per call): output ``i``'s
taps are ``first + stride·i + dilation·k`` for ``k < taps``; ``first`` is the window centre
of output 0 minus ``floor(E/2)``, ``E = dilation·(taps − 1) + 1``.

Edge rules (``clamp`` False = edge mode zero):

* max, L2: off-image taps read 0 (zero) or the nearest edge pixel (clamp);
* average: the sum runs over the in-image taps; the divisor is ``kw·kh`` (zero) or the
  number of taps inside the image widened by ``zero_pad`` on each side (clamp; the result is 0
  when no tap is inside the image).

Conventions: max ignores NaN taps like Metal's ``fmax`` (NaN only when every tap is NaN);
max-pool gradients go to the first maximal tap in scan order (rows top to bottom, each left
to right; NaN taps never win; an all-NaN window passes no gradient; with edge mode zero a
winning off-image zero drops the window's gradient); clamp-mode aliases route gradient to the
edge pixel they read. Max works in the storage dtype (it only selects values); average, L2
and every gradient compute in float32 (float64 stays float64).

Formulation: the taps of all windows lie in one ``span_h × span_w`` block of the source
(``span = (out − 1)·stride + E``); that block is a view of the source when it lies inside the
image, else a zero-padded (zero) or edge-replicated (clamp) NHWC copy. torch's pooling ops run
on its channels-last NCHW view (a permute, no copy); gradients come back on the block and are
folded onto the source by the block's adjoint (crop, plus the clamped rows/columns summed into
the edge), deterministically.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch

__all__ = [
    "PoolAxis",
    "average_pool_gradient_nhwc",
    "average_pool_nhwc",
    "l2norm_pool_gradient_nhwc",
    "l2norm_pool_nhwc",
    "max_pool_gradient_nhwc",
    "max_pool_nhwc",
    "max_pool_winners_nhwc",
    "MaxWinners",
]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class PoolAxis:
    """One axis of a pooling geometry: source length, output length, first tap of output 0,
    stride, dilation, taps per window and the zero-pad size (average pooling with clamp)."""

    size: int
    out: int
    first: int
    stride: int
    dilation: int
    taps: int
    zero_pad: int = 0

    @property
    def extent(self) -> int:
        """Dilated window size ``E``."""
        return self.dilation * (self.taps - 1) + 1

    @property
    def span(self) -> int:
        """Source pixels from the first tap of output 0 to the last tap of the last output."""
        return (self.out - 1) * self.stride + self.extent

    @property
    def inside(self) -> bool:
        """Every tap of every window lies inside the source."""
        return self.first >= 0 and self.first + self.span <= self.size


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def _window(x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[N, span_h, span_w, C]`` block of source values the taps read (off-image values
    per the edge rule), in ``dtype`` (default ``x``'s)."""
    dtype = dtype or x.dtype
    n, h, w, c = x.shape
    sh, sw = ay.span, ax.span
    if ay.inside and ax.inside:
        blk = x[:, ay.first:ay.first + sh, ax.first:ax.first + sw, :]
        return blk if blk.dtype == dtype else blk.to(dtype)
    if clamp:
        ys = (torch.arange(sh, device=x.device) + ay.first).clamp_(0, h - 1)
        xs = (torch.arange(sw, device=x.device) + ax.first).clamp_(0, w - 1)
        blk = x.index_select(1, ys).index_select(2, xs)
        return blk if blk.dtype == dtype else blk.to(dtype)
    out = torch.zeros((n, sh, sw, c), dtype=dtype, device=x.device)
    y0, y1 = max(ay.first, 0), min(ay.first + sh, h)
    x0, x1 = max(ax.first, 0), min(ax.first + sw, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - ay.first:y1 - ay.first, x0 - ax.first:x1 - ax.first, :] = x[:, y0:y1, x0:x1, :]
    return out


def _fold(t: torch.Tensor, a: PoolAxis, dim: int, clamp: bool) -> torch.Tensor:
    """Adjoint of :func:`_window` along ``dim``: block positions ``a.first + k`` back onto the
    source axis of length ``a.size`` (off-image positions dropped, or summed into the edge
    pixel they alias with ``clamp``)."""
    length = t.shape[dim]
    if a.first == 0 and length == a.size:
        return t
    shape = list(t.shape)
    shape[dim] = a.size
    out = t.new_zeros(shape)
    lo = min(max(-a.first, 0), length)
    hi = max(min(a.size - a.first, length), lo)
    if hi > lo:
        out.narrow(dim, a.first + lo, hi - lo).copy_(t.narrow(dim, lo, hi - lo))
    if clamp:
        if lo > 0:
            out.narrow(dim, 0, 1).add_(t.narrow(dim, 0, lo).sum(dim, keepdim=True))
        if hi < length:
            out.narrow(dim, a.size - 1, 1).add_(t.narrow(dim, hi, length - hi).sum(dim, keepdim=True))
    return out


def _unfold_block(dblk: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool) -> torch.Tensor:
    """Gradient on the tap block (NHWC) -> gradient on the source (NHWC)."""
    return _fold(_fold(dblk, ay, 1, clamp), ax, 2, clamp)


def _check_window(ay: PoolAxis, ax: PoolAxis, what: str) -> None:
    if ay.dilation != 1 or ax.dilation != 1:
        raise ValueError(f"{what} pooling has no dilation")


def _scratch(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised channels-last NCHW tensor: the 'input' argument of torch's pooling
    backward ops, which read only its shape and memory format."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


# -- max ------------------------------------------------------------------------------------------


def _nan_free(y: torch.Tensor) -> bool:
    """Whether torch's plain max pool ``y`` (a CPU tensor: the callers ask only on the CPU, where
    the answer costs no host-device synchronisation) saw no NaN tap.

    torch's max propagates NaN (a window with a NaN tap yields NaN), so a NaN-free ``y``
    means no window read a NaN, and then torch's max (first maximal tap) is Metal's ``fmax``.
    One sum over the (smaller) result tells: it is NaN when any entry is (or when +inf and
    -inf meet, which only sends the call down the NaN-aware path)."""
    return not math.isnan(float(y.sum()))


def _max_candidates(xm: torch.Tensor, ay: PoolAxis, ax: PoolAxis, indices: bool):  # type: ignore[no-untyped-def]
    """max_pool2d over the NaN-free key (NaN -> -inf) and over the "tap is a number" mask."""
    nan = torch.isnan(xm)
    key = xm.masked_fill(nan, _NEG_INF)
    number = (~nan).to(xm.dtype)
    k, s, d = (ay.taps, ax.taps), (ay.stride, ax.stride), (ay.dilation, ax.dilation)
    if indices:
        return key, F.max_pool2d(key, k, s, 0, d, return_indices=True), F.max_pool2d(number, k, s, 0, d, return_indices=True)
    return key, F.max_pool2d(key, k, s, 0, d), F.max_pool2d(number, k, s, 0, d)


def max_pool_nhwc(x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Max pooling of ``x`` ``[N, ay.size, ax.size, C]`` -> ``[N, ay.out, ax.out, C]`` in
    ``x``'s dtype; NaN taps are ignored (NaN when every tap is NaN)."""
    return max_pool_winners_nhwc(x, ay, ax, clamp, out_dtype, out, winners=False)[0]


@dataclass(frozen=True)
class MaxWinners:
    """Where each window's maximum of one CPU max-pool forward lies, for its gradient to
    reuse instead of pooling the source again: torch's flat indices into the tap block (NCHW
    channels-last view) of the source tensor ``x`` (kept, so its memory is not reused while
    this lives) at version ``version``, for the geometry ``(ay, ax, clamp)``. Only made when
    no window read a NaN, so torch's winners are the first maximal taps."""

    x: torch.Tensor
    version: int
    ay: PoolAxis
    ax: PoolAxis
    clamp: bool
    indices: torch.Tensor

    def fits(self, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool) -> bool:
        """Whether these are the winners of pooling ``x`` (the same memory, shape, strides and
        unwritten since: torch's version counter) with this geometry."""
        s = self.x
        return (x.data_ptr() == s.data_ptr() and x.shape == s.shape and x.stride() == s.stride() and x.dtype == s.dtype
                and x._version == self.version and (ay, ax, clamp) == (self.ay, self.ax, self.clamp))


def max_pool_winners_nhwc(x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None, winners: bool = True) -> tuple[torch.Tensor, MaxWinners | None]:
    """:func:`max_pool_nhwc`, plus (``winners``, on the CPU, when no window read a NaN) the
    :class:`MaxWinners` its gradient can reuse. On the CPU the result is written straight
    into ``out`` where that is a float NHWC region of the right shape and dtype."""
    tri = dispatch.triton_engine("pooling", x)
    if tri is not None:
        y = dispatch.engine_out(out, (x.shape[0], ay.out, ax.out, x.shape[3]), out_dtype or x.dtype, x.device)
        tri.pool_forward(x, y, ay, ax, tri.MAX, clamp)
        return y, None
    xm = _nchw(_window(x, ay, ax, clamp))
    if xm.device.type == "cpu":
        k, s, d = (ay.taps, ax.taps), (ay.stride, ax.stride), (ay.dilation, ax.dilation)
        shape = (x.shape[0], ay.out, ax.out, x.shape[3])
        target = out if out is not None and tuple(out.shape) == shape and out.dtype == x.dtype and out.is_contiguous() else None
        if winners:
            ym = _nchw(target) if target is not None else torch.empty(shape, dtype=x.dtype).permute(0, 3, 1, 2)
            idx = torch.empty(ym.shape, dtype=torch.int64, memory_format=torch.channels_last)
            strides = ym.stride()
            torch.ops.aten.max_pool2d_with_indices.out(xm, list(k), list(s), [0, 0], list(d), False, out=ym, indices=idx)
            if ym.stride() != strides:  # torch re-strided the view (it never does for these layouts): a fresh result
                ym = F.max_pool2d(xm, k, s, 0, d)
                idx = F.max_pool2d(xm, k, s, 0, d, return_indices=True)[1]
            if _nan_free(ym):
                return _nhwc(ym), MaxWinners(x, x._version, ay, ax, clamp, idx)
        else:
            y = F.max_pool2d(xm, k, s, 0, d)
            if _nan_free(y):
                return _nhwc(y), None
    _, y, any_number = _max_candidates(xm, ay, ax, False)
    return _nhwc(y.masked_fill(any_number == 0, float("nan"))), None


def max_pool_gradient_nhwc(g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool,
                           out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                           winners: MaxWinners | None = None) -> torch.Tensor:
    """dL/dx (``x``'s shape, float32 or float64) for the incoming gradient ``g``
    ``[N, ay.out, ax.out, C]``: each window's gradient goes to its first maximal tap.
    ``winners``: the forward's (:func:`max_pool_winners_nhwc`), used when they
    :meth:`~MaxWinners.fits` this call instead of pooling ``x`` again. On the CPU the result
    is written straight into ``out`` where the tap block is the whole source and ``out`` is
    a contiguous region of ``x``'s shape in the compute dtype."""
    cdt = _compute_dtype(x)
    tri = dispatch.triton_engine("pooling", g, x)
    if tri is not None and tri.gradient_supported(ay, ax, clamp):
        dx = dispatch.engine_out(out, tuple(x.shape), out_dtype or cdt, x.device)
        tri.pool_max_gradient(g, x, dx, ay, ax, clamp)
        return dx
    xm = _nchw(_window(x, ay, ax, clamp))
    k, s, d = (ay.taps, ax.taps), (ay.stride, ax.stride), (ay.dilation, ax.dilation)
    if winners is not None and xm.device.type == "cpu" and winners.fits(x, ay, ax, clamp):
        key, idx, gm = xm, winners.indices, _nchw(g).to(cdt)
    else:
        plain = F.max_pool2d(xm, k, s, 0, d, return_indices=True) if xm.device.type == "cpu" else None
        if plain is not None and _nan_free(plain[0]):
            # no window read a NaN: torch's winners are the first maximal taps (an all -inf window
            # reports its first tap, a number), and every window passes its gradient
            key, idx, gm = xm, plain[1], _nchw(g).to(cdt)
        else:
            key, (y, idx), (any_number, first_number) = _max_candidates(xm, ay, ax, True)
            # a window whose numbers are all -inf: torch reports its first tap, which may be NaN
            idx = torch.where(y == _NEG_INF, first_number, idx)
            gm = _nchw(g).to(cdt).masked_fill(any_number == 0, 0.0)
    whole = ay.first == 0 and ay.span == ay.size and ax.first == 0 and ax.span == ax.size
    if (whole and xm.device.type == "cpu" and out is not None and tuple(out.shape) == tuple(x.shape) and out.dtype == cdt
            and out.is_contiguous() and key.dtype == cdt):
        # the block is the source: torch scatters into the destination itself (it zeroes it first)
        om = _nchw(out)
        strides = om.stride()
        torch.ops.aten.max_pool2d_with_indices_backward.grad_input(gm, key, list(k), list(s), [0, 0], list(d), False, idx, grad_input=om)
        if om.stride() == strides:
            return out
    dblk = torch.ops.aten.max_pool2d_with_indices_backward(
        gm, _scratch(key.shape, cdt, x.device), list(k), list(s), [0, 0], list(d), False, idx)
    return _unfold_block(_nhwc(dblk), ay, ax, clamp)


# -- average --------------------------------------------------------------------------------------


def _axis_counts(a: PoolAxis, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output along one axis: taps inside the image widened by ``zero_pad``, and taps
    inside the image proper (non-dilated windows)."""
    lo = torch.arange(a.out, device=device, dtype=torch.int64) * a.stride + a.first
    hi = lo + (a.extent - 1)
    widened = (hi.clamp(max=a.size - 1 + a.zero_pad) - lo.clamp(min=-a.zero_pad) + 1).clamp_(min=0)
    inside = (hi.clamp(max=a.size - 1) - lo.clamp(min=0) + 1).clamp_(min=0)
    return widened.to(dtype), inside.to(dtype)


@functools.lru_cache(maxsize=256)
def _average_scale(ay: PoolAxis, ax: PoolAxis, clamp: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``1/N`` per output as an ``[out_h, out_w, 1]`` tensor (a scalar tensor for edge mode
    zero), 0 where the window holds no in-image pixel or ``N`` is 0. Built on the device from
    the geometry alone (no host round trip), cached per geometry."""
    if not clamp:
        return torch.full((), 1.0 / (ay.taps * ax.taps), dtype=dtype, device=device)
    ny, iy = _axis_counts(ay, device, dtype)
    nx, ix = _axis_counts(ax, device, dtype)
    n = ny[:, None] * nx[None, :]
    ok = (iy[:, None] * ix[None, :] > 0) & (n > 0)
    return torch.where(ok, 1.0 / n.clamp(min=1), torch.zeros((), dtype=dtype, device=device))[:, :, None]


def _window_sums(blk: torch.Tensor, ay: PoolAxis, ax: PoolAxis) -> torch.Tensor:
    return _nhwc(F.avg_pool2d(_nchw(blk), (ay.taps, ax.taps), (ay.stride, ax.stride), divisor_override=1))


def average_pool_nhwc(x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Average pooling (float32 or float64 result): the sum of the in-image taps divided by
    ``kw·kh`` (zero) or by the shrunk tap count (clamp, with ``zero_pad``)."""
    _check_window(ay, ax, "average")
    cdt = _compute_dtype(x)
    tri = dispatch.triton_engine("pooling", x)
    if tri is not None:
        y = dispatch.engine_out(out, (x.shape[0], ay.out, ax.out, x.shape[3]), out_dtype or cdt, x.device)
        tri.pool_forward(x, y, ay, ax, tri.AVERAGE, clamp)
        return y
    s = _window_sums(_window(x, ay, ax, False, cdt), ay, ax)
    return s * _average_scale(ay, ax, clamp, x.device, cdt)


def average_pool_gradient_nhwc(g: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx ``[N, ay.size, ax.size, C]`` (float32 or float64): every in-image tap of window
    ``p`` receives ``g(p)/N(p)``. Needs only the forward geometry, not the source values."""
    _check_window(ay, ax, "average")
    cdt = _compute_dtype(g)
    tri = dispatch.triton_engine("pooling", g)
    if tri is not None:
        dx = dispatch.engine_out(out, (g.shape[0], ay.size, ax.size, g.shape[3]), out_dtype or cdt, g.device)
        tri.pool_average_gradient(g, dx, ay, ax, clamp)
        return dx
    w = g.to(cdt) * _average_scale(ay, ax, clamp, g.device, cdt)
    n, _, _, c = g.shape
    dblk = torch.ops.aten.avg_pool2d_backward(
        _nchw(w), _scratch((n, c, ay.span, ax.span), cdt, g.device), [ay.taps, ax.taps], [ay.stride, ax.stride], [0, 0],
        False, True, 1)
    return _unfold_block(_nhwc(dblk), ay, ax, False)


# -- L2 norm --------------------------------------------------------------------------------------


def l2norm_pool_nhwc(x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(Σ_taps x²)`` (float32 or float64 result); off-image taps per the edge rule."""
    _check_window(ay, ax, "L2-norm")
    tri = dispatch.triton_engine("pooling", x)
    if tri is not None:
        y = dispatch.engine_out(out, (x.shape[0], ay.out, ax.out, x.shape[3]), out_dtype or _compute_dtype(x), x.device)
        tri.pool_forward(x, y, ay, ax, tri.L2, clamp)
        return y
    blk = _window(x, ay, ax, clamp, _compute_dtype(x))
    return _window_sums(blk * blk, ay, ax).sqrt_()


def l2norm_pool_gradient_nhwc(g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool) -> torch.Tensor:
    """dL/dx (``x``'s shape, float32 or float64): ``Σ_p g(p)·x(t)/out(p)`` over the taps ``t``
    of each window reading the pixel (0 for windows with ``out(p) = 0``)."""
    _check_window(ay, ax, "L2-norm")
    cdt = _compute_dtype(x)
    blk = _window(x, ay, ax, clamp, cdt)
    y = _window_sums(blk * blk, ay, ax).sqrt_()
    w = torch.where(y > 0, g.to(cdt) / y.clamp(min=torch.finfo(cdt).tiny), torch.zeros((), dtype=cdt, device=x.device))
    n, _, _, c = g.shape
    dblk = torch.ops.aten.avg_pool2d_backward(
        _nchw(w), _scratch((n, c, ay.span, ax.span), cdt, x.device), [ay.taps, ax.taps], [ay.stride, ax.stride], [0, 0],
        False, True, 1)
    return _unfold_block(_nhwc(dblk) * blk, ay, ax, clamp)
