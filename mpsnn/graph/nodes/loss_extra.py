"""The remaining loss-related nodes (spec/graph.md §13, §14): MPSCNNYOLOLossNode,
MPSNNForwardLossNode, MPSNNLossGradientNode, MPSNNInitialGradientNode and the protocol
MPSNNLossCallback.

* **MPSCNNYOLOLossNode** ``(source, loss_descriptor: MPSCNNYOLOLossDescriptor)``: the shape of
  :class:`~mpsnn.MPSCNNLossNode` (labels state node ``input_labels``, one
  :class:`~mpsnn.MPSCNNLossLabels` per batch entry, result = the loss gradient, own gradient)
  running :class:`~mpsnn.MPSCNNYOLOLoss`.
* **MPSNNForwardLossNode** ``(source, labels, weights, loss_descriptor)``, ``(source, labels,
  loss_descriptor)``, ``(sources=[logits, labels, weights?], loss_descriptor=...)``: runs
  :class:`~mpsnn.MPSNNForwardLoss`; labels and weights are IMAGE nodes (graph sources or
  results of other filters). Its result is the loss (one value per image for a reduction, the
  per-element losses for ``none``); its result state (an :class:`~mpsnn.MPSNNGradientStateNode`)
  carries the values used (weight, label smoothing, epsilon, delta) to the gradient nodes.
  ``gradient_filter_with_source(s)`` returns the :class:`MPSNNLossGradientNode` of the
  predictions, ``gradient_filters_with_source(s)`` ``[predictions, labels]``.
* **MPSNNLossGradientNode** ``(source_gradient, source_image, labels, weights, gradient_state,
  loss_descriptor, is_labels_gradient_filter)``, the same without ``weights``, and
  ``(sources=[input_gradient, logits, labels, weights?], gradient_state=...,
  loss_descriptor=..., is_labels_gradient_filter=...)``: runs :class:`~mpsnn.MPSNNLossGradient`
  (``compute_label_gradients = is_labels_gradient_filter``). No gradient of it.
* **MPSNNInitialGradientNode** ``(source)``: runs :class:`~mpsnn.MPSNNInitialGradient` (an image
  of ones of the source's size). Append it after any node and call its ``training_graph()``:
  like a loss node it is its own gradient, the walk starts at the producer of its source with
  its result (the ones) as gradient. No gradient of it.
* **MPSNNLossCallback** (protocol, an ABC): ``scalar_weight_for_source_image(source_image,
  destination_image) -> float``; set as ``property_call_back`` on a forward-loss or
  loss-gradient node, it is called just before the node's kernel is encoded and its value
  becomes the kernel's ``weight``.

MPSNNGramMatrixCalculationNode / MPSNNGramMatrixCalculationGradientNode (and
MPSNNGramMatrixCallback) are not here: mpsnn has no MPSNNGramMatrixCalculation kernel.

Decisions (``(inferred)`` where the spec is silent):

* Positional init forms are told apart by type (inferred): a loss descriptor in the
  ``weights`` slot of MPSNNForwardLossNode means the form without weights; a state node in the
  ``weights`` slot (or a descriptor in the ``gradient_state`` slot) of MPSNNLossGradientNode
  means the form without weights. A list as first argument is the ``sources`` form.
* ``is_labels_gradient_filter`` is required (no default) and must be a bool (inferred).
* A cosineDistance descriptor with a reduction other than ``sum`` is refused at node init
  (the kernel's rule, checked early) (inferred).
* The graph encodes the whole stacked batch once, so a callback is called once per graph
  encode with the stacked source and destination images (inferred). The callback's value is
  the weight of that encode; without a callback the descriptor's ``weight`` is used (the
  kernel is reset every encode).
* Gradient nodes made from a forward-loss node do not copy its ``property_call_back``: the
  forward state carries the weight the forward callback returned (Apple: the gradient state
  "carries dynamically computed scalar weights"). A callback set on a gradient node overrides
  the weight (the other dynamic values still come from the forward state) (inferred).
* The forward-loss result is float32 unless its result image node has a ``format``
  (MPSNNForwardLoss documents float32 results; sums of many terms overflow float16)
  (inferred). The loss-gradient result follows the graph's rules (node format, else the
  graph's ``format``).
* The callback of a gradient node gets the forward predictions (``source_image``) and the
  gradient image about to be written (inferred).
* ``training_graph`` through a forward-loss node makes the labels' gradient node too (as
  ``gradient_filters_with_sources`` does); set ``stop_gradient`` on the labels image node to
  skip it. The weights image gets no gradient (inferred).
* Padding policies do not reach these kernels: MPSNNForwardLoss / MPSNNLossGradient process
  whole images and refuse offsets; MPSNNInitialGradient uses the node's policy (same size).
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ...core.device import Device
from ...core.enums import MPSImageFeatureChannelFormat
from ...core.errors import MPSTypeError, MPSValueError, value_error
from ...images.image import MPSImageDescriptor
from ...kernels.loss import MPSNNForwardLoss, MPSNNInitialGradient, MPSNNLossGradient, _LossGradientState
from ...kernels.loss_labels import MPSCNNLossDescriptor, MPSCNNLossType, MPSCNNReductionType
from ...kernels.yolo_loss import MPSCNNYOLOLoss, MPSCNNYOLOLossDescriptor
from .base import (
    MPSNNFilterNode,
    MPSNNGradientFilterNode,
    MPSNNGradientStateNode,
    MPSNNImageNode,
    MPSNNStateNode,
    encode_unary,
)
from .loss import MPSCNNLossNode

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


class MPSNNLossCallback(abc.ABC):
    """Protocol ``MPSNNLossCallback``: supplies the loss ``weight`` at encode time.

    Implement :meth:`scalar_weight_for_source_image`; set the object as ``property_call_back``
    of an :class:`MPSNNForwardLossNode` or :class:`MPSNNLossGradientNode`."""

    @abc.abstractmethod
    def scalar_weight_for_source_image(self, source_image: "MPSImage", destination_image: "MPSImage") -> float:
        """``scalarWeightForSourceImage:destinationImage:``: the weight for this encode."""


def _check_callback(owner: str, value: Any) -> Any:
    if value is not None and not callable(getattr(value, "scalar_weight_for_source_image", None)):
        raise MPSTypeError(f"{owner}: `property_call_back` must be an MPSNNLossCallback (with scalar_weight_for_source_image) "
                           f"or None, but got {type(value).__name__}")
    return value


def _check_loss_descriptor(owner: str, d: Any, forward: bool) -> MPSCNNLossDescriptor:
    if d is None:
        raise MPSTypeError(f"{owner}: `loss_descriptor` is required")
    if not isinstance(d, MPSCNNLossDescriptor):
        raise MPSTypeError(f"{owner}: `loss_descriptor` must be an MPSCNNLossDescriptor, but got {type(d).__name__}")
    if forward and d.loss_type == MPSCNNLossType.cosineDistance and d.reduction_type != MPSCNNReductionType.sum:
        raise value_error(owner, "loss_descriptor.reduction_type", d.reduction_type.name,
                          "be sum for cosineDistance (documented as valid only with sum)")
    return d.copy()


def _shift(owner: str, name: str, positional: Any, keyword: Any) -> Any:
    """A value given positionally in a shorter init form, or by keyword (not both)."""
    if positional is None:
        return keyword
    if keyword is not None:
        raise MPSTypeError(f"{owner}: `{name}` given twice")
    return positional


def _callback_weight(node: MPSNNFilterNode, callback: Any, source: "MPSImage", dest: "MPSImage") -> float:
    value = callback.scalar_weight_for_source_image(source, dest)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(float(value)):
        raise value_error(type(node).__name__, "property_call_back.scalar_weight_for_source_image()", value, "return a finite float")
    return float(value)


class _LossParameterProperties:
    """The read-only descriptor values and the read-write ``property_call_back``."""

    _descriptor: MPSCNNLossDescriptor
    _callback: Any

    loss_type = property(lambda self: self._descriptor.loss_type)
    reduction_type = property(lambda self: self._descriptor.reduction_type)
    number_of_classes = property(lambda self: self._descriptor.number_of_classes)
    reduce_across_batch = property(lambda self: self._descriptor.reduce_across_batch)
    weight = property(lambda self: self._descriptor.weight)
    label_smoothing = property(lambda self: self._descriptor.label_smoothing)
    epsilon = property(lambda self: self._descriptor.epsilon)
    delta = property(lambda self: self._descriptor.delta)

    @property
    def property_call_back(self) -> Any:
        return self._callback

    @property_call_back.setter
    def property_call_back(self, value: Any) -> None:
        self._callback = _check_callback(type(self).__name__, value)

    def _reset(self, kernel: Any) -> None:
        d = self._descriptor
        kernel.weight, kernel.label_smoothing, kernel.epsilon, kernel.delta = d.weight, d.label_smoothing, d.epsilon, d.delta


# -- YOLO ------------------------------------------------------------------------------------------------------


class MPSCNNYOLOLossNode(MPSCNNLossNode):
    """``MPSCNNYOLOLossNode(source, loss_descriptor)``: MPSCNNYOLOLoss in a graph, shaped like
    :class:`~mpsnn.MPSCNNLossNode`: read-only ``input_labels`` (an MPSNNLabelsNode; one
    MPSCNNLossLabels per batch entry), the result is the loss gradient, own gradient
    (``training_graph()`` starts at the producer of its source)."""

    def __init__(self, source: MPSNNImageNode, loss_descriptor: MPSCNNYOLOLossDescriptor, padding_policy: Any = None) -> None:
        super().__init__(source, loss_descriptor, padding_policy)  # type: ignore[arg-type]

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, loss_descriptor: MPSCNNYOLOLossDescriptor) -> "MPSCNNYOLOLossNode":
        return cls(source, loss_descriptor)

    def _check_descriptor(self, d: Any) -> None:
        if not isinstance(d, MPSCNNYOLOLossDescriptor):
            raise MPSTypeError(f"{type(self).__name__}: `loss_descriptor` must be an MPSCNNYOLOLossDescriptor, but got {type(d).__name__}")

    def _build_kernel(self, device: Device) -> Any:
        d: Any = self._descriptor
        return MPSCNNYOLOLoss(device, loss_descriptor=d)


# -- forward loss / loss gradient ------------------------------------------------------------------------------


def _is_image(x: Any) -> bool:
    return isinstance(x, MPSNNImageNode)


class MPSNNLossGradientNode(_LossParameterProperties, MPSNNGradientFilterNode):
    """``MPSNNLossGradientNode``: MPSNNLossGradient in a graph.

    Forms (Apple's labels as keywords):

    * ``(source_gradient, source_image, labels, weights, gradient_state, loss_descriptor,
      is_labels_gradient_filter)``;
    * ``(source_gradient, source_image, labels, gradient_state, loss_descriptor,
      is_labels_gradient_filter)`` (no weights);
    * ``(sources=[input_gradient, logits, labels, weights?], gradient_state=...,
      loss_descriptor=..., is_labels_gradient_filter=...)``.

    ``gradient_state`` (the forward-loss node's ``result_state``) may be None. Read-only:
    ``loss_type``, ``reduction_type``, ``number_of_classes``, ``reduce_across_batch``,
    ``weight``, ``label_smoothing``, ``epsilon``, ``delta``, ``is_labels_gradient_filter``
    (False: the gradient of the predictions; True: of the labels); read-write
    ``property_call_back`` (an :class:`MPSNNLossCallback` or None). No gradient of it.
    """

    def __init__(self, source_gradient: Any = None, source_image: Any = None, labels: Any = None, weights: Any = None,
                 gradient_state: Any = None, loss_descriptor: Any = None, is_labels_gradient_filter: Any = None, *,
                 sources: Sequence[MPSNNImageNode] | None = None, forward: MPSNNFilterNode | None = None) -> None:
        name = type(self).__name__
        if isinstance(source_gradient, (list, tuple)):  # positional sources form: (sources, gradient_state, descriptor, flag)
            if sources is not None:
                raise MPSTypeError(f"{name}: give `sources` once")
            sources, source_gradient = source_gradient, None
            gradient_state = _shift(name, "gradient_state", source_image, gradient_state)
            loss_descriptor = _shift(name, "loss_descriptor", labels, loss_descriptor)
            is_labels_gradient_filter = _shift(name, "is_labels_gradient_filter", weights, is_labels_gradient_filter)
            source_image = labels = weights = None
        elif isinstance(weights, MPSNNStateNode) or isinstance(gradient_state, MPSCNNLossDescriptor):
            # the form without weights, given positionally: (sg, si, labels, gradient_state, descriptor, flag)
            shifted = (weights, gradient_state, loss_descriptor)
            weights = None
            gradient_state = shifted[0]
            if isinstance(shifted[1], MPSCNNLossDescriptor):
                loss_descriptor = shifted[1]
                is_labels_gradient_filter = _shift(name, "is_labels_gradient_filter", shifted[2], is_labels_gradient_filter)
            elif shifted[1] is not None:
                raise MPSTypeError(f"{name}: `gradient_state` given twice (form without weights)")
        if sources is not None:
            if source_gradient is not None or source_image is not None or labels is not None or weights is not None:
                raise MPSTypeError(f"{name}: give `sources` or `source_gradient`/`source_image`/`labels`/`weights`, not both")
            srcs = list(sources)
            if len(srcs) not in (3, 4):
                raise MPSValueError(f"{name}: `sources` (={len(srcs)} nodes) must hold [input_gradient, logits, labels] or "
                                    "[input_gradient, logits, labels, weights]")
            source_gradient, source_image, labels = srcs[:3]
            weights = srcs[3] if len(srcs) == 4 else None
        if source_gradient is None or source_image is None or labels is None:
            raise MPSTypeError(f"{name}: `source_gradient`, `source_image` and `labels` are required")
        if weights is not None and not _is_image(weights):
            raise MPSTypeError(f"{name}: `weights` must be an MPSNNImageNode or None, but got {type(weights).__name__}")
        if gradient_state is not None and not isinstance(gradient_state, MPSNNStateNode):
            raise MPSTypeError(f"{name}: `gradient_state` must be an MPSNNStateNode or None, but got {type(gradient_state).__name__}")
        if is_labels_gradient_filter is None:
            raise MPSTypeError(f"{name}: `is_labels_gradient_filter` is required")
        if not isinstance(is_labels_gradient_filter, (bool, np.bool_)):
            raise MPSTypeError(f"{name}: `is_labels_gradient_filter` must be a bool, but got {type(is_labels_gradient_filter).__name__}")
        self._descriptor = _check_loss_descriptor(name, loss_descriptor, forward=False)
        images = [source_image, labels] + ([weights] if weights is not None else [])
        super().__init__(source_gradient, images, gradient_state, forward)
        self._is_labels = bool(is_labels_gradient_filter)
        self._has_weights = weights is not None
        self._callback: Any = None

    @classmethod
    def node_with_source_gradient(cls, *args: Any, **kwargs: Any) -> "MPSNNLossGradientNode":
        """``nodeWithSourceGradient:sourceImage:labels:[weights:]gradientState:lossDescriptor:isLabelsGradientFilter:``."""
        return cls(*args, **kwargs)

    @classmethod
    def node_with_sources(cls, sources: Sequence[MPSNNImageNode], gradient_state: MPSNNStateNode | None,
                          loss_descriptor: MPSCNNLossDescriptor, is_labels_gradient_filter: bool) -> "MPSNNLossGradientNode":
        """``nodeWithSources:gradientState:lossDescriptor:isLabelsGradientFilter:``."""
        return cls(sources=sources, gradient_state=gradient_state, loss_descriptor=loss_descriptor,
                   is_labels_gradient_filter=is_labels_gradient_filter)

    @property
    def is_labels_gradient_filter(self) -> bool:
        return self._is_labels

    def _build_kernel(self, device: Device) -> Any:
        k = MPSNNLossGradient(device, loss_descriptor=self._descriptor)
        k.compute_label_gradients = self._is_labels
        return k

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        sg, src, lab = images[0], images[1], images[2]
        wt = images[3] if self._has_weights else None
        state = ctx.single_state(self, states[0]) if states else None
        cb = ctx.command_buffer
        kernel.compute_label_gradients = self._is_labels
        self._reset(kernel)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, src.width, src.height, src.feature_channels, src.number_of_images)
        dest = ctx.allocator.image_for_command_buffer(cb, desc, kernel)
        if self._callback is not None:
            weight = _callback_weight(self, self._callback, src, dest)
            if isinstance(state, _LossGradientState):
                # the forward's dynamic values, with the callback's weight
                kernel.label_smoothing, kernel.epsilon, kernel.delta = state.label_smoothing, state.epsilon, state.delta
                state = None
            kernel.weight = weight
        kernel.encode(cb, sg, src, lab, wt, state, dest)
        return dest, []


class MPSNNForwardLossNode(_LossParameterProperties, MPSNNFilterNode):
    """``MPSNNForwardLossNode``: MPSNNForwardLoss in a graph.

    Forms: ``(source, labels, weights, loss_descriptor)``, ``(source, labels,
    loss_descriptor)``, ``(sources=[logits, labels, weights?], loss_descriptor=...)``; labels
    and weights are image nodes. Factories ``node_with_source(...)``, ``node_with_sources(...)``.

    Read-only: ``loss_type``, ``reduction_type``, ``number_of_classes``,
    ``reduce_across_batch``, ``weight``, ``label_smoothing``, ``epsilon``, ``delta`` (the
    descriptor's, copied at init); read-write ``property_call_back`` (an
    :class:`MPSNNLossCallback` or None, default None). The result image holds the losses
    (float32 unless its node has a format); ``result_state`` feeds the gradient nodes.
    ``gradient_filter_with_source(s)`` -> the :class:`MPSNNLossGradientNode` of the
    predictions; ``gradient_filters_with_source(s)`` -> ``[predictions, labels]``.
    """

    _state_node_class = MPSNNGradientStateNode

    def __init__(self, source: Any = None, labels: Any = None, weights: Any = None, loss_descriptor: Any = None, *,
                 sources: Sequence[MPSNNImageNode] | None = None) -> None:
        name = type(self).__name__
        if isinstance(source, (list, tuple)):  # positional sources form: (sources, loss_descriptor)
            if sources is not None:
                raise MPSTypeError(f"{name}: give `sources` once")
            sources, source = source, None
            if labels is not None:
                if loss_descriptor is not None:
                    raise MPSTypeError(f"{name}: too many arguments for the `sources` form")
                loss_descriptor, labels = labels, None
        if weights is not None and not _is_image(weights) and loss_descriptor is None:
            loss_descriptor, weights = weights, None  # (source, labels, loss_descriptor)
        if sources is not None:
            if source is not None or labels is not None or weights is not None:
                raise MPSTypeError(f"{name}: give `sources` or `source`/`labels`/`weights`, not both")
            srcs = list(sources)
            if len(srcs) not in (2, 3):
                raise MPSValueError(f"{name}: `sources` (={len(srcs)} nodes) must hold [logits, labels] or [logits, labels, weights]")
            source, labels = srcs[0], srcs[1]
            weights = srcs[2] if len(srcs) == 3 else None
        if source is None or labels is None:
            raise MPSTypeError(f"{name}: `source` and `labels` are required")
        if weights is not None and not _is_image(weights):
            raise MPSTypeError(f"{name}: `weights` must be an MPSNNImageNode or None, but got {type(weights).__name__}")
        self._descriptor = _check_loss_descriptor(name, loss_descriptor, forward=True)
        super().__init__([source, labels] + ([weights] if weights is not None else []), None, None)
        self._has_weights = weights is not None
        self._callback: Any = None

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, labels: MPSNNImageNode, weights: Any = None,
                         loss_descriptor: Any = None) -> "MPSNNForwardLossNode":
        """``nodeWithSource:labels:[weights:]lossDescriptor:``."""
        return cls(source, labels, weights, loss_descriptor)

    @classmethod
    def node_with_sources(cls, sources: Sequence[MPSNNImageNode], loss_descriptor: MPSCNNLossDescriptor) -> "MPSNNForwardLossNode":
        """``nodeWithSources:lossDescriptor:``."""
        return cls(sources=sources, loss_descriptor=loss_descriptor)

    def _build_kernel(self, device: Device) -> Any:
        return MPSNNForwardLoss(device, loss_descriptor=self._descriptor)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        src, lab = images[0], images[1]
        wt = images[2] if self._has_weights else None
        cb = ctx.command_buffer
        self._reset(kernel)
        if self._result_image.format is None:
            ctx.allocator.fmt = MPSImageFeatureChannelFormat.float32
        dest = ctx.allocator.image_for_command_buffer(cb, kernel.destination_image_descriptor([src]), kernel)
        if self._callback is not None:
            kernel.weight = _callback_weight(self, self._callback, src, dest)
        state = kernel.result_state(src, None, dest) if ctx.want_states else None
        kernel.encode(cb, src, lab, wt, state, dest)
        return dest, ([state] if state is not None else [])

    def _gradient_node(self, gradient_image: MPSNNImageNode, labels_side: bool) -> MPSNNLossGradientNode:
        srcs = self._source_images
        return MPSNNLossGradientNode(gradient_image, srcs[0], srcs[1], srcs[2] if self._has_weights else None, self.result_state,
                                     self._descriptor, labels_side, forward=self)

    @staticmethod
    def _one_gradient(owner: str, gradient_images: Any) -> MPSNNImageNode:
        if isinstance(gradient_images, MPSNNImageNode):
            return gradient_images
        g = list(gradient_images) if gradient_images is not None else []
        if len(g) != 1:
            raise value_error(owner, "gradient_images", f"{len(g)} images", "hold one image: the gradient of the loss result")
        if not _is_image(g[0]):
            raise MPSTypeError(f"{owner}: `gradient_images[0]` must be an MPSNNImageNode, but got {type(g[0]).__name__}")
        return g[0]  # type: ignore[no-any-return]

    def gradient_filter_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> MPSNNGradientFilterNode:
        """The :class:`MPSNNLossGradientNode` of the predictions."""
        return self._gradient_node(self._one_gradient(self._describe(), gradient_images), False)

    def gradient_filters_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> list[MPSNNGradientFilterNode]:
        """``[gradient of the predictions, gradient of the labels]``."""
        g = self._one_gradient(self._describe(), gradient_images)
        return [self._gradient_node(g, False), self._gradient_node(g, True)]

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        g = self._one_gradient(self._describe(), gradient_image)
        nodes: list[MPSNNGradientFilterNode | None] = [self._gradient_node(g, False), self._gradient_node(g, True)]
        return nodes + ([None] if self._has_weights else [])


# -- initial gradient ------------------------------------------------------------------------------------------


class MPSNNInitialGradientNode(MPSNNFilterNode):
    """``MPSNNInitialGradientNode(source)``: MPSNNInitialGradient (an image of ones, the
    source's size). Append it after any node and call ``training_graph()`` on it: it is its
    own gradient, like a loss node (the walk starts at the producer of its source with its
    result as gradient). No gradient of it."""

    _has_gradient = False
    _is_own_gradient = True

    def __init__(self, source: MPSNNImageNode, padding_policy: Any = None) -> None:
        super().__init__([source], None, padding_policy)

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode) -> "MPSNNInitialGradientNode":
        return cls(source)

    def _build_kernel(self, device: Device) -> Any:
        return MPSNNInitialGradient(device)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_unary(self, ctx, kernel, images)


__all__ = [
    "MPSCNNYOLOLossNode",
    "MPSNNForwardLossNode",
    "MPSNNInitialGradientNode",
    "MPSNNLossCallback",
    "MPSNNLossGradientNode",
]
