"""ResNet-50 v1.5, as torchvision defines it (``torchvision.models.resnet50``), as an
:class:`~mpsnn.MPSNNGraph` inference graph built through the public node API.

Network (input ``size x size x 3``, NHWC)::

    conv 7x7/2 pad 3, 64 + BN + ReLU -> max pool 3x3/2 pad 1
    -> 4 stages of bottleneck blocks (3, 4, 6, 3 blocks; widths 64, 128, 256, 512; x4 out):
       1x1 + BN + ReLU -> 3x3 (stride 2 in a stage's first block, v1.5) + BN + ReLU
       -> 1x1 + BN, added to the identity (or to 1x1/stride + BN where the shape changes), ReLU
    -> average pool over the whole final map -> fully connected 2048 -> classes [-> softmax]

Weights come as a torchvision-style state dict (``conv1.weight`` ``[64, 3, 7, 7]`` OIHW,
``bn1.weight/bias/running_mean/running_var``, ``layer{s}.{b}.conv{1,2,3}``,
``layer{s}.0.downsample.{0,1}``, ``fc.weight/bias``), as NumPy arrays or torch tensors, or
from :func:`random_resnet50_state`. Decisions (mpsnn):

* Inference batch normalization is folded into its convolution's descriptor
  (``set_batch_normalization_parameters_for_inference``, eps 1e-5 as torchvision's), and each
  ReLU that follows a convolution directly becomes its fused neuron; the ReLU after a residual
  addition is its own node.
* Paddings are torch's explicit symmetric pads (a 7x7/2 window of output ``i`` starts at
  ``2i - 3``), expressed with the ONNX importer's explicit-pads policy
  (:class:`~mpsnn.io.onnx.padding.ONNXPadding`, which needs no ONNX package); max pooling reads
  the nearest edge pixel for off-image taps (edge mode clamp), which equals torch's ``-inf``
  padding for a maximum.
* The global average pool is an average pooling node whose window is the final map (``size /
  32`` rounded as the strided layers round), so ``size`` is fixed when the graph is built.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.device import Device
from ..core.enums import MPSCNNNeuronType, MPSImageEdgeMode, MPSImageFeatureChannelFormat
from ..core.errors import value_error
from ..graph.graph import MPSNNGraph
from ..graph.nodes.arithmetic import MPSNNAdditionNode
from ..graph.nodes.base import MPSNNImageNode
from ..graph.nodes.convolution import MPSCNNConvolutionNode, MPSCNNFullyConnectedNode
from ..graph.nodes.neuron import MPSCNNNeuronReLUNode
from ..graph.nodes.pooling import MPSCNNPoolingAverageNode, MPSCNNPoolingMaxNode
from ..graph.nodes.softmax import MPSCNNSoftMaxNode
from ..io.onnx.padding import ONNXPadding
from ..kernels.convolution_data import ConvolutionDataSource, MPSCNNConvolutionDescriptor
from ..kernels.neuron import MPSNNNeuronDescriptor

#: blocks per stage and the stages' bottleneck widths
BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
BN_EPSILON = 1e-5


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def final_size(size: int) -> int:
    """The side of the last stage's map for a ``size x size`` input."""
    size = _out(_out(size, 7, 2, 3), 3, 2, 1)
    for _ in range(3):                       # stages 2-4 start with a stride-2 3x3
        size = _out(size, 3, 2, 1)
    return size


def state_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry the builder reads, with its torchvision shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for s, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), start=1):
        for b in range(blocks):
            pre = f"layer{s}.{b}"
            shapes[f"{pre}.conv1.weight"] = (width, cin, 1, 1)
            bn(f"{pre}.bn1", width)
            shapes[f"{pre}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{pre}.bn2", width)
            shapes[f"{pre}.conv3.weight"] = (width * EXPANSION, width, 1, 1)
            bn(f"{pre}.bn3", width * EXPANSION)
            if b == 0:
                shapes[f"{pre}.downsample.0.weight"] = (width * EXPANSION, cin, 1, 1)
                bn(f"{pre}.downsample.1", width * EXPANSION)
            cin = width * EXPANSION
    shapes["fc.weight"] = (num_classes, cin)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _check_size(owner: str, size: Any) -> None:
    """Refuse an input side the trunk's five stride-2 layers cannot take (a builder's ``size``)."""
    if not isinstance(size, int) or size < 32:
        raise value_error(owner, "size", size, "be an integer >= 32 (five stride-2 layers)")


def random_resnet50_state(seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A state dict of random weights: Kaiming-normal convolutions (fan out, as torchvision
    initialises them), batch-norm statistics and affine terms drawn near their identity (so
    the folding matters), a uniform fully connected layer."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in state_shapes(num_classes).items():
        if name.endswith("running_mean") or name.endswith(".bias") and not name.startswith("fc"):
            v = rng.normal(0.0, 0.1, shape)
        elif name.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1 and not name.startswith("fc"):
            v = rng.uniform(0.5, 1.5, shape)          # batch-norm gamma
        elif len(shape) == 4:
            v = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape)
        else:
            bound = 1.0 / np.sqrt(shape[-1])
            v = rng.uniform(-bound, bound, shape)
        out[name] = v.astype(np.float32)
    return out


class _ResNetBuilder:
    """What the inference and the training builders share: the state dict's entries (checked
    against :func:`state_shapes`, named after the builder ``owner`` in errors), the v1.5
    bottleneck and the trunk from the stem to the global average pool. A builder supplies
    :meth:`cbr`, one convolution with its batch norm and optional ReLU."""

    owner = "build_resnet50"

    def __init__(self, state: Mapping[str, Any], num_classes: int) -> None:
        self.state = state
        self.shapes = state_shapes(num_classes)

    def get(self, name: str) -> np.ndarray:
        if name not in self.state:
            raise value_error(self.owner, "state", f"a dict without {name!r}", "hold every torchvision resnet50 entry")
        v = self.state[name]
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        a = np.asarray(v, np.float32)
        if a.shape != self.shapes[name]:
            raise value_error(self.owner, f"state[{name!r}].shape", a.shape, f"be {self.shapes[name]}")
        return a

    def cbr(self, x: MPSNNImageNode, conv: str, bn: str, stride: int, relu: bool) -> MPSNNImageNode:  # pragma: no cover - abstract
        raise NotImplementedError

    def bottleneck(self, x: MPSNNImageNode, pre: str, stride: int, downsample: bool) -> MPSNNImageNode:
        y = self.cbr(x, f"{pre}.conv1", f"{pre}.bn1", 1, True)
        y = self.cbr(y, f"{pre}.conv2", f"{pre}.bn2", stride, True)        # v1.5: the stride on the 3x3
        y = self.cbr(y, f"{pre}.conv3", f"{pre}.bn3", 1, False)
        identity = self.cbr(x, f"{pre}.downsample.0", f"{pre}.downsample.1", stride, False) if downsample else x
        add = MPSNNAdditionNode(y, identity)
        add.label = f"{pre}.add"
        return MPSCNNNeuronReLUNode(add.result_image, a=0.0).result_image

    def trunk(self, x: MPSNNImageNode, size: int) -> MPSNNImageNode:
        """Stem, max pool, the four stages and the global average pool of a ``size`` input."""
        y = self.cbr(x, "conv1", "bn1", 2, True)
        y = MPSCNNPoolingMaxNode(y, kernel_width=3, kernel_height=3, stride_in_pixels_x=2, stride_in_pixels_y=2,
                                 padding_policy=ONNXPadding("maxpool", (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)),
                                                            edge_mode=MPSImageEdgeMode.clamp)).result_image
        for s, (blocks, _) in enumerate(zip(BLOCKS, WIDTHS), start=1):
            for k in range(blocks):
                y = self.bottleneck(y, f"layer{s}.{k}", 2 if k == 0 and s > 1 else 1, k == 0)
        f = final_size(size)
        return MPSCNNPoolingAverageNode(y, kernel_width=f, kernel_height=f, stride_in_pixels_x=f, stride_in_pixels_y=f,
                                        padding_policy=ONNXPadding("avgpool", (f, f), (f, f), (1, 1), ((0, 0), (0, 0)))).result_image


class _Builder(_ResNetBuilder):
    def __init__(self, state: Mapping[str, Any], num_classes: int) -> None:
        super().__init__(state, num_classes)
        self.relu = MPSNNNeuronDescriptor.cnn_neuron_descriptor(MPSCNNNeuronType.reLU)

    def cbr(self, x: MPSNNImageNode, conv: str, bn: str, stride: int, relu: bool) -> MPSNNImageNode:
        """The convolution with its inference batch norm folded in and the ReLU as its fused neuron."""
        w = self.get(f"{conv}.weight")
        cout, cin, kh, kw = w.shape
        desc = MPSCNNConvolutionDescriptor(kw, kh, cin, cout)
        desc.stride_in_pixels_x = desc.stride_in_pixels_y = stride
        desc.set_batch_normalization_parameters_for_inference(
            mean=self.get(f"{bn}.running_mean"), variance=self.get(f"{bn}.running_var"), gamma=self.get(f"{bn}.weight"),
            beta=self.get(f"{bn}.bias"), epsilon=BN_EPSILON)
        if relu:
            desc.fused_neuron_descriptor = self.relu
        ds = ConvolutionDataSource(desc, np.ascontiguousarray(w.transpose(0, 2, 3, 1)), None, label=conv)
        p = kh // 2
        pad = ONNXPadding(conv, (kh, kw), (stride, stride), (1, 1), ((p, p), (p, p)))
        node = MPSCNNConvolutionNode(x, ds, padding_policy=pad)
        node.label = conv
        return node.result_image


def build_resnet50(device: Device, state: Mapping[str, Any] | None = None, *, size: int = 224, num_classes: int = 1000,
                   graph_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.float16, softmax: bool = False,
                   seed: int = 0) -> MPSNNGraph:
    """The inference graph of ResNet-50 v1.5 for ``size x size x 3`` images (module docstring).

    Args:
        device: where the graph runs.
        state: torchvision-style weights; None draws :func:`random_resnet50_state` (``seed``).
        size: the input side (>= 32: the last stage's map is ``final_size(size)``).
        num_classes: the fully connected layer's outputs.
        graph_format: the intermediate images' format (float16, bfloat16 or float32).
        softmax: end in a softmax node (probabilities) instead of the logits.

    The result image is ``1 x 1 x num_classes`` per input image; the one source handle is
    the image batch."""
    _check_size("build_resnet50", size)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise value_error("build_resnet50", "num_classes", num_classes, "be a positive integer")
    if state is None:
        state = random_resnet50_state(seed, num_classes)
    b = _Builder(state, num_classes)
    gap = b.trunk(MPSNNImageNode(None), size)
    w = b.get("fc.weight")
    desc = MPSCNNConvolutionDescriptor(1, 1, w.shape[1], num_classes)
    fc = MPSCNNFullyConnectedNode(gap, ConvolutionDataSource(desc, np.ascontiguousarray(w.reshape(num_classes, 1, 1, -1)),
                                                                           b.get("fc.bias"), label="fc"))
    fc.label = "fc"
    out = MPSCNNSoftMaxNode(fc.result_image).result_image if softmax else fc.result_image
    graph = MPSNNGraph(device, out, True)
    graph.format = graph_format
    return graph


__all__ = ["BLOCKS", "WIDTHS", "build_resnet50", "final_size", "random_resnet50_state", "state_shapes"]
