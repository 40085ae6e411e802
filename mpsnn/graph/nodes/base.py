"""Graph node base classes (spec/graph.md §2-8): MPSHandle, MPSNNImageNode, MPSNNStateNode and
its subclasses, MPSNNFilterNode, MPSNNGradientFilterNode, MPSNNTrainableNode.

Nodes are light placeholders: no device, no weights. An :class:`~mpsnn.MPSNNGraph` turns them
into kernels when it is built (``_build_kernel``) and encodes them (``_encode``).

Ownership: a consuming filter keeps its source image nodes (and their producers) alive, and an
image node keeps its producer (Python has no reason for Apple's weak parent pointer).

Decisions (``(inferred)`` where the spec is silent):

* ``result_state`` is None for filters that make no state, as documented (CONFLICT §15).
* A filter node with no ``padding_policy`` given uses ``sizeSame | alignCentered |
  addRemainderToTopLeft`` (16), the base default **[bin]**; gradient nodes take the forward
  node's policy through ``inverse()`` when the policy has one.
* An image node's ``format`` of None means "the graph's ``format``"; a result image of a
  gradient node made by ``training_graph`` gets the same default (Apple's sample sets float32
  in its node handler).
"""
from __future__ import annotations

import abc
import itertools
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ...core.enums import MPSImageFeatureChannelFormat, MPSNNPaddingMethod, MPSNNTrainingStyle
from ...core.errors import MPSTypeError, MPSValueError, value_error
from ...core.padding import MPSNNDefaultPadding, MPSNNPadding, as_padding

if TYPE_CHECKING:  # pragma: no cover
    from ...core.device import Device
    from ...images.image import MPSImage
    from ..graph import _EncodeContext

_DEFAULT_METHOD = int(MPSNNPaddingMethod.sizeSame | MPSNNPaddingMethod.alignCentered | MPSNNPaddingMethod.addRemainderToTopLeft)
_serial = itertools.count()


class MPSHandle(abc.ABC):
    """Protocol ``MPSHandle``: a user tag on an image or state node; ``label()`` names it.

    Any object may serve as a handle (the graph only stores and returns it); subclass this
    ABC to document the intent. :meth:`label` is what :attr:`MPSNNGraph.debug_description`
    prints.
    """

    @abc.abstractmethod
    def label(self) -> str | None:
        """A human-readable name (may be None)."""


def handle_label(handle: Any) -> str | None:
    """The label of ``handle`` (``label()`` method, ``label`` attribute, or a string)."""
    if handle is None:
        return None
    if isinstance(handle, str):
        return handle
    lab = getattr(handle, "label", None)
    if callable(lab):
        lab = lab()
    return None if lab is None else str(lab)


def _check_format(owner: str, value: Any) -> MPSImageFeatureChannelFormat | None:
    if value is None:
        return None
    try:
        fmt = MPSImageFeatureChannelFormat(value)
    except (ValueError, TypeError):
        raise value_error(owner, "format", value, "be an MPSImageFeatureChannelFormat") from None
    if fmt == MPSImageFeatureChannelFormat.none:
        return None
    return fmt


class MPSNNImageNode:
    """``MPSNNImageNode``: placeholder for an image (or image batch) in a graph.

    Args:
        handle: an :class:`MPSHandle` (any object) identifying the image, or None.

    Properties: ``handle``, ``format`` (None: the graph's ``format``), ``image_allocator``
    (default :attr:`MPSTemporaryImage.default_allocator`; ignored for a graph's results),
    ``export_from_graph`` (keep this intermediate valid and return it through
    ``intermediate_images``), ``synchronize_resource`` (no effect: images are host-readable
    after the command buffer completes), ``stop_gradient`` (``training_graph`` does not
    propagate gradients past this image).

    Graph inputs are made by the user (``MPSNNImageNode(handle)``); every other image node is
    a filter's ``result_image``. Image sizes come from the images given at encode time.
    """

    def __init__(self, handle: Any = None) -> None:
        self.handle = handle
        self._format: MPSImageFeatureChannelFormat | None = None
        from ...images.image import MPSTemporaryImage
        self._allocator: Any = MPSTemporaryImage.default_allocator
        self.export_from_graph = False
        self.synchronize_resource = False
        self.stop_gradient = False
        self._producer: MPSNNFilterNode | None = None
        self._serial = next(_serial)

    @classmethod
    def node_with_handle(cls, handle: Any = None) -> "MPSNNImageNode":
        return cls(handle)

    @classmethod
    def exported_node_with_handle(cls, handle: Any = None) -> "MPSNNImageNode":
        """``exportedNodeWithHandle:``: a node with ``export_from_graph`` set."""
        node = cls(handle)
        node.export_from_graph = True
        return node

    @property
    def format(self) -> MPSImageFeatureChannelFormat | None:
        return self._format

    @format.setter
    def format(self, value: Any) -> None:
        self._format = _check_format("MPSNNImageNode", value)

    @property
    def image_allocator(self) -> Any:
        return self._allocator

    @image_allocator.setter
    def image_allocator(self, value: Any) -> None:
        from ...images.image import MPSImageAllocator
        if not isinstance(value, MPSImageAllocator):
            raise MPSTypeError(f"MPSNNImageNode: `image_allocator` must be an MPSImageAllocator, but got {type(value).__name__}")
        self._allocator = value

    @property
    def producer(self) -> "MPSNNFilterNode | None":
        """The filter node whose result this is (None for a graph input); mpsnn extension."""
        return self._producer

    def _describe(self) -> str:
        lab = handle_label(self.handle)
        if lab:
            return repr(lab)
        if self._producer is not None:
            return f"result of {self._producer._describe()}"
        return f"image#{self._serial}"

    def __repr__(self) -> str:
        return f"<MPSNNImageNode {self._describe()}>"


class MPSNNStateNode:
    """``MPSNNStateNode``: placeholder for an :class:`~mpsnn.MPSState` in a graph.

    Made by filter nodes (``result_state(s)``) or, for loss labels, by the loss node
    (``input_labels``). Properties: ``handle``, ``export_from_graph`` (return the state through
    ``destination_states``), ``synchronize_resource`` (no effect).
    """

    def __init__(self, producer: "MPSNNFilterNode | None" = None, handle: Any = None) -> None:
        self.handle = handle
        self.export_from_graph = False
        self.synchronize_resource = False
        self._producer = producer
        self._serial = next(_serial)

    @property
    def producer(self) -> "MPSNNFilterNode | None":
        return self._producer

    def _describe(self) -> str:
        lab = handle_label(self.handle)
        if lab:
            return repr(lab)
        if self._producer is not None:
            return f"state of {self._producer._describe()}"
        return f"{type(self).__name__}#{self._serial}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._describe()}>"


class MPSNNGradientStateNode(MPSNNStateNode):
    """``MPSNNGradientStateNode``: the forward -> gradient information of one filter."""


class MPSCNNConvolutionGradientStateNode(MPSNNGradientStateNode):
    """``MPSCNNConvolutionGradientStateNode``."""


class MPSCNNConvolutionTransposeGradientStateNode(MPSCNNConvolutionGradientStateNode):
    """``MPSCNNConvolutionTransposeGradientStateNode``."""


class MPSNNBinaryGradientStateNode(MPSNNStateNode):
    """``MPSNNBinaryGradientStateNode``."""


class MPSNNMultiaryGradientStateNode(MPSNNStateNode):
    """``MPSNNMultiaryGradientStateNode``."""


class MPSNNArithmeticGradientStateNode(MPSNNBinaryGradientStateNode):
    """``MPSNNArithmeticGradientStateNode``."""


class MPSNNLabelsNode(MPSNNStateNode):
    """``MPSNNLabelsNode``: placeholder for the :class:`~mpsnn.MPSCNNLossLabels` of a loss node
    (one labels object per batch entry in the batch encode forms)."""


class MPSNNTrainableNode(abc.ABC):  # noqa: B024 - a protocol with a property only
    """Protocol ``MPSNNTrainableNode``: a node with a ``training_style``
    (:class:`~mpsnn.MPSNNTrainingStyle`, default ``updateDeviceGPU``)."""

    def _init_trainable(self) -> None:
        self._training_style = MPSNNTrainingStyle.updateDeviceGPU

    @property
    def training_style(self) -> MPSNNTrainingStyle:
        return self._training_style

    @training_style.setter
    def training_style(self, value: Any) -> None:
        try:
            self._training_style = MPSNNTrainingStyle(value)
        except (ValueError, TypeError):
            raise value_error(type(self).__name__, "training_style", value, "be an MPSNNTrainingStyle") from None


NodeHandler = Callable[["MPSNNFilterNode", "MPSNNFilterNode | None", "MPSNNImageNode", "MPSNNImageNode"], Any]


def _check_image_node(owner: str, name: str, node: Any) -> "MPSNNImageNode":
    if not isinstance(node, MPSNNImageNode):
        raise MPSTypeError(f"{owner}: `{name}` must be an MPSNNImageNode, but got {type(node).__name__}")
    return node


def _check_state_node(owner: str, name: str, node: Any) -> MPSNNStateNode:
    if not isinstance(node, MPSNNStateNode):
        raise MPSTypeError(f"{owner}: `{name}` must be an MPSNNStateNode, but got {type(node).__name__}")
    return node


class MPSNNFilterNode:
    """``MPSNNFilterNode``: abstract base of every filter node (instantiate a subclass).

    Members: ``result_image`` (the output image node), ``result_states`` / ``result_state``
    (state nodes the filter makes; None when it makes none), ``padding_policy`` (an
    :class:`~mpsnn.MPSNNPadding`; default ``sizeSame | alignCentered |
    addRemainderToTopLeft``), ``label``; ``gradient_filter(with_source=...)``,
    ``gradient_filters(with_sources=...)`` and ``training_graph(source_gradient=None,
    node_handler=None)``.

    Subclass contract (mpsnn): ``_build_kernel(device)`` returns the configured kernel(s) when a
    graph is built; ``_encode(ctx, kernel, images, states)`` encodes them and returns the result
    image and the result states; ``_make_gradient_nodes(gradient_image)`` returns one gradient
    node per source image (None where no gradient exists).
    """

    #: class name of the kernel this node runs (debug description)
    _kernel_name = ""
    #: False for filters without a gradient (propagation ends there)
    _has_gradient = True
    #: the class of the state node ``result_states`` holds (None: the filter makes none)
    _state_node_class: type[MPSNNStateNode] | None = None

    def __init__(self, source_images: Sequence[MPSNNImageNode], source_states: Sequence[MPSNNStateNode] | None = None,
                 padding_policy: Any = None) -> None:
        owner = type(self).__name__
        if source_images is None or isinstance(source_images, MPSNNImageNode) or len(source_images) == 0:
            raise value_error(owner, "source_images", source_images, "be a non-empty list of MPSNNImageNode")
        self._source_images = [_check_image_node(owner, f"source_images[{k}]", s) for k, s in enumerate(source_images)]
        if source_states is not None and len(source_states) == 0:
            raise value_error(owner, "source_states", source_states, "be None or a non-empty list of MPSNNStateNode")
        self._source_states = [_check_state_node(owner, f"source_states[{k}]", s) for k, s in enumerate(source_states or [])]
        self._result_image = MPSNNImageNode(None)
        self._result_image._producer = self
        self._result_states: list[MPSNNStateNode] | None = None
        if self._state_node_class is not None:
            self._result_states = [self._state_node_class(self)]
        self._padding: MPSNNPadding = MPSNNDefaultPadding.padding_with_method(_DEFAULT_METHOD)
        if padding_policy is not None:
            self.padding_policy = padding_policy
        self._label: str | None = None
        self._serial = next(_serial)

    # -- Apple's members ---------------------------------------------------------------------------
    @property
    def result_image(self) -> MPSNNImageNode:
        return self._result_image

    @property
    def result_states(self) -> list[MPSNNStateNode] | None:
        return None if self._result_states is None else list(self._result_states)

    @property
    def result_state(self) -> MPSNNStateNode | None:
        return self._result_states[0] if self._result_states else None

    @property
    def padding_policy(self) -> MPSNNPadding:
        return self._padding

    @padding_policy.setter
    def padding_policy(self, value: Any) -> None:
        self._padding = as_padding(value, type(self).__name__)

    @property
    def label(self) -> str | None:
        return self._label

    @label.setter
    def label(self, value: str | None) -> None:
        self._label = None if value is None else str(value)

    @property
    def source_images(self) -> list[MPSNNImageNode]:
        """The source image nodes, in order (mpsnn extension)."""
        return list(self._source_images)

    @property
    def source_states(self) -> list[MPSNNStateNode]:
        """The source state nodes, in order (mpsnn extension)."""
        return list(self._source_states)

    def gradient_filter_with_source(self, gradient_image: MPSNNImageNode) -> "MPSNNGradientFilterNode":
        """``gradientFilterWithSource:``: the gradient node of a single-input filter."""
        return self.gradient_filter_with_sources([gradient_image])

    def gradient_filter_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> "MPSNNGradientFilterNode":
        """``gradientFilterWithSources:``: single-input filters only."""
        owner = self._describe()
        if len(self._source_images) != 1:
            raise MPSValueError(f"{owner}: `gradient_filter_with_sources` is for single-input filters; "
                                f"this one has {len(self._source_images)} inputs, use `gradient_filters_with_sources`")
        return self.gradient_filters_with_sources(gradient_images)[0]

    def gradient_filters_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> list["MPSNNGradientFilterNode"]:
        """``gradientFiltersWithSources:``: one gradient node per forward input."""
        owner = self._describe()
        if not self._has_gradient:
            raise MPSValueError(f"{owner}: {type(self).__name__} has no gradient node")
        if isinstance(gradient_images, MPSNNImageNode):
            gradient_images = [gradient_images]
        if not gradient_images:
            raise value_error(owner, "gradient_images", gradient_images, "hold the gradient of the result image")
        g = [_check_image_node(owner, f"gradient_images[{k}]", x) for k, x in enumerate(gradient_images)]
        nodes = self._make_gradient_nodes(g[0] if len(g) == 1 else g)  # type: ignore[arg-type]
        if any(n is None for n in nodes):
            raise MPSValueError(f"{owner}: {type(self).__name__} has no gradient for some of its inputs")
        return nodes  # type: ignore[return-value]

    def gradient_filters_with_source(self, gradient_image: MPSNNImageNode) -> list["MPSNNGradientFilterNode"]:
        return self.gradient_filters_with_sources([gradient_image])

    #: Swift spellings: ``gradientFilter(withSource:)`` ...
    def gradient_filter(self, with_source: MPSNNImageNode | None = None, with_sources: Sequence[MPSNNImageNode] | None = None) -> "MPSNNGradientFilterNode":
        if (with_source is None) == (with_sources is None):
            raise MPSValueError(f"{self._describe()}: `gradient_filter` takes exactly one of `with_source` / `with_sources`")
        return self.gradient_filter_with_source(with_source) if with_source is not None else self.gradient_filter_with_sources(with_sources)  # type: ignore[arg-type]

    def gradient_filters(self, with_source: MPSNNImageNode | None = None, with_sources: Sequence[MPSNNImageNode] | None = None) -> list["MPSNNGradientFilterNode"]:
        if (with_source is None) == (with_sources is None):
            raise MPSValueError(f"{self._describe()}: `gradient_filters` takes exactly one of `with_source` / `with_sources`")
        return self.gradient_filters_with_source(with_source) if with_source is not None else self.gradient_filters_with_sources(with_sources)  # type: ignore[arg-type]

    def training_graph(self, source_gradient: MPSNNImageNode | None = None, node_handler: NodeHandler | None = None) -> list["MPSNNFilterNode"] | None:
        """``trainingGraphWithSourceGradient:nodeHandler:`` (spec §8.2): build the gradient graph
        behind this node; returns the terminal filter nodes (None when nothing was made)."""
        from ..training import build_training_graph
        return build_training_graph(self, source_gradient, node_handler)

    training_graph_with_source_gradient = training_graph

    # -- subclass contract ------------------------------------------------------------------------
    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list["MPSNNGradientFilterNode | None"]:
        raise MPSValueError(f"{self._describe()}: {type(self).__name__} has no gradient node")

    def _build_kernel(self, device: "Device") -> Any:
        raise NotImplementedError(type(self).__name__)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        raise NotImplementedError(type(self).__name__)

    def _reload(self, kernel: Any) -> None:
        """Re-read parameters from data sources (``MPSNNGraph.reload_from_data_sources``)."""

    def _is_trainable_update(self) -> bool:
        """True when this node must run to update parameters (pruning, spec §9)."""
        return False

    # -- helpers ----------------------------------------------------------------------------------
    def _describe(self) -> str:
        name = type(self).__name__
        return f"{name} {self._label!r}" if self._label else f"{name}#{self._serial}"

    def _apply_padding(self, kernel: Any) -> None:
        kernel.padding = self._padding

    def __repr__(self) -> str:
        return f"<{self._describe()}>"


class MPSNNGradientFilterNode(MPSNNFilterNode):
    """``MPSNNGradientFilterNode``: base of every backward node. Inputs: the incoming gradient,
    the forward source image(s) and the forward filter's gradient state. Gradients of
    gradients are not supported: the ``gradient_filter*`` methods raise."""

    _has_gradient = False

    def __init__(self, source_gradient: MPSNNImageNode, source_images: Sequence[MPSNNImageNode],
                 gradient_state: MPSNNStateNode | None, forward: MPSNNFilterNode | None = None,
                 padding_policy: Any = None) -> None:
        super().__init__([source_gradient, *source_images], [gradient_state] if gradient_state is not None else None, padding_policy)
        self._forward = forward
        self._padding_explicit = padding_policy is not None
        if forward is not None and padding_policy is None:
            inv = getattr(forward.padding_policy, "inverse", None)
            pol = inv() if callable(inv) else None
            self._padding = pol if isinstance(pol, MPSNNPadding) else forward.padding_policy

    @MPSNNFilterNode.padding_policy.setter  # type: ignore[attr-defined]
    def padding_policy(self, value: Any) -> None:
        self._padding = as_padding(value, type(self).__name__)
        self._padding_explicit = True

    def _apply_padding(self, kernel: Any) -> None:
        # the gradient state sizes the result; a policy reaches the kernel only when set
        # explicitly on this node (the inverted forward policy is informative)
        if getattr(self, "_padding_explicit", False):
            kernel.padding = self._padding

    @property
    def forward_node(self) -> MPSNNFilterNode | None:
        """The forward node this gradient node mirrors (mpsnn extension)."""
        return self._forward

    def _no_gradient(self, what: str) -> Any:
        raise MPSValueError(f"{self._describe()}: gradient nodes have no gradient ({what} is unavailable)")

    def gradient_filter_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> "MPSNNGradientFilterNode":
        return self._no_gradient("gradient_filter_with_sources")  # type: ignore[no-any-return]

    def gradient_filters_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> list["MPSNNGradientFilterNode"]:
        return self._no_gradient("gradient_filters_with_sources")  # type: ignore[no-any-return]

    def gradient_filter(self, with_source: Any = None, with_sources: Any = None) -> "MPSNNGradientFilterNode":
        return self._no_gradient("gradient_filter")  # type: ignore[no-any-return]

    def gradient_filters(self, with_source: Any = None, with_sources: Any = None) -> list["MPSNNGradientFilterNode"]:
        return self._no_gradient("gradient_filters")  # type: ignore[no-any-return]

    def training_graph(self, source_gradient: MPSNNImageNode | None = None, node_handler: NodeHandler | None = None) -> list[MPSNNFilterNode] | None:
        return self._no_gradient("training_graph")  # type: ignore[no-any-return]

    training_graph_with_source_gradient = training_graph


# -- generic encodes used by most node families --------------------------------------------------------

def encode_unary(node: MPSNNFilterNode, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"]) -> tuple["MPSImage", list[Any]]:
    """Encode a single-input kernel through its auto-sizing form (the padding policy sizes the
    result); the result state is made only when the graph consumes or exports it."""
    kernel.destination_image_allocator = ctx.allocator
    node._apply_padding(kernel)
    if ctx.want_states:
        img, st = kernel.encode(ctx.command_buffer, images[0], destination_state_is_temporary=False)
        return img, [st]
    return kernel.encode(ctx.command_buffer, images[0]), []


def encode_gradient(node: MPSNNFilterNode, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
    """Encode a gradient kernel ``(source_gradient, source_image, gradient_state)``; the state
    gives the result its size (the forward source's)."""
    kernel.destination_image_allocator = ctx.allocator
    node._apply_padding(kernel)
    state = ctx.single_state(node, states[0]) if states else None
    return kernel.encode(ctx.command_buffer, images[0], images[1], state), []


class UnaryFilterNode(MPSNNFilterNode):
    """A single-input forward node whose kernel is encoded by :func:`encode_unary` and whose
    gradient node is ``_gradient_class(sg, source, result_state, forward=self)``."""

    _gradient_class: type | None = None
    _state_node_class = MPSNNGradientStateNode

    def __init__(self, source: MPSNNImageNode, padding_policy: Any = None) -> None:
        super().__init__([source], None, padding_policy)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_unary(self, ctx, kernel, images)

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list["MPSNNGradientFilterNode | None"]:
        if self._gradient_class is None:
            return [None]
        cls: Any = self._gradient_class
        return [cls._from_forward(self, gradient_image)]


class GradientNode(MPSNNGradientFilterNode):
    """A gradient node encoded by :func:`encode_gradient`. ``_from_forward(forward, sg)`` makes
    one from its forward node, copying the forward parameters (subclasses override)."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 forward: MPSNNFilterNode | None = None, padding_policy: Any = None) -> None:
        super().__init__(source_gradient, [source_image], gradient_state, forward, padding_policy)

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        return cls(gradient_image, forward._source_images[0], forward.result_state, forward=forward)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_gradient(self, ctx, kernel, images, states)


__all__ = [
    "MPSCNNConvolutionGradientStateNode",
    "MPSCNNConvolutionTransposeGradientStateNode",
    "MPSHandle",
    "MPSNNArithmeticGradientStateNode",
    "MPSNNBinaryGradientStateNode",
    "MPSNNFilterNode",
    "MPSNNGradientFilterNode",
    "MPSNNGradientStateNode",
    "MPSNNImageNode",
    "MPSNNLabelsNode",
    "MPSNNMultiaryGradientStateNode",
    "MPSNNStateNode",
    "MPSNNTrainableNode",
]
