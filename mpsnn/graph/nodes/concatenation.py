"""Concatenation nodes (spec/graph.md §14, reduce-reshape-slice-concat.md §7):
``MPSNNConcatenationNode`` and ``MPSNNConcatenationGradientNode``.

``MPSNNConcatenationNode(sources=[a, b, ...])`` (also positional: ``(sources)``) joins its
sources along the feature channels: source ``i`` with ``C_i`` channels occupies result channels
``[O_i, O_i + C_i)``, ``O_0 = 0``, ``O_{i+1} = O_i + ceil(C_i/4)·4`` (23 channels take 24
slots); the result has ``Σ ceil(C_i/4)·4`` channels (the last source padded too) and the
padding slots hold 0. ``gradient_filters_with_sources([g])`` returns one
``MPSNNConcatenationGradientNode`` per source (``gradient_filter_with_sources`` is
unavailable); gradient node ``i`` copies ``g[..., O_i:O_i + C_i]`` out of the incoming gradient.

Decisions (inferred where the spec is silent):

* There is no concatenation kernel: Apple lets the producers write at channel offsets into a
  shared image. mpsnn copies every source into the result (one copy per source, on the
  command buffer; same numbers as Apple's "free" form, a copy being exact). The copy rounds
  once to the result's format.
* All sources must have the same width, height and number of images (the batch), else
  :class:`~mpsnn.MPSValueError` naming the node. A source node may appear more than once.
* The channel offsets depend on the source channel counts, which are only known at encode
  time. The forward node therefore makes a result state (an :class:`MPSNNGradientStateNode`
  in the node graph; at encode time an :class:`MPSNNConcatenationState`, a small
  :class:`~mpsnn.MPSState` with ``feature_channel_offsets`` and ``feature_channels``, one per
  source) and each gradient node reads it (``gradient_state``, required) together with its
  source index. The source index is found from ``source_image`` among the forward node's
  sources (the gradient state's producer); a source that appears several times makes that
  ambiguous: such gradient nodes must come from ``gradient_filters_with_sources``.
* The gradient node's result has the forward source's size and channel count; its
  ``source_image`` (the forward source) is read for its shape only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ...core.device import Device
from ...core.errors import MPSTypeError, MPSValueError, value_error
from ...images.image import MPSImageDescriptor, MPSTemporaryImage
from ...images.state import MPSState
from ...kernels.reshape import concatenation_feature_channels, concatenation_offsets
from .base import MPSNNFilterNode, MPSNNGradientFilterNode, MPSNNGradientStateNode, MPSNNImageNode, MPSNNStateNode

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


class MPSNNConcatenationState(MPSState):
    """The result state of a concatenation node's encode (mpsnn): where each source went.

    ``feature_channel_offsets[i]`` = ``O_i``, ``feature_channels[i]`` = ``C_i``,
    ``result_feature_channels`` = the result's channel count."""

    def __init__(self, device: Device, offsets: Sequence[int], channels: Sequence[int], total: int) -> None:
        super().__init__(device)
        self.feature_channel_offsets = list(offsets)
        self.feature_channels = list(channels)
        self.result_feature_channels = total


class _ChannelCopy:
    """What the graph holds as the concatenation nodes' "kernel": a channel-range copy."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"<channel copy on {self.device}>"


def _consume(images: Sequence["MPSImage"]) -> None:
    """One read of every unique temporary image the node read."""
    seen: set[int] = set()
    for img in images:
        if id(img) in seen:
            continue
        seen.add(id(img))
        if isinstance(img, MPSTemporaryImage):
            img.consume_read()


class MPSNNConcatenationGradientNode(MPSNNGradientFilterNode):
    """``MPSNNConcatenationGradientNode(source_gradient, source_image, gradient_state)``: the
    gradient for one source of a concatenation: ``g[..., O_i:O_i + C_i]`` (a copy).

    ``source_image`` is the forward source ``i``; ``gradient_state`` the forward concatenation
    node's ``result_state`` (required: it gives the channel offsets). Usually made by the
    forward node's ``gradient_filters_with_sources``."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode,
                 forward: MPSNNFilterNode | None = None, *, _source_index: int | None = None) -> None:
        owner = type(self).__name__
        if not isinstance(gradient_state, MPSNNStateNode):
            raise MPSTypeError(f"{owner}: `gradient_state` must be the result_state of an MPSNNConcatenationNode, "
                               f"but got {type(gradient_state).__name__}")
        fwd = gradient_state.producer if forward is None else forward
        if not isinstance(fwd, MPSNNConcatenationNode) or gradient_state is not fwd.result_state:
            raise MPSTypeError(f"{owner}: `gradient_state` must be the result_state of an MPSNNConcatenationNode "
                               "(it carries the channel offsets)")
        if _source_index is None:
            hits = [k for k, s in enumerate(fwd._source_images) if s is source_image]
            if not hits:
                raise MPSValueError(f"{owner}: `source_image` must be one of the forward concatenation node's sources")
            if len(hits) > 1:
                raise MPSValueError(f"{owner}: `source_image` appears {len(hits)} times among the forward concatenation node's "
                                    "sources; make the gradient nodes with `gradient_filters_with_sources`")
            _source_index = hits[0]
        super().__init__(source_gradient, [source_image], gradient_state, fwd)
        self._index = _source_index

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode,
                                  gradient_state: MPSNNStateNode) -> "MPSNNConcatenationGradientNode":
        return cls(source_gradient, source_image, gradient_state)

    @property
    def source_index(self) -> int:
        """Which forward source this node differentiates (mpsnn extension)."""
        return self._index

    def _build_kernel(self, device: Device) -> Any:
        return _ChannelCopy(device)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        owner = type(self).__name__
        g, src = images[0], images[1]
        st = ctx.single_state(self, states[0])
        if not isinstance(st, MPSNNConcatenationState):
            raise MPSTypeError(f"{owner}: `gradient_state` must be the MPSNNConcatenationState of the forward concatenation, "
                               f"but got {type(st).__name__}")
        i = self._index
        if i >= len(st.feature_channels):
            raise value_error(owner, "gradient_state", f"a state of {len(st.feature_channels)} sources", f"hold source index {i}")
        o, c = st.feature_channel_offsets[i], st.feature_channels[i]
        if src.feature_channels != c:
            raise value_error(owner, "source_image.feature_channels", src.feature_channels,
                              f"be the {c} channels forward source {i} had")
        if (g.width, g.height, g.number_of_images) != (src.width, src.height, src.number_of_images):
            raise value_error(owner, "source_gradient", f"{g.number_of_images}x{g.height}x{g.width} (N x H x W)",
                              f"match source_image's {src.number_of_images}x{src.height}x{src.width}")
        if g.feature_channels < o + c:
            raise value_error(owner, "source_gradient.feature_channels", g.feature_channels,
                              f"be >= {o + c} (source {i} occupies channels [{o}, {o + c}) of the concatenation)")
        cb = ctx.command_buffer
        desc = MPSImageDescriptor._trusted(g.feature_channel_format, src.width, src.height, c, g.number_of_images)
        dest = ctx.allocator.image_for_command_buffer(cb, desc, None)
        with cb.encoding(owner):
            dest.store(g.tensor[..., o:o + c])
        _consume([g, src])
        return dest, []


class MPSNNConcatenationNode(MPSNNFilterNode):
    """``MPSNNConcatenationNode(sources)``: concatenation along the feature channels (module
    docstring for the channel layout). ``node_with_sources(sources)`` is Apple's factory;
    ``result_state`` carries the channel offsets to the gradient nodes."""

    _state_node_class = MPSNNGradientStateNode

    def __init__(self, sources: Sequence[MPSNNImageNode], padding_policy: Any = None) -> None:
        super().__init__(sources, None, padding_policy)

    @classmethod
    def node_with_sources(cls, sources: Sequence[MPSNNImageNode]) -> "MPSNNConcatenationNode":
        return cls(sources)

    def _build_kernel(self, device: Device) -> Any:
        return _ChannelCopy(device)

    def gradient_filter_with_sources(self, gradient_images: Sequence[MPSNNImageNode]) -> MPSNNGradientFilterNode:
        raise MPSValueError(f"{self._describe()}: `gradient_filter_with_sources` is unavailable on MPSNNConcatenationNode; "
                            "use `gradient_filters_with_sources` (one gradient node per source)")

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        if not isinstance(gradient_image, MPSNNImageNode):
            raise MPSValueError(f"{self._describe()}: the gradient of a concatenation is one image (the gradient of its result), "
                                f"but got {len(gradient_image)} images")
        state = self.result_state
        assert state is not None
        return [MPSNNConcatenationGradientNode(gradient_image, src, state, self, _source_index=k)
                for k, src in enumerate(self._source_images)]

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        owner = type(self).__name__
        first = images[0]
        for k, img in enumerate(images[1:], 1):
            if (img.width, img.height, img.number_of_images) != (first.width, first.height, first.number_of_images):
                raise value_error(owner, f"sources[{k}]", f"{img.number_of_images}x{img.height}x{img.width} (N x H x W)",
                                  f"match sources[0]'s {first.number_of_images}x{first.height}x{first.width}: "
                                  "concatenated images must agree in width, height and batch")
        channels = [img.feature_channels for img in images]
        offsets = concatenation_offsets(channels)
        total = concatenation_feature_channels(channels)
        cb = ctx.command_buffer
        desc = MPSImageDescriptor._trusted(first.feature_channel_format, first.width, first.height, total, first.number_of_images)
        dest = ctx.allocator.image_for_command_buffer(cb, desc, None)
        with cb.encoding(owner):
            t = dest.tensor
            for img, o, c in zip(images, offsets, channels):
                dest.store(img.tensor, (Ellipsis, slice(o, o + c)))
                pad = -(-c // 4) * 4 - c
                if pad:
                    t[..., o + c:o + c + pad].zero_()
        _consume(images)
        out: list[Any] = []
        if ctx.want_states:
            out = [MPSNNConcatenationState(cb.device, offsets, channels, total)]
        return dest, out


__all__ = ["MPSNNConcatenationGradientNode", "MPSNNConcatenationNode", "MPSNNConcatenationState"]
