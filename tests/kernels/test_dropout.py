"""MPSCNNDropout / MPSCNNDropoutGradient / MPSCNNDropoutGradientState.

The generator is not Apple's (the spec asks only for the distribution), so the oracles are:

1. the *documented* mask recipe (``mpsnn.testing.reference_dropout.documented_mask``: torch
   generator seeded per encode, per-entry seeds in batches, stride broadcast) rebuilt here and
   compared bit for bit with the state's mask and ``mask_data``;
2. the spec's formulas in float64 (``out = m * in / keep``, ``dIn = m * g / keep``) with that
   mask, through the coordinate references (offsets, clip rects, channel windows, edge modes);
3. ``torch.autograd`` in float64 on ``x * m / keep`` with a random upstream gradient;
4. statistics: the kept fraction, independence along stride-1 axes, broadcast along stride-0 axes.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSImage, MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.backends import dropout as backend
from mpsnn.testing import reference as ref
from mpsnn.testing import reference_dropout as dref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.reference_softmax import destination_aligned_gradient_reference
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 7)
POISON = 1234.0
STATS_SIGMAS = 5.0            # kept fraction within this many binomial standard deviations
ALL = MTLSize(1, 1, 1)
STRIDES = [(1, 1, 1), (1, 1, 0), (0, 0, 1), (0, 0, 0), (1, 0, 1), (0, 1, 0)]


def random(seed: int, shape: tuple[int, ...], lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def dropout(device, keep: float = 0.5, seed: int = 7, stride: Any = ALL) -> mpsnn.MPSCNNDropout:
    return mpsnn.MPSCNNDropout(device, keep_probability=keep, seed=seed, mask_stride_in_pixels=stride)


def dropout_gradient(device, keep: float = 0.5, seed: int = 7, stride: Any = ALL) -> mpsnn.MPSCNNDropoutGradient:
    return mpsnn.MPSCNNDropoutGradient(device, keep_probability=keep, seed=seed, mask_stride_in_pixels=stride)


def run_forward(device, cb, k: mpsnn.MPSCNNDropout, x_img: MPSImage, dtype: torch.dtype = torch.float32):
    dst = poisoned(x_img.shape, device, dtype=dtype)[0]
    state = k.result_state(x_img, destination_image=dst)
    k.encode(cb, x_img, dst, destination_state=state)
    return dst, state


def state_mask(state: mpsnn.MPSCNNDropoutGradientState) -> np.ndarray:
    return state.mask.double().cpu().numpy()


# -- construction and properties ---------------------------------------------------------------------------


def test_public_names() -> None:
    for name in ("MPSCNNDropout", "MPSCNNDropoutGradient", "MPSCNNDropoutGradientState"):
        assert name in mpsnn.__all__ and isinstance(getattr(mpsnn, name), type)
    assert issubclass(mpsnn.MPSCNNDropout, mpsnn.MPSCNNKernel)
    assert issubclass(mpsnn.MPSCNNDropoutGradient, mpsnn.MPSCNNGradientKernel)
    assert issubclass(mpsnn.MPSCNNDropoutGradientState, mpsnn.MPSNNGradientState)


@pytest.mark.parametrize("cls", [mpsnn.MPSCNNDropout, mpsnn.MPSCNNDropoutGradient])
def test_properties(device, cls) -> None:
    k = cls(device, keep_probability=0.3, seed=2**64 - 1, mask_stride_in_pixels=(1, 1, 0))
    assert k.keep_probability == float(np.float32(0.3))           # Apple's float
    assert k.seed == 2**64 - 1
    assert k.mask_stride_in_pixels == MTLSize(1, 1, 0)
    for name in ("keep_probability", "seed", "mask_stride_in_pixels"):
        with pytest.raises(AttributeError):
            setattr(k, name, getattr(k, name))                      # read-only
    copy = k.copy()
    assert (copy.keep_probability, copy.seed, copy.mask_stride_in_pixels) == (k.keep_probability, k.seed, k.mask_stride_in_pixels)


@pytest.mark.parametrize("cls", [mpsnn.MPSCNNDropout, mpsnn.MPSCNNDropoutGradient])
def test_error_no_defaults(device, cls) -> None:
    with pytest.raises(mpsnn.MPSTypeError, match=rf"{cls.__name__}: `keep_probability`, `seed`, `mask_stride_in_pixels` required"):
        cls(device)
    with pytest.raises(mpsnn.MPSTypeError, match=r"`mask_stride_in_pixels` required"):
        cls(device, keep_probability=0.5, seed=1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), "half", True, 1e-50])
def test_error_keep_probability(device, bad) -> None:
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNDropout: `keep_probability`"):
        dropout(device, keep=bad)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "7", None])
def test_error_seed(device, bad) -> None:
    err = mpsnn.MPSTypeError if bad is None else mpsnn.MPSValueError
    with pytest.raises(err, match=r"MPSCNNDropoutGradient: `seed`"):
        dropout_gradient(device, seed=bad)


@pytest.mark.parametrize("bad", [(2, 1, 1), (1, -1, 1), (True, 1, 1), (1.0, 1, 1), MTLSize(1, 1, 2)])
def test_error_mask_stride_values(device, bad) -> None:
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNDropout: `mask_stride_in_pixels`.*0 \(broadcast\) or 1"):
        dropout(device, stride=bad)


@pytest.mark.parametrize("bad", [(1, 1), "111", 1, MPSOffset(1, 1, 1)])
def test_error_mask_stride_type(device, bad) -> None:
    with pytest.raises(mpsnn.MPSTypeError, match=r"MPSCNNDropout: `mask_stride_in_pixels` must be an MTLSize"):
        dropout(device, stride=bad)


# -- the mask ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", STRIDES, ids=lambda s: "stride" + "".join(map(str, s)))
def test_mask_follows_the_documented_recipe(device, cb, stride) -> None:
    x_img, x = image(random(1, SHAPE), device)
    k = dropout(device, keep=0.6, seed=12345, stride=MTLSize(*stride))
    y, state = run_forward(device, cb, k, x_img)
    finish(cb)
    expected = dref.documented_mask(SHAPE, 0.6, 12345, stride, device.torch_device)
    m = state_mask(state)
    assert np.array_equal(m, expected)
    assert state.mask_seed == 12345 and state.seed == 12345
    assert_close(values(y), dref.dropout_forward(x, expected, 0.6), torch.float32)


@pytest.mark.parametrize("stride", STRIDES, ids=lambda s: "stride" + "".join(map(str, s)))
def test_mask_broadcasts_along_stride_zero_axes(device, cb, stride) -> None:
    """Stride 0: one decision shared along that axis; stride 1: independent decisions (seen
    as variation along the axis, near certain for these sizes at keep 0.5)."""
    shape = (3, 8, 9, 10)
    x_img, _ = image(np.ones(shape), device)
    _, state = run_forward(device, cb, dropout(device, 0.5, 99, stride), x_img)
    finish(cb)
    m = state_mask(state)
    sx, sy, sz = stride
    for axis, s in ((2, sx), (1, sy), (3, sz)):
        constant = (m == np.take(m, [0], axis=axis)).all()
        assert constant == (s == 0), f"axis {axis} stride {s}"
    assert not (m == m[:1]).all(), "images of one MPSImage get independent masks"


def test_same_seed_same_mask_different_seed_different_mask(device, cb) -> None:
    x_img, _ = image(random(2, SHAPE), device)
    k = dropout(device, 0.5, 42)
    y1, s1 = run_forward(device, cb, k, x_img)
    y2, s2 = run_forward(device, cb, k, x_img)                            # the same kernel again
    y3, s3 = run_forward(device, cb, dropout(device, 0.5, 42), x_img)    # a new kernel, same seed
    y4, s4 = run_forward(device, cb, dropout(device, 0.5, 43), x_img)
    finish(cb)
    assert np.array_equal(values(y1), values(y2)) and np.array_equal(values(y1), values(y3))
    assert s1.mask_data == s2.mask_data == s3.mask_data
    assert s1.mask_data != s4.mask_data


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_kept_fraction(device, cb, keep) -> None:
    shape = (2, 16, 16, 16)
    x_img, _ = image(np.ones(shape), device)
    y, state = run_forward(device, cb, dropout(device, keep, 2024), x_img)
    finish(cb)
    n = math.prod(shape)
    kept = state_mask(state).sum()
    sigma = math.sqrt(n * keep * (1 - keep))
    assert abs(kept - n * keep) < STATS_SIGMAS * sigma, f"{kept} of {n} kept at keep={keep}"
    keep32 = float(np.float32(keep))
    got = values(y)
    assert set(np.unique(got)) <= {0.0, float(np.float32(1.0 / keep32))}, "kept ones scale by 1/keep"
    assert_close(got.mean(), 1.0, torch.float32, {torch.float32: Tol(0.0, STATS_SIGMAS * sigma / n / keep)})


def test_mask_data_layout(device, cb) -> None:
    shape = (2, 3, 4, 5)
    x_img, _ = image(random(3, shape), device)
    _, state = run_forward(device, cb, dropout(device, 0.5, 5, (1, 1, 0)), x_img)
    finish(cb)
    data = state.mask_data
    assert isinstance(data, bytes) and len(data) == math.prod(shape)
    raw = np.frombuffer(data, np.uint8)
    assert set(np.unique(raw)) <= {0, 1}
    m = state_mask(state)
    assert np.array_equal(raw.reshape(2, 5, 3, 4), m.transpose(0, 3, 1, 2))   # [N][C][H][W]
    assert np.array_equal(dref.mask_from_data(data, shape), m)


def test_exact_values_and_ieee_semantics(device, cb) -> None:
    """keep = 0.25: kept values are exactly 4 * x; dropped are exactly 0; a dropped inf/NaN
    gives NaN (0 * inf), a kept inf stays inf."""
    shape = (1, 4, 4, 4)
    x = random(4, shape)
    x_img, xr = image(x, device)
    y, state = run_forward(device, cb, dropout(device, 0.25, 8), x_img)
    finish(cb)
    m = state_mask(state)
    assert np.array_equal(values(y), np.where(m == 1, 4.0 * xr, 0.0))
    special = x.copy()
    special[0, 0, :, 0] = np.inf
    special[0, 1, :, 0] = np.nan
    s_img, sr = image(special, device)
    cb2 = device.make_command_queue().make_command_buffer()
    y2, _ = run_forward(device, cb2, dropout(device, 0.25, 8), s_img)
    finish(cb2)
    got = values(y2)
    expected = dref.dropout_forward(sr, m, 0.25)
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got[0, 0, m[0, 0, :, 0] == 0, 0]).all()
    assert_close(got, expected, torch.float32)


# -- forward numerics and geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_forward_matches_reference(device, cb, dtype) -> None:
    x_img, x = image(random(5, SHAPE), device, dtype)
    y, state = run_forward(device, cb, dropout(device, 0.7, 3), x_img, dtype)
    finish(cb)
    assert_close(values(y), dref.dropout_forward(x, state_mask(state), 0.7), dtype)


GEOMETRIES = [
    # (id, src, dst, offset, clip, src_c_off, src_c_max, dst_c_off, edge)
    ("neg_offset_zero", (1, 4, 5, 3), (1, 4, 5, 3), (-2, -1, 0), None, 0, None, 0, MPSImageEdgeMode.zero),
    ("neg_offset_clamp", (1, 4, 5, 3), (1, 4, 5, 3), (-2, -1, 0), None, 0, None, 0, MPSImageEdgeMode.clamp),
    ("clip_and_offset", (1, 5, 6, 3), (1, 4, 7, 3), (-1, 2, 0), ((2, 1, 0), (6, 9, 1)), 0, None, 0, MPSImageEdgeMode.clamp),
    ("channel_windows", (2, 3, 4, 11), (2, 3, 4, 12), (0, 0, 0), None, 4, 5, 4, MPSImageEdgeMode.zero),
    ("batch_offset_z", (3, 2, 3, 5), (2, 2, 3, 5), (0, 0, 1), None, 0, None, 0, MPSImageEdgeMode.zero),
]


@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 0, 0)], ids=["stride111", "stride100"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_forward_geometry(device, cb, geom, stride) -> None:
    gid, src, dst_shape, offset, clip, c_off, c_max, d_off, edge = geom
    x_img, x = image(random(sum(map(ord, gid)), src, 0.5, 2.0), device)   # positive: dropped != off-image 0 * x
    dst, before = poisoned(dst_shape, device, POISON)
    k = dropout(device, 0.5, 11, stride)
    k.offset = MPSOffset(*offset)
    if clip is not None:
        k.clip_rect = region(*clip)
    k.source_feature_channel_offset = c_off
    if c_max is not None:
        k.source_feature_channel_max_count = c_max
    k.destination_feature_channel_offset = d_off
    k.edge_mode = edge
    state = k.result_state(x_img, destination_image=dst)
    k.encode(cb, x_img, dst, destination_state=state)
    finish(cb)
    m = state_mask(state)
    expected_mask = dref.documented_mask(m.shape, 0.5, 11, stride, device.torch_device)
    assert np.array_equal(m, expected_mask), "the mask covers the written block"
    expected = ref.unary_kernel_reference(x, before, offset=offset, clip_rect=clip, src_c_off=c_off, src_c_max=c_max,
                                          dst_c_off=d_off, edge_mode=edge, fn=lambda v: dref.dropout_forward(v, m, 0.5))
    assert_close(values(dst), expected, torch.float32, msg=gid)


# -- encode forms ---------------------------------------------------------------------------------------------------


def test_encode_batch_uses_one_derived_seed_per_entry(device, cb) -> None:
    xs = [image(random(20 + i, (1, 3, 4, 6)), device) for i in range(3)]
    k = dropout(device, 0.5, 1000)
    k.destination_image_allocator = MPSImage.default_allocator
    ys, states = k.encode_batch(cb, [x for x, _ in xs], destination_state_is_temporary=False)
    explicit = [poisoned((1, 3, 4, 6), device)[0] for _ in range(3)]
    ex_states = k.result_state_batch([x for x, _ in xs])
    k.encode_batch(cb, [x for x, _ in xs], explicit, destination_states=ex_states)
    single = poisoned((1, 3, 4, 6), device)[0]
    k.encode(cb, xs[0][0], single)
    finish(cb)
    masks = []
    for i, (_, x) in enumerate(xs):
        seed_i = dref.batch_entry_seed(1000, i)
        m = dref.documented_mask((1, 3, 4, 6), 0.5, seed_i, (1, 1, 1), device.torch_device)
        masks.append(m)
        assert states[i].mask_seed == ex_states[i].mask_seed == seed_i and states[i].seed == 1000
        assert np.array_equal(state_mask(states[i]), m) and np.array_equal(state_mask(ex_states[i]), m)
        assert_close(values(ys[i]), dref.dropout_forward(x, m, 0.5), torch.float32)
        assert_close(values(explicit[i]), dref.dropout_forward(x, m, 0.5), torch.float32)
    assert dref.batch_entry_seed(1000, 0) == 1000
    assert_close(values(single), values(ys[0]), torch.float32, msg="entry 0 == a plain encode")
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


@pytest.mark.parametrize("temporary", [True, False], ids=["temporary", "regular"])
def test_auto_encode_with_state_and_gradient(device, cb, temporary) -> None:
    x_img, x = image(random(30, SHAPE), device)
    dy_img, dy = image(random(31, SHAPE), device)
    k = dropout(device, 0.4, 5, (0, 1, 1))
    y, state = k.encode(cb, x_img, destination_state_is_temporary=temporary)
    assert isinstance(state, mpsnn.MPSCNNDropoutGradientState) and state.is_temporary is temporary
    m = state_mask(state)
    out = poisoned(SHAPE, device)[0]
    mpsnn.MPSCNNNeuron(device, neuron_descriptor=mpsnn.MPSNNNeuronDescriptor.cnn_neuron_descriptor(mpsnn.MPSCNNNeuronType.none)).encode(cb, y, out)
    g = dropout_gradient(device, 0.4, 5, (0, 1, 1))
    g.destination_image_allocator = MPSImage.default_allocator
    dx = g.encode(cb, dy_img, x_img, state)
    if temporary:
        assert state.read_count == 0
        with pytest.raises(mpsnn.MPSStateError, match="MPSCNNDropoutGradient"):
            g.encode(cb, dy_img, x_img, state)
        with pytest.raises(mpsnn.MPSStateError, match="released"):
            _ = state.mask_data
    finish(cb)
    assert dx.shape == SHAPE
    assert_close(values(out), dref.dropout_forward(x, m, 0.4), torch.float32)
    assert_close(values(dx), dref.dropout_gradient(dy, m, 0.4), torch.float32)


# -- gradient ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gradient_matches_reference(device, cb, dtype) -> None:
    x_img, _ = image(random(40, SHAPE), device, dtype)
    dy_img, dy = image(random(41, SHAPE), device, dtype)
    _, state = run_forward(device, cb, dropout(device, 0.6, 77, (1, 1, 0)), x_img, dtype)
    dx = poisoned(SHAPE, device, dtype=dtype)[0]
    dropout_gradient(device, 0.6, 77, (1, 1, 0)).encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    assert_close(values(dx), dref.dropout_gradient(dy, state_mask(state), 0.6), dtype)


def test_gradient_matches_autograd(device, cb) -> None:
    x_img, x = image(random(42, SHAPE), device)
    dy_img, dy = image(np.random.default_rng(43).normal(size=SHAPE), device)
    y, state = run_forward(device, cb, dropout(device, 0.3, 9), x_img)
    dx = poisoned(SHAPE, device)[0]
    dropout_gradient(device, 0.3, 9).encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    m = torch.from_numpy(state_mask(state))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = xt * m / float(np.float32(0.3))
    assert_close(values(y), yt.detach(), torch.float32, msg="forward == x * m / keep")
    (expected,) = torch.autograd.grad(yt, xt, grad_outputs=torch.from_numpy(dy))
    assert_close(values(dx), expected, torch.float32)


GRAD_GEOMETRIES = [
    ("plain", (2, 3, 4, 5), (2, 3, 4, 5), (0, 0, 0), None, 0, None, 0),
    ("neg_offset", (1, 4, 5, 3), (1, 4, 5, 3), (-1, -2, 0), None, 0, None, 0),
    ("pos_offset_smaller_dest", (1, 5, 6, 3), (1, 3, 4, 3), (1, 2, 0), None, 0, None, 0),
    ("clip_and_offset", (1, 4, 5, 3), (1, 3, 6, 3), (-1, 1, 0), ((1, 0, 0), (3, 2, 1)), 0, None, 0),
    ("channel_windows", (1, 3, 4, 11), (1, 3, 4, 12), (0, 0, 0), None, 4, 5, 4),
    ("batch3_clip", (3, 2, 3, 3), (3, 2, 3, 3), (1, 0, 0), ((0, 1, 0), (9, 9, 3)), 0, None, 0),
]


@pytest.mark.parametrize("form", ["explicit", "auto"])
@pytest.mark.parametrize("geom", GRAD_GEOMETRIES, ids=[g[0] for g in GRAD_GEOMETRIES])
def test_gradient_through_forward_geometry(device, cb, geom, form) -> None:
    gid, src, dst_shape, offset, clip, c_off, c_max, d_off = geom
    seed = sum(map(ord, gid))
    x_img, _ = image(random(seed, src), device)
    dy_img, dy = image(random(seed + 1, dst_shape), device)
    y, _ = poisoned(dst_shape, device)
    stride = (1, 0, 1)
    k = dropout(device, 0.5, seed, stride)
    k.offset = MPSOffset(*offset)
    if clip is not None:
        k.clip_rect = region(*clip)
    k.source_feature_channel_offset = c_off
    if c_max is not None:
        k.source_feature_channel_max_count = c_max
    k.destination_feature_channel_offset = d_off
    state = k.result_state(x_img, destination_image=y)
    k.encode(cb, x_img, y, destination_state=state)
    g = dropout_gradient(device, 0.5, seed, stride)
    if form == "explicit":
        dx, before = poisoned(src, device, POISON)
        g.encode(cb, dy_img, x_img, state, dx)
    else:
        g.destination_image_allocator = MPSImage.default_allocator
        dx = g.encode(cb, dy_img, x_img, state)
        assert dx.shape == src
        before = np.zeros(src)
    finish(cb)
    # the mask in the forward destination's coordinates: the block starts at clip_rect.origin
    block = state_mask(state)
    (cx, cy, _), _ = ((0, 0, 0), None) if clip is None else clip
    mask_img = np.zeros(dst_shape)
    n, h, w, c = block.shape
    mask_img[:n, cy:cy + h, cx:cx + w, d_off:d_off + c] = block
    expected = destination_aligned_gradient_reference(
        dy, mask_img, src, before, offset=offset, clip_rect=clip, src_c_off=c_off, src_c_max=c_max, dst_c_off=d_off,
        fn=lambda gg, mm: dref.dropout_gradient(gg, mm, 0.5))
    assert_close(values(dx), expected, torch.float32, msg=gid)


def test_gradient_batch(device, cb) -> None:
    xs = [image(random(50 + i, (1, 2, 3, 4)), device) for i in range(2)]
    dys = [image(random(60 + i, (1, 2, 3, 4)), device) for i in range(2)]
    k = dropout(device, 0.5, 3)
    k.destination_image_allocator = MPSImage.default_allocator
    _, states = k.encode_batch(cb, [x for x, _ in xs], destination_state_is_temporary=False)
    g = dropout_gradient(device, 0.5, 3)
    g.destination_image_allocator = MPSImage.default_allocator
    dxs = g.encode_batch(cb, [d for d, _ in dys], [x for x, _ in xs], states)
    one_by_one = [g.encode(cb, d, x, s) for (d, _), (x, _), s in zip(dys, xs, states)]
    finish(cb)
    for i, (_, dy) in enumerate(dys):
        expected = dref.dropout_gradient(dy, state_mask(states[i]), 0.5)
        assert_close(values(dxs[i]), expected, torch.float32)
        assert_close(values(one_by_one[i]), expected, torch.float32)


# -- gradient errors ----------------------------------------------------------------------------------------------------


def test_error_gradient_needs_a_dropout_state(device, cb) -> None:
    x_img, _ = image(random(70, (1, 2, 2, 3)), device)
    dx = poisoned((1, 2, 2, 3), device)[0]
    g = dropout_gradient(device)
    with pytest.raises(mpsnn.MPSTypeError, match=r"MPSCNNDropoutGradient: `gradient_state` must be the MPSCNNDropoutGradientState.*NoneType"):
        g.encode(cb, x_img, x_img, None, dx)
    neuron = mpsnn.MPSCNNNeuronReLU(device)
    _, other = neuron.encode(cb, x_img, destination_state_is_temporary=False)
    with pytest.raises(mpsnn.MPSTypeError, match=r"`gradient_state` must be the MPSCNNDropoutGradientState.*MPSNNGradientState"):
        g.encode(cb, x_img, x_img, other, dx)
    with pytest.raises(mpsnn.MPSTypeError, match=r"`gradient_states` are required"):
        g.encode_batch(cb, [x_img], [x_img], None)


@pytest.mark.parametrize("params", [(0.25, 7, ALL), (0.5, 8, ALL), (0.5, 7, MTLSize(1, 1, 0))], ids=["keep", "seed", "stride"])
def test_error_gradient_parameters_must_match_forward(device, cb, params) -> None:
    x_img, _ = image(random(71, (1, 2, 2, 3)), device)
    _, state = run_forward(device, cb, dropout(device, 0.5, 7), x_img)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNDropoutGradient: `gradient_state`.*must come from a forward MPSCNNDropout"):
        dropout_gradient(device, *params).encode(cb, x_img, x_img, state, poisoned((1, 2, 2, 3), device)[0])


def test_error_state_before_forward_encode(device, cb) -> None:
    x_img, _ = image(random(72, (1, 2, 2, 3)), device)
    state = dropout(device).result_state(x_img)
    assert isinstance(state, mpsnn.MPSCNNDropoutGradientState)
    with pytest.raises(mpsnn.MPSStateError, match="holds no mask yet"):
        _ = state.mask_data
    with pytest.raises(mpsnn.MPSStateError, match=r"MPSCNNDropoutGradient: .*holds no mask yet"):
        dropout_gradient(device).encode(cb, x_img, x_img, state, poisoned((1, 2, 2, 3), device)[0])


def test_error_forward_with_foreign_state(device, cb) -> None:
    x_img, _ = image(random(73, (1, 2, 2, 3)), device)
    foreign = mpsnn.MPSCNNNeuronReLU(device).result_state(x_img)
    with pytest.raises(mpsnn.MPSTypeError, match=r"MPSCNNDropout: `destination_state` must be an MPSCNNDropoutGradientState"):
        dropout(device).encode(cb, x_img, poisoned((1, 2, 2, 3), device)[0], destination_state=foreign)


def test_error_gradient_channel_mismatch(device, cb) -> None:
    """An incoming gradient with fewer channels than the forward pass wrote is refused."""
    dy_img, _ = image(random(74, (1, 2, 2, 2)), device)
    x_img, _ = image(random(75, (1, 2, 2, 3)), device)
    _, state = run_forward(device, cb, dropout(device), x_img)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNDropoutGradient: `source_gradient` \(='2 channels used'\) must match the 3"):
        dropout_gradient(device).encode(cb, dy_img, x_img, state, poisoned((1, 2, 2, 3), device)[0])


# -- backend contract ----------------------------------------------------------------------------------------------------


def test_backend_functions() -> None:
    m = backend.dropout_mask((2, 3, 1, 4), 0.5, 17, torch.device("cpu"))
    assert m.dtype == torch.bool and m.shape == (2, 3, 1, 4)
    again = backend.dropout_mask((2, 3, 1, 4), 0.5, 17, torch.device("cpu"))
    assert torch.equal(m, again)
    x = torch.from_numpy(random(80, (2, 3, 5, 4)))
    y = backend.dropout_apply(x, m, 0.5)
    assert y.dtype == torch.float64
    assert_close(y, dref.dropout_forward(x.numpy(), np.broadcast_to(m.numpy(), x.shape), 0.5), torch.float64)
    assert backend.dropout_apply(x.half(), m, 0.5).dtype == torch.float32
    assert backend.derived_seed(5, 0) == 5 and backend.derived_seed(2**64 - 1, 1) == dref.batch_entry_seed(2**64 - 1, 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_backend_does_not_synchronise_the_host() -> None:
    x = torch.randn(4, 8, 8, 16, device="cuda", dtype=torch.float16)
    dev = torch.device("cuda")
    backend.dropout_apply(x, backend.dropout_mask((4, 8, 8, 1), 0.5, 1, dev), 0.5)   # warm up
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.dropout_apply(x, backend.dropout_mask((4, 8, 8, 1), 0.5, 1, dev), 0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
