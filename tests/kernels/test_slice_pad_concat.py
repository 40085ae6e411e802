"""MPSNNSlice, MPSNNPad / MPSNNPadGradient and concatenation through
``destination_feature_channel_offset``.

Oracles: the float64 references of ``mpsnn.testing.reference_reshape`` (pad index maps from
``numpy.pad``), the spec's documented examples as exact asserts, and torch.autograd in float64
for the pad gradient (a torch pad built from ``cat``/``flip``, random upstream gradient).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSImageCoordinate as IC
from mpsnn import MPSImageEdgeMode as E
from mpsnn import MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_reshape as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
MODES = [pytest.param(e, id=e.name) for e in E]
F64 = "float64"
#: the pad gradient sums up to a handful of incoming values in float32
GRAD_TOL = {"float32": Tol(1e-5, 2e-6)}


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


# -- shape rules ----------------------------------------------------------------------------------

def test_concatenation_offsets_pad_each_input_to_four_channels() -> None:
    assert m.concatenation_offsets([23, 5, 4]) == [0, 24, 32]
    assert m.concatenation_feature_channels([23, 5, 3]) == 36
    assert m.pad_result_size(5, 4, 3, IC(1, 2, 3), IC(4, 0, 1)) == (10, 6, 7)
    with pytest.raises(m.MPSValueError, match="channels"):
        m.concatenation_offsets([4, 0])


@pytest.mark.parametrize("mode,before,after,expected", [
    (E.zero, 2, 3, [-1, -1, 0, 1, 2, -1, -1, -1]),
    (E.mirrorWithEdge, 2, 3, [1, 0, 0, 1, 2, 2, 1, 0]),
    (E.clamp, 2, 3, [0, 0, 0, 1, 2, 2, 2, 2]),
    (E.mirror, 4, 1, [0, 1, 2, 1, 0, 1, 2, 1]),
])
def test_edge_index_documented_examples(mode, before, after, expected) -> None:
    assert [m.edge_index(i, 3, mode) for i in range(-before, 3 + after)] == expected


# -- slice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("edge", [E.zero, E.clamp])
def test_slice_explicit(device, cb, dtype, edge) -> None:
    img, x = image(rand(1, (2, 4, 5, 6)), device, dtype)
    k = m.MPSNNSlice(device)
    k.offset = m.MPSOffset(2, -1, 0)
    k.clip_rect = region((1, 1, 0), (4, 3, 2))
    k.source_feature_channel_offset = 1        # not a multiple of 4: allowed for slice
    k.edge_mode = edge
    dst, before = poisoned((2, 5, 6, 3), device, dtype=dtype)   # Cs = 3 (destination channels)
    k.encode(cb, img, dst)
    finish(cb)
    expected = before.copy()
    expected[:, 1:4, 1:5, 0:3] = R.slice_(x, 2, -1, 4, 3, 1, 3, edge.name)
    assert_close(values(dst), expected, dtype)


def test_slice_auto_form_and_channel_cap(device, cb) -> None:
    img, x = image(rand(2, (1, 5, 6, 7)), device)
    k = m.MPSNNSlice(device)
    k.offset = m.MPSOffset(1, 2, 0)
    k.source_feature_channel_offset = 2
    k.source_feature_channel_max_count = 3
    out = k.encode(cb, img)
    assert out.shape == (1, 3, 5, 3) and k.offset == m.MPSOffset(1, 2, 0)
    got = values(out)
    finish(cb)
    assert_close(got, x[:, 2:5, 1:6, 2:5], "float32")


def test_error_slice_mirror_edge(device, cb) -> None:
    img, _ = image(rand(1, (1, 3, 3, 2)), device)
    k = m.MPSNNSlice(device)
    k.edge_mode = E.mirror
    with pytest.raises(m.MPSValueError, match="MPSNNSlice: `edge_mode`"):
        k.encode(cb, img)
    with pytest.raises(m.MPSValueError, match="source_feature_channel_offset"):
        k.source_feature_channel_offset = -1


# -- pad forward ----------------------------------------------------------------------------------

def _pad(device, before, after, mode, **kw) -> m.MPSNNPad:
    k = m.MPSNNPad(device, padding_size_before=IC(*before), padding_size_after=IC(*after), **kw)
    k.edge_mode = mode
    return k


@pytest.mark.parametrize("mode,axis,before,after,expected", [
    (E.zero, "c", 2, 3, [0, 0, 1, 2, 3, 0, 0, 0]),
    (E.mirrorWithEdge, "c", 2, 3, [2, 1, 1, 2, 3, 3, 2, 1]),
    (E.clamp, "x", 2, 3, [1, 1, 1, 2, 3, 3, 3, 3]),
    (E.mirror, "x", 4, 1, [1, 2, 3, 2, 1, 2, 3, 2]),
])
def test_pad_documented_examples(device, cb, mode, axis, before, after, expected) -> None:
    shape = (1, 1, 1, 3) if axis == "c" else (1, 1, 3, 1)
    img, _ = image(np.array([1.0, 2.0, 3.0]).reshape(shape), device)
    b, a = ((0, 0, before), (0, 0, after)) if axis == "c" else ((before, 0, 0), (after, 0, 0))
    out = _pad(device, b, a, mode).encode(cb, img)
    got = values(out).reshape(-1).tolist()
    finish(cb)
    assert got == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("before,after", [((2, 1, 1), (1, 3, 2)), ((7, 0, 5), (0, 6, 4))], ids=["small", "multi_period"])
def test_pad_auto_form(device, cb, dtype, mode, before, after) -> None:
    img, x = image(rand(3, (2, 3, 4, 6)), device, dtype)
    k = _pad(device, before, after, mode)
    k.fill_value = 0.75
    k.source_feature_channel_offset = 1
    k.source_feature_channel_max_count = 3
    out = k.encode(cb, img)
    assert k.offset == m.MPSOffset(-before[0], -before[1], 0)
    w, h, c = m.pad_result_size(4, 3, 3, IC(*before), IC(*after))
    assert out.shape == (2, h, w, c)
    got = values(out)
    finish(cb)
    exp = R.pad(x, (-before[0], -before[1]), (w, h), 1, 3, before[2], after[2], mode.name, fill=np.float32(0.75))
    assert_close(got, exp, dtype)


def test_pad_constant_fill_array_and_properties(device, cb) -> None:
    fills = np.arange(1, 8, dtype=np.float32) * 10
    k = _pad(device, (1, 1, 2), (1, 0, 2), E.constant, fill_value_array=fills)
    assert k.fill_value == 0.0 and k.fill_value_array == fills.tobytes()
    k.fill_value = -3.0      # ignored: the array wins
    img, x = image(rand(4, (1, 2, 3, 3)), device)
    out = k.encode(cb, img)
    got = values(out)
    finish(cb)
    assert_close(got, R.pad(x, (-1, -1), (5, 3), 0, 3, 2, 2, "constant", fill=fills), "float32")
    assert got[0, 0, 0].tolist() == fills.tolist()


def test_pad_explicit_destination_offset_clip_and_channel_offset(device, cb) -> None:
    img, x = image(rand(5, (2, 3, 4, 5)), device)
    k = _pad(device, (9, 9, 1), (9, 9, 2), E.mirrorWithEdge)   # spatial sizes unused here
    k.offset = m.MPSOffset(-2, 1, 0)
    k.clip_rect = region((1, 0, 0), (5, 4, 2))
    k.destination_feature_channel_offset = 4
    k.source_feature_channel_offset = 2
    dst, before = poisoned((2, 5, 7, 12), device)     # writes channels 4 .. 4+1+3+2
    k.encode(cb, img, dst)
    finish(cb)
    expected = before.copy()
    expected[:, 0:4, 1:6, 4:10] = R.pad(x, (-2, 1), (5, 4), 2, 3, 1, 2, "mirrorWithEdge")
    assert_close(values(dst), expected, "float32")


def test_pad_encode_batch(device, cb) -> None:
    imgs = [image(rand(40 + i, (1, 2, 3, 2)), device) for i in range(2)]
    k = _pad(device, (1, 2, 0), (2, 0, 1), E.clamp)
    outs = k.encode_batch(cb, [i for i, _ in imgs])
    got = [values(o) for o in outs]
    finish(cb)
    for (_, x), g in zip(imgs, got):
        assert_close(g, R.pad(x, (-1, -2), (6, 4), 0, 2, 0, 1, "clamp"), "float32")


# -- pad gradient -----------------------------------------------------------------------------------

def _torch_pad_axis(t: torch.Tensor, dim: int, before: int, after: int, mode: E) -> torch.Tensor:
    """Single-reflection pad along ``dim`` with torch ops (before/after < extent)."""
    n = t.shape[dim]
    if mode in (E.zero, E.constant):
        shape = list(t.shape)
        parts = []
        for k in (before, after):
            shape[dim] = k
            parts.append(t.new_zeros(shape))
        return torch.cat([parts[0], t, parts[1]], dim)
    if mode == E.clamp:
        left = t.narrow(dim, 0, 1).repeat_interleave(before, dim)
        right = t.narrow(dim, n - 1, 1).repeat_interleave(after, dim)
    elif mode == E.mirror:
        left = t.narrow(dim, 1, before).flip(dim)
        right = t.narrow(dim, n - 1 - after, after).flip(dim)
    else:
        left = t.narrow(dim, 0, before).flip(dim)
        right = t.narrow(dim, n - after, after).flip(dim)
    return torch.cat([left, t, right], dim)


def autograd_pad_gradient(x: np.ndarray, upstream: np.ndarray, before, after, mode: E, c0: int, nc: int) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = xt[..., c0:c0 + nc]
    for dim, b, a in ((1, before[1], after[1]), (2, before[0], after[0]), (3, before[2], after[2])):
        y = _torch_pad_axis(y, dim, b, a, mode)
    (y * torch.tensor(upstream)).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_gradient_reference_and_autograd(device, cb, mode, dtype) -> None:
    before, after = (2, 1, 1), (1, 2, 2)
    img, x = image(rand(6, (2, 4, 5, 7)), device, dtype)
    k = _pad(device, before, after, mode)
    k.fill_value = 3.0
    k.source_feature_channel_offset = 2
    k.source_feature_channel_max_count = 4
    y, state = k.encode(cb, img, destination_state_is_temporary=True)
    dy, dyv = image(rand(7, y.shape), device, dtype)
    dx = m.MPSNNPadGradient(device).encode(cb, dy, img, state)
    got = values(dx)
    finish(cb)
    ref = R.pad_gradient(dyv, x.shape, (-2, -1), 2, 4, 1, 2, mode.name)
    assert_close(ref, autograd_pad_gradient(x, dyv, before, after, mode, 2, 4), F64)
    assert_close(got, ref, dtype, overrides=GRAD_TOL)
    assert not got[..., :2].any() and not got[..., 6:].any()   # channels the forward did not read


@pytest.mark.parametrize("mode,before,after,expected", [
    (E.clamp, 2, 3, [1 + 2 + 4, 8, 16 + 32 + 64 + 128]),
    (E.mirror, 4, 1, [1 + 16, 2 + 8 + 32 + 128, 4 + 64]),
])
def test_pad_gradient_documented_examples(device, cb, mode, before, after, expected) -> None:
    img, _ = image(np.zeros((1, 1, 3, 1)), device)
    k = _pad(device, (before, 0, 0), (after, 0, 0), mode)
    y, state = k.encode(cb, img, destination_state_is_temporary=False)
    dy, _ = image((2.0 ** np.arange(8)).reshape(1, 1, 8, 1), device)
    dx = m.MPSNNPadGradient(device).encode(cb, dy, img, state)
    got = values(dx).reshape(-1).tolist()
    finish(cb)
    assert got == expected


def test_pad_gradient_explicit_forward_and_destination(device, cb) -> None:
    img, x = image(rand(8, (1, 3, 4, 3)), device)
    k = _pad(device, (0, 0, 2), (0, 0, 1), E.mirror)
    k.offset = m.MPSOffset(-3, 1, 0)
    k.clip_rect = region((1, 1, 0), (6, 3, 1))
    k.destination_feature_channel_offset = 4
    fwd = m.MPSImage(device, image_descriptor=m.MPSImageDescriptor(width=8, height=5, feature_channels=12))
    state = k.result_state(img, destination_image=fwd)
    k.encode(cb, img, fwd, destination_state=state)
    g, gv = image(rand(9, (1, 5, 8, 12)), device)
    dst, _ = poisoned((1, 3, 4, 3), device)
    m.MPSNNPadGradient(device).encode(cb, g, img, state, dst)
    finish(cb)
    ref = R.pad_gradient(gv[:, 1:4, 1:7, 4:10], x.shape, (-3, 1), 0, 3, 2, 1, "mirror")
    assert_close(values(dst), ref, "float32", overrides=GRAD_TOL)


def test_error_pad_gradient_needs_pad_state(device, cb) -> None:
    img, _ = image(rand(1, (1, 2, 2, 1)), device)
    with pytest.raises(m.MPSValueError, match="MPSNNPadGradient: `gradient_state`"):
        m.MPSNNPadGradient(device).encode(cb, img, img, None)
    _, relu_state = m.MPSCNNNeuronReLU(device).encode(cb, img, destination_state_is_temporary=False)
    with pytest.raises(m.MPSValueError, match="state of an MPSNNPad encode"):
        m.MPSNNPadGradient(device).encode(cb, img, img, relu_state)


def test_error_pad_arguments(device, cb) -> None:
    with pytest.raises(m.MPSTypeError, match="padding_size_before"):
        m.MPSNNPad(device, padding_size_before=(1, 1, 0))
    with pytest.raises(m.MPSValueError, match=r"padding_size_after.x"):
        m.MPSNNPad(device, padding_size_after=IC(-1, 0, 0))
    k = _pad(device, (0, 0, 1), (0, 0, 1), E.constant, fill_value_array=[1.0, 2.0])
    img, _ = image(rand(1, (1, 2, 2, 3)), device)
    with pytest.raises(m.MPSValueError, match=r"fill_value_array.*one fill value per channel written \(5\)"):
        k.encode(cb, img)
    with pytest.raises(m.MPSValueError, match="fill_value"):
        k.fill_value = "x"


# -- concatenation ----------------------------------------------------------------------------------

def test_concatenation_through_destination_channel_offsets(device, cb) -> None:
    a, av = image(rand(10, (2, 3, 4, 5)), device)
    b, bv = image(rand(11, (2, 3, 4, 3)), device)
    c, cv = image(rand(12, (2, 3, 4, 6)), device)
    offs = m.concatenation_offsets([5, 3, 1])
    assert offs == [0, 8, 12]
    cat, before = poisoned((2, 3, 4, m.concatenation_feature_channels([5, 3, 1])), device)
    relu = m.MPSCNNNeuronReLU(device)
    relu.destination_feature_channel_offset = offs[0]
    relu.encode(cb, a, cat)
    sl = m.MPSNNSlice(device)
    sl.destination_feature_channel_offset = offs[1]
    sl.encode(cb, b, cat)
    mean = m.MPSNNReduceFeatureChannelsMean(device)
    mean.destination_feature_channel_offset = offs[2]
    mean.encode(cb, c, cat)
    finish(cb)
    got = values(cat)
    expected = before.copy()
    expected[..., 0:5] = np.maximum(av, 0.0)
    expected[..., 8:11] = bv
    expected[..., 12:13] = cv.mean(axis=3, keepdims=True)
    assert_close(got, expected, "float32")
    assert np.isnan(got[..., 5:8]).all() and np.isnan(got[..., 11]).all()   # padding slots untouched


def test_concatenation_gradient_is_a_channel_slice(device, cb) -> None:
    channels = [5, 3]
    offs = m.concatenation_offsets(channels)
    g, gv = image(rand(13, (2, 3, 4, m.concatenation_feature_channels(channels))), device)
    outs = []
    for o, ci in zip(offs, channels):
        k = m.MPSNNSlice(device)
        k.source_feature_channel_offset = o
        k.source_feature_channel_max_count = ci
        outs.append(k.encode(cb, g))
    got = [values(o) for o in outs]
    finish(cb)
    for o, ci, v in zip(offs, channels, got):
        assert_close(v, gv[..., o:o + ci], "float32")


@pytest.mark.parametrize("kind", ["slice", "pad"])
def test_results_never_alias_the_source(device, cb, kind) -> None:
    img, x = image(rand(14, (1, 3, 4, 5)), device)
    k = m.MPSNNSlice(device) if kind == "slice" else m.MPSNNPad(device)
    k.destination_image_allocator = m.MPSImage.default_allocator
    out = k.encode(cb, img)
    finish(cb)
    img.tensor.fill_(5.0)
    assert_close(values(out), x, "float32")
