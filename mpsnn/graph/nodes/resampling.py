"""Resampling, upsampling and shape nodes (spec/graph.md §14 "Resampling / upsampling / shape",
upsampling-resampling.md §7-8, reduce-reshape-slice-concat.md §5, §8).

Apple classes in this module:

* ``MPSImageTransformProvider`` (protocol, an ABC here): ``transform_for_source_image(image,
  handle) -> MPSScaleTransform``.
* ``MPSNNScaleNode`` (abstract), ``MPSNNBilinearScaleNode`` (MPSImageBilinearScale),
  ``MPSNNLanczosScaleNode`` (MPSImageLanczosScale). Forms ``Node(source, output_size)`` and
  ``Node(source, transform_provider, output_size)`` (also as keywords). No gradient nodes.
* ``MPSCNNUpsamplingNearestNode`` / ``MPSCNNUpsamplingBilinearNode`` (MPSCNNUpsamplingNearest /
  Bilinear) and their gradient nodes ``MPSCNNUpsamplingNearestGradientNode`` /
  ``MPSCNNUpsamplingBilinearGradientNode``.
* ``MPSNNReshapeNode`` (MPSNNReshape) + ``MPSNNReshapeGradientNode`` (MPSNNReshapeGradient).
* ``MPSNNPadNode`` (MPSNNPad) + ``MPSNNPadGradientNode`` (MPSNNPadGradient).

Decisions where the spec is silent:

* Scale nodes (inferred): the result is ``output_size.width x output_size.height`` with the
  source's channels and images; ``output_size.depth`` is not used (the batch size comes from
  the source) but must be >= 1. The node's padding policy does not size the result. The
  transform provider is called once per graph encode with the source image the node reads
  (the whole batch stacked into one image: every entry of a batch gets the same transform)
  and the *source image node's* handle; a provider returning None behaves like no provider
  (fit the whole source). The kernel's ``offset`` stays 0.
* Upsampling nodes take ``integer_scale_factor_x/_y`` (Apple's labels) and expose read-only
  ``scale_factor_x/_y`` as floats; the bilinear gradient node has no ``align_corners``: its
  kernel reads the forward's value from the gradient state.
* Reshape / pad nodes expose their init parameters as read-only properties (mpsnn
  extension: ``result_width``, ``result_height``, ``result_feature_channels``;
  ``padding_size_before``, ``padding_size_after``, ``edge_mode``); ``fill_value`` is
  read-write (Apple) and applies from the next encode. Results are auto-sized by the kernels
  (pad: ``W + before.x + after.x`` x ``H + before.y + after.y`` x ``before.channel + C +
  after.channel``).
"""
from __future__ import annotations

import abc
import numbers
from typing import TYPE_CHECKING, Any

from ...core.device import Device
from ...core.enums import MPSImageEdgeMode
from ...core.errors import MPSTypeError, value_error
from ...core.structs import MPSImageCoordinate, MTLSize
from ...images.image import MPSImageDescriptor
from ...kernels.resampling import MPSImageBilinearScale, MPSImageLanczosScale, MPSScaleTransform
from ...kernels.reshape import MPSNNPad, MPSNNPadGradient, MPSNNReshape, MPSNNReshapeGradient, _coordinate
from ...kernels.upsampling import (
    MPSCNNUpsamplingBilinear,
    MPSCNNUpsamplingBilinearGradient,
    MPSCNNUpsamplingNearest,
    MPSCNNUpsamplingNearestGradient,
    integer_scale_factor,
)
from .base import GradientNode, MPSNNFilterNode, MPSNNImageNode, MPSNNStateNode, UnaryFilterNode

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


# -- resampling (MPSImageScale) -------------------------------------------------------------------------

class MPSImageTransformProvider(abc.ABC):
    """Protocol ``MPSImageTransformProvider``: gives a scale node the region-of-interest
    transform for the image it is about to resample.

    Implement :meth:`transform_for_source_image`; any object with such a method is accepted.
    """

    @abc.abstractmethod
    def transform_for_source_image(self, image: "MPSImage", handle: Any) -> MPSScaleTransform:
        """``transformForSourceImage:handle:``: the :class:`~mpsnn.MPSScaleTransform` to use
        for ``image`` (``handle``: the handle of the source image node, may be None)."""


def _output_size(owner: str, value: Any) -> MTLSize:
    if not isinstance(value, MTLSize):
        raise MPSTypeError(f"{owner}: `output_size` must be an MTLSize, but got {type(value).__name__}")
    for name in ("width", "height", "depth"):
        v = getattr(value, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise value_error(owner, f"output_size.{name}", v, "be an integer >= 1")
    return value


class MPSNNScaleNode(MPSNNFilterNode):
    """``MPSNNScaleNode``: abstract base of the resampling nodes (use
    :class:`MPSNNBilinearScaleNode` or :class:`MPSNNLanczosScaleNode`).

    Forms: ``Node(source, output_size)`` (the whole source is fitted into an
    ``output_size.width x output_size.height`` result) and ``Node(source, transform_provider,
    output_size)`` (the provider's transform selects a region of interest; None behaves like
    the first form); keywords ``transform_provider=`` / ``output_size=`` work too. Read-only
    ``output_size`` and ``transform_provider`` (mpsnn extension). No gradient node.
    """

    _kernel_class: type | None = None
    _has_gradient = False
    _state_node_class = None

    def __init__(self, source: MPSNNImageNode, *args: Any, transform_provider: Any = None, output_size: MTLSize | None = None,
                 padding_policy: Any = None) -> None:
        owner = type(self).__name__
        if self._kernel_class is None:
            raise MPSTypeError("MPSNNScaleNode: abstract; use MPSNNBilinearScaleNode or MPSNNLanczosScaleNode")
        if len(args) == 1:
            if output_size is not None:
                raise MPSTypeError(f"{owner}: `output_size` given twice")
            output_size = args[0]
        elif len(args) == 2:
            if output_size is not None or transform_provider is not None:
                raise MPSTypeError(f"{owner}: `transform_provider` / `output_size` given twice")
            transform_provider, output_size = args
        elif len(args) > 2:
            raise MPSTypeError(f"{owner}: takes (source, output_size) or (source, transform_provider, output_size), but got {1 + len(args)} arguments")
        if output_size is None:
            raise MPSTypeError(f"{owner}: `output_size` is required")
        self._size = _output_size(owner, output_size)
        if transform_provider is not None and not callable(getattr(transform_provider, "transform_for_source_image", None)):
            raise MPSTypeError(f"{owner}: `transform_provider` must be an MPSImageTransformProvider (with `transform_for_source_image`) "
                               f"or None, but got {type(transform_provider).__name__}")
        self._provider = transform_provider
        super().__init__([source], None, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, *args: Any, **kwargs: Any) -> "MPSNNScaleNode":
        """``nodeWithSource:outputSize:`` / ``nodeWithSource:transformProvider:outputSize:``."""
        return cls(source, *args, **kwargs)

    @property
    def output_size(self) -> MTLSize:
        return self._size

    @property
    def transform_provider(self) -> Any:
        return self._provider

    def _build_kernel(self, device: Device) -> Any:
        return self._kernel_class(device)  # type: ignore[misc]

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        src = images[0]
        transform = None
        if self._provider is not None:
            transform = self._provider.transform_for_source_image(src, self._source_images[0].handle)
            if transform is not None and not isinstance(transform, MPSScaleTransform):
                raise MPSTypeError(f"{type(self).__name__}: `transform_provider.transform_for_source_image` must return an "
                                   f"MPSScaleTransform or None, but got {type(transform).__name__}")
        kernel.scale_transform = transform
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, self._size.width, self._size.height,
                                           kernel.source_channels_used(src), src.number_of_images)
        dest = ctx.allocator.image_for_command_buffer(ctx.command_buffer, desc, kernel)
        kernel.encode(ctx.command_buffer, src, dest)
        return dest, []


class MPSNNBilinearScaleNode(MPSNNScaleNode):
    """``MPSNNBilinearScaleNode``: MPSImageBilinearScale (no low-pass prefilter: down-scaling by
    more than 2x drops detail). Forms of :class:`MPSNNScaleNode`."""

    _kernel_class = MPSImageBilinearScale


class MPSNNLanczosScaleNode(MPSNNScaleNode):
    """``MPSNNLanczosScaleNode``: MPSImageLanczosScale (may ring at sharp edges). Forms of
    :class:`MPSNNScaleNode`."""

    _kernel_class = MPSImageLanczosScale


# -- upsampling -------------------------------------------------------------------------------------------

class _UpsamplingGradientNode(GradientNode):
    _kernel_class: type = MPSCNNUpsamplingNearestGradient

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 scale_factor_x: Any = None, scale_factor_y: Any = None, forward: MPSNNFilterNode | None = None) -> None:
        owner = type(self).__name__
        self._sx = integer_scale_factor(owner, "scale_factor_x", scale_factor_x)
        self._sy = integer_scale_factor(owner, "scale_factor_y", scale_factor_y)
        super().__init__(source_gradient, source_image, gradient_state, forward)

    scale_factor_x = property(lambda self: float(self._sx), doc="The forward pass's horizontal factor (float).")
    scale_factor_y = property(lambda self: float(self._sy), doc="The forward pass's vertical factor (float).")

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                                  scale_factor_x: Any, scale_factor_y: Any) -> "_UpsamplingGradientNode":
        return cls(source_gradient, source_image, gradient_state, scale_factor_x, scale_factor_y)

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        return cls(gradient_image, forward._source_images[0], forward.result_state, f._sx, f._sy, forward=forward)

    def _build_kernel(self, device: Device) -> Any:
        return self._kernel_class(device, integer_scale_factor_x=self._sx, integer_scale_factor_y=self._sy)


class MPSCNNUpsamplingNearestGradientNode(_UpsamplingGradientNode):
    """``MPSCNNUpsamplingNearestGradientNode(source_gradient, source_image, gradient_state,
    scale_factor_x, scale_factor_y)``: MPSCNNUpsamplingNearestGradient (sums each block);
    read-only ``scale_factor_x/_y``."""

    _kernel_class = MPSCNNUpsamplingNearestGradient


class MPSCNNUpsamplingBilinearGradientNode(_UpsamplingGradientNode):
    """``MPSCNNUpsamplingBilinearGradientNode(source_gradient, source_image, gradient_state,
    scale_factor_x, scale_factor_y)``: MPSCNNUpsamplingBilinearGradient (the forward's
    ``align_corners`` comes from the gradient state); read-only ``scale_factor_x/_y``."""

    _kernel_class = MPSCNNUpsamplingBilinearGradient


class MPSCNNUpsamplingNearestNode(UnaryFilterNode):
    """``MPSCNNUpsamplingNearestNode(source, integer_scale_factor_x, integer_scale_factor_y)``:
    MPSCNNUpsamplingNearest (``sX*W x sY*H`` result); read-only ``scale_factor_x/_y`` (float)."""

    _gradient_class = MPSCNNUpsamplingNearestGradientNode

    def __init__(self, source: MPSNNImageNode, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None,
                 padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._sx = integer_scale_factor(owner, "integer_scale_factor_x", integer_scale_factor_x)
        self._sy = integer_scale_factor(owner, "integer_scale_factor_y", integer_scale_factor_y)
        super().__init__(source, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, integer_scale_factor_x: Any, integer_scale_factor_y: Any) -> "MPSCNNUpsamplingNearestNode":
        return cls(source, integer_scale_factor_x, integer_scale_factor_y)

    scale_factor_x = property(lambda self: float(self._sx))
    scale_factor_y = property(lambda self: float(self._sy))

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNUpsamplingNearest(device, integer_scale_factor_x=self._sx, integer_scale_factor_y=self._sy)


class MPSCNNUpsamplingBilinearNode(UnaryFilterNode):
    """``MPSCNNUpsamplingBilinearNode(source, integer_scale_factor_x, integer_scale_factor_y[,
    align_corners])``: MPSCNNUpsamplingBilinear; read-only ``scale_factor_x/_y`` (float) and
    ``align_corners`` (default False)."""

    _gradient_class = MPSCNNUpsamplingBilinearGradientNode

    def __init__(self, source: MPSNNImageNode, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None,
                 align_corners: bool = False, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._sx = integer_scale_factor(owner, "integer_scale_factor_x", integer_scale_factor_x)
        self._sy = integer_scale_factor(owner, "integer_scale_factor_y", integer_scale_factor_y)
        if not isinstance(align_corners, bool):
            raise MPSTypeError(f"{owner}: `align_corners` must be a bool, but got {type(align_corners).__name__}")
        self._align = align_corners
        super().__init__(source, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, integer_scale_factor_x: Any, integer_scale_factor_y: Any,
                         align_corners: bool = False) -> "MPSCNNUpsamplingBilinearNode":
        return cls(source, integer_scale_factor_x, integer_scale_factor_y, align_corners)

    scale_factor_x = property(lambda self: float(self._sx))
    scale_factor_y = property(lambda self: float(self._sy))
    align_corners = property(lambda self: self._align)

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNUpsamplingBilinear(device, integer_scale_factor_x=self._sx, integer_scale_factor_y=self._sy,
                                        align_corners=self._align)


# -- reshape ----------------------------------------------------------------------------------------------

class MPSNNReshapeGradientNode(GradientNode):
    """``MPSNNReshapeGradientNode(source_gradient, source_image, gradient_state)``:
    MPSNNReshapeGradient (``source_image`` = the forward reshape's input)."""

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode,
                                  gradient_state: MPSNNStateNode | None) -> "MPSNNReshapeGradientNode":
        return cls(source_gradient, source_image, gradient_state)

    def _build_kernel(self, device: Device) -> Any:
        return MPSNNReshapeGradient(device)


def _positive(owner: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise value_error(owner, name, v, "be an integer >= 1")
    return v


class MPSNNReshapeNode(UnaryFilterNode):
    """``MPSNNReshapeNode(source, result_width, result_height, result_feature_channels)``:
    MPSNNReshape (NHWC order; ``W·H·C`` of each source image must equal ``result_width ·
    result_height · result_feature_channels``, checked at encode). Read-only
    ``result_width``, ``result_height``, ``result_feature_channels`` (mpsnn extension)."""

    _gradient_class = MPSNNReshapeGradientNode

    def __init__(self, source: MPSNNImageNode, result_width: int, result_height: int, result_feature_channels: int,
                 padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._w = _positive(owner, "result_width", result_width)
        self._h = _positive(owner, "result_height", result_height)
        self._c = _positive(owner, "result_feature_channels", result_feature_channels)
        super().__init__(source, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, result_width: int, result_height: int, result_feature_channels: int) -> "MPSNNReshapeNode":
        return cls(source, result_width, result_height, result_feature_channels)

    result_width = property(lambda self: self._w)
    result_height = property(lambda self: self._h)
    result_feature_channels = property(lambda self: self._c)

    def _build_kernel(self, device: Device) -> Any:
        return MPSNNReshape(device)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        kernel.destination_image_allocator = ctx.allocator
        self._apply_padding(kernel)
        size = dict(reshaped_width=self._w, reshaped_height=self._h, reshaped_feature_channels=self._c)
        if ctx.want_states:
            img, st = kernel.encode(ctx.command_buffer, images[0], destination_state_is_temporary=False, **size)
            return img, [st]
        return kernel.encode(ctx.command_buffer, images[0], **size), []


# -- pad --------------------------------------------------------------------------------------------------

class MPSNNPadGradientNode(GradientNode):
    """``MPSNNPadGradientNode(source_gradient, source_image, gradient_state)``: MPSNNPadGradient
    (needs the forward pad node's gradient state)."""

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode,
                                  gradient_state: MPSNNStateNode | None) -> "MPSNNPadGradientNode":
        return cls(source_gradient, source_image, gradient_state)

    def _build_kernel(self, device: Device) -> Any:
        return MPSNNPadGradient(device)


class MPSNNPadNode(UnaryFilterNode):
    """``MPSNNPadNode(source, padding_size_before, padding_size_after, edge_mode)``: MPSNNPad
    (auto-sized result; pads x, y and channels; any :class:`~mpsnn.MPSImageEdgeMode`,
    including ``constant``, ``mirror`` and ``mirrorWithEdge``).

    Read-write ``fill_value`` (float, default 0.0; the value of ``constant`` padding).
    Read-only ``padding_size_before``, ``padding_size_after``, ``edge_mode`` (mpsnn extension).
    """

    _gradient_class = MPSNNPadGradientNode

    def __init__(self, source: MPSNNImageNode, padding_size_before: MPSImageCoordinate, padding_size_after: MPSImageCoordinate,
                 edge_mode: MPSImageEdgeMode = MPSImageEdgeMode.zero, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._before = _coordinate(owner, "padding_size_before", padding_size_before)
        self._after = _coordinate(owner, "padding_size_after", padding_size_after)
        try:
            self._edge = MPSImageEdgeMode(edge_mode)
        except (ValueError, TypeError):
            raise value_error(owner, "edge_mode", edge_mode, "be an MPSImageEdgeMode") from None
        self._fill = 0.0
        super().__init__(source, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, padding_size_before: MPSImageCoordinate, padding_size_after: MPSImageCoordinate,
                         edge_mode: MPSImageEdgeMode) -> "MPSNNPadNode":
        return cls(source, padding_size_before, padding_size_after, edge_mode)

    padding_size_before = property(lambda self: self._before)
    padding_size_after = property(lambda self: self._after)
    edge_mode = property(lambda self: self._edge)

    @property
    def fill_value(self) -> float:
        return self._fill

    @fill_value.setter
    def fill_value(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise value_error(type(self).__name__, "fill_value", value, "be a real number")
        self._fill = float(value)

    def _build_kernel(self, device: Device) -> Any:
        k = MPSNNPad(device, self._before, self._after)
        k.edge_mode = self._edge
        k.fill_value = self._fill
        return k

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        kernel.edge_mode = self._edge
        kernel.fill_value = self._fill
        return super()._encode(ctx, kernel, images, states)


__all__ = [
    "MPSCNNUpsamplingBilinearGradientNode",
    "MPSCNNUpsamplingBilinearNode",
    "MPSCNNUpsamplingNearestGradientNode",
    "MPSCNNUpsamplingNearestNode",
    "MPSImageTransformProvider",
    "MPSNNBilinearScaleNode",
    "MPSNNLanczosScaleNode",
    "MPSNNPadGradientNode",
    "MPSNNPadNode",
    "MPSNNReshapeGradientNode",
    "MPSNNReshapeNode",
    "MPSNNScaleNode",
]
