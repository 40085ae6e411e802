"""MPSNNGraph core (spec/graph.md §9-11): encode forms, batches, results and intermediates,
handles, read counts, temporaries, allocators, formats, async execution, reload, errors.

Apple classes exercised: MPSNNGraph, MPSNNImageNode, MPSNNStateNode, MPSTemporaryImage,
MPSImageAllocator, with the finished node families (convolution / fully connected, neurons,
pooling, arithmetic, softmax, loss).

Every numeric check compares the graph with the same kernels encoded one by one (built here
with the node's parameters: the node default padding ``sizeSame | alignCentered |
addRemainderToTopLeft`` and, for pooling, edge mode clamp) or with a float64 NumPy expression.

Decisions where the spec is silent (inferred):

* A stacked batch (``encode_batch``) may run the convolution with another batch size than the
  separate runs, so batch results are compared within 1e-6 rather than bit for bit.
* ``intermediate_image_handles`` order is the one documented in :mod:`mpsnn.graph.plan`
  (exported images in execution order, the extra results in the order given, then the first
  result when it is exported itself).
* A graph whose result is not needed and which exports nothing plans no filter at all; it has
  no source image handles and its encode (given the empty list of sources it asks for) returns
  None.
* Node classes are imported from their defining modules (mypy cannot follow the computed
  ``__all__`` of ``mpsnn.graph.nodes``); :func:`test_public_names` checks that they are the
  public ``mpsnn`` names.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSImageFeatureChannelFormat as F
from mpsnn.graph.nodes.arithmetic import MPSNNAdditionNode
from mpsnn.graph.nodes.base import MPSNNImageNode
from mpsnn.graph.nodes.convolution import MPSCNNConvolutionNode, MPSCNNFullyConnectedNode
from mpsnn.graph.nodes.loss import MPSCNNLossNode
from mpsnn.graph.nodes.neuron import (
    MPSCNNNeuronAbsoluteNode,
    MPSCNNNeuronLinearNode,
    MPSCNNNeuronReLUNode,
    MPSCNNNeuronSigmoidNode,
    MPSCNNNeuronTanHNode,
)
from mpsnn.graph.nodes.pooling import MPSCNNPoolingMaxNode
from mpsnn.graph.nodes.softmax import MPSCNNSoftMaxNode
from mpsnn.kernels.convolution_data import ConvolutionDataSource
from mpsnn.kernels.loss_labels import MPSCNNLossDescriptor, MPSCNNLossType, MPSCNNReductionType

PAD16 = m.MPSNNDefaultPadding.padding_with_method(
    m.MPSNNPaddingMethod.sizeSame | m.MPSNNPaddingMethod.alignCentered | m.MPSNNPaddingMethod.addRemainderToTopLeft)
H = W = 6
CIN, CMID, K = 2, 4, 5


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_ds(kw: int, kh: int, cin: int, cout: int, label: str, seed: int) -> ConvolutionDataSource:
    g = torch.Generator().manual_seed(seed)
    d = m.MPSCNNConvolutionDescriptor(kernel_width=kw, kernel_height=kh, input_feature_channels=cin, output_feature_channels=cout)
    return ConvolutionDataSource(d, torch.rand(cout, kh, kw, cin, generator=g) - 0.5, torch.rand(cout, generator=g) - 0.5, label)


def rand_image(dev: m.Device, seed: int, n: int = 1, h: int = H, w: int = W, c: int = CIN) -> m.MPSImage:
    arr = np.random.default_rng(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)
    return m.MPSImage.from_numpy(arr, dev)


class Net:
    """conv 3x3 -> ReLU -> max-pool 2 -> fully connected -> softmax."""

    def __init__(self, conv_ds: ConvolutionDataSource | None = None, fc_ds: ConvolutionDataSource | None = None) -> None:
        self.conv_ds = conv_ds or make_ds(3, 3, CIN, CMID, "conv", 1)
        self.fc_ds = fc_ds or make_ds(H // 2, W // 2, CMID, K, "fc", 2)
        self.x = MPSNNImageNode("x")
        self.conv = MPSCNNConvolutionNode(self.x, self.conv_ds)
        self.relu = MPSCNNNeuronReLUNode(self.conv.result_image)
        self.pool = MPSCNNPoolingMaxNode(self.relu.result_image, 2)
        self.fc = MPSCNNFullyConnectedNode(self.pool.result_image, self.fc_ds)
        self.softmax = MPSCNNSoftMaxNode(self.fc.result_image)
        self.filters = [self.conv, self.relu, self.pool, self.fc, self.softmax]
        for f, name in zip(self.filters, ("conv1", "relu1", "pool1", "fc1", "softmax1")):
            f.label = name

    def graph(self, dev: m.Device, fmt: F | None = F.float32, **kw) -> m.MPSNNGraph:
        g = m.MPSNNGraph(dev, self.softmax.result_image, True, **kw)
        if fmt is not None:
            g.format = fmt
        return g

    def kernels(self, dev: m.Device) -> list:
        pool = m.MPSCNNPoolingMax(dev, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
        pool.edge_mode = m.MPSImageEdgeMode.clamp
        return [m.MPSCNNConvolution(dev, weights=self.conv_ds), m.MPSCNNNeuronReLU(dev, a=0.0), pool,
                m.MPSCNNFullyConnected(dev, weights=self.fc_ds), m.MPSCNNSoftMax(dev)]


def run_kernels(dev: m.Device, kernels: list, img: m.MPSImage, upto: int | None = None) -> np.ndarray:
    """Encode ``kernels`` one by one into float32 images; returns the NHWC result."""
    cb = dev.make_command_queue().make_command_buffer()
    cur = img
    for k in kernels[:upto]:
        k.padding = PAD16
        d = k.destination_image_descriptor([cur])
        dst = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=F.float32, width=d.width, height=d.height,
                                                   feature_channels=d.feature_channels, number_of_images=cur.number_of_images))
        k.encode(cb, cur, dst)
        cur = dst
    cb.commit()
    cb.wait_until_completed()
    return cur.to_numpy()


def new_cb(dev: m.Device) -> m.MTLCommandBuffer:
    return dev.make_command_queue().make_command_buffer()


def finish(cb: m.MTLCommandBuffer) -> None:
    cb.commit()
    cb.wait_until_completed()


class RecordingAllocator(m.MPSImageAllocator):
    def __init__(self) -> None:
        self.made: list[m.MPSImage] = []
        self.kernels: list = []

    def image_for_command_buffer(self, command_buffer, image_descriptor, kernel):
        img = m.MPSImage(command_buffer.device, image_descriptor)
        self.made.append(img)
        self.kernels.append(kernel)
        return img


def test_public_names():
    for cls in (MPSNNAdditionNode, MPSNNImageNode, MPSCNNConvolutionNode, MPSCNNFullyConnectedNode, MPSCNNLossNode,
                MPSCNNNeuronAbsoluteNode, MPSCNNNeuronLinearNode, MPSCNNNeuronReLUNode, MPSCNNNeuronSigmoidNode,
                MPSCNNNeuronTanHNode, MPSCNNPoolingMaxNode, MPSCNNSoftMaxNode, MPSCNNLossDescriptor, MPSCNNLossType,
                MPSCNNReductionType):
        assert getattr(m, cls.__name__) is cls
        assert cls.__name__ in m.__all__


# ----------------------------------------------------------------------------------------------
# 1. graph == kernels one by one
# ----------------------------------------------------------------------------------------------
def test_graph_equals_kernels_batch1(device):
    net = Net()
    graph = net.graph(device)
    img = rand_image(device, 0)
    cb = new_cb(device)
    out = graph.encode(cb, [img])
    finish(cb)
    assert isinstance(out, m.MPSImage) and out.feature_channel_format == F.float32
    assert out.shape == (1, 1, 1, K)
    ref = run_kernels(device, net.kernels(device), img)
    np.testing.assert_array_equal(out.to_numpy(), ref)
    # the same graph encodes again (second encode, same numbers)
    np.testing.assert_array_equal(graph.run([img]).to_numpy(), ref)


def test_encode_batch_of_three_equals_three_runs(device):
    net = Net()
    graph = net.graph(device)
    imgs = [rand_image(device, s) for s in (10, 11, 12)]
    cb = new_cb(device)
    outs = graph.encode_batch(cb, [imgs])
    finish(cb)
    assert isinstance(outs, list) and len(outs) == 3
    ks = net.kernels(device)
    for img, out in zip(imgs, outs):
        assert out.shape == (1, 1, 1, K)
        single = graph.run([img]).to_numpy()
        np.testing.assert_allclose(out.to_numpy(), single, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.to_numpy(), run_kernels(device, ks, img), rtol=1e-6, atol=1e-6)
    # results are distinct entries, not the same image thrice
    assert not np.allclose(outs[0].to_numpy(), outs[1].to_numpy())


def test_encode_batch_of_views_of_one_image(device):
    """Entries that are views of one multi-image MPSImage (batch_representation), all of them or
    some of them, give the same results as separate runs."""
    net = Net()
    graph = net.graph(device)
    big = rand_image(device, 13, n=3)
    singles = [graph.run([m.MPSImage.from_numpy(big.to_numpy()[k:k + 1], device)]).to_numpy() for k in range(3)]
    views = big.batch_representation()
    for entries, idx in ((views, [0, 1, 2]), (views[1:], [1, 2]), ([views[2], views[0]], [2, 0])):
        cb = new_cb(device)
        outs = graph.encode_batch(cb, [entries])
        finish(cb)
        assert len(outs) == len(idx)
        for o, k in zip(outs, idx):
            np.testing.assert_allclose(o.to_numpy(), singles[k], rtol=1e-6, atol=1e-6)
    # the source image is left as it was
    np.testing.assert_array_equal(big.to_numpy(), rand_image(device, 13, n=3).to_numpy())


def test_multi_image_source_images(device):
    net = Net()
    graph = net.graph(device)
    img2 = rand_image(device, 3, n=2)
    out = graph.run([img2])
    assert out.shape == (2, 1, 1, K)
    ref = run_kernels(device, net.kernels(device), img2)
    np.testing.assert_allclose(out.to_numpy(), ref, rtol=1e-6, atol=1e-6)
    # the two images are processed independently
    for k in range(2):
        one = m.MPSImage.from_numpy(img2.to_numpy()[k:k + 1], device)
        np.testing.assert_allclose(out.to_numpy()[k:k + 1], graph.run([one]).to_numpy(), rtol=1e-6, atol=1e-6)
    # a batch of two entries of two images each: each entry keeps its two images
    other = rand_image(device, 4, n=2)
    cb = new_cb(device)
    outs = graph.encode_batch(cb, [[img2, other]])
    finish(cb)
    assert [o.number_of_images for o in outs] == [2, 2]
    np.testing.assert_allclose(outs[0].to_numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[1].to_numpy(), run_kernels(device, net.kernels(device), other), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. results, intermediates, handles
# ----------------------------------------------------------------------------------------------
def _branchy():
    """x -> relu (exported 'ea') -> sigmoid ; x -> linear (exported 'ec');
    r0 = sigmoid + linear (exported), r1 = tanh(relu), r2 = abs(linear).
    The linear node is made first so that creation order differs from execution order."""
    x = MPSNNImageNode("x")
    lin = MPSCNNNeuronLinearNode(x, a=2.0, b=0.5)
    relu = MPSCNNNeuronReLUNode(x)
    sig = MPSCNNNeuronSigmoidNode(relu.result_image)
    add = MPSNNAdditionNode(sig.result_image, lin.result_image)
    tanh = MPSCNNNeuronTanHNode(relu.result_image)
    ab = MPSCNNNeuronAbsoluteNode(lin.result_image)
    relu.result_image.export_from_graph = True
    relu.result_image.handle = "ea"
    lin.result_image.export_from_graph = True
    lin.result_image.handle = "ec"
    add.result_image.export_from_graph = True
    add.result_image.handle = "r0"
    tanh.result_image.handle = "r1"
    ab.result_image.handle = "r2"
    nodes = dict(x=x, lin=lin, relu=relu, sig=sig, add=add, tanh=tanh, ab=ab)
    return nodes


def _branchy_refs(xv: np.ndarray) -> dict[str, np.ndarray]:
    x = xv.astype(np.float64)
    relu = np.maximum(x, 0)
    lin = 2 * x + 0.5
    return {"ea": relu, "ec": lin, "r0": 1 / (1 + np.exp(-relu)) + lin, "r1": np.tanh(relu), "r2": np.abs(lin)}


def test_multiple_results_and_intermediate_handle_order(device):
    n = _branchy()
    results = [n["add"].result_image, n["tanh"].result_image, n["ab"].result_image]
    graph = m.MPSNNGraph(device, result_images=results)
    graph.format = F.float32
    assert graph.result_handle == "r0"
    assert graph.result_image_is_needed is True
    # exported in execution order (relu runs before linear), extra results in order, then r0
    assert graph.intermediate_image_handles == ["ea", "ec", "r1", "r2", "r0"]
    img = rand_image(device, 5, c=3)
    refs = _branchy_refs(img.to_numpy())
    cb = new_cb(device)
    inter: list = []
    out = graph.encode(cb, [img], None, inter)
    finish(cb)
    np.testing.assert_allclose(out.to_numpy(), refs["r0"], rtol=1e-6, atol=1e-6)
    assert len(inter) == 5
    for h, im in zip(graph.intermediate_image_handles, inter):
        assert isinstance(im, m.MPSImage) and not im.is_temporary
        np.testing.assert_allclose(im.to_numpy(), refs[h], rtol=1e-6, atol=1e-6, err_msg=h)
    # batch form: intermediates arrive as batches
    imgs = [rand_image(device, s, c=3) for s in (6, 7)]
    cb = new_cb(device)
    inter_b: list = []
    outs = graph.encode_batch(cb, [imgs], None, inter_b)
    finish(cb)
    assert len(outs) == 2 and len(inter_b) == 5 and all(len(b) == 2 for b in inter_b)
    for k, im in enumerate(imgs):
        refs = _branchy_refs(im.to_numpy())
        for h, batch in zip(graph.intermediate_image_handles, inter_b):
            np.testing.assert_allclose(batch[k].to_numpy(), refs[h], rtol=1e-6, atol=1e-6, err_msg=h)


def test_results_are_needed_prunes_unneeded_result(device):
    n = _branchy()
    results = [n["add"].result_image, n["tanh"].result_image, n["ab"].result_image]
    graph = m.MPSNNGraph(device, result_images=results, results_are_needed=[True, False, True])
    graph.format = F.float32
    planned = [s.node for s in graph.plan.steps]
    assert n["tanh"] not in planned               # only served the unneeded result r1
    assert all(f in planned for f in (n["lin"], n["relu"], n["sig"], n["add"], n["ab"]))
    assert graph.intermediate_image_handles == ["ea", "ec", "r2", "r0"]
    img = rand_image(device, 8, c=3)
    refs = _branchy_refs(img.to_numpy())
    inter: list = []
    cb = new_cb(device)
    graph.encode(cb, [img], None, inter)
    finish(cb)
    for h, im in zip(["ea", "ec", "r2", "r0"], inter):
        np.testing.assert_allclose(im.to_numpy(), refs[h], rtol=1e-6, atol=1e-6, err_msg=h)
    # first result not needed: encode returns None; extra results still delivered
    g2 = m.MPSNNGraph(device, result_images=[n["tanh"].result_image, n["ab"].result_image], results_are_needed=[False, True])
    g2.format = F.float32
    assert g2.result_image_is_needed is False
    assert n["tanh"] not in [s.node for s in g2.plan.steps]
    inter = []
    cb = new_cb(device)
    assert g2.encode(cb, [img], None, inter) is None
    finish(cb)
    # relu's export still runs (exports of every filter reachable from a result are roots)
    assert g2.intermediate_image_handles == ["ea", "ec", "r2"]
    for h, im in zip(["ea", "ec", "r2"], inter):
        np.testing.assert_allclose(im.to_numpy(), refs[h], rtol=1e-6, atol=1e-6, err_msg=h)


def test_exported_intermediate_matches_prefix(device):
    net = Net()
    net.relu.result_image.export_from_graph = True
    net.relu.result_image.handle = "relu_out"
    graph = net.graph(device)
    assert graph.intermediate_image_handles == ["relu_out"]
    img = rand_image(device, 9)
    inter: list = []
    cb = new_cb(device)
    out = graph.encode(cb, [img], None, inter)
    finish(cb)
    assert len(inter) == 1
    np.testing.assert_array_equal(inter[0].to_numpy(), run_kernels(device, net.kernels(device), img, upto=2))
    np.testing.assert_array_equal(out.to_numpy(), run_kernels(device, net.kernels(device), img))
    # a graph without the export has no intermediate handles, and intermediate_images stays empty
    net2 = Net()
    g2 = net2.graph(device)
    assert g2.intermediate_image_handles is None
    inter = []
    cb = new_cb(device)
    g2.encode(cb, [img], None, inter)
    finish(cb)
    assert inter == []


def test_exported_node_with_handle():
    node = MPSNNImageNode.exported_node_with_handle("h")
    assert node.export_from_graph is True and node.handle == "h" and node.producer is None
    plain = MPSNNImageNode.node_with_handle("p")
    assert plain.export_from_graph is False and plain.handle == "p"
    assert plain.format is None and plain.stop_gradient is False and plain.synchronize_resource is False


def test_exported_source_node_runs(device):
    x = MPSNNImageNode.exported_node_with_handle("x")
    relu = MPSCNNNeuronReLUNode(x)
    graph = m.MPSNNGraph(device, relu.result_image, True)
    graph.format = F.float32
    assert graph.source_image_handles == ["x"]
    img = rand_image(device, 1)
    np.testing.assert_array_equal(graph.run([img]).to_numpy(), np.maximum(img.to_numpy(), 0))


def test_destination_states_exported(device):
    net = Net()
    st = net.conv.result_state
    st.export_from_graph = True
    st.handle = "conv_state"
    graph = net.graph(device)
    assert graph.result_state_handles == ["conv_state"]
    assert graph.source_state_handles is None
    img = rand_image(device, 2)
    dstates: list = []
    inter: list = []
    cb = new_cb(device)
    out = graph.encode(cb, [img], None, inter, dstates)
    finish(cb)
    assert len(dstates) == 1 and isinstance(dstates[0], m.MPSCNNConvolutionGradientState)
    assert inter == []
    np.testing.assert_array_equal(out.to_numpy(), run_kernels(device, net.kernels(device), img))


def test_result_not_needed_returns_none_and_prunes(device):
    net = Net()
    net.conv.result_image.export_from_graph = True
    graph = m.MPSNNGraph(device, net.softmax.result_image, False)
    graph.format = F.float32
    assert graph.result_image_is_needed is False
    assert [s.node for s in graph.plan.steps] == [net.conv]
    img = rand_image(device, 3)
    inter: list = []
    cb = new_cb(device)
    assert graph.encode(cb, [img], None, inter) is None
    finish(cb)
    np.testing.assert_array_equal(inter[0].to_numpy(), run_kernels(device, net.kernels(device), img, upto=1))


def test_exported_result_that_is_not_needed_is_delivered(device):
    """An exported first result with ``result_image_is_needed=False``: encode returns None, and
    the image, which the graph computes because it is exported, arrives through
    ``intermediate_images`` (plan.py: "then the first result when it is itself exported")."""
    x = MPSNNImageNode("x")
    relu = MPSCNNNeuronReLUNode(x)
    sig = MPSCNNNeuronSigmoidNode(relu.result_image)
    sig.result_image.export_from_graph = True
    sig.result_image.handle = "s"
    graph = m.MPSNNGraph(device, sig.result_image, False)
    graph.format = F.float32
    assert [st.node for st in graph.plan.steps] == [relu, sig]
    assert graph.intermediate_image_handles == ["s"]
    img = rand_image(device, 35)
    inter: list = []
    cb = new_cb(device)
    assert graph.encode(cb, [img], None, inter) is None
    finish(cb)
    assert len(inter) == 1
    np.testing.assert_allclose(inter[0].to_numpy(), 1 / (1 + np.exp(-np.maximum(img.to_numpy(), 0))), rtol=1e-6, atol=1e-6)


def test_fully_pruned_graph_encodes_nothing(device):
    """Result not needed and nothing exported: no filter runs, the graph has no source image
    handles, and encoding (with the empty list of sources it asks for) returns None."""
    net = Net()
    graph = m.MPSNNGraph(device, net.softmax.result_image, False)
    assert graph.plan.steps == []
    assert graph.source_image_handles == []
    cb = new_cb(device)
    assert graph.encode(cb, []) is None
    finish(cb)
    assert graph.run([]) is None


def test_source_image_handles_order_two_inputs(device):
    xa = MPSNNImageNode("a")
    xb = MPSNNImageNode("b")
    ds = make_ds(3, 3, CIN, CIN, "conv", 4)
    conv = MPSCNNConvolutionNode(xb, ds)          # left operand: conv(b)
    add = MPSNNAdditionNode(conv.result_image, xa)
    graph = m.MPSNNGraph(device, add.result_image, True)
    graph.format = F.float32
    # execution order reads b (conv) before a (add)
    assert graph.source_image_handles == ["b", "a"]
    ia, ib = rand_image(device, 20), rand_image(device, 21)
    out = graph.run([ib, ia]).to_numpy()
    ref = run_kernels(device, [m.MPSCNNConvolution(device, weights=ds)], ib) + ia.to_numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # swapped order gives another answer (the order matters)
    assert not np.allclose(graph.run([ia, ib]).to_numpy(), ref)
    # the order is that of the first read in execution order, not the operand order: the
    # relu (reading b) runs before the addition that reads a
    add2 = MPSNNAdditionNode(xa, MPSCNNNeuronReLUNode(xb).result_image)
    assert m.MPSNNGraph(device, add2.result_image, True).source_image_handles == ["b", "a"]
    assert m.MPSNNGraph(device, MPSNNAdditionNode(xa, xb).result_image, True).source_image_handles == ["a", "b"]
    assert m.MPSNNGraph(device, MPSNNAdditionNode(xb, xa).result_image, True).source_image_handles == ["b", "a"]


def _two_readers():
    x = MPSNNImageNode("x")
    relu = MPSCNNNeuronReLUNode(x)
    sig = MPSCNNNeuronSigmoidNode(x)
    add = MPSNNAdditionNode(relu.result_image, sig.result_image)
    return x, add


def test_read_count_for_source_image_and_temporary_sources(device):
    x, add = _two_readers()
    graph = m.MPSNNGraph(device, add.result_image, True)
    graph.format = F.float32
    assert graph.read_count_for_source_image_at_index(0) == 2
    with pytest.raises(m.MPSValueError, match="MPSNNGraph"):
        graph.read_count_for_source_image_at_index(1)
    img = rand_image(device, 30)
    expected = graph.run([img]).to_numpy()
    xv = img.to_numpy().astype(np.float64)
    np.testing.assert_allclose(expected, np.maximum(xv, 0) + 1 / (1 + np.exp(-xv)), rtol=1e-6, atol=1e-6)

    def temp_copy(cb, src, read_count):
        t = m.MPSTemporaryImage(cb, m.MPSImageDescriptor(channel_format=F.float32, width=src.width, height=src.height,
                                                          feature_channels=src.feature_channels))
        t.read_count = read_count
        m.MPSCNNNeuronLinear(device, a=1.0, b=0.0).encode(cb, src, t)
        return t

    cb = new_cb(device)
    t = temp_copy(cb, img, graph.read_count_for_source_image_at_index(0))
    out = graph.encode(cb, [t])
    assert t.read_count == 0          # fully consumed
    t3 = temp_copy(cb, img, 3)
    out3 = graph.encode(cb, [t3])
    assert t3.read_count == 1         # decremented by exactly the read count
    t3.read_count = 0
    finish(cb)
    np.testing.assert_array_equal(out.to_numpy(), expected)
    np.testing.assert_array_equal(out3.to_numpy(), expected)
    # batch form: every temporary entry is consumed
    cb = new_cb(device)
    ts = [temp_copy(cb, img, 2), temp_copy(cb, rand_image(device, 31), 2)]
    outs = graph.encode_batch(cb, [ts])
    assert [tt.read_count for tt in ts] == [0, 0]
    finish(cb)
    np.testing.assert_allclose(outs[0].to_numpy(), expected, rtol=1e-6, atol=1e-6)


def test_read_count_counts_distinct_filters():
    x = MPSNNImageNode("x")
    add_self = MPSNNAdditionNode(x, x)       # one filter reading x twice counts once
    relu = MPSCNNNeuronReLUNode(x)
    add = MPSNNAdditionNode(add_self.result_image, relu.result_image)
    graph = m.MPSNNGraph("cpu", add.result_image, True)
    assert graph.read_count_for_source_image_at_index(0) == 2
    img = rand_image(m.Device("cpu"), 32)
    graph.format = F.float32
    xv = img.to_numpy().astype(np.float64)
    np.testing.assert_allclose(graph.run(img).to_numpy(), 2 * xv + np.maximum(xv, 0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# allocators and formats
# ----------------------------------------------------------------------------------------------
def test_destination_image_allocator(device):
    net = Net()
    graph = net.graph(device)
    assert graph.destination_image_allocator is m.MPSImage.default_allocator
    alloc = RecordingAllocator()
    graph.destination_image_allocator = alloc
    assert graph.destination_image_allocator is alloc
    img = rand_image(device, 40)
    cb = new_cb(device)
    out = graph.encode(cb, [img])
    finish(cb)
    assert len(alloc.made) == 1 and out is alloc.made[0]        # only the result comes from it
    assert isinstance(alloc.kernels[0], m.MPSCNNSoftMax)
    assert out.feature_channel_format == F.float32
    np.testing.assert_array_equal(out.to_numpy(), run_kernels(device, net.kernels(device), img))
    with pytest.raises(m.MPSTypeError, match="destination_image_allocator"):
        graph.destination_image_allocator = object()


def test_node_image_allocator_for_intermediate(device):
    net = Net()
    alloc = RecordingAllocator()
    net.relu.result_image.image_allocator = alloc
    graph = net.graph(device)
    img = rand_image(device, 41)
    out = graph.run([img])
    assert len(alloc.made) == 1 and isinstance(alloc.kernels[0], m.MPSCNNNeuron)
    np.testing.assert_array_equal(out.to_numpy(), run_kernels(device, net.kernels(device), img))
    with pytest.raises(m.MPSTypeError, match="MPSNNImageNode"):
        net.relu.result_image.image_allocator = 3


def test_format_default_and_overrides(device):
    net = Net()
    net.relu.result_image.export_from_graph = True
    net.conv.result_image.export_from_graph = True
    graph = net.graph(device, fmt=None)
    assert graph.format == F.float16
    img = rand_image(device, 42)
    inter: list = []
    cb = new_cb(device)
    out = graph.encode(cb, [img], None, inter)
    finish(cb)
    assert out.feature_channel_format == F.float16
    assert [i.feature_channel_format for i in inter] == [F.float16, F.float16]
    ref = run_kernels(device, net.kernels(device), img)
    np.testing.assert_allclose(out.to_numpy(), ref, atol=5e-3)
    # node formats override the graph's
    net.conv.result_image.format = F.float32
    net.softmax.result_image.format = F.float32
    assert net.conv.result_image.format == F.float32
    inter = []
    cb = new_cb(device)
    out = graph.encode(cb, [img], None, inter)
    finish(cb)
    assert out.feature_channel_format == F.float32
    assert [i.feature_channel_format for i in inter] == [F.float32, F.float16]
    np.testing.assert_array_equal(inter[0].to_numpy(), run_kernels(device, net.kernels(device), img, upto=1))
    # graph format float32 applies to everything not overridden
    graph.format = F.float32
    net.softmax.result_image.format = None
    inter = []
    out = graph.encode(cb := new_cb(device), [img], None, inter)
    finish(cb)
    assert out.feature_channel_format == F.float32 and inter[1].feature_channel_format == F.float32
    np.testing.assert_array_equal(out.to_numpy(), ref)
    graph.format = F.bfloat16
    assert graph.format == F.bfloat16


@pytest.mark.parametrize("bad", [F.unorm8, F.unorm16, F.none, "float32", 99, None])
def test_graph_format_rejects_bad_values(bad):
    net = Net()
    graph = net.graph("cpu")
    with pytest.raises(m.MPSError, match="MPSNNGraph.*format"):
        graph.format = bad
    assert graph.format == F.float32


@pytest.mark.parametrize("bad", ["float32", 99, 2.5])
def test_node_format_rejects_bad_values(bad):
    node = MPSNNImageNode(None)
    with pytest.raises(m.MPSError, match="MPSNNImageNode.*format"):
        node.format = bad
    assert node.format is None


def test_debug_description_mentions_every_filter():
    net = Net()
    net.relu.result_image.export_from_graph = True
    graph = net.graph("cpu")
    text = graph.debug_description
    assert isinstance(text, str)
    for f, kern in zip(net.filters, ("MPSCNNConvolution", "MPSCNNNeuron", "MPSCNNPoolingMax", "MPSCNNFullyConnected", "MPSCNNSoftMax")):
        assert type(f).__name__ in text
        assert repr(f.label) in text
        assert kern in text
    assert "x" in text and "float32" in text
    # unlabelled nodes: each filter still appears once
    x = MPSNNImageNode(None)
    r1 = MPSCNNNeuronReLUNode(x)
    r2 = MPSCNNNeuronReLUNode(r1.result_image)
    r3 = MPSCNNNeuronSigmoidNode(r2.result_image)
    text = m.MPSNNGraph("cpu", r3.result_image, True).debug_description
    assert text.count("MPSCNNNeuronReLUNode") == 2 and text.count("MPSCNNNeuronSigmoidNode") == 1
    assert repr(graph).startswith("<MPSNNGraph")


# ----------------------------------------------------------------------------------------------
# async, run, reload
# ----------------------------------------------------------------------------------------------
def test_execute_async(device):
    net = Net()
    graph = net.graph(device)
    img = rand_image(device, 50)
    done = threading.Event()
    got: dict = {}

    def handler(result, error):
        got["result"], got["error"] = result, error
        got["calls"] = got.get("calls", 0) + 1
        done.set()

    ret = graph.execute_async([img], handler)
    assert done.wait(60)
    assert got["calls"] == 1 and got["error"] is None and got["result"] is ret
    np.testing.assert_array_equal(ret.to_numpy(), run_kernels(device, net.kernels(device), img))
    # an encode error reaches the handler (and nothing is returned)
    done.clear()
    got.clear()
    bad = rand_image(device, 51, c=CIN - 1)
    assert graph.execute_async([bad], handler) is None
    assert done.wait(60)
    assert got["result"] is None and isinstance(got["error"], m.MPSError)


def test_run_convenience(device):
    net = Net()
    graph = net.graph(device)
    img = rand_image(device, 52)
    ref = run_kernels(device, net.kernels(device), img)
    np.testing.assert_array_equal(graph.run(img).to_numpy(), ref)
    np.testing.assert_array_equal(graph.run([img]).to_numpy(), ref)


def test_reload_from_data_sources(device):
    conv_ds = make_ds(3, 3, CIN, CMID, "conv", 60)
    fc_ds = make_ds(H // 2, W // 2, CMID, K, "fc", 61)
    net = Net(conv_ds, fc_ds)
    graph = net.graph(device)
    img = rand_image(device, 62)
    old = graph.run([img]).to_numpy()
    np.testing.assert_array_equal(old, run_kernels(device, net.kernels(device), img))
    g = torch.Generator().manual_seed(63)
    conv_ds.set_weights(torch.rand(CMID, 3, 3, CIN, generator=g) - 0.5, torch.rand(CMID, generator=g))
    fc_ds.set_weights(torch.rand(K, W // 2, H // 2, CMID, generator=g) - 0.5, None)
    # the graph read its weights when it was built: same result until reload
    np.testing.assert_array_equal(graph.run([img]).to_numpy(), old)
    graph.reload_from_data_sources()
    new = graph.run([img]).to_numpy()
    np.testing.assert_array_equal(new, run_kernels(device, net.kernels(device), img))
    assert not np.allclose(new, old)


# ----------------------------------------------------------------------------------------------
# 3. errors
# ----------------------------------------------------------------------------------------------
def test_error_wrong_number_of_source_images(device):
    xa, xb = MPSNNImageNode("a"), MPSNNImageNode("b")
    add = MPSNNAdditionNode(xa, xb)
    graph = m.MPSNNGraph(device, add.result_image, True)
    img = rand_image(device, 70)
    cb = new_cb(device)
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*source_images") as ei:
        graph.encode(cb, [img])
    assert "'a'" in str(ei.value) and "'b'" in str(ei.value)   # the handles it expected
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*source_images"):
        graph.encode(cb, [img, img, img])
    with pytest.raises(m.MPSTypeError, match="MPSNNGraph.*source_images"):
        graph.encode(cb, img)
    with pytest.raises(m.MPSTypeError, match="MPSNNGraph"):
        graph.encode(cb, [img, "not an image"])


def test_error_mismatched_batch_lengths(device):
    xa, xb = MPSNNImageNode("a"), MPSNNImageNode("b")
    add = MPSNNAdditionNode(xa, xb)
    graph = m.MPSNNGraph(device, add.result_image, True)
    img = rand_image(device, 71)
    cb = new_cb(device)
    with pytest.raises(m.MPSValueError, match=r"MPSNNGraph.*source_images\[1\]"):
        graph.encode_batch(cb, [[img, img], [img]])
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*source_images"):
        graph.encode_batch(cb, [[], []])
    # entries with different image counts across sources
    with pytest.raises(m.MPSValueError, match=r"MPSNNGraph.*source_images\[1\]"):
        graph.encode_batch(cb, [[img], [rand_image(device, 72, n=2)]])


def test_error_wrong_channel_count_names_node(device):
    net = Net()
    graph = net.graph(device)
    bad = rand_image(device, 73, c=CIN - 1)
    cb = new_cb(device)
    with pytest.raises(m.MPSError) as ei:
        graph.encode(cb, [bad])
    msg = str(ei.value)
    assert msg.startswith("MPSNNGraph: node MPSCNNConvolutionNode"), msg
    assert "conv1" in msg and "channels" in msg


def test_error_cycle_names_node():
    x = MPSNNImageNode("x")
    r1 = MPSCNNNeuronReLUNode(x)
    r2 = MPSCNNNeuronSigmoidNode(r1.result_image)
    r3 = MPSCNNNeuronTanHNode(r2.result_image)
    r1._source_images = [r3.result_image]     # forced cycle r1 -> r2 -> r3 -> r1
    with pytest.raises(m.MPSValueError, match="cycle") as ei:
        m.MPSNNGraph("cpu", r3.result_image, True)
    assert any(name in str(ei.value) for name in ("MPSCNNNeuronReLUNode", "MPSCNNNeuronSigmoidNode", "MPSCNNNeuronTanHNode"))
    # a self-loop
    y = MPSNNImageNode("y")
    s = MPSCNNNeuronReLUNode(y)
    s._source_images = [s.result_image]
    with pytest.raises(m.MPSValueError, match="cycle.*MPSCNNNeuronReLUNode"):
        m.MPSNNGraph("cpu", s.result_image, True)


def test_error_result_without_producer():
    x = MPSNNImageNode("x")
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*'x'"):
        m.MPSNNGraph("cpu", x, True)
    relu = MPSCNNNeuronReLUNode(x)
    with pytest.raises(m.MPSValueError, match=r"MPSNNGraph.*result_images\[1\]"):
        m.MPSNNGraph("cpu", result_images=[relu.result_image, x])
    with pytest.raises(m.MPSTypeError, match="MPSNNGraph"):
        m.MPSNNGraph("cpu", result_images=[relu.result_image, "x"])
    with pytest.raises(m.MPSValueError, match="MPSNNGraph"):
        m.MPSNNGraph("cpu", result_images=[])
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*results_are_needed"):
        m.MPSNNGraph("cpu", result_images=[relu.result_image], results_are_needed=[True, False])
    with pytest.raises(m.MPSValueError, match="MPSNNGraph"):
        m.MPSNNGraph("cpu", relu.result_image, True, result_images=[relu.result_image])


def test_error_loss_training_graph_with_wrong_source_gradient():
    x = MPSNNImageNode("x")
    fc = MPSCNNFullyConnectedNode(x, make_ds(1, 1, 3, 4, "fc", 74))
    ld = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    loss = MPSCNNLossNode(fc.result_image, ld)
    with pytest.raises(m.MPSValueError, match="MPSCNNLossNode.*source_gradient"):
        loss.training_graph(MPSNNImageNode("g"))
    with pytest.raises(m.MPSError, match="MPSCNNLossNode.*source_gradient"):
        loss.training_graph(fc.result_image)
    # the loss's own result image is accepted
    assert loss.training_graph(loss.result_image) is not None


def test_error_source_states_and_command_buffer(device):
    x = MPSNNImageNode("x")
    fc = MPSCNNFullyConnectedNode(x, make_ds(1, 1, 3, 4, "fc", 75))
    ld = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    loss = MPSCNNLossNode(fc.result_image, ld)
    graph = m.MPSNNGraph(device, loss.result_image, True)
    assert graph.source_state_handles == [None]
    assert graph.read_count_for_source_state_at_index(0) == 1
    img = rand_image(device, 76, h=1, w=1, c=3)
    cb = new_cb(device)
    with pytest.raises(m.MPSValueError, match="MPSNNGraph.*source_states"):
        graph.encode(cb, [img])
    relu = MPSCNNNeuronReLUNode(MPSNNImageNode("x"))
    g2 = m.MPSNNGraph(device, relu.result_image, True)
    cb = new_cb(device)
    finish(cb)
    with pytest.raises(m.MPSStateError):
        g2.encode(cb, [img])
    with pytest.raises(m.MPSTypeError, match="MPSNNGraph.*command_buffer"):
        g2.encode("cb", [img])
