"""MPSCNNLossNode (spec/graph.md §13): MPSCNNLoss in a graph.

``MPSCNNLossNode(source, loss_descriptor)``. Its inputs are the source image and the labels
state node ``input_labels`` (an :class:`MPSNNLabelsNode`; give it a handle to find its slot in
``MPSNNGraph.source_state_handles``). Its result image is the loss gradient, the first gradient
of the backward pass; the loss values go to the labels' loss images. It is its own gradient:
``training_graph()`` on it starts at the filter that produced its source.

In a graph the labels come as one :class:`~mpsnn.MPSCNNLossLabels` per batch image (the batch
encode forms give one per entry); the node encodes the stacked batch image by image with its
labels (``MPSCNNLoss.encode_batch``), so ``reduce_across_batch`` sees the whole batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...core.device import Device
from ...core.errors import MPSTypeError, MPSValueError
from ...images.image import MPSImageDescriptor, MPSTemporaryImage
from ...kernels.loss import MPSCNNLoss
from ...kernels.loss_labels import MPSCNNLossDescriptor
from .base import MPSNNFilterNode, MPSNNGradientFilterNode, MPSNNImageNode, MPSNNLabelsNode

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


def encode_labelled(node: MPSNNFilterNode, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> "MPSImage":
    """Encode a labelled loss kernel (MPSCNNLoss, MPSCNNYOLOLoss) over a stacked batch: one
    labels object per image; the result (gradient) image is allocated by the graph."""
    src = images[0]
    labels = states[0] if isinstance(states[0], list) else [states[0]]
    if len(labels) != src.number_of_images:
        raise MPSValueError(f"{node._describe()}: the source batch holds {src.number_of_images} images but "
                            f"{len(labels)} labels were given (one MPSCNNLossLabels per image)")
    cb = ctx.command_buffer
    node._apply_padding(kernel)
    desc = kernel.destination_image_descriptor([src])
    full = MPSImageDescriptor._trusted(desc.channel_format, desc.width, desc.height, desc.feature_channels, src.number_of_images)
    dest = ctx.allocator.image_for_command_buffer(cb, full, kernel)
    if src.number_of_images == 1:
        kernel.encode(cb, src, labels[0], dest)
        return dest
    stacked = getattr(kernel, "_encode_stacked", None)
    if stacked is not None and stacked(cb, src, labels, dest):
        return dest          # one pass over the stacked batch, without a view per image
    views = src.batch_representation()
    outs = dest.batch_representation()
    kernel.encode_batch(cb, views, labels, outs)
    for v in outs:
        if isinstance(v, MPSTemporaryImage):
            v.read_count = 0  # give the views' holds on ``dest`` back
    if isinstance(src, MPSTemporaryImage):
        src.consume_read()  # the views consumed themselves; this is the node's own read
    return dest


class MPSCNNLossNode(MPSNNFilterNode):
    """``MPSCNNLossNode(source, loss_descriptor)``: see the module docstring. Read-only
    ``input_labels``."""

    _has_gradient = False
    _is_own_gradient = True

    def __init__(self, source: MPSNNImageNode, loss_descriptor: MPSCNNLossDescriptor, padding_policy: Any = None) -> None:
        if loss_descriptor is None:
            raise MPSTypeError(f"{type(self).__name__}: `loss_descriptor` is required")
        self._check_descriptor(loss_descriptor)
        labels = MPSNNLabelsNode()
        super().__init__([source], [labels], padding_policy)
        labels._producer = None
        self._descriptor = loss_descriptor.copy() if hasattr(loss_descriptor, "copy") else loss_descriptor
        self._labels = labels

    def _check_descriptor(self, d: Any) -> None:
        if not isinstance(d, MPSCNNLossDescriptor):
            raise MPSTypeError(f"{type(self).__name__}: `loss_descriptor` must be an MPSCNNLossDescriptor, but got {type(d).__name__}")

    @property
    def input_labels(self) -> MPSNNLabelsNode:
        return self._labels

    @property
    def loss_descriptor(self) -> Any:
        return self._descriptor

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNLoss(device, loss_descriptor=self._descriptor)

    def gradient_filters_with_sources(self, gradient_images: Any) -> list[MPSNNGradientFilterNode]:
        raise MPSValueError(f"{self._describe()}: a loss node is its own gradient; `gradient_filter*` is unavailable "
                            "(call training_graph() on it)")

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_labelled(self, ctx, kernel, images, states), []


__all__ = ["MPSCNNLossNode"]
