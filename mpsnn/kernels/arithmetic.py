"""Arithmetic kernels: MPSCNNAdd, MPSCNNSubtract, MPSCNNMultiply, MPSCNNDivide, their gradients,
MPSCNNArithmeticGradientState and comparison (spec/arithmetic.md).

Classes: :class:`MPSCNNArithmetic` (base) with :class:`MPSCNNAdd`, :class:`MPSCNNSubtract`,
:class:`MPSCNNMultiply`, :class:`MPSCNNDivide` and :class:`MPSNNCompare`
(:class:`MPSNNComparisonType`); :class:`MPSCNNArithmeticGradientState`;
:class:`MPSCNNArithmeticGradient` (base) with :class:`MPSCNNAddGradient`,
:class:`MPSCNNSubtractGradient`, :class:`MPSCNNMultiplyGradient`.

Forward (§1-2), for destination position ``q = (b, c, j, i)`` of the clip region (``i, j``
measured from ``clip_rect.origin``)::

    πP(q) = (primary_offset.z + b, primary_source_feature_channel_offset + c*sPc,
             primary_offset.y + j*sPy, primary_offset.x + i*sPx)        (πS likewise)
    r     = op(primary_scale*P[πP(q)], secondary_scale*S[πS(q)]) + bias
    out   = min(max(r, minimum_value), maximum_value)

with strides ``s*`` in {0, 1} (0 broadcasts: the same element is reused along that axis).
Reads outside an image follow that input's edge mode (zero or clamp). Arithmetic is float32.

Gradient (§5), for the target operand T (P for the primary filter, S for the secondary)::

    dT[u] = Σ_{q : πT(q) = u} m(q) * (primary_scale*g(q)) [* secondary_scale*Z(πZ(q))]  + bias

where ``m(q) = minimum_value < r(q) < maximum_value`` is the clamp mask kept in the gradient
state, ``g`` the incoming gradient and ``Z`` (multiply only) the other forward operand.

Decisions where the spec is silent or conflicting (each repeated in the class concerned):

* Channel broadcast (stride 0) reads one channel (the first of the input's channel window).
* Output channel count: the channels used of the input with channel stride 1 (primary
  first); when both have stride 1 their counts must be equal (MPSValueError otherwise); 1
  when both broadcast.
* Auto-sized result: per axis the size of the input that is not broadcast on it (primary
  first), 1 when both are; images and format of the primary. Padding sets ``primary_offset``
  x/y as for any 1x1 kernel (0); ``secondary_offset`` is kept.
* NaN propagates through the clamp; ±inf is clamped to the bounds (±FLT_MAX by default).
* Clamp-mask CONFLICT (§5.2): the gradient kernels multiply the incoming gradient by the
  mask the state holds (the recommended reading); their own ``minimum_value`` /
  ``maximum_value`` are kept for API parity and do not change the result.
* The gradient is the exact adjoint of the forward read, edge modes included: reads that
  fell outside the target image contribute nothing (zero) or go to the edge pixel (clamp).
* ``bias`` of a gradient kernel is added to every result element after the reduction.
* The gradient state is required, copies the forward strides (``secondary_stride_*``) and
  channel windows into the gradient kernel, and must come from the matching forward class.
* MPSNNCompare: ``comparison_type`` default equal, ``threshold`` default 0.0, 1.0 / 0.0
  results, no clamp; equal is ``|x - y| <= threshold``, notEqual ``|x - y| > threshold``.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..backends import arithmetic as backend
from ..backends import dispatch
from ..backends.arithmetic import FLT_MAX, ArithmeticParams, AxisMap
from ..core.binary_kernel import MPSCNNBinaryKernel, MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import MPSStateError, MPSTypeError, MPSValueError, value_error
from ..core.kernel import InputGeometry, Region
from ..core.padding import apply_padding_method, method_of
from ..core.regions import read_window
from ..core.structs import MPSOffset
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSNNBinaryGradientState, MPSState
from .results import direct_out, result_dtype, write_result

#: the operations a 16-bit encode may run as one torch op (see MPSCNNArithmetic._one_pass)
_ONE_PASS: dict[str, Callable[..., torch.Tensor]] = {"add": torch.add, "subtract": torch.sub, "multiply": torch.mul, "divide": torch.div}

__all__: list[str] = [
    "MPSCNNAdd",
    "MPSCNNAddGradient",
    "MPSCNNArithmetic",
    "MPSCNNArithmeticGradient",
    "MPSCNNArithmeticGradientState",
    "MPSCNNDivide",
    "MPSCNNMultiply",
    "MPSCNNMultiplyGradient",
    "MPSCNNSubtract",
    "MPSCNNSubtractGradient",
    "MPSNNCompare",
    "MPSNNComparisonType",
]


class MPSNNComparisonType(enum.IntEnum):
    """``MPSNNComparisonType``: the comparison :class:`MPSNNCompare` performs."""

    equal = 0
    notEqual = 1
    less = 2
    lessOrEqual = 3
    greater = 4
    greaterOrEqual = 5


_FORWARD_CLASS = {"add": "MPSCNNAdd", "subtract": "MPSCNNSubtract", "multiply": "MPSCNNMultiply",
                  "divide": "MPSCNNDivide", "compare": "MPSNNCompare"}

# -- validation helpers -------------------------------------------------------------------------


def _float32(owner: str, name: str, value: Any) -> float:
    """A float property: rounded to float32; NaN and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise value_error(owner, name, value, "be a real number")
    v = float(value)
    if math.isnan(v):
        raise value_error(owner, name, value, "be a real number, not NaN")
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def _float_property(attr: str, name: str) -> property:
    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        setattr(self, attr, _float32(self._name(), name, value))
    return property(get, set_, doc=f"``{name}`` (float32)")


def _broadcast_stride_property(attr: str, name: str, axis: int | None = None) -> property:
    """A stride of 0 (broadcast) or 1; ``axis`` indexes an [x, y] list."""
    def get(self):  # type: ignore[no-untyped-def]
        v = getattr(self, attr)
        return v if axis is None else v[axis]

    def set_(self, value):  # type: ignore[no-untyped-def]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (0, 1):
            raise value_error(self._name(), name, value, "be 0 (broadcast) or 1 (only these are supported)")
        if axis is None:
            setattr(self, attr, int(value))
        else:
            getattr(self, attr)[axis] = int(value)
    return property(get, set_, doc=f"``{name}``: 0 (broadcast) or 1, default 1")


def _check_edge(owner: str, name: str, mode: MPSImageEdgeMode) -> None:
    if mode not in (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp):
        raise value_error(owner, name, mode.name, "be zero or clamp for CNN kernels")


def _read_operand(image: MPSImage, geo: InputGeometry, region: Region, channel_stride: int) -> torch.Tensor:
    """One operand as the forward pass reads it: ``[count, h|1, w|1, C|1]`` (size 1 on the
    axes it is broadcast along)."""
    cs = geo.channels if channel_stride else 1
    t = image.tensor[geo.n0:geo.n0 + region.count, :, :, geo.c0:geo.c0 + cs]
    w = region.width if geo.stride_x else 1
    h = region.height if geo.stride_y else 1
    return read_window(t, geo.cx0, geo.cy0, w, h, geo.edge_mode, max(1, geo.stride_x), max(1, geo.stride_y))


def _channels_of(g: ForwardGeometry) -> int:
    return max(1, min(g.source_feature_channel_max_count, g.source_feature_channels - g.source_feature_channel_offset))


# -- gradient state -------------------------------------------------------------------------------


class MPSCNNArithmeticGradientState(MPSNNBinaryGradientState):
    """``MPSCNNArithmeticGradientState``: what an arithmetic forward encode hands its gradients.

    Made by the forward kernel's ``result_state_for_primary_image(...)`` (or the temporary and
    batch forms) or by an encode that returns a state; filled by the training encodes
    (``destination_state=`` / ``destination_states=``). It holds, opaquely:

    * the clamp mask ``m(q) = minimum_value < r(q) < maximum_value`` (strict; ``r`` the
      unclamped forward result) over the region the forward pass wrote;
    * the forward configuration: ``geometry`` (primary input) and ``secondary_geometry``
      (offsets, pixel strides, edge modes, channel windows, source sizes), the channel
      strides, the region written and the forward class.

    Its destination-size hook gives a gradient kernel's result the size of the forward input
    that kernel differentiates (primary or secondary) and copies the forward geometry into
    the gradient kernel. A temporary state's mask is released when its ``read_count`` reaches
    0: set ``read_count = 2`` when both gradient filters read it.
    """

    def __init__(self, geometry: ForwardGeometry, secondary_geometry: ForwardGeometry, device: Device,
                 command_buffer: MTLCommandBuffer | None = None) -> None:
        super().__init__(geometry, secondary_geometry, device, command_buffer)
        self._operation: str | None = None
        self._channel_strides = (1, 1)
        self._channels_out = 0
        self._region: Region | None = None
        self._mask: torch.Tensor | None = None

    def _begin(self, kernel: "MPSCNNArithmetic", channels_out: int) -> None:
        self._operation = kernel._operation
        self._channel_strides = (kernel._p_c_stride, kernel._s_c_stride)
        self._channels_out = channels_out
        self._region, self._mask = None, None

    def _release(self) -> None:
        super()._release()
        self._mask = None

    def destination_image_descriptor_for_source_images(self, source_images, source_states, kernel, suggested_descriptor):  # type: ignore[no-untyped-def, override]
        if not isinstance(kernel, MPSCNNArithmeticGradient):
            return super().destination_image_descriptor_for_source_images(source_images, source_states, kernel, suggested_descriptor)
        kernel._adopt_state(self, source_images)
        g = kernel._target_geometry
        desc = suggested_descriptor.copy()
        desc.width, desc.height = g.source_width, g.source_height
        desc.feature_channels, desc.number_of_images = g.source_feature_channels, g.source_number_of_images
        return desc


# -- forward ----------------------------------------------------------------------------------------


class MPSCNNArithmetic(MPSCNNBinaryKernel):
    """``MPSCNNArithmetic``: base of the element-wise binary operators (use a subclass).

    ``result = clamp(op(primary_scale*x, secondary_scale*y) + bias, minimum_value, maximum_value)``
    with ``x`` read from the primary image and ``y`` from the secondary (module docstring).

    Properties (read-write; floats are stored as float32):

    * ``primary_scale`` = 1.0, ``secondary_scale`` = 1.0, ``bias`` = 0.0
    * ``minimum_value`` = -FLT_MAX, ``maximum_value`` = +FLT_MAX (must satisfy min <= max at
      encode time)
    * ``primary_stride_in_pixels_x/_y``, ``primary_stride_in_feature_channels``,
      ``secondary_stride_in_pixels_x/_y``, ``secondary_stride_in_feature_channels``: 0
      (broadcast) or 1, default 1; all 0 makes an input a scalar (pixel ``offset.x,
      offset.y``, first channel of its window). The batch axis is never broadcast.
    * everything of :class:`~mpsnn.MPSCNNBinaryKernel`: ``primary_offset`` /
      ``secondary_offset``, ``clip_rect``, ``destination_feature_channel_offset``,
      ``primary/secondary_source_feature_channel_offset`` and ``..._max_count``,
      ``primary/secondary_edge_mode`` (zero or clamp), ``padding``,
      ``destination_image_allocator``.

    Shape: the result has as many channels as the input with channel stride 1 uses (both
    must agree when both have stride 1; 1 when both broadcast). The auto-sized forms size the
    result, per axis, like the input that is not broadcast on that axis (primary first; 1
    when both are), with the primary's image count and format (inferred); they set
    ``primary_offset`` x/y to the padding offset (0: the window is 1x1) and keep
    ``secondary_offset``.

    Encode forms: ``encode(cb, primary_image, secondary_image[, destination_image])``,
    ``encode(cb, p, s, d, destination_state=state)`` (training: fills an
    :class:`MPSCNNArithmeticGradientState`), ``encode(cb, p, s,
    destination_state_is_temporary=flag)`` -> ``(image, state)``, and the ``encode_batch``
    forms with lists. The destination must not alias either source.

    Edge conventions: IEEE arithmetic (division by zero gives ±inf or NaN before the clamp);
    ±inf is clamped to the bounds, NaN propagates (inferred).
    """

    _operation: str | None = None
    _result_state_class = MPSCNNArithmeticGradientState

    def __init__(self, device: Device | str) -> None:
        if self._operation is None:
            raise MPSTypeError(f"{type(self).__name__}: initWithDevice: is unavailable on the base class; "
                               "use MPSCNNAdd, MPSCNNSubtract, MPSCNNMultiply, MPSCNNDivide or MPSNNCompare")
        super().__init__(device)
        self._p_scale = 1.0
        self._s_scale = 1.0
        self._bias = 0.0
        self._min = -FLT_MAX
        self._max = FLT_MAX
        self._p_c_stride = 1
        self._s_c_stride = 1

    primary_scale = _float_property("_p_scale", "primary_scale")
    secondary_scale = _float_property("_s_scale", "secondary_scale")
    bias = _float_property("_bias", "bias")
    minimum_value = _float_property("_min", "minimum_value")
    maximum_value = _float_property("_max", "maximum_value")
    primary_stride_in_pixels_x = _broadcast_stride_property("_p_stride", "primary_stride_in_pixels_x", 0)
    primary_stride_in_pixels_y = _broadcast_stride_property("_p_stride", "primary_stride_in_pixels_y", 1)
    secondary_stride_in_pixels_x = _broadcast_stride_property("_s_stride", "secondary_stride_in_pixels_x", 0)
    secondary_stride_in_pixels_y = _broadcast_stride_property("_s_stride", "secondary_stride_in_pixels_y", 1)
    primary_stride_in_feature_channels = _broadcast_stride_property("_p_c_stride", "primary_stride_in_feature_channels")
    secondary_stride_in_feature_channels = _broadcast_stride_property("_s_c_stride", "secondary_stride_in_feature_channels")

    def _params(self) -> ArithmeticParams:
        assert self._operation is not None
        return ArithmeticParams(self._operation, self._p_scale, self._s_scale, self._bias, self._min, self._max)

    # -- size rules ----------------------------------------------------------------------------
    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if self._p_c_stride and self._s_c_stride:
            if primary_channels != secondary_channels:
                raise value_error(self._name(), "secondary_image", f"{secondary_channels} feature channels used",
                                  f"match the {primary_channels} channels used of primary_image (limit them with "
                                  "*_source_feature_channel_max_count, or broadcast one with a feature-channel stride of 0)")
            return primary_channels
        if self._p_c_stride:
            return primary_channels
        return secondary_channels if self._s_c_stride else 1

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """The result descriptor for ``source_images = [primary, secondary]`` (class docstring);
        sets ``primary_offset`` x/y."""
        if len(source_images) != 2:
            raise value_error(self._name(), "source_images", f"{len(source_images)} images", "hold [primary, secondary]")
        prim, sec = source_images
        nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                            self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
        if sec.number_of_images - self._s_offset.z < prim.number_of_images - self._p_offset.z:
            raise value_error(self._name(), "secondary_image.number_of_images", sec.number_of_images,
                              f"supply as many images from secondary_offset.z={self._s_offset.z} as the primary image does "
                              f"from primary_offset.z={self._p_offset.z} (the batch axis is never broadcast)")
        width = prim.width if self._p_stride[0] else (sec.width if self._s_stride[0] else 1)
        height = prim.height if self._p_stride[1] else (sec.height if self._s_stride[1] else 1)
        method = method_of(self._padding)
        r = apply_padding_method(method, width, height, 1, 1, 1, 1, 1, 1, False)
        self._p_offset = MPSOffset(r.offset_x, r.offset_y, self._p_offset.z)
        desc = MPSImageDescriptor._trusted(prim.feature_channel_format, r.width, r.height, nout, prim.number_of_images)
        return self._finish_descriptor(desc, method, source_images, source_states)

    # -- encode --------------------------------------------------------------------------------------
    def encode(self, command_buffer: MTLCommandBuffer, primary_image: MPSImage, secondary_image: MPSImage,
               destination_image: MPSImage | None = None, *, destination_state: MPSState | None = None,
               destination_state_is_temporary: bool | None = None) -> Any:
        """Encode; see the class docstring for the forms and what each returns."""
        if destination_image is None and destination_state is not None:
            raise MPSValueError(f"{self._name()}: `destination_state` needs `destination_image`; "
                                "use `destination_state_is_temporary` to get a new state with a new result")
        return super().encode(command_buffer, primary_image, secondary_image, destination_image,
                              destination_state=destination_state, destination_state_is_temporary=destination_state_is_temporary)

    #: a graph's fused ReLU for the current training encode (mpsnn graph fusion, see MPSNNGraph)
    _fused_relu = False

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        if self._operation != "compare" and self._min > self._max:
            raise value_error(self._name(), "minimum_value", self._min, f"be <= maximum_value={self._max}")
        _check_edge(self._name(), "primary_edge_mode", self._p_edge)
        _check_edge(self._name(), "secondary_edge_mode", self._s_edge)
        if state is not None:
            if not isinstance(state, MPSCNNArithmeticGradientState):
                raise MPSTypeError(f"{self._name()}: `destination_state` must be an MPSCNNArithmeticGradientState, but got {type(state).__name__}")
            self._check_state("destination_state", state, cb)
            nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                                self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
            state._begin(self, nout)
        super()._encode_checked(cb, prim, sec, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, prim: MPSImage, pg: InputGeometry, sec: MPSImage, sg: InputGeometry,
                       dest: MPSImage, region: Region, state: MPSState | None) -> None:
        x = _read_operand(prim, pg, region, self._p_c_stride)
        y = _read_operand(sec, sg, region, self._s_c_stride)
        training = isinstance(state, MPSCNNArithmeticGradientState)
        p = self._params()
        shape = (region.count, region.height, region.width, region.channels)
        if not training and self._one_pass(p, x, y, dest):
            out = direct_out(dest, region, shape)
            if out is None:
                out = torch.empty(shape, dtype=x.dtype, device=x.device)
            _ONE_PASS[p.operation](x, y, out=out)
            write_result(dest, region, out)
            return
        relu = self._fused_relu
        if relu and not (training and dest.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            raise MPSValueError(f"{self._name()}: a graph's fused ReLU needs the training form and a float destination")
        if training and tuple(x.shape) == tuple(y.shape) == shape and p.operation in ("add", "subtract", "multiply", "divide"):
            tri = dispatch.triton_engine("arithmetic", x, y)
            out = direct_out(dest, region, shape)
            if (tri is not None and x.dtype == y.dtype and x.is_contiguous() and y.is_contiguous() and (out is None or out.is_contiguous())
                    and (not relu or x.dtype == dest.dtype)):
                # the result and the gradient state's clamp mask in one pass (backends/triton/arithmetic.py)
                res = out if out is not None and out.dtype == x.dtype else torch.empty(shape, dtype=x.dtype, device=x.device)
                mask = tri.forward_with_mask(x, y, res, p.operation, p.primary_scale, p.secondary_scale, p.bias,
                                             p.minimum_value, p.maximum_value, relu)
                state._region, state._mask = region, mask  # type: ignore[union-attr]
                write_result(dest, region, res)
                return
        out, mask = backend.arithmetic_forward(x, y, p, with_mask=training)
        if relu:
            # the graph's fused ReLU (slope 0): on the stored value, its derivative into the mask
            s = (out if tuple(out.shape) == shape else out.expand(shape)).to(dest.dtype).to(out.dtype)
            pos = s >= 0
            out, mask = torch.where(pos, s, s * 0.0), pos if mask is None else mask & pos
        if training:
            state._region, state._mask = region, mask  # type: ignore[union-attr]
        write_result(dest, region, out if tuple(out.shape) == shape else out.expand(shape))

    @staticmethod
    def _one_pass(p: ArithmeticParams, x: torch.Tensor, y: torch.Tensor, dest: MPSImage) -> bool:
        """Whether the result can be computed in one pass in the 16-bit storage type: no
        scales, bias or clamp bounds of its own, both operands and the destination of the same
        float16/bfloat16 type. torch computes each element in float32 and rounds once, as the
        float32 path does; the default clamp to ``±FLT_MAX`` then changes nothing, since
        ``FLT_MAX`` rounds to infinity in both 16-bit types (the same bits)."""
        return (p.operation in _ONE_PASS and p.primary_scale == 1.0 and p.secondary_scale == 1.0 and p.bias == 0.0
                and p.minimum_value == -FLT_MAX and p.maximum_value == FLT_MAX
                and x.dtype in (torch.float16, torch.bfloat16) and y.dtype == x.dtype and result_dtype(dest) == x.dtype)


class MPSCNNAdd(MPSCNNArithmetic):
    """``MPSCNNAdd``: ``clamp((primary_scale*x + secondary_scale*y) + bias, min, max)``.

    ``MPSCNNAdd(device)``; properties and encode forms of :class:`MPSCNNArithmetic`.
    Gradient: :class:`MPSCNNAddGradient`."""

    _operation = "add"


class MPSCNNSubtract(MPSCNNArithmetic):
    """``MPSCNNSubtract``: ``clamp((primary_scale*x - secondary_scale*y) + bias, min, max)``.

    ``MPSCNNSubtract(device)``; see :class:`MPSCNNArithmetic`. Gradient:
    :class:`MPSCNNSubtractGradient`."""

    _operation = "subtract"


class MPSCNNMultiply(MPSCNNArithmetic):
    """``MPSCNNMultiply``: ``clamp((primary_scale*x) * (secondary_scale*y) + bias, min, max)``.

    ``MPSCNNMultiply(device)``; see :class:`MPSCNNArithmetic`. Gradient:
    :class:`MPSCNNMultiplyGradient`."""

    _operation = "multiply"


class MPSCNNDivide(MPSCNNArithmetic):
    """``MPSCNNDivide``: ``clamp((primary_scale*x) / (secondary_scale*y) + bias, min, max)``.

    ``MPSCNNDivide(device)``; see :class:`MPSCNNArithmetic`. IEEE division: a zero
    denominator gives ±inf (then clamped to the bounds, ±FLT_MAX by default) or NaN (0/0,
    propagates). No gradient class exists."""

    _operation = "divide"


class MPSNNCompare(MPSCNNArithmetic):
    """``MPSNNCompare``: element-wise comparison, 1.0 where it holds and 0.0 elsewhere.

    ``MPSNNCompare(device)``. Properties: ``comparison_type`` (:class:`MPSNNComparisonType`,
    default ``equal``) and ``threshold`` (float32, default 0.0) — both defaults inferred —
    plus the geometry of :class:`MPSCNNArithmetic`. ``primary_scale``, ``secondary_scale``,
    ``bias``, ``minimum_value`` and ``maximum_value`` are unused (no clamp, inferred).

    Math (x primary, y secondary): equal ``|x - y| <= threshold``, notEqual
    ``|x - y| > threshold`` (both false for NaN), less ``x < y``, lessOrEqual ``x <= y``,
    greater ``x > y``, greaterOrEqual ``x >= y``; ``threshold`` is used only by equal and
    notEqual (inferred). No gradient class exists; a training encode records a state
    without a clamp mask.
    """

    _operation = "compare"

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self._comparison_type = MPSNNComparisonType.equal
        self._threshold = 0.0

    threshold = _float_property("_threshold", "threshold")

    @property
    def comparison_type(self) -> MPSNNComparisonType:
        return self._comparison_type

    @comparison_type.setter
    def comparison_type(self, value: MPSNNComparisonType | int) -> None:
        if isinstance(value, bool):
            raise value_error(self._name(), "comparison_type", value, "be an MPSNNComparisonType")
        try:
            self._comparison_type = MPSNNComparisonType(value)
        except ValueError:
            raise value_error(self._name(), "comparison_type", value, "be an MPSNNComparisonType (0...5)") from None

    def _params(self) -> ArithmeticParams:
        return ArithmeticParams("compare", comparison_type=int(self._comparison_type), threshold=self._threshold)


# -- gradients ---------------------------------------------------------------------------------------


class MPSCNNArithmeticGradient(MPSCNNGradientKernel):
    """``MPSCNNArithmeticGradient``: base of the arithmetic gradient kernels (use a subclass).

    Args:
        device: the device (positional, first).
        is_secondary_source_filter: required (``initWithDevice:`` alone is unavailable).
            False: the filter computes dL/d(primary input); True: dL/d(secondary input).
            Two filters are needed per forward op.

    Properties (read-write; floats stored as float32): ``primary_scale`` = 1.0,
    ``secondary_scale`` = 1.0, ``bias`` = 0.0, ``minimum_value`` = -FLT_MAX,
    ``maximum_value`` = +FLT_MAX, ``secondary_stride_in_pixels_x/_y`` and
    ``secondary_stride_in_feature_channels`` (0 or 1, default 1); read-only
    ``is_secondary_source_filter``.

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    gradient_states[, destination_gradients])``. ``source_gradient`` is dL/d(forward result)
    (the forward destination's size, never broadcast); ``source_image`` is the forward image
    named by each subclass; ``gradient_state`` the forward encode's
    :class:`MPSCNNArithmeticGradientState` (required; it must come from the matching forward
    class). The result has the size, channels and images of the forward input being
    differentiated; channels outside that input's forward channel window and pixels the
    forward pass never read get 0 (plus ``bias``).

    Math: ``dT = R(m * (primary_scale*g) [* (secondary_scale*Z)]) + bias`` with ``m`` the
    clamp mask from the state, ``R`` the adjoint of the forward read of the target input
    (a sum over every axis it was broadcast along; out-of-image reads dropped for edge mode
    zero, added to the edge pixel for clamp). Set the scales so that they reproduce the
    forward factor (e.g. Add, primary filter: ``primary_scale`` = forward
    ``primary_scale``); ``bias`` should stay 0 for a true gradient.

    Decisions: the state copies the forward pixel/channel strides of the input passed as
    ``source_image`` into ``secondary_stride_*`` (kernel-base.md §4), overriding values set
    by hand; ``minimum_value``/``maximum_value`` do not change the result (the clamp-mask
    CONFLICT of §5.2 is resolved by always applying the state's mask); batch addressing of
    the forward pass (``offset.z``, ``clip_rect.origin.z``) is refused.
    """

    _operation: str | None = None
    #: True when ``source_image`` is the *other* forward operand (multiply), else the target
    _reads_other_operand = False

    def __init__(self, device: Device | str, is_secondary_source_filter: bool | None = None) -> None:
        if self._operation is None:
            raise MPSTypeError(f"{type(self).__name__}: use MPSCNNAddGradient, MPSCNNSubtractGradient or MPSCNNMultiplyGradient")
        if is_secondary_source_filter is None:
            raise MPSTypeError(f"{type(self).__name__}: `is_secondary_source_filter` is required "
                               "(initWithDevice:isSecondarySourceFilter: is the designated init; initWithDevice: is unavailable)")
        if not isinstance(is_secondary_source_filter, (bool, np.bool_)):
            raise MPSTypeError(f"{type(self).__name__}: `is_secondary_source_filter` must be a bool, but got {type(is_secondary_source_filter).__name__}")
        super().__init__(device)
        self._is_secondary = bool(is_secondary_source_filter)
        self._p_scale = 1.0
        self._s_scale = 1.0
        self._bias = 0.0
        self._min = -FLT_MAX
        self._max = FLT_MAX
        self._s_c_stride = 1
        self._target_geometry: ForwardGeometry | None = None
        self._other_geometry: ForwardGeometry | None = None
        self._target_c_stride = 1

    primary_scale = _float_property("_p_scale", "primary_scale")
    secondary_scale = _float_property("_s_scale", "secondary_scale")
    bias = _float_property("_bias", "bias")
    minimum_value = _float_property("_min", "minimum_value")
    maximum_value = _float_property("_max", "maximum_value")
    secondary_stride_in_pixels_x = _broadcast_stride_property("_s_stride", "secondary_stride_in_pixels_x", 0)
    secondary_stride_in_pixels_y = _broadcast_stride_property("_s_stride", "secondary_stride_in_pixels_y", 1)
    secondary_stride_in_feature_channels = _broadcast_stride_property("_s_c_stride", "secondary_stride_in_feature_channels")

    @property
    def is_secondary_source_filter(self) -> bool:
        return self._is_secondary

    # -- state adoption ---------------------------------------------------------------------------
    def _find_state(self, source_states: Sequence[MPSState] | None) -> MPSCNNArithmeticGradientState:
        for st in source_states or []:
            if isinstance(st, MPSCNNArithmeticGradientState):
                return st
        raise MPSTypeError(f"{self._name()}: `gradient_state` must be the MPSCNNArithmeticGradientState of the forward encode")

    def _adopt_state(self, st: MPSCNNArithmeticGradientState, source_images: Sequence[MPSImage]) -> None:
        """Take the forward configuration from ``st`` (sizes, strides, channel windows) and check
        that the images given fit it."""
        name = self._name()
        if st._operation is None:
            raise MPSStateError(f"{name}: `gradient_state` was never filled by a forward training encode")
        if st._operation != self._operation:
            raise value_error(name, "gradient_state", f"a state of {_FORWARD_CLASS[st._operation]}",
                              f"come from {_FORWARD_CLASS[self._operation]}")  # type: ignore[index]
        target, other = (st.secondary_geometry, st.geometry) if self._is_secondary else (st.geometry, st.secondary_geometry)
        c_strides = st._channel_strides[::-1] if self._is_secondary else st._channel_strides
        n = target.source_number_of_images
        for which, g in (("primary", st.geometry), ("secondary", st.secondary_geometry)):
            if g.offset.z != 0 or g.clip_rect.origin.z != 0 or g.clip_rect.size.depth < n or g.source_number_of_images != n:
                raise value_error(name, "gradient_state", f"forward {which}_offset.z={g.offset.z}, clip_rect.origin.z={g.clip_rect.origin.z}",
                                  f"come from a forward encode that mapped every image n of its {n}-image sources to image n "
                                  "(batch addressing is not supported by gradient kernels)")
        g_img, src = source_images
        if g_img.number_of_images != n:
            raise value_error(name, "source_gradient.number_of_images", g_img.number_of_images, f"be the forward pass's {n}")
        region = st._region
        if region is not None and (g_img.width < region.x0 + region.width or g_img.height < region.y0 + region.height
                                   or g_img.feature_channels < region.c0 + region.channels):
            raise value_error(name, "source_gradient", f"{g_img.width}x{g_img.height}x{g_img.feature_channels}",
                              f"cover the forward result region x<{region.x0 + region.width}, y<{region.y0 + region.height}, "
                              f"channels<{region.c0 + region.channels}")
        src_geo = other if self._reads_other_operand else target
        which_src = ("primary" if self._is_secondary else "secondary") if self._reads_other_operand else ("secondary" if self._is_secondary else "primary")
        want = (src_geo.source_width, src_geo.source_height, src_geo.source_feature_channels, src_geo.source_number_of_images)
        got = (src.width, src.height, src.feature_channels, src.number_of_images)
        if want != got:
            raise value_error(name, "source_image", "x".join(map(str, got)),
                              f"be the forward {which_src} image (width x height x channels x images = {'x'.join(map(str, want))})")
        self._gradient_state = st
        self._forward = target
        self._target_geometry, self._other_geometry = target, other
        self._target_c_stride = c_strides[0]
        self._p_offset = MPSOffset(0, 0, 0)
        self._s_offset = MPSOffset(0, 0, 0)
        self._p_edge = MPSImageEdgeMode.zero
        self._p_c_off = target.destination_feature_channel_offset
        self._p_c_max = max(1, st._channels_out)
        self._dst_c_off = target.source_feature_channel_offset
        self._s_c_off = src_geo.source_feature_channel_offset
        self._s_c_max = _channels_of(src_geo)
        self._s_edge = src_geo.edge_mode
        self._s_stride = [src_geo.stride_in_pixels_x, src_geo.stride_in_pixels_y]
        self._s_c_stride = c_strides[1] if self._reads_other_operand else c_strides[0]

    def _check_gradient_state(self, name: str, state: Any) -> None:
        if not isinstance(state, MPSCNNArithmeticGradientState):
            raise MPSTypeError(f"{self._name()}: `{name}` must be the MPSCNNArithmeticGradientState of the forward encode, "
                               f"but got {type(state).__name__}")

    def encode(self, command_buffer: MTLCommandBuffer, source_gradient: MPSImage, source_image: MPSImage,  # type: ignore[override]
               gradient_state: MPSState | None, destination_gradient: MPSImage | None = None) -> MPSImage | None:
        """``encode(commandBuffer:sourceGradient:sourceImage:gradientState:[destinationGradient:])``."""
        self._check_gradient_state("gradient_state", gradient_state)
        return super().encode(command_buffer, source_gradient, source_image, gradient_state, destination_gradient)

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_gradients: Sequence[MPSImage], source_images: Sequence[MPSImage],  # type: ignore[override]
                     gradient_states: Sequence[MPSState] | None, destination_gradients: Sequence[MPSImage] | None = None) -> list[MPSImage] | None:
        if gradient_states is None:
            raise MPSTypeError(f"{self._name()}: `gradient_states` must list the forward encodes' MPSCNNArithmeticGradientStates, but got None")
        for k, st in enumerate(gradient_states):
            self._check_gradient_state(f"gradient_states[{k}]", st)
        return super().encode_batch(command_buffer, source_gradients, source_images, gradient_states, destination_gradients)

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """The result descriptor: the forward input being differentiated (from the state, which
        also configures this kernel)."""
        if len(source_images) != 2:
            raise value_error(self._name(), "source_images", f"{len(source_images)} images", "hold [source_gradient, source_image]")
        self._find_state(source_states)
        g = source_images[0]
        desc = MPSImageDescriptor._trusted(g.feature_channel_format, g.width, g.height, g.feature_channels, g.number_of_images)
        return self._finish_descriptor(desc, method_of(self._padding), source_images, source_states)

    def _apply_source_states(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState]) -> None:
        self._adopt_state(self._find_state(source_states), source_images)

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if self._target_geometry is None:
            raise MPSStateError(f"{self._name()}: no gradient state was adopted")
        return _channels_of(self._target_geometry) if self._target_c_stride else 1

    # -- numerics -----------------------------------------------------------------------------------
    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        st = self._gradient_state
        target, other = self._target_geometry, self._other_geometry
        assert isinstance(st, MPSCNNArithmeticGradientState) and target is not None and other is not None
        n, width, height = target.source_number_of_images, target.source_width, target.source_height
        cw = region.channels
        fr = st._region
        if fr is None:  # the forward pass wrote nothing: the gradient is 0 (+ bias)
            full = prim.tensor.new_full((n, height, width, cw), self._bias, dtype=torch.float32)
        else:
            g = prim.tensor[fr.n0:fr.n0 + fr.count, fr.y0:fr.y0 + fr.height, fr.x0:fr.x0 + fr.width, fr.c0:fr.c0 + fr.channels]
            z = None
            if self._reads_other_operand:
                zg = self._forward_input(other, fr, _channels_of(other))
                z = _read_operand(sec, zg, fr, self._s_c_stride)
            clamp = target.edge_mode == MPSImageEdgeMode.clamp
            x_map = AxisMap(target.offset.x + (fr.x0 - target.clip_rect.origin.x) * target.stride_in_pixels_x, target.stride_in_pixels_x, width, clamp)
            y_map = AxisMap(target.offset.y + (fr.y0 - target.clip_rect.origin.y) * target.stride_in_pixels_y, target.stride_in_pixels_y, height, clamp)
            c_map = AxisMap(0, self._target_c_stride, cw)
            mask = st._mask
            if (z is None and self._p_scale == 1.0 and self._bias == 0.0 and g.dtype == dest.dtype and g.dtype != torch.float64
                    and (x_map.start, x_map.stride, x_map.size, y_map.start, y_map.stride, y_map.size, c_map.stride) == (0, 1, g.shape[2], 0, 1, g.shape[1], 1)
                    and (n, cw) == (g.shape[0], g.shape[3]) and (mask is None or tuple(mask.shape) == tuple(g.shape))):
                # add / subtract with unit scale: the gradient is g where the forward did not
                # clamp, copied in g's own dtype in one pass (no arithmetic, so no rounding)
                tri = dispatch.triton_engine("arithmetic", g) if mask is not None else None
                if tri is not None and g.is_contiguous() and mask.is_contiguous() and mask.dtype == torch.bool:  # type: ignore[union-attr]
                    full = torch.empty_like(g, memory_format=torch.contiguous_format)
                    tri.masked_copy(g, mask, full)
                else:
                    full = g.clone(memory_format=torch.contiguous_format) if mask is None else torch.where(mask, g, g.new_zeros(()))
            else:
                full = backend.arithmetic_gradient(g, mask, z, self._p_scale, self._s_scale, self._bias, y_map, x_map, c_map)
        write_result(dest, region, full[region.n0:region.n0 + region.count, region.y0:region.y0 + region.height,
                                        region.x0:region.x0 + region.width])

    @staticmethod
    def _forward_input(g: ForwardGeometry, fr: Region, channels: int) -> InputGeometry:
        """How the forward pass read one input over its region ``fr``."""
        return InputGeometry(
            n0=g.offset.z, c0=g.source_feature_channel_offset, channels=channels,
            cx0=g.offset.x + (fr.x0 - g.clip_rect.origin.x) * g.stride_in_pixels_x,
            cy0=g.offset.y + (fr.y0 - g.clip_rect.origin.y) * g.stride_in_pixels_y,
            stride_x=g.stride_in_pixels_x, stride_y=g.stride_in_pixels_y, kernel_width=1, kernel_height=1,
            dilation_x=1, dilation_y=1, edge_mode=g.edge_mode)


class MPSCNNAddGradient(MPSCNNArithmeticGradient):
    """``MPSCNNAddGradient``: ``dX = R(m * primary_scale*g) + bias`` (either filter).

    ``MPSCNNAddGradient(device, is_secondary_source_filter=flag)``. ``source_image`` is the
    forward input whose gradient is computed (only its size is used). With defaults and no
    broadcasting the result is the (masked) incoming gradient. See
    :class:`MPSCNNArithmeticGradient`."""

    _operation = "add"


class MPSCNNSubtractGradient(MPSCNNArithmeticGradient):
    """``MPSCNNSubtractGradient``: ``dX = R(m * primary_scale*g) + bias``.

    ``MPSCNNSubtractGradient(device, is_secondary_source_filter=flag)``. ``source_image`` is
    the forward input whose gradient is computed (only its size is used). Following the
    current header, the secondary filter does **not** negate by itself: set
    ``primary_scale = -1.0`` (times the forward ``secondary_scale``) to get dL/dy; with the
    default 1.0 it returns +g. See :class:`MPSCNNArithmeticGradient`."""

    _operation = "subtract"


class MPSCNNMultiplyGradient(MPSCNNArithmeticGradient):
    """``MPSCNNMultiplyGradient``: ``dX = R(m * (primary_scale*g) * (secondary_scale*Z)) + bias``.

    ``MPSCNNMultiplyGradient(device, is_secondary_source_filter=flag)``. ``source_image`` is
    the **other** forward operand ``Z``: the forward secondary image for the primary filter
    (d(x*y)/dx = y) and the forward primary image for the secondary filter; it is read as
    the forward pass read it (its strides, offset, channel window and edge mode, copied from
    the state). Set ``primary_scale * secondary_scale`` to the forward
    ``primary_scale * secondary_scale``. See :class:`MPSCNNArithmeticGradient`."""

    _operation = "multiply"
    _reads_other_operand = True
