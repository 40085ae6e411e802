"""Convolution nodes (spec/graph.md §14 "Convolution family"): MPSCNNConvolutionNode,
MPSCNNFullyConnectedNode, MPSCNNBinaryConvolutionNode, MPSCNNBinaryFullyConnectedNode,
MPSCNNConvolutionTransposeNode and the gradient nodes.

Training (spec optimizers.md §11): after a convolution gradient node is encoded the graph
updates the weights according to the node's ``training_style``:

* ``updateDeviceGPU`` (default): ``data_source.update(cb, gradient_state, source_state)`` is
  called on the same command buffer, ``source_state`` holding the weights the convolution used
  (a snapshot, as :meth:`~mpsnn.MPSCNNConvolution.export_weights_and_biases` makes, but
  copied on write: only a state the data source keeps past the reload is ever copied). A
  returned :class:`~mpsnn.MPSCNNConvolutionWeightsAndBiasesState` is loaded into the graph's
  convolution and its gradient kernel on the device (the gradient kernel then reads the
  forward kernel's copy, see ``_ConvolutionWeights`` in ``mpsnn.kernels.convolution``);
  None means "no update". A data source
  that does not implement ``update`` is refused when the graph is built **[bin]**.
* ``updateDeviceCPU``: ``data_source.update_with_gradient_state(gradient_state, source_state)``
  runs in the command buffer's completion handler; when it returns True both kernels reload
  from the data source.
* ``updateDeviceNone``: no update (the gradient still flows).

The gradient node's kernel reads its weights from its ``weights`` data source (the forward
node's when None) and is kept in step with the forward kernel by the update above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...core.device import Device
from ...core.enums import (
    MPSCNNBinaryConvolutionFlags,
    MPSCNNBinaryConvolutionType,
    MPSCNNConvolutionGradientOption,
    MPSNNConvolutionAccumulatorPrecisionOption,
    MPSNNTrainingStyle,
)
from ...core.errors import MPSTypeError, MPSValueError
from ...kernels.binary_convolution import MPSCNNBinaryConvolution, MPSCNNBinaryFullyConnected
from ...kernels.convolution import MPSCNNConvolution, MPSCNNConvolutionGradient, MPSCNNFullyConnected, MPSCNNFullyConnectedGradient
from ...kernels.convolution_data import MPSCNNConvolutionDataSource
from ...kernels.convolution_transpose import MPSCNNConvolutionTranspose, MPSCNNConvolutionTransposeGradient
from .base import (
    MPSCNNConvolutionGradientStateNode,
    MPSCNNConvolutionTransposeGradientStateNode,
    MPSNNFilterNode,
    MPSNNGradientFilterNode,
    MPSNNImageNode,
    MPSNNStateNode,
    MPSNNTrainableNode,
    encode_gradient,
    encode_unary,
)

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext


def _data_source(owner: str, weights: Any, required: bool = True) -> Any:
    if weights is None and not required:
        return None
    if not isinstance(weights, MPSCNNConvolutionDataSource):
        raise MPSTypeError(f"{owner}: `weights` must be an MPSCNNConvolutionDataSource, but got {type(weights).__name__}")
    return weights


class MPSCNNConvolutionNode(MPSNNFilterNode, MPSNNTrainableNode):
    """``MPSCNNConvolutionNode(source, weights)``: MPSCNNConvolution with weights from a
    :class:`~mpsnn.MPSCNNConvolutionDataSource`.

    Properties: ``training_style`` (default ``updateDeviceGPU``), ``accumulator_precision``
    (:class:`~mpsnn.MPSNNConvolutionAccumulatorPrecisionOption`, default float),
    ``convolution_gradient_state`` (= ``result_state``; give it to a convolution-transpose node
    to reproduce this convolution's source size), ``label`` (overrides the data source's
    label when set). A data source used for training may not fuse a neuron."""

    _kernel_class: type = MPSCNNConvolution
    _state_node_class: type[MPSNNStateNode] | None = MPSCNNConvolutionGradientStateNode

    def __init__(self, source: MPSNNImageNode, weights: MPSCNNConvolutionDataSource, padding_policy: Any = None) -> None:
        super().__init__([source], None, padding_policy)
        self._weights = _data_source(type(self).__name__, weights)
        self._init_trainable()
        self.accumulator_precision = MPSNNConvolutionAccumulatorPrecisionOption.float

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, weights: MPSCNNConvolutionDataSource) -> "MPSCNNConvolutionNode":
        return cls(source, weights)

    @property
    def weights(self) -> MPSCNNConvolutionDataSource:
        """The data source (mpsnn extension: read-only access)."""
        return self._weights

    @property
    def convolution_gradient_state(self) -> MPSNNStateNode | None:
        return self.result_state

    def _build_kernel(self, device: Device) -> Any:
        k = self._kernel_class(device, weights=self._weights)
        if hasattr(k, "accumulator_precision_option"):
            k.accumulator_precision_option = self.accumulator_precision
        return k

    def _reload(self, kernel: Any) -> None:
        kernel.reload_weights_and_biases_from_data_source()

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_unary(self, ctx, kernel, images)

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        return [MPSCNNConvolutionGradientNode(gradient_image, self._source_images[0], self.result_state, None, forward=self)]


class MPSCNNFullyConnectedNode(MPSCNNConvolutionNode):
    """``MPSCNNFullyConnectedNode(source, weights)``: MPSCNNFullyConnected (the kernel covers
    the whole input)."""

    _kernel_class = MPSCNNFullyConnected

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        return [MPSCNNFullyConnectedGradientNode(gradient_image, self._source_images[0], self.result_state, None, forward=self)]


class MPSCNNBinaryConvolutionNode(MPSCNNConvolutionNode):
    """``MPSCNNBinaryConvolutionNode(source, weights, scale_value=..., type=..., flags=...)`` or
    with ``output_bias_terms``, ``output_scale_terms``, ``input_bias_terms``,
    ``input_scale_terms``: MPSCNNBinaryConvolution. No gradient; ``convolution_gradient_state``
    is unavailable."""

    _kernel_class = MPSCNNBinaryConvolution
    _has_gradient = False
    _state_node_class = None

    def __init__(self, source: MPSNNImageNode, weights: MPSCNNConvolutionDataSource, scale_value: float | None = None, *,
                 type: MPSCNNBinaryConvolutionType = MPSCNNBinaryConvolutionType.binaryWeights,  # noqa: A002 - Apple's label
                 flags: MPSCNNBinaryConvolutionFlags = MPSCNNBinaryConvolutionFlags.none,
                 output_bias_terms: Any = None, output_scale_terms: Any = None, input_bias_terms: Any = None,
                 input_scale_terms: Any = None, padding_policy: Any = None) -> None:
        super().__init__(source, weights, padding_policy)
        self._binary = dict(scale_value=scale_value, type=type, flags=flags, output_bias_terms=output_bias_terms,
                            output_scale_terms=output_scale_terms, input_bias_terms=input_bias_terms, input_scale_terms=input_scale_terms)

    @property
    def convolution_gradient_state(self) -> MPSNNStateNode | None:
        raise MPSValueError(f"{self._describe()}: `convolution_gradient_state` is unavailable on binary convolution nodes")

    def _build_kernel(self, device: Device) -> Any:
        b = self._binary
        return self._kernel_class(device, self._weights, b["scale_value"], type=b["type"], flags=b["flags"],
                                  output_bias_terms=b["output_bias_terms"], output_scale_terms=b["output_scale_terms"],
                                  input_bias_terms=b["input_bias_terms"], input_scale_terms=b["input_scale_terms"])

    def _reload(self, kernel: Any) -> None:
        """Binary convolutions read their weights once (no reload)."""

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        return [None]


class MPSCNNBinaryFullyConnectedNode(MPSCNNBinaryConvolutionNode):
    """``MPSCNNBinaryFullyConnectedNode``: MPSCNNBinaryFullyConnected; no gradient."""

    _kernel_class = MPSCNNBinaryFullyConnected


class MPSCNNConvolutionTransposeNode(MPSCNNConvolutionNode):
    """``MPSCNNConvolutionTransposeNode(source, convolution_gradient_state, weights)``:
    MPSCNNConvolutionTranspose. With the state node of an earlier convolution the result has
    that convolution's source size."""

    _kernel_class = MPSCNNConvolutionTranspose
    _state_node_class = MPSCNNConvolutionTransposeGradientStateNode

    def __init__(self, source: MPSNNImageNode, convolution_gradient_state: MPSNNStateNode | None = None,
                 weights: MPSCNNConvolutionDataSource | None = None, padding_policy: Any = None) -> None:
        MPSNNFilterNode.__init__(self, [source], [convolution_gradient_state] if convolution_gradient_state is not None else None, padding_policy)
        self._weights = _data_source(type(self).__name__, weights)
        self._init_trainable()
        self.accumulator_precision = MPSNNConvolutionAccumulatorPrecisionOption.float

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        kernel.destination_image_allocator = ctx.allocator
        self._apply_padding(kernel)
        cb = ctx.command_buffer
        conv_state = ctx.single_state(self, states[0]) if states else None
        if ctx.want_states:
            img, st = kernel.encode(cb, images[0], convolution_gradient_state=conv_state, destination_state_is_temporary=False)
            return img, [st]
        return kernel.encode(cb, images[0], convolution_gradient_state=conv_state), []

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        return [MPSCNNConvolutionTransposeGradientNode(gradient_image, self._source_images[0], self.result_state, None, forward=self)]


class MPSCNNConvolutionGradientNode(MPSNNGradientFilterNode, MPSNNTrainableNode):
    """``MPSCNNConvolutionGradientNode(source_gradient, source_image, convolution_gradient_state,
    weights=None)``: MPSCNNConvolutionGradient plus the weight update of the module docstring
    (``training_style``). ``weights=None`` uses the forward node's data source."""

    _kernel_class: type = MPSCNNConvolutionGradient

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, convolution_gradient_state: MPSNNStateNode | None,
                 weights: MPSCNNConvolutionDataSource | None = None, forward: MPSNNFilterNode | None = None) -> None:
        if convolution_gradient_state is None:
            raise MPSTypeError(f"{type(self).__name__}: `convolution_gradient_state` is required")
        if forward is None:
            forward = convolution_gradient_state.producer
        super().__init__(source_gradient, [source_image], convolution_gradient_state, forward)
        if weights is None:
            weights = getattr(forward, "_weights", None)
        self._weights = _data_source(type(self).__name__, weights)
        self._init_trainable()
        if isinstance(forward, MPSNNTrainableNode):
            self._training_style = forward.training_style  # the forward node's style carries over (spec §7)

    @property
    def weights(self) -> MPSCNNConvolutionDataSource:
        return self._weights

    def _is_trainable_update(self) -> bool:
        return self._training_style != MPSNNTrainingStyle.updateDeviceNone

    def _build_kernel(self, device: Device) -> Any:
        if self._training_style == MPSNNTrainingStyle.updateDeviceGPU and type(self._weights).update is MPSCNNConvolutionDataSource.update:
            raise MPSValueError(f"{self._describe()}: unable to do the GPU update pass because the data source "
                                f"{type(self._weights).__name__} does not implement `update(command_buffer, gradient_state, source_state)` "
                                "(set training_style to updateDeviceCPU or updateDeviceNone, or implement it)")
        return self._kernel_class(device, weights=self._weights)

    def _reload(self, kernel: Any) -> None:
        kernel.reload_weights_and_biases_from_data_source()

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        cb = ctx.command_buffer
        fwd = ctx.kernel_of(self._forward) if self._forward is not None else None
        option = kernel.gradient_option
        if ctx.step.result_unused and option == MPSCNNConvolutionGradientOption.all:
            # graph.md §3 (needed-ness): nothing reads this gradient image (typically dL/dinput of
            # the first layer), so the graph prunes it and computes the weights' gradients only
            kernel.gradient_option = MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias
        try:
            img, _ = encode_gradient(self, ctx, kernel, images, states)
        finally:
            kernel.gradient_option = option
        gstate = ctx.single_state(self, states[0])
        style = self._training_style
        if style == MPSNNTrainingStyle.updateDeviceNone:
            return img, []
        # the current weights without a copy: a snapshot by copy on write, copied only if the
        # data source keeps the state past the reload below (_ConvolutionWeights._export_shared)
        source_state = (fwd if fwd is not None else kernel)._export_shared(cb)
        targets = [k for k in (fwd, kernel) if k is not None]
        if style == MPSNNTrainingStyle.updateDeviceGPU:
            held = [source_state]
            del source_state
            ds = self._weights

            def update() -> Any:
                new = ds.update(cb, gstate, held.pop())     # the state is dropped before the reload
                if new is None:
                    return None

                def reload() -> None:
                    if new.is_temporary:
                        new.read_count = new.read_count + len(targets) - 1
                    for k in targets:
                        if k is kernel and fwd is not None and kernel._borrow_master(fwd):
                            # the forward kernel was just reloaded from `new`: the gradient kernel
                            # reads that master instead of a second copy of the same weights
                            new.consume_read()
                        else:
                            k.reload_weights_and_biases_with_command_buffer(cb, new)
                return reload
            ctx.update(update)
        else:
            ds = self._weights

            def cpu_update(_cb: Any) -> None:
                if ds.update_with_gradient_state(gstate, source_state):
                    for k in targets:
                        k.reload_weights_and_biases_from_data_source()
            cb.add_completed_handler(cpu_update)
        return img, []


class MPSCNNFullyConnectedGradientNode(MPSCNNConvolutionGradientNode):
    """``MPSCNNFullyConnectedGradientNode``: MPSCNNFullyConnectedGradient (+ update)."""

    _kernel_class = MPSCNNFullyConnectedGradient


class MPSCNNConvolutionTransposeGradientNode(MPSCNNConvolutionGradientNode):
    """``MPSCNNConvolutionTransposeGradientNode``: MPSCNNConvolutionTransposeGradient (+ update)."""

    _kernel_class = MPSCNNConvolutionTransposeGradient


__all__ = [
    "MPSCNNBinaryConvolutionNode",
    "MPSCNNBinaryFullyConnectedNode",
    "MPSCNNConvolutionGradientNode",
    "MPSCNNConvolutionNode",
    "MPSCNNConvolutionTransposeGradientNode",
    "MPSCNNConvolutionTransposeNode",
    "MPSCNNFullyConnectedGradientNode",
    "MPSCNNFullyConnectedNode",
]
