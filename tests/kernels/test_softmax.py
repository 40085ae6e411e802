"""MPSCNNSoftMax / MPSCNNLogSoftMax and their gradients against three oracles.

1. ``mpsnn.testing.reference_softmax`` (float64 NumPy from softmax.md) for every storage
   dtype and device, plus the coordinate references (offsets, clip rects, channel windows,
   edge modes, batches) with poisoned destinations.
2. ``torch.autograd`` in float64 with a random upstream gradient, for both gradients.
3. Finite differences, only to validate the reference gradients.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSImage, MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.backends import softmax as backend
from mpsnn.testing import reference as ref
from mpsnn.testing import reference_softmax as sref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
KINDS = [pytest.param(False, id="softmax"), pytest.param(True, id="logsoftmax")]
SHAPE = (2, 3, 5, 7)          # batch 2, odd sizes, channels not a multiple of 4
POISON = 1234.0
FD_STEP = 1e-6
FD_TOL = {torch.float64: Tol(rtol=1e-6, atol=1e-8)}
#: the gradient sums C products of rounded inputs: a few ulps more than one element-wise op
GRAD_TOL = {torch.float16: Tol(4e-3, 2e-3), torch.bfloat16: Tol(3e-2, 2e-2)}


def forward_cls(log: bool) -> type:
    return mpsnn.MPSCNNLogSoftMax if log else mpsnn.MPSCNNSoftMax


def gradient_cls(log: bool) -> type:
    return mpsnn.MPSCNNLogSoftMaxGradient if log else mpsnn.MPSCNNSoftMaxGradient


def random(seed: int, shape: tuple[int, ...], lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def torch_forward(x: torch.Tensor, log: bool) -> torch.Tensor:
    return torch.log_softmax(x, dim=-1) if log else torch.softmax(x, dim=-1)


def test_public_names() -> None:
    for name in ("MPSCNNSoftMax", "MPSCNNLogSoftMax", "MPSCNNSoftMaxGradient", "MPSCNNLogSoftMaxGradient"):
        assert name in mpsnn.__all__ and isinstance(getattr(mpsnn, name), type)
    assert issubclass(mpsnn.MPSCNNSoftMax, mpsnn.MPSCNNKernel)
    assert issubclass(mpsnn.MPSCNNLogSoftMaxGradient, mpsnn.MPSCNNGradientKernel)


def test_default_properties(device) -> None:
    k = mpsnn.MPSCNNSoftMax(device)
    assert (k.kernel_width, k.kernel_height, k.stride_in_pixels_x, k.stride_in_pixels_y) == (1, 1, 1, 1)
    assert k.offset == MPSOffset(0, 0, 0) and k.edge_mode == MPSImageEdgeMode.zero
    assert k.clip_rect == mpsnn.MPSRectNoClip and k.is_backwards is False
    g = mpsnn.MPSCNNLogSoftMaxGradient(device)
    assert (g.kernel_offset_x, g.kernel_offset_y) == (0, 0)


# -- the reference itself ------------------------------------------------------------------------------


def test_reference_by_hand() -> None:
    x = np.array([[0.0, np.log(3.0)]])
    assert np.allclose(sref.softmax_nhwc(x), [[0.25, 0.75]])
    assert np.allclose(sref.softmax_nhwc(x, log=True), np.log([[0.25, 0.75]]))
    # overflow-safe: a naive exp(1000) is inf
    assert np.allclose(sref.softmax_nhwc(np.array([[1000.0, 1000.0 + np.log(3.0)]])), [[0.25, 0.75]])


@pytest.mark.parametrize("log", KINDS)
def test_reference_gradient_matches_finite_differences(log) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 2, (3, 5))
    g = rng.normal(size=(3, 5))
    y = sref.softmax_nhwc(x, log)
    expected = sref.softmax_gradient_nhwc(g, y, log)
    fd = np.zeros_like(x)
    for k in range(x.shape[1]):
        e = np.zeros_like(x)
        e[:, k] = FD_STEP
        fd[:, k] = ((sref.softmax_nhwc(x + e, log) - sref.softmax_nhwc(x - e, log)) * g).sum(-1) / (2 * FD_STEP)
    assert_close(expected, fd, torch.float64, FD_TOL)


# -- forward ---------------------------------------------------------------------------------------------


def run_forward(device, cb, log: bool, x_img: MPSImage, dtype: torch.dtype):
    k = forward_cls(log)(device)
    dst = poisoned(x_img.shape, device, dtype=dtype)[0]
    state = k.result_state(x_img, destination_image=dst)
    k.encode(cb, x_img, dst, destination_state=state)
    return dst, state


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("log", KINDS)
def test_forward_matches_reference(device, cb, log, dtype) -> None:
    x_img, x = image(random(1, SHAPE), device, dtype)
    dst, _ = run_forward(device, cb, log, x_img, dtype)
    finish(cb)
    got = values(dst)
    assert_close(got, sref.softmax_nhwc(x, log), dtype, msg="forward")
    if not log:
        assert_close(got.sum(-1), np.ones(SHAPE[:3]), dtype, GRAD_TOL, msg="probabilities sum to 1")


@pytest.mark.parametrize("log", KINDS)
def test_forward_is_overflow_safe(device, cb, log) -> None:
    """Inputs whose exp overflows float32 (and float16) still give the exact answer."""
    x = np.array([[[[1000.0, 1000.0, 1000.0, 1000.0], [-3e4, 3e4, 3e4, -3e4], [88.0, 89.0, 90.0, 91.0]]]])
    for dtype in (torch.float32, torch.float16):
        x_img, xr = image(x, device, dtype)
        dst, _ = run_forward(device, cb, log, x_img, dtype)
        finish(cb)
        got = values(dst)
        assert np.isfinite(got).all()
        assert_close(got, sref.softmax_nhwc(xr, log), dtype)
        cb = device.make_command_queue().make_command_buffer()


def test_forward_exact_values(device, cb) -> None:
    """Equal inputs: exactly 1/N (N a power of two) and -ln N."""
    x_img, _ = image(np.full((1, 2, 2, 4), 7.5), device)
    y = poisoned((1, 2, 2, 4), device)[0]
    ly = poisoned((1, 2, 2, 4), device)[0]
    mpsnn.MPSCNNSoftMax(device).encode(cb, x_img, y)
    mpsnn.MPSCNNLogSoftMax(device).encode(cb, x_img, ly)
    finish(cb)
    assert np.array_equal(values(y), np.full((1, 2, 2, 4), 0.25))
    assert_close(values(ly), np.full((1, 2, 2, 4), -np.log(4.0)), torch.float32)


def test_single_channel_gives_one_and_zero(device, cb) -> None:
    x_img, _ = image(random(2, (2, 3, 1, 1)), device)
    y, ly = poisoned((2, 3, 1, 1), device)[0], poisoned((2, 3, 1, 1), device)[0]
    mpsnn.MPSCNNSoftMax(device).encode(cb, x_img, y)
    mpsnn.MPSCNNLogSoftMax(device).encode(cb, x_img, ly)
    finish(cb)
    assert np.array_equal(values(y), np.ones((2, 3, 1, 1)))
    assert np.array_equal(values(ly), np.zeros((2, 3, 1, 1)))


def test_nan_stays_in_its_pixel(device, cb) -> None:
    x = random(3, (1, 1, 3, 4))
    x[0, 0, 1, 2] = np.nan
    x_img, xr = image(x, device)
    y = poisoned((1, 1, 3, 4), device)[0]
    mpsnn.MPSCNNSoftMax(device).encode(cb, x_img, y)
    finish(cb)
    got = values(y)
    assert np.isnan(got[0, 0, 1]).all()
    assert_close(got[0, 0, [0, 2]], sref.softmax_nhwc(xr[0, 0, [0, 2]]), torch.float32)


def test_unorm8_destination(device, cb) -> None:
    x_img, x = image(random(4, (1, 3, 4, 3)), device)
    desc = mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.unorm8, width=4, height=3, feature_channels=3)
    dst = MPSImage(device, image_descriptor=desc)
    mpsnn.MPSCNNSoftMax(device).encode(cb, x_img, dst)
    finish(cb)
    got = values(dst)
    assert_close(got, sref.softmax_nhwc(x), "unorm8")
    assert np.array_equal(got.astype(np.float32), (np.round(got * 255.0) / 255.0).astype(np.float32))


# -- forward geometry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    id: str
    src: tuple[int, int, int, int]
    dst: tuple[int, int, int, int]
    offset: tuple[int, int, int] = (0, 0, 0)
    clip: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    src_c_off: int = 0
    src_c_max: int | None = None
    dst_c_off: int = 0
    edge: MPSImageEdgeMode = MPSImageEdgeMode.zero

    def configure(self, k: Any) -> None:
        k.offset = MPSOffset(*self.offset)
        if self.clip is not None:
            k.clip_rect = region(*self.clip)
        k.source_feature_channel_offset = self.src_c_off
        if self.src_c_max is not None:
            k.source_feature_channel_max_count = self.src_c_max
        k.destination_feature_channel_offset = self.dst_c_off
        k.edge_mode = self.edge

    def forward_reference(self, x: np.ndarray, dest: np.ndarray, log: bool) -> np.ndarray:
        return ref.unary_kernel_reference(x, dest, offset=self.offset, clip_rect=self.clip, src_c_off=self.src_c_off,
                                          src_c_max=self.src_c_max, dst_c_off=self.dst_c_off, edge_mode=self.edge,
                                          fn=lambda v: sref.softmax_nhwc(v, log))


Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
GEOMETRIES = [
    Geometry("1x1_c5", (2, 1, 1, 5), (2, 1, 1, 5)),
    Geometry("neg_offset_zero", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-2, -1, 0), edge=Z),
    Geometry("neg_offset_clamp", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-2, -1, 0), edge=C),
    Geometry("smaller_dest_offset", (1, 5, 7, 6), (1, 3, 4, 6), offset=(2, 1, 0)),
    Geometry("clip_partly_outside", (1, 5, 6, 5), (1, 5, 6, 5), clip=((3, 1, 0), (10, 10, 1))),
    Geometry("clip_and_offset_clamp", (1, 5, 6, 3), (1, 4, 7, 3), offset=(-1, 2, 0), clip=((2, 1, 0), (6, 9, 1)), edge=C),
    Geometry("src_channel_offset_and_max", (1, 3, 4, 11), (1, 3, 4, 5), src_c_off=4, src_c_max=5),
    Geometry("dst_channel_offset", (2, 3, 4, 3), (2, 3, 4, 12), dst_c_off=8),
    Geometry("batch_offset_z_clip_depth", (3, 2, 3, 5), (3, 2, 3, 5), offset=(0, 0, 2), clip=((0, 0, 1), (9, 9, 1))),
    Geometry("everything", (3, 4, 5, 9), (2, 5, 6, 12), offset=(-1, 1, 1), clip=((1, 1, 1), (9, 3, 1)),
             src_c_off=4, src_c_max=3, dst_c_off=4, edge=C),
]


@pytest.mark.parametrize("log", KINDS)
@pytest.mark.parametrize("geom", [pytest.param(g, id=g.id) for g in GEOMETRIES])
def test_forward_geometry(device, cb, geom: Geometry, log) -> None:
    seed = sum(map(ord, geom.id))
    x_img, x = image(random(seed, geom.src), device)
    dst, before = poisoned(geom.dst, device, POISON)
    k = forward_cls(log)(device)
    geom.configure(k)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = geom.forward_reference(x, before, log)
    assert (expected != before).any(), "the case must write something"
    assert_close(values(dst), expected, torch.float32, msg=geom.id)


def test_forward_geometry_low_precision(device, cb) -> None:
    geom = GEOMETRIES[-1]
    for dtype in (torch.float16, torch.bfloat16):
        x_img, x = image(random(5, geom.src), device, dtype)
        dst, before = poisoned(geom.dst, device, POISON, dtype)
        k = mpsnn.MPSCNNLogSoftMax(device)
        geom.configure(k)
        k.encode(cb, x_img, dst)
        finish(cb)
        assert_close(values(dst), geom.forward_reference(x, before, True), dtype)
        cb = device.make_command_queue().make_command_buffer()


# -- encode forms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", KINDS)
def test_auto_forms_and_batch(device, cb, log) -> None:
    xs = [image(random(10 + i, (1, 2, 3, 6)), device) for i in range(3)]
    dys = [image(random(20 + i, (1, 2, 3, 6)), device) for i in range(3)]
    k = forward_cls(log)(device)
    k.offset = MPSOffset(1, 1, 0)                       # replaced by the padding policy
    k.destination_image_allocator = MPSImage.default_allocator
    single = k.encode(cb, xs[0][0])
    assert k.offset == MPSOffset(0, 0, 0) and single.shape == (1, 2, 3, 6)
    ys, states = k.encode_batch(cb, [x for x, _ in xs], destination_state_is_temporary=False)
    assert len(ys) == 3 and all(isinstance(s, mpsnn.MPSNNGradientState) for s in states)
    explicit = [poisoned((1, 2, 3, 6), device)[0] for _ in range(3)]
    k.encode_batch(cb, [x for x, _ in xs], explicit)
    g = gradient_cls(log)(device)
    g.destination_image_allocator = MPSImage.default_allocator
    dxs = g.encode_batch(cb, [d for d, _ in dys], ys, states)
    dxs_explicit = [poisoned((1, 2, 3, 6), device)[0] for _ in range(3)]
    g.encode_batch(cb, [d for d, _ in dys], ys, states, dxs_explicit)
    finish(cb)
    assert_close(values(single), sref.softmax_nhwc(xs[0][1], log), torch.float32)
    for i, (_, x) in enumerate(xs):
        y = sref.softmax_nhwc(x, log)
        assert_close(values(ys[i]), y, torch.float32)
        assert_close(values(explicit[i]), y, torch.float32)
        expected = sref.softmax_gradient_nhwc(dys[i][1], values(ys[i]), log)
        assert_close(values(dxs[i]), expected, torch.float32)
        assert_close(values(dxs_explicit[i]), expected, torch.float32)


def test_temporary_state_is_consumed(device, cb) -> None:
    x_img, x = image(random(30, (1, 2, 2, 5)), device)
    dy_img, dy = image(random(31, (1, 2, 2, 5)), device)
    y, state = mpsnn.MPSCNNSoftMax(device).encode(cb, x_img, destination_state_is_temporary=True)
    assert state.is_temporary and state.read_count == 1
    g = mpsnn.MPSCNNSoftMaxGradient(device)
    out = poisoned((1, 2, 2, 5), device)[0]
    y.read_count = 2
    g.encode(cb, dy_img, y, state, out)
    assert state.read_count == 0
    with pytest.raises(mpsnn.MPSStateError, match="MPSCNNSoftMaxGradient"):
        g.encode(cb, dy_img, y, state, poisoned((1, 2, 2, 5), device)[0])
    finish(cb)
    assert_close(values(out), sref.softmax_gradient_nhwc(dy, sref.softmax_nhwc(x)), torch.float32)


# -- gradients ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("log", KINDS)
def test_gradient_matches_reference(device, cb, log, dtype) -> None:
    x_img, _ = image(random(40, SHAPE), device, dtype)
    dy_img, dy = image(np.random.default_rng(41).normal(size=SHAPE), device, dtype)
    y_img, state = run_forward(device, cb, log, x_img, dtype)
    dx = poisoned(SHAPE, device, dtype=dtype)[0]
    gradient_cls(log)(device).encode(cb, dy_img, y_img, state, dx)
    finish(cb)
    # the kernel's secondary input is the stored forward result: the reference uses it too
    assert_close(values(dx), sref.softmax_gradient_nhwc(dy, values(y_img), log), dtype, GRAD_TOL)


@pytest.mark.parametrize("log", KINDS)
def test_gradient_matches_autograd(device, cb, log) -> None:
    x_img, x = image(random(50, SHAPE), device)
    dy_img, dy = image(np.random.default_rng(51).normal(size=SHAPE), device)
    y_img, state = run_forward(device, cb, log, x_img, torch.float32)
    dx = poisoned(SHAPE, device)[0]
    gradient_cls(log)(device).encode(cb, dy_img, y_img, state, dx)
    finish(cb)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch_forward(xt, log)
    assert_close(yt.detach(), sref.softmax_nhwc(x, log), torch.float64, msg="torch forward == reference")
    (expected,) = torch.autograd.grad(yt, xt, grad_outputs=torch.from_numpy(dy))
    assert_close(values(dx), expected, torch.float32, msg="gradient vs autograd")


@pytest.mark.parametrize("log", KINDS)
def test_gradient_uses_the_forward_result_not_the_source(device, cb, log) -> None:
    """Passing the forward source as `source_image` gives a different (wrong) answer: the
    kernel really reads its secondary input as the forward result."""
    x_img, x = image(random(52, (1, 2, 3, 4)), device)
    dy_img, dy = image(random(53, (1, 2, 3, 4)), device)
    y_img, state = run_forward(device, cb, log, x_img, torch.float32)
    right, wrong = poisoned((1, 2, 3, 4), device)[0], poisoned((1, 2, 3, 4), device)[0]
    g = gradient_cls(log)(device)
    g.encode(cb, dy_img, y_img, state, right)
    g.encode(cb, dy_img, x_img, state, wrong)
    finish(cb)
    assert_close(values(wrong), sref.softmax_gradient_nhwc(dy, x, log), torch.float32)
    assert not np.allclose(values(right), values(wrong))


GRAD_GEOMETRIES = [
    Geometry("plain", (2, 3, 4, 5), (2, 3, 4, 5)),
    Geometry("neg_offset", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-1, -2, 0)),
    Geometry("pos_offset_smaller_dest", (1, 5, 6, 3), (1, 3, 4, 3), offset=(1, 2, 0)),
    Geometry("clip_and_offset", (1, 4, 5, 3), (1, 3, 6, 3), offset=(-1, 1, 0), clip=((1, 0, 0), (3, 2, 1))),
    Geometry("src_channel_window", (1, 3, 4, 11), (1, 3, 4, 5), src_c_off=4, src_c_max=5),
    Geometry("dst_channel_offset", (1, 3, 4, 8), (1, 3, 4, 12), src_c_off=4, dst_c_off=4),
    Geometry("batch3_clip", (3, 2, 3, 3), (3, 2, 3, 3), offset=(1, 0, 0), clip=((0, 1, 0), (9, 9, 3))),
]


@pytest.mark.parametrize("form", ["explicit", "auto"])
@pytest.mark.parametrize("log", KINDS)
@pytest.mark.parametrize("geom", [pytest.param(g, id=g.id) for g in GRAD_GEOMETRIES])
def test_gradient_through_forward_geometry(device, cb, geom: Geometry, log, form) -> None:
    seed = sum(map(ord, geom.id))
    x_img, x = image(random(seed, geom.src), device)
    dy_img, dy = image(random(seed + 1, geom.dst), device)
    y_img, _ = poisoned(geom.dst, device, POISON)        # unwritten pixels keep poison: must not leak
    k = forward_cls(log)(device)
    geom.configure(k)
    state = k.result_state(x_img, destination_image=y_img)
    k.encode(cb, x_img, y_img, destination_state=state)
    g = gradient_cls(log)(device)
    if form == "explicit":
        dx, before = poisoned(geom.src, device, POISON)
        g.encode(cb, dy_img, y_img, state, dx)
    else:
        g.destination_image_allocator = MPSImage.default_allocator
        dx = g.encode(cb, dy_img, y_img, state)
        assert dx.shape == geom.src
        before = np.zeros(geom.src)
    finish(cb)
    expected = sref.destination_aligned_gradient_reference(
        dy, values(y_img), geom.src, before, offset=geom.offset, clip_rect=geom.clip, src_c_off=geom.src_c_off,
        src_c_max=geom.src_c_max, dst_c_off=geom.dst_c_off, fn=lambda gg, ss: sref.softmax_gradient_nhwc(gg, ss, log))
    assert_close(values(dx), expected, torch.float32, msg=geom.id)


def test_gradient_without_state_uses_kernel_properties(device, cb) -> None:
    """gradient_state=None: the kernel's own primary/secondary offsets and channel windows."""
    dy_img, dy = image(random(60, (1, 3, 4, 8)), device)
    y_img, y = image(sref.softmax_nhwc(random(61, (1, 4, 5, 4))), device)
    g = mpsnn.MPSCNNSoftMaxGradient(device)
    g.primary_source_feature_channel_offset = 4
    g.secondary_offset = MPSOffset(1, 1, 0)
    dx, _ = poisoned((1, 3, 4, 4), device)
    g.encode(cb, dy_img, y_img, None, dx)
    finish(cb)
    expected = sref.softmax_gradient_nhwc(dy[..., 4:8], y[:, 1:4, 1:5, :])
    assert_close(values(dx), expected, torch.float32)


# -- errors ---------------------------------------------------------------------------------------------------


def test_error_gradient_channel_mismatch(device, cb) -> None:
    dy_img, _ = image(random(70, (1, 2, 2, 5)), device)
    y_img, _ = image(random(71, (1, 2, 2, 3)), device)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNSoftMaxGradient: `source_gradient`.*match the 3 channels"):
        mpsnn.MPSCNNSoftMaxGradient(device).encode(cb, dy_img, y_img, None, poisoned((1, 2, 2, 5), device)[0])


def test_error_source_image_is_not_the_forward_result(device, cb) -> None:
    """With a state, `source_image` must have the forward destination's size: a forward
    source of another size (a common porting mistake) is refused, not silently misread."""
    x_img, _ = image(random(72, (1, 5, 6, 3)), device)
    y_img, _ = poisoned((1, 3, 4, 3), device, 0.0)
    k = mpsnn.MPSCNNSoftMax(device)
    k.offset = MPSOffset(1, 1, 0)
    state = k.result_state(x_img, destination_image=y_img)
    k.encode(cb, x_img, y_img, destination_state=state)
    dy_img, _ = image(random(73, (1, 3, 4, 3)), device)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNSoftMaxGradient: `source_image` \(='6x5'\) must be the forward result"):
        mpsnn.MPSCNNSoftMaxGradient(device).encode(cb, dy_img, x_img, state, poisoned((1, 5, 6, 3), device)[0])


def test_error_destination_too_few_channels(device, cb) -> None:
    x_img, _ = image(random(74, (1, 2, 2, 5)), device)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNLogSoftMax: `destination_image.feature_channels`"):
        mpsnn.MPSCNNLogSoftMax(device).encode(cb, x_img, poisoned((1, 2, 2, 4), device)[0])


def test_error_bad_edge_mode_and_channel_offset(device) -> None:
    k = mpsnn.MPSCNNSoftMax(device)
    with pytest.raises(mpsnn.MPSValueError, match="source_feature_channel_offset"):
        k.source_feature_channel_offset = 3
    with pytest.raises(mpsnn.MPSValueError, match="edge_mode"):
        k.edge_mode = 17


def test_error_gradient_takes_no_forward_state_of_batch_addressing(device, cb) -> None:
    x_img, _ = image(random(75, (3, 2, 3, 3)), device)
    y_img, _ = poisoned((2, 2, 3, 3), device)
    k = mpsnn.MPSCNNSoftMax(device)
    k.offset = MPSOffset(0, 0, 1)
    state = k.result_state(x_img, destination_image=y_img)
    k.encode(cb, x_img, y_img, destination_state=state)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSCNNSoftMaxGradient: `gradient_state`"):
        mpsnn.MPSCNNSoftMaxGradient(device).encode(cb, y_img, y_img, state, poisoned((3, 2, 3, 3), device)[0])


# -- backend contract ---------------------------------------------------------------------------------------------


def test_backend_functions_on_plain_tensors() -> None:
    x = torch.from_numpy(random(80, (2, 3, 5)))
    g = torch.from_numpy(random(81, (2, 3, 5)))
    for log in (False, True):
        y = backend.softmax_nhwc(x.half(), log)
        assert y.dtype == torch.float32 and y.shape == x.shape
        y64 = backend.softmax_nhwc(x, log)
        assert y64.dtype == torch.float64
        assert_close(y64, sref.softmax_nhwc(x.numpy(), log), torch.float64)
        assert_close(backend.softmax_gradient_nhwc(g, y64, log), sref.softmax_gradient_nhwc(g.numpy(), y64.numpy(), log), torch.float64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_backend_does_not_synchronise_the_host() -> None:
    x = torch.randn(4, 8, 8, 16, device="cuda", dtype=torch.bfloat16)
    for log in (False, True):
        backend.softmax_gradient_nhwc(x, backend.softmax_nhwc(x, log), log)  # warm up outside the check
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for log in (False, True):
                backend.softmax_gradient_nhwc(x, backend.softmax_nhwc(x, log), log)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
