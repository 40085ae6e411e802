"""MPSCNNConvolution forward (convolution.md §1-§8, kernel-base.md §2 and §6) through the public API.

The oracle is the float64 reference ``mpsnn.testing.reference_conv.convolution_forward``
(validated against torch in tests/null/test_reference_conv.py), fed with the values the
kernel really sees: image values rounded to the storage dtype, weights and biases rounded to
the compute dtype. Destinations are poisoned (NaN or 1234) so that "written" and "left
alone" are both checked for every element. Random data with fixed seeds throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSCNNNeuronType as T
from mpsnn import MPSImageEdgeMode, MPSNNNeuronDescriptor, MPSNNPaddingMethod, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
POISON = 1234.0
Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp

#: Per-op override. A convolution output sums Cin_g·kH·kW products (up to ~150 here, inputs
#: and weights in [-1, 1]), so its rounding error scales with that sum, not with the (possibly
#: cancelled) result: float32 accumulation error stays ~1e-6 absolute, hence atol 1e-5 (TF32,
#: 10 mantissa bits, would be ~1e-3 and fail). float16/bfloat16: float32 accumulation, but on
#: CUDA the convolution is stored in the storage dtype before the bias is added (two roundings;
#: measured excess over one rounding: 1.2e-3 f16, 9.6e-3 bf16), hence an absolute term of half
#: an ulp at the intermediate magnitude (<= 8 here): 8·2^-11 and 8·2^-8.
CONV_TOL = {"float32": Tol(1e-5, 1e-5), "float16": Tol(2e-3, 4e-3), "bfloat16": Tol(1.6e-2, 3e-2)}
#: ``accumulator_precision_option = half`` allows TF32 for float32 images on CUDA (10-bit
#: mantissa products, float32 sums): a few 2^-11 relative steps of the summed magnitude.
TF32_TOL = {"float32": Tol(5e-3, 2e-2)}


# -- helpers ------------------------------------------------------------------------------------


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def rounded(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``a`` rounded to ``dtype`` (what the kernel computes with), back in float64."""
    return torch.from_numpy(np.asarray(a, np.float64)).to(dtype).double().numpy()


def descriptor(kernel: tuple[int, int], cin: int, cout: int, *, stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1),
               groups: int = 1, cls: type = m.MPSCNNConvolutionDescriptor) -> m.MPSCNNConvolutionDescriptor:
    d = cls(kernel_width=kernel[0], kernel_height=kernel[1], input_feature_channels=cin, output_feature_channels=cout)
    d.stride_in_pixels_x, d.stride_in_pixels_y = stride
    d.dilation_rate_x, d.dilation_rate_y = dilation
    d.groups = groups
    return d


def auto_offset(width: int, height: int, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                method: int = int(MPSNNPaddingMethod.sizeSame)) -> tuple[int, int, int]:
    """The offset the padding policy sets (kernel-base.md §6.2)."""
    p = m.padding.apply_padding_method(method, width, height, *kernel, *stride, *dilation)
    return (p.offset_x, p.offset_y, 0)


def check_written(got: np.ndarray, expected: np.ndarray, before: np.ndarray) -> None:
    """Every element the reference writes must have changed from the poison."""
    written = ~np.isclose(expected, before, equal_nan=True)
    assert written.any(), "the case must write something"
    assert not np.isclose(got[written], before[written], equal_nan=True).any(), "every written element must change"


@dataclass(frozen=True)
class Case:
    """One convolution configuration (x before y in every pair)."""

    id: str
    kernel: tuple[int, int]
    cin: int
    cout: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    src: tuple[int, int, int] = (2, 7, 9)        # N, H, W
    bias: bool = True

    def descriptor(self) -> m.MPSCNNConvolutionDescriptor:
        return descriptor(self.kernel, self.cin, self.cout, stride=self.stride, dilation=self.dilation, groups=self.groups)

    def weights(self, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        kw, kh = self.kernel
        w = rand(seed, (self.cout, kh, kw, self.cin // self.groups)).astype(np.float32)
        b = rand(seed + 1, (self.cout,)).astype(np.float32) if self.bias else None
        return w, b

    def source_shape(self) -> tuple[int, int, int, int]:
        return (*self.src, self.cin)

    def reference(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, conv: m.MPSCNNConvolution, **kw: Any) -> np.ndarray:
        return R.convolution_forward(x, w, b, offset=conv.offset, stride=self.stride, dilation=self.dilation, groups=self.groups, **kw)


CASES = [
    Case("k1x1", (1, 1), 3, 5),
    Case("k2x2_even", (2, 2), 4, 4),
    Case("k3x3", (3, 3), 5, 3, bias=False),
    Case("k4x4_even_stride2", (4, 4), 3, 6, stride=(2, 2)),
    Case("k5x5", (5, 5), 2, 3, src=(1, 6, 5)),
    Case("k3x2_rect", (3, 2), 4, 5, stride=(1, 2)),
    Case("k1x4_rect_even", (1, 4), 3, 2, stride=(3, 1)),
    Case("k5x3_rect_stride3", (5, 3), 1, 4, stride=(3, 2), bias=False),
    Case("k3x3_dilation2", (3, 3), 4, 4, dilation=(2, 2)),
    Case("k2x4_even_dilated", (2, 4), 3, 5, stride=(2, 1), dilation=(2, 1)),
    Case("k4x3_dilation_1x2_stride_3x2", (4, 3), 2, 3, stride=(3, 2), dilation=(1, 2)),
    Case("k1_stride3_gt_kernel", (1, 1), 4, 4, stride=(3, 3)),
    Case("k2_stride3_gt_kernel", (2, 2), 3, 2, stride=(3, 3)),
    Case("groups2", (3, 3), 8, 8, groups=2),
    Case("groups4_stride2", (3, 2), 16, 16, stride=(2, 2), groups=4),
    Case("groups2_dilated", (2, 3), 8, 16, dilation=(2, 2), groups=2),
    Case("image_1x1", (3, 3), 4, 5, src=(2, 1, 1)),
    Case("batch1_cin1", (3, 3), 1, 1, src=(1, 5, 4)),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def make(device: m.Device, desc: m.MPSCNNConvolutionDescriptor, w: Any, b: Any = None, **kw: Any) -> tuple[m.MPSCNNConvolution, m.ConvolutionDataSource]:
    ds = m.ConvolutionDataSource(desc, w, b, **kw)
    return m.MPSCNNConvolution(device, ds), ds


# -- shapes, padding and the reference on every case ----------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_auto_default_padding(device, cb, case: Case) -> None:
    seed = sum(map(ord, case.id))
    w, b = case.weights(seed)
    conv, _ = make(device, case.descriptor(), w, b)
    x_img, x = image(rand(seed + 2, case.source_shape()), device)
    conv.offset = MPSOffset(5, -3, 0)            # replaced by the padding policy
    y = conv.encode(cb, x_img)
    finish(cb)
    n, h, wd = case.src
    sx, sy = case.stride
    assert y.shape == (n, -(-h // sy), -(-wd // sx), case.cout), "default padding gives ceil(src / stride)"
    p = m.padding.apply_padding_method(int(MPSNNPaddingMethod.sizeSame), wd, h, *case.kernel, sx, sy, *case.dilation)
    assert conv.offset == MPSOffset(p.offset_x, p.offset_y, 0)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL, msg=case.id)


def test_properties(device) -> None:
    desc = descriptor((4, 3), 8, 16, stride=(2, 3), dilation=(1, 2), groups=2)
    w, b = Case("p", (4, 3), 8, 16, groups=2).weights(1)
    conv, ds = make(device, desc, w, b, label="conv1")
    assert (conv.kernel_width, conv.kernel_height) == (4, 3)
    assert (conv.stride_in_pixels_x, conv.stride_in_pixels_y) == (2, 3)
    assert (conv.dilation_rate_x, conv.dilation_rate_y) == (1, 2)
    assert (conv.input_feature_channels, conv.output_feature_channels, conv.groups) == (8, 16, 2)
    assert conv.channel_multiplier == 0 and conv.sub_pixel_scale_factor == 1
    assert conv.data_source is ds
    assert conv.label == "conv1", "the data source's label is copied"
    assert conv.accumulator_precision_option == m.MPSNNConvolutionAccumulatorPrecisionOption.float
    assert int(conv.padding.padding_method) == int(MPSNNPaddingMethod.sizeSame), "generic default alignCentered|addRemainderToTopLeft|sizeSame"
    assert conv.neuron_type == T.none
    assert (conv.neuron_parameter_a, conv.neuron_parameter_b, conv.neuron_parameter_c) == (1.0, 1.0, 1.0)
    assert conv.edge_mode == Z and conv.is_backwards is False


# every alignment x remainder x size combination (kernel-base.md §6.1)
_ALIGN = [("centered_TL", 0), ("centered_TR", 4), ("centered_BL", 8), ("centered_BR", 12), ("alignTopLeft", 1), ("alignBottomRight", 2)]
_SIZE = [("valid", int(MPSNNPaddingMethod.sizeValidOnly)), ("same", int(MPSNNPaddingMethod.sizeSame)), ("full", int(MPSNNPaddingMethod.sizeFull))]
PADDING_METHODS = [pytest.param(a | s, id=f"{sn}_{an}") for an, a in _ALIGN for sn, s in _SIZE]
PADDING_CASES = [
    pytest.param(Case("k4x3_s2", (4, 3), 3, 4, stride=(2, 2), src=(1, 8, 9)), id="k4x3_s2"),
    pytest.param(Case("k3x2_s1x3_d2x1", (3, 2), 2, 3, stride=(1, 3), dilation=(2, 1), src=(1, 7, 8)), id="k3x2_s1x3_d2x1"),
]


@pytest.mark.parametrize("case", PADDING_CASES)
@pytest.mark.parametrize("method", PADDING_METHODS)
def test_forward_auto_every_padding_method(device, cb, case: Case, method: int) -> None:
    w, b = case.weights(7)
    conv, _ = make(device, case.descriptor(), w, b)
    conv.padding = m.MPSNNDefaultPadding.padding_with_method(method)
    x_img, x = image(rand(8, case.source_shape()), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    p = m.padding.apply_padding_method(method, case.src[2], case.src[1], *case.kernel, *case.stride, *case.dilation)
    assert (y.width, y.height) == (p.width, p.height)
    assert conv.offset == MPSOffset(p.offset_x, p.offset_y, 0)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL)


# kernel-base.md §6.3, worked by hand: (src, k, s, d, method, dest, offset) along x
WORKED = [
    (7, 3, 2, 1, int(MPSNNPaddingMethod.sizeSame), 4, 0),
    (7, 3, 2, 1, int(MPSNNPaddingMethod.sizeValidOnly), 3, 1),
    (7, 3, 2, 1, int(MPSNNPaddingMethod.sizeFull), 5, -1),
    (4, 2, 1, 1, int(MPSNNPaddingMethod.sizeSame), 4, 0),
    (4, 2, 1, 1, int(MPSNNPaddingMethod.sizeSame | MPSNNPaddingMethod.addRemainderToBottomRight), 4, 1),
    (10, 3, 2, 1, int(MPSNNPaddingMethod.sizeValidOnly), 4, 1),
    (10, 3, 2, 1, int(MPSNNPaddingMethod.sizeValidOnly | MPSNNPaddingMethod.addRemainderToBottomRight), 4, 1),
    (5, 3, 1, 2, int(MPSNNPaddingMethod.sizeSame), 5, 0),
]


@pytest.mark.parametrize("src,k,s,d,method,dest,off", WORKED)
def test_padding_worked_examples(device, cb, src, k, s, d, method, dest, off) -> None:
    conv, _ = make(device, descriptor((k, 1), 1, 1, stride=(s, 1), dilation=(d, 1)), np.ones((1, 1, k, 1), np.float32))
    conv.padding = method
    x_img, _ = image(rand(1, (1, 1, src, 1)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert y.width == dest and conv.offset.x == off


# -- explicit destinations: offset, clip, edges, channel windows, batch addressing --------------------------

EXPLICIT_CASE = Case("explicit", (3, 4), 3, 5, stride=(2, 1), dilation=(1, 2))


@dataclass(frozen=True)
class Geom:
    id: str
    src: tuple[int, int, int, int]
    dst: tuple[int, int, int, int]
    offset: tuple[int, int, int] = (0, 0, 0)
    clip: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    src_c_off: int = 0
    dst_c_off: int = 0
    edge: MPSImageEdgeMode = Z

    def configure(self, k: Any) -> None:
        k.offset = MPSOffset(*self.offset)
        if self.clip is not None:
            k.clip_rect = region(*self.clip)
        k.source_feature_channel_offset = self.src_c_off
        k.destination_feature_channel_offset = self.dst_c_off
        k.edge_mode = self.edge

    def kwargs(self) -> dict[str, Any]:
        return dict(clip_rect=self.clip, edge_mode="zero" if self.edge == Z else "clamp", src_c_off=self.src_c_off, dst_c_off=self.dst_c_off)


GEOMS = [
    Geom("plain_overhang", (1, 6, 7, 3), (1, 6, 4, 5)),
    Geom("valid_offset", (1, 8, 9, 3), (1, 4, 4, 5), offset=(1, 3, 0)),
    Geom("neg_offset_zero", (1, 5, 6, 3), (1, 5, 4, 5), offset=(-2, -1, 0)),
    Geom("neg_offset_clamp", (1, 5, 6, 3), (1, 5, 4, 5), offset=(-2, -1, 0), edge=C),
    Geom("overhang_right_clamp", (1, 5, 6, 3), (1, 6, 5, 5), offset=(3, 2, 0), edge=C),
    Geom("clip_inside", (1, 6, 7, 3), (1, 6, 4, 5), clip=((1, 2, 0), (2, 3, 1))),
    Geom("clip_partly_outside_offset", (1, 6, 7, 3), (1, 5, 4, 5), offset=(-1, 1, 0), clip=((2, 1, 0), (10, 10, 1))),
    Geom("clip_clamp", (1, 6, 7, 3), (1, 5, 4, 5), offset=(-1, 1, 0), clip=((1, 0, 0), (2, 4, 1)), edge=C),
    Geom("src_channel_offset", (1, 5, 6, 9), (1, 5, 3, 5), src_c_off=4),
    Geom("dst_channel_offset", (1, 5, 6, 3), (1, 5, 3, 12), dst_c_off=4),
    Geom("batch2", (2, 5, 6, 3), (2, 5, 3, 5), offset=(1, 0, 0)),
    Geom("batch_offset_z", (3, 4, 5, 3), (2, 4, 3, 5), offset=(0, 0, 1)),
    Geom("batch_clip_z", (3, 4, 5, 3), (3, 4, 3, 5), offset=(0, 1, 2), clip=((0, 0, 1), (9, 9, 1))),
    Geom("everything_clamp", (3, 5, 6, 8), (2, 6, 5, 12), offset=(-1, 2, 1), clip=((1, 1, 1), (9, 3, 1)), src_c_off=4, dst_c_off=4, edge=C),
]


@pytest.mark.parametrize("geom", [pytest.param(g, id=g.id) for g in GEOMS])
def test_forward_explicit_destination(device, cb, geom: Geom) -> None:
    seed = sum(map(ord, geom.id))
    w, b = EXPLICIT_CASE.weights(seed)
    conv, _ = make(device, EXPLICIT_CASE.descriptor(), w, b)
    geom.configure(conv)
    x_img, x = image(rand(seed + 2, geom.src), device)
    dst, before = poisoned(geom.dst, device, float("nan") if seed % 2 else POISON)
    conv.encode(cb, x_img, dst)
    finish(cb)
    assert conv.offset == MPSOffset(*geom.offset), "the explicit-destination form must not change offset"
    expected = EXPLICIT_CASE.reference(x, w, b, conv, dest=before, **geom.kwargs())
    got = values(dst)
    check_written(got, expected, before)
    assert_close(got, expected, F32, CONV_TOL, msg=geom.id)


def test_concatenation_into_wider_destination(device, cb) -> None:
    """Two convolutions write channels [0, 4) and [4, 9) of one 12-channel image (concatenation);
    channels [9, 12) keep their poison."""
    ca, cbb = Case("a", (3, 3), 3, 4), Case("b", (1, 2), 3, 5, bias=False)
    (wa, ba), (wb, bb) = ca.weights(1), cbb.weights(2)
    conv_a, _ = make(device, ca.descriptor(), wa, ba)
    conv_b, _ = make(device, cbb.descriptor(), wb, bb)
    conv_b.destination_feature_channel_offset = 4
    x_img, x = image(rand(3, (2, 4, 5, 3)), device)
    dst, before = poisoned((2, 4, 5, 12), device)
    conv_a.encode(cb, x_img, dst)
    conv_b.encode(cb, x_img, dst)
    finish(cb)
    expected = R.convolution_forward(x, wa, ba, dest=before)
    expected = R.convolution_forward(x, wb, bb, dest=expected, dst_c_off=4)
    got = values(dst)
    assert np.isnan(got[..., 9:]).all(), "untouched channels keep their poison"
    assert_close(got, expected, F32, CONV_TOL)


def test_encode_batch(device, cb) -> None:
    case = Case("batch", (3, 2), 4, 5, stride=(2, 1))
    w, b = case.weights(11)
    conv, _ = make(device, case.descriptor(), w, b)
    xs = [image(rand(12 + k, (1, 5, 6, 4)), device) for k in range(3)]
    ys = conv.encode_batch(cb, [i for i, _ in xs])
    dsts = [poisoned((1, 4, 3, 5), device) for _ in range(3)]
    conv.offset = MPSOffset(1, 0, 0)
    conv.encode_batch(cb, [i for i, _ in xs], [d for d, _ in dsts])
    finish(cb)
    assert isinstance(ys, list) and len(ys) == 3
    for (_, x), y, (d, before) in zip(xs, ys, dsts):
        assert y.shape == (1, 5, 3, 5)
        assert_close(values(y), R.convolution_forward(x, w, b, dest_shape=y.shape, offset=(0, 0, 0), stride=(2, 1)), F32, CONV_TOL)
        assert_close(values(d), R.convolution_forward(x, w, b, dest=before, offset=(1, 0, 0), stride=(2, 1)), F32, CONV_TOL)


def test_encode_returning_state(device, cb) -> None:
    case = Case("state", (3, 3), 3, 4, stride=(2, 2))
    w, b = case.weights(21)
    conv, _ = make(device, case.descriptor(), w, b)
    x_img, x = image(rand(22, (1, 5, 7, 3)), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    finish(cb)
    assert isinstance(state, m.MPSCNNConvolutionGradientState)
    assert state.convolution is conv and (state.source_width, state.source_height) == (7, 5)
    assert state.gradient_for_weights_layout == m.MPSCNNConvolutionWeightsLayout.OHWI
    assert conv.is_result_state_reused_across_batch() is True
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL)


# -- depthwise and sub-pixel --------------------------------------------------------------------------------


def depthwise_as_grouped(wdw: np.ndarray) -> np.ndarray:
    """Depthwise ``[Cout][kH][kW]`` as grouped OHWI weights (groups = Cin, Cin_g = 1): output
    channel ``o = k·M + t`` reads input channel ``k = o / M`` (convolution.md §4.2)."""
    return wdw[..., None]


@pytest.mark.parametrize("mult", [1, 2], ids=["M1", "M2_extension"])
@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), (1, 1), (1, 1)), ((4, 3), (2, 1), (1, 2)), ((2, 5), (1, 2), (2, 1))],
                         ids=["k3", "k4x3_s2x1_d1x2", "k2x5_s1x2_d2x1"])
def test_depthwise(device, cb, mult, kernel, stride, dilation) -> None:
    cin = 5
    cout = cin * mult
    desc = descriptor(kernel, cin, cout, stride=stride, dilation=dilation, cls=m.MPSCNNDepthWiseConvolutionDescriptor)
    assert desc.channel_multiplier == mult
    wdw = rand(31, (cout, kernel[1], kernel[0])).astype(np.float32)
    b = rand(32, (cout,)).astype(np.float32)
    conv, _ = make(device, desc, wdw, b)
    assert conv.channel_multiplier == mult
    x_img, x = image(rand(33, (2, 6, 7, cin)), device)
    y = conv.encode(cb, x_img)
    dst, before = poisoned((2, 5, 4, cout + 4), device)
    conv.offset = MPSOffset(1, -1, 0)
    conv.edge_mode = C
    conv.destination_feature_channel_offset = 4
    conv.encode(cb, x_img, dst)
    finish(cb)
    expected_auto = R.convolution_forward(x, depthwise_as_grouped(wdw), b, dest_shape=y.shape, offset=auto_offset(7, 6, kernel, stride, dilation),
                                          stride=stride, dilation=dilation, groups=cin)
    assert_close(values(y), expected_auto, F32, CONV_TOL)
    expected = R.convolution_forward(x, depthwise_as_grouped(wdw), b, dest=before, offset=(1, -1, 0), stride=stride, dilation=dilation,
                                     groups=cin, edge_mode="clamp", dst_c_off=4)
    if mult == 1:  # the reference's own depthwise path agrees with the grouped rendering
        assert_close(expected, R.convolution_forward(x, wdw, b, dest=before, offset=(1, -1, 0), stride=stride, dilation=dilation,
                                                     depthwise=True, edge_mode="clamp", dst_c_off=4), "float64")
    got = values(dst)
    check_written(got, expected, before)
    assert_close(got, expected, F32, CONV_TOL)


def depth_to_space_dcr(io: np.ndarray, r: int) -> np.ndarray:
    """TensorFlow ``depth_to_space`` (NHWC, DCR): ``D[y·r + dy, x·r + dx, c] = Io[y, x, (dy·r + dx)·Nr + c]``."""
    n, h, w, c = io.shape
    nr = c // (r * r)
    return io.reshape(n, h, w, r, r, nr).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, nr)


@pytest.mark.parametrize("r", [2, 3])
def test_sub_pixel(device, cb, r) -> None:
    nr = 3
    cout = nr * r * r
    desc = descriptor((3, 2), 4, cout, stride=(2, 1), cls=m.MPSCNNSubPixelConvolutionDescriptor)
    desc.sub_pixel_scale_factor = r
    w = rand(41, (cout, 2, 3, 4)).astype(np.float32)
    b = rand(42, (cout,)).astype(np.float32)
    conv, _ = make(device, desc, w, b)
    assert conv.sub_pixel_scale_factor == r
    x_img, x = image(rand(43, (2, 5, 7, 4)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert y.shape == (2, 5 * r, 4 * r, nr), "auto size: the regular size times r, Cout / r² channels"
    io = R.convolution_forward(x, w, b, dest_shape=(2, 5, 4, cout), offset=conv.offset, stride=(2, 1))
    expected = depth_to_space_dcr(io, r)
    assert_close(expected, R.convolution_forward(x, w, b, dest_shape=y.shape, offset=conv.offset, stride=(2, 1), sub_pixel_scale=r), "float64")
    # PyTorch's pixel_shuffle order (c·r² + block) differs: the comparison can tell them apart
    shuffled = torch.nn.functional.pixel_shuffle(torch.from_numpy(io).permute(0, 3, 1, 2), r).permute(0, 2, 3, 1).numpy()
    assert not np.allclose(shuffled, expected)
    assert_close(values(y), expected, F32, CONV_TOL)


def test_sub_pixel_explicit_clip(device, cb) -> None:
    r, nr = 2, 2
    desc = descriptor((3, 3), 3, nr * r * r, cls=m.MPSCNNSubPixelConvolutionDescriptor)
    desc.sub_pixel_scale_factor = r
    w = rand(44, (nr * r * r, 3, 3, 3)).astype(np.float32)
    conv, _ = make(device, desc, w, None)
    conv.clip_rect = region((1, 2, 0), (5, 4, 1))
    conv.offset = MPSOffset(1, 0, 0)
    conv.destination_feature_channel_offset = 4
    x_img, x = image(rand(45, (1, 5, 6, 3)), device)
    dst, before = poisoned((1, 7, 8, 8), device)
    conv.encode(cb, x_img, dst)
    finish(cb)
    expected = R.convolution_forward(x, w, None, dest=before, offset=(1, 0, 0), clip_rect=((1, 2, 0), (5, 4, 1)), dst_c_off=4, sub_pixel_scale=r)
    got = values(dst)
    check_written(got, expected, before)
    assert_close(got, expected, F32, CONV_TOL)


# -- fused post-processing (§3) -------------------------------------------------------------------------------

SLOPES = tuple(float(np.float32(0.05 * (k + 1))) for k in range(6))
NEURONS = [
    pytest.param(MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU, a=0.1), (T.reLU, 0.1), id="leaky_reLU"),
    pytest.param(MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(np.array(SLOPES, np.float32)), (T.pReLU, 0, 0, 0, SLOPES), id="pReLU"),
    pytest.param(MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.sigmoid), (T.sigmoid,), id="sigmoid"),
]


@pytest.mark.parametrize("neuron_desc,neuron", NEURONS)
def test_fused_neuron(device, cb, neuron_desc, neuron) -> None:
    case = Case("neuron", (3, 3), 4, 6, stride=(1, 2))
    desc = case.descriptor()
    desc.fused_neuron_descriptor = neuron_desc
    w, b = case.weights(51)
    conv, _ = make(device, desc, w, b)
    assert conv.neuron_type == neuron[0] and conv.fused_neuron_descriptor == neuron_desc
    x_img, x = image(rand(52, (2, 5, 6, 4), -2.0, 2.0), device)
    dst, before = poisoned((2, 4, 6, 8), device)
    conv.offset = MPSOffset(0, 1, 0)
    conv.encode(cb, x_img, dst)
    finish(cb)
    expected = case.reference(x, w, b, conv, dest=before, neuron=neuron)
    plain = case.reference(x, w, b, conv, dest=before)
    assert not np.allclose(expected[..., :6], plain[..., :6]), "the neuron must change the result"
    got = values(dst)
    check_written(got, expected, before)
    assert_close(got, expected, F32, CONV_TOL)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("partial", [False, True], ids=["all_arrays", "none_arrays"])
def test_batch_norm_folding(device, cb, with_bias, partial) -> None:
    """``f(bn(conv + b))`` with ``I = gamma/sqrt(var + eps)``, ``J = beta − I·mean`` (§3.1-3.2)."""
    case = Case("bn", (3, 2), 3, 5, bias=with_bias)
    desc = case.descriptor()
    mean, var = rand(61, (5,)).astype(np.float32), rand(62, (5,), 0.2, 2.0).astype(np.float32)
    gamma, beta = rand(63, (5,), 0.5, 2.0).astype(np.float32), rand(64, (5,)).astype(np.float32)
    eps = float(np.float32(1e-3))
    if partial:
        mean, var = None, None
    desc.set_batch_normalization_parameters_for_inference(mean, var, gamma, beta, eps)
    desc.fused_neuron_descriptor = MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU, a=0.25)
    w, b = case.weights(65)
    conv, _ = make(device, desc, w, b)
    x_img, x = image(rand(66, (2, 5, 6, 3)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    expected = case.reference(x, w, b, conv, dest_shape=y.shape, batch_norm=(mean, var, gamma, beta, eps), neuron=(T.reLU, 0.25))
    assert_close(values(y), expected, F32, CONV_TOL)
    wf, bf = R.fold_batch_norm(w, b, mean, var, gamma, beta, eps)   # the folded form agrees (order of §3.1)
    assert_close(expected, R.convolution_forward(x, wf, bf, dest_shape=y.shape, offset=conv.offset, neuron=(T.reLU, 0.25)), "float64")


def test_deprecated_neuron_filter(device, cb) -> None:
    case = Case("dep", (2, 2), 3, 4)
    desc = case.descriptor()
    desc.neuron = m.MPSCNNNeuronLinear(device, a=2.0, b=0.5)
    w, b = case.weights(71)
    conv, _ = make(device, desc, w, b)
    assert conv.neuron_type == T.linear and (conv.neuron_parameter_a, conv.neuron_parameter_b) == (2.0, 0.5)
    x_img, x = image(rand(72, (1, 4, 5, 3)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape, neuron=(T.linear, 2.0, 0.5)), F32, CONV_TOL)


def test_deprecated_set_neuron_type(device, cb) -> None:
    case = Case("dep2", (3, 3), 3, 4)
    desc = case.descriptor()
    desc.set_neuron_type(T.tanH, parameter_a=1.5, parameter_b=0.75)
    assert desc.neuron_type() == T.tanH and (desc.neuron_parameter_a(), desc.neuron_parameter_b()) == (1.5, 0.75)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionDescriptor.*neuron_type"):
        desc.set_neuron_type(T.pReLU, parameter_a=0.1)
    w, b = case.weights(73)
    conv, _ = make(device, desc, w, b)
    x_img, x = image(rand(74, (1, 4, 5, 3)), device)
    y = conv.encode(cb, x_img)
    desc2 = case.descriptor()
    desc2.set_neuron_to_prelu_with_parameters_a(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    conv2, _ = make(device, desc2, w, b)
    y2 = conv2.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape, neuron=(T.tanH, 1.5, 0.75)), F32, CONV_TOL)
    slopes = [float(np.float32(v)) for v in (0.1, 0.2, 0.3, 0.4)]
    assert_close(values(y2), case.reference(x, w, b, conv2, dest_shape=y2.shape, neuron=(T.pReLU, 0, 0, 0, slopes)), F32, CONV_TOL)


# -- weight types (§5) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "lookup_table"])
def test_uint8_quantised_weights(device, cb, kind) -> None:
    case = Case("u8", (3, 3), 4, 5, stride=(2, 1))
    u = np.random.default_rng(81).integers(0, 256, (5, 3, 3, 4), dtype=np.uint8)
    b = rand(82, (5,)).astype(np.float32)
    if kind == "linear":
        lo = rand(83, (5,), -1.0, -0.1)
        ranges = np.stack([lo, lo + rand(84, (5,), 0.2, 2.0)], axis=1).astype(np.float32)
        conv, ds = make(device, case.descriptor(), u, b, ranges_for_uint8_kernel=ranges)
        w = R.dequantize_uint8(u, ranges=ranges)
        assert ds.weights_quantization_type() == m.MPSCNNWeightsQuantizationType.linear
    else:
        lut = rand(85, (256,)).astype(np.float32)
        conv, ds = make(device, case.descriptor(), u, b, lookup_table_for_uint8_kernel=lut)
        w = R.dequantize_uint8(u, lut=lut)
        assert ds.weights_quantization_type() == m.MPSCNNWeightsQuantizationType.lookupTable
    assert ds.data_type() == m.MPSDataType.uInt8
    x_img, x = image(rand(86, (2, 5, 6, 4)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL)


def test_float16_weights_from_data_source(device, cb) -> None:
    case = Case("w16", (2, 3), 4, 4)
    w, b = case.weights(91)
    w16 = w.astype(np.float16)
    conv, ds = make(device, case.descriptor(), w16, b)
    assert ds.data_type() == m.MPSDataType.float16
    x_img, x = image(rand(92, (1, 5, 6, 4)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w16.astype(np.float64), b, conv, dest_shape=y.shape), F32, CONV_TOL)


class TensorDataSource(m.MPSCNNConvolutionDataSource):
    """A user data source (the protocol ABC) returning a torch tensor and raw bytes."""

    def __init__(self, desc: m.MPSCNNConvolutionDescriptor, w: np.ndarray, b: np.ndarray, load_ok: bool = True) -> None:
        self._desc, self._w, self._b, self._ok = desc, w, b, load_ok
        self.loaded = 0
        self.purged = 0

    def data_type(self) -> m.MPSDataType:
        return m.MPSDataType.float32

    def descriptor(self) -> m.MPSCNNConvolutionDescriptor:
        return self._desc

    def weights(self) -> torch.Tensor:
        return torch.from_numpy(self._w)

    def bias_terms(self) -> bytes:
        return self._b.tobytes()

    def load(self) -> bool:
        self.loaded += 1
        return self._ok

    def purge(self) -> None:
        self.purged += 1

    def label(self) -> str | None:
        return "user"


def test_user_data_source(device, cb) -> None:
    case = Case("user", (3, 1), 3, 4)
    w, b = case.weights(95)
    ds = TensorDataSource(case.descriptor(), w, b)
    conv = m.MPSCNNConvolution(device, weights=ds)
    assert ds.loaded >= 1 and ds.loaded == ds.purged, "load and purge are balanced"
    assert conv.label == "user"
    x_img, x = image(rand(96, (1, 4, 5, 3)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL)


def test_deprecated_float_initializer(device, cb) -> None:
    case = Case("legacy", (3, 3), 3, 4)
    w, b = case.weights(97)
    conv = m.MPSCNNConvolution(device, convolution_descriptor=case.descriptor(), kernel_weights=w, bias_terms=b, flags=m.MPSCNNConvolutionFlags.none)
    x_img, x = image(rand(98, (1, 4, 5, 3)), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w, b, conv, dest_shape=y.shape), F32, CONV_TOL)


# -- storage dtypes and accumulator precision (§8) ------------------------------------------------------------

DTYPES = [pytest.param(F32, id="f32"), pytest.param(F16, id="f16"), pytest.param(BF16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(CASES[i], id=CASES[i].id) for i in (2, 3, 9, 14)])
def test_storage_dtypes(device, cb, case: Case, dtype) -> None:
    """The result is compared with the reference computed from the dtype-rounded image values,
    weights and bias (the kernel converts its float32 weights once to the image's dtype)."""
    w, b = case.weights(101)
    conv, _ = make(device, case.descriptor(), w, b)
    x_img, x = image(rand(102, case.source_shape()), device, dtype)
    y = conv.encode(cb, x_img)
    dst, before = poisoned((case.src[0], 3, 3, case.cout + 4), device, dtype=dtype)
    conv.offset = MPSOffset(1, 1, 0)
    conv.destination_feature_channel_offset = 4
    conv.encode(cb, x_img, dst)
    finish(cb)
    assert y.to_torch().dtype == dtype and y.feature_channel_format == x_img.feature_channel_format
    wr, br = rounded(w, dtype), None if b is None else rounded(b, dtype)
    auto = R.convolution_forward(x, wr, br, dest_shape=y.shape, offset=auto_offset(case.src[2], case.src[1], case.kernel, case.stride, case.dilation),
                                 stride=case.stride, dilation=case.dilation, groups=case.groups)
    assert_close(values(y), auto, dtype, CONV_TOL)
    expected = case.reference(x, wr, br, conv, dest=before, dst_c_off=4)
    got = values(dst)
    check_written(got, expected, before)
    assert_close(got, expected, dtype, CONV_TOL)


@pytest.mark.parametrize("option", ["default", "float", "half"])
def test_accumulator_precision(device, cb, option) -> None:
    """``float`` (the default) must be float32-exact on every device (no TF32 on CUDA); ``half``
    may use reduced precision (TF32) for float32 images."""
    case = Case("acc", (3, 3), 16, 16, src=(2, 9, 9))
    w, b = case.weights(111)
    conv, _ = make(device, case.descriptor(), w, b)
    if option != "default":
        conv.accumulator_precision_option = getattr(m.MPSNNConvolutionAccumulatorPrecisionOption, option)
    x_img, x = image(rand(112, case.source_shape()), device)
    y = conv.encode(cb, x_img)
    finish(cb)
    expected = case.reference(x, w, b, conv, dest_shape=y.shape)
    assert_close(values(y), expected, F32, TF32_TOL if option == "half" else CONV_TOL)


# -- weight management (§7.4) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["regular", "depthwise"])
def test_export_weights_and_biases(device, cb, kind) -> None:
    if kind == "regular":
        desc, w = descriptor((3, 2), 8, 8, groups=2), rand(121, (8, 2, 3, 4)).astype(np.float32)
    else:
        desc, w = descriptor((3, 2), 4, 4, cls=m.MPSCNNDepthWiseConvolutionDescriptor), rand(121, (4, 2, 3)).astype(np.float32)
    b = rand(122, (w.shape[0],)).astype(np.float32)
    conv, _ = make(device, desc, w, b)
    st = conv.export_weights_and_biases(cb, False)
    tmp = conv.export_weights_and_biases_with_command_buffer(cb, result_state_can_be_temporary=True)
    finish(cb)
    assert isinstance(st, m.MPSCNNConvolutionWeightsAndBiasesState) and not st.is_temporary
    assert tmp.is_temporary and tmp.read_count == 1
    for s in (st, tmp):
        assert tuple(s.weights.shape) == w.shape, "the data source's layout (OHWI; depthwise [Cout][kH][kW])"
        np.testing.assert_array_equal(s.weights.cpu().numpy(), w)
        np.testing.assert_array_equal(s.biases.cpu().numpy(), b)


def test_reload_from_data_source(device, queue) -> None:
    case = Case("reload", (3, 3), 3, 4)
    w, b = case.weights(131)
    conv, ds = make(device, case.descriptor(), w, b, label="L")
    x_img, x = image(rand(132, (1, 4, 5, 3)), device)
    cb1 = queue.make_command_buffer()
    y1 = conv.encode(cb1, x_img)
    finish(cb1)
    w2, b2 = case.weights(133)
    ds.set_weights(w2, b2)
    cb2 = queue.make_command_buffer()
    y_stale = conv.encode(cb2, x_img)
    finish(cb2)
    assert_close(values(y_stale), case.reference(x, w, b, conv, dest_shape=y1.shape), F32, CONV_TOL, msg="set_weights alone changes nothing")
    conv.reload_weights_and_biases_from_data_source()
    cb3 = queue.make_command_buffer()
    y2 = conv.encode(cb3, x_img)
    finish(cb3)
    assert_close(values(y1), case.reference(x, w, b, conv, dest_shape=y1.shape), F32, CONV_TOL)
    assert_close(values(y2), case.reference(x, w2, b2, conv, dest_shape=y2.shape), F32, CONV_TOL)
    assert ds.load_count >= 2 and ds.load_count == ds.purge_count, "load and purge are balanced"
    assert conv.label == "L"


@pytest.mark.parametrize("temporary", [False, True], ids=["regular_state", "temporary_state"])
def test_reload_with_command_buffer(device, cb, temporary) -> None:
    case = Case("reload_gpu", (2, 3), 3, 4)
    desc = case.descriptor()
    w, b = case.weights(141)
    conv, ds = make(device, desc, w, b)
    w2, b2 = case.weights(142)
    tdev = device.torch_device
    if temporary:
        st = m.MPSCNNConvolutionWeightsAndBiasesState.temporary_cnn_convolution_weights_and_biases_state(cb, desc)
        st.weights.copy_(torch.from_numpy(w2))
        st.biases.copy_(torch.from_numpy(b2))
        assert st.read_count == 1
    else:
        st = m.MPSCNNConvolutionWeightsAndBiasesState(torch.from_numpy(w2).to(tdev), torch.from_numpy(b2).to(tdev))
    x_img, x = image(rand(143, (1, 4, 5, 3)), device)
    conv.reload_weights_and_biases_with_command_buffer(cb, st)
    if temporary:
        assert st.read_count == 0, "reload decrements the state's read count"
    y = conv.encode(cb, x_img)
    exported = conv.export_weights_and_biases(cb)
    finish(cb)
    assert_close(values(y), case.reference(x, w2, b2, conv, dest_shape=y.shape), F32, CONV_TOL)
    np.testing.assert_array_equal(exported.weights.cpu().numpy(), w2)
    assert ds.load_count == ds.purge_count


# -- errors (MPSError naming the class and the argument) ------------------------------------------------------


def test_error_channel_counts_unset(device) -> None:
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=3, kernel_height=3)
    ds = m.ConvolutionDataSource(desc, np.zeros(9, np.float32))
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*input_feature_channels"):
        m.MPSCNNConvolution(device, ds)
    assert ds.load_count == ds.purge_count, "purge also runs when loading fails"


def test_error_groups_not_dividing_channels(device) -> None:
    desc = descriptor((3, 3), 8, 6, groups=4)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*groups"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((6, 3, 3, 2), np.float32)))


def test_error_weights_of_wrong_size(device) -> None:
    desc = descriptor((3, 3), 4, 4)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*weights"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((4, 3, 3, 3), np.float32)))
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*bias_terms"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((4, 3, 3, 4), np.float32), np.zeros(3, np.float32)))


def test_error_source_and_destination_channels(device, cb) -> None:
    conv, _ = make(device, descriptor((3, 3), 4, 4), rand(1, (4, 3, 3, 4)).astype(np.float32))
    x3, _ = image(rand(2, (1, 4, 4, 3)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*source_image\.feature_channels"):
        conv.encode(cb, x3)
    x8, _ = image(rand(3, (1, 4, 4, 8)), device)
    conv.source_feature_channel_offset = 4
    conv.source_feature_channel_max_count = 3         # leaves 3 < 4 channels
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*source_image\.feature_channels"):
        conv.encode(cb, x8)
    conv.source_feature_channel_max_count = 4
    d3, _ = poisoned((1, 4, 4, 3), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*destination_image\.feature_channels"):
        conv.encode(cb, x8, d3)
    d8, _ = poisoned((1, 4, 4, 8), device)
    conv.destination_feature_channel_offset = 8       # 8 + 4 > 8
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*destination_image\.feature_channels"):
        conv.encode(cb, x8, d8)


def test_error_depthwise_with_groups(device) -> None:
    desc = descriptor((3, 3), 8, 8, groups=2, cls=m.MPSCNNDepthWiseConvolutionDescriptor)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*groups"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((8, 3, 3), np.float32)))


def test_error_sub_pixel_channels(device) -> None:
    desc = descriptor((3, 3), 4, 6, cls=m.MPSCNNSubPixelConvolutionDescriptor)
    desc.sub_pixel_scale_factor = 2                  # 6 is not a multiple of 4
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*output_feature_channels"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((6, 3, 3, 4), np.float32)))
    # groups > 1: each sub-pixel block must hold a multiple of 4 channels (§4.3)
    desc = descriptor((3, 3), 8, 8, groups=2, cls=m.MPSCNNSubPixelConvolutionDescriptor)
    desc.sub_pixel_scale_factor = 2                  # 8 / 4 = 2 channels per block
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*output_feature_channels"):
        m.MPSCNNConvolution(device, m.ConvolutionDataSource(desc, np.zeros((8, 3, 3, 4), np.float32)))


def test_error_data_source_load_fails(device) -> None:
    case = Case("fail", (3, 3), 3, 4)
    w, b = case.weights(1)
    ds = TensorDataSource(case.descriptor(), w, b, load_ok=False)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*load"):
        m.MPSCNNConvolution(device, ds)


def test_error_descriptor_values(device) -> None:
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionDescriptor.*kernel_width"):
        m.MPSCNNConvolutionDescriptor(kernel_width=0, kernel_height=3, input_feature_channels=1, output_feature_channels=1)
    d = descriptor((3, 3), 4, 4)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionDescriptor.*stride_in_pixels_x"):
        d.stride_in_pixels_x = 0
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionDescriptor.*gamma"):
        d.set_batch_normalization_parameters_for_inference(None, None, np.ones(3, np.float32), None, 1e-3)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution.*weights"):
        m.MPSCNNConvolution(device, "not a data source")  # type: ignore[arg-type]



def test_error_groups_need_multiples_of_4_channels_per_group(device) -> None:
    """convolution.md §2: with groups > 1, Cin/groups and Cout/groups are multiples of 4."""
    desc = descriptor((3, 3), 8, 12, groups=2)  # 6 output channels per group
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolution: `descriptor.groups` \(=2\) must leave a multiple of 4"):
        m.MPSCNNConvolution(device, weights=m.ConvolutionDataSource(desc, weights=np.zeros((12, 3, 3, 4), np.float32)))


def test_reload_weights_and_biases_swift_spelling(device, cb) -> None:
    """``reload_weights_and_biases(cb, state)`` (Swift's name) takes new weights from a state."""
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=1, kernel_height=1, input_feature_channels=4, output_feature_channels=4)
    conv = m.MPSCNNConvolution(device, weights=m.ConvolutionDataSource(desc, weights=np.zeros((4, 1, 1, 4), np.float32)))
    new_w = torch.eye(4, dtype=torch.float32, device=device.torch_device).reshape(4, 1, 1, 4) * 2.0
    state = m.MPSCNNConvolutionWeightsAndBiasesState(weights=new_w, biases=torch.ones(4, device=device.torch_device))
    conv.reload_weights_and_biases(cb, state)
    x = m.MPSImage.from_numpy(np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4), device)
    y = m.MPSImage(device, image_descriptor=m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.float32, width=3, height=1, feature_channels=4))
    conv.encode(cb, x, y)
    cb.commit()
    cb.wait_until_completed()
    np.testing.assert_allclose(y.to_numpy(), 2.0 * np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4) + 1.0)
