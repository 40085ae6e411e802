"""Reduction nodes (spec/graph.md §14 "Reductions", reduce-reshape-slice-concat.md §4).

Apple classes in this module: ``MPSNNUnaryReductionNode`` (abstract; read-write
``clip_rect_source``) and the nodes below, each running the matching mpsnn kernel of
:mod:`mpsnn.kernels.reduce` (Apple's node names say ``Reduction``, the kernels ``Reduce``):

=============================================  ==========================================
node                                           kernel
=============================================  ==========================================
MPSNNReductionRowMinNode / RowMax / RowMean    MPSNNReduceRowMin / RowMax / RowMean
/ RowSum                                       / RowSum
MPSNNReductionColumnMinNode / ... / ColumnSum  MPSNNReduceColumnMin / ... / ColumnSum
MPSNNReductionFeatureChannelsMinNode / Max /   MPSNNReduceFeatureChannelsMin / Max / Mean
Mean
MPSNNReductionFeatureChannelsArgumentMinNode   MPSNNReduceFeatureChannelsArgumentMin / Max
/ ArgumentMaxNode
MPSNNReductionFeatureChannelsSumNode           MPSNNReduceFeatureChannelsSum (``weight``)
=============================================  ==========================================

Not implemented: ``MPSNNReductionSpatialMeanNode`` and ``MPSNNReductionSpatialMeanGradientNode``
(the spec's table lists them, but mpsnn has no spatial-mean kernel nor its gradient kernel).
None of the nodes here has a gradient node (``training_graph`` stops at them).

Decisions where the spec is silent (inferred):

* ``clip_rect_source`` (default :data:`~mpsnn.MPSRectNoClip`) and ``weight`` (default 1.0,
  the kernel's) are read at every encode, so changing them on the node affects the next
  encode of an existing graph.
* A graph runs a node once over the whole batch stacked into one image, so only the x/y part
  of ``clip_rect_source`` (``origin.x/y``, ``size.width/height``) is used: ``origin.z`` and
  ``size.depth`` are ignored and every image of every batch entry is reduced (a 2-D region
  such as ``MTLRegionMake2D`` has depth 1, which must not drop batch entries).
* The result is auto-sized by the kernel (the reduced region's size); the padding policy is
  not used.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

from ...core.device import Device
from ...core.errors import MPSTypeError, value_error
from ...core.structs import MPSRectNoClip, MTLOrigin, MTLRegion, MTLSize
from ...kernels.reduce import (
    MPSNNReduceColumnMax,
    MPSNNReduceColumnMean,
    MPSNNReduceColumnMin,
    MPSNNReduceColumnSum,
    MPSNNReduceFeatureChannelsArgumentMax,
    MPSNNReduceFeatureChannelsArgumentMin,
    MPSNNReduceFeatureChannelsMax,
    MPSNNReduceFeatureChannelsMean,
    MPSNNReduceFeatureChannelsMin,
    MPSNNReduceFeatureChannelsSum,
    MPSNNReduceRowMax,
    MPSNNReduceRowMean,
    MPSNNReduceRowMin,
    MPSNNReduceRowSum,
)
from .base import MPSNNImageNode, UnaryFilterNode, encode_unary

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


class MPSNNUnaryReductionNode(UnaryFilterNode):
    """``MPSNNUnaryReductionNode``: abstract base of the reduction nodes; ``Node(source)``.

    Read-write ``clip_rect_source`` (:class:`~mpsnn.MTLRegion`, default
    :data:`~mpsnn.MPSRectNoClip`): the source region reduced (x/y part only, see the module
    docstring). No gradient node."""

    _kernel_class: type | None = None
    _has_gradient = False
    _state_node_class = None  # type: ignore[assignment]

    def __init__(self, source: MPSNNImageNode, padding_policy: Any = None) -> None:
        if self._kernel_class is None:
            raise MPSTypeError("MPSNNUnaryReductionNode: abstract; use a reduction node such as MPSNNReductionRowMaxNode")
        super().__init__(source, padding_policy)
        self._clip_rect_source = MPSRectNoClip

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode) -> "MPSNNUnaryReductionNode":
        return cls(source)

    @property
    def clip_rect_source(self) -> MTLRegion:
        return self._clip_rect_source

    @clip_rect_source.setter
    def clip_rect_source(self, value: MTLRegion) -> None:
        if not isinstance(value, MTLRegion):
            raise MPSTypeError(f"{type(self).__name__}: `clip_rect_source` must be an MTLRegion, but got {type(value).__name__}")
        self._clip_rect_source = value

    def _build_kernel(self, device: Device) -> Any:
        return self._kernel_class(device)  # type: ignore[misc]

    def _configure(self, kernel: Any) -> None:
        c = self._clip_rect_source
        # x/y only: every image of the (stacked) batch is reduced
        kernel.clip_rect_source = MTLRegion(MTLOrigin(c.origin.x, c.origin.y, 0),
                                            MTLSize(c.size.width, c.size.height, MPSRectNoClip.size.depth))

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        self._configure(kernel)
        return encode_unary(self, ctx, kernel, images)


class MPSNNReductionRowMinNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionRowMinNode(source)``: MPSNNReduceRowMin (per row, min over x)."""

    _kernel_class = MPSNNReduceRowMin


class MPSNNReductionColumnMinNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionColumnMinNode(source)``: MPSNNReduceColumnMin (per column, min over y)."""

    _kernel_class = MPSNNReduceColumnMin


class MPSNNReductionFeatureChannelsMinNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsMinNode(source)``: MPSNNReduceFeatureChannelsMin."""

    _kernel_class = MPSNNReduceFeatureChannelsMin


class MPSNNReductionFeatureChannelsArgumentMinNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsArgumentMinNode(source)``: MPSNNReduceFeatureChannelsArgumentMin."""

    _kernel_class = MPSNNReduceFeatureChannelsArgumentMin


class MPSNNReductionRowMaxNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionRowMaxNode(source)``: MPSNNReduceRowMax (per row, max over x)."""

    _kernel_class = MPSNNReduceRowMax


class MPSNNReductionColumnMaxNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionColumnMaxNode(source)``: MPSNNReduceColumnMax (per column, max over y)."""

    _kernel_class = MPSNNReduceColumnMax


class MPSNNReductionFeatureChannelsMaxNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsMaxNode(source)``: MPSNNReduceFeatureChannelsMax."""

    _kernel_class = MPSNNReduceFeatureChannelsMax


class MPSNNReductionFeatureChannelsArgumentMaxNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsArgumentMaxNode(source)``: MPSNNReduceFeatureChannelsArgumentMax."""

    _kernel_class = MPSNNReduceFeatureChannelsArgumentMax


class MPSNNReductionRowMeanNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionRowMeanNode(source)``: MPSNNReduceRowMean (per row, mean over x)."""

    _kernel_class = MPSNNReduceRowMean


class MPSNNReductionColumnMeanNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionColumnMeanNode(source)``: MPSNNReduceColumnMean (per column, mean over y)."""

    _kernel_class = MPSNNReduceColumnMean


class MPSNNReductionFeatureChannelsMeanNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsMeanNode(source)``: MPSNNReduceFeatureChannelsMean."""

    _kernel_class = MPSNNReduceFeatureChannelsMean


class MPSNNReductionRowSumNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionRowSumNode(source)``: MPSNNReduceRowSum (per row, sum over x)."""

    _kernel_class = MPSNNReduceRowSum


class MPSNNReductionColumnSumNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionColumnSumNode(source)``: MPSNNReduceColumnSum (per column, sum over y)."""

    _kernel_class = MPSNNReduceColumnSum


class MPSNNReductionFeatureChannelsSumNode(MPSNNUnaryReductionNode):
    """``MPSNNReductionFeatureChannelsSumNode(source)``: MPSNNReduceFeatureChannelsSum,
    ``weight · Σ_c x[c]`` per pixel; read-write ``weight`` (float, default 1.0)."""

    _kernel_class = MPSNNReduceFeatureChannelsSum

    def __init__(self, source: MPSNNImageNode, padding_policy: Any = None) -> None:
        super().__init__(source, padding_policy)
        self._weight = 1.0

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise value_error(type(self).__name__, "weight", value, "be a real number")
        self._weight = float(value)

    def _configure(self, kernel: Any) -> None:
        super()._configure(kernel)
        kernel.weight = self._weight


__all__ = [
    "MPSNNReductionColumnMaxNode",
    "MPSNNReductionColumnMeanNode",
    "MPSNNReductionColumnMinNode",
    "MPSNNReductionColumnSumNode",
    "MPSNNReductionFeatureChannelsArgumentMaxNode",
    "MPSNNReductionFeatureChannelsArgumentMinNode",
    "MPSNNReductionFeatureChannelsMaxNode",
    "MPSNNReductionFeatureChannelsMeanNode",
    "MPSNNReductionFeatureChannelsMinNode",
    "MPSNNReductionFeatureChannelsSumNode",
    "MPSNNReductionRowMaxNode",
    "MPSNNReductionRowMeanNode",
    "MPSNNReductionRowMinNode",
    "MPSNNReductionRowSumNode",
    "MPSNNUnaryReductionNode",
]
