"""Forward pooling kernels (spec/pooling.md §2-6) against the float64 reference
``mpsnn.testing.reference_pooling`` (taps enumerated one by one from the spec), on every
storage dtype and device: every padding method (and the TensorFlow / excludeEdges policies),
both edge modes, zero-pad sizes, odd and even windows, stride > kernel, dilation, offsets,
clip rects, channel windows, batches, the encode forms; exact checks of the documented window
example, ties and NaN; error cases."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSImageEdgeMode, MPSNNDefaultPadding, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn import MPSNNPaddingMethod as PM
from mpsnn.testing import reference_pooling as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
#: Per-op override: a window sum of up to 9 values in [-1, 1] rounded once to float32
POOL_TOL = {"float32": Tol(1e-5, 1e-6)}
KIND = {"max": m.MPSCNNPoolingMax, "average": m.MPSCNNPoolingAverage, "l2": m.MPSCNNPoolingL2Norm}
TF_SAME = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()
TF_VALID = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling_valid_only()


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


@dataclass(frozen=True)
class PCase:
    id: str
    mode: str
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] | None = None      # MPSCNNDilatedPoolingMax when set
    padding: object = int(PM.sizeSame)
    edge: MPSImageEdgeMode = Z
    zero_pad: tuple[int, int] = (0, 0)
    src: tuple[int, int, int, int] = (2, 7, 8, 3)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def make(self, device: m.Device) -> m.MPSCNNPooling:
        kw, kh = self.kernel
        sx, sy = self.stride
        if self.dilation is not None:
            k: m.MPSCNNPooling = m.MPSCNNDilatedPoolingMax(device, kernel_width=kw, kernel_height=kh, dilation_rate_x=self.dilation[0],
                                                          dilation_rate_y=self.dilation[1], stride_in_pixels_x=sx, stride_in_pixels_y=sy)
        else:
            k = KIND[self.mode](device, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=sx, stride_in_pixels_y=sy)
        k.padding = self.padding
        k.edge_mode = self.edge
        if self.mode == "average":
            k.zero_pad_size_x, k.zero_pad_size_y = self.zero_pad
        return k

    def reference(self, x: np.ndarray, dest: np.ndarray, k: m.MPSCNNPooling, **kw: object) -> np.ndarray:
        zp = (k.zero_pad_size_x, k.zero_pad_size_y) if self.mode == "average" else (0, 0)
        return R.pooling_forward(x, dest, mode=self.mode, kernel=self.kernel, stride=self.stride, dilation=self.dilation or (1, 1),
                                 offset=k.offset, edge_mode="clamp" if k.edge_mode == C else "zero", zero_pad=zp, **kw)  # type: ignore[arg-type]


SAME_BR = int(PM.sizeSame | PM.addRemainderToBottomRight)
CASES = [
    PCase("max_k2s2_same_even", "max", (2, 2), (2, 2), src=(2, 6, 8, 3)),
    PCase("max_k3s2_same_odd", "max", (3, 3), (2, 2), src=(2, 7, 5, 5)),
    PCase("max_k3x2_valid", "max", (3, 2), (1, 1), padding=int(PM.sizeValidOnly)),
    PCase("max_k2s3_full_stride_gt_kernel", "max", (2, 2), (3, 3), padding=int(PM.sizeFull)),
    PCase("max_tf_same_clamp", "max", (3, 3), (2, 2), padding=TF_SAME),
    PCase("max_k4_topleft_clamp", "max", (4, 4), (2, 3), padding=int(PM.alignTopLeft | PM.sizeSame), edge=C),
    PCase("max_k3_bottomright_full_clamp", "max", (3, 2), (2, 1), padding=int(PM.alignBottomRight | PM.sizeFull), edge=C),
    PCase("avg_k3s2_same_zero", "average", (3, 3), (2, 2)),
    PCase("avg_k3s2_tf_same", "average", (3, 3), (2, 2), padding=TF_SAME),
    PCase("avg_k2x3_tf_valid", "average", (2, 3), (2, 2), padding=TF_VALID),
    PCase("avg_k3_full_clamp_zero_pad", "average", (3, 3), (2, 1), padding=int(PM.sizeFull), edge=C, zero_pad=(1, 2)),
    PCase("avg_k4x3_zero_pad_ignored_zero", "average", (4, 3), (3, 2), padding=SAME_BR, zero_pad=(1, 1)),
    PCase("avg_k3s2_full_exclude_edges", "average", (3, 3), (2, 2), padding=int(PM.sizeFull | PM.excludeEdges)),
    PCase("l2_k3s2_same_zero", "l2", (3, 3), (2, 2)),
    PCase("l2_k2_full_clamp", "l2", (2, 3), (1, 2), padding=int(PM.sizeFull), edge=C),
    PCase("dilated_k2d3_same", "max", (2, 3), (1, 2), dilation=(3, 2)),
    PCase("dilated_k3d2_full_clamp", "max", (3, 2), (2, 1), dilation=(2, 3), padding=int(PM.sizeFull), edge=C),
    PCase("max_image_1x1", "max", (3, 3), (1, 1), src=(1, 1, 1, 2)),
    PCase("avg_image_1x1_clamp", "average", (2, 2), (2, 2), edge=C, src=(1, 1, 1, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_forward_auto_sized(device, cb, case: PCase, dtype: torch.dtype) -> None:
    """The auto-sized form: the padding policy sets size and offset; values vs the reference."""
    k = case.make(device)
    x_img, x = image(rand(case.seed, case.src), device, dtype)
    y = k.encode(cb, x_img)
    finish(cb)
    n, h, w, c = case.src
    win = [(kk - 1) * d + 1 for kk, d in zip(case.kernel, case.dilation or (1, 1))]
    method = m.padding.method_of(k.padding)
    r = m.padding.apply_padding_method(method, w, h, win[0], win[1], *case.stride)
    assert y.shape == (n, r.height, r.width, c)
    assert (k.offset.x, k.offset.y) == (r.offset_x, r.offset_y)
    assert y.dtype == dtype
    exp = case.reference(x, np.zeros(y.shape), k)
    assert_close(values(y), exp, dtype, POOL_TOL, msg=case.id)


def test_padding_policy_side_effects(device, cb) -> None:
    """TF policy sets edge mode clamp; excludeEdges sets clamp and the symmetric zero pad."""
    x_img, _ = image(rand(1, (1, 7, 8, 2)), device)
    k = m.MPSCNNPoolingAverage(device, kernel_width=3, kernel_height=3, stride_in_pixels_x=2, stride_in_pixels_y=2)
    k.padding = TF_SAME
    k.encode(cb, x_img)
    assert k.edge_mode == C and (k.zero_pad_size_x, k.zero_pad_size_y) == (0, 0)
    k2 = m.MPSCNNPoolingAverage(device, kernel_width=3, kernel_height=3, stride_in_pixels_x=2, stride_in_pixels_y=2)
    k2.padding = int(PM.sizeFull | PM.excludeEdges)
    k2.encode(cb, x_img)
    # width 8, k 3, s 2, full: dest 5, read 11, extra 3 -> before 2, after 1; height 7: dest 5, extra 4 -> 2, 2
    assert k2.edge_mode == C and (k2.zero_pad_size_x, k2.zero_pad_size_y) == (1, 2)
    finish(cb)


def test_documented_window_example(device, cb) -> None:
    """pooling.md §2.1: source 8x5, clip 3x2, kernel 2x2, stride 3: offset 0 reads columns
    {-1,0},{2,3},{5,6}; offset (1,1) reads {0,1},{3,4},{6,7} (values = column index + 1)."""
    cols = np.broadcast_to(np.arange(1.0, 9.0)[None, None, :, None], (1, 5, 8, 1)).copy()
    x_img, _ = image(cols, device)
    k = m.MPSCNNPoolingMax(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=3, stride_in_pixels_y=3)
    k.clip_rect = region((0, 0, 0), (3, 2, 1))
    y0, _ = poisoned((1, 2, 3, 1), device)
    k.encode(cb, x_img, y0)
    k.offset = MPSOffset(1, 1, 0)
    y1, _ = poisoned((1, 2, 3, 1), device)
    k.encode(cb, x_img, y1)
    finish(cb)
    np.testing.assert_array_equal(values(y0)[0, :, :, 0], [[1, 4, 7]] * 2)
    np.testing.assert_array_equal(values(y1)[0, :, :, 0], [[2, 5, 8]] * 2)


GEOMS = [
    pytest.param(dict(offset=(-2, 3, 0), clip=None, dst=(2, 4, 5, 3)), id="offset_outside"),
    pytest.param(dict(offset=(1, 0, 0), clip=((1, 1, 0), (2, 2, 2)), dst=(2, 4, 5, 3)), id="clip_inside"),
    pytest.param(dict(offset=(0, -1, 1), clip=((2, 0, 1), (9, 9, 1)), dst=(2, 3, 4, 3)), id="clip_partly_outside_batch_z"),
]


@pytest.mark.parametrize("edge", [Z, C], ids=["zero", "clamp"])
@pytest.mark.parametrize("mode", ["max", "average", "l2"])
@pytest.mark.parametrize("geom", GEOMS)
def test_forward_explicit_geometry(device, cb, geom, mode: str, edge: MPSImageEdgeMode) -> None:
    """Explicit destination: offset / clip rect / image addressing as set; only the clip
    region changes (the poisoned rest stays NaN)."""
    case = PCase("explicit", mode, (3, 2), (2, 1), edge=edge, zero_pad=(1, 0))
    k = case.make(device)
    k.offset = MPSOffset(*geom["offset"])
    if geom["clip"] is not None:
        k.clip_rect = region(*geom["clip"])
    x_img, x = image(rand(3, case.src), device)
    y, before = poisoned(geom["dst"], device)
    k.encode(cb, x_img, y)
    finish(cb)
    exp = case.reference(x, before, k, clip_rect=geom["clip"])
    assert_close(values(y), exp, "float32", POOL_TOL)


@pytest.mark.parametrize("mode", ["max", "average", "l2"])
def test_feature_channel_windows(device, cb, mode: str) -> None:
    """source_feature_channel_offset / max_count and destination_feature_channel_offset; the
    other destination channels are untouched; channel count not a multiple of 4."""
    case = PCase("channels", mode, (2, 2), (2, 2), edge=C)
    k = case.make(device)
    k.source_feature_channel_offset = 4
    k.source_feature_channel_max_count = 3
    k.destination_feature_channel_offset = 4
    x_img, x = image(rand(4, (2, 5, 6, 9)), device)
    y, before = poisoned((2, 3, 3, 8), device)
    k.encode(cb, x_img, y)
    finish(cb)
    exp = case.reference(x, before, k, src_c_off=4, src_c_max=3, dst_c_off=4)
    assert_close(values(y), exp, "float32", POOL_TOL)
    assert np.isnan(values(y)[..., :4]).all() and np.isnan(values(y)[..., 7:]).all()


def test_encode_batch_and_states(device, cb) -> None:
    """encode_batch (auto and explicit) equals separate encodes; result states carry the geometry."""
    case = PCase("batch", "average", (3, 3), (2, 2), padding=TF_SAME)
    k = case.make(device)
    imgs = [image(rand(10 + i, (1, 5, 6, 3)), device) for i in range(3)]
    outs, states = k.encode_batch(cb, [i for i, _ in imgs], destination_state_is_temporary=False)
    dests = [poisoned(o.shape, device)[0] for o in outs]
    k.encode_batch(cb, [i for i, _ in imgs], dests)
    finish(cb)
    assert len(states) == 3 and all(isinstance(s, m.MPSNNGradientState) for s in states)
    assert states[0].geometry.edge_mode == C and states[0].geometry.kernel_width == 3
    for (_, x), o, d in zip(imgs, outs, dests):
        exp = case.reference(x, np.zeros(o.shape), k)
        assert_close(values(o), exp, "float32", POOL_TOL)
        assert_close(values(d), exp, "float32", POOL_TOL)


def test_unorm8_destination(device, cb) -> None:
    """A unorm8 destination stores the clamped, rounded result."""
    k = m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    k.offset = MPSOffset(1, 1, 0)
    x_img, x = image(np.abs(rand(5, (1, 4, 4, 2))), device)
    desc = m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.unorm8, width=2, height=2, feature_channels=2)
    y = m.MPSImage(device, image_descriptor=desc)
    k.encode(cb, x_img, y)
    finish(cb)
    exp = R.pooling_forward(x, np.zeros((1, 2, 2, 2)), mode="average", kernel=(2, 2), stride=(2, 2), offset=(1, 1, 0))
    assert_close(values(y), np.clip(exp, 0, 1), "unorm8")


def test_max_ties_nan_and_zero_edge(device, cb) -> None:
    """Exact: NaN taps ignored (all-NaN -> NaN), -inf kept, zero edge reads 0 over negative
    data, clamp restricts to the image."""
    nan, inf = float("nan"), float("inf")
    x = np.array([[nan, -inf, -1.0, -2.0], [nan, nan, -3.0, -4.0]])[None, :, :, None]
    x_img, _ = image(x, device)
    k = m.MPSCNNPoolingMax(device, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    k.offset = MPSOffset(1, 1, 0)
    y, _ = poisoned((1, 1, 2, 1), device)
    k.encode(cb, x_img, y)
    nan_img, _ = image(np.full((1, 2, 2, 1), nan), device)
    ynan, _ = poisoned((1, 1, 1, 1), device, 0.0)
    k.encode(cb, nan_img, ynan)
    k.offset = MPSOffset(3, 1, 0)          # window columns 2..3 and 4 (off-image)
    yz, _ = poisoned((1, 1, 1, 1), device)
    k.clip_rect = region((0, 0, 0), (1, 1, 1))
    k.encode(cb, x_img, yz)
    k.edge_mode = C
    yc, _ = poisoned((1, 1, 1, 1), device)
    k.encode(cb, x_img, yc)
    finish(cb)
    np.testing.assert_array_equal(values(y).ravel(), [-inf, -1.0])
    assert np.isnan(values(ynan)).all()
    # offset 3, kernel 2: columns {2, 3}, rows {0, 1}: all inside -> -1
    np.testing.assert_array_equal(values(yz).ravel(), [-1.0])
    np.testing.assert_array_equal(values(yc).ravel(), [-1.0])
    cb = device.make_command_queue().make_command_buffer()
    k.offset = MPSOffset(5, 1, 0)          # columns {4, 5}: off-image
    k.edge_mode = Z
    yz2, _ = poisoned((1, 1, 1, 1), device)
    k.encode(cb, x_img, yz2)
    k.edge_mode = C
    yc2, _ = poisoned((1, 1, 1, 1), device)
    k.encode(cb, x_img, yc2)
    finish(cb)
    np.testing.assert_array_equal(values(yz2).ravel(), [0.0])
    np.testing.assert_array_equal(values(yc2).ravel(), [-2.0])


def test_average_clamp_window_outside_is_zero(device, cb) -> None:
    """Clamp: a window with no in-image pixel gives 0 even when zero_pad counts pixels."""
    k = m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2)
    k.edge_mode = C
    k.zero_pad_size_x = 3
    k.offset = MPSOffset(-1, 1, 0)          # columns {-2, -1}: padding only
    x_img, _ = image(np.ones((1, 3, 3, 1)), device)
    y, _ = poisoned((1, 1, 1, 1), device)
    k.clip_rect = region((0, 0, 0), (1, 1, 1))
    k.encode(cb, x_img, y)
    finish(cb)
    np.testing.assert_array_equal(values(y).ravel(), [0.0])


def test_properties_and_init_forms(device) -> None:
    k = m.MPSCNNPoolingMax(device, kernel_width=3, kernel_height=2)
    assert (k.kernel_width, k.kernel_height, k.stride_in_pixels_x, k.stride_in_pixels_y) == (3, 2, 1, 1)
    assert (k.dilation_rate_x, k.dilation_rate_y, k.edge_mode, k.offset) == (1, 1, Z, MPSOffset(0, 0, 0))
    assert m.padding.method_of(k.padding) == int(PM.sizeSame)
    p = m.MPSCNNPoolingL2Norm(device, 2, 4, 3, 1)
    assert (p.kernel_width, p.kernel_height, p.stride_in_pixels_x, p.stride_in_pixels_y) == (2, 4, 3, 1)
    a = m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2)
    assert (a.zero_pad_size_x, a.zero_pad_size_y) == (0, 0)
    d = m.MPSCNNDilatedPoolingMax(device, kernel_width=2, kernel_height=3, dilation_rate_x=3, dilation_rate_y=2, stride_in_pixels_x=2, stride_in_pixels_y=1)
    assert (d.dilation_rate_x, d.dilation_rate_y, d.stride_in_pixels_x) == (3, 2, 2)
    assert isinstance(d, m.MPSCNNPoolingMax) and isinstance(d, m.MPSCNNPooling)
    d2 = m.MPSCNNDilatedPoolingMax(device, kernel_width=2, kernel_height=2)
    assert (d2.dilation_rate_x, d2.dilation_rate_y) == (1, 1)
    c = a.copy()
    c.zero_pad_size_x = 2
    assert a.zero_pad_size_x == 0
    with pytest.raises(AttributeError):
        k.kernel_width = 5  # type: ignore[misc]


def test_errors(device, cb) -> None:
    with pytest.raises(m.MPSTypeError, match="abstract"):
        m.MPSCNNPooling(device, kernel_width=2, kernel_height=2)
    with pytest.raises(m.MPSTypeError, match="kernel_width"):
        m.MPSCNNPoolingMax(device)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNPoolingMax: `kernel_width` \(=0\) must be an integer >= 1"):
        m.MPSCNNPoolingMax(device, kernel_width=0, kernel_height=2)
    with pytest.raises(m.MPSValueError, match="stride_in_pixels_y"):
        m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2, stride_in_pixels_y=0)
    with pytest.raises(m.MPSValueError, match="dilation_rate_x"):
        m.MPSCNNDilatedPoolingMax(device, kernel_width=2, kernel_height=2, dilation_rate_x=0)
    a = m.MPSCNNPoolingAverage(device, kernel_width=2, kernel_height=2)
    with pytest.raises(m.MPSValueError, match="zero_pad_size_x"):
        a.zero_pad_size_x = -1
    a.edge_mode = MPSImageEdgeMode.mirror
    x_img, _ = image(rand(1, (1, 4, 4, 2)), device)
    y, _ = poisoned((1, 4, 4, 2), device)
    with pytest.raises(m.MPSValueError, match="edge_mode.*zero or clamp"):
        a.encode(cb, x_img, y)
    assert np.isnan(values(y)).all(), "nothing written"
    k = m.MPSCNNPoolingMax(device, kernel_width=3, kernel_height=3)
    k.padding = int(PM.sizeValidOnly)
    tiny, _ = image(rand(1, (1, 2, 2, 1)), device)
    with pytest.raises(m.MPSValueError, match="large enough"):
        k.encode(cb, tiny)
    k.destination_feature_channel_offset = 4
    with pytest.raises(m.MPSValueError, match="feature_channels"):
        k.encode(cb, x_img, poisoned((1, 2, 2, 4), device)[0])
