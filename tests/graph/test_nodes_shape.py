"""Graph nodes of the resampling / upsampling / shape, reduction and concatenation families
(spec/graph.md §14): graph == kernels encoded one by one (batch 1 and a batch of 3),
gradients against torch.autograd in float64 with a random upstream gradient, properties,
defaults, factories and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn.kernels.reshape import edge_index

F = m.MPSImageFeatureChannelFormat
E = m.MPSImageEdgeMode
C = m.MPSImageCoordinate


# -- helpers -----------------------------------------------------------------------------------------------

def rand(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def image(device, arr):
    return m.MPSImage.from_numpy(np.asarray(arr, dtype=np.float32), device=device)


def run_kernel(device, fn, *images):
    """Encode ``fn(cb, *images) -> MPSImage`` on its own command buffer; the result on the host."""
    cb = device.make_command_queue().make_command_buffer()
    out = fn(cb, *images)
    cb.commit()
    cb.wait_until_completed()
    return out.to_numpy()


def auto(kernel):
    """A kernel whose auto-sized results are ordinary (host-readable) images."""
    kernel.destination_image_allocator = m.MPSImage.default_allocator
    return kernel


def f32_graph(device, node_or_image):
    img = node_or_image.result_image if isinstance(node_or_image, m.MPSNNFilterNode) else node_or_image
    g = m.MPSNNGraph(device, img, True)
    g.format = F.float32
    return g


def check_forward(device, make_node, kernel_fn, shapes, seed=0):
    """Graph of ``make_node(*sources)`` == ``kernel_fn(cb, *images)`` for batch 1 (``run``) and a
    batch of 3 entries (``encode_batch``), entry by entry."""
    srcs = [m.MPSNNImageNode(f"s{i}") for i in range(len(shapes))]
    graph = f32_graph(device, make_node(*srcs))
    pos = {f"s{i}": i for i in range(len(shapes))}
    order = [pos[h] for h in graph.source_image_handles]
    data = [[rand((1, *s), seed + 10 * e + i).numpy() for i, s in enumerate(shapes)] for e in range(3)]
    # batch of one
    imgs = [image(device, a) for a in data[0]]
    out = graph.run([imgs[k] for k in order]).to_numpy()
    ref = run_kernel(device, kernel_fn, *[image(device, a) for a in data[0]])
    np.testing.assert_array_equal(out, ref)
    # batch of three entries
    batches = [[image(device, data[e][k]) for e in range(3)] for k in order]
    cb = device.make_command_queue().make_command_buffer()
    outs = graph.encode_batch(cb, batches)
    cb.commit()
    cb.wait_until_completed()
    assert len(outs) == 3
    for e in range(3):
        ref = run_kernel(device, kernel_fn, *[image(device, a) for a in data[e]])
        np.testing.assert_array_equal(outs[e].to_numpy(), ref)
    return out


def gradient_graph_result(device, forward_node, g_node, x, g, index=0):
    """dL/d(source ``index``) through ``forward_node.gradient_filters_with_sources([g_node])``."""
    gnodes = forward_node.gradient_filters_with_sources([g_node])
    graph = f32_graph(device, gnodes[index])
    feeds = {"x": image(device, x), "g": image(device, g)}
    return graph.run([feeds[h] for h in graph.source_image_handles]).to_numpy()


def autograd(fn, x, g):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    assert y.shape == g.shape, (y.shape, g.shape)
    y.backward(g)
    return x.grad.numpy()


def bilinear_1d(x, dim, s, align):
    """Torch (differentiable) version of the upsampling kernel's 1-D bilinear sampling."""
    n = x.shape[dim]
    q = torch.arange(s * n, dtype=torch.float64)
    if align:
        u = torch.zeros_like(q) if s * n == 1 else q * (n - 1) / (s * n - 1)
    else:
        u = q / s
    u = torch.clamp(u, max=n - 1)
    i0 = torch.floor(u).long()
    i1 = torch.clamp(i0 + 1, max=n - 1)
    t = (u - i0).reshape([-1 if d == dim else 1 for d in range(x.dim())])
    return x.index_select(dim, i0) * (1 - t) + x.index_select(dim, i1) * t


def bilinear_up(x, sx, sy, align):
    return bilinear_1d(bilinear_1d(x, 1, sy, align), 2, sx, align)


def nearest_up(x, sx, sy):
    return x.repeat_interleave(sy, dim=1).repeat_interleave(sx, dim=2)


def pad_torch(x, before, after, mode, fill=0.0):
    """Differentiable pad of an NHWC tensor, index maps from the spec's edge rules."""
    _, h, w, c = x.shape
    iy = [edge_index(j - before.y, h, mode) for j in range(h + before.y + after.y)]
    ix = [edge_index(i - before.x, w, mode) for i in range(w + before.x + after.x)]
    ic = [edge_index(k - before.channel, c, mode) for k in range(c + before.channel + after.channel)]
    t = x[:, [max(i, 0) for i in iy]][:, :, [max(i, 0) for i in ix]][..., [max(i, 0) for i in ic]]
    mask = (torch.tensor(iy) >= 0)[:, None, None] & (torch.tensor(ix) >= 0)[None, :, None] & (torch.tensor(ic) >= 0)[None, None, :]
    return torch.where(mask, t, torch.full_like(t, fill))


# -- resampling (scale) nodes ---------------------------------------------------------------------------------

class Provider(m.MPSImageTransformProvider):
    def __init__(self, transform):
        self.transform = transform
        self.calls = []

    def transform_for_source_image(self, image, handle):
        self.calls.append((image.width, image.height, handle))
        return self.transform


def scale_kernel(cls, w, h, transform=None):
    def fn(cb, src):
        k = cls(src.device)
        k.scale_transform = transform
        dest = m.MPSImage(src.device, image_descriptor=m.MPSImageDescriptor(channel_format=F.float32, width=w, height=h,
                                                                            feature_channels=src.feature_channels))
        k.encode(cb, src, dest)
        return dest
    return fn


@pytest.mark.parametrize("node_cls,kernel_cls", [(m.MPSNNBilinearScaleNode, m.MPSImageBilinearScale),
                                                  (m.MPSNNLanczosScaleNode, m.MPSImageLanczosScale)])
def test_scale_node_matches_kernel(device, node_cls, kernel_cls):
    out = check_forward(device, lambda s: node_cls(s, m.MTLSize(7, 3, 1)), scale_kernel(kernel_cls, 7, 3), [(5, 6, 3)])
    assert out.shape == (1, 3, 7, 3)


def test_scale_node_transform_provider(device):
    t = m.MPSScaleTransform(scale_x=1.5, scale_y=0.75, translate_x=-1.0, translate_y=0.5)
    p = Provider(t)
    check_forward(device, lambda s: m.MPSNNBilinearScaleNode(s, p, m.MTLSize(4, 5, 1)),
                  scale_kernel(m.MPSImageBilinearScale, 4, 5, t), [(6, 6, 2)])
    # called once per encode, with the source image and the source node's handle
    assert p.calls and all(c == (6, 6, "s0") for c in p.calls)
    # the transform changes the result; a provider returning None fits the whole source
    x = m.MPSNNImageNode("s0")
    none = f32_graph(device, m.MPSNNBilinearScaleNode(x, transform_provider=Provider(None), output_size=m.MTLSize(4, 5, 1)))
    plain = f32_graph(device, m.MPSNNBilinearScaleNode(x, m.MTLSize(4, 5, 1)))
    src = image(device, rand((1, 6, 6, 2), 3))
    np.testing.assert_array_equal(none.run([src]).to_numpy(), plain.run([src]).to_numpy())


def test_scale_node_forms_properties_errors(device):
    x = m.MPSNNImageNode(None)
    size = m.MTLSize(8, 4, 1)
    n = m.MPSNNBilinearScaleNode(x, size)
    assert n.output_size == size and n.transform_provider is None
    assert n.result_state is None and n.result_states is None
    p = Provider(m.MPSScaleTransform(1, 1, 0, 0))
    for node in (m.MPSNNLanczosScaleNode(x, p, size), m.MPSNNLanczosScaleNode(x, transform_provider=p, output_size=size),
                 m.MPSNNLanczosScaleNode.node_with_source(x, p, size)):
        assert node.transform_provider is p and node.output_size == size
    assert isinstance(m.MPSNNBilinearScaleNode.node_with_source(x, size), m.MPSNNBilinearScaleNode)
    with pytest.raises(m.MPSError, match="MPSNNScaleNode"):
        m.MPSNNScaleNode(x, size)
    with pytest.raises(m.MPSError, match="MPSNNBilinearScaleNode.*output_size"):
        m.MPSNNBilinearScaleNode(x, (8, 4, 1))
    with pytest.raises(m.MPSError, match="MPSNNBilinearScaleNode.*output_size.width"):
        m.MPSNNBilinearScaleNode(x, m.MTLSize(0, 4, 1))
    with pytest.raises(m.MPSError, match="MPSNNBilinearScaleNode"):
        m.MPSNNBilinearScaleNode(x)
    with pytest.raises(m.MPSError, match="MPSNNLanczosScaleNode.*transform_provider"):
        m.MPSNNLanczosScaleNode(x, object(), size)
    with pytest.raises(m.MPSError, match="no gradient"):
        n.gradient_filters_with_sources([m.MPSNNImageNode(None)])
    with pytest.raises(TypeError):
        m.MPSImageTransformProvider()  # abstract protocol
    # a provider returning something else fails at encode, naming the node
    bad = f32_graph(device, m.MPSNNBilinearScaleNode(x, Provider("oops"), size))
    with pytest.raises(m.MPSError, match="MPSNNBilinearScaleNode.*MPSScaleTransform"):
        bad.run([image(device, rand((1, 4, 4, 1), 0))])


# -- upsampling nodes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nearest", "bilinear", "bilinear_aligned"])
def test_upsampling_node_matches_kernel(device, kind):
    if kind == "nearest":
        def make(s):
            return m.MPSCNNUpsamplingNearestNode(s, 2, 3)

        def fn(cb, src):
            return auto(m.MPSCNNUpsamplingNearest(src.device, integer_scale_factor_x=2, integer_scale_factor_y=3)).encode(cb, src)
    else:
        align = kind == "bilinear_aligned"

        def make(s):
            return m.MPSCNNUpsamplingBilinearNode(s, 3, 2, align)

        def fn(cb, src):
            return auto(m.MPSCNNUpsamplingBilinear(src.device, integer_scale_factor_x=3, integer_scale_factor_y=2,
                                                   align_corners=align)).encode(cb, src)
    out = check_forward(device, make, fn, [(3, 4, 5)])
    assert out.shape[1:3] == ((9, 8) if kind == "nearest" else (6, 12))


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "bilinear_aligned"])
def test_upsampling_gradient_matches_autograd(device, kind):
    x, g = rand((1, 3, 4, 5), 1), rand((1, 6, 12, 5), 2)
    xn, gn = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    if kind == "nearest":
        fwd = m.MPSCNNUpsamplingNearestNode(xn, 3, 2)
        ref = autograd(lambda t: nearest_up(t, 3, 2), x, g)
    else:
        align = kind == "bilinear_aligned"
        fwd = m.MPSCNNUpsamplingBilinearNode(xn, 3, 2, align_corners=align)
        ref = autograd(lambda t: bilinear_up(t, 3, 2, align), x, g)
    out = gradient_graph_result(device, fwd, gn, x.numpy(), g.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # training_graph from the node with the same upstream gradient gives the same
    terminals = fwd.training_graph(gn)
    assert len(terminals) == 1
    graph = f32_graph(device, terminals[0])
    feeds = {"x": image(device, x.numpy()), "g": image(device, g.numpy())}
    np.testing.assert_array_equal(graph.run([feeds[h] for h in graph.source_image_handles]).to_numpy(), out)


def test_upsampling_properties_and_errors():
    x = m.MPSNNImageNode(None)
    n = m.MPSCNNUpsamplingNearestNode(x, 2, 3)
    assert (n.scale_factor_x, n.scale_factor_y) == (2.0, 3.0) and isinstance(n.scale_factor_x, float)
    b = m.MPSCNNUpsamplingBilinearNode(x, integer_scale_factor_x=4, integer_scale_factor_y=1)
    assert b.align_corners is False and (b.scale_factor_x, b.scale_factor_y) == (4.0, 1.0)
    assert m.MPSCNNUpsamplingBilinearNode.node_with_source(x, 2, 2, True).align_corners is True
    assert isinstance(m.MPSCNNUpsamplingNearestNode.node_with_source(x, 2, 2), m.MPSCNNUpsamplingNearestNode)
    assert isinstance(n.result_state, m.MPSNNGradientStateNode)
    gn = m.MPSNNImageNode(None)
    gnode = n.gradient_filter_with_source(gn)
    assert type(gnode) is m.MPSCNNUpsamplingNearestGradientNode
    assert (gnode.scale_factor_x, gnode.scale_factor_y) == (2.0, 3.0)
    assert gnode.source_images == [gn, x] and gnode.source_states == [n.result_state]
    bg = b.gradient_filter_with_source(gn)
    assert type(bg) is m.MPSCNNUpsamplingBilinearGradientNode and bg.scale_factor_x == 4.0
    made = m.MPSCNNUpsamplingBilinearGradientNode(gn, x, b.result_state, 4, 1)
    assert made.scale_factor_y == 1.0
    assert type(m.MPSCNNUpsamplingNearestGradientNode.node_with_source_gradient(gn, x, n.result_state, 2, 3)) is m.MPSCNNUpsamplingNearestGradientNode
    for bad in (0, 1.5, "2", True):
        with pytest.raises(m.MPSError, match="MPSCNNUpsamplingNearestNode.*integer_scale_factor_x"):
            m.MPSCNNUpsamplingNearestNode(x, bad, 2)
    with pytest.raises(m.MPSError, match="MPSCNNUpsamplingBilinearNode.*align_corners"):
        m.MPSCNNUpsamplingBilinearNode(x, 2, 2, 1)
    with pytest.raises(m.MPSError, match="MPSCNNUpsamplingBilinearGradientNode.*scale_factor_y"):
        m.MPSCNNUpsamplingBilinearGradientNode(gn, x, b.result_state, 2, 0)
    with pytest.raises(m.MPSError, match="gradient"):
        gnode.gradient_filter_with_source(gn)


# -- reshape and pad ------------------------------------------------------------------------------------------

def test_reshape_node_matches_kernel(device):
    out = check_forward(device, lambda s: m.MPSNNReshapeNode(s, 3, 2, 12),
                        lambda cb, src: auto(m.MPSNNReshape(src.device)).encode(cb, src, reshaped_width=3, reshaped_height=2,
                                                                                reshaped_feature_channels=12),
                        [(4, 6, 3)])
    assert out.shape == (1, 2, 3, 12)


def test_reshape_gradient_matches_autograd(device):
    x, g = rand((1, 4, 6, 3), 4), rand((1, 2, 3, 12), 5)
    xn, gn = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    fwd = m.MPSNNReshapeNode(xn, result_width=3, result_height=2, result_feature_channels=12)
    out = gradient_graph_result(device, fwd, gn, x.numpy(), g.numpy())
    np.testing.assert_allclose(out, autograd(lambda t: t.reshape(1, 2, 3, 12), x, g), rtol=1e-6, atol=1e-6)


def test_reshape_properties_and_errors(device):
    x = m.MPSNNImageNode(None)
    n = m.MPSNNReshapeNode.node_with_source(x, 2, 5, 7)
    assert (n.result_width, n.result_height, n.result_feature_channels) == (2, 5, 7)
    gn = m.MPSNNImageNode(None)
    gnode = n.gradient_filter_with_source(gn)
    assert type(gnode) is m.MPSNNReshapeGradientNode and gnode.source_images == [gn, x]
    assert type(m.MPSNNReshapeGradientNode(gn, x, n.result_state)) is m.MPSNNReshapeGradientNode
    for args, name in (((0, 1, 1), "result_width"), ((1, -1, 1), "result_height"), ((1, 1, 2.0), "result_feature_channels")):
        with pytest.raises(m.MPSError, match=f"MPSNNReshapeNode.*{name}"):
            m.MPSNNReshapeNode(x, *args)
    # the element count is checked at encode (the node is named in the graph's message)
    graph = f32_graph(device, m.MPSNNReshapeNode(x, 5, 5, 5))
    with pytest.raises(m.MPSError, match="MPSNNReshapeNode"):
        graph.run([image(device, rand((1, 2, 2, 2), 0))])


PAD_CASES = [
    (C(1, 2, 1), C(2, 0, 2), E.mirror, 0.0),
    (C(2, 1, 0), C(0, 3, 3), E.mirrorWithEdge, 0.0),
    (C(1, 1, 2), C(1, 0, 1), E.clamp, 0.0),
    (C(1, 0, 1), C(2, 1, 0), E.constant, 2.5),
    (C(0, 2, 0), C(1, 1, 4), E.zero, 0.0),
]


@pytest.mark.parametrize("before,after,mode,fill", PAD_CASES)
def test_pad_node_matches_kernel(device, before, after, mode, fill):
    def make(s):
        n = m.MPSNNPadNode(s, before, after, mode)
        n.fill_value = fill
        return n

    def fn(cb, src):
        k = auto(m.MPSNNPad(src.device, before, after))
        k.edge_mode = mode
        k.fill_value = fill
        return k.encode(cb, src)
    out = check_forward(device, make, fn, [(4, 5, 3)])
    ref = pad_torch(rand((1, 4, 5, 3), 0), before, after, mode, fill).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("before,after,mode,fill", PAD_CASES)
def test_pad_gradient_matches_autograd(device, before, after, mode, fill):
    x = rand((1, 4, 5, 3), 6)
    shape = (1, 4 + before.y + after.y, 5 + before.x + after.x, 3 + before.channel + after.channel)
    g = rand(shape, 7)
    xn, gn = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    fwd = m.MPSNNPadNode(xn, before, after, mode)
    fwd.fill_value = fill
    out = gradient_graph_result(device, fwd, gn, x.numpy(), g.numpy())
    np.testing.assert_allclose(out, autograd(lambda t: pad_torch(t, before, after, mode, fill), x, g), rtol=1e-5, atol=1e-5)


def test_pad_gradient_batch(device):
    """The gradient over an encode_batch of 2 entries equals the per-entry autograd gradients."""
    before, after = C(2, 1, 1), C(1, 2, 0)
    xn, gn = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    fwd = m.MPSNNPadNode(xn, before, after, E.mirrorWithEdge)
    graph = f32_graph(device, fwd.gradient_filter_with_source(gn))
    xs = [rand((1, 3, 4, 2), 20 + e) for e in range(2)]
    gs = [rand((1, 6, 7, 3), 30 + e) for e in range(2)]
    feeds = {"x": [image(device, t.numpy()) for t in xs], "g": [image(device, t.numpy()) for t in gs]}
    cb = device.make_command_queue().make_command_buffer()
    outs = graph.encode_batch(cb, [feeds[h] for h in graph.source_image_handles])
    cb.commit()
    cb.wait_until_completed()
    for e in range(2):
        ref = autograd(lambda t: pad_torch(t, before, after, E.mirrorWithEdge), xs[e], gs[e])
        np.testing.assert_allclose(outs[e].to_numpy(), ref, rtol=1e-5, atol=1e-5)


def test_pad_properties_and_errors(device):
    x = m.MPSNNImageNode(None)
    n = m.MPSNNPadNode(x, C(1, 2, 3), C(0, 0, 1), E.constant)
    assert n.fill_value == 0.0
    assert n.padding_size_before == C(1, 2, 3) and n.padding_size_after == C(0, 0, 1) and n.edge_mode is E.constant
    n.fill_value = -3
    assert n.fill_value == -3.0 and isinstance(n.fill_value, float)
    assert m.MPSNNPadNode.node_with_source(x, C(), C(), E.mirror).edge_mode is E.mirror
    gn = m.MPSNNImageNode(None)
    gnode = n.gradient_filter_with_source(gn)
    assert type(gnode) is m.MPSNNPadGradientNode and gnode.source_states == [n.result_state]
    assert type(m.MPSNNPadGradientNode.node_with_source_gradient(gn, x, n.result_state)) is m.MPSNNPadGradientNode
    for bad in ("1", True, None):
        with pytest.raises(m.MPSError, match="MPSNNPadNode.*fill_value"):
            n.fill_value = bad
    with pytest.raises(m.MPSError, match="MPSNNPadNode.*padding_size_before"):
        m.MPSNNPadNode(x, (1, 1, 1), C(), E.zero)
    with pytest.raises(m.MPSError, match=r"MPSNNPadNode.*padding_size_after\.x"):
        m.MPSNNPadNode(x, C(), C(-1, 0, 0), E.zero)
    with pytest.raises(m.MPSError, match="MPSNNPadNode.*edge_mode"):
        m.MPSNNPadNode(x, C(), C(), 17)
    # fill_value set after the graph was built is used by the next encode
    node = m.MPSNNPadNode(x, C(1, 0, 0), C(), E.constant)
    graph = f32_graph(device, node)
    src = image(device, np.ones((1, 1, 1, 1)))
    assert graph.run([src]).to_numpy().ravel().tolist() == [0.0, 1.0]
    node.fill_value = 7.0
    assert graph.run([src]).to_numpy().ravel().tolist() == [7.0, 1.0]


# -- reductions -------------------------------------------------------------------------------------------

REDUCTIONS = [
    ("MPSNNReductionRowMinNode", "MPSNNReduceRowMin"),
    ("MPSNNReductionColumnMinNode", "MPSNNReduceColumnMin"),
    ("MPSNNReductionFeatureChannelsMinNode", "MPSNNReduceFeatureChannelsMin"),
    ("MPSNNReductionFeatureChannelsArgumentMinNode", "MPSNNReduceFeatureChannelsArgumentMin"),
    ("MPSNNReductionRowMaxNode", "MPSNNReduceRowMax"),
    ("MPSNNReductionColumnMaxNode", "MPSNNReduceColumnMax"),
    ("MPSNNReductionFeatureChannelsMaxNode", "MPSNNReduceFeatureChannelsMax"),
    ("MPSNNReductionFeatureChannelsArgumentMaxNode", "MPSNNReduceFeatureChannelsArgumentMax"),
    ("MPSNNReductionRowMeanNode", "MPSNNReduceRowMean"),
    ("MPSNNReductionColumnMeanNode", "MPSNNReduceColumnMean"),
    ("MPSNNReductionFeatureChannelsMeanNode", "MPSNNReduceFeatureChannelsMean"),
    ("MPSNNReductionRowSumNode", "MPSNNReduceRowSum"),
    ("MPSNNReductionColumnSumNode", "MPSNNReduceColumnSum"),
    ("MPSNNReductionFeatureChannelsSumNode", "MPSNNReduceFeatureChannelsSum"),
]

# float64 torch references of the kernels (NHWC); axis: 2 = over x (row), 1 = over y (column), 3 = channels
TORCH_REDUCE = {
    "RowMin": lambda t: t.amin(2, keepdim=True), "RowMax": lambda t: t.amax(2, keepdim=True),
    "RowMean": lambda t: t.mean(2, keepdim=True), "RowSum": lambda t: t.sum(2, keepdim=True),
    "ColumnMin": lambda t: t.amin(1, keepdim=True), "ColumnMax": lambda t: t.amax(1, keepdim=True),
    "ColumnMean": lambda t: t.mean(1, keepdim=True), "ColumnSum": lambda t: t.sum(1, keepdim=True),
    "FeatureChannelsMin": lambda t: t.amin(3, keepdim=True), "FeatureChannelsMax": lambda t: t.amax(3, keepdim=True),
    "FeatureChannelsMean": lambda t: t.mean(3, keepdim=True), "FeatureChannelsSum": lambda t: t.sum(3, keepdim=True),
    "FeatureChannelsArgumentMin": lambda t: t.argmin(3, keepdim=True).double(),
    "FeatureChannelsArgumentMax": lambda t: t.argmax(3, keepdim=True).double(),
}


@pytest.mark.parametrize("node_name,kernel_name", REDUCTIONS, ids=[r[0][len("MPSNNReduction"):-len("Node")] for r in REDUCTIONS])
def test_reduction_node_matches_kernel(device, node_name, kernel_name):
    node_cls, kernel_cls = getattr(m, node_name), getattr(m, kernel_name)
    out = check_forward(device, node_cls, lambda cb, src: auto(kernel_cls(src.device)).encode(cb, src), [(4, 5, 6)])
    key = node_name[len("MPSNNReduction"):-len("Node")]
    np.testing.assert_allclose(out, TORCH_REDUCE[key](rand((1, 4, 5, 6), 0)).numpy(), rtol=1e-5, atol=1e-6)


def test_reduction_clip_rect_source_and_weight(device):
    clip = m.MTLRegionMake2D(1, 1, 3, 2)

    def make(s):
        n = m.MPSNNReductionFeatureChannelsSumNode(s)
        n.clip_rect_source = clip
        n.weight = 0.5
        return n

    def fn(cb, src):
        k = auto(m.MPSNNReduceFeatureChannelsSum(src.device))
        k.clip_rect_source = clip  # one image per entry: depth 1 covers it
        k.weight = 0.5
        return k.encode(cb, src)
    out = check_forward(device, make, fn, [(4, 5, 3)])
    ref = 0.5 * rand((1, 4, 5, 3), 0)[:, 1:3, 1:4, :].sum(3, keepdim=True)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6)
    # changed on the node after the graph was built: used by the next encode
    x = m.MPSNNImageNode(None)
    node = m.MPSNNReductionRowMaxNode(x)
    graph = f32_graph(device, node)
    src = image(device, rand((1, 3, 4, 2), 1))
    assert graph.run([src]).to_numpy().shape == (1, 3, 1, 2)
    node.clip_rect_source = m.MTLRegion(m.MTLOrigin(0, 1, 0), m.MTLSize(2, 2, 1))
    np.testing.assert_allclose(graph.run([src]).to_numpy(), rand((1, 3, 4, 2), 1)[:, 1:3, 0:2].amax(2, keepdim=True).numpy(), rtol=1e-6)
    # origin.z / depth are not used in a graph: every image of a multi-image source is reduced
    node.clip_rect_source = m.MTLRegion(m.MTLOrigin(1, 0, 1), m.MTLSize(2, 3, 1))
    two = rand((2, 3, 4, 2), 2)
    out = graph.run([image(device, two.numpy())]).to_numpy()
    np.testing.assert_allclose(out, two[:, :, 1:3].amax(2, keepdim=True).numpy(), rtol=1e-6)


def test_reduction_properties_and_errors():
    x = m.MPSNNImageNode(None)
    for node_name, _ in REDUCTIONS:
        cls = getattr(m, node_name)
        n = cls.node_with_source(x)
        assert isinstance(n, m.MPSNNUnaryReductionNode) and type(n) is cls
        assert n.clip_rect_source == m.MPSRectNoClip
        assert n.result_state is None
        with pytest.raises(m.MPSError, match="no gradient"):
            n.gradient_filters_with_sources([m.MPSNNImageNode(None)])
        assert n.training_graph(m.MPSNNImageNode(None)) is None
    s = m.MPSNNReductionFeatureChannelsSumNode(x)
    assert s.weight == 1.0
    s.weight = 2
    assert s.weight == 2.0
    with pytest.raises(m.MPSError, match="MPSNNReductionFeatureChannelsSumNode.*weight"):
        s.weight = "a"
    with pytest.raises(m.MPSError, match="MPSNNReductionRowSumNode.*clip_rect_source"):
        m.MPSNNReductionRowSumNode(x).clip_rect_source = (0, 0, 1, 1)
    with pytest.raises(m.MPSError, match="MPSNNUnaryReductionNode"):
        m.MPSNNUnaryReductionNode(x)


def test_training_stops_at_reduction():
    """A reduction between the loss side and an upsampling: no gradient flows past it."""
    x = m.MPSNNImageNode(None)
    up = m.MPSCNNUpsamplingNearestNode(x, 2, 2)
    red = m.MPSNNReductionRowSumNode(up.result_image)
    up2 = m.MPSCNNUpsamplingNearestNode(red.result_image, 1, 2)
    terminals = up2.training_graph(m.MPSNNImageNode(None))
    assert len(terminals) == 1 and type(terminals[0]) is m.MPSCNNUpsamplingNearestGradientNode
    assert terminals[0].forward_node is up2


# -- concatenation ----------------------------------------------------------------------------------------

def cat_reference(*arrays):
    parts = []
    for a in arrays:
        c = a.shape[-1]
        parts += [a, np.zeros(a.shape[:-1] + (-(-c // 4) * 4 - c,))]
    return np.concatenate(parts, axis=-1)


def test_concatenation_layout_23_plus_5(device):
    a, b = rand((1, 3, 4, 23), 0).numpy(), rand((1, 3, 4, 5), 1).numpy()
    xa, xb = m.MPSNNImageNode("a"), m.MPSNNImageNode("b")
    graph = f32_graph(device, m.MPSNNConcatenationNode([xa, xb]))
    assert graph.source_image_handles == ["a", "b"]
    out = graph.run([image(device, a), image(device, b)]).to_numpy()
    assert out.shape == (1, 3, 4, 32)
    np.testing.assert_array_equal(out[..., 0:23], a.astype(np.float32))
    np.testing.assert_array_equal(out[..., 24:29], b.astype(np.float32))
    assert not out[..., 23].any() and not out[..., 29:32].any()
    np.testing.assert_array_equal(out, cat_reference(a, b).astype(np.float32))


class Lazy:
    """A kernel-side reference computed on the host once the command buffer completed."""

    def __init__(self, fn):
        self.fn = fn

    def to_numpy(self):
        return self.fn()


def test_concatenation_batch_and_intermediates(device):
    """Concatenation of intermediate (temporary) images, one of them twice, batch 1 and 3,
    against the kernels encoded one by one."""
    def make(s0, s1):
        u = m.MPSCNNUpsamplingNearestNode(s0, 2, 2)
        p = m.MPSNNPadNode(s1, C(1, 1, 0), C(1, 1, 2), E.clamp)
        return m.MPSNNConcatenationNode([u.result_image, p.result_image, u.result_image])

    def fn(cb, a, b):
        u = auto(m.MPSCNNUpsamplingNearest(a.device, integer_scale_factor_x=2, integer_scale_factor_y=2)).encode(cb, a)
        k = auto(m.MPSNNPad(b.device, C(1, 1, 0), C(1, 1, 2)))
        k.edge_mode = E.clamp
        p = k.encode(cb, b)
        return Lazy(lambda: cat_reference(u.to_numpy(), p.to_numpy(), u.to_numpy()).astype(np.float32))
    out = check_forward(device, make, fn, [(2, 3, 3), (2, 4, 6)])
    assert out.shape == (1, 4, 6, 4 + 8 + 4)


def test_concatenation_padding_slots_zero_in_recycled_storage(device):
    """The concatenation result is a temporary whose storage was used before (values ~100):
    its padding channels still read 0."""
    a, b = m.MPSNNImageNode("a"), m.MPSNNImageNode("b")
    dirty = m.MPSCNNNeuronLinearNode(a, a=1.0, b=100.0)                  # 1x3x4x32 temporary
    red = m.MPSNNReductionFeatureChannelsMaxNode(dirty.result_image)      # releases it
    cat = m.MPSNNConcatenationNode([b, red.result_image])                # 27 -> 28, +1 -> 32: same size
    final = m.MPSCNNNeuronLinearNode(cat.result_image, a=1.0, b=0.0)
    graph = f32_graph(device, final)
    av, bv = rand((1, 3, 4, 32), 0).numpy(), rand((1, 3, 4, 27), 1).numpy()
    feeds = {"a": image(device, av), "b": image(device, bv)}
    out = graph.run([feeds[h] for h in graph.source_image_handles]).to_numpy()
    ref = cat_reference(bv, (av + 100.0).max(-1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert not out[..., 27].any() and not out[..., 29:].any()


def test_concatenation_gradient_slices_match_autograd(device):
    a, b, c = rand((1, 3, 4, 23), 0), rand((1, 3, 4, 5), 1), rand((1, 3, 4, 2), 2)
    g = rand((1, 3, 4, 36), 3)
    nodes = [m.MPSNNImageNode(h) for h in ("a", "b", "c")]
    gn = m.MPSNNImageNode("g")
    cat = m.MPSNNConcatenationNode(nodes)
    gnodes = cat.gradient_filters_with_sources([gn])
    assert [type(n) for n in gnodes] == [m.MPSNNConcatenationGradientNode] * 3
    assert [n.source_index for n in gnodes] == [0, 1, 2]

    def cat_torch(ts):
        out = []
        for t in ts:
            k = t.shape[-1]
            out += [t, torch.zeros(t.shape[:-1] + (-(-k // 4) * 4 - k,), dtype=t.dtype)]
        return torch.cat(out, -1)
    leaves = [t.clone().requires_grad_(True) for t in (a, b, c)]
    cat_torch(leaves).backward(g)
    feeds = {"a": a, "b": b, "c": c, "g": g}
    for i, gnode in enumerate(gnodes):
        graph = f32_graph(device, gnode)
        out = graph.run([image(device, feeds[h].numpy()) for h in graph.source_image_handles]).to_numpy()
        np.testing.assert_array_equal(out, leaves[i].grad.numpy().astype(np.float32))
    # slices by hand: [0, 23), [24, 29), [32, 34)
    graph = f32_graph(device, gnodes[2])
    out = graph.run([image(device, feeds[h].numpy()) for h in graph.source_image_handles]).to_numpy()
    np.testing.assert_array_equal(out, g.numpy()[..., 32:34].astype(np.float32))


def test_concatenation_in_training_graph(device):
    """x -> [nearest x2, bilinear x2] -> concatenation: the two terminal gradients (one per
    path into the input) sum to the autograd gradient."""
    x, g = rand((1, 3, 3, 3), 8), rand((1, 6, 6, 8), 9)
    xn, gn = m.MPSNNImageNode("x"), m.MPSNNImageNode("g")
    near = m.MPSCNNUpsamplingNearestNode(xn, 2, 2)
    bil = m.MPSCNNUpsamplingBilinearNode(xn, 2, 2)
    cat = m.MPSNNConcatenationNode([near.result_image, bil.result_image])
    seen = []
    terminals = cat.training_graph(gn, lambda gnode, fnode, src, gsrc: seen.append((type(gnode).__name__, fnode)))
    assert sorted(type(t).__name__ for t in terminals) == ["MPSCNNUpsamplingBilinearGradientNode", "MPSCNNUpsamplingNearestGradientNode"]
    assert [s[0] for s in seen].count("MPSNNConcatenationGradientNode") == 2
    graph = m.MPSNNGraph(device, result_images=[t.result_image for t in terminals])
    graph.format = F.float32
    feeds = {"x": image(device, x.numpy()), "g": image(device, g.numpy())}
    cb = device.make_command_queue().make_command_buffer()
    extra = []
    first = graph.encode(cb, [feeds[h] for h in graph.source_image_handles], None, extra)
    cb.commit()
    cb.wait_until_completed()
    total = first.to_numpy() + extra[0].to_numpy()
    ref = autograd(lambda t: torch.cat([nearest_up(t, 2, 2), torch.zeros(1, 6, 6, 1, dtype=t.dtype), bilinear_up(t, 2, 2, False)], -1),
                   x, torch.cat([g[..., 0:3], g[..., 3:4], g[..., 4:7]], -1))
    np.testing.assert_allclose(total, ref, rtol=1e-5, atol=1e-5)


def test_concatenation_properties_and_errors(device):
    a, b = m.MPSNNImageNode("a"), m.MPSNNImageNode("b")
    cat = m.MPSNNConcatenationNode.node_with_sources([a, b])
    assert cat.source_images == [a, b] and isinstance(cat.result_state, m.MPSNNGradientStateNode)
    gn = m.MPSNNImageNode("g")
    with pytest.raises(m.MPSError, match="MPSNNConcatenationNode.*gradient_filter_with_sources"):
        cat.gradient_filter_with_sources([gn])
    with pytest.raises(m.MPSError, match="MPSNNConcatenationNode"):
        cat.gradient_filter_with_source(gn)
    with pytest.raises(m.MPSError, match="MPSNNConcatenationNode"):
        m.MPSNNConcatenationNode([])
    with pytest.raises(m.MPSError, match="MPSNNConcatenationNode"):
        m.MPSNNConcatenationNode(a)
    # the Apple init form of the gradient node finds its source index
    gb = m.MPSNNConcatenationGradientNode(gn, b, cat.result_state)
    assert gb.source_index == 1 and gb.forward_node is cat
    assert m.MPSNNConcatenationGradientNode.node_with_source_gradient(gn, a, cat.result_state).source_index == 0
    with pytest.raises(m.MPSError, match="MPSNNConcatenationGradientNode.*source_image"):
        m.MPSNNConcatenationGradientNode(gn, gn, cat.result_state)
    with pytest.raises(m.MPSError, match="MPSNNConcatenationGradientNode.*gradient_state"):
        m.MPSNNConcatenationGradientNode(gn, a, m.MPSCNNUpsamplingNearestNode(a, 2, 2).result_state)
    with pytest.raises(m.MPSError, match="gradient"):
        gb.gradient_filters_with_sources([gn])
    # a source given twice: the layout repeats it; the Apple init form is ambiguous
    twice = m.MPSNNConcatenationNode([a, a])
    with pytest.raises(m.MPSError, match="MPSNNConcatenationGradientNode.*2 times"):
        m.MPSNNConcatenationGradientNode(gn, a, twice.result_state)
    assert [n.source_index for n in twice.gradient_filters_with_sources([gn])] == [0, 1]
    arr = rand((1, 2, 2, 3), 0).numpy()
    out = f32_graph(device, twice).run([image(device, arr)]).to_numpy()
    np.testing.assert_array_equal(out, cat_reference(arr, arr).astype(np.float32))
    # sizes must agree: the error names the node
    graph = f32_graph(device, cat)
    for shape in ((1, 2, 3, 4), (1, 3, 2, 4), (1, 3, 3, 1)):
        with pytest.raises(m.MPSError, match=r"MPSNNConcatenationNode.*sources\[1\]"):
            graph.run([image(device, rand((1, 2, 2, 4), 0).numpy()), image(device, rand(shape, 1).numpy())])


def test_concatenation_gradient_checks_incoming_gradient(device):
    a, b = m.MPSNNImageNode("a"), m.MPSNNImageNode("b")
    gn = m.MPSNNImageNode("g")
    cat = m.MPSNNConcatenationNode([a, b])
    graph = f32_graph(device, cat.gradient_filters_with_sources([gn])[1])
    feeds = {"a": image(device, rand((1, 2, 2, 5), 0).numpy()), "b": image(device, rand((1, 2, 2, 3), 1).numpy()),
             "g": image(device, rand((1, 2, 2, 10), 2).numpy())}  # needs 8 + 3 channels
    with pytest.raises(m.MPSError, match="MPSNNConcatenationGradientNode.*source_gradient"):
        graph.run([feeds[h] for h in graph.source_image_handles])
