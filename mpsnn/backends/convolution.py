"""Convolution numerics on NHWC tensors through torch (cuDNN / oneDNN): forward, the backward
pass (data, weights, bias), transposed convolution and the fully-connected matrix products.

Layout: images are NHWC; ``x.permute(0, 3, 1, 2)`` is the NCHW view with channels-last strides
that cuDNN consumes without a copy, and OHWI weights ``w.permute(0, 3, 1, 2)`` are OIHW
channels-last, again without a copy. Results come back NHWC.

Padding: MPS places windows by an offset (kernel-base.md §2.2) that may ask for unequal
padding on the two sides of an axis. :func:`plan_axis` maps that onto torch's symmetric
padding when it can (equal sides, or the larger side with the extra outputs skipped when the
difference is a multiple of the stride), and falls back to an explicit zero pad otherwise.
Edge mode clamp gathers the window span with clamped indices first.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..core.enums import MPSImageEdgeMode
from ..core.regions import read_window
from . import dispatch

#: let cuDNN time its algorithms on the first call of each geometry (torch's
#: ``cudnn.benchmark``) for mpsnn's own convolution calls on CUDA, whatever the global setting
#: (mpsnn): the first encode of a geometry is slower, later ones (and CUDA-graph replays) use
#: the fastest algorithm found.
CUDNN_BENCHMARK = True


@contextmanager
def tf32(allowed: bool, x: torch.Tensor) -> Iterator[None]:
    """The cuDNN/cuBLAS settings of one mpsnn call on CUDA, restored afterwards: TF32 allowed
    or forbidden for float32 work, and cuDNN's algorithm benchmark per ``CUDNN_BENCHMARK``."""
    if not x.is_cuda:
        yield
        return
    cd, mm, bench = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    if x.dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = allowed
        torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.benchmark = bench or CUDNN_BENCHMARK
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cd
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.benchmark = bench


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis of a window span maps onto a torch convolution.

    The span (first tap ``start``, ``count`` outputs, ``stride``, dilated window ``win``) reads
    source positions ``[start, end)``. ``lo:hi`` is the in-image slice handed to torch,
    ``pad`` torch's symmetric padding, ``skip`` how many leading torch outputs to drop, and
    ``explicit`` (left, right) a zero pad to apply first when symmetric padding cannot work.
    """

    lo: int
    hi: int
    pad: int
    skip: int
    explicit: tuple[int, int]


@functools.lru_cache(maxsize=8192)
def plan_axis(start: int, count: int, stride: int, win: int, size: int) -> AxisPlan:
    end = start + (count - 1) * stride + win
    lo, hi = min(max(start, 0), size), max(min(end, size), 0)
    if hi <= lo:  # every tap is off the image
        return AxisPlan(0, 0, 0, 0, (end - start, 0))
    pl, pr = lo - start, end - hi
    skip = 0
    # Keep the slice a whole-image view where possible (a partial view makes cuDNN copy the
    # input): read on to the image's end (torch then computes outputs past the ones needed,
    # which are dropped), and start at 0 when the first window starts a whole number of
    # strides in (those leading outputs are dropped too).
    if pr == 0:
        hi = size
    if pl == 0 and start > 0 and start % stride == 0:
        lo, skip = 0, start // stride
    if pl == pr:
        return AxisPlan(lo, hi, pl, skip, (0, 0))
    p = max(pl, pr)
    if (p - pl) % stride == 0:
        return AxisPlan(lo, hi, p, skip + (p - pl) // stride, (0, 0))
    return AxisPlan(start if skip else lo, hi, 0, 0, (pl, pr))


def windows(w_oihw: torch.Tensor, dilation: tuple[int, int]) -> tuple[int, int]:
    """The dilated window extents ``(kWd, kHd)`` of OIHW weights."""
    return (w_oihw.shape[3] - 1) * dilation[0] + 1, (w_oihw.shape[2] - 1) * dilation[1] + 1


def plan_axes(left: int, top: int, out_w: int, out_h: int, sx: int, sy: int, winx: int, winy: int, w: int, h: int,
              edge_mode: MPSImageEdgeMode) -> tuple[AxisPlan, AxisPlan, bool]:
    """Both axes' plans for windows on a ``w x h`` source, and whether the span must be
    gathered with clamped indices (edge mode clamp with windows that leave the image)."""
    px = plan_axis(left, out_w, sx, winx, w)
    py = plan_axis(top, out_h, sy, winy, h)
    inside = px.lo == left and py.lo == top and px.hi - px.lo == (out_w - 1) * sx + winx and py.hi - py.lo == (out_h - 1) * sy + winy
    return px, py, edge_mode == MPSImageEdgeMode.clamp and not inside


def _span(x: torch.Tensor, left: int, top: int, out_w: int, out_h: int, sx: int, sy: int, winx: int, winy: int,
          edge_mode: MPSImageEdgeMode) -> tuple[torch.Tensor, AxisPlan, AxisPlan, bool]:
    """The NCHW (channels-last) input torch convolves, its plans, and whether it is a gathered copy."""
    n, h, w, c = x.shape
    px, py, gather = plan_axes(left, top, out_w, out_h, sx, sy, winx, winy, w, h, edge_mode)
    if gather:
        span = read_window(x, left, top, (out_w - 1) * sx + winx, (out_h - 1) * sy + winy, edge_mode)
        return span.permute(0, 3, 1, 2), AxisPlan(0, 0, 0, 0, (0, 0)), AxisPlan(0, 0, 0, 0, (0, 0)), True
    xs = x[:, py.lo:py.hi, px.lo:px.hi, :].permute(0, 3, 1, 2)
    if px.explicit != (0, 0) or py.explicit != (0, 0):
        xs = F.pad(xs, (px.explicit[0], px.explicit[1], py.explicit[0], py.explicit[1]))
    if not xs.is_contiguous(memory_format=torch.channels_last):
        xs = xs.contiguous(memory_format=torch.channels_last)
    return xs, px, py, False


#: per cuDNN function: the callable that writes into `out` in this build, or False when none does
_cudnn_out_fns: dict[str, Any] = {}


def _cudnn_out_candidates(name: str) -> list[Any]:
    """Ways to call ``<name>(..., out=)``: the ``torch.<name>`` binding (fastest on the host)
    where it takes ``out=``, then the dispatcher's ``aten::<name>.out`` overload."""
    fns = []
    if hasattr(torch, name):
        fns.append(getattr(torch, name))
    packet = getattr(torch.ops.aten, name, None)
    if packet is not None and "out" in packet.overloads():
        fns.append(packet.out)
    return fns


def _cudnn_into(name: str, out: torch.Tensor, *args: object) -> bool:
    """Run ``<name>(*args, benchmark, deterministic, allow_tf32, out=out)`` (``name`` is
    ``cudnn_convolution`` or ``cudnn_convolution_transpose``) so that cuDNN writes straight
    into ``out`` (an NCHW channels-last view of a destination image): no result copy.
    ``args`` ends with the caller's ``allow_tf32``, passed to cuDNN as given. False when this
    torch build cannot (found out once per function; the caller then computes and copies)."""
    fn = _cudnn_out_fns.get(name)
    if fn is False:
        return False
    *rest, allow_tf32 = args
    cudnn = torch.backends.cudnn
    bench = cudnn.benchmark or CUDNN_BENCHMARK
    if fn is not None:
        fn(*rest, bench, cudnn.deterministic, bool(allow_tf32), out=out)
        return True
    for candidate in _cudnn_out_candidates(name):
        try:
            candidate(*rest, bench, cudnn.deterministic, bool(allow_tf32), out=out)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        _cudnn_out_fns[name] = candidate
        return True
    _cudnn_out_fns[name] = False
    return False


_HALF = (torch.float16, torch.bfloat16)


def cpu_float32(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """On the CPU, 16-bit operands are convolved in float32 (oneDNN's float16 convolutions run
    ~4x slower than float32 on x86 CPUs; float32 accumulation with one rounding of the result
    is also the more accurate of the two). CUDA tensors are returned unchanged."""
    if not any(t is not None and t.device.type == "cpu" and t.dtype in _HALF for t in ts):
        return ts
    return tuple(None if t is None else t.float() for t in ts)


class Conv2dPlan:
    """A forward convolution worked out once for a geometry, run many times.

    Made by :func:`plan_conv2d`. The source is cropped to the rows and columns the windows
    read (a view), zero-padded explicitly only where torch's symmetric padding cannot place
    the windows, and convolved in one call. When torch's outputs are exactly the requested
    ones and the destination region is contiguous, cuDNN writes it directly on CUDA
    (``direct``); otherwise ``F.conv2d`` computes the result, the extra leading outputs
    (``skip``) are dropped and the rest is copied into the region.
    """

    __slots__ = ("crop", "y0", "y1", "x0", "x1", "explicit", "pad", "stride", "dilation", "groups", "allow_tf32", "direct", "skip_y", "skip_x",
                 "out_h", "out_w")

    def __init__(self, py: AxisPlan, px: AxisPlan, crop: bool, stride: tuple[int, int], dilation: tuple[int, int], groups: int,
                 allow_tf32: bool, direct: bool, out_h: int, out_w: int) -> None:
        self.crop, self.y0, self.y1, self.x0, self.x1 = crop, py.lo, py.hi, px.lo, px.hi
        self.explicit = None if px.explicit == (0, 0) and py.explicit == (0, 0) else (*px.explicit, *py.explicit)
        self.pad, self.stride, self.dilation, self.groups = [py.pad, px.pad], [stride[1], stride[0]], [dilation[1], dilation[0]], groups
        self.allow_tf32, self.direct = allow_tf32, direct
        self.skip_y, self.skip_x, self.out_h, self.out_w = py.skip, px.skip, out_h, out_w

    def run(self, x: torch.Tensor, w_oihw: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor | None:
        """Write the convolution of NHWC ``x`` into NHWC ``out`` (a region of the destination);
        with ``out`` None (a plan that is not ``direct``), return the result instead, an NHWC
        view of torch's output (contiguous when torch computed it channels-last and no
        leading outputs are dropped), for a destination without storage to adopt."""
        xs = (x[:, self.y0:self.y1, self.x0:self.x1, :] if self.crop else x).permute(0, 3, 1, 2)
        o = None if out is None else out.permute(0, 3, 1, 2)
        if self.direct and o is not None:
            if _cudnn_into("cudnn_convolution", o, xs, w_oihw, self.pad, self.stride, self.dilation, self.groups, self.allow_tf32):
                if bias is not None:
                    o.add_(bias.view(1, -1, 1, 1))
                return None
            self.direct = False  # this torch build has no cuDNN `out=` form: compute, then copy
        if self.explicit is not None:
            xs = F.pad(xs, self.explicit)
        if not xs.is_contiguous(memory_format=torch.channels_last):
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs, w_oihw, bias = cpu_float32(xs, w_oihw, bias)  # type: ignore[assignment]
        with tf32(self.allow_tf32, x):
            y = F.conv2d(xs, w_oihw, bias, self.stride, self.pad, self.dilation, self.groups)
        y = y[:, :, self.skip_y:self.skip_y + self.out_h, self.skip_x:self.skip_x + self.out_w]
        if o is None:
            return y.permute(0, 2, 3, 1)
        o.copy_(y)
        return None


    def fused(self, x: torch.Tensor, w_oihw: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor | None:
        """``relu(conv(x) + bias [+ z])`` in one cuDNN call (``cudnn_convolution_relu`` or,
        with the NHWC residual ``z`` of the result's shape, ``cudnn_convolution_add_relu``),
        computed in float32 and rounded once, returned as a fresh NHWC tensor (no ``out=``
        form exists; the caller adopts it as the destination's storage). None when this plan
        is not a direct one, the operands are not all CUDA tensors of one dtype, or this
        torch build has no such fused form (found out once); the caller then takes the
        unfused path. ReLU here is cuDNN's ``max(v, 0)``."""
        global _fused_ok
        if not (self.direct and _fused_ok is not False and x.is_cuda and w_oihw.dtype == x.dtype
                and (z is None or (z.dtype == x.dtype and z.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)))):
            return None
        xs = (x[:, self.y0:self.y1, self.x0:self.x1, :] if self.crop else x).permute(0, 3, 1, 2)
        try:
            with tf32(self.allow_tf32, x):
                if z is None:
                    y = torch.cudnn_convolution_relu(xs, w_oihw, bias, self.stride, self.pad, self.dilation, self.groups)
                else:
                    y = torch.cudnn_convolution_add_relu(xs, w_oihw, z.permute(0, 3, 1, 2), 1.0, bias, self.stride, self.pad,
                                                         self.dilation, self.groups)
        except (AttributeError, RuntimeError, NotImplementedError):
            if _fused_ok is None:
                _fused_ok = False
                return None
            raise
        _fused_ok = True
        y = y.permute(0, 2, 3, 1)
        return y if y.is_contiguous() else y.contiguous()


#: whether torch's fused cuDNN convolution + bias (+ add) + ReLU works here (None: not tried yet)
_fused_ok: bool | None = None


def plan_conv2d(x: torch.Tensor, w_oihw: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int], groups: int, left: int, top: int,
                out_w: int, out_h: int, edge_mode: MPSImageEdgeMode, allow_tf32: bool, out: torch.Tensor) -> Conv2dPlan | None:
    """A :class:`Conv2dPlan` writing ``out`` (NHWC ``[N, out_h, out_w, Cout]``, ``x``'s dtype),
    or None when the windows need the general path of :func:`conv2d_nhwc` (edge mode clamp
    with windows that leave the image: the span is gathered with clamped indices)."""
    winx, winy = windows(w_oihw, dilation)
    n, h, w, _ = x.shape
    px, py, gather = plan_axes(left, top, out_w, out_h, stride[0], stride[1], winx, winy, w, h, edge_mode)
    if gather:
        return None
    if not (out.shape == (n, out_h, out_w, w_oihw.shape[0]) and out.dtype == x.dtype == w_oihw.dtype):
        return None
    crop = (py.lo, py.hi, px.lo, px.hi) != (0, h, 0, w)
    exact = (px.explicit == (0, 0) and py.explicit == (0, 0) and px.skip == 0 and py.skip == 0
             and (py.hi - py.lo + 2 * py.pad - winy) // stride[1] + 1 == out_h and (px.hi - px.lo + 2 * px.pad - winx) // stride[0] + 1 == out_w)
    xs = x[:, py.lo:py.hi, px.lo:px.hi, :] if crop else x
    direct = (exact and x.is_cuda and out.is_contiguous() and w_oihw.is_contiguous(memory_format=torch.channels_last)
              and xs.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
              and _cudnn_out_fns.get("cudnn_convolution") is not False)
    return Conv2dPlan(py, px, crop, stride, dilation, groups, allow_tf32, direct, out_h, out_w)


def conv2d_nhwc(x: torch.Tensor, w_oihw: torch.Tensor, bias: torch.Tensor | None, *, stride: tuple[int, int], dilation: tuple[int, int],
                groups: int, left: int, top: int, out_w: int, out_h: int, edge_mode: MPSImageEdgeMode, allow_tf32: bool) -> torch.Tensor:
    """Correlate NHWC ``x`` with OIHW weights for windows whose first taps are ``(left, top)``;
    returns ``[N, out_h, out_w, Cout]`` NHWC in ``x``'s dtype (the general path; see
    :func:`plan_conv2d` for the planned one that writes a destination directly)."""
    winx, winy = windows(w_oihw, dilation)
    xs, px, py, _ = _span(x, left, top, out_w, out_h, stride[0], stride[1], winx, winy, edge_mode)
    xs32, w32, b32 = cpu_float32(xs, w_oihw, bias)
    with tf32(allow_tf32, x):
        y = F.conv2d(xs32, w32, b32, (stride[1], stride[0]), (py.pad, px.pad), (dilation[1], dilation[0]), groups)  # type: ignore[arg-type]
    y = y[:, :, py.skip:py.skip + out_h, px.skip:px.skip + out_w].to(x.dtype)
    return y.permute(0, 2, 3, 1)


class Conv2dBackwardPlan:
    """The backward pass of a forward convolution that read the whole source (symmetric
    padding, no gathered or cropped spans), worked out once for a geometry.

    ``run`` takes the incoming gradient ``e`` (NHWC, exactly the forward result's size), the
    forward source ``x`` and optionally ``dx_out`` (the data-gradient destination, NHWC,
    ``x``'s shape, contiguous), and returns ``(dx NHWC, dw OIHW, db float32)`` (None where
    not asked for):

    * data gradient of a stride-1 convolution on CUDA (``data_weights`` set): the adjoint of
      a stride-1 correlation is a stride-1 correlation of ``e`` with the weights flipped and
      transposed per group, padded by ``d·(k−1) − p``; cuDNN's forward convolution writes it
      straight into ``dx_out`` (no copy). The flipped weights are made once per plan (the
      kernel drops its plans when its weights change);
    * otherwise one ``convolution_backward`` call computes the data and weight gradients and
      ``dx`` is a fresh channels-last tensor (a destination with no storage yet adopts it,
      an allocated one receives a copy). cuDNN's ``out=`` form of the transposed convolution
      is no way around that copy: it computes into a temporary and copies (measured 0.49 ms
      against 0.22 ms for the data gradient alone, 1x1 256->128 at 56x56, batch 256, bf16,
      H100);
    * the bias gradient is a float32 column sum of ``e`` (:func:`bias_gradient`).
    """

    __slots__ = ("pad", "stride", "dilation", "groups", "allow_tf32", "need_data", "need_weights", "need_bias", "data_weights", "data_pad")

    def __init__(self, pad: list[int], stride: list[int], dilation: list[int], groups: int, allow_tf32: bool,
                 need_data: bool, need_weights: bool, need_bias: bool, data_weights: torch.Tensor | None, data_pad: list[int]) -> None:
        self.pad, self.stride, self.dilation, self.groups, self.allow_tf32 = pad, stride, dilation, groups, allow_tf32
        self.need_data, self.need_weights, self.need_bias = need_data, need_weights, need_bias
        self.data_weights, self.data_pad = data_weights, data_pad

    @property
    def writes_data_directly(self) -> bool:
        return self.need_data and self.data_weights is not None

    def run(self, e: torch.Tensor, x: torch.Tensor, w_oihw: torch.Tensor,
            dx_out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        en = e.permute(0, 3, 1, 2)
        dx = None
        need_data = self.need_data
        if need_data and self.data_weights is not None and dx_out is not None:
            if _cudnn_into("cudnn_convolution", dx_out.permute(0, 3, 1, 2), en, self.data_weights, self.data_pad, [1, 1], self.dilation,
                           self.groups, self.allow_tf32):
                dx, need_data = dx_out, False
            else:
                self.data_weights = None  # no cuDNN `out=` form in this build
        gw = None
        if need_data or self.need_weights:
            en32, x32, w32 = cpu_float32(en, x.permute(0, 3, 1, 2), w_oihw)
            with tf32(self.allow_tf32, x):
                gi, gw, _ = torch.ops.aten.convolution_backward.default(
                    en32, x32, w32, None, self.stride, self.pad, self.dilation, False, [0, 0], self.groups,
                    [need_data, self.need_weights, False])
            if need_data:
                dx = gi.permute(0, 2, 3, 1).to(en.dtype)
            if gw is not None:
                gw = gw.to(en.dtype)
        return dx, (gw if self.need_weights else None), (bias_gradient(e) if self.need_bias else None)


def bias_gradient(e: torch.Tensor) -> torch.Tensor:
    """``db[o] = Σ_{n,y,x} e[n, y, x, o]`` of an NHWC gradient, accumulated and returned in
    float32 (through :mod:`mpsnn.backends.dispatch`'s column sum where it has a fast kernel)."""
    return dispatch.column_sum(e)


def plan_conv2d_backward(e: torch.Tensor, x: torch.Tensor, w_oihw: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int],
                         groups: int, left: int, top: int, edge_mode: MPSImageEdgeMode, allow_tf32: bool, need_data: bool,
                         need_weights: bool, need_bias: bool) -> Conv2dBackwardPlan | None:
    """A :class:`Conv2dBackwardPlan` for these operands, or None when the geometry needs the
    general path of :func:`conv2d_backward_nhwc` (windows that leave the image unevenly,
    gathered clamp spans, inputs that are not whole channels-last images)."""
    n, out_h, out_w, cout = e.shape
    h, w = x.shape[1], x.shape[2]
    winx, winy = windows(w_oihw, dilation)
    px, py, gather = plan_axes(left, top, out_w, out_h, stride[0], stride[1], winx, winy, w, h, edge_mode)
    if gather or px.explicit != (0, 0) or py.explicit != (0, 0) or px.skip or py.skip or (px.lo, px.hi, py.lo, py.hi) != (0, w, 0, h):
        return None
    full_h = (h + 2 * py.pad - winy) // stride[1] + 1
    full_w = (w + 2 * px.pad - winx) // stride[0] + 1
    if (full_h, full_w) != (out_h, out_w) or not (e.dtype == x.dtype == w_oihw.dtype):
        return None
    if not (e.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last) and x.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)):
        return None
    data_weights, data_pad = None, [winy - 1 - py.pad, winx - 1 - px.pad]
    if (need_data and x.is_cuda and stride == (1, 1) and min(data_pad) >= 0 and _cudnn_out_fns.get("cudnn_convolution") is not False):
        data_weights = _transpose_weights(w_oihw, groups).contiguous(memory_format=torch.channels_last)
    return Conv2dBackwardPlan([py.pad, px.pad], [stride[1], stride[0]], [dilation[1], dilation[0]], groups, allow_tf32,
                              need_data, need_weights, need_bias, data_weights, data_pad)


def conv2d_backward_nhwc(e: torch.Tensor, x: torch.Tensor, w_oihw: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int],
                         groups: int, left: int, top: int, edge_mode: MPSImageEdgeMode, allow_tf32: bool,
                         need_data: bool, need_weights: bool, need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`conv2d_nhwc` for the incoming gradient ``e`` ``[N, h, w, Cout]``.

    Returns ``(dx, dw, db)``: ``dx`` has ``x``'s shape (taps that fell off the image are
    dropped, also for edge mode clamp), ``dw`` is OIHW, ``db`` ``[Cout]``; parts not asked for
    are None. This is the general path; :func:`plan_conv2d_backward` covers the common case
    with a plan that writes the data gradient into the destination directly.
    """
    n, out_h, out_w, cout = e.shape
    winx, winy = windows(w_oihw, dilation)
    xs, px, py, gathered = _span(x, left, top, out_w, out_h, stride[0], stride[1], winx, winy, edge_mode)
    full_h = (xs.shape[2] + 2 * py.pad - winy) // stride[1] + 1
    full_w = (xs.shape[3] + 2 * px.pad - winx) // stride[0] + 1
    en = e.permute(0, 3, 1, 2)
    if (full_h, full_w) != (out_h, out_w) or py.skip or px.skip:
        g = _zeros_nchw_channels_last(en, n, cout, full_h, full_w)
        g[:, :, py.skip:py.skip + out_h, px.skip:px.skip + out_w] = en
        en = g
    elif not en.is_contiguous(memory_format=torch.channels_last):
        en = en.contiguous(memory_format=torch.channels_last)
    gi = gw = None
    if need_data or need_weights:
        en32, xs32, w32 = cpu_float32(en, xs, w_oihw)
        with tf32(allow_tf32, x):
            gi, gw, _ = torch.ops.aten.convolution_backward(
                en32, xs32, w32, None, [stride[1], stride[0]], [py.pad, px.pad], [dilation[1], dilation[0]],
                False, [0, 0], groups, [need_data, need_weights, False])
        if gi is not None:
            gi = gi.to(en.dtype)
        if gw is not None:
            gw = gw.to(en.dtype)
    gb = bias_gradient(e) if need_bias else None
    dx = None
    if need_data:
        assert gi is not None
        gi = gi.permute(0, 2, 3, 1)
        h, w = x.shape[1], x.shape[2]
        if gathered:
            # the span started at (left, top); keep only the taps that were inside the image
            x0, y0 = max(left, 0), max(top, 0)
            x1, y1 = min(left + gi.shape[2], w), min(top + gi.shape[1], h)
            inner = gi[:, y0 - top:y1 - top, x0 - left:x1 - left, :] if x1 > x0 and y1 > y0 else None
            lo_x, lo_y = x0, y0
        else:
            ex, ey = px.explicit, py.explicit
            inner = gi[:, ey[0]:gi.shape[1] - ey[1], ex[0]:gi.shape[2] - ex[1], :] if px.hi > px.lo and py.hi > py.lo else None
            lo_x, lo_y = px.lo, py.lo
        if inner is not None and inner.shape[1] == h and inner.shape[2] == w:
            dx = inner
        else:
            dx = x.new_zeros(x.shape)
            if inner is not None:
                dx[:, lo_y:lo_y + inner.shape[1], lo_x:lo_x + inner.shape[2], :] = inner
    return dx, gw if need_weights else None, gb if need_bias else None


def _zeros_nchw_channels_last(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Zeros of logical shape ``[n, c, h, w]`` stored channels-last (an NHWC tensor's view)."""
    return torch.zeros((n, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def depth_to_space_dcr(y: torch.Tensor, r: int, out_w: int, out_h: int) -> torch.Tensor:
    """Sub-pixel rearrangement (convolution.md §4.3): ``D[x, y, c] = Io[x/r, y/r, Nr·(r·(y mod r) +
    (x mod r)) + c]`` on NHWC ``y``, cropped to ``out_h x out_w``."""
    n, h, w, c = y.shape
    nr = c // (r * r)
    z = y.reshape(n, h, w, r, r, nr).permute(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, nr)
    return z[:, :out_h, :out_w, :]


def conv_transpose_nhwc(x: torch.Tensor, w_oihw: torch.Tensor, bias: torch.Tensor | None, *, stride: tuple[int, int], dilation: tuple[int, int],
                        groups: int, tx: int, ty: int, out_w: int, out_h: int, allow_tf32: bool) -> torch.Tensor:
    """Transposed convolution of convolution.md §12.2 on NHWC ``x``.

    MPS correlates the zero-inserted source ``Z`` with the weights as given (no rotation).
    torch's ``conv_transpose2d`` with padding 0 computes ``y_t(u) = Σ_p Z(u − (kWd−1) + p·d)·W[p]``
    for weights rotated by 180° with in/out swapped, so output ``i`` of MPS is
    ``y_t(i + t + (kWd − 1) − (kWd >> 1))`` with ``t`` the total offset on ``Z``; positions past
    ``y_t`` read 0. ``w_oihw`` is MPS's ``[Cout][Cin/g][kH][kW]``.
    """
    kh, kw = w_oihw.shape[2], w_oihw.shape[3]
    winx, winy = (kw - 1) * dilation[0] + 1, (kh - 1) * dilation[1] + 1
    wt = _transpose_weights(w_oihw, groups)
    xs = x.permute(0, 3, 1, 2)
    with tf32(allow_tf32, x):
        yt = F.conv_transpose2d(xs, wt, None, (stride[1], stride[0]), 0, 0, groups, (dilation[1], dilation[0]))
    u0x = tx + (winx - 1) - (winx >> 1)
    u0y = ty + (winy - 1) - (winy >> 1)
    y = _crop_or_zero(yt, u0y, u0x, out_h, out_w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1).to(y.dtype)
    return y.permute(0, 2, 3, 1)


def conv_transpose_backward_nhwc(e: torch.Tensor, x: torch.Tensor, w_oihw: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int],
                                 groups: int, tx: int, ty: int, allow_tf32: bool, need_data: bool, need_weights: bool,
                                 need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`conv_transpose_nhwc`: ``(dx NHWC, dw in MPS [Cout][Cin/g][kH][kW], db)``."""
    n, out_h, out_w, cout = e.shape
    kh, kw = w_oihw.shape[2], w_oihw.shape[3]
    winx, winy = (kw - 1) * dilation[0] + 1, (kh - 1) * dilation[1] + 1
    xs = x.permute(0, 3, 1, 2)
    full_h = (x.shape[1] - 1) * stride[1] + winy
    full_w = (x.shape[2] - 1) * stride[0] + winx
    u0x = tx + (winx - 1) - (winx >> 1)
    u0y = ty + (winy - 1) - (winy >> 1)
    g = _zeros_nchw_channels_last(e, n, cout, full_h, full_w)
    ys0, ys1 = max(u0y, 0), min(u0y + out_h, full_h)
    xs0, xs1 = max(u0x, 0), min(u0x + out_w, full_w)
    if ys1 > ys0 and xs1 > xs0:
        g[:, :, ys0:ys1, xs0:xs1] = e.permute(0, 3, 1, 2)[:, :, ys0 - u0y:ys1 - u0y, xs0 - u0x:xs1 - u0x]
    wt = _transpose_weights(w_oihw, groups)
    with tf32(allow_tf32, x):
        gi, gwt, _ = torch.ops.aten.convolution_backward(
            g, xs, wt, None, [stride[1], stride[0]], [0, 0], [dilation[1], dilation[0]], True, [0, 0], groups,
            [need_data, need_weights, False])
    dx = gi.permute(0, 2, 3, 1) if need_data else None
    dw = _transpose_weights_back(gwt, groups) if need_weights else None
    db = bias_gradient(e) if need_bias else None
    return dx, dw, db


def _transpose_weights(w_oihw: torch.Tensor, groups: int) -> torch.Tensor:
    """MPS ``W[o][c][q][p]`` (o < Cout, c < Cin/g) -> torch transposed-conv weights
    ``[Cin][Cout/g][kH][kW]`` rotated by 180°."""
    cout, cin_g, kh, kw = w_oihw.shape
    w = w_oihw.flip(2, 3).reshape(groups, cout // groups, cin_g, kh, kw).transpose(1, 2)
    return w.reshape(groups * cin_g, cout // groups, kh, kw)


def _transpose_weights_back(wt: torch.Tensor, groups: int) -> torch.Tensor:
    cin, cout_g, kh, kw = wt.shape
    w = wt.reshape(groups, cin // groups, cout_g, kh, kw).transpose(1, 2).reshape(groups * cout_g, cin // groups, kh, kw)
    return w.flip(2, 3)


def _crop_or_zero(y: torch.Tensor, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """``y[:, :, y0:y0+h, x0:x0+w]`` with zeros where the window leaves ``y``."""
    H, W = y.shape[2], y.shape[3]
    if y0 >= 0 and x0 >= 0 and y0 + h <= H and x0 + w <= W:
        return y[:, :, y0:y0 + h, x0:x0 + w]
    out = _zeros_nchw_channels_last(y, y.shape[0], y.shape[1], h, w)
    ys0, ys1, xs0, xs1 = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if ys1 > ys0 and xs1 > xs0:
        out[:, :, ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0] = y[:, :, ys0:ys1, xs0:xs1]
    return out


def fully_connected_nhwc(x: torch.Tensor, w_ohwi: torch.Tensor, bias: torch.Tensor | None, allow_tf32: bool) -> torch.Tensor:
    """Inner product of each whole image ``[N, H, W, C]`` with OHWI weights -> ``[N, 1, 1, Cout]``.

    The image axes only have to agree between ``x`` and the weights: a kernel whose weights
    are ``[Cout][W][H][Cin]`` passes ``x.transpose(1, 2)`` (the flattening copies that view,
    ``N·H·W·C`` values, 1/Cout of the product's work)."""
    n = x.shape[0]
    x32, w32, b32 = cpu_float32(x, w_ohwi, bias)
    with tf32(allow_tf32, x):
        y = F.linear(x32.reshape(n, -1), w32.reshape(w_ohwi.shape[0], -1), b32)  # type: ignore[union-attr]
    return y.to(x.dtype).view(n, 1, 1, -1)


def fully_connected_backward_nhwc(e: torch.Tensor, x: torch.Tensor, w_ohwi: torch.Tensor, allow_tf32: bool, need_data: bool,
                                  need_weights: bool, need_bias: bool, *, dw_out: torch.Tensor | None = None,
                                  accumulate: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``dx = E·W`` (shaped like ``x``), ``dW = Eᵀ·x`` (shaped like the weights) and ``db = Σ_n E``
    of :func:`fully_connected_nhwc` (the same freedom in the image axes' order).

    ``dw_out`` (float32, contiguous, as many values as the weights): ``dW`` is written into it
    (added to it when ``accumulate``) and returned; float32 operands write it with the matrix
    product itself (``mm`` with ``out=`` / ``addmm_``), so the largest result of the layer is
    neither allocated nor copied (16-bit operands on the CPU are float32 here already, see
    :func:`cpu_float32`). 16-bit operands on CUDA compute ``dW`` in their dtype, as without
    ``dw_out``, and convert it in the copy or addition."""
    n = x.shape[0]
    e32, x32, w32 = cpu_float32(e, x, w_ohwi)
    e2 = e32.reshape(n, -1)  # type: ignore[union-attr]
    dw: torch.Tensor | None = None
    with tf32(allow_tf32, x):
        dx = (e2 @ w32.reshape(w_ohwi.shape[0], -1)).view(x.shape).to(e.dtype) if need_data else None  # type: ignore[union-attr]
        if need_weights:
            x2 = x32.reshape(n, -1)  # type: ignore[union-attr]
            if dw_out is None:
                dw = (e2.t() @ x2).view(w_ohwi.shape).to(e.dtype)
            else:
                out2 = dw_out.view(e2.shape[1], x2.shape[1])
                if e2.dtype == x2.dtype == out2.dtype:
                    if accumulate:
                        out2.addmm_(e2.t(), x2)
                    else:
                        torch.mm(e2.t(), x2, out=out2)
                elif accumulate:
                    out2.add_(e2.t() @ x2)
                else:
                    out2.copy_(e2.t() @ x2)
                dw = dw_out
    db = e.reshape(n, -1).sum(0) if need_bias else None
    return dx, dw, db
