"""Local-response normalizations: MPSCNNCrossChannelNormalization,
MPSCNNSpatialNormalization, MPSCNNLocalContrastNormalization and their gradients
(spec/normalization.md §2).

Math (``X`` the source read through the kernel's channel window, ``D`` the number of
channels processed, ``n = kernel_width·kernel_height``)::

    cross-channel   L(k) = delta + (alpha/N)·Σ_{q∈Q(k)} X_q²,   Q(k) = [k − N//2, k + (N−1)//2] ∩ [0, D)
                    Y_k = X_k · L(k)^−beta                                    (N = kernel_size)
    spatial         T(p) = delta + (alpha/n)·Σ_{q∈W(p)} X_q²,  Y_p = X_p · T(p)^−beta
    local contrast  M(p) = Σ_{q∈W(p)} X_q / n,  V(p) = Σ_{q∈W(p)} X_q² / n − M(p)²,
                    T(p) = delta + alpha·V(p),  Y_p = pm + ps·(X_p − p0·M(p))·T(p)^−beta

``W(p)`` is the window of the coordinate rule (kernel-base.md §2.2): columns
``[px − kw//2, px + (kw−1)//2]``, rows alike, centred on the source pixel ``p`` that the
destination pixel maps to (``offset`` + position in ``clip_rect``). Conventions:

* The divisors are fixed: ``N`` even where ``Q(k)`` is clipped at the channel ends, ``n``
  even where the window leaves the image (spec §1, inferred).
* Off-image taps (and off-image centres, reachable through ``offset``) read 0 with edge mode
  zero (the default) and the nearest edge pixel with clamp; other edge modes are refused.
* ``D`` is the number of channels processed, ``Nin = min(source_feature_channel_max_count,
  feature_channels − source_feature_channel_offset)`` (spec "real channel count", inferred).
* A zero or negative ``L`` / ``T`` gives whatever ``pow`` gives (inf / NaN; the spec leaves
  it to the caller).
* Arithmetic is float32 (float64 for float64 images); one rounding on store.

Gradients are the EXACT derivatives of these forward functions. The spec flags Apple's header
formulas as wrong (the cross-channel one omits ``1/N``, the spatial one evaluates ``T`` at
``p`` and omits ``1/n``, the local-contrast one is garbled) and makes the exact derivative
normative; there is no flag for the header variants. In spec notation, with the transposed
windows ``R(k) = [k − (N−1)//2, k + N//2]`` and ``W^T(p)``::

    dX_k = dY_k·L(k)^−beta − (2·alpha·beta/N)·X_k·Σ_{r∈R(k)} dY_r·X_r·L(r)^(−beta−1)
    dX_p = dY_p·T(p)^−beta − (2·alpha·beta/n)·X_p·Σ_{q∈W^T(p)} dY_q·X_q·T(q)^(−beta−1)
    dX_p = ps·[dY_p·T(p)^−beta − Σ_{q∈W^T(p)} dY_q·T(q)^−beta·(p0/n + (2·alpha·beta/n)·(X_q − p0·M(q))·(X_p − M(q))/T(q))]

(plus, with edge mode clamp, the derivative through the edge pixels that off-image taps
alias: the computed gradient is the adjoint of the forward exactly as it reads the source).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..backends import local_normalization as backend
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSState
from .results import write_result

__all__ = [
    "MPSCNNCrossChannelNormalization",
    "MPSCNNCrossChannelNormalizationGradient",
    "MPSCNNLocalContrastNormalization",
    "MPSCNNLocalContrastNormalizationGradient",
    "MPSCNNSpatialNormalization",
    "MPSCNNSpatialNormalizationGradient",
]

#: the attribute a forward encode sets on its gradient state: the forward's parameters
_PARAMS_ATTR = "local_normalization_parameters"


# -- pure shape rules -------------------------------------------------------------------------------


def channel_window(k: int, kernel_size: int, channels: int) -> tuple[int, int]:
    """``Q(k)`` as an inclusive range ``[first, last]``, clipped to ``[0, channels)``."""
    return max(0, k - kernel_size // 2), min(channels - 1, k + (kernel_size - 1) // 2)


def transposed_channel_window(k: int, kernel_size: int, channels: int) -> tuple[int, int]:
    """``R(k) = {r : k ∈ Q(r)}`` as an inclusive range, clipped to ``[0, channels)``."""
    return max(0, k - (kernel_size - 1) // 2), min(channels - 1, k + kernel_size // 2)


def spatial_window(centre: int, kernel_size: int) -> tuple[int, int]:
    """One axis of ``W(p)``: ``[centre − k//2, centre + (k−1)//2]`` (inclusive, unclipped)."""
    return centre - kernel_size // 2, centre + (kernel_size - 1) // 2


# -- validation -------------------------------------------------------------------------------------


def _float_param(owner: str, name: str, value: Any, non_negative: bool = False) -> float:
    """A ``float`` property: a finite real number, stored rounded to float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise value_error(owner, name, value, "be a real number", type(value).__name__)
    v = float(value)
    if not math.isfinite(v):
        raise value_error(owner, name, value, "be a finite real number")
    if non_negative and v < 0:
        raise value_error(owner, name, value, "be >= 0")
    with np.errstate(over="ignore"):
        v32 = float(np.float32(v))
    if not math.isfinite(v32):
        raise value_error(owner, name, value, "fit in a float32")
    return v32


def _size_param(owner: str, name: str, value: Any) -> int:
    if value is None:
        raise MPSTypeError(f"{owner}: `{name}` is required (init with a device alone is unavailable)")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise value_error(owner, name, value, "be an integer >= 1")
    return int(value)


def _square_window(owner: str, kernel_width: Any, kernel_height: Any) -> tuple[int, int]:
    kw, kh = _size_param(owner, "kernel_width", kernel_width), _size_param(owner, "kernel_height", kernel_height)
    if kw != kh:
        raise value_error(owner, "kernel_height", kh, f"equal kernel_width={kw} (Apple: 'for now kernelWidth must be equal to kernelHeight')")
    return kw, kh


def _is_clamp(owner: str, name: str, mode: MPSImageEdgeMode) -> bool:
    if mode == MPSImageEdgeMode.zero:
        return False
    if mode == MPSImageEdgeMode.clamp:
        return True
    raise value_error(owner, name, MPSImageEdgeMode(mode).name, "be zero or clamp (mirror, mirrorWithEdge and constant are MPSNNPad's)")


def _param_property(name: str, non_negative: bool = False) -> property:
    attr = "_" + name

    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        setattr(self, attr, _float_param(self._name(), name, value, non_negative))
    return property(get, set_, doc=f"``{name}`` (float32, read-write)")


class _Parameters:
    """The float parameters of a family; ``_DEFAULTS`` lists them in order with defaults."""

    _DEFAULTS: tuple[tuple[str, float], ...] = ()
    _NON_NEGATIVE: frozenset[str] = frozenset()
    _family = ""
    _alpha: float
    _beta: float
    _delta: float
    _p0: float
    _pm: float
    _ps: float

    def _init_parameters(self, values: dict[str, Any]) -> None:
        for name, default in self._DEFAULTS:
            v = values.get(name)
            setattr(self, "_" + name, _float_param(type(self).__name__, name, default if v is None else v, name in self._NON_NEGATIVE))

    def _window(self) -> tuple[int, int]:
        raise NotImplementedError  # pragma: no cover

    def _parameters(self) -> tuple[Any, ...]:
        """What must agree between a forward encode and its gradient kernel."""
        return (self._family, self._window(), *(getattr(self, "_" + name) for name, _ in self._DEFAULTS))

    def _parameter_text(self, params: tuple[Any, ...]) -> str:
        names = ["window", *(n for n, _ in self._DEFAULTS)]
        return ", ".join(f"{n}={v!r}" for n, v in zip(names, params[1:]))


_LRN_DEFAULTS = (("alpha", 1.0), ("beta", 5.0), ("delta", 1.0))
_LCN_DEFAULTS = (("alpha", 0.0), ("beta", 0.5), ("delta", 1.0 / 1024.0), ("p0", 1.0), ("pm", 0.0), ("ps", 1.0))


# -- forward ----------------------------------------------------------------------------------------


class _LocalNormalization(_Parameters, MPSCNNKernel):
    """Shared encode of the three forward kernels."""

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        _is_clamp(self._name(), "edge_mode", self._edge_mode)  # refuse before anything is written
        super()._encode_checked(cb, src, dest, state)
        if state is not None:
            setattr(state, _PARAMS_ATTR, self._parameters())

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        kw, kh = self._window()
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels]
        block = read_window(x, inp.cx0 - kw // 2, inp.cy0 - kh // 2, region.width + kw - 1, region.height + kh - 1, inp.edge_mode)
        write_result(dest, region, self._forward(block))

    def _forward(self, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class MPSCNNCrossChannelNormalization(_LocalNormalization):
    """``MPSCNNCrossChannelNormalization``: local response normalization across feature channels.

    Args:
        device: the device (positional, first).
        kernel_size: ``N``, the number of channels in the window (integer >= 1, required:
            ``initWithDevice:kernelSize:``; ``initWithDevice:`` is unavailable and raises
            :class:`~mpsnn.MPSTypeError`. Apple's "default 5" applies to graph nodes only.)
        alpha, beta, delta: optional keyword conveniences setting the properties below.

    Properties: ``alpha`` (default 1.0, must be >= 0), ``beta`` (5.0), ``delta`` (1.0),
    read-write, stored as float32; ``kernel_size`` read-only. The spatial window is 1x1
    (``kernel_width = kernel_height = 1``); all :class:`~mpsnn.MPSCNNKernel` properties
    (``offset``, ``clip_rect``, channel offsets and max count, ``edge_mode`` zero or clamp,
    ``padding``, ``destination_image_allocator``) and encode forms (explicit destination,
    auto-sized, ``encode_batch``, with result states for
    :class:`MPSCNNCrossChannelNormalizationGradient`).

    Math, per pixel: ``Y_k = X_k · (delta + (alpha/N)·Σ_{q∈Q(k)} X_q²)^−beta`` with
    ``Q(k) = [max(0, k − N//2), min(D − 1, k + (N−1)//2)]`` (even ``N`` reach one channel
    further down), the divisor ``N`` even where ``Q`` is clipped, ``D`` the channels processed
    (inferred). Shape: ``[N, H, W, C] -> [N, H, W, C]``.
    ``initWithCoder:device:`` has no counterpart (mpsnn has no NSCoder); use ``copy()``.

    Example::

        lrn = MPSCNNCrossChannelNormalization(device, kernel_size=5)
        lrn.alpha, lrn.beta, lrn.delta = 1e-4, 0.75, 1.0
        y = lrn.encode(command_buffer, x)
    """

    _DEFAULTS = _LRN_DEFAULTS
    _NON_NEGATIVE = frozenset({"alpha"})
    _family = "cross_channel"

    def __init__(self, device: Device | str, kernel_size: int | None = None, *, alpha: float | None = None,
                 beta: float | None = None, delta: float | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        self._kernel_size = _size_param(type(self).__name__, "kernel_size", kernel_size)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta})

    alpha = _param_property("alpha", non_negative=True)
    beta = _param_property("beta")
    delta = _param_property("delta")
    kernel_size = property(lambda self: self._kernel_size, doc="``kernelSize``: channels in the window (read-only)")

    def _window(self) -> tuple[int, int]:
        return 1, 1

    def _parameters(self) -> tuple[Any, ...]:
        return (self._family, self._kernel_size, self._alpha, self._beta, self._delta)

    def _parameter_text(self, params: tuple[Any, ...]) -> str:
        return ", ".join(f"{n}={v!r}" for n, v in zip(("kernel_size", "alpha", "beta", "delta"), params[1:]))

    def _forward(self, block: torch.Tensor) -> torch.Tensor:
        return backend.cross_channel_normalization_nhwc(block, self._kernel_size, self._alpha, self._beta, self._delta)


class MPSCNNSpatialNormalization(_LocalNormalization):
    """``MPSCNNSpatialNormalization``: each channel divided by a power of its local energy.

    Args:
        device: the device (positional, first).
        kernel_width, kernel_height: the window (integers >= 1, required,
            ``initWithDevice:kernelWidth:kernelHeight:``). Apple: "for now kernelWidth must
            be equal to kernelHeight" — unequal sizes raise :class:`~mpsnn.MPSValueError`.
        alpha, beta, delta: optional keyword conveniences setting the properties below.

    Properties: ``alpha`` (default 1.0, must be >= 0), ``beta`` (5.0), ``delta`` (1.0),
    read-write, float32; read-only ``kernel_width``, ``kernel_height`` (stride and dilation
    1); the :class:`~mpsnn.MPSCNNKernel` properties (``edge_mode`` zero or clamp) and all its
    encode forms; result states feed :class:`MPSCNNSpatialNormalizationGradient`.

    Math, per channel: ``Y_p = X_p · (delta + (alpha/(kw·kh))·Σ_{q∈W(p)} X_q²)^−beta`` with
    ``W(p)`` columns ``[px − kw//2, px + (kw−1)//2]`` and rows alike (pooling's centring,
    inferred from the transposed window the spec gives for the gradient); off-image taps read
    0 (zero) or the edge pixel (clamp) and the divisor stays ``kw·kh`` (inferred). Shape: the
    destination region's size, the source's channels (default padding: the source's size).
    """

    _DEFAULTS = _LRN_DEFAULTS
    _NON_NEGATIVE = frozenset({"alpha"})
    _family = "spatial"

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None, *,
                 alpha: float | None = None, beta: float | None = None, delta: float | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        self._kernel_width, self._kernel_height = _square_window(type(self).__name__, kernel_width, kernel_height)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta})

    alpha = _param_property("alpha", non_negative=True)
    beta = _param_property("beta")
    delta = _param_property("delta")

    def _window(self) -> tuple[int, int]:
        return self._kernel_width, self._kernel_height

    def _forward(self, block: torch.Tensor) -> torch.Tensor:
        return backend.spatial_normalization_nhwc(block, self._kernel_width, self._kernel_height, self._alpha, self._beta, self._delta)


class MPSCNNLocalContrastNormalization(_LocalNormalization):
    """``MPSCNNLocalContrastNormalization``: subtract the local mean, divide by a power of the
    local variance, then scale and shift.

    Args:
        device: the device (positional, first).
        kernel_width, kernel_height: the window (integers >= 1, required, equal — Apple's
            "for now" rule; unequal sizes raise :class:`~mpsnn.MPSValueError`).
        alpha, beta, delta, p0, pm, ps: optional keyword conveniences for the properties.

    Properties (read-write, float32): ``alpha`` default **0.0** (the current header's
    "backward compatibility" value; spec CONFLICT — the iOS 10 header said 1.0 and the graph
    node uses 1.0; the kernel follows the spec's recommendation 0.0, which makes the filter a
    pure local mean subtraction), ``beta`` 0.5, ``delta`` 1/1024, ``p0`` 1.0, ``pm`` 0.0,
    ``ps`` 1.0; read-only ``kernel_width``, ``kernel_height``. ``alpha`` may be negative
    (Apple states no range for this class). Plus the :class:`~mpsnn.MPSCNNKernel` properties
    and encode forms; result states feed :class:`MPSCNNLocalContrastNormalizationGradient`.

    Math, per channel, ``n = kw·kh``, window ``W(p)`` as :class:`MPSCNNSpatialNormalization`:
    ``M = Σ X / n``, ``V = Σ X² / n − M²`` (biased; off-image taps count as 0 with edge mode
    zero but ``n`` stays ``kw·kh`` — inferred), ``T = delta + alpha·V``,
    ``Y_p = pm + ps·(X_p − p0·M(p))·T(p)^−beta``. With pm=0, ps=1, p0=1, delta=0, alpha=1,
    beta=0.5 each window gets zero mean and unit variance.
    """

    _DEFAULTS = _LCN_DEFAULTS
    _family = "local_contrast"

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None, *,
                 alpha: float | None = None, beta: float | None = None, delta: float | None = None,
                 p0: float | None = None, pm: float | None = None, ps: float | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        self._kernel_width, self._kernel_height = _square_window(type(self).__name__, kernel_width, kernel_height)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta, "p0": p0, "pm": pm, "ps": ps})

    alpha = _param_property("alpha")
    beta = _param_property("beta")
    delta = _param_property("delta")
    p0 = _param_property("p0")
    pm = _param_property("pm")
    ps = _param_property("ps")

    def _window(self) -> tuple[int, int]:
        return self._kernel_width, self._kernel_height

    def _forward(self, block: torch.Tensor) -> torch.Tensor:
        return backend.local_contrast_normalization_nhwc(block, self._kernel_width, self._kernel_height, self._alpha, self._beta,
                                                         self._delta, self._p0, self._pm, self._ps)


# -- gradients --------------------------------------------------------------------------------------


class _LocalNormalizationGradient(_Parameters, MPSCNNGradientKernel):
    """Shared geometry of the three gradient kernels (documented on each class)."""

    _forward_class: type = _LocalNormalization

    def _window(self) -> tuple[int, int]:
        return self._secondary_kernel

    kernel_width = property(lambda self: self._secondary_kernel[0], doc="window width (read-only)")
    kernel_height = property(lambda self: self._secondary_kernel[1], doc="window height (read-only)")

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        """Take the forward geometry from its gradient state (the base rule: result pixel
        ``p`` is forward-source pixel ``p``, the incoming gradient is read where the forward
        wrote) plus the forward ``edge_mode``; refuse a state of another kernel or of a
        forward kernel configured differently."""
        theirs = getattr(self._gradient_state, _PARAMS_ATTR, None)
        mine = self._parameters()
        fwd = self._forward_class.__name__
        if theirs is None or theirs[0] != mine[0]:
            raise value_error(self._name(), "gradient_state", f"a state of {g.kernel_class}", f"come from a forward {fwd} encode")
        if theirs != mine:
            raise value_error(self._name(), "gradient_state", f"a {fwd} state with {self._parameter_text(theirs)}",
                              f"match this kernel's {self._parameter_text(mine)} (a gradient kernel needs exactly the forward parameters)")
        super().apply_forward_geometry(g)
        self._s_edge = g.edge_mode

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image (the forward source)")
        return primary_channels

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        sec = source_images[1]
        desc = desc.copy()
        desc.width, desc.height = sec.width, sec.height  # dL/dX has the forward source's size
        return desc

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        # refuse before anything is written
        _is_clamp(self._name(), "secondary_edge_mode", self._s_edge)
        if self._p_edge != MPSImageEdgeMode.zero:
            raise value_error(self._name(), "primary_edge_mode", MPSImageEdgeMode(self._p_edge).name,
                              "be zero (the incoming gradient is 0 outside its image)")
        for name, value in (("primary_stride_in_pixels_x", self._p_stride[0]), ("primary_stride_in_pixels_y", self._p_stride[1]),
                            ("secondary_stride_in_pixels_x", self._s_stride[0]), ("secondary_stride_in_pixels_y", self._s_stride[1])):
            if value != 1:
                raise value_error(self._name(), name, value, "be 1 (the forward kernel has unit stride)")
        super()._encode_checked(cb, prim, sec, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, prim: MPSImage, pg: InputGeometry, sec: MPSImage, sg: InputGeometry,
                       dest: MPSImage, region: Region, state: MPSState | None) -> None:
        kw, kh = self._window()
        clamp = _is_clamp(self._name(), "secondary_edge_mode", self._s_edge)
        count, nch = region.count, region.channels
        g_all = prim.tensor[pg.n0:pg.n0 + count, :, :, pg.c0:pg.c0 + nch]
        x_all = sec.tensor[sg.n0:sg.n0 + count, :, :, sg.c0:sg.c0 + nch]
        # incoming-gradient pixels that count (inside its image and the forward-written region)
        xl, xh, yl, yh = pg.bounds if pg.bounds is not None else (0, prim.width, 0, prim.height)
        xl, yl, xh, yh = max(xl, 0), max(yl, 0), min(xh, prim.width), min(yh, prim.height)
        if xh > xl and yh > yl:
            # gradient pixel (gx, gy) is the forward output centred at source pixel
            # (gx, gy) − primary position + secondary position (both at the region's start)
            left = xl + sg.cx0 - pg.cx0 - kw // 2
            top = yl + sg.cy0 - pg.cy0 - kh // 2
            block = read_window(x_all, left, top, xh - xl + kw - 1, yh - yl + kh - 1, self._s_edge)
            dblock = self._gradient(g_all[:, yl:yh, xl:xh, :], block)
            dx = backend.fold_block(dblock, left, top, sec.height, sec.width, clamp)
        else:  # no incoming gradient pixel contributes
            dt = torch.float64 if torch.float64 in (prim.dtype, sec.dtype) else torch.float32
            dx = torch.zeros((count, sec.height, sec.width, nch), dtype=dt, device=x_all.device)
        write_result(dest, region, read_window(dx, sg.cx0, sg.cy0, region.width, region.height, MPSImageEdgeMode.zero))

    def _gradient(self, dy: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


_GRADIENT_DOC = """

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    gradient_states[, destination_gradients])``: ``source_gradient`` is ``dY = dL/dY``,
    ``source_image`` the forward **source** ``X``, ``gradient_state`` the forward encode's state.
    With the state the result has the forward source's size, result pixel ``p`` holds
    ``dL/dX_p`` over the forward channel window (other channels of a result the kernel
    allocates are 0), incoming-gradient pixels the forward pass did not write count as 0, and
    ``secondary_edge_mode`` becomes the forward ``edge_mode`` (these stay set after the call).
    The state must come from the matching forward class configured with the same window and
    parameters, else :class:`~mpsnn.MPSValueError` (the spec: "gradient kernels must be
    configured with exactly the forward parameters").

    Without a state (``gradient_state=None``) the kernel's own properties are used: result
    pixel ``clip_rect.origin + u`` holds the derivative for source pixel ``secondary_offset +
    u``, and incoming-gradient pixel ``primary_offset + v`` is the forward output centred at
    source pixel ``secondary_offset + v``; every pixel of ``source_gradient`` counts. The
    auto-sized result then has ``source_image``'s size. Strides must stay 1 and
    ``primary_edge_mode`` zero; ``secondary_edge_mode`` is zero or clamp.
    Arithmetic in float32 (float64 images: float64), one rounding on store.
    """


class MPSCNNCrossChannelNormalizationGradient(_LocalNormalizationGradient):
    """``MPSCNNCrossChannelNormalizationGradient``: dL/dX of
    :class:`MPSCNNCrossChannelNormalization`.

    ``MPSCNNCrossChannelNormalizationGradient(device, kernel_size=N)`` (required); ``alpha``
    (1.0, >= 0), ``beta`` (5.0), ``delta`` (1.0) read-write with the forward defaults,
    ``kernel_size`` read-only; the properties of :class:`~mpsnn.MPSCNNGradientKernel`.

    Math (exact derivative; the header's formula omits ``1/N`` — spec CONFLICT, the exact one
    is used): ``dX_k = dY_k·L(k)^−beta − (2·alpha·beta/N)·X_k·Σ_{r∈R(k)} dY_r·X_r·L(r)^(−beta−1)``
    with ``R(k) = [max(0, k − (N−1)//2), min(D − 1, k + N//2)]``.
    """ + _GRADIENT_DOC

    _DEFAULTS = _LRN_DEFAULTS
    _NON_NEGATIVE = frozenset({"alpha"})
    _family = "cross_channel"
    _forward_class = MPSCNNCrossChannelNormalization

    def __init__(self, device: Device | str, kernel_size: int | None = None, *, alpha: float | None = None,
                 beta: float | None = None, delta: float | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        self._kernel_size = _size_param(type(self).__name__, "kernel_size", kernel_size)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta})

    alpha = _param_property("alpha", non_negative=True)
    beta = _param_property("beta")
    delta = _param_property("delta")
    kernel_size = MPSCNNCrossChannelNormalization.kernel_size
    _parameters = MPSCNNCrossChannelNormalization._parameters
    _parameter_text = MPSCNNCrossChannelNormalization._parameter_text

    def _gradient(self, dy: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return backend.cross_channel_normalization_gradient_nhwc(dy, block, self._kernel_size, self._alpha, self._beta, self._delta)


class MPSCNNSpatialNormalizationGradient(_LocalNormalizationGradient):
    """``MPSCNNSpatialNormalizationGradient``: dL/dX of :class:`MPSCNNSpatialNormalization`.

    ``MPSCNNSpatialNormalizationGradient(device, kernel_width=k, kernel_height=k)`` (required,
    equal); ``alpha`` (1.0, >= 0), ``beta`` (5.0), ``delta`` (1.0) read-write, read-only
    ``kernel_width``, ``kernel_height``; the properties of :class:`~mpsnn.MPSCNNGradientKernel`.

    Math (exact derivative; the header evaluates ``T`` at ``p`` and omits ``1/(kw·kh)`` — spec
    CONFLICT, the exact one is used): ``dX_p = dY_p·T(p)^−beta −
    (2·alpha·beta/(kw·kh))·X_p·Σ_{q∈W^T(p)} dY_q·X_q·T(q)^(−beta−1)``, ``W^T(p)`` columns
    ``[px − (kw−1)//2, px + kw//2]``, rows alike.
    """ + _GRADIENT_DOC

    _DEFAULTS = _LRN_DEFAULTS
    _NON_NEGATIVE = frozenset({"alpha"})
    _family = "spatial"
    _forward_class = MPSCNNSpatialNormalization

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None, *,
                 alpha: float | None = None, beta: float | None = None, delta: float | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        self._secondary_kernel = _square_window(type(self).__name__, kernel_width, kernel_height)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta})

    alpha = _param_property("alpha", non_negative=True)
    beta = _param_property("beta")
    delta = _param_property("delta")

    def _gradient(self, dy: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        kw, kh = self._secondary_kernel
        return backend.spatial_normalization_gradient_nhwc(dy, block, kw, kh, self._alpha, self._beta, self._delta)


class MPSCNNLocalContrastNormalizationGradient(_LocalNormalizationGradient):
    """``MPSCNNLocalContrastNormalizationGradient``: dL/dX of
    :class:`MPSCNNLocalContrastNormalization`.

    ``MPSCNNLocalContrastNormalizationGradient(device, kernel_width=k, kernel_height=k)``
    (required, equal); read-write ``alpha`` (**0.0**, the kernel default), ``beta`` (0.5),
    ``delta`` (1/1024), ``p0`` (1.0), ``pm`` (0.0), ``ps`` (1.0); read-only ``kernel_width``,
    ``kernel_height``; the properties of :class:`~mpsnn.MPSCNNGradientKernel`.

    Math (exact derivative; the header's formula is garbled — spec CONFLICT, the exact one
    is normative): ``dX_p = ps·[dY_p·T(p)^−beta − Σ_{q∈W^T(p)} dY_q·T(q)^−beta·(p0/n +
    (2·alpha·beta/n)·(X_q − p0·M(q))·(X_p − M(q))/T(q))]``; ``pm`` does not enter it.
    """ + _GRADIENT_DOC

    _DEFAULTS = _LCN_DEFAULTS
    _family = "local_contrast"
    _forward_class = MPSCNNLocalContrastNormalization

    def __init__(self, device: Device | str, kernel_width: int | None = None, kernel_height: int | None = None, *,
                 alpha: float | None = None, beta: float | None = None, delta: float | None = None,
                 p0: float | None = None, pm: float | None = None, ps: float | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        self._secondary_kernel = _square_window(type(self).__name__, kernel_width, kernel_height)
        self._init_parameters({"alpha": alpha, "beta": beta, "delta": delta, "p0": p0, "pm": pm, "ps": ps})

    alpha = _param_property("alpha")
    beta = _param_property("beta")
    delta = _param_property("delta")
    p0 = _param_property("p0")
    pm = _param_property("pm")
    ps = _param_property("ps")

    def _gradient(self, dy: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        kw, kh = self._secondary_kernel
        return backend.local_contrast_normalization_gradient_nhwc(dy, block, kw, kh, self._alpha, self._beta, self._delta,
                                                                  self._p0, self._pm, self._ps)
