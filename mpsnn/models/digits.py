"""Apple's MNIST digit classifier ("Training a Neural Network with Metal Performance Shaders",
spec/training-sample.md) built through the public MPSNNGraph API.

Network (input 28x28x1, batch N)::

    conv1 5x5 1->32  -> ReLU -> max-pool 2/2 -> conv2 5x5 32->64 -> ReLU -> max-pool 2/2
    -> fc1 7x7x64->1024 -> ReLU -> [dropout keep 0.5, training only] -> fc2 1024->10
    -> training: MPSCNNLossNode (softMaxCrossEntropy, reduction sum, weight 1/N)
    -> inference: MPSCNNSoftMaxNode

Padding as in the sample: convolutions ``sizeSame | alignCentered | addRemainderToTopLeft``,
pooling ``MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()``, fully connected
nodes their default. Both graphs read the same four :class:`DigitsDataSource` objects; the
training graph's gradient nodes call :meth:`DigitsDataSource.update`, which runs Adam on the
device into the data source's own weight buffers, and the inference graph sees the new weights
after :meth:`~mpsnn.MPSNNGraph.reload_from_data_sources`.

Initialisation ``"sample"`` (Apple's): weights uniform in [-0.2, 0.2], biases 0.1; Apple's
generator (MTGP32) has an unset seed, so every layer draws from the same stream start — here
every layer draws from a CPU ``torch.Generator`` seeded with the same ``seed`` (the exact
numbers differ, the distribution and the quirk do not). ``"he"``: Kaiming-uniform weights
(bound sqrt(6 / fan_in)), biases 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSDataType, MPSImageFeatureChannelFormat
from ..core.errors import MPSValueError, value_error
from ..core.padding import MPSNNDefaultPadding
from ..datasets.mnist import MNIST_MEAN, MNIST_STD
from ..graph.graph import MPSNNGraph
from ..graph.nodes.base import MPSNNImageNode
from ..graph.nodes.convolution import MPSCNNConvolutionNode, MPSCNNFullyConnectedNode
from ..graph.nodes.dropout import MPSCNNDropoutNode
from ..graph.nodes.loss import MPSCNNLossNode
from ..graph.nodes.neuron import MPSCNNNeuronLinearNode, MPSCNNNeuronReLUNode
from ..graph.nodes.pooling import MPSCNNPoolingMaxNode
from ..graph.nodes.softmax import MPSCNNSoftMaxNode
from ..kernels.convolution_data import MPSCNNConvolutionDataSource, MPSCNNConvolutionDescriptor, MPSCNNConvolutionWeightsAndBiasesState
from ..kernels.loss_labels import MPSCNNLossDescriptor, MPSCNNLossType, MPSCNNReductionType
from ..optimizers import MPSNNOptimizerAdam

#: (label, kernel size, input channels, output channels) of the four trainable layers
LAYERS = (("conv1", 5, 1, 32), ("conv2", 5, 32, 64), ("fc1", 7, 64, 1024), ("fc2", 1, 1024, 10))
INITIALISATIONS = ("sample", "he")


class DigitsDataSource(MPSCNNConvolutionDataSource):
    """The sample's ``ConvDataSource``: weights ``[out][kh][kw][in]`` and biases (float32,
    on the device), Adam state, and the GPU update hook.

    Args:
        device: where the weights live.
        label: layer name.
        kernel_size, input_channels, output_channels: the layer's shape.
        learning_rate: Adam's learning rate (``learning_rate`` may be changed between steps;
            it is re-applied before every update, as the sample does).
        init: ``"sample"`` or ``"he"`` (module docstring); ``seed`` seeds the generator.
    """

    def __init__(self, device: Device, label: str, kernel_size: int, input_channels: int, output_channels: int, *,
                 learning_rate: float = 1e-3, init: str = "sample", seed: int = 0) -> None:
        if init not in INITIALISATIONS:
            raise value_error("DigitsDataSource", "init", init, f"be one of {INITIALISATIONS}")
        self._device = device
        self._label = label
        self._descriptor = MPSCNNConvolutionDescriptor(kernel_width=kernel_size, kernel_height=kernel_size,
                                                       input_feature_channels=input_channels, output_feature_channels=output_channels)
        gen = torch.Generator().manual_seed(seed)
        shape = (output_channels, kernel_size, kernel_size, input_channels)
        if init == "sample":
            w = torch.rand(shape, generator=gen, dtype=torch.float32) * 0.4 - 0.2
            b = torch.full((output_channels,), 0.1, dtype=torch.float32)
        else:
            bound = math.sqrt(6.0 / (kernel_size * kernel_size * input_channels))
            w = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            b = torch.zeros(output_channels, dtype=torch.float32)
        dev = device.torch_device
        self.weights_tensor = w.to(dev)
        self.biases_tensor = b.to(dev)
        self.momentum = [torch.zeros_like(self.weights_tensor), torch.zeros_like(self.biases_tensor)]
        self.velocity = [torch.zeros_like(self.weights_tensor), torch.zeros_like(self.biases_tensor)]
        self.state = MPSCNNConvolutionWeightsAndBiasesState(weights=self.weights_tensor, biases=self.biases_tensor)
        self.learning_rate = float(learning_rate)
        self.optimizer = MPSNNOptimizerAdam(device, learning_rate=self.learning_rate, beta1=0.9, beta2=0.999, epsilon=1e-8, time_step=0)
        self.updates = 0

    # -- MPSCNNConvolutionDataSource ----------------------------------------------------------------
    def data_type(self) -> MPSDataType:
        return MPSDataType.float32

    def descriptor(self) -> MPSCNNConvolutionDescriptor:
        return self._descriptor

    def weights(self) -> torch.Tensor:
        return self.weights_tensor

    def bias_terms(self) -> torch.Tensor:
        return self.biases_tensor

    def load(self) -> bool:
        return True

    def purge(self) -> None:
        """Nothing to release (the weights stay on the device, as in the sample)."""

    def label(self) -> str | None:
        return self._label

    def update(self, command_buffer: MTLCommandBuffer, gradient_state: Any, source_state: Any) -> MPSCNNConvolutionWeightsAndBiasesState:
        """One Adam step for weights and biases together, on the device, into this data
        source's own buffers; returns the state wrapping them (the graph reloads it)."""
        self.updates += 1
        self.optimizer.set_learning_rate(self.learning_rate)
        self.optimizer.encode(command_buffer, convolution_gradient_state=gradient_state, convolution_source_state=source_state,
                              input_momentum_vectors=self.momentum, input_velocity_vectors=self.velocity, result_state=self.state)
        if self.optimizer.time_step != self.updates:
            raise MPSValueError(f"DigitsDataSource {self._label!r}: Adam time_step {self.optimizer.time_step} != updates {self.updates}")
        return self.state

    def copy(self, device: Device | None = None) -> "DigitsDataSource":
        return self


@dataclass
class DigitsGraphs:
    """The two graphs of the sample and the data sources they share."""

    training: MPSNNGraph
    inference: MPSNNGraph
    data_sources: list[DigitsDataSource]
    loss_node: MPSCNNLossNode


def make_data_sources(device: Device, *, learning_rate: float = 1e-3, init: str = "sample", seed: int = 0) -> list[DigitsDataSource]:
    """The four layers' data sources (``LAYERS``)."""
    return [DigitsDataSource(device, name, k, cin, cout, learning_rate=learning_rate, init=init, seed=seed) for name, k, cin, cout in LAYERS]


def _normalized(x: MPSNNImageNode) -> MPSNNImageNode:
    return MPSCNNNeuronLinearNode(x, a=1.0 / MNIST_STD, b=-MNIST_MEAN / MNIST_STD).result_image


def _features(x: MPSNNImageNode, ds: list[DigitsDataSource]) -> MPSNNImageNode:
    pool_padding = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()
    c1 = MPSCNNConvolutionNode(x, ds[0])
    c1.label = "conv1"
    r1 = MPSCNNNeuronReLUNode(c1.result_image, a=0.0)
    p1 = MPSCNNPoolingMaxNode(r1.result_image, 2, 2)
    p1.padding_policy = pool_padding
    c2 = MPSCNNConvolutionNode(p1.result_image, ds[1])
    c2.label = "conv2"
    r2 = MPSCNNNeuronReLUNode(c2.result_image, a=0.0)
    p2 = MPSCNNPoolingMaxNode(r2.result_image, 2, 2)
    p2.padding_policy = pool_padding
    f1 = MPSCNNFullyConnectedNode(p2.result_image, ds[2])
    f1.label = "fc1"
    return MPSCNNNeuronReLUNode(f1.result_image, a=0.0).result_image


def build_digits_graphs(device: Device, data_sources: list[DigitsDataSource], batch_size: int, *,
                        graph_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.float16,
                        gradient_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.float32,
                        label_smoothing: float = 0.0, keep_probability: float | None = 0.5, dropout_seed: int = 1,
                        normalize_input: bool = False, input_gradient_needed: bool = True,
                        node_handler: Callable[..., Any] | None = None) -> DigitsGraphs:
    """Build the sample's training graph (``training_graph`` from the loss node; its one
    terminal is conv1's gradient node, whose result is dL/d(input)) and inference graph.

    ``normalize_input`` adds a linear neuron ``(x - MNIST_MEAN) / MNIST_STD`` in front of
    conv1 in both graphs (not in the sample). ``keep_probability`` None leaves the dropout
    node out (not in the sample; a training graph that :attr:`MPSNNGraph.use_cuda_graph`
    can capture, see :mod:`mpsnn.graph.capture`). ``input_gradient_needed`` False builds the
    training graph with ``result_image_is_needed`` NO (the sample says YES): its encodes return
    None, and the graph prunes dL/d(input), so conv1's gradient computes only its weights'
    and bias's gradients."""
    ds = data_sources
    x = MPSNNImageNode(None)
    hidden = _features(_normalized(x) if normalize_input else x, ds)
    if keep_probability is not None:
        hidden = MPSCNNDropoutNode(hidden, keep_probability, dropout_seed).result_image
    f2 = MPSCNNFullyConnectedNode(hidden, ds[3])
    f2.label = "fc2"
    desc = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    desc.weight = 1.0 / batch_size
    desc.label_smoothing = label_smoothing
    if label_smoothing:
        desc.number_of_classes = 10
    loss = MPSCNNLossNode(f2.result_image, desc)

    def handler(gradient_node: Any, inference_node: Any, inference_source: Any, gradient_source: Any) -> None:
        gradient_node.result_image.format = gradient_format
        if node_handler is not None:
            node_handler(gradient_node, inference_node, inference_source, gradient_source)

    terminals = loss.training_graph(None, handler)
    if not terminals or len(terminals) != 1:
        raise MPSValueError(f"build_digits_graphs: the training graph must end in exactly one node, got {terminals}")
    training = MPSNNGraph(device, terminals[0].result_image, input_gradient_needed)
    training.format = graph_format

    xi = MPSNNImageNode(None)
    fi = MPSCNNFullyConnectedNode(_features(_normalized(xi) if normalize_input else xi, ds), ds[3])
    fi.label = "fc2"
    inference = MPSNNGraph(device, MPSCNNSoftMaxNode(fi.result_image).result_image, True)
    inference.format = graph_format
    return DigitsGraphs(training, inference, ds, loss)


__all__ = ["DigitsDataSource", "DigitsGraphs", "INITIALISATIONS", "LAYERS", "build_digits_graphs", "make_data_sources"]
