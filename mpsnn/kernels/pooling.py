"""Pooling kernels: MPSCNNPooling, MPSCNNPoolingMax, MPSCNNPoolingAverage, MPSCNNPoolingL2Norm,
MPSCNNDilatedPoolingMax and their gradient kernels (spec/pooling.md).

Window (pooling.md §2.1, §6; kernel-base.md §2.2), per axis (x shown; y alike), for the
destination pixel ``clip_rect.origin + i``::

    cx(i) = offset.x + stride_in_pixels_x·i                 # window centre
    taps  u_k = cx − floor(E/2) + D·k,  k < kernel_width    # E = D·(kernel_width − 1) + 1

(``D`` = dilation rate, 1 except for the dilated max pool), so even windows reach one pixel
further left/top than right/bottom. Each channel and image is pooled on its own.

Forward math, over the taps ``t`` of a window (``S`` = sum over the taps inside the image):

* max:     ``max_t in(t)``; off-image taps read 0 (edge mode zero) or the nearest edge pixel
  (clamp). NaN taps are ignored like Metal's ``fmax`` (NaN only if every tap is NaN; inferred).
* average: zero -> ``S / (kw·kh)`` (``zero_pad_size_x/_y`` ignored); clamp ("shrink to
  edge") -> ``S / N`` with ``N`` the taps inside the image widened by ``zero_pad_size_x``
  columns left and right and ``zero_pad_size_y`` rows above and below; 0 when the window holds
  no in-image pixel or ``N`` = 0.
* L2 norm: ``sqrt(Σ_t in(t)²)``; off-image taps read 0 (zero) or the nearest edge pixel
  (clamp, inferred).

Gradients (§7), ``dest(y) = Σ_p g(p)·∂out(p)/∂in(y)`` over the incoming-gradient pixels ``p``
in ``[primary_offset, primary_offset + source_size)`` ∩ the gradient image, ``p`` being
forward output ``i = p − primary_offset`` with its window centred at
``secondary_offset + stride·i``:

* max: 1 for the window's first maximal tap in scan order (rows top to bottom, each left to
  right; inferred tie rule), 0 elsewhere; a winning off-image zero (edge mode zero) drops the
  window's gradient, a clamped tap passes it to the edge pixel it read (inferred); NaN taps
  never win and an all-NaN window passes nothing (inferred).
* average: ``1/N(p)`` for each in-image tap (``N`` as in the forward divisor).
* L2 norm: ``in(y)/out(p)`` for each tap reading ``y`` (a pixel read by several taps, e.g.
  clamped ones, accumulates), 0 where ``out(p) = 0`` (inferred).

Result pixel ``clip_rect.origin + d`` holds the derivative for forward-source pixel
``y0 + d`` with ``y0 = max(0, secondary_offset − floor(E/2))`` per axis (inferred, §7.1);
pixels that receive nothing are written as 0. Pooling honours only edge modes zero and clamp
(others raise :class:`~mpsnn.MPSValueError`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..backends import pooling as backend
from ..backends.pooling import PoolAxis
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode, MPSNNPaddingMethod
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import ULONG_MAX, InputGeometry, MPSCNNKernel, Region
from ..core.padding import dest_size, method_of
from ..core.regions import read_window
from ..core.structs import MPSOffset, MTLOrigin, MTLRegion, MTLSize
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSState
from .results import direct_out, result_dtype, write_result

__all__ = [
    "MPSCNNDilatedPoolingMax",
    "MPSCNNDilatedPoolingMaxGradient",
    "MPSCNNPooling",
    "MPSCNNPoolingAverage",
    "MPSCNNPoolingAverageGradient",
    "MPSCNNPoolingGradient",
    "MPSCNNPoolingL2Norm",
    "MPSCNNPoolingL2NormGradient",
    "MPSCNNPoolingMax",
    "MPSCNNPoolingMaxGradient",
]

#: the attribute a forward pooling encode sets on its gradient state: (zero_pad_size_x, _y)
_ZERO_PAD_ATTR = "pooling_zero_pad"
#: the attribute a graph's CPU max-pool forward sets on its gradient state: the
#: backend.MaxWinners of each region it pooled, which the gradient reuses where they fit
_WINNERS_ATTR = "pooling_max_winners"


# -- pure shape rules ---------------------------------------------------------------------------


def window_extent(kernel_size: int, dilation: int = 1) -> int:
    """``E = dilation·(kernel_size − 1) + 1``."""
    return dilation * (kernel_size - 1) + 1


def first_tap(centre: int, kernel_size: int, dilation: int = 1) -> int:
    """Source coordinate of a window's first tap: ``centre − floor(E/2)``."""
    return centre - (window_extent(kernel_size, dilation) >> 1)


def valid_size(source_size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Outputs whose windows lie inside the source (§2.2 'VALID'): ``(L − E)/s + 1``."""
    return dest_size(source_size, stride, window_extent(kernel_size, dilation), -1)


def gradient_origin(secondary_offset: int, kernel_size: int, dilation: int = 1) -> int:
    """``y0``: the forward-source pixel the gradient result's ``clip_rect.origin`` holds."""
    return max(0, first_tap(secondary_offset, kernel_size, dilation))


# -- validation ----------------------------------------------------------------------------------


def _positive(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise value_error(owner, name, value, "be an integer >= 1")
    return value


def _non_negative(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise value_error(owner, name, value, "be an integer >= 0")
    return value


def _window_args(owner: str, kernel_width: Any, kernel_height: Any) -> tuple[int, int]:
    if kernel_width is None or kernel_height is None:
        raise MPSTypeError(f"{owner}: `kernel_width` and `kernel_height` are required (init with a device alone is unavailable)")
    return _positive(owner, "kernel_width", kernel_width), _positive(owner, "kernel_height", kernel_height)


def _clamp_mode(owner: str, name: str, mode: MPSImageEdgeMode) -> bool:
    """True for clamp, False for zero; other edge modes are MPSNNPad's only."""
    if mode == MPSImageEdgeMode.zero:
        return False
    if mode == MPSImageEdgeMode.clamp:
        return True
    raise value_error(owner, name, MPSImageEdgeMode(mode).name, "be zero or clamp for pooling (mirror, mirrorWithEdge and constant are MPSNNPad's)")


class _ZeroPad:
    """``zero_pad_size_x`` / ``zero_pad_size_y`` (read-write, default 0) of the average kinds."""

    _zero_pad: list[int]

    def _init_zero_pad(self) -> None:
        self._zero_pad = [0, 0]

    @property
    def zero_pad_size_x(self) -> int:
        return self._zero_pad[0]

    @zero_pad_size_x.setter
    def zero_pad_size_x(self, value: int) -> None:
        self._zero_pad[0] = _non_negative(self._name(), "zero_pad_size_x", value)  # type: ignore[attr-defined]

    @property
    def zero_pad_size_y(self) -> int:
        return self._zero_pad[1]

    @zero_pad_size_y.setter
    def zero_pad_size_y(self, value: int) -> None:
        self._zero_pad[1] = _non_negative(self._name(), "zero_pad_size_y", value)  # type: ignore[attr-defined]


# -- forward ---------------------------------------------------------------------------------------


class MPSCNNPooling(MPSCNNKernel):
    """``MPSCNNPooling``: abstract base of the pooling kernels (use a subclass).

    Args:
        device: the device (positional, first).
        kernel_width, kernel_height: window size (>= 1, odd or even; required).
        stride_in_pixels_x, stride_in_pixels_y: window step (>= 1, default 1:
            ``initWithDevice:kernelWidth:kernelHeight:`` is the form without them).

    Read-only ``kernel_width``, ``kernel_height``, ``stride_in_pixels_x/_y``,
    ``dilation_rate_x/_y`` (1 here); the :class:`~mpsnn.MPSCNNKernel` properties (``offset``,
    ``clip_rect``, ``edge_mode`` default zero — only zero and clamp are valid — channel
    offsets, ``padding`` default ``alignCentered | addRemainderToTopLeft | sizeSame``,
    ``destination_image_allocator``) and all of its encode forms (explicit destination,
    auto-sized, ``encode_batch``, with result states for the gradient kernels).

    Shape: ``[N, H, W, C] -> [N, H', W', C]``; with the default padding
    ``H' = ceil(H / stride_in_pixels_y)``, ``W' = ceil(W / stride_in_pixels_x)``.
    ``initWithCoder:device:`` has no counterpart (mpsnn has no NSCoder); use ``copy()``.
    """

    _mode = ""

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1) -> None:
        if not type(self)._mode:
            raise MPSTypeError(f"{type(self).__name__}: abstract base class; use MPSCNNPoolingMax, MPSCNNPoolingAverage, "
                               "MPSCNNPoolingL2Norm or MPSCNNDilatedPoolingMax")
        MPSCNNKernel.__init__(self, device)
        owner = type(self).__name__
        self._kernel_width, self._kernel_height = _window_args(owner, kernel_width, kernel_height)
        self._stride_x = _positive(owner, "stride_in_pixels_x", stride_in_pixels_x)
        self._stride_y = _positive(owner, "stride_in_pixels_y", stride_in_pixels_y)

    def _zero_pads(self) -> tuple[int, int]:
        return 0, 0

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        _clamp_mode(self._name(), "edge_mode", self._edge_mode)  # refuse before anything is written
        super()._encode_checked(cb, src, dest, state)
        if state is not None:
            setattr(state, _ZERO_PAD_ATTR, self._zero_pads())

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        clamp = _clamp_mode(self._name(), "edge_mode", inp.edge_mode)
        zpx, zpy = self._zero_pads()
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels]
        ay = PoolAxis(src.height, region.height, inp.window_top, inp.stride_y, inp.dilation_y, inp.kernel_height, zpy)
        ax = PoolAxis(src.width, region.width, inp.window_left, inp.stride_x, inp.dilation_x, inp.kernel_width, zpx)
        out = direct_out(dest, region, (region.count, region.height, region.width, region.channels))
        write_result(dest, region, self._forward(x, ay, ax, clamp, result_dtype(dest), out, state))

    def _forward(self, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                 out: torch.Tensor | None, state: MPSState | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class MPSCNNPoolingMax(MPSCNNPooling):
    """``MPSCNNPoolingMax``: the maximum of each window.

    ``MPSCNNPoolingMax(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2,
    stride_in_pixels_y=2)`` (strides default 1). Off-image taps read 0 with edge mode zero
    (so 0 can win over negative data) and the nearest edge pixel with clamp (the same as
    restricting the window to the image). NaN taps are ignored (``fmax``; the spec leaves NaN
    open and recommends this reading); a window of NaNs only gives NaN. The result keeps the
    source's values exactly (no arithmetic). Other properties and encode forms: see
    :class:`MPSCNNPooling`.

    Example::

        pool = MPSCNNPoolingMax(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
        y = pool.encode(command_buffer, x)          # auto-sized: ceil(W/2) x ceil(H/2)
    """

    _mode = "max"

    #: set by the graph on the kernels it builds: a CPU forward encode with a gradient state
    #: leaves the winners of each window on the state (backend.MaxWinners), and the gradient
    #: kernel reuses them instead of pooling the source again, where they still fit (same
    #: memory, geometry and torch version count of the source). Only the graph sets it:
    #: between its forward and gradient encodes nothing writes the source, not even through
    #: a NumPy view (which torch's version count would not see)
    _keep_winners = False

    def _forward(self, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                 out: torch.Tensor | None, state: MPSState | None = None) -> torch.Tensor:
        if state is None or not self._keep_winners:
            return backend.max_pool_nhwc(x, ay, ax, clamp, out_dtype=out_dtype, out=out)
        y, winners = backend.max_pool_winners_nhwc(x, ay, ax, clamp, out_dtype, out)
        if winners is not None:
            kept = getattr(state, _WINNERS_ATTR, None)
            if kept is None:
                kept = []
                setattr(state, _WINNERS_ATTR, kept)
            kept.append(winners)
        return y


class MPSCNNPoolingAverage(_ZeroPad, MPSCNNPooling):
    """``MPSCNNPoolingAverage``: the mean of each window.

    ``MPSCNNPoolingAverage(device, kernel_width, kernel_height, stride_in_pixels_x=1,
    stride_in_pixels_y=1)``. Extra properties ``zero_pad_size_x``, ``zero_pad_size_y``
    (read-write, default 0 — inferred).

    Divisor: edge mode zero -> ``kernel_width·kernel_height`` (off-image taps count as
    zeros; ``zero_pad_size`` ignored). Edge mode clamp -> "shrink to edge": the number of
    taps inside the image widened by ``zero_pad_size_x`` columns on the left and on the right
    and ``zero_pad_size_y`` rows on top and bottom; 0 when the window holds no in-image pixel.
    ``zero_pad_size = 0`` with clamp is TensorFlow 'SAME' average pooling (the
    ``MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()`` policy sets clamp); the
    Caffe pad with clamp is Caffe's average pooling.

    ``excludeEdges`` padding bit (Caffe emulation, inferred equivalence of pooling.md §8):
    the auto-sized encode forms whose ``padding`` has it set ``edge_mode = clamp`` and
    ``zero_pad_size_x/_y`` = the symmetric padding the policy implies per axis, i.e.
    ``max(0, min(pad_before, pad_after))`` (an odd remainder pixel lies beyond the padding and
    is not counted); both stay set after the call, like ``offset``.
    Arithmetic in float32 (float64 images: float64), one rounding on store.
    """

    _mode = "average"

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1) -> None:
        super().__init__(device, kernel_width, kernel_height, stride_in_pixels_x, stride_in_pixels_y)
        self._init_zero_pad()

    def _zero_pads(self) -> tuple[int, int]:
        return self._zero_pad[0], self._zero_pad[1]

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        if method_of(self._padding) & int(MPSNNPaddingMethod.excludeEdges):
            src = source_images[0]
            pads = []
            for size, out, k, s, centre in ((src.width, desc.width, self._kernel_width, self._stride_x, self._offset.x),
                                             (src.height, desc.height, self._kernel_height, self._stride_y, self._offset.y)):
                before = -first_tap(centre, k)
                after = (out - 1) * s + k - size - before
                pads.append(max(0, min(before, after)))
            self._edge_mode = MPSImageEdgeMode.clamp
            self._zero_pad = pads
        return desc

    def _forward(self, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                 out: torch.Tensor | None, state: MPSState | None = None) -> torch.Tensor:
        return backend.average_pool_nhwc(x, ay, ax, clamp, out_dtype=out_dtype, out=out)


class MPSCNNPoolingL2Norm(MPSCNNPooling):
    """``MPSCNNPoolingL2Norm``: ``sqrt(Σ in²)`` over each window.

    ``MPSCNNPoolingL2Norm(device, kernel_width, kernel_height, stride_in_pixels_x=1,
    stride_in_pixels_y=1)``. Off-image taps read 0 (edge mode zero) or the nearest edge pixel
    (clamp: ordinary clamp reads; the spec documents the "shrink" reading only for average
    pooling — inferred). Arithmetic in float32 (float64 images: float64), so squares of
    float16 data do not overflow.
    """

    _mode = "l2"

    def _forward(self, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                 out: torch.Tensor | None, state: MPSState | None = None) -> torch.Tensor:
        return backend.l2norm_pool_nhwc(x, ay, ax, clamp, out_dtype=out_dtype, out=out)


class MPSCNNDilatedPoolingMax(MPSCNNPoolingMax):
    """``MPSCNNDilatedPoolingMax``: max pooling whose taps are ``dilation_rate`` pixels apart.

    ``MPSCNNDilatedPoolingMax(device, kernel_width, kernel_height, dilation_rate_x=1,
    dilation_rate_y=1, stride_in_pixels_x=1, stride_in_pixels_y=1)`` (Apple's order: dilation
    before stride; the base form without dilation gives dilation 1 — inferred). Read-only
    ``dilation_rate_x/_y``. Taps ``cx − floor(E/2) + D·k`` with ``E = D·(kw − 1) + 1``
    (inferred from the documented example kw = 2, D = 3 -> taps −2 and +1); the padding
    policies size the result with the dilated extent ``E``. Edge rules as
    :class:`MPSCNNPoolingMax`.
    """

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 dilation_rate_x: int = 1, dilation_rate_y: int = 1, stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1) -> None:
        super().__init__(device, kernel_width, kernel_height, stride_in_pixels_x, stride_in_pixels_y)
        self._dilation_x = _positive(type(self).__name__, "dilation_rate_x", dilation_rate_x)
        self._dilation_y = _positive(type(self).__name__, "dilation_rate_y", dilation_rate_y)


# -- gradients ---------------------------------------------------------------------------------------


def _class_names(classes: Sequence[type]) -> set[str]:
    names: set[str] = set()
    todo = list(classes)
    while todo:
        c = todo.pop()
        names.add(c.__name__)
        todo.extend(c.__subclasses__())
    return names


class MPSCNNPoolingGradient(MPSCNNGradientKernel):
    """``MPSCNNPoolingGradient``: abstract base of the pooling gradient kernels (use a subclass).

    Args:
        device: the device (positional, first).
        kernel_width, kernel_height: the forward window size (required).
        stride_in_pixels_x, stride_in_pixels_y: the forward strides (default 1, inferred).

    Properties: read-only ``kernel_width``, ``kernel_height``, ``stride_in_pixels_x/_y``,
    ``dilation_rate_x/_y`` (the same values as ``secondary_kernel_width`` ...,
    ``secondary_stride_in_pixels_x`` ...: the window walks the secondary image);
    ``source_size`` (:class:`~mpsnn.MTLSize`, read-write, default all ``ULONG_MAX``: "to the
    end of the gradient image"); and from :class:`~mpsnn.MPSCNNGradientKernel`
    ``primary_offset`` (first contributing gradient pixel), ``secondary_offset`` (centre of
    the first forward window in the forward source), ``secondary_edge_mode`` (the forward
    edge mode: zero or clamp), ``clip_rect`` (where the result is written), channel offsets.

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    gradient_states[, destination_gradients])``; ``source_image`` is the forward *input*
    (the average gradient reads only its size). See the module docstring for the math.

    With the forward encode's ``gradient_state`` the kernel takes the forward geometry
    (these properties stay set after the call): ``primary_offset = forward clip_rect.origin``,
    ``source_size = forward clip_rect.size``, ``secondary_offset = forward offset``,
    ``secondary_edge_mode = forward edge_mode``, the forward channel windows, for the average
    gradient ``zero_pad_size_x/_y`` = the forward ones, and ``clip_rect`` starting at ``y0``
    (``max(0, offset − floor(E/2))`` per axis) so that result pixel ``y`` is the gradient of
    forward-source pixel ``y``; the result is the forward source's size and every pixel of it
    in the forward channel window is written (0 where no window reads it). The state must
    come from the matching forward class with the same kernel size, strides and dilation,
    else :class:`~mpsnn.MPSValueError`. With ``gradient_state=None`` the properties are used
    as set and an auto-sized result has the source image's size.
    """

    _forward_classes: tuple[type, ...] = ()

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1, *, _dilation: tuple[int, int] = (1, 1)) -> None:
        if not type(self)._forward_classes:
            raise MPSTypeError(f"{type(self).__name__}: abstract base class; use MPSCNNPoolingMaxGradient, MPSCNNPoolingAverageGradient, "
                               "MPSCNNPoolingL2NormGradient or MPSCNNDilatedPoolingMaxGradient")
        MPSCNNGradientKernel.__init__(self, device)
        owner = type(self).__name__
        self._secondary_kernel = _window_args(owner, kernel_width, kernel_height)
        self._s_stride = [_positive(owner, "stride_in_pixels_x", stride_in_pixels_x), _positive(owner, "stride_in_pixels_y", stride_in_pixels_y)]
        self._secondary_dilation = (_positive(owner, "dilation_rate_x", _dilation[0]), _positive(owner, "dilation_rate_y", _dilation[1]))
        self._source_size = MTLSize(ULONG_MAX, ULONG_MAX, ULONG_MAX)

    kernel_width = property(lambda self: self._secondary_kernel[0])
    kernel_height = property(lambda self: self._secondary_kernel[1])
    stride_in_pixels_x = property(lambda self: self._s_stride[0])
    stride_in_pixels_y = property(lambda self: self._s_stride[1])
    dilation_rate_x = property(lambda self: self._secondary_dilation[0])
    dilation_rate_y = property(lambda self: self._secondary_dilation[1])

    @property
    def source_size(self) -> MTLSize:
        return self._source_size

    @source_size.setter
    def source_size(self, value: MTLSize) -> None:
        if not isinstance(value, MTLSize):
            raise MPSTypeError(f"{self._name()}: `source_size` must be an MTLSize, but got {type(value).__name__}")
        for name in ("width", "height", "depth"):
            _non_negative(self._name(), f"source_size.{name}", getattr(value, name))
        self._source_size = value

    def _zero_pads(self) -> tuple[int, int]:
        return 0, 0

    def _take_zero_pads(self, pads: tuple[int, int]) -> None:
        """The forward kernel's zero-pad sizes, from its gradient state (average only)."""

    # -- the forward geometry from the gradient state --------------------------------------------
    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        allowed = _class_names(self._forward_classes)
        mine = (self.kernel_width, self.kernel_height, self.stride_in_pixels_x, self.stride_in_pixels_y, self.dilation_rate_x, self.dilation_rate_y)
        theirs = (g.kernel_width, g.kernel_height, g.stride_in_pixels_x, g.stride_in_pixels_y, g.dilation_rate_x, g.dilation_rate_y)
        if g.kernel_class not in allowed or mine != theirs:
            raise value_error(self._name(), "gradient_state", f"a state of {g.kernel_class} with kernel {theirs[0]}x{theirs[1]}, "
                              f"stride {theirs[2]}x{theirs[3]}, dilation {theirs[4]}x{theirs[5]}",
                              f"come from a forward {' or '.join(c.__name__ for c in self._forward_classes)} encode with this kernel's "
                              f"kernel {mine[0]}x{mine[1]}, stride {mine[2]}x{mine[3]}, dilation {mine[4]}x{mine[5]}")
        super().apply_forward_geometry(g)  # channel windows
        c = g.clip_rect
        self._p_offset = MPSOffset(c.origin.x, c.origin.y, 0)
        self._source_size = MTLSize(c.size.width, c.size.height, c.size.depth)
        self._s_offset = MPSOffset(g.offset.x, g.offset.y, 0)
        self._s_edge = g.edge_mode
        pads = getattr(self._gradient_state, _ZERO_PAD_ATTR, None)
        if pads is not None:
            self._take_zero_pads(pads)
        self._clip_rect = MTLRegion(MTLOrigin(gradient_origin(g.offset.x, g.kernel_width, g.dilation_rate_x),
                                              gradient_origin(g.offset.y, g.kernel_height, g.dilation_rate_y), 0),
                                    MTLSize(ULONG_MAX, ULONG_MAX, ULONG_MAX))

    # -- sizes and channels --------------------------------------------------------------------
    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image (pooling keeps channels apart)")
        return primary_channels

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        sec = source_images[1]
        desc = desc.copy()
        desc.width, desc.height = sec.width, sec.height  # the forward source's size
        return desc

    # -- encode --------------------------------------------------------------------------------------
    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        _clamp_mode(self._name(), "secondary_edge_mode", self._s_edge)  # refuse before anything is written
        super()._encode_checked(cb, prim, sec, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, prim: MPSImage, pg: InputGeometry, sec: MPSImage, sg: InputGeometry,
                       dest: MPSImage, region: Region, state: MPSState | None) -> None:
        clamp = _clamp_mode(self._name(), "secondary_edge_mode", self._s_edge)
        (kw, kh), (dlx, dly), (sx, sy) = self._secondary_kernel, self._secondary_dilation, self._s_stride
        zpx, zpy = self._zero_pads()
        count, nch = region.count, region.channels
        po, so, ss = self._p_offset, self._s_offset, self._source_size
        a0x, a1x = max(po.x, 0), min(po.x + ss.width, prim.width)
        a0y, a1y = max(po.y, 0), min(po.y + ss.height, prim.height)
        x = sec.tensor[sg.n0:sg.n0 + count, :, :, sg.c0:sg.c0 + nch]
        if a1x > a0x and a1y > a0y:
            g = prim.tensor[pg.n0:pg.n0 + count, a0y:a1y, a0x:a1x, pg.c0:pg.c0 + nch]
            ax = PoolAxis(sec.width, a1x - a0x, first_tap(so.x + sx * (a0x - po.x), kw, dlx), sx, dlx, kw, zpx)
            ay = PoolAxis(sec.height, a1y - a0y, first_tap(so.y + sy * (a0y - po.y), kh, dly), sy, dly, kh, zpy)
            y0x, y0y = gradient_origin(so.x, kw, dlx), gradient_origin(so.y, kh, dly)
            identity = (y0x + region.x0 - self._clip_rect.origin.x, y0y + region.y0 - self._clip_rect.origin.y) == (0, 0) \
                and (region.width, region.height) == (sec.width, sec.height)
            out = direct_out(dest, region, tuple(x.shape)) if identity else None
            dx = self._gradient(g, x, ay, ax, clamp, result_dtype(dest), out)
        else:  # no gradient pixel contributes
            dx = torch.zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        y0x, y0y = gradient_origin(so.x, kw, dlx), gradient_origin(so.y, kh, dly)
        cx, cy = self._clip_rect.origin.x, self._clip_rect.origin.y
        out = read_window(dx, y0x + region.x0 - cx, y0y + region.y0 - cy, region.width, region.height, MPSImageEdgeMode.zero)
        write_result(dest, region, out)
        if self._forward is not None:
            # the state made the result the forward source's size: the rows / columns before
            # the clip origin y0 are read by no window and get 0 as well
            n_, c_ = slice(region.n0, region.n0 + count), slice(region.c0, region.c0 + nch)
            if cy > 0:
                dest.tensor[n_, :min(cy, dest.height), :, c_] = 0
            if cx > 0:
                dest.tensor[n_, :, :min(cx, dest.width), c_] = 0

    def _gradient(self, g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                  out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class MPSCNNPoolingMaxGradient(MPSCNNPoolingGradient):
    """``MPSCNNPoolingMaxGradient``: each window's incoming gradient goes to the position of
    its maximum, recomputed from ``source_image`` (the forward input).

    ``MPSCNNPoolingMaxGradient(device, kernel_width, kernel_height, stride_in_pixels_x=1,
    stride_in_pixels_y=1)``. Ties: the first maximal tap in scan order (rows top to bottom,
    each left to right; Apple leaves the choice to the implementation — the spec's pick).
    Edge mode zero: a winning off-image zero drops that window's gradient; clamp: a winning
    off-image tap passes it to the edge pixel it read; NaN taps never win, an all-NaN window
    passes nothing (all inferred). Takes states of :class:`MPSCNNPoolingMax` (and of
    :class:`MPSCNNDilatedPoolingMax` with dilation 1). Gradients summed in float32. See
    :class:`MPSCNNPoolingGradient` for properties and encode forms.
    """

    _forward_classes = (MPSCNNPoolingMax,)

    def _gradient(self, g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                  out: torch.Tensor | None) -> torch.Tensor:
        found = [w for w in getattr(self._gradient_state, _WINNERS_ATTR, ()) if w.fits(x, ay, ax, clamp)]
        return backend.max_pool_gradient_nhwc(g, x, ay, ax, clamp, out_dtype=out_dtype, out=out, winners=found[0] if found else None)


class MPSCNNPoolingAverageGradient(_ZeroPad, MPSCNNPoolingGradient):
    """``MPSCNNPoolingAverageGradient``: every in-image tap of window ``p`` receives
    ``g(p)/N(p)`` with ``N`` the forward divisor (``kw·kh`` for edge mode zero, the shrunk
    count with ``zero_pad_size_x/_y`` for clamp).

    ``MPSCNNPoolingAverageGradient(device, kernel_width, kernel_height, stride_in_pixels_x=1,
    stride_in_pixels_y=1)``; ``zero_pad_size_x``, ``zero_pad_size_y`` read-write, default 0,
    taken from the forward kernel when a gradient state is given. ``source_image`` supplies
    only the size (any image of the forward source's size works, e.g. a temporary). See
    :class:`MPSCNNPoolingGradient` for properties and encode forms.
    """

    _forward_classes = (MPSCNNPoolingAverage,)

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1) -> None:
        super().__init__(device, kernel_width, kernel_height, stride_in_pixels_x, stride_in_pixels_y)
        self._init_zero_pad()

    def _zero_pads(self) -> tuple[int, int]:
        return self._zero_pad[0], self._zero_pad[1]

    def _take_zero_pads(self, pads: tuple[int, int]) -> None:
        self._zero_pad = [pads[0], pads[1]]

    def _gradient(self, g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                  out: torch.Tensor | None) -> torch.Tensor:
        return backend.average_pool_gradient_nhwc(g, ay, ax, clamp, out_dtype=out_dtype, out=out)


class MPSCNNPoolingL2NormGradient(MPSCNNPoolingGradient):
    """``MPSCNNPoolingL2NormGradient``: ``∂out(p)/∂in(y) = in(y)/out(p)`` for each tap of
    window ``p`` that reads ``y`` (accumulated over taps and windows; 0 where ``out(p) = 0``,
    inferred), recomputing ``out`` from ``source_image``.

    ``MPSCNNPoolingL2NormGradient(device, kernel_width, kernel_height, stride_in_pixels_x=1,
    stride_in_pixels_y=1)``. See :class:`MPSCNNPoolingGradient` for properties and encode forms.
    """

    _forward_classes = (MPSCNNPoolingL2Norm,)

    def _gradient(self, g: torch.Tensor, x: torch.Tensor, ay: PoolAxis, ax: PoolAxis, clamp: bool, out_dtype: torch.dtype | None,
                  out: torch.Tensor | None) -> torch.Tensor:
        return backend.l2norm_pool_gradient_nhwc(g, x, ay, ax, clamp)


class MPSCNNDilatedPoolingMaxGradient(MPSCNNPoolingMaxGradient):
    """``MPSCNNDilatedPoolingMaxGradient``: the max-pool gradient with dilated taps.

    ``MPSCNNDilatedPoolingMaxGradient(device, kernel_width, kernel_height, dilation_rate_x,
    dilation_rate_y, stride_in_pixels_x, stride_in_pixels_y)`` (dilation before stride). The
    form with strides but without dilation rates is unavailable (:class:`~mpsnn.MPSTypeError`);
    ``(device, kernel_width, kernel_height)`` alone gives dilation and strides 1. Read-only
    ``dilation_rate_x/_y``. Rules as :class:`MPSCNNPoolingMaxGradient`.
    """

    _forward_classes = (MPSCNNPoolingMax,)

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None,
                 dilation_rate_x: int | None = None, dilation_rate_y: int | None = None,
                 stride_in_pixels_x: int | None = None, stride_in_pixels_y: int | None = None) -> None:
        if (dilation_rate_x is None or dilation_rate_y is None) and (stride_in_pixels_x is not None or stride_in_pixels_y is not None
                                                                     or dilation_rate_x is not None or dilation_rate_y is not None):
            raise MPSTypeError(f"{type(self).__name__}: give both `dilation_rate_x` and `dilation_rate_y` (the initializer with "
                               "strides but without dilation rates is unavailable)")
        MPSCNNPoolingGradient.__init__(self, device, kernel_width, kernel_height,
                                       1 if stride_in_pixels_x is None else stride_in_pixels_x,
                                       1 if stride_in_pixels_y is None else stride_in_pixels_y,
                                       _dilation=(1 if dilation_rate_x is None else dilation_rate_x, 1 if dilation_rate_y is None else dilation_rate_y))
