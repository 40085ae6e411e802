"""Pooling gradient kernels (spec/pooling.md §7) against two oracles: the float64 reference
``mpsnn.testing.reference_pooling`` (tap by tap) and torch.autograd in float64 on an
equivalent torch forward written here (the tap block gathered with clamped indices, masked for
edge mode zero, then torch pooling), driven by a RANDOM upstream gradient. Also: the
properties the gradient state sets, the kernel driven by its own properties (no state), the
y0 origin rule, exact tie / edge rules, 16-bit images, encode_batch, errors."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn import MPSImageEdgeMode, MPSNNDefaultPadding, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn import MPSNNPaddingMethod as PM
from mpsnn.testing import reference_pooling as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
F64 = "float64"
#: Per-op override: float32 gradient sums of up to ~9 window contributions
GRAD_TOL = {"float32": Tol(1e-5, 1e-6)}
FWD = {"max": m.MPSCNNPoolingMax, "average": m.MPSCNNPoolingAverage, "l2": m.MPSCNNPoolingL2Norm}
GRAD = {"max": m.MPSCNNPoolingMaxGradient, "average": m.MPSCNNPoolingAverageGradient, "l2": m.MPSCNNPoolingL2NormGradient}
TF_SAME = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def torch_forward(xt: torch.Tensor, mode: str, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                  offset: tuple[int, int], out: tuple[int, int], clamp: bool, zero_pad: tuple[int, int]) -> torch.Tensor:
    """The §2-6 forward in torch (float64, differentiable): ``xt`` NHWC, output ``out = (w, h)``
    windows centred at ``offset + stride·i``. Returns NHWC."""
    n, h, w, c = xt.shape
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    first = [o - e // 2 for o, e in zip(offset, ext)]
    span = [(o - 1) * s + e for o, s, e in zip(out, stride, ext)]
    xi = torch.arange(span[0]) + first[0]
    yi = torch.arange(span[1]) + first[1]
    inside = ((yi >= 0) & (yi < h))[:, None] & ((xi >= 0) & (xi < w))[None, :]
    blk = xt.permute(0, 3, 1, 2)[:, :, yi.clamp(0, h - 1)][:, :, :, xi.clamp(0, w - 1)]
    ks, ss, ds = (kernel[1], kernel[0]), (stride[1], stride[0]), (dilation[1], dilation[0])
    if mode == "average":
        blk = blk * inside
        s = F.avg_pool2d(blk, ks, ss, divisor_override=1)
        if not clamp:
            return (s / (kernel[0] * kernel[1])).permute(0, 2, 3, 1)
        widened = (((yi >= -zero_pad[1]) & (yi < h + zero_pad[1]))[:, None] & ((xi >= -zero_pad[0]) & (xi < w + zero_pad[0]))[None, :])
        cnt = F.avg_pool2d(widened.double()[None, None], ks, ss, divisor_override=1)
        has = F.avg_pool2d(inside.double()[None, None], ks, ss, divisor_override=1) > 0
        return torch.where(has & (cnt > 0), s / cnt.clamp(min=1), torch.zeros(())).permute(0, 2, 3, 1)
    if not clamp:
        blk = blk * inside
    if mode == "max":
        return F.max_pool2d(blk, ks, ss, 0, ds).permute(0, 2, 3, 1)
    return F.avg_pool2d(blk * blk, ks, ss, divisor_override=1).sqrt().permute(0, 2, 3, 1)


def autograd_dx(x: np.ndarray, e: np.ndarray, mode: str, kernel, stride, dilation, offset, clamp: bool, zero_pad) -> np.ndarray:  # type: ignore[no-untyped-def]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = torch_forward(xt, mode, kernel, stride, dilation, offset, (e.shape[2], e.shape[1]), clamp, zero_pad)
    y.backward(torch.tensor(e, dtype=torch.float64))
    return xt.grad.numpy()  # type: ignore[union-attr]


@dataclass(frozen=True)
class GCase:
    id: str
    mode: str
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] | None = None
    padding: object = int(PM.sizeSame)
    edge: MPSImageEdgeMode = Z
    zero_pad: tuple[int, int] = (0, 0)
    src: tuple[int, int, int, int] = (2, 7, 8, 3)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def dil(self) -> tuple[int, int]:
        return self.dilation or (1, 1)

    def make(self, device: m.Device) -> tuple[m.MPSCNNPooling, m.MPSCNNPoolingGradient]:
        (kw, kh), (sx, sy) = self.kernel, self.stride
        if self.dilation is not None:
            f: m.MPSCNNPooling = m.MPSCNNDilatedPoolingMax(device, kw, kh, self.dilation[0], self.dilation[1], sx, sy)
            g: m.MPSCNNPoolingGradient = m.MPSCNNDilatedPoolingMaxGradient(device, kernel_width=kw, kernel_height=kh, dilation_rate_x=self.dilation[0],
                                                                          dilation_rate_y=self.dilation[1], stride_in_pixels_x=sx, stride_in_pixels_y=sy)
        else:
            f = FWD[self.mode](device, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=sx, stride_in_pixels_y=sy)
            g = GRAD[self.mode](device, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=sx, stride_in_pixels_y=sy)
        f.padding = self.padding
        f.edge_mode = self.edge
        if self.mode == "average":
            f.zero_pad_size_x, f.zero_pad_size_y = self.zero_pad
        return f, g


GCASES = [
    GCase("max_k2s2_same", "max", (2, 2), (2, 2), src=(2, 6, 8, 3)),
    GCase("max_k3s1_overlap_zero", "max", (3, 3), (1, 1)),
    GCase("max_k3s2_tf_same_clamp", "max", (3, 3), (2, 2), padding=TF_SAME),
    GCase("max_k2s3_full_stride_gt_kernel", "max", (2, 2), (3, 3), padding=int(PM.sizeFull)),
    GCase("max_k3_full_clamp", "max", (3, 2), (2, 1), padding=int(PM.sizeFull), edge=C),
    GCase("avg_k3s2_same_zero", "average", (3, 3), (2, 2)),
    GCase("avg_k3s2_tf_same", "average", (3, 3), (2, 2), padding=TF_SAME),
    GCase("avg_k3_full_clamp_zero_pad", "average", (3, 3), (2, 1), padding=int(PM.sizeFull), edge=C, zero_pad=(1, 2)),
    GCase("avg_k4x2_valid", "average", (4, 2), (1, 2), padding=int(PM.sizeValidOnly)),
    GCase("avg_full_exclude_edges", "average", (3, 3), (2, 2), padding=int(PM.sizeFull | PM.excludeEdges)),
    GCase("l2_k3s2_same_zero", "l2", (3, 3), (2, 2)),
    GCase("l2_k2x3_full_clamp", "l2", (2, 3), (1, 2), padding=int(PM.sizeFull), edge=C),
    GCase("dilated_k2d3_same", "max", (2, 3), (1, 2), dilation=(3, 2)),
    GCase("dilated_k3d2_full_clamp", "max", (3, 2), (2, 1), dilation=(2, 3), padding=int(PM.sizeFull), edge=C),
    # valid-only, remainder bottom-right, 2 unused source pixels: offset 2 > floor(3/2), so y0 = 1
    GCase("max_valid_br_y0_1", "max", (3, 3), (3, 3), padding=int(PM.sizeValidOnly | PM.addRemainderToBottomRight), src=(1, 11, 11, 2)),
    GCase("avg_image_1x1", "average", (3, 3), (1, 1), edge=C, src=(1, 1, 1, 2)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GCASES])
def test_gradient_from_state(device, cb, case: GCase) -> None:
    """Forward auto-encode with a state, gradient auto-encode with it: the result is the
    forward source's size and equals dL/dx from both oracles."""
    f, g = case.make(device)
    x_img, x = image(rand(case.seed, case.src), device)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=True)
    e_img, e = image(rand(case.seed + 1, y.shape), device)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert dx.shape == x_img.shape
    clamp = f.edge_mode == C
    zp = (f.zero_pad_size_x, f.zero_pad_size_y) if case.mode == "average" else (0, 0)
    off = (f.offset.x, f.offset.y)
    ref = R.pooling_gradient_from_forward(e, x, np.full(x.shape, np.nan), mode=case.mode, kernel=case.kernel, stride=case.stride,
                                          dilation=case.dil, offset=(*off, 0), edge_mode="clamp" if clamp else "zero", zero_pad=zp)
    auto = autograd_dx(x, e, case.mode, case.kernel, case.stride, case.dil, off, clamp, zp)
    assert_close(ref, auto, F64, msg="reference vs autograd")
    assert_close(values(dx), ref, "float32", GRAD_TOL, msg=f"{case.id} vs reference")
    assert_close(values(dx), auto, "float32", GRAD_TOL, msg=f"{case.id} vs autograd")
    # the state configured the kernel
    assert g.secondary_offset == MPSOffset(*off, 0) and g.primary_offset == MPSOffset(0, 0, 0)
    assert g.secondary_edge_mode == f.edge_mode
    if case.id == "max_valid_br_y0_1":
        assert off == (2, 2) and (g.clip_rect.origin.x, g.clip_rect.origin.y) == (1, 1)
    if case.mode == "average":
        assert (g.zero_pad_size_x, g.zero_pad_size_y) == zp


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GCASES if c.id in ("max_k3s1_overlap_zero", "avg_k3s2_tf_same", "l2_k2x3_full_clamp")])
def test_gradient_16bit(device, cb, case: GCase, dtype: torch.dtype) -> None:
    """16-bit images: the reference on the rounded inputs; one rounding on store."""
    f, g = case.make(device)
    x_img, x = image(rand(case.seed, case.src), device, dtype)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    e_img, e = image(rand(case.seed + 1, y.shape), device, dtype)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert dx.dtype == dtype
    zp = (f.zero_pad_size_x, f.zero_pad_size_y) if case.mode == "average" else (0, 0)
    ref = R.pooling_gradient_from_forward(e, x, np.zeros(x.shape), mode=case.mode, kernel=case.kernel, stride=case.stride, dilation=case.dil,
                                          offset=(f.offset.x, f.offset.y, 0), edge_mode="clamp" if f.edge_mode == C else "zero", zero_pad=zp)
    assert_close(values(dx), ref, dtype)


@pytest.mark.parametrize("mode", ["max", "average", "l2"])
def test_gradient_state_with_forward_offset_clip_and_channels(device, cb, mode: str) -> None:
    """Explicit forward destination with offset, clip rect and channel windows; the explicit
    gradient destination gets the forward channel window (the rest untouched) in full."""
    case = GCase("explicit", mode, (3, 2), (2, 1), edge=C, zero_pad=(1, 0))
    f, g = case.make(device)
    f.offset = MPSOffset(-1, 2, 0)
    f.clip_rect = region((1, 0, 0), (2, 3, 2))
    f.source_feature_channel_offset = 4
    f.source_feature_channel_max_count = 3
    f.destination_feature_channel_offset = 4
    x_img, x = image(rand(7, (2, 6, 7, 8)), device)
    y, _ = poisoned((2, 4, 4, 8), device, 0.0)
    state = f.result_state(x_img, destination_image=y)
    f.encode(cb, x_img, y, destination_state=state)
    e_img, e = image(rand(8, y.shape), device)
    dx, before = poisoned(x_img.shape, device)
    g.encode(cb, e_img, x_img, state, dx)
    finish(cb)
    ref = R.pooling_gradient_from_forward(e, x, before, mode=mode, kernel=case.kernel, stride=case.stride, offset=(-1, 2, 0),
                                          clip_rect=((1, 0, 0), (2, 3, 2)), edge_mode="clamp", zero_pad=(1, 0) if mode == "average" else (0, 0),
                                          src_c_off=4, channels=3, dst_c_off=4)
    assert_close(values(dx), ref, "float32", GRAD_TOL)
    assert np.isnan(values(dx)[..., :4]).all() and np.isnan(values(dx)[..., 7:]).all()
    # autograd on the clip region of the incoming gradient, forward offset at the clip origin
    auto = autograd_dx(x[..., 4:7], e[:, 0:3, 1:3, 4:7], mode, case.kernel, case.stride, (1, 1), (-1, 2), True,
                       (1, 0) if mode == "average" else (0, 0))
    assert_close(values(dx)[..., 4:7], auto, "float32", GRAD_TOL)


@pytest.mark.parametrize("edge", [Z, C], ids=["zero", "clamp"])
@pytest.mark.parametrize("mode", ["max", "average", "l2"])
def test_gradient_own_properties(device, cb, mode: str, edge: MPSImageEdgeMode) -> None:
    """No gradient state: primary_offset, source_size, secondary_offset, clip_rect and the
    y0 origin rule as set (secondary_offset 3 with kernel 3 -> y0 = 2)."""
    case = GCase("own", mode, (3, 3), (2, 1))
    _, g = case.make(device)
    g.primary_offset = MPSOffset(1, -1, 0)
    g.source_size = MTLSize(3, 9, 1)
    g.secondary_offset = MPSOffset(3, 0, 1)
    g.secondary_edge_mode = edge
    g.clip_rect = region((1, 1, 0), (5, 4, 1))
    if mode == "average":
        g.zero_pad_size_x = 1
    e_img, e = image(rand(11, (1, 5, 6, 2)), device)
    x_img, x = image(rand(12, (2, 6, 9, 2)), device)
    dx, before = poisoned((1, 6, 7, 2), device)
    g.encode(cb, e_img, x_img, None, dx)
    finish(cb)
    ref = R.pooling_gradient(e, x, before, mode=mode, kernel=(3, 3), stride=(2, 1), primary_offset=(1, -1, 0), source_size=(3, 9, 1),
                             secondary_offset=(3, 0, 1), clip_rect=((1, 1, 0), (5, 4, 1)), edge_mode="clamp" if edge == C else "zero",
                             zero_pad=(1, 0) if mode == "average" else (0, 0))
    assert_close(values(dx), ref, "float32", GRAD_TOL)
    assert np.isnan(values(dx)[:, 0]).all() and np.isnan(values(dx)[:, :, 0]).all(), "outside the clip rect: untouched"


def test_max_gradient_ties_and_edges(device, cb) -> None:
    """Exact: ties go to the first maximal tap in scan order; a winning off-image zero drops
    the gradient (zero); a winning clamped tap gives it to the edge pixel (clamp)."""
    x = np.array([[-1.0, 2.0, 2.0], [2.0, -3.0, -4.0]])[None, :, :, None]
    x_img, _ = image(x, device)
    g = m.MPSCNNPoolingMaxGradient(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=1, stride_in_pixels_y=1)
    g.secondary_offset = MPSOffset(1, 1, 0)
    e_img, _ = image(np.array([[[[4.0], [8.0]]]]), device)            # windows: columns {0,1} and {1,2}
    dx, _ = poisoned((1, 2, 3, 1), device)
    g.encode(cb, e_img, x_img, None, dx)
    g2 = m.MPSCNNPoolingMaxGradient(device, kernel_width=2, kernel_height=2)
    g2.secondary_offset = MPSOffset(3, 2, 0)                          # window columns {2, 3}, rows {1, 2}: max is off-image
    e1, _ = image(np.array([[[[5.0]]]]), device)
    dz, _ = poisoned((1, 2, 3, 1), device)
    g2.clip_rect = region((0, 0, 0), (3, 2, 1))
    g2.encode(cb, e1, x_img, None, dz)
    g2.secondary_edge_mode = C
    dc, _ = poisoned((1, 2, 3, 1), device)
    g2.encode(cb, e1, x_img, None, dc)
    finish(cb)
    # both windows tie at 2.0; the first in scan order is (0, 1) for both
    np.testing.assert_array_equal(values(dx)[0, :, :, 0], [[0.0, 12.0, 0.0], [0.0, 0.0, 0.0]])
    # y0 = max(0, 3 - 1) = 2 on x, max(0, 2 - 1) = 1 on y: result pixel (0, 0) is source (2, 1)
    np.testing.assert_array_equal(values(dz)[0, :, :, 0], np.zeros((2, 3)))
    # clamp: taps (2,1), (3,1)->(2,1), (2,2)->(2,1), (3,2)->(2,1): first maximal is (2,1) = -4
    np.testing.assert_array_equal(values(dc)[0, :, :, 0], [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_gradient_encode_batch(device, cb) -> None:
    case = GCASES[6]
    f, g = case.make(device)
    xs = [image(rand(20 + i, (1, 5, 6, 3)), device) for i in range(2)]
    ys, states = f.encode_batch(cb, [i for i, _ in xs], destination_state_is_temporary=True)
    es = [image(rand(30 + i, y.shape), device) for i, y in enumerate(ys)]
    dxs = g.encode_batch(cb, [i for i, _ in es], [i for i, _ in xs], states)
    finish(cb)
    for (_, x), (_, e), dx in zip(xs, es, dxs):
        ref = R.pooling_gradient_from_forward(e, x, np.zeros(x.shape), mode="average", kernel=(3, 3), stride=(2, 2),
                                              offset=(f.offset.x, f.offset.y, 0), edge_mode="clamp")
        assert_close(values(dx), ref, "float32", GRAD_TOL)


def test_gradient_properties_and_init_forms(device) -> None:
    g = m.MPSCNNPoolingAverageGradient(device, kernel_width=3, kernel_height=2)
    assert (g.kernel_width, g.kernel_height, g.stride_in_pixels_x, g.stride_in_pixels_y) == (3, 2, 1, 1)
    assert g.source_size == MTLSize(m.core.kernel.ULONG_MAX, m.core.kernel.ULONG_MAX, m.core.kernel.ULONG_MAX)
    assert (g.zero_pad_size_x, g.zero_pad_size_y, g.secondary_edge_mode) == (0, 0, Z)
    d = m.MPSCNNDilatedPoolingMaxGradient(device, 2, 3, 3, 2, 1, 2)
    assert (d.dilation_rate_x, d.dilation_rate_y, d.stride_in_pixels_x, d.stride_in_pixels_y) == (3, 2, 1, 2)
    d1 = m.MPSCNNDilatedPoolingMaxGradient(device, kernel_width=2, kernel_height=2)
    assert (d1.dilation_rate_x, d1.stride_in_pixels_x) == (1, 1)
    assert isinstance(d, m.MPSCNNPoolingMaxGradient) and isinstance(d, m.MPSCNNGradientKernel)


def test_gradient_errors(device, cb) -> None:
    with pytest.raises(m.MPSTypeError, match="abstract"):
        m.MPSCNNPoolingGradient(device, kernel_width=2, kernel_height=2)
    with pytest.raises(m.MPSTypeError, match="unavailable"):
        m.MPSCNNDilatedPoolingMaxGradient(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    with pytest.raises(m.MPSTypeError, match="kernel_width"):
        m.MPSCNNPoolingMaxGradient(device)
    g = m.MPSCNNPoolingMaxGradient(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    with pytest.raises(m.MPSTypeError, match="source_size"):
        g.source_size = (1, 2, 3)  # type: ignore[assignment]
    x_img, _ = image(rand(1, (1, 4, 4, 2)), device)
    f = m.MPSCNNPoolingMax(device, kernel_width=3, kernel_height=3, stride_in_pixels_x=2, stride_in_pixels_y=2)
    y, st = f.encode(cb, x_img, destination_state_is_temporary=False)
    with pytest.raises(m.MPSValueError, match=r"gradient_state.*kernel 3x3"):
        g.encode(cb, y, x_img, st)
    fa = m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    ya, sta = fa.encode(cb, x_img, destination_state_is_temporary=False)
    with pytest.raises(m.MPSValueError, match="MPSCNNPoolingMax"):
        g.encode(cb, ya, x_img, sta)
    e3, _ = image(rand(2, (1, 2, 2, 3)), device)
    with pytest.raises(m.MPSValueError, match="channels"):
        g.encode(cb, e3, x_img, None, poisoned((1, 4, 4, 2), device)[0])
    g.secondary_edge_mode = MPSImageEdgeMode.constant
    dx, _ = poisoned((1, 4, 4, 2), device)
    with pytest.raises(m.MPSValueError, match="secondary_edge_mode"):
        g.encode(cb, ya, x_img, None, dx)
    assert np.isnan(values(dx)).all()
