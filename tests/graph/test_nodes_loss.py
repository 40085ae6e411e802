"""Loss-related graph nodes of mpsnn/graph/nodes/loss_extra.py: MPSCNNYOLOLossNode,
MPSNNForwardLossNode, MPSNNLossGradientNode, MPSNNInitialGradientNode, MPSNNLossCallback.

Oracles: the kernels encoded one by one (same parameters) for the forward results, and
``torch.autograd`` in float64 on the kernels' documented formulas (mpsnn/kernels/loss.py
docstring: ``g = sg * w_e * dl/dy``, no factor from the reduction) for the gradients.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNLossDataDescriptor,
    MPSCNNLossDescriptor,
    MPSCNNLossLabels,
    MPSCNNLossType,
    MPSCNNNeuronLinearNode,
    MPSCNNNeuronSigmoidNode,
    MPSCNNReductionType,
    MPSCNNYOLOLoss,
    MPSCNNYOLOLossDescriptor,
    MPSCNNYOLOLossNode,
    MPSDataLayout,
    MPSImageFeatureChannelFormat,
    MPSNNAdditionNode,
    MPSNNForwardLoss,
    MPSNNForwardLossNode,
    MPSNNGradientStateNode,
    MPSNNGraph,
    MPSNNImageNode,
    MPSNNInitialGradientNode,
    MPSNNLabelsNode,
    MPSNNLossCallback,
    MPSNNLossGradient,
    MPSNNLossGradientNode,
    MPSNNMultiplicationNode,
    MTLSize,
)
from mpsnn.testing.images import finish, image, values
from mpsnn.testing.reference_loss import inputs, torch_loss, weights
from mpsnn.testing.tolerances import Tol, assert_close

T = MPSCNNLossType
R = MPSCNNReductionType
F32 = MPSImageFeatureChannelFormat.float32
SHAPE = (1, 3, 4, 5)
#: sigmoid + loss gradient in float32 against float64 autograd (log / categorical CE divide by y)
GRAD_TOL = {"float32": Tol(1e-4, 1e-5)}
EXACT = {"float32": Tol(0.0, 0.0)}


def cbuf(device):
    return device.make_command_queue().make_command_buffer()


def desc(loss_type: T, reduction: R, **fields) -> MPSCNNLossDescriptor:
    d = MPSCNNLossDescriptor(loss_type, reduction)
    for k, v in fields.items():
        setattr(d, k, v)
    return d


def run_graph(device, graph: MPSNNGraph, feed: dict, states=None):
    """Encode one batch entry per handle (feed: handle -> image or list of images for a batch)."""
    cb = cbuf(device)
    if all(isinstance(v, list) for v in feed.values()):
        inter: list = []
        out = graph.encode_batch(cb, [feed[h] for h in graph.source_image_handles], states, inter)
    else:
        inter = []
        out = graph.encode(cb, [feed[h] for h in graph.source_image_handles], states, inter)
    finish(cb)
    return out, inter


class Weight(MPSNNLossCallback):
    """Returns the weights given, one per call, and records what it saw."""

    def __init__(self, *ws: float) -> None:
        self.ws, self.seen = list(ws), []

    def scalar_weight_for_source_image(self, source_image, destination_image) -> float:
        self.seen.append((source_image.number_of_images, destination_image.width, destination_image.height))
        return self.ws[min(len(self.seen) - 1, len(self.ws) - 1)]


# -- MPSNNForwardLossNode: inits, properties, errors -----------------------------------------------------------------


def test_forward_loss_node_forms_and_properties() -> None:
    x, t, w = MPSNNImageNode("x"), MPSNNImageNode("t"), MPSNNImageNode("w")
    d = desc(T.huber, R.mean, delta=0.5, weight=2.0)
    d.reduce_across_batch = True
    n = MPSNNForwardLossNode(x, t, w, d)
    assert n.source_images == [x, t, w]
    assert (n.loss_type, n.reduction_type, n.number_of_classes, n.reduce_across_batch) == (T.huber, R.mean, 1, True)
    assert (n.weight, n.label_smoothing, n.epsilon, n.delta) == (2.0, 0.0, pytest.approx(1e-7), 0.5)
    assert n.property_call_back is None
    assert isinstance(n.result_state, MPSNNGradientStateNode)
    d.weight = 5.0  # copied at init
    assert n.weight == 2.0
    for k in ("loss_type", "weight", "delta", "reduction_type"):
        with pytest.raises(AttributeError):
            setattr(n, k, getattr(n, k))
    # the forms without weights and with sources, and the factories
    assert MPSNNForwardLossNode(x, t, d).source_images == [x, t]
    assert MPSNNForwardLossNode(x, t, loss_descriptor=d).source_images == [x, t]
    assert MPSNNForwardLossNode(sources=[x, t, w], loss_descriptor=d).source_images == [x, t, w]
    assert MPSNNForwardLossNode([x, t], d).source_images == [x, t]
    assert MPSNNForwardLossNode.node_with_sources([x, t], d).source_images == [x, t]
    assert MPSNNForwardLossNode.node_with_source(x, t, w, d).source_images == [x, t, w]
    assert MPSNNForwardLossNode.node_with_source(x, t, loss_descriptor=d).source_images == [x, t]
    cb = Weight(1.0)
    n.property_call_back = cb
    assert n.property_call_back is cb
    n.property_call_back = None
    # defaults of a plain descriptor
    p = MPSNNForwardLossNode(x, t, MPSCNNLossDescriptor(T.meanSquaredError, R.sum))
    assert (p.weight, p.label_smoothing, p.delta, p.number_of_classes, p.reduce_across_batch) == (1.0, 0.0, 1.0, 1, False)


def test_forward_loss_node_errors() -> None:
    x, t, w = MPSNNImageNode("x"), MPSNNImageNode("t"), MPSNNImageNode("w")
    d = desc(T.meanSquaredError, R.sum)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode.*loss_descriptor"):
        MPSNNForwardLossNode(x, t, None, None)
    yolo = MPSCNNYOLOLossDescriptor(T.meanSquaredError, T.meanSquaredError, T.meanSquaredError, T.meanSquaredError, R.sum,
                                    np.ones(2, np.float32), 1)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode.*MPSCNNLossDescriptor"):
        MPSNNForwardLossNode(x, t, yolo)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode.*weights"):
        MPSNNForwardLossNode(x, t, 3, d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode.*labels"):
        MPSNNForwardLossNode(x, loss_descriptor=d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode"):
        MPSNNForwardLossNode(x, "t", d)
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNForwardLossNode.*sources"):
        MPSNNForwardLossNode(sources=[x], loss_descriptor=d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode"):
        MPSNNForwardLossNode(x, t, sources=[x, t], loss_descriptor=d)
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNForwardLossNode.*cosineDistance"):
        MPSNNForwardLossNode(x, t, desc(T.cosineDistance, R.mean))
    n = MPSNNForwardLossNode(x, t, w, d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNForwardLossNode.*property_call_back"):
        n.property_call_back = 3
    with pytest.raises(mpsnn.MPSError, match="MPSNNForwardLossNode"):
        n.gradient_filters_with_sources([MPSNNImageNode(), MPSNNImageNode()])
    with pytest.raises(TypeError):
        MPSNNLossCallback()  # abstract


# -- MPSNNForwardLossNode: forward results == the kernel ---------------------------------------------------------------


@pytest.mark.parametrize("reduction,across", [(R.none, False), (R.sum, False), (R.mean, True), (R.sumByNonZeroWeights, False)],
                         ids=["none", "sum", "mean-across", "nonzero"])
def test_forward_loss_graph_matches_kernel(device, reduction: R, across: bool) -> None:
    x, t, w = MPSNNImageNode("x"), MPSNNImageNode("t"), MPSNNImageNode("w")
    d = desc(T.huber, reduction, delta=0.7, weight=0.6)
    d.reduce_across_batch = across
    node = MPSNNForwardLossNode(x, t, w, d)
    graph = MPSNNGraph(device, node.result_image, True)
    ins = [inputs(T.huber, SHAPE, 10 + e) for e in range(3)]
    ws = [weights(SHAPE, 20 + e) for e in range(3)]
    xs = [image(y, device)[0] for y, _ in ins]
    ts = [image(tt, device)[0] for _, tt in ins]
    wimgs = [image(ww, device)[0] for ww in ws]
    # batch of one
    out, _ = run_graph(device, graph, {"x": xs[0], "t": ts[0], "w": wimgs[0]})
    cb = cbuf(device)
    expected = MPSNNForwardLoss(device, loss_descriptor=d).encode(cb, xs[0], ts[0], wimgs[0])
    finish(cb)
    assert out.feature_channel_format == F32  # the loss is float32 (graph format float16)
    assert_close(values(out), values(expected), "float32", EXACT)
    # a batch of three entries
    outs, _ = run_graph(device, graph, {"x": xs, "t": ts, "w": wimgs})
    cb = cbuf(device)
    expected = MPSNNForwardLoss(device, loss_descriptor=d).encode_batch(cb, xs, ts, wimgs)
    finish(cb)
    assert len(outs) == 3
    for e in range(3):
        assert_close(values(outs[e]), values(expected[e]), "float32", {"float32": Tol(1e-6, 1e-6)}, msg=f"entry {e}")
    if across:
        assert values(outs[1]).item() == 0.0 and values(outs[0]).item() != 0.0


# -- MPSNNForwardLossNode / MPSNNLossGradientNode: training graph == autograd ------------------------------------------

GRAD_CASES = [
    (T.meanSquaredError, R.none), (T.meanAbsoluteError, R.none), (T.huber, R.none), (T.sigmoidCrossEntropy, R.none),
    (T.log, R.none), (T.categoricalCrossEntropy, R.none), (T.hinge, R.none), (T.kullbackLeiblerDivergence, R.sum),
    (T.softMaxCrossEntropy, R.sum), (T.meanSquaredError, R.sum),
]


def _labels_for(loss_type: T, shape, seed: int) -> np.ndarray:
    return inputs(loss_type, shape, seed)[1]


@pytest.mark.parametrize("loss_type,reduction", GRAD_CASES, ids=[f"{t.name}-{r.name}" for t, r in GRAD_CASES])
def test_forward_loss_gradient_nodes_match_autograd(device, loss_type: T, reduction: R) -> None:
    """x -> sigmoid -> forward loss (labels, weights images); upstream gradient random (per
    element for none, one value per image for sum): dL/dx and dL/dlabels."""
    shape = (2, 3, 4, 5)
    fields: dict = {"weight": 0.75}
    if loss_type in (T.sigmoidCrossEntropy, T.softMaxCrossEntropy):
        fields["label_smoothing"] = 0.1
    if loss_type == T.softMaxCrossEntropy:
        fields["number_of_classes"] = shape[3]
    if loss_type == T.huber:
        fields["delta"] = 0.3
    d = desc(loss_type, reduction, **fields)
    x, t, w, g = MPSNNImageNode("x"), MPSNNImageNode("t"), MPSNNImageNode("w"), MPSNNImageNode("g")
    sig = MPSCNNNeuronSigmoidNode(x)
    fwd = MPSNNForwardLossNode(sig.result_image, t, w, d)
    grads = fwd.gradient_filters_with_sources([g])
    assert [type(n) for n in grads] == [MPSNNLossGradientNode] * 2
    assert [n.is_labels_gradient_filter for n in grads] == [False, True]
    assert grads[0].source_images[1:] == [sig.result_image, t, w] and grads[0].source_states == [fwd.result_state]
    assert (grads[0].loss_type, grads[0].weight, grads[0].reduction_type) == (loss_type, 0.75, reduction)
    assert not fwd.gradient_filter_with_source(g).is_labels_gradient_filter
    dx_node = sig.gradient_filter_with_source(grads[0].result_image)
    graph = MPSNNGraph(device, result_images=[dx_node.result_image, grads[1].result_image])
    graph.format = F32

    rng = np.random.default_rng(5)
    xv = rng.uniform(-2.5, 2.5, shape)
    tv = _labels_for(loss_type, shape, 6)
    wv = weights(shape, 7)
    up_shape = shape if reduction == R.none else (shape[0], 1, 1, 1)
    upv = rng.normal(size=up_shape)
    if loss_type == T.softMaxCrossEntropy:  # softmax - t' is the exact chain rule for per-pixel sg * w
        wv = np.repeat(wv[..., :1], shape[3], axis=-1)
    (xi, xr), (ti, tr), (wi, wr), (gi, gr) = (image(v, device) for v in (xv, tv, wv, upv))
    out, inter = run_graph(device, graph, {"x": xi, "t": ti, "w": wi, "g": gi})
    xt = torch.from_numpy(xr).requires_grad_(True)
    tt = torch.from_numpy(tr).requires_grad_(True)
    ls = fields.get("label_smoothing", 0.0)
    ts = tt * (1 - ls) + (ls / shape[3] if loss_type == T.softMaxCrossEntropy else ls / 2) if ls else tt
    y = torch.sigmoid(xt)
    per = torch_loss(loss_type, y, ts, 1e-7, fields.get("delta", 1.0)) * 0.75 * torch.from_numpy(wr)
    (per * torch.from_numpy(gr)).sum().backward()
    assert_close(values(out), xt.grad.numpy(), "float32", GRAD_TOL, msg="dL/dx")
    assert_close(values(inter[0]), tt.grad.numpy(), "float32", GRAD_TOL, msg="dL/dlabels")


def test_forward_loss_initial_gradient_training_graph(device) -> None:
    """x -> sigmoid -> forward loss (sum, reduce across batch) -> initial gradient;
    training_graph on the initial gradient node; a batch of three entries."""
    shape = (1, 2, 3, 4)
    d = desc(T.sigmoidCrossEntropy, R.sum, weight=0.5, label_smoothing=0.2)
    d.reduce_across_batch = True
    x, t, w = MPSNNImageNode("x"), MPSNNImageNode("t"), MPSNNImageNode("w")
    sig = MPSCNNNeuronSigmoidNode(x)
    fwd = MPSNNForwardLossNode(sig.result_image, t, w, d)
    init = MPSNNInitialGradientNode(fwd.result_image)
    seen = []

    def handler(gnode, inode, isrc, gsrc):
        seen.append((type(gnode).__name__, inode, isrc))
        gnode.result_image.format = F32

    terms = init.training_graph(None, handler)
    assert [type(n).__name__ for n in terms] == ["MPSNNLossGradientNode", "MPSCNNNeuronGradientNode"]
    labels_grad, dx_node = terms
    assert labels_grad.is_labels_gradient_filter and labels_grad.source_images[0] is init.result_image
    assert [s[0] for s in seen] == ["MPSNNLossGradientNode", "MPSNNLossGradientNode", "MPSCNNNeuronGradientNode"]
    assert seen[0][1] is fwd and seen[0][2] is sig.result_image and seen[1][2] is t and seen[2][1] is sig
    graph = MPSNNGraph(device, result_images=[dx_node.result_image, labels_grad.result_image, fwd.result_image])
    graph.format = F32
    rng = np.random.default_rng(8)
    xs = [image(rng.uniform(-2, 2, shape), device) for _ in range(3)]
    tsv = [image(_labels_for(T.sigmoidCrossEntropy, shape, 9 + e), device) for e in range(3)]
    wsv = [image(weights(shape, 12 + e), device) for e in range(3)]
    outs, inter = run_graph(device, graph, {"x": [a for a, _ in xs], "t": [a for a, _ in tsv], "w": [a for a, _ in wsv]})
    xt = torch.from_numpy(np.concatenate([r for _, r in xs])).requires_grad_(True)
    tt = torch.from_numpy(np.concatenate([r for _, r in tsv])).requires_grad_(True)
    wt = torch.from_numpy(np.concatenate([r for _, r in wsv]))
    loss = (torch_loss(T.sigmoidCrossEntropy, torch.sigmoid(xt), tt * 0.8 + 0.1, 1e-7, 1.0) * 0.5 * wt).sum()
    loss.backward()
    for e in range(3):
        assert_close(values(outs[e])[0], xt.grad.numpy()[e], "float32", GRAD_TOL, msg=f"dx entry {e}")
        assert_close(values(inter[0][e])[0], tt.grad.numpy()[e], "float32", GRAD_TOL, msg=f"dlabels entry {e}")
    losses = [values(inter[1][e]).item() for e in range(3)]
    assert_close(np.array(losses), np.array([loss.item(), 0.0, 0.0]), "float32", GRAD_TOL, msg="loss across batch")
    # stop_gradient on the labels: no labels gradient node
    t.stop_gradient = True
    terms = init.training_graph()
    assert [type(n).__name__ for n in terms] == ["MPSCNNNeuronGradientNode"]


# -- MPSNNInitialGradientNode ----------------------------------------------------------------------------------------------


def test_initial_gradient_chain_matches_autograd(device) -> None:
    """y = z * sigmoid(z), z = 1.5 x + 0.25: the initial gradient of y gives d(sum y)/dx; z feeds
    two filters, so training_graph inserts an addition node."""
    x = MPSNNImageNode("x")
    lin = MPSCNNNeuronLinearNode(x, a=1.5, b=0.25)
    sig = MPSCNNNeuronSigmoidNode(lin.result_image)
    mul = MPSNNMultiplicationNode(sig.result_image, lin.result_image)
    init = MPSNNInitialGradientNode(mul.result_image)
    made = []
    terms = init.training_graph(None, lambda gn, inode, isrc, gsrc: made.append(gn))
    assert len(terms) == 1 and terms[0].forward_node is lin
    assert any(isinstance(n, MPSNNAdditionNode) for n in made)
    graph = MPSNNGraph(device, terms[0].result_image, True)
    graph.format = F32
    for n in (1, 3):
        xv = [image(np.random.default_rng(30 + k).normal(size=(1, 3, 2, 6)), device) for k in range(n)]
        out, _ = run_graph(device, graph, {"x": [a for a, _ in xv]})
        xt = torch.from_numpy(np.concatenate([r for _, r in xv])).requires_grad_(True)
        z = 1.5 * xt + 0.25
        (z * torch.sigmoid(z)).sum().backward()
        for e in range(n):
            assert_close(values(out[e])[0], xt.grad.numpy()[e], "float32", GRAD_TOL, msg=f"batch {n} entry {e}")


def test_initial_gradient_node_basics(device) -> None:
    x = MPSNNImageNode("x")
    init = MPSNNInitialGradientNode.node_with_source(x)
    assert init.result_state is None and init.source_images == [x]
    graph = MPSNNGraph(device, init.result_image, True)
    src, _ = image(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), device)
    out = graph.run([src])
    assert out.width == 4 and out.height == 3 and out.feature_channels == 5 and out.number_of_images == 2
    np.testing.assert_array_equal(values(out), 1.0)
    assert init.training_graph() == [init]  # its source is a graph input
    with pytest.raises(mpsnn.MPSValueError):
        init.training_graph(MPSNNImageNode())
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNInitialGradientNode"):
        init.gradient_filter_with_source(MPSNNImageNode())
    with pytest.raises(mpsnn.MPSError):
        MPSNNInitialGradientNode(None)


# -- callback --------------------------------------------------------------------------------------------------------------


def test_loss_callback_sets_the_weight(device) -> None:
    """The forward node's callback sets the weight of the forward loss (and, through the
    state, of the gradient); a gradient node's callback overrides the weight."""
    shape = (2, 2, 3, 4)
    d = desc(T.meanSquaredError, R.sum, weight=1.0)
    x, t = MPSNNImageNode("x"), MPSNNImageNode("t")
    fwd = MPSNNForwardLossNode(x, t, d)
    init = MPSNNInitialGradientNode(fwd.result_image)
    gnode = fwd.gradient_filter_with_source(init.result_image)
    graph = MPSNNGraph(device, result_images=[gnode.result_image, fwd.result_image])
    graph.format = F32
    xi, xr = image(np.random.default_rng(1).normal(size=shape), device)
    ti, tr = image(np.random.default_rng(2).normal(size=shape), device)
    base_loss = ((xr - tr) ** 2).sum(axis=(1, 2, 3))
    base_grad = 2 * (xr - tr)

    def check(loss_weight: float, grad_weight: float) -> None:
        out, inter = run_graph(device, graph, {"x": xi, "t": ti})
        assert_close(values(inter[0]).reshape(-1), loss_weight * base_loss, "float32", GRAD_TOL, msg="loss")
        assert_close(values(out), grad_weight * base_grad, "float32", GRAD_TOL, msg="gradient")

    check(1.0, 1.0)
    cb = Weight(0.25, 3.0)
    fwd.property_call_back = cb
    assert gnode.property_call_back is None  # made before; gradient nodes never copy it
    check(0.25, 0.25)
    check(3.0, 3.0)
    assert cb.seen == [(2, 1, 1), (2, 1, 1)]  # once per encode, the stacked batch and its 1x1 losses
    gcb = Weight(-2.0)
    gnode.property_call_back = gcb
    check(3.0, -2.0)
    assert gcb.seen == [(2, 3, 2)]  # the predictions (2 images of 3x2) and the gradient image
    fwd.property_call_back = None
    gnode.property_call_back = None
    check(1.0, 1.0)  # back to the descriptor's weight


def test_loss_callback_bad_value(device) -> None:
    class Bad(MPSNNLossCallback):
        def scalar_weight_for_source_image(self, source_image, destination_image):
            return "heavy"

    x, t = MPSNNImageNode("x"), MPSNNImageNode("t")
    fwd = MPSNNForwardLossNode(x, t, desc(T.meanSquaredError, R.sum))
    fwd.property_call_back = Bad()
    graph = MPSNNGraph(device, fwd.result_image, True)
    src, _ = image(np.zeros(SHAPE), device)
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNForwardLossNode"):
        graph.run([src, src])


# -- MPSNNLossGradientNode -----------------------------------------------------------------------------------------------


def test_loss_gradient_node_forms_and_errors() -> None:
    g, x, t, w = (MPSNNImageNode(h) for h in "gxtw")
    fwd = MPSNNForwardLossNode(x, t, w, desc(T.huber, R.none, delta=0.5))
    st = fwd.result_state
    d = desc(T.huber, R.none, delta=0.25)
    full = MPSNNLossGradientNode(g, x, t, w, st, d, True)
    assert full.source_images == [g, x, t, w] and full.source_states == [st] and full.is_labels_gradient_filter
    assert (full.loss_type, full.reduction_type, full.delta, full.weight, full.number_of_classes) == (T.huber, R.none, 0.25, 1.0, 1)
    assert full.property_call_back is None
    no_w = MPSNNLossGradientNode(g, x, t, st, d, False)
    assert no_w.source_images == [g, x, t] and no_w.source_states == [st] and not no_w.is_labels_gradient_filter
    no_w2 = MPSNNLossGradientNode(g, x, t, st, loss_descriptor=d, is_labels_gradient_filter=False)
    assert no_w2.source_images == [g, x, t] and no_w2.source_states == [st]
    no_state = MPSNNLossGradientNode(g, x, t, None, d, False)
    assert no_state.source_images == [g, x, t] and no_state.source_states == []
    kw = MPSNNLossGradientNode(g, x, t, gradient_state=st, loss_descriptor=d, is_labels_gradient_filter=False)
    assert kw.source_images == [g, x, t]
    srcs = MPSNNLossGradientNode(sources=[g, x, t, w], gradient_state=None, loss_descriptor=d, is_labels_gradient_filter=False)
    assert srcs.source_images == [g, x, t, w] and srcs.source_states == []
    assert MPSNNLossGradientNode([g, x, t], st, d, True).source_states == [st]
    assert MPSNNLossGradientNode.node_with_sources([g, x, t], st, d, False).source_images == [g, x, t]
    assert MPSNNLossGradientNode.node_with_source_gradient(g, x, t, w, st, d, False).source_images == [g, x, t, w]
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*is_labels_gradient_filter"):
        MPSNNLossGradientNode(g, x, t, w, st, d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*is_labels_gradient_filter"):
        MPSNNLossGradientNode(g, x, t, w, st, d, 1)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*loss_descriptor"):
        MPSNNLossGradientNode(g, x, t, w, st, None, False)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*loss_descriptor"):
        MPSNNLossGradientNode(g, x, t, w, st, "huber", False)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*gradient_state"):
        MPSNNLossGradientNode(g, x, t, w, x, d, False)
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNLossGradientNode.*sources"):
        MPSNNLossGradientNode(sources=[g, x], loss_descriptor=d, is_labels_gradient_filter=False)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode"):
        MPSNNLossGradientNode(g, x, loss_descriptor=d, is_labels_gradient_filter=False)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSNNLossGradientNode.*property_call_back"):
        full.property_call_back = object()
    with pytest.raises(mpsnn.MPSValueError, match="no gradient"):
        full.gradient_filter_with_source(MPSNNImageNode())
    with pytest.raises(mpsnn.MPSValueError, match="no gradient"):
        full.training_graph()


@pytest.mark.parametrize("labels_side", [False, True], ids=["dy", "dlabels"])
def test_loss_gradient_node_alone_matches_kernel(device, labels_side: bool) -> None:
    """A gradient node without a forward state (all inputs from outside), batch 1 and 3."""
    d = desc(T.log, R.none, epsilon=1e-3, weight=1.5)
    g, x, t, w = (MPSNNImageNode(h) for h in "gxtw")
    node = MPSNNLossGradientNode(sources=[g, x, t, w], gradient_state=None, loss_descriptor=d, is_labels_gradient_filter=labels_side)
    graph = MPSNNGraph(device, node.result_image, True)
    graph.format = F32
    ins = [inputs(T.log, SHAPE, 40 + e) for e in range(3)]
    feed = {"g": [image(np.random.default_rng(50 + e).normal(size=SHAPE), device)[0] for e in range(3)],
            "x": [image(y, device)[0] for y, _ in ins], "t": [image(tt, device)[0] for _, tt in ins],
            "w": [image(weights(SHAPE, 60 + e), device)[0] for e in range(3)]}
    kernel = MPSNNLossGradient(device, loss_descriptor=d)
    kernel.compute_label_gradients = labels_side
    one, _ = run_graph(device, graph, {h: v[0] for h, v in feed.items()})
    cb = cbuf(device)
    expected = kernel.encode_batch(cb, feed["g"], feed["x"], feed["t"], feed["w"])
    finish(cb)
    assert_close(values(one), values(expected[0]), "float32", EXACT)
    outs, _ = run_graph(device, graph, feed)
    for e in range(3):
        assert_close(values(outs[e]), values(expected[e]), "float32", EXACT, msg=f"entry {e}")


# -- MPSCNNYOLOLossNode ----------------------------------------------------------------------------------------------------

ANCHORS = np.asarray([[0.6, 0.8], [1.5, 1.2]], np.float32)


def yolo_descriptor(across: bool) -> MPSCNNYOLOLossDescriptor:
    d = MPSCNNYOLOLossDescriptor.cnn_loss_descriptor_with_xy_loss_type(
        T.meanSquaredError, T.huber, T.sigmoidCrossEntropy, T.softMaxCrossEntropy, R.sum, ANCHORS.tobytes(), 2)
    d.reduce_across_batch = across
    return d


def yolo_inputs(seed: int, h: int = 3, w: int = 4, a: int = 2, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = 5 + k
    y = rng.normal(0, 1, (h, w, a, c))
    y[..., 2:4] = rng.normal(0, 0.4, (h, w, a, 2))
    t = np.zeros((h, w, a, c))
    t[..., 0:2] = rng.uniform(0.05, 0.95, (h, w, a, 2))
    t[..., 2:4] = ANCHORS * np.exp(rng.normal(0, 0.4, (h, w, a, 2)))
    t[..., 4] = 1.0
    t[..., 5:] = np.eye(k)[rng.integers(0, k, (h, w, a))]
    t[rng.uniform(0, 1, (h, w, a)) < 0.5] = 0.0
    return y.reshape(h, w, a * c), t.reshape(h, w, a * c)


def yolo_labels(device, t: np.ndarray) -> MPSCNNLossLabels:
    h, w, c = t.shape
    dd = MPSCNNLossDataDescriptor(np.ascontiguousarray(t, np.float32), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(w, h, c))
    return MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1), labels_descriptor=dd)


@pytest.mark.parametrize("across", [False, True], ids=["per-image", "across"])
def test_yolo_loss_node_graph_matches_kernel(device, across: bool) -> None:
    d = yolo_descriptor(across)
    x = MPSNNImageNode("x")
    node = MPSCNNYOLOLossNode(x, d)
    node.input_labels.handle = "labels"
    graph = MPSNNGraph(device, node.result_image, True)
    graph.format = F32
    assert graph.source_state_handles == ["labels"]
    data = [yolo_inputs(70 + e) for e in range(2)]
    imgs = [image(y[None], device)[0] for y, _ in data]
    g_labels = [yolo_labels(device, t) for _, t in data]
    k_labels = [yolo_labels(device, t) for _, t in data]
    cb = cbuf(device)
    outs = graph.encode_batch(cb, [imgs], [g_labels])
    expected = MPSCNNYOLOLoss(device, loss_descriptor=d).encode_batch(cb, imgs, k_labels)
    finish(cb)
    for e in range(2):
        assert_close(values(outs[e]), values(expected[e]), "float32", EXACT, msg=f"gradient {e}")
        assert_close(values(g_labels[e].loss_image()), values(k_labels[e].loss_image()), "float32", {"float32": Tol(1e-6, 1e-6)},
                     msg=f"loss {e}")
    assert values(g_labels[0].loss_image()).item() != 0.0
    # batch of one through encode
    lab1, lab2 = yolo_labels(device, data[0][1]), yolo_labels(device, data[0][1])
    cb = cbuf(device)
    one = graph.encode(cb, [imgs[0]], [lab1])
    exp1 = MPSCNNYOLOLoss(device, loss_descriptor=d).encode(cb, imgs[0], lab2)
    finish(cb)
    assert_close(values(one), values(exp1), "float32", EXACT)
    assert_close(values(lab1.loss_image()), values(lab2.loss_image()), "float32", EXACT)


def test_yolo_loss_node_training_graph(device) -> None:
    """A YOLO loss after a linear neuron: training_graph starts at the neuron with the loss
    gradient; the result is a * (the YOLO gradient at a x + b)."""
    d = yolo_descriptor(False)
    x = MPSNNImageNode("x")
    lin = MPSCNNNeuronLinearNode(x, a=0.5, b=0.1)
    node = MPSCNNYOLOLossNode.node_with_source(lin.result_image, d)
    terms = node.training_graph()
    assert len(terms) == 1 and terms[0].forward_node is lin and terms[0].source_images[0] is node.result_image
    with pytest.raises(mpsnn.MPSValueError):
        node.training_graph(MPSNNImageNode())
    graph = MPSNNGraph(device, terms[0].result_image, True)
    graph.format = F32
    y, t = yolo_inputs(80)
    img, yr = image(y[None], device)
    cb = cbuf(device)
    out = graph.encode(cb, [img], [yolo_labels(device, t)])
    z, _ = image(0.5 * yr + 0.1, device)
    expected = MPSCNNYOLOLoss(device, loss_descriptor=d).encode(cb, z, yolo_labels(device, t))
    finish(cb)
    assert_close(values(out), 0.5 * values(expected), "float32", {"float32": Tol(1e-5, 1e-6)})


def test_yolo_loss_node_properties_and_errors() -> None:
    x = MPSNNImageNode("x")
    d = yolo_descriptor(False)
    node = MPSCNNYOLOLossNode(x, d)
    assert isinstance(node.input_labels, MPSNNLabelsNode) and node.source_states == [node.input_labels]
    assert node.input_labels.producer is None
    d.scale_xy = 1.0  # copied at init
    assert node.loss_descriptor.scale_xy == 10.0
    with pytest.raises(AttributeError):
        node.input_labels = MPSNNLabelsNode()
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNYOLOLossNode.*loss_descriptor"):
        MPSCNNYOLOLossNode(x, None)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNYOLOLossNode.*MPSCNNYOLOLossDescriptor"):
        MPSCNNYOLOLossNode(x, desc(T.meanSquaredError, R.sum))
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNYOLOLossNode"):
        MPSCNNYOLOLossNode("x", d)
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNYOLOLossNode"):
        node.gradient_filter_with_source(MPSNNImageNode())
    assert node.training_graph() == [node]  # its source is a graph input
