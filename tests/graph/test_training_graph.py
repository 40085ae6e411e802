"""Training graphs (spec/graph.md §7, §8.2, optimizers.md §11): structure of
``training_graph`` (terminals, node handler, junctions, stop_gradient, training_style, filters
without gradient), gradients against ``torch.autograd`` in float64 with a random upstream
gradient, and one SGD step of a small digit classifier against a float64 reference.

Apple classes exercised: MPSNNFilterNode.training_graph, MPSCNNConvolutionNode /
MPSCNNFullyConnectedNode and their gradient nodes, MPSCNNNeuronReLUNode, pooling, dropout,
MPSNNAdditionNode (inserted at junctions), MPSNNDivisionNode, MPSCNNLossNode,
MPSNNOptimizerStochasticGradientDescent, MPSCNNConvolutionDataSource.

Decisions where the spec is silent (inferred):

* Weight layouts: convolution ``[Cout][kH][kW][Cin]``; fully connected ``[Cout][W][H][Cin]``
  (mpsnn/kernels/convolution_data.py), so the torch weight is ``w.permute(0, 3, 1, 2)`` for a
  convolution and ``w.permute(0, 3, 2, 1)`` for a fully connected layer.
* The upstream gradient is fed as an extra source image of the graph; images are passed in the
  order of ``source_image_handles``.
* Tolerances: the graph runs in float32 (``format`` and the gradient results' formats), the
  reference in float64 from the same float32 inputs: 1e-5 absolute on values of order 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as tf

import mpsnn as m
from mpsnn import MPSImageFeatureChannelFormat as F
from mpsnn import MPSNNTrainingStyle as TS
from mpsnn.graph.nodes.arithmetic import MPSNNAdditionNode, MPSNNDivisionNode, MPSNNMultiplicationNode, MPSNNSubtractionNode
from mpsnn.graph.nodes.base import MPSNNGradientFilterNode, MPSNNImageNode
from mpsnn.graph.nodes.convolution import (
    MPSCNNConvolutionGradientNode,
    MPSCNNConvolutionNode,
    MPSCNNFullyConnectedGradientNode,
    MPSCNNFullyConnectedNode,
)
from mpsnn.graph.nodes.dropout import MPSCNNDropoutGradientNode, MPSCNNDropoutNode
from mpsnn.graph.nodes.loss import MPSCNNLossNode
from mpsnn.graph.nodes.neuron import (
    MPSCNNNeuronAbsoluteNode,
    MPSCNNNeuronGradientNode,
    MPSCNNNeuronReLUNode,
    MPSCNNNeuronSigmoidNode,
    MPSCNNNeuronTanHNode,
)
from mpsnn.graph.nodes.pooling import MPSCNNPoolingAverageNode, MPSCNNPoolingMaxGradientNode, MPSCNNPoolingMaxNode
from mpsnn.graph.nodes.softmax import MPSCNNSoftMaxGradientNode, MPSCNNSoftMaxNode
from mpsnn.kernels.loss_labels import MPSCNNLossDataDescriptor, MPSCNNLossDescriptor, MPSCNNLossLabels, MPSCNNLossType, MPSCNNReductionType

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# data sources
# ----------------------------------------------------------------------------------------------
class RecordingDS(m.MPSCNNConvolutionDataSource):
    """Weights from a seeded generator; ``update`` records the gradient state, returns None."""

    def __init__(self, kw: int, kh: int, cin: int, cout: int, label: str, seed: int, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d = m.MPSCNNConvolutionDescriptor(kernel_width=kw, kernel_height=kh, input_feature_channels=cin, output_feature_channels=cout)
        self.w = (torch.rand(cout, kh, kw, cin, generator=g) - 0.5) * scale
        self.b = torch.rand(cout, generator=g) - 0.5
        self._label = label
        self.gradient_states: list[Any] = []
        self.source_states: list[Any] = []

    def data_type(self):
        return m.MPSDataType.float32

    def descriptor(self):
        return self.d

    def weights(self):
        return self.w

    def bias_terms(self):
        return self.b

    def load(self):
        return True

    def purge(self):
        pass

    def label(self):
        return self._label

    def update(self, command_buffer, gradient_state, source_state):
        self.gradient_states.append(gradient_state)
        self.source_states.append(source_state)
        return None


class SGDDS(RecordingDS):
    """Applies MPSNNOptimizerStochasticGradientDescent (convolution-state form) in ``update``."""

    def __init__(self, dev: m.Device, *args: Any, learning_rate: float = 0.1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state = m.MPSCNNConvolutionWeightsAndBiasesState(weights=self.w.clone().to(dev.torch_device),
                                                               biases=self.b.clone().to(dev.torch_device))
        self.opt = m.MPSNNOptimizerStochasticGradientDescent(dev, learning_rate=learning_rate)

    def update(self, command_buffer, gradient_state, source_state):
        super().update(command_buffer, gradient_state, source_state)
        self.opt.encode(command_buffer, convolution_gradient_state=gradient_state, convolution_source_state=source_state,
                        result_state=self.state)
        return self.state


def float32_handler(gradient_node, inference_node, inference_source, gradient_source):
    gradient_node.result_image.format = F.float32


def image(dev: m.Device, arr: np.ndarray) -> m.MPSImage:
    return m.MPSImage.from_numpy(np.ascontiguousarray(arr, dtype=np.float32), dev)


def run_graph(dev: m.Device, graph: m.MPSNNGraph, by_handle: dict[str, np.ndarray]) -> np.ndarray:
    out = graph.run([image(dev, by_handle[h]) for h in graph.source_image_handles])
    assert out is not None
    return out.to_numpy()


def conv_w(ds: RecordingDS) -> torch.Tensor:
    return ds.w.double().clone().requires_grad_()


def nchw(a: np.ndarray) -> torch.Tensor:
    """HWC / NHWC float32 array -> NCHW float64 tensor."""
    t = torch.from_numpy(np.asarray(a, np.float32)).double()
    if t.dim() == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).contiguous()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def walk_gradient_nodes(terminals: list) -> list:
    """Every filter made by training_graph, found from the terminals through image links."""
    seen: dict[int, Any] = {}
    stack = list(terminals)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        for img in n.source_images:
            p = img.producer
            if p is not None and (isinstance(p, MPSNNGradientFilterNode) or isinstance(p, MPSNNAdditionNode)):
                stack.append(p)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------
# 4. structure
# ----------------------------------------------------------------------------------------------
class Digits:
    """The digit classifier of the sample (smaller): conv 5x5 1->4, ReLU, max-pool, conv 5x5 4->8,
    ReLU, max-pool, FC 7x7 8->16, ReLU, dropout, FC 1x1 16->10, loss."""

    def __init__(self) -> None:
        self.ds = [RecordingDS(5, 5, 1, 4, "conv1", 1), RecordingDS(5, 5, 4, 8, "conv2", 2),
                   RecordingDS(7, 7, 8, 16, "fc1", 3), RecordingDS(1, 1, 16, 10, "fc2", 4)]
        self.x = MPSNNImageNode("x")
        self.c1 = MPSCNNConvolutionNode(self.x, self.ds[0])
        self.r1 = MPSCNNNeuronReLUNode(self.c1.result_image)
        self.p1 = MPSCNNPoolingMaxNode(self.r1.result_image, 2, 2)
        self.c2 = MPSCNNConvolutionNode(self.p1.result_image, self.ds[1])
        self.r2 = MPSCNNNeuronReLUNode(self.c2.result_image)
        self.p2 = MPSCNNPoolingMaxNode(self.r2.result_image, 2, 2)
        self.f1 = MPSCNNFullyConnectedNode(self.p2.result_image, self.ds[2])
        self.r3 = MPSCNNNeuronReLUNode(self.f1.result_image)
        self.drop = MPSCNNDropoutNode(self.r3.result_image, 0.5, 1)
        self.f2 = MPSCNNFullyConnectedNode(self.drop.result_image, self.ds[3])
        ld = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
        self.loss = MPSCNNLossNode(self.f2.result_image, ld)
        self.forward = [self.c1, self.r1, self.p1, self.c2, self.r2, self.p2, self.f1, self.r3, self.drop, self.f2]


def test_digit_network_structure():
    net = Digits()
    calls: list[tuple] = []

    def handler(gn, inf, isrc, gsrc):
        calls.append((gn, inf, isrc, gsrc))

    terminals = net.loss.training_graph(None, handler)
    assert terminals is not None and len(terminals) == 1
    t = terminals[0]
    assert isinstance(t, MPSCNNConvolutionGradientNode) and t.forward_node is net.c1
    made = walk_gradient_nodes(terminals)
    # one call per node made, each node once
    assert len(calls) == len(made) == len(net.forward)
    assert {id(c[0]) for c in calls} == {id(n) for n in made}
    assert {id(c[1]) for c in calls} == {id(f) for f in net.forward}
    expected_class = {net.c1: MPSCNNConvolutionGradientNode, net.r1: MPSCNNNeuronGradientNode,
                      net.p1: MPSCNNPoolingMaxGradientNode, net.c2: MPSCNNConvolutionGradientNode,
                      net.f1: MPSCNNFullyConnectedGradientNode, net.drop: MPSCNNDropoutGradientNode,
                      net.f2: MPSCNNFullyConnectedGradientNode}
    for gn, inf, isrc, gsrc in calls:
        assert gn.forward_node is inf
        assert isrc is inf.source_images[0]
        assert gsrc is gn.source_images[0]          # the gradient fed into the node
        if inf in expected_class:
            assert type(gn) is expected_class[inf]
    # the first gradient is the loss's result image, fed to fc2's gradient node
    first = [c for c in calls if c[1] is net.f2][0]
    assert first[3] is net.loss.result_image
    # reverse order: fc2's gradient is made before conv1's
    order = [c[1] for c in calls]
    assert order.index(net.f2) < order.index(net.f1) < order.index(net.c2) < order.index(net.c1)
    # the chain: each gradient node reads the result of the one made for the next forward node
    by_fwd = {id(c[1]): c[0] for c in calls}
    for a, b in zip(net.forward[:-1], net.forward[1:]):
        assert by_fwd[id(a)].source_images[0] is by_fwd[id(b)].result_image


def test_digit_training_graph_runs_and_updates_each_layer_once(device):
    net = Digits()
    terminals = net.loss.training_graph(None, float32_handler)
    graph = m.MPSNNGraph(device, terminals[0].result_image, False)
    assert graph.source_image_handles == ["x"] and len(graph.source_state_handles or []) == 1
    # every forward filter and every gradient filter runs (nothing pruned: all layers train)
    assert len(graph.plan.steps) == 2 * len(net.forward) + 1
    rng = np.random.default_rng(60)
    xs = [image(device, rng.uniform(0, 1, (28, 28, 1))) for _ in range(2)]
    cb = device.make_command_queue().make_command_buffer()
    assert graph.encode_batch(cb, [xs], [_labels(device, [3, 8])]) is None
    cb.commit()
    cb.wait_until_completed()
    for ds in net.ds:
        assert len(ds.gradient_states) == 1, ds.label()
        gw = ds.gradient_states[0].gradient_for_weights.cpu().numpy()
        assert gw.shape == tuple(ds.w.shape) and np.isfinite(gw).all() and np.abs(gw).max() > 0, ds.label()


def test_updates_run_after_the_steps_last_filter(device, monkeypatch):
    """The graph runs every trainable node's GPU update after the step's filters (all optimizer
    encodes first, then the reloads): no data source update comes before the last gradient
    filter, and each layer is still updated once from the gradients of this step."""
    events: list[str] = []
    grad_encode = m.MPSCNNConvolutionGradient.encode
    monkeypatch.setattr(m.MPSCNNConvolutionGradient, "encode", lambda self, *a, **k: events.append("gradient") or grad_encode(self, *a, **k))
    update = RecordingDS.update
    monkeypatch.setattr(RecordingDS, "update", lambda self, *a: events.append("update") or update(self, *a))
    net = Digits()
    terminals = net.loss.training_graph(None, float32_handler)
    graph = m.MPSNNGraph(device, terminals[0].result_image, False)
    rng = np.random.default_rng(62)
    xs = [image(device, rng.uniform(0, 1, (28, 28, 1))) for _ in range(2)]
    cb = device.make_command_queue().make_command_buffer()
    graph.encode_batch(cb, [xs], [_labels(device, [1, 5])])
    cb.commit()
    cb.wait_until_completed()
    assert events.count("update") == len(net.ds) and events.index("update") > len(events) - 1 - events[::-1].index("gradient")
    for ds in net.ds:
        assert len(ds.gradient_states) == 1, ds.label()


def test_unneeded_input_gradient_is_pruned_and_the_weights_gradients_stay(device):
    """graph.md §3: a training graph whose result (dL/dinput) is not needed computes conv1's
    weight gradients only; every layer's gradients equal those of the graph that returns it."""
    grads, outs = [], []
    for needed in (True, False):
        net = Digits()
        terminals = net.loss.training_graph(None, float32_handler)
        graph = m.MPSNNGraph(device, terminals[0].result_image, needed)
        unused = [type(s.node).__name__ for s in graph.plan.steps if s.result_unused]
        assert unused == ([] if needed else ["MPSCNNConvolutionGradientNode"])
        rng = np.random.default_rng(61)
        xs = [image(device, rng.uniform(0, 1, (28, 28, 1))) for _ in range(2)]
        cb = device.make_command_queue().make_command_buffer()
        outs.append(graph.encode_batch(cb, [xs], [_labels(device, [3, 8])]))
        cb.commit()
        cb.wait_until_completed()
        grads.append([ds.gradient_states[0].gradient_for_weights.cpu().numpy() for ds in net.ds])
        last = graph._kernels[id(graph.plan.steps[-1].node)]
        assert last.gradient_option == m.MPSCNNConvolutionGradientOption.all      # restored after the encode
    assert outs[1] is None and len(outs[0]) == 2
    assert np.abs(outs[0][0].to_numpy()).max() > 0                               # dL/dinput was computed there
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_loss_on_graph_input_returns_loss_node():
    x = MPSNNImageNode("x")
    ld = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    loss = MPSCNNLossNode(x, ld)
    assert loss.training_graph() == [loss]


def test_default_handler_copies_handles():
    net = Digits()
    net.x.handle = "x"
    net.c1.result_image.handle = "c1_out"
    net.p1.result_image.handle = "p1_out"
    terminals = net.loss.training_graph()
    made = walk_gradient_nodes(terminals)
    by_fwd = {id(n.forward_node): n for n in made}
    assert terminals[0].result_image.handle == "x"
    assert by_fwd[id(net.r1)].result_image.handle == "c1_out"
    assert by_fwd[id(net.c2)].result_image.handle == "p1_out"
    for n in made:
        assert n.result_image.handle is n.forward_node.source_images[0].handle


def test_junction_inserts_addition():
    x = MPSNNImageNode("x")
    conv = MPSCNNConvolutionNode(x, RecordingDS(3, 3, 2, 3, "c", 5))
    y = MPSCNNNeuronReLUNode(conv.result_image)
    a = MPSCNNNeuronSigmoidNode(y.result_image)
    b = MPSCNNNeuronTanHNode(y.result_image)
    add = MPSNNAdditionNode(a.result_image, b.result_image)
    g = MPSNNImageNode("g")
    calls: list[tuple] = []
    terminals = add.training_graph(g, lambda *c: calls.append(c))
    adds = [c for c in calls if isinstance(c[0], MPSNNAdditionNode)]
    assert len(adds) == 1
    gn, inf, isrc, gsrc = adds[0]
    assert inf is None and isrc is y.result_image
    grads_of_y = {id(c[0].result_image) for c in calls if c[1] in (a, b)}
    assert {id(s) for s in gn.source_images} == grads_of_y and gsrc.producer is not None
    # relu's gradient reads the sum
    relu_g = [c[0] for c in calls if c[1] is y][0]
    assert relu_g.source_images[0] is gn.result_image
    assert terminals is not None and len(terminals) == 1 and terminals[0].forward_node is conv
    # the two addition gradients (primary, secondary) + sigmoid, tanh, sum, relu, conv
    assert len(calls) == 7


def test_stop_gradient():
    x = MPSNNImageNode("x")
    c1 = MPSCNNConvolutionNode(x, RecordingDS(3, 3, 1, 2, "c1", 6))
    r1 = MPSCNNNeuronReLUNode(c1.result_image)
    c2 = MPSCNNConvolutionNode(r1.result_image, RecordingDS(3, 3, 2, 2, "c2", 7))
    r2 = MPSCNNNeuronReLUNode(c2.result_image)
    r1.result_image.stop_gradient = True
    calls: list[tuple] = []
    terminals = r2.training_graph(MPSNNImageNode("g"), lambda *c: calls.append(c))
    fwd = [c[1] for c in calls]
    assert fwd == [r2, c2]                        # nothing for r1, c1
    assert terminals is not None and len(terminals) == 1
    assert isinstance(terminals[0], MPSCNNConvolutionGradientNode) and terminals[0].forward_node is c2
    # a non-trainable filter reading a stopped image gets no gradient node (its result would
    # be the gradient of the stopped image; mpsnn/graph/training.py step 4)
    s = MPSCNNNeuronSigmoidNode(r1.result_image)
    t = MPSCNNNeuronTanHNode(s.result_image)
    u = MPSCNNNeuronAbsoluteNode(t.result_image)
    s.result_image.stop_gradient = True
    calls.clear()
    terminals = u.training_graph(MPSNNImageNode("g"), lambda *c: calls.append(c))
    assert [c[1] for c in calls] == [u]
    assert terminals is not None and [n.forward_node for n in terminals] == [u]
    calls.clear()
    assert t.training_graph(MPSNNImageNode("g"), lambda *c: calls.append(c)) is None
    assert calls == []
    # a stopped graph input: nothing to do
    x2 = MPSNNImageNode("x2")
    x2.stop_gradient = True
    assert MPSCNNNeuronReLUNode(x2).training_graph(MPSNNImageNode("g")) is None


def test_stop_gradient_on_graph_input_of_trainable_conv_still_trains():
    x = MPSNNImageNode("x")
    x.stop_gradient = True
    conv = MPSCNNConvolutionNode(x, RecordingDS(3, 3, 1, 2, "c", 8))
    terminals = conv.training_graph(MPSNNImageNode("g"))
    assert terminals is not None and len(terminals) == 1 and terminals[0].forward_node is conv


def test_training_style_propagates():
    x = MPSNNImageNode("x")
    c1 = MPSCNNConvolutionNode(x, RecordingDS(3, 3, 1, 2, "c1", 9))
    c2 = MPSCNNConvolutionNode(c1.result_image, RecordingDS(3, 3, 2, 2, "c2", 10))
    c3 = MPSCNNFullyConnectedNode(c2.result_image, RecordingDS(4, 4, 2, 3, "fc", 11))
    assert c1.training_style == TS.updateDeviceGPU
    c1.training_style = TS.updateDeviceNone
    c2.training_style = TS.updateDeviceCPU
    made = walk_gradient_nodes(c3.training_graph(MPSNNImageNode("g")))
    styles = {id(n.forward_node): n.training_style for n in made}
    assert styles == {id(c1): TS.updateDeviceNone, id(c2): TS.updateDeviceCPU, id(c3): TS.updateDeviceGPU}
    with pytest.raises(m.MPSValueError, match="MPSCNNConvolutionNode.*training_style"):
        c1.training_style = 7


def test_filter_without_gradient_ends_propagation():
    x = MPSNNImageNode("x")
    x2 = MPSNNImageNode("x2")
    conv = MPSCNNConvolutionNode(x, RecordingDS(3, 3, 1, 2, "c", 12))
    relu = MPSCNNNeuronReLUNode(conv.result_image)
    sig = MPSCNNNeuronSigmoidNode(x2)
    div = MPSNNDivisionNode(relu.result_image, sig.result_image)
    sm = MPSCNNSoftMaxNode(div.result_image)
    calls: list[tuple] = []
    terminals = sm.training_graph(MPSNNImageNode("g"), lambda *c: calls.append(c))
    assert [c[1] for c in calls] == [sm]
    assert terminals is not None and len(terminals) == 1 and isinstance(terminals[0], MPSCNNSoftMaxGradientNode)
    with pytest.raises(m.MPSValueError, match="MPSNNDivisionNode"):
        div.gradient_filters_with_sources([MPSNNImageNode("g")])
    # training_graph started at the division itself makes nothing
    assert div.training_graph(MPSNNImageNode("g")) is None


def test_gradient_nodes_have_no_gradient():
    x = MPSNNImageNode("x")
    relu = MPSCNNNeuronReLUNode(x)
    gn = relu.gradient_filter_with_source(MPSNNImageNode("g"))
    with pytest.raises(m.MPSValueError, match="gradient"):
        gn.training_graph(MPSNNImageNode("g"))
    with pytest.raises(m.MPSValueError, match="gradient"):
        gn.gradient_filter_with_source(MPSNNImageNode("g"))


# ----------------------------------------------------------------------------------------------
# 5. gradients vs autograd
# ----------------------------------------------------------------------------------------------
def test_conv_relu_avgpool_fc_gradients_match_autograd(device):
    h = w = 6
    cin, cmid, k = 2, 3, 4
    d1 = RecordingDS(3, 3, cin, cmid, "conv", 20)
    d2 = RecordingDS(h // 2, w // 2, cmid, k, "fc", 21)
    x = MPSNNImageNode("x")
    g = MPSNNImageNode("g")
    conv = MPSCNNConvolutionNode(x, d1)
    relu = MPSCNNNeuronReLUNode(conv.result_image)
    pool = MPSCNNPoolingAverageNode(relu.result_image, 2)
    fc = MPSCNNFullyConnectedNode(pool.result_image, d2)
    terminals = fc.training_graph(g, float32_handler)
    assert terminals is not None and len(terminals) == 1
    graph = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph.format = F.float32
    assert sorted(graph.source_image_handles) == ["g", "x"]
    rng = np.random.default_rng(22)
    xv = rng.uniform(-1, 1, (h, w, cin)).astype(np.float32)
    gv = rng.normal(size=(1, 1, k)).astype(np.float32)
    dx = run_graph(device, graph, {"x": xv, "g": gv})
    assert dx.shape == (1, h, w, cin)
    # each data source saw one update with the gradients of this encode
    assert len(d1.gradient_states) == 1 and len(d2.gradient_states) == 1
    # reference
    X = nchw(xv).requires_grad_()
    W1, W2 = conv_w(d1), conv_w(d2)
    B1, B2 = d1.b.double().clone().requires_grad_(), d2.b.double().clone().requires_grad_()
    y = tf.conv2d(X, W1.permute(0, 3, 1, 2), B1, padding=1)
    y = tf.avg_pool2d(tf.relu(y), 2)
    z = tf.conv2d(y, W2.permute(0, 3, 2, 1), B2)
    z.backward(nchw(gv))
    np.testing.assert_allclose(dx, nhwc(X.grad), atol=ATOL)
    for ds, Wt, Bt in ((d1, W1, B1), (d2, W2, B2)):
        st = ds.gradient_states[0]
        np.testing.assert_allclose(st.gradient_for_weights.cpu().numpy(), Wt.grad.numpy(), atol=ATOL, err_msg=ds.label())
        np.testing.assert_allclose(st.gradient_for_biases.cpu().numpy(), Bt.grad.numpy(), atol=ATOL, err_msg=ds.label())
        # the source state holds the weights the forward pass used
        np.testing.assert_array_equal(ds.source_states[0].weights.cpu().numpy(), ds.w.numpy())
    # the gradient is not trivially zero
    assert np.abs(dx).max() > 1e-2


def test_residual_junction_gradients_match_autograd(device):
    """x -> conv0 -> relu = h ; a = conv1(h) ; out = a + h. h is a junction (read by conv1 and
    the addition): training_graph sums the two gradients before relu / conv0."""
    hh = ww = 5
    c = 3
    d0 = RecordingDS(3, 3, 2, c, "conv0", 30)
    d1 = RecordingDS(3, 3, c, c, "conv1", 31)
    x = MPSNNImageNode("x")
    g = MPSNNImageNode("g")
    conv0 = MPSCNNConvolutionNode(x, d0)
    relu = MPSCNNNeuronReLUNode(conv0.result_image)
    conv1 = MPSCNNConvolutionNode(relu.result_image, d1)
    add = MPSNNAdditionNode(conv1.result_image, relu.result_image)
    calls: list[tuple] = []

    def handler(gn, inf, isrc, gsrc):
        calls.append((gn, inf))
        float32_handler(gn, inf, isrc, gsrc)

    terminals = add.training_graph(g, handler)
    assert terminals is not None and len(terminals) == 1 and terminals[0].forward_node is conv0
    assert sum(1 for gn, inf in calls if inf is None and isinstance(gn, MPSNNAdditionNode)) == 1
    graph = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph.format = F.float32
    rng = np.random.default_rng(32)
    xv = rng.uniform(-1, 1, (hh, ww, 2)).astype(np.float32)
    gv = rng.normal(size=(hh, ww, c)).astype(np.float32)
    dx = run_graph(device, graph, {"x": xv, "g": gv})
    X = nchw(xv).requires_grad_()
    W0, W1 = conv_w(d0), conv_w(d1)
    B0, B1 = d0.b.double().clone().requires_grad_(), d1.b.double().clone().requires_grad_()
    hr = tf.relu(tf.conv2d(X, W0.permute(0, 3, 1, 2), B0, padding=1))
    out = tf.conv2d(hr, W1.permute(0, 3, 1, 2), B1, padding=1) + hr
    out.backward(nchw(gv))
    np.testing.assert_allclose(dx, nhwc(X.grad), atol=ATOL)
    for ds, Wt, Bt in ((d0, W0, B0), (d1, W1, B1)):
        assert len(ds.gradient_states) == 1
        st = ds.gradient_states[0]
        np.testing.assert_allclose(st.gradient_for_weights.cpu().numpy(), Wt.grad.numpy(), atol=ATOL, err_msg=ds.label())
        np.testing.assert_allclose(st.gradient_for_biases.cpu().numpy(), Bt.grad.numpy(), atol=ATOL, err_msg=ds.label())


def test_filter_reading_one_image_twice_gradients_match_autograd(device):
    """y = conv(x); out = y * y: the multiplication reads y twice, so y gets two gradients
    (one per operand) that training_graph sums."""
    d = RecordingDS(3, 3, 2, 3, "conv", 35)
    x = MPSNNImageNode("x")
    g = MPSNNImageNode("g")
    conv = MPSCNNConvolutionNode(x, d)
    mul = MPSNNMultiplicationNode(conv.result_image, conv.result_image)
    calls: list[tuple] = []

    def handler(gn, inf, isrc, gsrc):
        calls.append((gn, inf))
        float32_handler(gn, inf, isrc, gsrc)

    terminals = mul.training_graph(g, handler)
    assert terminals is not None and len(terminals) == 1 and terminals[0].forward_node is conv
    assert sum(1 for gn, inf in calls if inf is None) == 1
    graph = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph.format = F.float32
    rng = np.random.default_rng(36)
    xv = rng.uniform(-1, 1, (4, 4, 2)).astype(np.float32)
    gv = rng.normal(size=(4, 4, 3)).astype(np.float32)
    dx = run_graph(device, graph, {"x": xv, "g": gv})
    X = nchw(xv).requires_grad_()
    W, B = conv_w(d), d.b.double().clone().requires_grad_()
    y = tf.conv2d(X, W.permute(0, 3, 1, 2), B, padding=1)
    (y * y).backward(nchw(gv))
    np.testing.assert_allclose(dx, nhwc(X.grad), atol=ATOL)
    st = d.gradient_states[0]
    np.testing.assert_allclose(st.gradient_for_weights.cpu().numpy(), W.grad.numpy(), atol=ATOL)
    np.testing.assert_allclose(st.gradient_for_biases.cpu().numpy(), B.grad.numpy(), atol=ATOL)


def test_two_inputs_give_two_terminals_multi_result_graph(device):
    """conv1(x1) - conv2(x2): two terminals (made in reverse execution order: conv2's first),
    run as one multi-result graph; each dX matches autograd."""
    d1 = RecordingDS(3, 3, 1, 2, "conv1", 37)
    d2 = RecordingDS(3, 3, 1, 2, "conv2", 38)
    x1, x2, g = MPSNNImageNode("x1"), MPSNNImageNode("x2"), MPSNNImageNode("g")
    c1 = MPSCNNConvolutionNode(x1, d1)
    c2 = MPSCNNConvolutionNode(x2, d2)
    sub = MPSNNSubtractionNode(c1.result_image, c2.result_image)

    def handler(gn, inf, isrc, gsrc):
        float32_handler(gn, inf, isrc, gsrc)
        gn.result_image.handle = "d" + str(isrc.handle)

    terminals = sub.training_graph(g, handler)
    assert terminals is not None and [t.forward_node for t in terminals] == [c2, c1]
    graph = m.MPSNNGraph(device, result_images=[t.result_image for t in terminals])
    graph.format = F.float32
    assert graph.result_handle == "dx2" and graph.intermediate_image_handles == ["dx1"]
    assert sorted(graph.source_image_handles) == ["g", "x1", "x2"]
    rng = np.random.default_rng(39)
    src = {"x1": rng.uniform(-1, 1, (4, 4, 1)).astype(np.float32), "x2": rng.uniform(-1, 1, (4, 4, 1)).astype(np.float32),
           "g": rng.normal(size=(4, 4, 2)).astype(np.float32)}
    cb = device.make_command_queue().make_command_buffer()
    inter: list = []
    out = graph.encode(cb, [image(device, src[h]) for h in graph.source_image_handles], None, inter)
    cb.commit()
    cb.wait_until_completed()
    X1, X2 = nchw(src["x1"]).requires_grad_(), nchw(src["x2"]).requires_grad_()
    W1, W2 = conv_w(d1), conv_w(d2)
    y = tf.conv2d(X1, W1.permute(0, 3, 1, 2), d1.b.double(), padding=1) - tf.conv2d(X2, W2.permute(0, 3, 1, 2), d2.b.double(), padding=1)
    y.backward(nchw(src["g"]))
    np.testing.assert_allclose(out.to_numpy(), nhwc(X2.grad), atol=ATOL)
    np.testing.assert_allclose(inter[0].to_numpy(), nhwc(X1.grad), atol=ATOL)
    np.testing.assert_allclose(d2.gradient_states[0].gradient_for_weights.cpu().numpy(), W2.grad.numpy(), atol=ATOL)
    np.testing.assert_allclose(d1.gradient_states[0].gradient_for_weights.cpu().numpy(), W1.grad.numpy(), atol=ATOL)


def test_gradients_batch_of_two_sum_weight_gradients(device):
    """encode_batch over two entries: dX per entry, weight gradients summed over the batch."""
    d1 = RecordingDS(3, 3, 1, 2, "conv", 40)
    x = MPSNNImageNode("x")
    g = MPSNNImageNode("g")
    conv = MPSCNNConvolutionNode(x, d1)
    relu = MPSCNNNeuronReLUNode(conv.result_image)
    terminals = relu.training_graph(g, float32_handler)
    graph = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph.format = F.float32
    rng = np.random.default_rng(41)
    xs = rng.uniform(-1, 1, (2, 4, 4, 1)).astype(np.float32)
    gs = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    src = {"x": xs, "g": gs}
    cb = device.make_command_queue().make_command_buffer()
    outs = graph.encode_batch(cb, [[image(device, a) for a in src[hd]] for hd in graph.source_image_handles])
    cb.commit()
    cb.wait_until_completed()
    X = nchw(xs).requires_grad_()
    W1, B1 = conv_w(d1), d1.b.double().clone().requires_grad_()
    tf.relu(tf.conv2d(X, W1.permute(0, 3, 1, 2), B1, padding=1)).backward(nchw(gs))
    ref = nhwc(X.grad)
    assert len(outs) == 2
    for k in range(2):
        np.testing.assert_allclose(outs[k].to_numpy()[0], ref[k], atol=ATOL)
    st = d1.gradient_states[-1]
    np.testing.assert_allclose(st.gradient_for_weights.cpu().numpy(), W1.grad.numpy(), atol=ATOL)
    np.testing.assert_allclose(st.gradient_for_biases.cpu().numpy(), B1.grad.numpy(), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# 6. one SGD step of the digit network
# ----------------------------------------------------------------------------------------------
def _labels(dev: m.Device, ys: list[int], classes: int = 10) -> list:
    out = []
    for y in ys:
        v = np.zeros(classes, np.float32)
        v[y] = 1
        dd = MPSCNNLossDataDescriptor(v.tobytes(), m.MPSDataLayout.HeightxWidthxFeatureChannels, m.MTLSize(1, 1, classes))
        out.append(MPSCNNLossLabels(dev, labels_descriptor=dd))
    return out


def test_sgd_step_matches_float64_reference(device):
    hh = ww = 8
    lr, weight = 0.1, 0.5
    conv_ds = SGDDS(device, 3, 3, 1, 4, "conv1", 50, learning_rate=lr, scale=0.8)
    fc_ds = SGDDS(device, hh // 2, ww // 2, 4, 10, "fc1", 51, learning_rate=lr, scale=0.8)
    x = MPSNNImageNode("x")
    conv = MPSCNNConvolutionNode(x, conv_ds)
    relu = MPSCNNNeuronReLUNode(conv.result_image)
    pool = MPSCNNPoolingMaxNode(relu.result_image, 2)
    fc = MPSCNNFullyConnectedNode(pool.result_image, fc_ds)
    ld = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    ld.weight = weight
    loss = MPSCNNLossNode(fc.result_image, ld)
    terminals = loss.training_graph(None, float32_handler)
    assert terminals is not None and len(terminals) == 1
    graph = m.MPSNNGraph(device, terminals[0].result_image, False)
    graph.format = F.float32
    rng = np.random.default_rng(52)
    xs = rng.uniform(0, 1, (3, hh, ww, 1)).astype(np.float32)
    ys = [1, 7, 3]
    labels = _labels(device, ys)
    cb = device.make_command_queue().make_command_buffer()
    res = graph.encode_batch(cb, [[image(device, a) for a in xs]], [labels])
    cb.commit()
    cb.wait_until_completed()
    assert res is None
    assert len(conv_ds.gradient_states) == 1 and len(fc_ds.gradient_states) == 1    # one update per encode
    # float64 reference
    X = nchw(xs)
    W1, W2 = conv_w(conv_ds), conv_w(fc_ds)
    B1, B2 = conv_ds.b.double().clone().requires_grad_(), fc_ds.b.double().clone().requires_grad_()
    y = tf.max_pool2d(tf.relu(tf.conv2d(X, W1.permute(0, 3, 1, 2), B1, padding=1)), 2)
    z = tf.conv2d(y, W2.permute(0, 3, 2, 1), B2).reshape(3, 10)
    per_image = weight * tf.cross_entropy(z, torch.tensor(ys), reduction="none")
    per_image.sum().backward()
    # losses landed in the labels
    got = [float(lab.loss_image().read_bytes(m.MPSDataLayout.HeightxWidthxFeatureChannels, 0).ravel()[0]) for lab in labels]
    np.testing.assert_allclose(got, per_image.detach().numpy(), rtol=1e-5)
    for ds, Wt, Bt in ((conv_ds, W1, B1), (fc_ds, W2, B2)):
        w_new = (Wt - lr * Wt.grad).detach().numpy()
        b_new = (Bt - lr * Bt.grad).detach().numpy()
        np.testing.assert_allclose(ds.state.weights.cpu().numpy(), w_new, rtol=1e-5, atol=2e-6, err_msg=ds.label())
        np.testing.assert_allclose(ds.state.biases.cpu().numpy(), b_new, rtol=1e-5, atol=2e-6, err_msg=ds.label())
        assert np.abs(Wt.grad.numpy()).max() > 1e-3            # the step moved the weights
    # the graph's kernels took the new weights: an inference graph over the same nodes, reloaded
    # from states, is not needed; a second training step reads them through the forward kernel
    src_w = [conv_ds.source_states[0].weights.cpu().numpy().copy(), fc_ds.source_states[0].weights.cpu().numpy().copy()]
    cb = device.make_command_queue().make_command_buffer()
    graph.encode_batch(cb, [[image(device, a) for a in xs]], [_labels(device, ys)])
    cb.commit()
    cb.wait_until_completed()
    np.testing.assert_allclose(conv_ds.source_states[1].weights.cpu().numpy(), (W1 - lr * W1.grad).detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(fc_ds.source_states[1].weights.cpu().numpy(), (W2 - lr * W2.grad).detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(src_w[0], conv_ds.w.numpy())
    np.testing.assert_array_equal(src_w[1], fc_ds.w.numpy())
