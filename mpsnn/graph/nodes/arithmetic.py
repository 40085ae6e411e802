"""Arithmetic nodes (spec/graph.md §14 "Arithmetic"): MPSNNBinaryArithmeticNode, Addition,
Subtraction, Multiplication, Division, Comparison, and the gradient nodes.

``gradient_filters_with_sources([g])`` returns ``[primary gradient, secondary gradient]``. The
graph configures each gradient kernel so it reproduces the forward factor (inferred from the
kernels' contract): Add/Subtract primary ``primary_scale = forward primary_scale``; Add
secondary ``primary_scale = forward secondary_scale``; Subtract secondary ``primary_scale =
-forward secondary_scale``; Multiply ``primary_scale * secondary_scale = forward primary_scale
* secondary_scale``. The gradient of Add/Subtract reads the operand it differentiates (its
size only); that of Multiply reads the other operand. Division and comparison have no gradient.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ...core.device import Device
from ...core.errors import MPSTypeError, MPSValueError
from ...kernels.arithmetic import (
    FLT_MAX,
    MPSCNNAdd,
    MPSCNNAddGradient,
    MPSCNNDivide,
    MPSCNNMultiply,
    MPSCNNMultiplyGradient,
    MPSCNNSubtract,
    MPSCNNSubtractGradient,
    MPSNNCompare,
    MPSNNComparisonType,
)
from .base import MPSNNArithmeticGradientStateNode, MPSNNFilterNode, MPSNNGradientFilterNode, MPSNNImageNode, MPSNNStateNode

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext

_PARAMS = ("primary_scale", "secondary_scale", "bias", "primary_stride_in_pixels_x", "primary_stride_in_pixels_y",
           "primary_stride_in_feature_channels", "secondary_stride_in_pixels_x", "secondary_stride_in_pixels_y",
           "secondary_stride_in_feature_channels", "minimum_value", "maximum_value")
_DEFAULTS = {"primary_scale": 1.0, "secondary_scale": 1.0, "bias": 0.0, "minimum_value": -FLT_MAX, "maximum_value": FLT_MAX,
             **{k: 1 for k in _PARAMS if "stride" in k}}


class MPSNNBinaryArithmeticNode(MPSNNFilterNode):
    """``MPSNNBinaryArithmeticNode``: base of the element-wise binary nodes.

    ``Node(left, right)`` or ``Node(sources=[left, right])``. Read-write (kernel defaults):
    ``primary_scale`` 1, ``secondary_scale`` 1, ``bias`` 0, ``primary_stride_in_pixels_x/_y``,
    ``primary_stride_in_feature_channels``, ``secondary_stride_*`` (1; 0 broadcasts),
    ``minimum_value`` -FLT_MAX, ``maximum_value`` FLT_MAX. ``gradient_class()`` names the
    gradient node class (None without one)."""

    _kernel_class: type = MPSCNNAdd
    _gradient_node_class: "type | None" = None
    primary_scale: float
    secondary_scale: float
    bias: float
    minimum_value: float
    maximum_value: float
    _state_node_class = MPSNNArithmeticGradientStateNode

    def __init__(self, left_source: MPSNNImageNode | None = None, right_source: MPSNNImageNode | None = None, *,
                 sources: Sequence[MPSNNImageNode] | None = None, padding_policy: Any = None) -> None:
        if type(self) is MPSNNBinaryArithmeticNode:
            raise MPSTypeError("MPSNNBinaryArithmeticNode: abstract; use MPSNNAdditionNode, MPSNNSubtractionNode, "
                               "MPSNNMultiplicationNode, MPSNNDivisionNode or MPSNNComparisonNode")
        if sources is not None:
            if left_source is not None or right_source is not None:
                raise MPSTypeError(f"{type(self).__name__}: give `sources` or `left_source`/`right_source`, not both")
            if len(sources) != 2:
                raise MPSValueError(f"{type(self).__name__}: `sources` (={len(sources)} nodes) must hold exactly 2 image nodes [left, right]")
            left_source, right_source = sources
        if left_source is None or right_source is None:
            raise MPSTypeError(f"{type(self).__name__}: both `left_source` and `right_source` are required")
        super().__init__([left_source, right_source], None, padding_policy)
        for k, v in _DEFAULTS.items():
            setattr(self, k, v)

    @classmethod
    def node_with_sources(cls, sources: Sequence[MPSNNImageNode]) -> "MPSNNBinaryArithmeticNode":
        return cls(sources=sources)

    @classmethod
    def node_with_left_source(cls, left_source: MPSNNImageNode, right_source: MPSNNImageNode) -> "MPSNNBinaryArithmeticNode":
        return cls(left_source, right_source)

    @classmethod
    def gradient_class(cls) -> "type | None":
        return cls._gradient_node_class

    @property
    def _has_gradient(self) -> bool:  # type: ignore[override]
        return self._gradient_node_class is not None

    def gradient_filter_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> MPSNNGradientFilterNode:
        raise MPSValueError(f"{self._describe()}: `gradient_filter_with_sources` is unavailable on arithmetic nodes; "
                            "use `gradient_filters_with_sources` (one node per input)")

    def _configure(self, kernel: Any) -> None:
        for k in _PARAMS:
            setattr(kernel, k, getattr(self, k))

    def _build_kernel(self, device: Device) -> Any:
        k = self._kernel_class(device)
        self._configure(k)
        return k

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        self._configure(kernel)
        kernel.destination_image_allocator = ctx.allocator
        self._apply_padding(kernel)
        if ctx.want_states:
            img, st = kernel.encode(ctx.command_buffer, images[0], images[1], destination_state_is_temporary=False)
            return img, [st]
        return kernel.encode(ctx.command_buffer, images[0], images[1]), []

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        cls = self._gradient_node_class
        if cls is None:
            return [None, None]
        return [cls(gradient_image, forward_filter=self, is_secondary_source_filter=False),
                cls(gradient_image, forward_filter=self, is_secondary_source_filter=True)]


class MPSNNArithmeticGradientNode(MPSNNGradientFilterNode):
    """``MPSNNArithmeticGradientNode``: base of the arithmetic gradient nodes.

    Forms: ``(source_gradient, source_image, gradient_state, is_secondary_source_filter)`` or
    ``(source_gradient, forward_filter=node, is_secondary_source_filter=flag)`` (Apple's
    ``gradientImages:forwardFilter:``). Read-write: ``primary_scale``, ``secondary_scale``,
    ``bias``, ``secondary_stride_*``, ``minimum_value``, ``maximum_value``; read-only
    ``is_secondary_source_filter`` (False: the gradient for the primary / left input)."""

    _kernel_class: type = MPSCNNAddGradient
    _reads_other_operand = False
    _negate_secondary = False

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode | None = None,
                 gradient_state: MPSNNStateNode | None = None, is_secondary_source_filter: bool | None = None, *,
                 forward_filter: MPSNNBinaryArithmeticNode | None = None) -> None:
        name = type(self).__name__
        if is_secondary_source_filter is None:
            raise MPSTypeError(f"{name}: `is_secondary_source_filter` is required")
        sec = bool(is_secondary_source_filter)
        if forward_filter is not None:
            if not isinstance(forward_filter, MPSNNBinaryArithmeticNode):
                raise MPSTypeError(f"{name}: `forward_filter` must be an MPSNNBinaryArithmeticNode, but got {type(forward_filter).__name__}")
            read = (not sec) if self._reads_other_operand else sec
            source_image = forward_filter._source_images[1 if read else 0]
            gradient_state = forward_filter.result_state
        if source_image is None or gradient_state is None:
            raise MPSTypeError(f"{name}: give `source_image` and `gradient_state`, or `forward_filter`")
        super().__init__(source_gradient, [source_image], gradient_state, forward_filter)
        self._is_secondary = sec
        for k in ("bias", "minimum_value", "maximum_value", "secondary_stride_in_pixels_x", "secondary_stride_in_pixels_y",
                  "secondary_stride_in_feature_channels"):
            setattr(self, k, _DEFAULTS[k])
        self.primary_scale, self.secondary_scale = 1.0, 1.0
        if forward_filter is not None:
            fp, fs = forward_filter.primary_scale, forward_filter.secondary_scale
            if self._reads_other_operand:
                self.primary_scale, self.secondary_scale = (fs, fp) if sec else (fp, fs)
            else:
                scale = fs if sec else fp
                self.primary_scale = -scale if (sec and self._negate_secondary) else scale
            self.minimum_value, self.maximum_value = forward_filter.minimum_value, forward_filter.maximum_value

    @property
    def is_secondary_source_filter(self) -> bool:
        return self._is_secondary

    def _build_kernel(self, device: Device) -> Any:
        return self._kernel_class(device, is_secondary_source_filter=self._is_secondary)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        for k in ("primary_scale", "secondary_scale", "bias", "minimum_value", "maximum_value"):
            setattr(kernel, k, getattr(self, k))
        kernel.destination_image_allocator = ctx.allocator
        self._apply_padding(kernel)
        state = ctx.single_state(self, states[0])
        return kernel.encode(ctx.command_buffer, images[0], images[1], state), []


class MPSNNAdditionGradientNode(MPSNNArithmeticGradientNode):
    """``MPSNNAdditionGradientNode``: dL/d(left) or dL/d(right) of an addition."""

    _kernel_class = MPSCNNAddGradient


class MPSNNSubtractionGradientNode(MPSNNArithmeticGradientNode):
    """``MPSNNSubtractionGradientNode``: the secondary filter made from a forward node negates."""

    _kernel_class = MPSCNNSubtractGradient
    _negate_secondary = True


class MPSNNMultiplicationGradientNode(MPSNNArithmeticGradientNode):
    """``MPSNNMultiplicationGradientNode``: reads the other forward operand."""

    _kernel_class = MPSCNNMultiplyGradient
    _reads_other_operand = True


class MPSNNAdditionNode(MPSNNBinaryArithmeticNode):
    """``MPSNNAdditionNode``: ``left + right`` (MPSCNNAdd)."""

    _kernel_class = MPSCNNAdd
    _gradient_node_class = MPSNNAdditionGradientNode


class MPSNNSubtractionNode(MPSNNBinaryArithmeticNode):
    """``MPSNNSubtractionNode``: ``left - right`` (MPSCNNSubtract)."""

    _kernel_class = MPSCNNSubtract
    _gradient_node_class = MPSNNSubtractionGradientNode


class MPSNNMultiplicationNode(MPSNNBinaryArithmeticNode):
    """``MPSNNMultiplicationNode``: ``left * right`` (MPSCNNMultiply)."""

    _kernel_class = MPSCNNMultiply
    _gradient_node_class = MPSNNMultiplicationGradientNode


class MPSNNDivisionNode(MPSNNBinaryArithmeticNode):
    """``MPSNNDivisionNode``: ``left / right`` (MPSCNNDivide); no gradient node."""

    _kernel_class = MPSCNNDivide


class MPSNNComparisonNode(MPSNNBinaryArithmeticNode):
    """``MPSNNComparisonNode``: MPSNNCompare; ``comparison_type`` (default equal) and
    ``threshold`` (default 0.0, mpsnn kernel property); no gradient node."""

    _kernel_class = MPSNNCompare

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comparison_type = MPSNNComparisonType.equal
        self.threshold = 0.0

    def _configure(self, kernel: Any) -> None:
        for k in _PARAMS:
            if k not in ("primary_scale", "secondary_scale", "bias", "minimum_value", "maximum_value"):
                setattr(kernel, k, getattr(self, k))
        kernel.comparison_type = self.comparison_type
        kernel.threshold = self.threshold


__all__ = [
    "MPSNNAdditionGradientNode",
    "MPSNNAdditionNode",
    "MPSNNArithmeticGradientNode",
    "MPSNNBinaryArithmeticNode",
    "MPSNNComparisonNode",
    "MPSNNDivisionNode",
    "MPSNNMultiplicationGradientNode",
    "MPSNNMultiplicationNode",
    "MPSNNSubtractionGradientNode",
    "MPSNNSubtractionNode",
]
