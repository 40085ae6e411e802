"""Graph nodes of the normalization family (spec/graph.md §14 "Normalization", §11 batch norm).

Checks: graph == kernels encoded one by one (batch 1 and an encode_batch of 3), gradients of
every gradient node against torch.autograd in float64, batch-normalization mode rules, the
data-source update hooks per training style, defaults, factories and errors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m

FMT32 = m.MPSImageFeatureChannelFormat.float32
GPU, CPU, NONE = m.MPSNNTrainingStyle.updateDeviceGPU, m.MPSNNTrainingStyle.updateDeviceCPU, m.MPSNNTrainingStyle.updateDeviceNone
BNF = m.MPSCNNBatchNormalizationFlags
H, W = 5, 6


# -- helpers ---------------------------------------------------------------------------------------------------


def _arr(rng: np.random.Generator, n: int, c: int, h: int = H, w: int = W) -> np.ndarray:
    return rng.normal(size=(n, h, w, c)).astype(np.float32)


def _img(device: m.Device, a: np.ndarray) -> m.MPSImage:
    return m.MPSImage.from_numpy(a, device=device)


def _plain(kernel):
    """Kernels encoded by the tests return host-readable images."""
    kernel.destination_image_allocator = m.MPSImage.default_allocator
    return kernel


def _cb(device: m.Device) -> m.MTLCommandBuffer:
    return device.make_command_queue().make_command_buffer()


def _finish(cb: m.MTLCommandBuffer) -> None:
    cb.commit()
    cb.wait_until_completed()


def _np(images) -> np.ndarray:
    return np.concatenate([i.to_numpy() for i in images])


def _t64(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def _f32(v: float) -> float:
    return float(np.float32(v))


def _run_batch(graph: m.MPSNNGraph, device: m.Device, by_handle: dict, intermediate: list | None = None,
               states: list | None = None) -> np.ndarray:
    """encode_batch with the batches keyed by source handle; returns the stacked result."""
    cb = _cb(device)
    batches = [by_handle[h] for h in graph.source_image_handles]
    out = graph.encode_batch(cb, batches, None, intermediate, states)
    _finish(cb)
    return _np(out)


def _grad_graph(device: m.Device, fwd: Any, extra_results: list | None = None) -> tuple[m.MPSNNGraph, Any]:
    g = m.MPSNNImageNode("g")
    grad = fwd.gradient_filter_with_source(g)
    if extra_results is not None:
        graph = m.MPSNNGraph(device, result_images=[*extra_results, grad.result_image])
    else:
        graph = m.MPSNNGraph(device, grad.result_image, True)
    graph.format = FMT32
    return graph, grad


# -- torch float64 references of the local normalizations (kernel docstring formulas) ------------------------------


def _window_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{q∈W(p)} x_q / k² with W(p) = [p − k//2, p + (k−1)//2], zero outside; NHWC."""
    t = x.permute(0, 3, 1, 2)
    t = F.pad(t, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))
    return F.avg_pool2d(t, k, stride=1).permute(0, 2, 3, 1)


def spatial_ref(x: torch.Tensor, k: int, alpha: float, beta: float, delta: float) -> torch.Tensor:
    return x * (delta + alpha * _window_mean(x * x, k)) ** (-beta)


def lcn_ref(x: torch.Tensor, k: int, alpha: float, beta: float, delta: float, p0: float, pm: float, ps: float) -> torch.Tensor:
    mean = _window_mean(x, k)
    var = _window_mean(x * x, k) - mean * mean
    return pm + ps * (x - p0 * mean) * (delta + alpha * var) ** (-beta)


def cross_channel_ref(x: torch.Tensor, n: int, alpha: float, beta: float, delta: float) -> torch.Tensor:
    sq = F.pad(x * x, (n // 2, (n - 1) // 2))  # channels are the last axis
    s = sq.unfold(-1, n, 1).sum(-1)
    return x * (delta + alpha / n * s) ** (-beta)


LOCAL = {
    # name: (node factory, kernel factory, torch reference, channels)
    "spatial": (
        lambda x: _configure(m.MPSCNNSpatialNormalizationNode(x, 3), alpha=0.5, beta=0.75, delta=1.5),
        lambda d: m.MPSCNNSpatialNormalization(d, 3, 3, alpha=0.5, beta=0.75, delta=1.5),
        lambda t: spatial_ref(t, 3, _f32(0.5), _f32(0.75), _f32(1.5)),
        3,
    ),
    "local_contrast": (
        lambda x: _configure(m.MPSCNNLocalContrastNormalizationNode(x, 3), alpha=0.9, beta=0.5, delta=0.5, p0=0.8, pm=0.1, ps=1.3),
        lambda d: m.MPSCNNLocalContrastNormalization(d, 3, 3, alpha=0.9, beta=0.5, delta=0.5, p0=0.8, pm=0.1, ps=1.3),
        lambda t: lcn_ref(t, 3, _f32(0.9), 0.5, 0.5, _f32(0.8), _f32(0.1), _f32(1.3)),
        2,
    ),
    "cross_channel": (
        lambda x: _configure(m.MPSCNNCrossChannelNormalizationNode(x, 4), alpha=0.5, beta=0.75, delta=1.5),
        lambda d: m.MPSCNNCrossChannelNormalization(d, 4, alpha=0.5, beta=0.75, delta=1.5),
        lambda t: cross_channel_ref(t, 4, _f32(0.5), _f32(0.75), _f32(1.5)),
        7,
    ),
}


def _configure(node, **values):
    for k, v in values.items():
        setattr(node, k, v)
    return node


# -- local normalizations: forward and gradient ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_forward_graph_equals_kernels(device, name):
    make_node, make_kernel, ref, c = LOCAL[name]
    rng = np.random.default_rng(1)
    x = m.MPSNNImageNode("x")
    graph = m.MPSNNGraph(device, make_node(x).result_image, True)
    graph.format = FMT32
    kernel = _plain(make_kernel(device))
    a = _arr(rng, 3, c)
    imgs = [_img(device, a[i:i + 1]) for i in range(3)]
    # batch of 1
    got1 = graph.run([imgs[0]]).to_numpy()
    cb = _cb(device)
    want1 = kernel.encode(cb, imgs[0])
    _finish(cb)
    np.testing.assert_array_equal(got1, want1.to_numpy())
    # encode_batch of 3 == the kernel one image at a time
    got3 = _run_batch(graph, device, {"x": imgs})
    cb = _cb(device)
    want3 = [kernel.encode(cb, i) for i in imgs]
    _finish(cb)
    np.testing.assert_allclose(got3, _np(want3), rtol=1e-6, atol=1e-7)
    # and the formula of the spec
    np.testing.assert_allclose(got3, ref(_t64(a)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_gradient_matches_autograd(device, name):
    make_node, _, ref, c = LOCAL[name]
    rng = np.random.default_rng(2)
    fwd = make_node(m.MPSNNImageNode("x"))
    graph, grad = _grad_graph(device, fwd)
    assert type(grad).__name__ == type(fwd).__name__.replace("Node", "GradientNode")
    a, g = _arr(rng, 2, c), _arr(rng, 2, c)
    got = _run_batch(graph, device, {"x": [_img(device, a[i:i + 1]) for i in range(2)], "g": [_img(device, g[i:i + 1]) for i in range(2)]})
    x = _t64(a, grad=True)
    ref(x).backward(_t64(g))
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_local_gradient_node_via_training_graph(device):
    rng = np.random.default_rng(3)
    x = m.MPSNNImageNode("x")
    fwd = m.MPSCNNCrossChannelNormalizationNode(x, 3)
    fwd.alpha, fwd.beta = 0.25, 0.5
    g = m.MPSNNImageNode("g")
    made = []
    terminals = fwd.training_graph(g, lambda gn, inf, src, gs: made.append((gn, inf, src, gs)))
    assert len(terminals) == 1 and len(made) == 1
    gn, inf, src, gs = made[0]
    assert isinstance(gn, m.MPSCNNCrossChannelNormalizationGradientNode)
    assert inf is fwd and src is x and gs is g
    assert (gn.kernel_size, gn.alpha, gn.beta, gn.delta) == (3, 0.25, 0.5, 1.0)
    graph = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph.format = FMT32
    a, gr = _arr(rng, 1, 5), _arr(rng, 1, 5)
    got = _run_batch(graph, device, {"x": [_img(device, a)], "g": [_img(device, gr)]})
    t = _t64(a, grad=True)
    cross_channel_ref(t, 3, 0.25, 0.5, 1.0).backward(_t64(gr))
    np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_local_contrast_gradient_node_default_alpha_mismatch_is_refused(device):
    x, g = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    fwd = m.MPSCNNLocalContrastNormalizationNode(x, 3)
    # Apple's init form: the gradient node keeps the kernel default alpha 0.0 (forward: 1.0)
    grad = m.MPSCNNLocalContrastNormalizationGradientNode(g, x, fwd.result_state, 3, 3)
    assert grad.alpha == 0.0 and fwd.alpha == 1.0
    graph = m.MPSNNGraph(device, grad.result_image, True)
    a = _arr(np.random.default_rng(4), 1, 2)
    with pytest.raises(m.MPSValueError, match="MPSCNNLocalContrastNormalizationGradient"):
        _run_batch(graph, device, {"x": [_img(device, a)], "g": [_img(device, a)]})
    grad.alpha = 1.0  # now the parameters match the forward's
    graph = m.MPSNNGraph(device, grad.result_image, True)
    _run_batch(graph, device, {"x": [_img(device, a)], "g": [_img(device, a)]})


def test_local_parameters_are_read_when_the_graph_is_built(device):
    x = m.MPSNNImageNode("x")
    node = m.MPSCNNSpatialNormalizationNode(x, 3)
    a = _arr(np.random.default_rng(5), 1, 2)
    g1 = m.MPSNNGraph(device, node.result_image, True)
    g1.format = FMT32
    node.beta = 0.5
    g2 = m.MPSNNGraph(device, node.result_image, True)
    g2.format = FMT32
    y1, y2 = g1.run([_img(device, a)]).to_numpy(), g2.run([_img(device, a)]).to_numpy()
    np.testing.assert_allclose(y1, spatial_ref(_t64(a), 3, 1.0, 5.0, 1.0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y2, spatial_ref(_t64(a), 3, 1.0, 0.5, 1.0).numpy(), rtol=1e-5, atol=1e-6)


def test_spatial_unequal_window_refused_at_build(device):
    node = m.MPSCNNSpatialNormalizationNode(m.MPSNNImageNode(None), 3)
    node.kernel_height = 5
    with pytest.raises(m.MPSValueError, match="kernel_height"):
        m.MPSNNGraph(device, node.result_image, True)


# -- local normalizations: defaults, properties, errors --------------------------------------------------------------


def test_normalization_node_is_abstract():
    with pytest.raises(m.MPSTypeError, match="MPSCNNNormalizationNode"):
        m.MPSCNNNormalizationNode(m.MPSNNImageNode(None))
    with pytest.raises(m.MPSTypeError, match="MPSCNNNormalizationNode"):
        m.MPSCNNNormalizationNode.node_with_source(m.MPSNNImageNode(None))


def test_spatial_defaults_and_properties():
    x = m.MPSNNImageNode(None)
    n = m.MPSCNNSpatialNormalizationNode(x)
    assert isinstance(n, m.MPSCNNNormalizationNode)
    assert (n.alpha, n.beta, n.delta, n.kernel_width, n.kernel_height) == (1.0, 5.0, 1.0, 5, 5)
    n2 = m.MPSCNNSpatialNormalizationNode.node_with_source(x, 3)
    assert type(n2) is m.MPSCNNSpatialNormalizationNode and (n2.kernel_width, n2.kernel_height) == (3, 3)
    n.alpha, n.beta, n.delta, n.kernel_width, n.kernel_height = 0.0, 0.75, 2.0, 7, 7
    assert (n.alpha, n.beta, n.delta, n.kernel_width, n.kernel_height) == (0.0, 0.75, 2.0, 7, 7)
    assert isinstance(n.result_state, m.MPSNNGradientStateNode)
    g = m.MPSCNNSpatialNormalizationGradientNode(m.MPSNNImageNode(None), x, n.result_state, 3)
    assert (g.alpha, g.beta, g.delta, g.kernel_width, g.kernel_height) == (1.0, 5.0, 1.0, 3, 3)
    g.kernel_width = g.kernel_height = 4
    g.alpha = 2.0
    assert (g.kernel_width, g.kernel_height, g.alpha) == (4, 4, 2.0)
    g2 = n.gradient_filter_with_source(m.MPSNNImageNode(None))
    assert isinstance(g2, m.MPSCNNSpatialNormalizationGradientNode)
    assert (g2.alpha, g2.beta, g2.delta, g2.kernel_width, g2.kernel_height) == (0.0, 0.75, 2.0, 7, 7)
    assert g2.forward_node is n and g2.source_images[1] is x


def test_local_contrast_defaults_and_properties():
    x = m.MPSNNImageNode(None)
    n = m.MPSCNNLocalContrastNormalizationNode(x)
    assert (n.alpha, n.beta, n.delta, n.p0, n.pm, n.ps) == (1.0, 0.5, 2.0 ** -10, 1.0, 0.0, 1.0)
    assert (n.kernel_width, n.kernel_height) == (5, 5)
    n.pm, n.ps, n.p0, n.kernel_width, n.kernel_height = 0.5, 2.0, 0.25, 3, 3
    assert (n.pm, n.ps, n.p0, n.kernel_width, n.kernel_height) == (0.5, 2.0, 0.25, 3, 3)
    g = m.MPSCNNLocalContrastNormalizationGradientNode.node_with_source_gradient(m.MPSNNImageNode(None), x, n.result_state, 3, 3)
    assert (g.alpha, g.beta, g.delta, g.p0, g.pm, g.ps) == (0.0, 0.5, 1.0 / 1024, 1.0, 0.0, 1.0)
    assert (g.kernel_width, g.kernel_height) == (3, 3)
    with pytest.raises(AttributeError):
        g.kernel_width = 5
    g.alpha = -0.5  # the local-contrast kernel has no range for alpha
    assert g.alpha == -0.5
    g2 = n.gradient_filter_with_source(m.MPSNNImageNode(None))
    assert (g2.alpha, g2.beta, g2.delta, g2.p0, g2.pm, g2.ps) == (1.0, 0.5, 2.0 ** -10, 0.25, 0.5, 2.0)
    assert (g2.kernel_width, g2.kernel_height) == (3, 3)


def test_cross_channel_defaults_and_properties():
    x = m.MPSNNImageNode(None)
    n = m.MPSCNNCrossChannelNormalizationNode(x)
    assert (n.alpha, n.beta, n.delta, n.kernel_size_in_feature_channels) == (1.0, 5.0, 1.0, 5)
    n.kernel_size_in_feature_channels = 3
    assert m.MPSCNNCrossChannelNormalizationNode.node_with_source(x, 7).kernel_size_in_feature_channels == 7
    g = m.MPSCNNCrossChannelNormalizationGradientNode(m.MPSNNImageNode(None), x, n.result_state, 4)
    assert (g.kernel_size, g.alpha, g.beta, g.delta) == (4, 1.0, 5.0, 1.0)
    with pytest.raises(AttributeError):
        g.kernel_size = 3
    assert n.gradient_filter_with_source(m.MPSNNImageNode(None)).kernel_size == 3


@pytest.mark.parametrize("cls", [m.MPSCNNSpatialNormalizationNode, m.MPSCNNLocalContrastNormalizationNode, m.MPSCNNCrossChannelNormalizationNode])
def test_local_forward_errors(cls):
    x = m.MPSNNImageNode(None)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(m.MPSError, match=cls.__name__):
            cls(x, bad)
    n = cls(x)
    with pytest.raises(m.MPSValueError, match=f"{cls.__name__}.*alpha"):
        n.alpha = -1.0
    for name, bad in (("beta", float("nan")), ("delta", "1"), ("alpha", None)):
        with pytest.raises(m.MPSError, match=f"{cls.__name__}.*{name}"):
            setattr(n, name, bad)
    with pytest.raises(m.MPSError, match=cls.__name__):
        cls("not a node")
    with pytest.raises(m.MPSValueError, match="gradient nodes have no gradient"):
        n.gradient_filter_with_source(m.MPSNNImageNode(None)).gradient_filter_with_source(m.MPSNNImageNode(None))


def test_local_gradient_errors():
    x = m.MPSNNImageNode(None)
    with pytest.raises(m.MPSValueError, match="MPSCNNSpatialNormalizationGradientNode.*kernel_size"):
        m.MPSCNNSpatialNormalizationGradientNode(x, x, None, 0)
    with pytest.raises(m.MPSValueError, match="MPSCNNLocalContrastNormalizationGradientNode.*kernel_height"):
        m.MPSCNNLocalContrastNormalizationGradientNode(x, x, None, 3, -2)
    with pytest.raises(m.MPSValueError, match="MPSCNNCrossChannelNormalizationGradientNode.*alpha"):
        m.MPSCNNCrossChannelNormalizationGradientNode(x, x, None, 3).alpha = -1


# -- instance and group normalization -----------------------------------------------------------------------------------


class RecordingIN(m.InstanceNormalizationDataSource):
    """The ready-made source (plain SGD when learning_rate is set) recording every hook call."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: list = []

    def update_gamma_and_beta_with_command_buffer(self, command_buffer, instance_normalization_state_batch):
        st = instance_normalization_state_batch
        self.calls.append(("gpu", command_buffer, list(st), st[0].gradient_for_gamma.clone(), st[0].gradient_for_beta.clone()))
        return super().update_gamma_and_beta_with_command_buffer(command_buffer, instance_normalization_state_batch)

    def update_gamma_and_beta_with_instance_normalization_state_batch(self, instance_normalization_state_batch):
        st = instance_normalization_state_batch
        self.calls.append(("cpu", None, list(st), st[0].gradient_for_gamma.clone(), st[0].gradient_for_beta.clone()))
        return super().update_gamma_and_beta_with_instance_normalization_state_batch(instance_normalization_state_batch)


class RecordingGN(m.GroupNormalizationDataSource):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: list = []

    def update_gamma_and_beta_with_command_buffer(self, command_buffer, group_normalization_state_batch):
        st = group_normalization_state_batch
        self.calls.append(("gpu", command_buffer, list(st), st[0].gradient_for_gamma.clone(), st[0].gradient_for_beta.clone()))
        return super().update_gamma_and_beta_with_command_buffer(command_buffer, group_normalization_state_batch)

    def update_gamma_and_beta_with_group_normalization_state_batch(self, group_normalization_state_batch):
        st = group_normalization_state_batch
        self.calls.append(("cpu", None, list(st), st[0].gradient_for_gamma.clone(), st[0].gradient_for_beta.clone()))
        return super().update_gamma_and_beta_with_group_normalization_state_batch(group_normalization_state_batch)


EPS = 1e-3
C_IG = 6


def _ig_case(kind: str, rng: np.random.Generator, learning_rate=None) -> tuple[Any, Any, Any, Any, Any]:
    gamma, beta = rng.uniform(0.5, 1.5, C_IG), rng.normal(size=C_IG)
    ds: Any
    node_cls: Any
    kernel_cls: Any
    grad_cls: Any
    state_cls: Any
    if kind == "instance":
        ds = RecordingIN(gamma, beta, epsilon=EPS, learning_rate=learning_rate)
        node_cls, kernel_cls, grad_cls, state_cls = (m.MPSCNNInstanceNormalizationNode, m.MPSCNNInstanceNormalization,
                                                     m.MPSCNNInstanceNormalizationGradientNode, m.MPSCNNInstanceNormalizationGradientState)
    else:
        ds = RecordingGN(gamma, beta, 3, epsilon=EPS, learning_rate=learning_rate)
        node_cls, kernel_cls, grad_cls, state_cls = (m.MPSCNNGroupNormalizationNode, m.MPSCNNGroupNormalization,
                                                     m.MPSCNNGroupNormalizationGradientNode, m.MPSCNNGroupNormalizationGradientState)
    return ds, node_cls, kernel_cls, grad_cls, state_cls


def _ig_nchw(kind: str, x: torch.Tensor, gamma, beta) -> torch.Tensor:
    """The torch float64 instance / group normalization of NHWC ``x``, as NCHW."""
    t = x.permute(0, 3, 1, 2)
    g = gamma if isinstance(gamma, torch.Tensor) else _t64(np.asarray(gamma, np.float32))
    b = beta if isinstance(beta, torch.Tensor) else _t64(np.asarray(beta, np.float32))
    if kind == "instance":
        return F.instance_norm(t, weight=g, bias=b, eps=_f32(EPS))
    return F.group_norm(t, 3, weight=g, bias=b, eps=_f32(EPS))


def _ig_ref(kind: str, x: torch.Tensor, gamma, beta) -> torch.Tensor:
    return _ig_nchw(kind, x, gamma, beta).permute(0, 2, 3, 1)


def _ig_backward(kind: str, x: torch.Tensor, gamma, beta, g: np.ndarray) -> None:
    # the upstream gradient goes in as a contiguous NCHW tensor: torch 2.x's instance_norm
    # backward returns a wrong dx for a one-image batch with a non-contiguous grad_output
    _ig_nchw(kind, x, gamma, beta).backward(_t64(g).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("kind", ["instance", "group"])
def test_instance_group_forward_graph_equals_kernels(device, kind):
    rng = np.random.default_rng(10)
    ds, node_cls, kernel_cls, _, _ = _ig_case(kind, rng)
    node = node_cls(m.MPSNNImageNode("x"), ds)
    graph = m.MPSNNGraph(device, node.result_image, True)
    graph.format = FMT32
    kernel = _plain(kernel_cls(device, data_source=ds))
    a = _arr(rng, 3, C_IG)
    imgs = [_img(device, a[i:i + 1]) for i in range(3)]
    cb = _cb(device)
    want = [kernel.encode(cb, i) for i in imgs]
    _finish(cb)
    np.testing.assert_array_equal(graph.run([imgs[0]]).to_numpy(), want[0].to_numpy())
    np.testing.assert_allclose(_run_batch(graph, device, {"x": imgs}), _np(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(want), _ig_ref(kind, _t64(a), ds.gamma(), ds.beta()).numpy(), rtol=1e-5, atol=1e-5)
    assert ds.calls == []


@pytest.mark.parametrize("kind", ["instance", "group"])
def test_instance_group_gradient_and_gpu_update(device, kind):
    rng = np.random.default_rng(11)
    lr = 0.05
    ds, node_cls, _, grad_cls, state_cls = _ig_case(kind, rng, learning_rate=lr)
    node = node_cls(m.MPSNNImageNode("x"), ds)
    graph, grad = _grad_graph(device, node)
    assert type(grad) is grad_cls and grad.training_style == GPU
    assert graph._plan.steps[-1].node is grad
    gamma0, beta0 = ds.gamma().copy(), ds.beta().copy()
    a, g = _arr(rng, 3, C_IG), _arr(rng, 3, C_IG)
    inputs = {"x": [_img(device, a[i:i + 1]) for i in range(3)], "g": [_img(device, g[i:i + 1]) for i in range(3)]}
    got = _run_batch(graph, device, inputs)
    x = _t64(a, grad=True)
    gamma_t, beta_t = _t64(gamma0, grad=True), _t64(beta0, grad=True)
    _ig_backward(kind, x, gamma_t, beta_t, g)
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-4, atol=1e-5)
    # the GPU hook ran once, on the graph's command buffer, with the one state of the stacked batch
    assert len(ds.calls) == 1
    style, cb, states, dgamma, dbeta = ds.calls[0]
    assert style == "gpu" and isinstance(cb, m.MTLCommandBuffer) and len(states) == 1 and isinstance(states[0], state_cls)
    np.testing.assert_allclose(dgamma.cpu().numpy(), gamma_t.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.cpu().numpy(), beta_t.grad.numpy(), rtol=1e-4, atol=1e-4)
    gamma1 = gamma0 - lr * dgamma.cpu().numpy()
    np.testing.assert_allclose(ds.gamma(), gamma1, rtol=1e-6)
    # the next encode uses the new gamma (reloaded into the graph's forward kernel)
    got2 = _run_batch(graph, device, inputs)
    x2 = _t64(a, grad=True)
    _ig_backward(kind, x2, gamma1, beta0, g)
    np.testing.assert_allclose(got2, x2.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert len(ds.calls) == 2


@pytest.mark.parametrize("kind", ["instance", "group"])
def test_instance_group_cpu_and_none_styles(device, kind):
    rng = np.random.default_rng(12)
    ds, node_cls, _, _, _ = _ig_case(kind, rng, learning_rate=0.1)
    node = node_cls(m.MPSNNImageNode("x"), ds)
    node.training_style = CPU
    graph, grad = _grad_graph(device, node)
    assert grad.training_style == CPU
    a, g = _arr(rng, 1, C_IG), _arr(rng, 1, C_IG)
    gamma0 = ds.gamma().copy()
    cb = _cb(device)
    graph.encode(cb, [_img(device, a) if h == "x" else _img(device, g) for h in graph.source_image_handles])
    assert ds.calls == []  # CPU style: from the completion handler
    _finish(cb)
    assert [c[0] for c in ds.calls] == ["cpu"]
    gamma1 = gamma0 - 0.1 * ds.calls[0][3].cpu().numpy()
    np.testing.assert_allclose(ds.gamma(), gamma1, rtol=1e-6)
    got2 = _run_batch(graph, device, {"x": [_img(device, a)], "g": [_img(device, g)]})  # forward kernel reloaded
    x2 = _t64(a, grad=True)
    _ig_backward(kind, x2, gamma1, ds.beta(), g)
    np.testing.assert_allclose(got2, x2.grad.numpy(), rtol=1e-4, atol=1e-5)
    # None: gradient still flows, no hook, no change
    ds2, node_cls, _, _, _ = _ig_case(kind, rng, learning_rate=0.1)
    node2 = node_cls(m.MPSNNImageNode("x"), ds2)
    node2.training_style = NONE
    graph2, grad2 = _grad_graph(device, node2)
    assert grad2.training_style == NONE and not grad2._is_trainable_update()
    gamma_before = ds2.gamma().copy()
    out = _run_batch(graph2, device, {"x": [_img(device, a)], "g": [_img(device, g)]})
    x3 = _t64(a, grad=True)
    _ig_backward(kind, x3, gamma_before, ds2.beta(), g)
    np.testing.assert_allclose(out, x3.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert ds2.calls == [] and np.array_equal(ds2.gamma(), gamma_before)


class PlainIN(m.MPSCNNInstanceNormalizationDataSource):
    """Implements only the required part of the protocol (no update methods)."""

    def gamma(self):
        return np.ones(4, np.float32)

    def beta(self):
        return None

    def number_of_feature_channels(self):
        return 4

    def label(self):
        return "plain"


def test_instance_gpu_update_missing_is_refused_at_build(device):
    node = m.MPSCNNInstanceNormalizationNode(m.MPSNNImageNode("x"), PlainIN())
    grad = node.gradient_filter_with_source(m.MPSNNImageNode("g"))
    with pytest.raises(m.MPSValueError, match="MPSCNNInstanceNormalizationGradientNode.*update_gamma_and_beta_with_command_buffer"):
        m.MPSNNGraph(device, grad.result_image, True)
    grad.training_style = CPU
    m.MPSNNGraph(device, grad.result_image, True)  # the CPU hook defaults to False (no update)
    node.label = "renamed"
    assert m.MPSNNGraph(device, node.result_image, True)._kernels[id(node)].label == "renamed"


def test_instance_group_defaults_and_errors():
    x = m.MPSNNImageNode(None)
    ds = m.InstanceNormalizationDataSource(np.ones(4))
    n = m.MPSCNNInstanceNormalizationNode.node_with_source(x, ds)
    assert isinstance(n, m.MPSNNTrainableNode) and n.training_style == GPU and n.data_source is ds
    assert isinstance(n.result_state, m.MPSNNGradientStateNode)
    gds = m.GroupNormalizationDataSource(np.ones(4), number_of_groups=2)
    gn = m.MPSCNNGroupNormalizationNode(x, gds)
    assert gn.training_style == GPU and gn.data_source is gds
    g = m.MPSNNImageNode(None)
    grad = m.MPSCNNInstanceNormalizationGradientNode.node_with_source_gradient(g, x, n.result_state)
    assert isinstance(grad, m.MPSNNTrainableNode) and grad.forward_node is n and grad.training_style == GPU
    grad.training_style = NONE
    assert grad.training_style == NONE and n.training_style == GPU
    with pytest.raises(m.MPSValueError, match="MPSCNNInstanceNormalizationGradientNode.*training_style"):
        grad.training_style = 7
    with pytest.raises(m.MPSTypeError, match="MPSCNNInstanceNormalizationNode.*data_source"):
        m.MPSCNNInstanceNormalizationNode(x, gds)
    with pytest.raises(m.MPSTypeError, match="MPSCNNGroupNormalizationNode.*data_source"):
        m.MPSCNNGroupNormalizationNode(x, ds)
    with pytest.raises(m.MPSTypeError, match="MPSCNNInstanceNormalizationGradientNode.*gradient_state"):
        m.MPSCNNInstanceNormalizationGradientNode(g, x, None)
    with pytest.raises(m.MPSTypeError, match="MPSCNNGroupNormalizationGradientNode.*MPSCNNGroupNormalizationNode"):
        m.MPSCNNGroupNormalizationGradientNode(g, x, n.result_state)
    assert type(gn.gradient_filter_with_source(g)) is m.MPSCNNGroupNormalizationGradientNode


# -- batch normalization -------------------------------------------------------------------------------------------------


C_BN = 4


class RecordingBN(m.BatchNormalizationDataSource):
    """Records the hook calls; the GPU hooks return the states given (None: no update)."""

    def __init__(self, *a, gamma_beta=None, mean_variance=None, cpu_result=False, **k):
        super().__init__(*a, **k)
        self.calls: list = []
        self.gamma_beta, self.mean_variance, self.cpu_result = gamma_beta, mean_variance, cpu_result

    def update_gamma_and_beta(self, command_buffer, batch_normalization_state):
        st = batch_normalization_state
        self.calls.append(("gpu_gamma_beta", command_buffer, st, st.gradient_for_gamma.clone(), st.gradient_for_beta.clone()))
        return self.gamma_beta

    def update_mean_and_variance(self, command_buffer, batch_normalization_state):
        st = batch_normalization_state
        self.calls.append(("gpu_mean_variance", command_buffer, st, st.mean.clone(), st.variance.clone()))
        return self.mean_variance

    def update_gamma_and_beta_with_batch_normalization_state(self, batch_normalization_state):
        self.calls.append(("cpu_gamma_beta", None, batch_normalization_state, None, None))
        return self.cpu_result

    def update_mean_and_variance_with_batch_normalization_state(self, batch_normalization_state):
        self.calls.append(("cpu_mean_variance", None, batch_normalization_state, None, None))
        return super().update_mean_and_variance_with_batch_normalization_state(batch_normalization_state)


def _bn_source(rng, cls=RecordingBN, **k):
    return cls(rng.uniform(0.5, 1.5, C_BN), rng.normal(size=C_BN), rng.normal(size=C_BN), rng.uniform(0.5, 2.0, C_BN),
               epsilon=EPS, **k)


def _bn_ref(x: torch.Tensor, ds, training: bool, gamma=None, beta=None, mean=None, var=None) -> torch.Tensor:
    t = x.permute(0, 3, 1, 2)

    def f(v, d):
        return _t64(np.asarray(d if v is None else v, np.float32))
    y = F.batch_norm(t, f(mean, ds.mean()), f(var, ds.variance()), f(gamma, ds.gamma()), f(beta, ds.beta()),
                     training=training, eps=_f32(EPS))
    return y.permute(0, 2, 3, 1)


def test_batch_norm_inference_graph_equals_kernel(device):
    rng = np.random.default_rng(20)
    ds = _bn_source(rng)
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    graph = m.MPSNNGraph(device, node.result_image, True)
    graph.format = FMT32
    assert "MPSCNNBatchNormalization+MPSCNNBatchNormalizationStatistics" in graph.debug_description
    kernel = _plain(m.MPSCNNBatchNormalization(device, data_source=ds))
    a = _arr(rng, 3, C_BN)
    imgs = [_img(device, a[i:i + 1]) for i in range(3)]
    cb = _cb(device)
    want = [kernel.encode(cb, i) for i in imgs]
    _finish(cb)
    np.testing.assert_array_equal(graph.run([imgs[0]]).to_numpy(), want[0].to_numpy())
    got = _run_batch(graph, device, {"x": imgs})
    np.testing.assert_array_equal(got, _np(want))
    np.testing.assert_allclose(got, _bn_ref(_t64(a), ds, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert ds.calls == []
    # reload_from_data_sources re-reads gamma/beta and mean/variance
    ds.set_gamma_and_beta(np.full(C_BN, 2.0), np.zeros(C_BN))
    ds.set_mean_and_variance(np.zeros(C_BN), np.ones(C_BN))
    np.testing.assert_array_equal(_run_batch(graph, device, {"x": imgs}), got)
    graph.reload_from_data_sources()
    np.testing.assert_allclose(_run_batch(graph, device, {"x": imgs}), 2.0 * a / np.sqrt(1.0 + _f32(EPS)), rtol=1e-6, atol=1e-6)


def test_batch_norm_training_graph_uses_batch_statistics(device):
    rng = np.random.default_rng(21)
    ds = _bn_source(rng)
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    node.training_style = NONE
    node.result_state.export_from_graph = True
    graph, grad = _grad_graph(device, node, extra_results=[node.result_image])
    a, g = _arr(rng, 3, C_BN), _arr(rng, 3, C_BN)
    imgs, gimgs = [_img(device, a[i:i + 1]) for i in range(3)], [_img(device, g[i:i + 1]) for i in range(3)]
    inter, states = [], []
    y = _run_batch(graph, device, {"x": imgs, "g": gimgs}, inter, states)
    dx = _np(inter[0])
    # kernels one by one: statistics over the 3 entries into one state, then the normalization
    kernel, stats = _plain(m.MPSCNNBatchNormalization(device, data_source=ds)), m.MPSCNNBatchNormalizationStatistics(device)
    cb = _cb(device)
    state = kernel.result_state(imgs[0])
    stats.encode_batch(cb, imgs, state)
    want = kernel.encode_batch(cb, imgs, state)
    _finish(cb)
    np.testing.assert_allclose(y, _np(want), rtol=1e-6, atol=1e-6)
    # the graph's state: the statistics of the stacked images
    (gstate,) = states
    assert isinstance(gstate, m.MPSCNNBatchNormalizationState)
    np.testing.assert_allclose(gstate.mean.cpu().numpy(), a.reshape(-1, C_BN).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gstate.variance.cpu().numpy(), a.reshape(-1, C_BN).var(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gstate.mean.cpu().numpy(), state.mean.cpu().numpy(), rtol=1e-6, atol=1e-7)
    # forward and gradient against torch (training mode, float64)
    x = _t64(a, grad=True)
    yr = _bn_ref(x, ds, training=True)
    yr.backward(_t64(g))
    np.testing.assert_allclose(y, yr.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert ds.calls == []  # training style None


def test_batch_norm_flags(device):
    rng = np.random.default_rng(22)
    ds = _bn_source(rng)
    a, g = _arr(rng, 2, C_BN), _arr(rng, 2, C_BN)
    # Always: batch statistics even in an inference graph
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    node.flags = BNF.calculateStatisticsAlways
    graph = m.MPSNNGraph(device, node.result_image, True)
    graph.format = FMT32
    y = _run_batch(graph, device, {"x": [_img(device, a[i:i + 1]) for i in range(2)]})
    np.testing.assert_allclose(y, _bn_ref(_t64(a), ds, training=True).numpy(), rtol=1e-4, atol=1e-5)
    # flags are read at each encode
    node.flags = BNF.default
    y = _run_batch(graph, device, {"x": [_img(device, a[i:i + 1]) for i in range(2)]})
    np.testing.assert_allclose(y, _bn_ref(_t64(a), ds, training=False).numpy(), rtol=1e-5, atol=1e-5)
    # Never: stored statistics in a training graph; the gradient treats them as constants
    node2 = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    node2.flags = BNF.calculateStatisticsNever
    node2.training_style = NONE
    graph2, _ = _grad_graph(device, node2, extra_results=[node2.result_image])
    inter: list = []
    y2 = _run_batch(graph2, device, {"x": [_img(device, a)], "g": [_img(device, g)]}, inter)
    x = _t64(a, grad=True)
    yr = _bn_ref(x, ds, training=False)
    yr.backward(_t64(g))
    np.testing.assert_allclose(y2, yr.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(inter[0]), x.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_norm_gpu_update_hooks(device):
    rng = np.random.default_rng(23)
    tdev = device.torch_device
    new_gamma, new_beta = torch.full((C_BN,), 1.5, device=tdev), torch.full((C_BN,), -0.25, device=tdev)
    new_mean, new_var = torch.full((C_BN,), 0.5, device=tdev), torch.full((C_BN,), 3.0, device=tdev)
    ds = _bn_source(rng, gamma_beta=m.MPSCNNNormalizationGammaAndBetaState(new_gamma, new_beta),
                    mean_variance=m.MPSCNNNormalizationMeanAndVarianceState(new_mean, new_var))
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    node.flags = BNF.calculateStatisticsNever  # the forward result shows the reloaded mean/variance
    graph, grad = _grad_graph(device, node, extra_results=[node.result_image])
    assert grad.training_style == GPU and grad._is_trainable_update()
    a, g = _arr(rng, 2, C_BN), _arr(rng, 2, C_BN)
    inputs = {"x": [_img(device, a[i:i + 1]) for i in range(2)], "g": [_img(device, g[i:i + 1]) for i in range(2)]}
    y1 = _run_batch(graph, device, inputs)
    np.testing.assert_allclose(y1, _bn_ref(_t64(a), ds, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert [c[0] for c in ds.calls] == ["gpu_gamma_beta", "gpu_mean_variance"]
    assert all(isinstance(c[1], m.MTLCommandBuffer) and c[2] is ds.calls[0][2] for c in ds.calls)
    assert isinstance(ds.calls[0][2], m.MPSCNNBatchNormalizationState)
    # the state passed holds dgamma/dbeta of the whole batch
    x = _t64(a)
    gamma_t, beta_t = _t64(ds.gamma(), grad=True), _t64(ds.beta(), grad=True)
    yr = F.batch_norm(x.permute(0, 3, 1, 2), _t64(ds.mean()), _t64(ds.variance()), gamma_t, beta_t, training=False, eps=_f32(EPS))
    yr.permute(0, 2, 3, 1).backward(_t64(g))
    np.testing.assert_allclose(ds.calls[0][3].cpu().numpy(), gamma_t.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.calls[0][4].cpu().numpy(), beta_t.grad.numpy(), rtol=1e-4, atol=1e-4)
    # the next encode uses all four new values
    y2 = _run_batch(graph, device, inputs)
    want = _bn_ref(_t64(a), ds, training=False, gamma=[1.5] * C_BN, beta=[-0.25] * C_BN, mean=[0.5] * C_BN, var=[3.0] * C_BN)
    np.testing.assert_allclose(y2, want.numpy(), rtol=1e-5, atol=1e-5)
    assert len(ds.calls) == 4


def test_batch_norm_gpu_hook_none_means_no_update(device):
    rng = np.random.default_rng(24)
    ds = _bn_source(rng)  # the hooks return None
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    graph, _ = _grad_graph(device, node, extra_results=[node.result_image])
    a, g = _arr(rng, 2, C_BN), _arr(rng, 2, C_BN)
    inputs = {"x": [_img(device, a)], "g": [_img(device, g)]}
    y1 = _run_batch(graph, device, inputs)
    y2 = _run_batch(graph, device, inputs)
    np.testing.assert_array_equal(y1, y2)
    assert [c[0] for c in ds.calls] == ["gpu_gamma_beta", "gpu_mean_variance"] * 2
    # the batch statistics the mean/variance hook saw
    np.testing.assert_allclose(ds.calls[1][3].cpu().numpy(), a.reshape(-1, C_BN).mean(0), rtol=1e-5, atol=1e-6)


def test_batch_norm_cpu_update(device):
    rng = np.random.default_rng(25)
    ds = _bn_source(rng, momentum=0.5)
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    node.training_style = CPU
    graph, grad = _grad_graph(device, node)
    assert grad.training_style == CPU
    a, g = _arr(rng, 2, C_BN), _arr(rng, 2, C_BN)
    mean0, var0 = ds.mean().copy(), ds.variance().copy()
    cb = _cb(device)
    graph.encode(cb, [_img(device, a) if h == "x" else _img(device, g) for h in graph.source_image_handles])
    assert ds.calls == []
    _finish(cb)
    assert [c[0] for c in ds.calls] == ["cpu_gamma_beta", "cpu_mean_variance"]
    assert isinstance(ds.calls[0][2], m.MPSCNNBatchNormalizationState)
    np.testing.assert_allclose(ds.mean(), 0.5 * mean0 + 0.5 * a.reshape(-1, C_BN).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.variance(), 0.5 * var0 + 0.5 * a.reshape(-1, C_BN).var(0), rtol=1e-5, atol=1e-6)
    # the forward kernel reloaded mean/variance from the data source: visible with stored statistics
    node.flags = BNF.calculateStatisticsNever
    inf = m.MPSNNGraph(device, result_images=[node.result_image, grad.result_image])
    inf.format = FMT32
    y = _run_batch(inf, device, {"x": [_img(device, a)], "g": [_img(device, g)]})
    np.testing.assert_allclose(y, _bn_ref(_t64(a), ds, training=False).numpy(), rtol=1e-5, atol=1e-5)


class PlainBN(m.MPSCNNBatchNormalizationDataSource):
    """Only the required methods: no GPU update."""

    def number_of_feature_channels(self):
        return C_BN

    def gamma(self):
        return np.ones(C_BN, np.float32)

    def beta(self):
        return None

    def mean(self):
        return np.zeros(C_BN, np.float32)

    def variance(self):
        return np.ones(C_BN, np.float32)

    def load(self):
        return True

    def purge(self):
        pass

    def label(self):
        return None


class ObjcSpellingBN(PlainBN):
    """Implements the GPU hook under its Objective-C spelling only."""

    def __init__(self):
        self.calls = 0

    def update_gamma_and_beta_with_command_buffer(self, command_buffer, batch_normalization_state):
        self.calls += 1
        return None


def test_batch_norm_gpu_update_missing_is_refused_at_build(device):
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), PlainBN())
    grad = node.gradient_filter_with_source(m.MPSNNImageNode("g"))
    with pytest.raises(m.MPSValueError, match="MPSCNNBatchNormalizationGradientNode.*update_gamma_and_beta"):
        m.MPSNNGraph(device, grad.result_image, True)
    grad.training_style = NONE
    m.MPSNNGraph(device, grad.result_image, True)
    m.MPSNNGraph(device, node.result_image, True)  # inference is fine
    ds = ObjcSpellingBN()
    node = m.MPSCNNBatchNormalizationNode(m.MPSNNImageNode("x"), ds)
    graph, _ = _grad_graph(device, node)
    a = _arr(np.random.default_rng(26), 1, C_BN)
    _run_batch(graph, device, {"x": [_img(device, a)], "g": [_img(device, a)]})
    assert ds.calls == 1


def test_batch_norm_defaults_properties_and_errors():
    x = m.MPSNNImageNode(None)
    ds = _bn_source(np.random.default_rng(27))
    n = m.MPSCNNBatchNormalizationNode.node_with_source(x, ds)
    assert type(n) is m.MPSCNNBatchNormalizationNode and n.data_source is ds
    assert n.flags == BNF.default == BNF.calculateStatisticsAutomatic and isinstance(n.flags, BNF)
    assert n.training_style == GPU and isinstance(n, m.MPSNNTrainableNode)
    assert isinstance(n.result_state, m.MPSNNGradientStateNode)
    n.flags = BNF.calculateStatisticsNever
    assert n.flags == BNF.calculateStatisticsNever
    n.flags = 1
    assert n.flags is BNF.calculateStatisticsAlways
    for bad in (3, 4, -1, "always", None, True):
        with pytest.raises(m.MPSValueError, match="MPSCNNBatchNormalizationNode.*flags"):
            n.flags = bad
    with pytest.raises(m.MPSTypeError, match="MPSCNNBatchNormalizationNode.*data_source"):
        m.MPSCNNBatchNormalizationNode(x, m.InstanceNormalizationDataSource(np.ones(4)))
    n.training_style = CPU
    g = m.MPSNNImageNode(None)
    grad = n.gradient_filter_with_source(g)
    assert type(grad) is m.MPSCNNBatchNormalizationGradientNode and grad.training_style == CPU
    assert grad.source_images == [g, x] and grad.source_states == [n.result_state] and grad.data_source is ds
    grad2 = m.MPSCNNBatchNormalizationGradientNode.node_with_source_gradient(g, x, n.result_state)
    assert grad2.forward_node is n and grad2.training_style == CPU and isinstance(grad2, m.MPSNNTrainableNode)
    with pytest.raises(m.MPSTypeError, match="MPSCNNBatchNormalizationGradientNode.*gradient_state"):
        m.MPSCNNBatchNormalizationGradientNode(g, x, None)
    other = m.MPSCNNSpatialNormalizationNode(x)
    with pytest.raises(m.MPSTypeError, match="MPSCNNBatchNormalizationGradientNode.*MPSCNNBatchNormalizationNode"):
        m.MPSCNNBatchNormalizationGradientNode(g, x, other.result_state)
    with pytest.raises(m.MPSValueError, match="gradient nodes have no gradient"):
        grad.gradient_filter_with_source(g)


def test_batch_norm_training_graph_passes_style_and_prunes(device):
    rng = np.random.default_rng(28)
    ds = _bn_source(rng)
    x = m.MPSNNImageNode("x")
    bn = m.MPSCNNBatchNormalizationNode(x, ds)
    bn.training_style = NONE
    relu = m.MPSCNNNeuronReLUNode(bn.result_image)
    terminals = relu.training_graph(m.MPSNNImageNode("g"))
    assert len(terminals) == 1 and isinstance(terminals[0], m.MPSCNNBatchNormalizationGradientNode)
    assert terminals[0].training_style == NONE
    # result not needed and no parameter update: nothing of the gradient pass has to run
    graph = m.MPSNNGraph(device, terminals[0].result_image, False)
    assert all(not isinstance(s.node, m.MPSCNNBatchNormalizationGradientNode) for s in graph.plan.steps)
    bn2 = m.MPSCNNBatchNormalizationNode(x, ds)
    t2 = m.MPSCNNNeuronReLUNode(bn2.result_image).training_graph(m.MPSNNImageNode("g"))
    graph2 = m.MPSNNGraph(device, t2[0].result_image, False)
    assert any(isinstance(s.node, m.MPSCNNBatchNormalizationGradientNode) for s in graph2.plan.steps)
    # a training graph through bn and relu still gives the right gradient with intermediate temporaries
    graph3 = m.MPSNNGraph(device, terminals[0].result_image, True)
    graph3.format = FMT32
    a, g = _arr(rng, 3, C_BN), _arr(rng, 3, C_BN)
    got = _run_batch(graph3, device, {"x": [_img(device, a[i:i + 1]) for i in range(3)], "g": [_img(device, g[i:i + 1]) for i in range(3)]})
    xt = _t64(a, grad=True)
    torch.relu(_bn_ref(xt, ds, training=True)).backward(_t64(g))
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
