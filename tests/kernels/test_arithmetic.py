"""MPSCNNAdd / Subtract / Multiply / Divide and MPSNNCompare (spec/arithmetic.md §1-3).

Oracle: ``mpsnn.testing.reference_arithmetic`` (float64, element by element from the spec's
read positions ``πP(q)``, ``πS(q)``). Inputs are multiples of 1/8 in [-2, 2] (exact in every
storage format) and the scales, bias and bounds are dyadic, so sums and products are exact in
float32 and the clamp never sits on a rounding boundary. Destinations are poisoned (NaN) so
that "written" and "left alone" are both checked for every element. Gradients are in
``test_arithmetic_gradient.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNAdd,
    MPSCNNArithmetic,
    MPSCNNDivide,
    MPSCNNMultiply,
    MPSCNNSubtract,
    MPSImage,
    MPSImageDescriptor,
    MPSImageEdgeMode,
    MPSImageFeatureChannelFormat,
    MPSNNCompare,
    MPSNNComparisonType,
    MPSOffset,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.testing import reference_arithmetic as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.reference_arithmetic import Operand
from mpsnn.testing.tolerances import assert_close

OPS = {"add": MPSCNNAdd, "subtract": MPSCNNSubtract, "multiply": MPSCNNMultiply, "divide": MPSCNNDivide}
STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
PARAMS = R.DYADIC_PARAMS
ULONG_MAX = (1 << 64) - 1
dyadic, configure = R.dyadic, R.configure_kernel


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


@dataclass(frozen=True)
class Case:
    """One forward geometry: shapes, operand reads, clip and destination channel offset."""

    id: str
    p_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    s_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    dest_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    p: Operand = field(default_factory=Operand)
    s: Operand = field(default_factory=Operand)
    clip: MTLRegion | None = None
    dst_c_off: int = 0


CASES = [
    Case("plain"),
    Case("row_broadcast", s_shape=(2, 1, 5, 7), s=Operand(stride=(1, 0, 1))),
    Case("column_broadcast", s_shape=(2, 3, 1, 7), s=Operand(stride=(0, 1, 1))),
    Case("channel_broadcast", s_shape=(2, 3, 5, 1), s=Operand(stride=(1, 1, 0))),
    Case("per_channel_vector", s_shape=(2, 1, 1, 7), s=Operand(stride=(0, 0, 1))),
    Case("scalar_secondary_at_offset", s_shape=(2, 2, 3, 6), s=Operand(offset=(2, 1, 0), stride=(0, 0, 0), c_off=4)),
    Case("scalar_primary", p_shape=(2, 1, 1, 1), p=Operand(stride=(0, 0, 0))),
    Case("both_broadcast_x", p_shape=(2, 3, 1, 7), s_shape=(2, 3, 1, 7), p=Operand(stride=(0, 1, 1)), s=Operand(stride=(0, 1, 1))),
    Case("both_broadcast_channels", p_shape=(2, 3, 5, 1), s_shape=(2, 3, 5, 1), dest_shape=(2, 3, 5, 3),
         p=Operand(stride=(1, 1, 0)), s=Operand(stride=(1, 1, 0))),
    Case("offsets_edges", p=Operand(offset=(-1, 1, 0), edge="zero"), s=Operand(offset=(2, -1, 0), edge="clamp")),
    Case("broadcast_offset_off_image", s_shape=(2, 1, 4, 7), s=Operand(offset=(-2, 3, 0), stride=(1, 0, 1), edge="clamp")),
    Case("clip_channel_windows", p_shape=(2, 3, 5, 9), s_shape=(2, 4, 6, 5), dest_shape=(2, 4, 6, 12),
         p=Operand(c_off=4), clip=region((1, 1, 0), (3, 2, ULONG_MAX)), dst_c_off=4),
    Case("max_count", p_shape=(2, 3, 5, 8), s_shape=(2, 3, 5, 3), p=Operand(c_max=3)),
    Case("batch_offsets", p_shape=(3, 2, 3, 5), s_shape=(3, 2, 3, 5), dest_shape=(3, 2, 3, 5),
         p=Operand(offset=(0, 0, 1)), clip=region((0, 0, 1), (ULONG_MAX, ULONG_MAX, 2))),
    Case("clip_past_destination", clip=region((3, 2, 0), (10, 10, 1))),
]


def run_forward(device: mpsnn.Device, op: str, case: Case, dtype: torch.dtype = torch.float32, params: dict[str, float] = PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``op`` on ``case`` into a poisoned destination: (result, reference result)."""
    cb = device.make_command_queue().make_command_buffer()
    P, Pv = image(dyadic(1, case.p_shape), device, dtype)
    S, Sv = image(dyadic(2, case.s_shape, nonzero=op == "divide"), device, dtype)
    D, Dv = poisoned(case.dest_shape, device, dtype=dtype)
    configure(OPS[op](device), case.p, case.s, params, case.clip, case.dst_c_off).encode(cb, P, S, D)
    finish(cb)
    expected, _ = R.arithmetic_kernel_reference(Pv, Sv, Dv, operation=op, params=params, primary=case.p,
                                                secondary=case.s, clip_rect=case.clip, dst_c_off=case.dst_c_off)
    return values(D), expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("op", list(OPS))
def test_forward_geometry_against_reference(op: str, case: Case) -> None:
    got, expected = run_forward(mpsnn.Device("cpu"), op, case)
    assert_close(got, expected, "float32", msg=f"{op} {case.id}")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[9]], ids=lambda c: c.id)
def test_forward_dtypes_and_devices(device: mpsnn.Device, op: str, dtype: torch.dtype, case: Case) -> None:
    got, expected = run_forward(device, op, case, dtype)
    # the reference is in float64 from the same dtype-rounded inputs; the result is rounded once
    assert_close(got, expected, dtype, msg=f"{op} {case.id}")


def test_forward_clamp_is_active() -> None:
    """The dyadic bounds clip a good share of the results (else the clamp test is empty)."""
    got, _ = run_forward(mpsnn.Device("cpu"), "add", CASES[0])
    hi, lo = np.float32(PARAMS["maximum_value"]), np.float32(PARAMS["minimum_value"])
    assert (got == hi).sum() > 5 and (got == lo).sum() > 5


def test_defaults() -> None:
    k = MPSCNNAdd("cpu")
    assert (k.primary_scale, k.secondary_scale, k.bias) == (1.0, 1.0, 0.0)
    assert k.minimum_value == -R.FLT_MAX and k.maximum_value == R.FLT_MAX
    for which in ("primary", "secondary"):
        for axis in ("stride_in_pixels_x", "stride_in_pixels_y", "stride_in_feature_channels"):
            assert getattr(k, f"{which}_{axis}") == 1
        assert getattr(k, f"{which}_edge_mode") == MPSImageEdgeMode.zero
        assert getattr(k, f"{which}_offset") == MPSOffset(0, 0, 0)
        assert getattr(k, f"{which}_kernel_width") == 1
    assert k.is_backwards is False and k.destination_feature_channel_offset == 0
    assert int(k.padding.padding_method) == int(mpsnn.MPSNNPaddingMethod.sizeSame)
    c = MPSNNCompare("cpu")
    assert c.comparison_type == MPSNNComparisonType.equal and c.threshold == 0.0
    assert isinstance(c, MPSCNNArithmetic) and issubclass(MPSCNNArithmetic, mpsnn.MPSCNNBinaryKernel)
    assert [t.value for t in MPSNNComparisonType] == [0, 1, 2, 3, 4, 5]
    assert MPSNNComparisonType.lessOrEqual.name == "lessOrEqual"


def test_float_properties_are_float32() -> None:
    k = MPSCNNMultiply("cpu")
    k.primary_scale = 0.1
    assert k.primary_scale == float(np.float32(0.1)) and k.primary_scale != 0.1
    k.maximum_value = 1e39  # beyond float32: rounds to +inf (a valid bound)
    assert k.maximum_value == math.inf


# -- auto-sized destinations ------------------------------------------------------------------------

AUTO = [
    # (case, expected result shape)
    (CASES[0], (2, 3, 5, 7)),
    (CASES[1], (2, 3, 5, 7)),
    (CASES[6], (2, 3, 5, 7)),          # primary broadcast: sized by the secondary
    (CASES[7], (2, 3, 1, 7)),          # both broadcast along x: width 1
    (CASES[8], (2, 3, 5, 1)),          # both broadcast channels: one channel
    (Case("larger_secondary", s_shape=(2, 4, 6, 7)), (2, 3, 5, 7)),
]


@pytest.mark.parametrize("case,shape", AUTO, ids=lambda v: getattr(v, "id", ""))
def test_auto_sized_result(device: mpsnn.Device, case: Case, shape: tuple[int, ...]) -> None:
    cb = device.make_command_queue().make_command_buffer()
    P, Pv = image(dyadic(3, case.p_shape), device)
    S, Sv = image(dyadic(4, case.s_shape), device)
    k = configure(MPSCNNSubtract(device), case.p, case.s, PARAMS)
    k.primary_offset = MPSOffset(1, 1, 0)  # the auto forms reset it from the padding (1x1 window: 0)
    out = k.encode(cb, P, S)
    finish(cb)
    assert out.shape == shape and out.feature_channel_format == MPSImageFeatureChannelFormat.float32
    assert k.primary_offset == MPSOffset(0, 0, 0)
    expected, _ = R.arithmetic_kernel_reference(Pv, Sv, np.zeros(shape), operation="subtract", params=PARAMS, primary=case.p, secondary=case.s)
    assert_close(values(out), expected, "float32")


def test_destination_descriptor_and_batch_forms(device: mpsnn.Device) -> None:
    cb = device.make_command_queue().make_command_buffer()
    case = CASES[4]
    k = configure(MPSCNNMultiply(device), case.p, case.s, PARAMS)
    ps = [image(dyadic(10 + i, (1, 3, 5, 7)), device) for i in range(3)]
    ss = [image(dyadic(20 + i, (1, 1, 1, 7)), device) for i in range(3)]
    desc = k.destination_image_descriptor([ps[0][0], ss[0][0]])
    assert (desc.width, desc.height, desc.feature_channels, desc.number_of_images) == (5, 3, 7, 1)
    outs = k.encode_batch(cb, [p for p, _ in ps], [s for s, _ in ss])
    dests = [poisoned((1, 3, 5, 7), device)[0] for _ in range(3)]
    k.encode_batch(cb, [p for p, _ in ps], [s for s, _ in ss], dests)
    finish(cb)
    for (_, pv), (_, sv), out, d in zip(ps, ss, outs, dests):
        expected, _ = R.arithmetic_kernel_reference(pv, sv, np.zeros((1, 3, 5, 7)), operation="multiply", params=PARAMS, primary=case.p, secondary=case.s)
        assert_close(values(out), expected, "float32")
        assert_close(values(d), expected, "float32")


def test_unorm8_destination_is_clamped_by_storage() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, Pv = image(dyadic(5, (1, 2, 3, 4)), dev)
    S, Sv = image(dyadic(6, (1, 2, 3, 4)), dev)
    D = MPSImage(dev, MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.unorm8, width=3, height=2, feature_channels=4))
    MPSCNNAdd(dev).encode(cb, P, S, D)
    finish(cb)
    expected = np.clip(Pv + Sv, 0.0, 1.0)
    assert_close(values(D), expected, "unorm8")


# -- IEEE edge cases (exact) ----------------------------------------------------------------------------


def test_divide_by_zero_and_nan() -> None:
    dev = mpsnn.Device("cpu")
    x = np.array([1.0, -1.0, 0.0, math.nan, 3.0]).reshape(1, 1, 5, 1)
    y = np.array([0.0, 0.0, 0.0, 1.0, 2.0]).reshape(1, 1, 5, 1)
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(x, dev)
    S, _ = image(y, dev)
    default = MPSCNNDivide(dev).encode(cb, P, S)
    open_bounds = MPSCNNDivide(dev)
    open_bounds.minimum_value, open_bounds.maximum_value = -math.inf, math.inf
    unclamped = open_bounds.encode(cb, P, S)
    finish(cb)
    f = float(np.float32(R.FLT_MAX))
    # ±inf is clamped to the default bounds ±FLT_MAX; NaN (0/0, NaN input) propagates
    np.testing.assert_array_equal(values(default).ravel(), [f, -f, math.nan, math.nan, 1.5])
    np.testing.assert_array_equal(values(unclamped).ravel(), [math.inf, -math.inf, math.nan, math.nan, 1.5])


def test_clamp_bounds_are_inclusive_values() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(np.array([-3.0, -1.0, 0.5, 1.0, 3.0]).reshape(1, 1, 5, 1), dev)
    S, _ = image(np.zeros((1, 1, 5, 1)), dev)
    k = MPSCNNAdd(dev)
    k.minimum_value, k.maximum_value = -1.0, 1.0
    out = k.encode(cb, P, S)
    finish(cb)
    np.testing.assert_array_equal(values(out).ravel(), [-1.0, -1.0, 0.5, 1.0, 1.0])


# -- comparison -------------------------------------------------------------------------------------------

X = np.array([1.0, 1.0, 1.0, 2.0, -0.5, 0.0, math.nan])
Y = np.array([1.0, 1.25, 0.5, 1.0, -0.5, -0.0, 1.0])


@pytest.mark.parametrize("threshold", [0.0, 0.25])
@pytest.mark.parametrize("ctype", list(MPSNNComparisonType), ids=lambda t: t.name)
def test_compare(device: mpsnn.Device, ctype: MPSNNComparisonType, threshold: float) -> None:
    cb = device.make_command_queue().make_command_buffer()
    P, _ = image(X.reshape(1, 1, 7, 1), device)
    S, _ = image(Y.reshape(1, 1, 7, 1), device)
    k = MPSNNCompare(device)
    k.comparison_type = ctype
    k.threshold = threshold
    # scales, bias and the clamp are unused by a comparison
    k.primary_scale, k.secondary_scale, k.bias = 3.0, -2.0, 5.0
    k.minimum_value, k.maximum_value = 0.25, 0.5
    out = k.encode(cb, P, S)
    finish(cb)
    expected = R.arithmetic_forward(X, Y, "compare", comparison_type=int(ctype), threshold=threshold)
    np.testing.assert_array_equal(values(out).ravel(), expected)


def test_compare_hand_values() -> None:
    """The reference itself, against values worked out by hand (equal within threshold)."""
    eq = R.arithmetic_forward(X, Y, "compare", comparison_type=0, threshold=0.25)
    np.testing.assert_array_equal(eq, [1, 1, 0, 0, 1, 1, 0])
    ne = R.arithmetic_forward(X, Y, "compare", comparison_type=1, threshold=0.0)
    np.testing.assert_array_equal(ne, [0, 1, 1, 1, 0, 0, 0])


# -- errors ----------------------------------------------------------------------------------------------


def test_base_class_cannot_be_instantiated() -> None:
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNArithmetic"):
        MPSCNNArithmetic("cpu")


@pytest.mark.parametrize("name", ["primary_stride_in_pixels_x", "primary_stride_in_pixels_y", "primary_stride_in_feature_channels",
                                  "secondary_stride_in_pixels_x", "secondary_stride_in_pixels_y", "secondary_stride_in_feature_channels"])
@pytest.mark.parametrize("bad", [2, -1, True, 0.0])
def test_stride_must_be_0_or_1(name: str, bad: Any) -> None:
    k = MPSCNNAdd("cpu")
    with pytest.raises(mpsnn.MPSValueError, match=f"MPSCNNAdd: `{name}`"):
        setattr(k, name, bad)
    assert getattr(k, name) == 1
    setattr(k, name, 0)
    assert getattr(k, name) == 0


@pytest.mark.parametrize("name", ["primary_scale", "secondary_scale", "bias", "minimum_value", "maximum_value"])
@pytest.mark.parametrize("bad", [math.nan, "1", None, True])
def test_float_property_errors(name: str, bad: Any) -> None:
    with pytest.raises(mpsnn.MPSValueError, match=f"MPSCNNMultiply: `{name}`"):
        setattr(MPSCNNMultiply("cpu"), name, bad)


def test_compare_property_errors() -> None:
    k = MPSNNCompare("cpu")
    with pytest.raises(mpsnn.MPSValueError, match="comparison_type"):
        k.comparison_type = 6
    with pytest.raises(mpsnn.MPSValueError, match="threshold"):
        k.threshold = math.nan
    k.comparison_type = 4
    assert k.comparison_type is MPSNNComparisonType.greater


def _pair(c1: int = 4, c2: int = 4, shape: tuple[int, int, int] = (1, 2, 3)) -> tuple[MPSImage, MPSImage]:
    dev = mpsnn.Device("cpu")
    return image(np.ones(shape + (c1,)), dev)[0], image(np.ones(shape + (c2,)), dev)[0]


def test_encode_errors() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, S = _pair(4, 3)
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNAdd: `secondary_image`.*3 feature channels used.*match the 4"):
        MPSCNNAdd(dev).encode(cb, P, S)
    P, S = _pair()
    k = MPSCNNAdd(dev)
    k.minimum_value, k.maximum_value = 1.0, 0.0
    with pytest.raises(mpsnn.MPSValueError, match="`minimum_value` \\(=1.0\\) must be <= maximum_value=0.0"):
        k.encode(cb, P, S)
    k = MPSCNNAdd(dev)
    k.secondary_edge_mode = MPSImageEdgeMode.mirror
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNAdd: `secondary_edge_mode`.*zero or clamp"):
        k.encode(cb, P, S)
    k = MPSCNNAdd(dev)
    k.primary_offset = MPSOffset(0, 0, 1)
    with pytest.raises(mpsnn.MPSValueError, match="primary_offset.z"):
        k.encode(cb, P, S, image(np.zeros((1, 2, 3, 4)), dev)[0])
    with pytest.raises(mpsnn.MPSValueError, match="destination_image.feature_channels"):
        MPSCNNAdd(dev).encode(cb, P, S, image(np.zeros((1, 2, 3, 2)), dev)[0])
    with pytest.raises(mpsnn.MPSValueError, match="must not alias"):
        MPSCNNAdd(dev).encode(cb, P, S, P)
    big, small = image(np.ones((2, 2, 3, 4)), dev)[0], image(np.ones((1, 2, 3, 4)), dev)[0]
    with pytest.raises(mpsnn.MPSValueError, match="secondary_image.number_of_images.*never broadcast"):
        MPSCNNAdd(dev).encode(cb, big, small)
    with pytest.raises(mpsnn.MPSTypeError, match="secondary_image"):
        MPSCNNAdd(dev).encode(cb, P, np.ones((1, 2, 3, 4)))
    with pytest.raises(mpsnn.MPSTypeError, match="destination_state"):
        MPSCNNAdd(dev).encode(cb, P, S, image(np.zeros((1, 2, 3, 4)), dev)[0], destination_state=mpsnn.MPSState(dev, buffer_size=4))
    with pytest.raises(mpsnn.MPSValueError, match="source_images"):
        MPSCNNAdd(dev).destination_image_descriptor([P])
    k = MPSCNNAdd(dev)
    with pytest.raises(mpsnn.MPSValueError, match="`destination_state` needs `destination_image`"):
        k.encode(cb, P, S, destination_state=k.result_state(P, S))


def test_minimum_above_maximum_is_fine_for_compare() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, S = _pair()
    k = MPSNNCompare(dev)
    k.minimum_value, k.maximum_value = 1.0, 0.0
    out = k.encode(cb, P, S)
    finish(cb)
    assert np.all(values(out) == 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("op", ["add", "subtract", "multiply", "divide"])
def test_16_bit_one_pass_has_the_float32_paths_bits(device: mpsnn.Device, op: str, dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With no scales, bias or bounds of its own, a 16-bit encode runs as one op in the storage
    type (the float32 path is not called): the same bits as float32 arithmetic, the default
    clamp to ±FLT_MAX and one rounding, and as the float32 path itself (taken when the lower
    bound is -inf instead of the default), overflow, NaN and channel broadcasting included."""
    from mpsnn.backends import arithmetic as backend
    g = torch.Generator().manual_seed(7)
    big = torch.finfo(dtype).max
    x = (torch.randn(2, 5, 6, 8, generator=g) * 3).to(dtype)
    y = (torch.randn(2, 5, 6, 8, generator=g) * 3).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([big, -big, float("nan"), float("inf")], dtype=dtype)
    y[0, 0, 0, :4] = torch.tensor([big, -big, 1.0, float("-inf")], dtype=dtype)
    cls = {"add": MPSCNNAdd, "subtract": MPSCNNSubtract, "multiply": MPSCNNMultiply, "divide": MPSCNNDivide}[op]
    real = backend.arithmetic_forward

    def encode(secondary: torch.Tensor, one_pass: bool) -> torch.Tensor:
        k = cls(device)
        if secondary.shape[-1] == 1:
            k.secondary_stride_in_feature_channels = 0
        if not one_pass:
            k.minimum_value = -math.inf
        calls: list[int] = []
        monkeypatch.setattr(backend, "arithmetic_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        cb = device.make_command_queue().make_command_buffer()
        got = k.encode(cb, mpsnn.MPSImage.from_torch(x.to(device.torch_device)), mpsnn.MPSImage.from_torch(secondary.to(device.torch_device)))
        finish(cb)
        assert calls == ([] if one_pass else [1])
        assert got.tensor.dtype == dtype
        return got.tensor.cpu()

    for secondary in (y, y[:, :, :, :1].contiguous()):          # one channel: broadcast along the channels
        fx, fy = x.float(), secondary.float()
        want = {"add": fx + fy, "subtract": fx - fy, "multiply": fx * fy, "divide": fx / fy}[op].clamp(-R.FLT_MAX, R.FLT_MAX).to(dtype)
        fast, slow = encode(secondary, True), encode(secondary, False)
        torch.testing.assert_close(fast, want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(fast).any() and (op == "divide" or torch.isinf(fast).any()), "the special values were exercised"
