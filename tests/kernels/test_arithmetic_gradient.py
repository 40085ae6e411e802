"""MPSCNNAddGradient / SubtractGradient / MultiplyGradient and MPSCNNArithmeticGradientState
(spec/arithmetic.md §4-5), through the public API.

Two independent oracles for every gradient:

1. ``reference_arithmetic.arithmetic_gradient_reference`` (float64, element by element: each
   forward position ``q`` with clamp mask 1 sends its contribution to the target element it
   read);
2. ``torch.autograd`` in float64 on a forward written here with advanced indexing (gathers
   with the edge rule), clamp included, driven by a RANDOM upstream gradient.

Inputs are dyadic (see ``test_arithmetic.py``) so no forward result sits on a clamp bound,
where the strict mask and autograd's clamp derivative would differ; the bound itself gets
exact asserts in ``test_mask_is_strict``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNAdd,
    MPSCNNAddGradient,
    MPSCNNArithmeticGradient,
    MPSCNNArithmeticGradientState,
    MPSCNNMultiply,
    MPSCNNMultiplyGradient,
    MPSCNNSubtract,
    MPSCNNSubtractGradient,
    MPSNNCompare,
    MPSOffset,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.testing import reference_arithmetic as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.reference_arithmetic import Operand
from mpsnn.testing.tolerances import Tol, assert_close

FORWARD = {"add": MPSCNNAdd, "subtract": MPSCNNSubtract, "multiply": MPSCNNMultiply}
GRADIENT = {"add": MPSCNNAddGradient, "subtract": MPSCNNSubtractGradient, "multiply": MPSCNNMultiplyGradient}
#: Per-op override: a broadcast gradient sums up to ~50 float32 products of magnitude <= 6
GRAD_TOL = {"float32": Tol(1e-5, 1e-5)}
F64 = "float64"
PARAMS = R.DYADIC_PARAMS
ULONG_MAX = (1 << 64) - 1
dyadic, configure = R.dyadic, R.configure_kernel


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


@dataclass(frozen=True)
class GCase:
    id: str
    p_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    s_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    dest_shape: tuple[int, int, int, int] = (2, 3, 5, 7)
    p: Operand = field(default_factory=Operand)
    s: Operand = field(default_factory=Operand)
    clip: Any = None
    dst_c_off: int = 0


GCASES = [
    GCase("plain"),
    GCase("row_broadcast", s_shape=(2, 1, 5, 7), s=Operand(stride=(1, 0, 1))),
    GCase("channel_broadcast", s_shape=(2, 3, 5, 1), s=Operand(stride=(1, 1, 0))),
    GCase("per_channel_vector", s_shape=(2, 1, 1, 7), s=Operand(stride=(0, 0, 1))),
    GCase("scalar_primary_at_offset", p_shape=(2, 2, 2, 5), p=Operand(offset=(1, 1, 0), stride=(0, 0, 0), c_off=4)),
    GCase("offsets_clamp_and_zero_edges", p=Operand(offset=(-1, 1, 0), edge="clamp"), s=Operand(offset=(2, -1, 0), edge="zero")),
    GCase("broadcast_row_off_image_clamp", s_shape=(2, 1, 4, 7), s=Operand(offset=(-2, 3, 0), stride=(1, 0, 1), edge="clamp")),
    GCase("clip_channel_windows", p_shape=(2, 3, 5, 9), s_shape=(2, 4, 6, 5), dest_shape=(2, 4, 6, 12),
          p=Operand(c_off=4), clip=region((1, 1, 0), (3, 2, ULONG_MAX)), dst_c_off=4),
    GCase("both_broadcast_x", p_shape=(2, 3, 1, 7), s_shape=(2, 3, 1, 7), dest_shape=(2, 3, 4, 7),
          p=Operand(stride=(0, 1, 1)), s=Operand(stride=(0, 1, 1))),
]


def gradient_scales(op: str, secondary: bool) -> dict[str, float]:
    """Gradient-kernel scales that reproduce the forward factor of §5.1 (§5.2)."""
    ps, ss = PARAMS["primary_scale"], PARAMS["secondary_scale"]
    if op == "multiply":
        return {"primary_scale": ps, "secondary_scale": ss}
    if op == "subtract" and secondary:
        return {"primary_scale": -ss}
    return {"primary_scale": ss if secondary else ps}


# -- autograd oracle -------------------------------------------------------------------------------


def _gather(t: torch.Tensor, o: Operand, depth: int, h: int, w: int, nch: int, clip: Any) -> torch.Tensor:
    """``t`` read at the forward positions πT(q) of a ``[depth, h, w, nch]`` region whose
    origin is the clip origin, with the edge rule (advanced indexing, not slicing)."""
    (rx, ry, _), _ = R._region(clip)
    _, th, tw, _ = t.shape
    m = np.arange(depth) + o.offset[2]
    ys = o.offset[1] + (np.arange(h) + 0) * o.stride[1]
    xs = o.offset[0] + (np.arange(w) + 0) * o.stride[0]
    cs = o.c_off + np.arange(nch) * o.stride[2]
    valid = ((ys >= 0) & (ys < th))[:, None] & ((xs >= 0) & (xs < tw))[None, :]
    yi, xi = np.clip(ys, 0, th - 1), np.clip(xs, 0, tw - 1)
    vals = t[torch.as_tensor(m)[:, None, None, None], torch.as_tensor(yi)[None, :, None, None],
             torch.as_tensor(xi)[None, None, :, None], torch.as_tensor(cs)[None, None, None, :]]
    if o.edge == "zero":
        vals = vals * torch.as_tensor(valid, dtype=torch.float64)[None, :, :, None]
    return vals


def autograd_gradients(op: str, case: GCase, Pv: np.ndarray, Sv: np.ndarray, gv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dL/dP, dL/dS of ``L = Σ g * forward(P, S)`` over the region the forward encode writes."""
    Pt = torch.tensor(Pv, requires_grad=True)
    St = torch.tensor(Sv, requires_grad=True)
    (rx, ry, rz), (rw, rh, rd) = R._region(case.clip)
    nd, hd, wd, _ = case.dest_shape
    x1, y1 = min(rx + rw, wd), min(ry + rh, hd)
    depth = min(rd, nd - rz, Pv.shape[0], Sv.shape[0])
    nch = R.output_channels(Pv, Sv, case.p, case.s)
    x = _gather(Pt, case.p, depth, y1 - ry, x1 - rx, nch, case.clip)
    y = _gather(St, case.s, depth, y1 - ry, x1 - rx, nch, case.clip)
    a, b = PARAMS["primary_scale"] * x, PARAMS["secondary_scale"] * y
    r = {"add": a + b, "subtract": a - b, "multiply": a * b}[op] + PARAMS["bias"]
    out = torch.clamp(r, PARAMS["minimum_value"], PARAMS["maximum_value"])
    g = torch.tensor(gv[rz:rz + depth, ry:y1, rx:x1, case.dst_c_off:case.dst_c_off + nch])
    (out * g).sum().backward()
    return Pt.grad.numpy(), St.grad.numpy()  # type: ignore[union-attr]


# -- running the kernels -------------------------------------------------------------------------


def forward_with_state(device: mpsnn.Device, op: str, case: GCase, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    cb = device.make_command_queue().make_command_buffer()
    P, Pv = image(dyadic(1, case.p_shape), device, dtype)
    S, Sv = image(dyadic(2, case.s_shape), device, dtype)
    D, _ = poisoned(case.dest_shape, device, dtype=dtype)
    k = configure(FORWARD[op](device), case.p, case.s, PARAMS, case.clip, case.dst_c_off)
    state = k.result_state(P, S, None, D)
    assert isinstance(state, MPSCNNArithmeticGradientState)
    k.encode(cb, P, S, D, destination_state=state)
    return cb, P, Pv, S, Sv, state


def reference(op: str, case: GCase, secondary: bool, Pv: np.ndarray, Sv: np.ndarray, gv: np.ndarray, result: np.ndarray, **grad: float) -> np.ndarray:
    return R.arithmetic_gradient_reference(gv, Pv, Sv, result, operation=op, is_secondary=secondary, params=PARAMS,
                                           primary=case.p, secondary=case.s, clip_rect=case.clip, dst_c_off=case.dst_c_off, **grad)


@pytest.mark.parametrize("secondary", [False, True], ids=["primary_filter", "secondary_filter"])
@pytest.mark.parametrize("case", GCASES, ids=lambda c: c.id)
@pytest.mark.parametrize("op", list(GRADIENT))
def test_gradient_against_both_oracles(op: str, case: GCase, secondary: bool) -> None:
    dev = mpsnn.Device("cpu")
    cb, P, Pv, S, Sv, state = forward_with_state(dev, op, case)
    gimg, gv = image(np.random.default_rng(7).standard_normal(case.dest_shape), dev)
    scales = gradient_scales(op, secondary)
    gk = GRADIENT[op](dev, is_secondary_source_filter=secondary)
    for name, v in scales.items():
        setattr(gk, name, v)
    source = (P if secondary else S) if op == "multiply" else (S if secondary else P)
    result = gk.encode(cb, gimg, source, state)
    finish(cb)
    target = Sv if secondary else Pv
    assert result.shape == target.shape
    expected = reference(op, case, secondary, Pv, Sv, gv, np.zeros(target.shape), **scales)
    assert_close(values(result), expected, "float32", overrides=GRAD_TOL, msg="vs reference")
    dP, dS = autograd_gradients(op, case, Pv, Sv, gv)
    assert_close(expected, dS if secondary else dP, F64, msg="reference vs autograd")
    assert np.abs(expected).sum() > 0, "a test gradient that is all zero checks nothing"


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="f32")])
@pytest.mark.parametrize("op", list(GRADIENT))
@pytest.mark.parametrize("case", [GCASES[1], GCASES[5]], ids=lambda c: c.id)
def test_gradient_dtypes_and_devices(device: mpsnn.Device, op: str, case: GCase, dtype: torch.dtype) -> None:
    cb, P, Pv, S, Sv, state = forward_with_state(device, op, case, dtype)
    gimg, gv = image(dyadic(9, case.dest_shape), device, dtype)
    results = {}
    for secondary in (False, True):
        gk = GRADIENT[op](device, is_secondary_source_filter=secondary)
        for name, v in gradient_scales(op, secondary).items():
            setattr(gk, name, v)
        source = (P if secondary else S) if op == "multiply" else (S if secondary else P)
        results[secondary] = gk.encode(cb, gimg, source, state)
    finish(cb)
    for secondary, res in results.items():
        assert res.feature_channel_format == gimg.feature_channel_format
        target = Sv if secondary else Pv
        expected = reference(op, case, secondary, Pv, Sv, gv, np.zeros(target.shape), **gradient_scales(op, secondary))
        assert_close(values(res), expected, dtype, overrides=GRAD_TOL)


def test_explicit_destination_writes_only_the_channel_window() -> None:
    dev = mpsnn.Device("cpu")
    case = GCASES[7]  # the primary reads channels [4, 9) of a 9-channel image
    cb, P, Pv, S, Sv, state = forward_with_state(dev, "multiply", case)
    gimg, gv = image(dyadic(11, case.dest_shape), dev)
    dest, dv = poisoned(case.p_shape, dev, value=1234.0)
    gk = MPSCNNMultiplyGradient(dev, is_secondary_source_filter=False)
    gk.primary_scale, gk.secondary_scale = PARAMS["primary_scale"], PARAMS["secondary_scale"]
    assert gk.encode(cb, gimg, S, state, dest) is None
    finish(cb)
    expected = reference("multiply", case, False, Pv, Sv, gv, dv, primary_scale=PARAMS["primary_scale"], secondary_scale=PARAMS["secondary_scale"])
    assert np.all(expected[..., :4] == 1234.0)
    assert_close(values(dest), expected, "float32", overrides=GRAD_TOL)


def test_state_copies_forward_strides_into_the_gradient_kernel() -> None:
    dev = mpsnn.Device("cpu")
    case = GCASES[3]  # secondary is a per-channel vector (strides 0, 0, 1)
    cb, P, Pv, S, Sv, state = forward_with_state(dev, "add", case)
    gk = MPSCNNAddGradient(dev, is_secondary_source_filter=True)
    assert (gk.secondary_stride_in_pixels_x, gk.secondary_stride_in_pixels_y, gk.secondary_stride_in_feature_channels) == (1, 1, 1)
    desc = gk.destination_image_descriptor([image(np.zeros(case.dest_shape), dev)[0], S], [state])
    assert (desc.width, desc.height, desc.feature_channels, desc.number_of_images) == (1, 1, 7, 2)
    assert (gk.secondary_stride_in_pixels_x, gk.secondary_stride_in_pixels_y, gk.secondary_stride_in_feature_channels) == (0, 0, 1)
    assert state.source_width == 5 and state.secondary_geometry.source_width == 1
    finish(cb)


def test_defaults_and_init() -> None:
    gk = MPSCNNSubtractGradient("cpu", is_secondary_source_filter=True)
    assert gk.is_secondary_source_filter is True
    assert (gk.primary_scale, gk.secondary_scale, gk.bias) == (1.0, 1.0, 0.0)
    assert gk.minimum_value == -R.FLT_MAX and gk.maximum_value == R.FLT_MAX
    assert isinstance(gk, mpsnn.MPSCNNGradientKernel) and isinstance(gk, MPSCNNArithmeticGradient)
    assert MPSCNNAddGradient("cpu", False).is_secondary_source_filter is False
    with pytest.raises(AttributeError):
        gk.is_secondary_source_filter = False  # type: ignore[misc]
    with pytest.raises(mpsnn.MPSTypeError, match="is_secondary_source_filter"):
        MPSCNNAddGradient("cpu")
    with pytest.raises(mpsnn.MPSTypeError, match="must be a bool"):
        MPSCNNAddGradient("cpu", is_secondary_source_filter=1)  # type: ignore[arg-type]
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNArithmeticGradient"):
        MPSCNNArithmeticGradient("cpu", is_secondary_source_filter=False)
    with pytest.raises(mpsnn.MPSValueError, match="secondary_stride_in_feature_channels"):
        gk.secondary_stride_in_feature_channels = 2


# -- exact conventions ---------------------------------------------------------------------------------


def _simple(dev: mpsnn.Device, op: str, x: list[float], y: list[float], **fwd: float):  # type: ignore[no-untyped-def]
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(np.array(x).reshape(1, 1, len(x), 1), dev)
    S, _ = image(np.array(y).reshape(1, 1, len(y), 1), dev)
    k = FORWARD[op](dev)
    for name, v in fwd.items():
        setattr(k, name, v)
    out, state = k.encode(cb, P, S, destination_state_is_temporary=False)
    return cb, P, S, out, state


def test_mask_is_strict() -> None:
    """m(q) = 1 only for minimum_value < r < maximum_value: at r == bound the gradient is 0."""
    dev = mpsnn.Device("cpu")
    cb, P, S, out, state = _simple(dev, "add", [0.5, 1.0, 1.5, -1.0, -0.5], [0.0, 0.0, 0.0, 0.0, 0.0], minimum_value=-1.0, maximum_value=1.0)
    g, _ = image(np.full((1, 1, 5, 1), 2.0), dev)
    dP = MPSCNNAddGradient(dev, is_secondary_source_filter=False).encode(cb, g, P, state)
    finish(cb)
    np.testing.assert_array_equal(values(out).ravel(), [0.5, 1.0, 1.0, -1.0, -0.5])
    np.testing.assert_array_equal(values(dP).ravel(), [2.0, 0.0, 0.0, 0.0, 2.0])


def test_default_bounds_mask_out_infinities() -> None:
    """With the default ±FLT_MAX bounds the mask is 1 except where r reaches them (inf)."""
    dev = mpsnn.Device("cpu")
    big = float(np.finfo(np.float32).max)
    cb, P, S, out, state = _simple(dev, "multiply", [big, 1.0, -2.0], [2.0, 3.0, 0.5])
    g, _ = image(np.full((1, 1, 3, 1), 1.0), dev)
    dS = MPSCNNMultiplyGradient(dev, is_secondary_source_filter=True).encode(cb, g, P, state)
    finish(cb)
    np.testing.assert_array_equal(values(dS).ravel(), [0.0, 1.0, -2.0])


def test_subtract_secondary_follows_the_header() -> None:
    """The secondary filter negates only through primary_scale = -1 (current header)."""
    dev = mpsnn.Device("cpu")
    cb, P, S, out, state = _simple(dev, "subtract", [1.0, 2.0], [0.5, 0.25])
    state.read_count = 2
    g, _ = image(np.array([3.0, -1.0]).reshape(1, 1, 2, 1), dev)
    plain = MPSCNNSubtractGradient(dev, is_secondary_source_filter=True).encode(cb, g, S, state)
    neg = MPSCNNSubtractGradient(dev, is_secondary_source_filter=True)
    neg.primary_scale = -1.0
    negated = neg.encode(cb, g, S, state)
    finish(cb)
    np.testing.assert_array_equal(values(plain).ravel(), [3.0, -1.0])
    np.testing.assert_array_equal(values(negated).ravel(), [-3.0, 1.0])


def test_bias_is_added_after_the_reduction() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(np.zeros((1, 2, 3, 1)), dev)
    S, _ = image(np.zeros((1, 1, 1, 1)), dev)
    k = MPSCNNAdd(dev)
    k.secondary_stride_in_pixels_x = k.secondary_stride_in_pixels_y = 0
    out, state = k.encode(cb, P, S, destination_state_is_temporary=True)
    g, _ = image(np.arange(6.0).reshape(1, 2, 3, 1), dev)
    gk = MPSCNNAddGradient(dev, is_secondary_source_filter=True)
    gk.bias = 0.5
    dS = gk.encode(cb, g, S, state)
    finish(cb)
    assert values(dS).ravel().tolist() == [15.0 + 0.5]
    assert state.read_count == 0


def test_gradient_clip_rect_limits_the_result() -> None:
    dev = mpsnn.Device("cpu")
    case = GCASES[0]
    cb, P, Pv, S, Sv, state = forward_with_state(dev, "add", case)
    gimg, gv = image(dyadic(12, case.dest_shape), dev)
    dest, dv = poisoned(case.p_shape, dev)
    gk = MPSCNNAddGradient(dev, is_secondary_source_filter=False)
    gk.clip_rect = region((1, 1, 1), (2, 5, 1))
    gk.encode(cb, gimg, P, state, dest)
    finish(cb)
    full = reference("add", case, False, Pv, Sv, gv, np.zeros(case.p_shape))
    expected = dv.copy()
    expected[1:2, 1:3, 1:3] = full[1:2, 1:3, 1:3]
    assert_close(values(dest), expected, "float32")


# -- encode forms and states -------------------------------------------------------------------------


def test_batch_forms_with_states(device: mpsnn.Device) -> None:
    cb = device.make_command_queue().make_command_buffer()
    case = GCASES[1]
    k = configure(MPSCNNMultiply(device), case.p, case.s, PARAMS)
    ps = [image(dyadic(30 + i, (1, 3, 5, 7)), device) for i in range(2)]
    ss = [image(dyadic(40 + i, (1, 1, 5, 7)), device) for i in range(2)]
    gs = [image(dyadic(50 + i, (1, 3, 5, 7)), device) for i in range(2)]
    # auto form with temporary states, and explicit form with states from result_state_batch
    outs, states = k.encode_batch(cb, [p for p, _ in ps], [s for s, _ in ss], destination_state_is_temporary=True)
    dests = [poisoned((1, 3, 5, 7), device)[0] for _ in ps]
    states2 = k.result_state_batch([p for p, _ in ps], [s for s, _ in ss], None, dests)
    tmp = k.temporary_result_state_batch(cb, [p for p, _ in ps], [s for s, _ in ss])
    assert all(isinstance(t, MPSCNNArithmeticGradientState) and t.is_temporary for t in tmp) and tmp[0] is not tmp[1]
    assert all(not t.is_temporary for t in states2) and all(t.is_temporary for t in states)
    k.encode_batch(cb, [p for p, _ in ps], [s for s, _ in ss], dests, destination_states=states2)
    gk = MPSCNNMultiplyGradient(device, is_secondary_source_filter=True)
    gk.primary_scale, gk.secondary_scale = PARAMS["primary_scale"], PARAMS["secondary_scale"]
    auto = gk.encode_batch(cb, [g for g, _ in gs], [p for p, _ in ps], states)
    explicit = [poisoned((1, 1, 5, 7), device)[0] for _ in ps]
    assert gk.encode_batch(cb, [g for g, _ in gs], [p for p, _ in ps], states2, explicit) is None
    finish(cb)
    assert all(st.read_count == 0 for st in states)
    sub = GCase("one", p_shape=(1, 3, 5, 7), s_shape=(1, 1, 5, 7), dest_shape=(1, 3, 5, 7), s=case.s)
    for k_, ((_, pv), (_, sv), (_, gv)) in enumerate(zip(ps, ss, gs)):
        expected = reference("multiply", sub, True, pv, sv, gv, np.zeros((1, 1, 5, 7)),
                             primary_scale=PARAMS["primary_scale"], secondary_scale=PARAMS["secondary_scale"])
        assert_close(values(auto[k_]), expected, "float32", overrides=GRAD_TOL)
        assert_close(values(explicit[k_]), expected, "float32", overrides=GRAD_TOL)


def test_temporary_state_is_released_after_its_reads() -> None:
    dev = mpsnn.Device("cpu")
    cb, P, S, out, state = _simple(dev, "add", [1.0], [2.0])
    cb2 = dev.make_command_queue().make_command_buffer()
    P2, _ = image(np.ones((1, 1, 1, 1)), dev)
    S2, _ = image(np.ones((1, 1, 1, 1)), dev)
    _, tmp = MPSCNNAdd(dev).encode(cb2, P2, S2, destination_state_is_temporary=True)
    g, _ = image(np.ones((1, 1, 1, 1)), dev)
    MPSCNNAddGradient(dev, is_secondary_source_filter=False).encode(cb2, g, P2, tmp)
    with pytest.raises(mpsnn.MPSStateError):
        MPSCNNAddGradient(dev, is_secondary_source_filter=True).encode(cb2, g, S2, tmp)
    finish(cb2)
    finish(cb)


def test_forward_region_empty_gives_zero_gradient() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(np.ones((1, 2, 2, 1)), dev)
    S, _ = image(np.ones((1, 2, 2, 1)), dev)
    D, _ = poisoned((1, 2, 2, 1), dev)
    k = MPSCNNAdd(dev)
    k.clip_rect = region((5, 5, 0), (1, 1, 1))
    st = k.result_state(P, S, None, D)
    k.encode(cb, P, S, D, destination_state=st)
    g, _ = image(np.ones((1, 2, 2, 1)), dev)
    res = MPSCNNAddGradient(dev, is_secondary_source_filter=False).encode(cb, g, P, st)
    finish(cb)
    assert np.all(values(res) == 0.0)


# -- errors --------------------------------------------------------------------------------------------


def test_gradient_errors() -> None:
    dev = mpsnn.Device("cpu")
    cb, P, S, out, state = _simple(dev, "add", [1.0, 2.0], [3.0, 4.0])
    g, _ = image(np.ones((1, 1, 2, 1)), dev)
    gk = MPSCNNAddGradient(dev, is_secondary_source_filter=False)
    with pytest.raises(mpsnn.MPSTypeError, match="`gradient_state` must be the MPSCNNArithmeticGradientState"):
        gk.encode(cb, g, P, None)
    with pytest.raises(mpsnn.MPSTypeError, match="gradient_states"):
        gk.encode_batch(cb, [g], [P], None)
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNMultiplyGradient: `gradient_state`.*MPSCNNAdd.*come from MPSCNNMultiply"):
        MPSCNNMultiplyGradient(dev, is_secondary_source_filter=False).encode(cb, g, S, state)
    wrong, _ = image(np.ones((1, 1, 3, 1)), dev)
    with pytest.raises(mpsnn.MPSValueError, match="`source_image`.*forward primary image"):
        gk.encode(cb, g, wrong, state)
    with pytest.raises(mpsnn.MPSValueError, match="`source_gradient`"):
        gk.encode(cb, image(np.ones((1, 1, 1, 1)), dev)[0], P, state)
    fresh = MPSCNNAdd(dev).result_state(P, S)
    with pytest.raises(mpsnn.MPSStateError, match="never filled"):
        gk.encode(cb, g, P, fresh)
    neuron_state = mpsnn.MPSNNGradientState(state.geometry, dev)
    with pytest.raises(mpsnn.MPSTypeError, match="gradient_state"):
        gk.encode(cb, g, P, neuron_state)
    finish(cb)


def test_gradient_refuses_compare_and_batch_addressing() -> None:
    dev = mpsnn.Device("cpu")
    cb = dev.make_command_queue().make_command_buffer()
    P, _ = image(np.ones((2, 1, 2, 1)), dev)
    S, _ = image(np.ones((2, 1, 2, 1)), dev)
    _, cstate = MPSNNCompare(dev).encode(cb, P, S, destination_state_is_temporary=False)
    g, _ = image(np.ones((2, 1, 2, 1)), dev)
    with pytest.raises(mpsnn.MPSValueError, match="MPSNNCompare"):
        MPSCNNAddGradient(dev, is_secondary_source_filter=False).encode(cb, g, P, cstate)
    k = MPSCNNAdd(dev)
    k.primary_offset = MPSOffset(0, 0, 1)
    D, _ = poisoned((2, 1, 2, 1), dev)
    k.clip_rect = region((0, 0, 0), (ULONG_MAX, ULONG_MAX, 1))
    st = k.result_state(P, S, None, D)
    k.encode(cb, P, S, D, destination_state=st)
    with pytest.raises(mpsnn.MPSValueError, match="batch addressing"):
        MPSCNNAddGradient(dev, is_secondary_source_filter=False).encode(cb, g, P, st)
    finish(cb)
