"""ResNet-50 v1.5 training through :class:`~mpsnn.MPSNNGraph`: the network of
:mod:`mpsnn.models.resnet` with batch normalization in training mode, softmax cross-entropy
and SGD with momentum, as one training graph made by ``MPSCNNLossNode.training_graph``.

Network: as :mod:`mpsnn.models.resnet`, but every convolution is bias-free and followed by an
``MPSCNNBatchNormalizationNode`` (batch statistics over the whole batch, as torch's
``BatchNorm2d`` in training) and, where torchvision has one, an ``MPSCNNNeuronReLUNode``; the
fully connected layer ends in ``MPSCNNLossNode`` (softMaxCrossEntropy, reduction sum, weight
``1/N``: torch's ``cross_entropy`` mean).

Updates (every trainable node's ``update`` on the GPU, as Apple's data-source protocol asks):

* convolutions and the fully connected layer: ``MPSNNOptimizerStochasticGradientDescent`` with
  classic momentum (MPS's ``m = mu·m + lr·g; w -= m``, which is torch's ``buf = mu·buf + g;
  w -= lr·buf`` with ``m = lr·buf`` at a fixed learning rate);
* batch-norm gamma and beta: the same optimizer (``batch_normalization_state`` form);
* running mean and variance: ``running = (1 - bn_momentum)·running + bn_momentum·batch`` on the
  device, torch's rule, with the batch variance made unbiased (``· n/(n-1)``) as torch does.
  They feed an inference graph, not the training step.

Storage: the graph's intermediate images and gradient images take ``graph_format`` (bfloat16
by default); the logits and the loss are float32 (the fully connected node's result format), the
weights, their gradients and the optimizer state float32, and every kernel accumulates in
float32: torch's autocast recipe for the same network. Decisions (mpsnn): the data sources
hold their float32 weights on the device and update them in place; a step reads no host value.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSDataType, MPSImageFeatureChannelFormat
from ..core.errors import MPSValueError, value_error
from ..graph.graph import MPSNNGraph
from ..graph.nodes.base import MPSNNImageNode
from ..graph.nodes.convolution import MPSCNNConvolutionNode, MPSCNNFullyConnectedNode
from ..graph.nodes.loss import MPSCNNLossNode
from ..graph.nodes.neuron import MPSCNNNeuronReLUNode
from ..graph.nodes.normalization import MPSCNNBatchNormalizationNode
from ..io.onnx.padding import ONNXPadding
from ..kernels.batch_normalization import (
    MPSCNNBatchNormalizationDataSource,
    MPSCNNNormalizationGammaAndBetaState,
    MPSCNNNormalizationMeanAndVarianceState,
)
from ..kernels.convolution_data import (
    MPSCNNConvolutionDataSource,
    MPSCNNConvolutionDescriptor,
    MPSCNNConvolutionWeightsAndBiasesState,
)
from ..kernels.loss_labels import MPSCNNLossDescriptor, MPSCNNLossType, MPSCNNReductionType
from ..optimizers import MPSNNOptimizerDescriptor, MPSNNOptimizerStochasticGradientDescent
from .resnet import BN_EPSILON, _check_size, _ResNetBuilder, random_resnet50_state

__all__ = ["ResNetTraining", "SGDBatchNormalizationDataSource", "SGDConvolutionDataSource", "build_resnet50_training"]


def _sgd(device: Device, learning_rate: float, momentum: float) -> MPSNNOptimizerStochasticGradientDescent:
    desc = MPSNNOptimizerDescriptor(learning_rate)
    return MPSNNOptimizerStochasticGradientDescent(device, momentum_scale=momentum, use_nestrov_momentum=False, optimizer_descriptor=desc)


class SGDConvolutionDataSource(MPSCNNConvolutionDataSource):
    """Float32 OHWI weights (and optional biases) on the device, updated in place by SGD with
    momentum in :meth:`update` (the graph then reloads them into its kernels).

    Args:
        device: where the weights live.
        descriptor: the layer's convolution descriptor.
        weights: ``[Cout][kH][kW][Cin]`` float32 values (NumPy or torch).
        bias: ``[Cout]`` values or None (no bias).
        label: the layer's name.
        learning_rate, momentum: the SGD parameters."""

    def __init__(self, device: Device, descriptor: MPSCNNConvolutionDescriptor, weights: Any, bias: Any, label: str,
                 learning_rate: float, momentum: float) -> None:
        dev = device.torch_device
        self._descriptor, self._label = descriptor, label
        self.weights_tensor = torch.tensor(np.asarray(weights, np.float32), device=dev)         # own copies: updated in place
        self.biases_tensor = None if bias is None else torch.tensor(np.asarray(bias, np.float32), device=dev)
        self.momentum = [torch.zeros_like(self.weights_tensor)] + ([] if self.biases_tensor is None else [torch.zeros_like(self.biases_tensor)])
        self.state = MPSCNNConvolutionWeightsAndBiasesState(weights=self.weights_tensor, biases=self.biases_tensor)
        self.optimizer = _sgd(device, learning_rate, momentum)

    def data_type(self) -> MPSDataType:
        return MPSDataType.float32

    def descriptor(self) -> MPSCNNConvolutionDescriptor:
        return self._descriptor

    def weights(self) -> torch.Tensor:
        return self.weights_tensor

    def bias_terms(self) -> torch.Tensor | None:
        return self.biases_tensor

    def load(self) -> bool:
        return True

    def purge(self) -> None:
        """Nothing to release: the weights stay on the device."""

    def label(self) -> str | None:
        return self._label

    def update(self, command_buffer: MTLCommandBuffer, gradient_state: Any, source_state: Any) -> MPSCNNConvolutionWeightsAndBiasesState:
        self.optimizer.encode(command_buffer, convolution_gradient_state=gradient_state, convolution_source_state=source_state,
                              input_momentum_vectors=self.momentum, result_state=self.state)
        return self.state

    def copy(self, device: Device | None = None) -> "SGDConvolutionDataSource":
        return self


class SGDBatchNormalizationDataSource(MPSCNNBatchNormalizationDataSource):
    """Batch-norm gamma, beta and running statistics as float32 device tensors: gamma and beta
    updated by SGD with momentum, the running statistics by torch's rule (module docstring).

    Args:
        device: where the values live.
        gamma, beta, mean, variance: ``[C]`` float32 values.
        label: the layer's name.
        learning_rate, momentum: the SGD parameters; ``bn_momentum``: the running statistics'."""

    def __init__(self, device: Device, gamma: Any, beta: Any, mean: Any, variance: Any, label: str, learning_rate: float,
                 momentum: float, bn_momentum: float = 0.1, epsilon: float = BN_EPSILON) -> None:
        dev = device.torch_device

        def t(v: Any) -> torch.Tensor:
            return torch.tensor(np.asarray(v, np.float32), device=dev)            # own copies: updated in place
        self.gamma_tensor, self.beta_tensor = t(gamma), t(beta)
        self.mean_tensor, self.variance_tensor = t(mean), t(variance)
        self._label, self._epsilon, self.bn_momentum = label, float(epsilon), float(bn_momentum)
        self.momentum = [torch.zeros_like(self.gamma_tensor), torch.zeros_like(self.beta_tensor)]
        self.gamma_and_beta = MPSCNNNormalizationGammaAndBetaState(self.gamma_tensor, self.beta_tensor)
        self.mean_and_variance = MPSCNNNormalizationMeanAndVarianceState(self.mean_tensor, self.variance_tensor)
        self.optimizer = _sgd(device, learning_rate, momentum)

    def number_of_feature_channels(self) -> int:
        return int(self.gamma_tensor.numel())

    def gamma(self) -> torch.Tensor:
        return self.gamma_tensor

    def beta(self) -> torch.Tensor:
        return self.beta_tensor

    def mean(self) -> torch.Tensor:
        return self.mean_tensor

    def variance(self) -> torch.Tensor:
        return self.variance_tensor

    def epsilon(self) -> float:
        return self._epsilon

    def load(self) -> bool:
        return True

    def purge(self) -> None:
        """Nothing to release: the values stay on the device."""

    def label(self) -> str | None:
        return self._label

    def update_gamma_and_beta(self, command_buffer: MTLCommandBuffer, batch_normalization_state: Any) -> MPSCNNNormalizationGammaAndBetaState:
        self.optimizer.encode(command_buffer, batch_normalization_state=batch_normalization_state,
                              input_momentum_vectors=self.momentum, result_state=self.gamma_and_beta)
        return self.gamma_and_beta

    def update_mean_and_variance(self, command_buffer: MTLCommandBuffer, batch_normalization_state: Any) -> None:
        """The running statistics move towards the batch's (unbiased variance); the training
        graph's forward kernel keeps using batch statistics, so nothing is reloaded (None)."""
        st = batch_normalization_state
        n = st.statistics_count
        with command_buffer.encoding("SGDBatchNormalizationDataSource"):
            self.mean_tensor.lerp_(st.mean.reshape(-1).float(), self.bn_momentum)
            self.variance_tensor.lerp_(st.variance.reshape(-1).float() * (n / max(n - 1, 1)), self.bn_momentum)
        return None

    def copy(self, device: Device | None = None) -> "SGDBatchNormalizationDataSource":
        return self


@dataclass
class ResNetTraining:
    """What :func:`build_resnet50_training` makes: the training graph (one source handle, the
    image batch; one labels state per image; no result image), its loss node, and the data
    sources by state-dict prefix (``conv1``, ``layer1.0.conv1``, ``bn1``, ``fc``, ...)."""

    graph: MPSNNGraph
    loss_node: MPSCNNLossNode
    convolutions: dict[str, SGDConvolutionDataSource]
    batch_norms: dict[str, SGDBatchNormalizationDataSource]


class _Builder(_ResNetBuilder):
    owner = "build_resnet50_training"

    def __init__(self, device: Device, state: Mapping[str, Any], num_classes: int, lr: float, mu: float, bn_mu: float) -> None:
        super().__init__(state, num_classes)
        self.device, self.lr, self.mu, self.bn_mu = device, lr, mu, bn_mu
        self.convs: dict[str, SGDConvolutionDataSource] = {}
        self.bns: dict[str, SGDBatchNormalizationDataSource] = {}

    def cbr(self, x: MPSNNImageNode, conv: str, bn: str, stride: int, relu: bool) -> MPSNNImageNode:
        """A bias-free convolution, a batch-norm node (training mode in a training graph) and
        optionally a ReLU node, each over its own SGD data source."""
        w = self.get(f"{conv}.weight")
        cout, cin, kh, kw = w.shape
        desc = MPSCNNConvolutionDescriptor(kw, kh, cin, cout)
        desc.stride_in_pixels_x = desc.stride_in_pixels_y = stride
        ds = SGDConvolutionDataSource(self.device, desc, np.ascontiguousarray(w.transpose(0, 2, 3, 1)), None, conv, self.lr, self.mu)
        self.convs[conv] = ds
        p = kh // 2
        node = MPSCNNConvolutionNode(x, ds, padding_policy=ONNXPadding(conv, (kh, kw), (stride, stride), (1, 1), ((p, p), (p, p))))
        node.label = conv
        bds = SGDBatchNormalizationDataSource(self.device, self.get(f"{bn}.weight"), self.get(f"{bn}.bias"), self.get(f"{bn}.running_mean"),
                                              self.get(f"{bn}.running_var"), bn, self.lr, self.mu, self.bn_mu)
        self.bns[bn] = bds
        norm = MPSCNNBatchNormalizationNode(node.result_image, bds)
        norm.label = bn
        y = norm.result_image
        return MPSCNNNeuronReLUNode(y, a=0.0).result_image if relu else y


def build_resnet50_training(device: Device, batch_size: int, state: Mapping[str, Any] | None = None, *, size: int = 224,
                            num_classes: int = 1000, graph_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.bfloat16,
                            learning_rate: float = 0.1, momentum: float = 0.9, bn_momentum: float = 0.1, seed: int = 0) -> ResNetTraining:
    """The training graph of ResNet-50 v1.5 (module docstring) for batches of ``batch_size``
    ``size x size x 3`` images.

    Args:
        device: where the graph runs.
        batch_size: images per step (the loss weight is ``1/batch_size``).
        state: torchvision-style starting weights (see :mod:`mpsnn.models.resnet`); None draws
            :func:`~mpsnn.models.resnet.random_resnet50_state` (``seed``).
        size, num_classes: as :func:`~mpsnn.models.resnet.build_resnet50`.
        graph_format: the intermediate and gradient images' format.
        learning_rate, momentum: SGD's; ``bn_momentum``: the running statistics' (torch's 0.1).

    Encode a step with ``graph.encode_batch(cb, [images], [labels])`` (``labels``: one
    :class:`~mpsnn.MPSCNNLossLabels` per image, one-hot over ``num_classes``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise value_error("build_resnet50_training", "batch_size", batch_size, "be a positive integer")
    _check_size("build_resnet50_training", size)
    if state is None:
        state = random_resnet50_state(seed, num_classes)
    b = _Builder(device, state, num_classes, learning_rate, momentum, bn_momentum)
    y = b.trunk(MPSNNImageNode(None), size)
    w = b.get("fc.weight")
    fds = SGDConvolutionDataSource(device, MPSCNNConvolutionDescriptor(1, 1, w.shape[1], num_classes), w.reshape(num_classes, 1, 1, -1),
                                   b.get("fc.bias"), "fc", learning_rate, momentum)
    b.convs["fc"] = fds
    fc = MPSCNNFullyConnectedNode(y, fds)
    fc.label = "fc"
    fc.result_image.format = MPSImageFeatureChannelFormat.float32            # float32 logits and loss
    desc = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    desc.weight = 1.0 / batch_size
    loss = MPSCNNLossNode(fc.result_image, desc)

    def handler(gradient_node: Any, inference_node: Any, inference_source: Any, gradient_source: Any) -> None:
        if inference_node is fc:
            gradient_node.result_image.format = graph_format

    terminals = loss.training_graph(None, handler)
    if not terminals or len(terminals) != 1:
        raise MPSValueError(f"build_resnet50_training: the training graph must end in exactly one node, got {terminals}")
    graph = MPSNNGraph(device, terminals[0].result_image, False)
    graph.format = graph_format
    return ResNetTraining(graph, loss, b.convs, b.bns)
