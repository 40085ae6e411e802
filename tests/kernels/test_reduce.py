"""MPSNNReduce* and MPSNNLocalCorrelation against the float64 loop references of
``mpsnn.testing.reference_reduce`` (written from the spec, independent of the backend).

Covers every unary class in every storage dtype, the geometry (clip_rect_source with images,
destination clip origin/size, channel windows, destination channel offset), the encode forms
(explicit, auto-sized, batch), arg tie-breaking exactly, the binary reductions with both
source regions, and the error cases. Reductions have no gradient kernels.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_reduce as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 7)  # N, H, W, C: odd sizes, channels not a multiple of 4
#: a sum of up to 7 float32 products can cancel: absolute error ~ 7 ulps of the operands
SUM_TOL = {"float32": Tol(1e-5, 2e-6)}

UNARY = [  # (class, axis, op)
    (m.MPSNNReduceRowMin, "row", "min"), (m.MPSNNReduceRowMax, "row", "max"),
    (m.MPSNNReduceRowMean, "row", "mean"), (m.MPSNNReduceRowSum, "row", "sum"),
    (m.MPSNNReduceColumnMin, "column", "min"), (m.MPSNNReduceColumnMax, "column", "max"),
    (m.MPSNNReduceColumnMean, "column", "mean"), (m.MPSNNReduceColumnSum, "column", "sum"),
    (m.MPSNNReduceFeatureChannelsMin, "featureChannels", "min"), (m.MPSNNReduceFeatureChannelsMax, "featureChannels", "max"),
    (m.MPSNNReduceFeatureChannelsMean, "featureChannels", "mean"), (m.MPSNNReduceFeatureChannelsSum, "featureChannels", "sum"),
    (m.MPSNNReduceFeatureChannelsArgumentMin, "featureChannels", "argmin"),
    (m.MPSNNReduceFeatureChannelsArgumentMax, "featureChannels", "argmax"),
]
UNARY_PARAMS = [pytest.param(*u, id=u[0].__name__) for u in UNARY]


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def test_every_reduce_class_is_covered() -> None:
    names = {n for n in m.__dict__ if n.startswith("MPSNNReduce")}
    assert {u[0].__name__ for u in UNARY} | {"MPSNNReduceUnary", "MPSNNReduceBinary", "MPSNNReduceFeatureChannelsAndWeightsMean",
                                            "MPSNNReduceFeatureChannelsAndWeightsSum"} == names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,axis,op", UNARY_PARAMS)
def test_unary_auto_form_matches_reference(device, cb, cls, axis, op, dtype) -> None:
    img, x = image(rand(zlib.crc32(cls.__name__.encode()), SHAPE), device, dtype)
    kernel = cls(device)
    out = kernel.encode(cb, img)
    assert isinstance(out, m.MPSTemporaryImage)
    expected = R.reduce_unary(x, axis, op)
    assert out.shape == expected.shape
    got = out.to_torch().double().cpu().numpy()  # read before the temporary goes back to the pool
    finish(cb)
    assert_close(got, expected, dtype, overrides=SUM_TOL, msg=cls.__name__)


@pytest.mark.parametrize("cls,axis,op", UNARY_PARAMS)
def test_unary_geometry_explicit_destination(device, cb, cls, axis, op) -> None:
    """clip_rect_source (with images), destination clip origin, channel windows, offset ignored."""
    img, x = image(rand(7, (3, 6, 7, 9)), device)
    kernel = cls(device)
    kernel.clip_rect_source = region((1, 2, 1), (4, 3, 2))        # x 1..4, y 2..4, images 1..2
    kernel.source_feature_channel_offset = 4
    kernel.source_feature_channel_max_count = 3                      # channels 4..6
    kernel.destination_feature_channel_offset = 4
    kernel.offset = m.MPSOffset(3, 3, 2)                              # ignored by reductions
    kernel.clip_rect = region((1, 1, 1), (9, 9, 9))                 # results at (1, 1), images 1..2
    dst, before = poisoned((3, 6, 6, 8), device)
    kernel.encode(cb, img, dst)
    finish(cb)
    block = R.reduce_unary(x, axis, op, (1, 2, 1, 4, 3, 2), c0=4, channels=3)
    assert_close(values(dst), R.place(before, block, (1, 1, 1), c0=4), "float32", overrides=SUM_TOL)


@pytest.mark.parametrize("axis,cls", [("row", m.MPSNNReduceRowSum), ("column", m.MPSNNReduceColumnMax),
                                      ("featureChannels", m.MPSNNReduceFeatureChannelsMean)])
def test_destination_clip_size_and_bounds_limit_the_block(device, cb, axis, cls) -> None:
    img, x = image(rand(3, (1, 5, 6, 4)), device)
    kernel = cls(device)
    kernel.clip_rect = region((2, 3, 0), (2, 1, 1))
    dst, before = poisoned((1, 5, 3, 4), device)
    kernel.encode(cb, img, dst)
    finish(cb)
    block = R.reduce_unary(x, axis, cls._op)
    assert_close(values(dst), R.place(before, block, (2, 3, 0), (2, 1, 1)), "float32", overrides=SUM_TOL)
    assert np.isnan(values(dst)[0, 0, 0, 0])  # untouched outside the clip


def test_argument_min_max_ties_take_the_lowest_channel(device, cb) -> None:
    x = np.array([[[[1.0, 3.0, 3.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]]]])
    img, _ = image(x, device)
    amax = m.MPSNNReduceFeatureChannelsArgumentMax(device).encode(cb, img)
    amin = m.MPSNNReduceFeatureChannelsArgumentMin(device)
    amin.source_feature_channel_offset = 0
    amin.source_feature_channel_max_count = 4
    amin_out = amin.encode(cb, img)
    got_max, got_min = values(amax), values(amin_out)
    finish(cb)
    assert got_max[0, 0, :, 0].tolist() == [1.0, 0.0]
    assert got_min[0, 0, :, 0].tolist() == [3.0, 0.0]


def test_argument_index_counts_from_the_first_channel_read(device, cb) -> None:
    img, x = image(rand(11, (1, 2, 3, 12)), device)
    k = m.MPSNNReduceFeatureChannelsArgumentMax(device)
    k.source_feature_channel_offset = 8
    out = k.encode(cb, img)
    got = values(out)
    finish(cb)
    assert np.array_equal(got[..., 0], np.argmax(x[..., 8:], axis=3).astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_channels_sum_weight(device, cb, dtype) -> None:
    img, x = image(rand(5, SHAPE), device, dtype)
    k = m.MPSNNReduceFeatureChannelsSum(device)
    assert k.weight == 1.0
    k.weight = 1.0 / 7.0
    out = k.encode(cb, img)
    got = values(out)
    finish(cb)
    assert_close(got, R.reduce_unary(x, "featureChannels", "sum", weight=1.0 / 7.0), dtype, overrides=SUM_TOL)
    assert_close(got, R.reduce_unary(x, "featureChannels", "mean"), dtype, overrides=SUM_TOL)


def test_unorm8_destination(device, cb) -> None:
    img, x = image(np.random.default_rng(2).uniform(0, 1, (1, 3, 4, 5)), device)
    desc = m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.unorm8, width=1, height=3, feature_channels=5)
    dst = m.MPSImage(device, image_descriptor=desc)
    m.MPSNNReduceRowMean(device).encode(cb, img, dst)
    finish(cb)
    assert_close(values(dst), R.reduce_unary(x, "row", "mean"), "unorm8")


def test_encode_batch_forms(device, cb) -> None:
    imgs = [image(rand(20 + k, (1, 3, 4, 5)), device) for k in range(3)]
    k = m.MPSNNReduceColumnSum(device)
    outs = k.encode_batch(cb, [i for i, _ in imgs])
    got = [values(o) for o in outs]
    dsts = [poisoned((1, 1, 4, 5), device)[0] for _ in imgs]
    k.encode_batch(cb, [i for i, _ in imgs], dsts)
    finish(cb)
    for (_, x), g, d in zip(imgs, got, dsts):
        assert_close(g, R.reduce_unary(x, "column", "sum"), "float32", overrides=SUM_TOL)
        assert_close(values(d), R.reduce_unary(x, "column", "sum"), "float32", overrides=SUM_TOL)


def test_auto_descriptor_and_state_forms(device, cb) -> None:
    img, _ = image(rand(1, (2, 4, 6, 5)), device)
    k = m.MPSNNReduceRowMax(device)
    k.clip_rect_source = region((1, 1, 1), (3, 2, 5))
    desc = k.destination_image_descriptor([img])
    assert (desc.width, desc.height, desc.feature_channels, desc.number_of_images) == (1, 2, 5, 1)
    assert k.offset == m.MPSOffset(0, 0, 0)
    out, state = k.encode(cb, img, destination_state_is_temporary=True)
    assert state is None and out.shape == (1, 2, 1, 5)
    assert k.result_state(img) is None
    finish(cb)


# -- binary reductions ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mean", "sum", "nonzero"])
def test_feature_channels_and_weights(device, cb, kind, dtype) -> None:
    p, pv = image(rand(30, SHAPE), device, dtype)
    qv = rand(31, SHAPE)
    qv[0, 0, 0, :] = 0.0          # K = 0 pixel
    qv[1, 1, :, 2:] = 0.0         # K = 2 pixels
    q, qv = image(qv, device, dtype)
    if kind == "mean":
        k = m.MPSNNReduceFeatureChannelsAndWeightsMean(device)
    else:
        k = m.MPSNNReduceFeatureChannelsAndWeightsSum(device, do_weighted_sum_by_non_zero_weights=kind == "nonzero")
        assert k.do_weighted_sum_by_non_zero_weights == (kind == "nonzero")
    out = k.encode(cb, p, q)
    got = values(out)
    finish(cb)
    assert_close(got, R.reduce_feature_channels_and_weights(pv, qv, kind), dtype, overrides=SUM_TOL)
    if kind == "nonzero":
        assert got[0, 0, 0, 0] == 0.0


def test_feature_channels_and_weights_default_is_plain_sum(device) -> None:
    assert m.MPSNNReduceFeatureChannelsAndWeightsSum(device).do_weighted_sum_by_non_zero_weights is False


def test_binary_source_regions_and_destination_placement(device, cb) -> None:
    p, pv = image(rand(40, (2, 5, 6, 8)), device)
    q, qv = image(rand(41, (3, 4, 7, 6)), device)
    k = m.MPSNNReduceFeatureChannelsAndWeightsSum(device)
    k.primary_source_clip_rect = region((2, 1, 1), (3, 2, 1))
    k.secondary_source_clip_rect = region((4, 2, 2), (3, 2, 1))
    k.primary_source_feature_channel_offset = 4
    k.secondary_source_feature_channel_max_count = 4
    k.primary_offset = m.MPSOffset(9, 9, 0)  # ignored
    k.clip_rect = region((1, 2, 0), (5, 5, 1))
    k.destination_feature_channel_offset = 4
    dst, before = poisoned((1, 5, 5, 6), device)
    k.encode(cb, p, q, dst)
    finish(cb)
    block = R.reduce_feature_channels_and_weights(pv[1:2, 1:3, 2:5, 4:8], qv[2:3, 2:4, 4:7, 0:4], "sum")
    assert_close(values(dst), R.place(before, block, (1, 2, 0), c0=4), "float32", overrides=SUM_TOL)


@pytest.mark.parametrize("wx,wy,sx,sy", [(0, 0, 1, 1), (1, 1, 1, 1), (2, 1, 1, 2)])
def test_local_correlation(device, cb, wx, wy, sx, sy) -> None:
    a, av = image(rand(50, (2, 4, 5, 3)), device)
    b, bv = image(rand(51, (2, 5, 6, 3)), device)
    k = m.MPSNNLocalCorrelation(device, window_in_x=wx, window_in_y=wy, stride_in_x=sx, stride_in_y=sy)
    k.primary_source_clip_rect = region((0, 0, 0), (5, 4, 2))
    k.secondary_source_clip_rect = region((1, 1, 0), (5, 4, 2))
    out = k.encode(cb, a, b)
    got = values(out)
    finish(cb)
    assert got.shape == (2, 4, 5, (2 * wx + 1) * (2 * wy + 1))
    assert_close(got, R.local_correlation(av, bv, 1, 1, wx, wy, sx, sy), "float32", overrides=SUM_TOL)


def test_local_correlation_defaults_and_validation(device) -> None:
    k = m.MPSNNLocalCorrelation(device)
    assert (k.window_in_x, k.window_in_y, k.stride_in_x, k.stride_in_y) == (0, 0, 1, 1)
    with pytest.raises(m.MPSValueError, match="stride_in_x"):
        k.stride_in_x = 0
    with pytest.raises(m.MPSValueError, match="window_in_y"):
        m.MPSNNLocalCorrelation(device, window_in_y=-1)


# -- errors -------------------------------------------------------------------------------------------

def test_error_base_classes_cannot_be_initialised(device) -> None:
    with pytest.raises(m.MPSTypeError, match="MPSNNReduceUnary"):
        m.MPSNNReduceUnary(device)
    with pytest.raises(m.MPSTypeError, match="MPSNNReduceBinary"):
        m.MPSNNReduceBinary(device)


def test_error_empty_source_region(device, cb) -> None:
    img, _ = image(rand(1, (1, 3, 4, 2)), device)
    k = m.MPSNNReduceRowSum(device)
    k.clip_rect_source = region((4, 0, 0), (2, 2, 1))
    with pytest.raises(m.MPSValueError, match=r"MPSNNReduceRowSum: `clip_rect_source`.*empty region"):
        k.encode(cb, img)


def test_error_destination_too_few_channels(device, cb) -> None:
    img, _ = image(rand(1, (1, 3, 4, 6)), device)
    dst, _ = poisoned((1, 3, 1, 4), device)
    with pytest.raises(m.MPSValueError, match="destination_image.feature_channels"):
        m.MPSNNReduceRowMax(device).encode(cb, img, dst)


def test_error_bad_property_values(device) -> None:
    k = m.MPSNNReduceFeatureChannelsSum(device)
    with pytest.raises(m.MPSTypeError, match="clip_rect_source"):
        k.clip_rect_source = (0, 0, 1, 1)
    with pytest.raises(m.MPSValueError, match="weight"):
        k.weight = "heavy"
    with pytest.raises(m.MPSTypeError, match="do_weighted_sum_by_non_zero_weights"):
        m.MPSNNReduceFeatureChannelsAndWeightsSum(device, do_weighted_sum_by_non_zero_weights=1)


def test_error_binary_channel_and_region_mismatch(device, cb) -> None:
    p, _ = image(rand(1, (1, 3, 4, 5)), device)
    q, _ = image(rand(2, (1, 3, 4, 6)), device)
    k = m.MPSNNReduceFeatureChannelsAndWeightsMean(device)
    with pytest.raises(m.MPSValueError, match="secondary_image"):
        k.encode(cb, p, q)
    k.secondary_source_feature_channel_max_count = 5
    k.secondary_source_clip_rect = region((0, 0, 0), (2, 3, 1))
    with pytest.raises(m.MPSValueError, match="secondary_source_clip_rect"):
        k.encode(cb, p, q)


def test_error_binary_clip_rect_narrower_than_two(device, cb) -> None:
    p, _ = image(rand(1, (1, 3, 4, 4)), device)
    k = m.MPSNNReduceFeatureChannelsAndWeightsSum(device)
    k.clip_rect = region((0, 0, 0), (1, 3, 1))
    dst, _ = poisoned((1, 3, 4, 1), device)
    with pytest.raises(m.MPSValueError, match="at least 2 wide"):
        k.encode(cb, p, image(rand(3, (1, 3, 4, 4)), device)[0], dst)
