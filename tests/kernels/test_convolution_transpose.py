"""MPSCNNConvolutionTranspose and MPSCNNConvolutionTransposeGradient (convolution.md §12-§13).

Oracles: the float64 reference ``reference_conv.convolution_transpose_forward`` /
``convolution_transpose_gradient``; torch ``conv_transpose2d`` through the spec's equivalence
recipe (``reference_conv.torch_conv_transpose_equivalent``: MPS ``W[o][q][p][c] =
wt[c][o][kH−1−q][kW−1−p]``, ``kernelOffset = P − (kWd − 1) + (kWd >> 1)``); and torch.autograd in
float64 on that ``conv_transpose2d`` with a RANDOM upstream gradient. The transpose's input
channels are the descriptor's ``input_feature_channels``; weights are OHWI
``[Cout][kH][kW][Cin/g]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn import MPSCNNConvolutionGradientOption as GO
from mpsnn import MPSCNNNeuronType as T
from mpsnn import MPSNNPaddingMethod, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32 = torch.float32
F64 = "float64"
#: Per-op override: an output / gradient sums up to Cin·kH·kW (data) or N·H·W (weights)
#: products of values in [-1, 1]; float32 accumulation error ~1e-6 absolute.
TR_TOL = {"float32": Tol(1e-5, 1e-5)}


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def nchw(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))), dtype=torch.float64, requires_grad=grad)


@dataclass(frozen=True)
class TCase:
    id: str
    kernel: tuple[int, int]
    cin: int
    cout: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def kwd(self) -> tuple[int, int]:
        return ((self.kernel[0] - 1) * self.dilation[0] + 1, (self.kernel[1] - 1) * self.dilation[1] + 1)

    def descriptor(self) -> m.MPSCNNConvolutionDescriptor:
        d = m.MPSCNNConvolutionDescriptor(kernel_width=self.kernel[0], kernel_height=self.kernel[1],
                                          input_feature_channels=self.cin, output_feature_channels=self.cout)
        d.stride_in_pixels_x, d.stride_in_pixels_y = self.stride
        d.dilation_rate_x, d.dilation_rate_y = self.dilation
        d.groups = self.groups
        return d

    def make(self, device: m.Device, seed: int) -> tuple[m.MPSCNNConvolutionTranspose, np.ndarray, np.ndarray | None, m.ConvolutionDataSource]:
        kw, kh = self.kernel
        w = rand(seed, (self.cout, kh, kw, self.cin // self.groups)).astype(np.float32)
        b = rand(seed + 1, (self.cout,)).astype(np.float32) if self.bias else None
        ds = m.ConvolutionDataSource(self.descriptor(), w, b, label="tr")
        return m.MPSCNNConvolutionTranspose(device, ds), w, b, ds

    def reference(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, tr: m.MPSCNNConvolutionTranspose, **kw: Any) -> np.ndarray:
        return R.convolution_transpose_forward(x, w, b, offset=tr.offset, kernel_offset=(tr.kernel_offset_x, tr.kernel_offset_y),
                                               stride=self.stride, dilation=self.dilation, groups=self.groups, **kw)

    def torch_forward(self, x: torch.Tensor, w: np.ndarray, b: np.ndarray | None, total_offset: tuple[int, int], out_hw: tuple[int, int],
                      wt_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """torch ``conv_transpose2d`` (padding 0) cropped / zero-padded so that MPS output ``i``
        is torch output ``i + P`` with ``P = t + (kWd − 1) − (kWd >> 1)`` (``t`` the total
        offset on Z): any kernel offset, in float64. Returns (output NCHW, wt, bias)."""
        wt_np, _ = R.torch_conv_transpose_equivalent(w, 0, dilation=self.dilation, groups=self.groups)
        wt = torch.tensor(wt_np, dtype=torch.float64, requires_grad=wt_grad)
        bt = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=wt_grad)
        yt = F.conv_transpose2d(x, wt, bt, (self.stride[1], self.stride[0]), 0, 0, self.groups, (self.dilation[1], self.dilation[0]))
        (kwd, khd), (tx, ty), (ho, wo) = self.kwd(), total_offset, out_hw
        px, py = tx + (kwd - 1) - (kwd >> 1), ty + (khd - 1) - (khd >> 1)
        if bt is not None:  # the bias is added everywhere, also where the crop pads zeros
            yt = yt - bt.view(1, -1, 1, 1)
        y = F.pad(yt, (-px, wo + px - yt.shape[3], -py, ho + py - yt.shape[2]))
        if bt is not None:
            y = y + bt.view(1, -1, 1, 1)
        return y, wt, bt


# -- forward against torch conv_transpose2d via the §12.2 recipe -----------------------------------------------

RECIPES = [  # (case, padding P (x, y), output_padding (x, y))
    (TCase("k3_s2_p1_op1", (3, 3), 3, 4, stride=(2, 2)), (1, 1), (1, 1)),
    (TCase("k4_s2_p1_even", (4, 4), 4, 3, stride=(2, 2)), (1, 1), (0, 0)),
    (TCase("k5_s1_p2", (5, 5), 2, 3), (2, 2), (0, 0)),
    (TCase("k3_s3_d2_p2", (3, 3), 3, 2, stride=(3, 3), dilation=(2, 2)), (2, 2), (1, 1)),
    (TCase("k2_s3_p0_op2", (2, 2), 3, 3, stride=(3, 3), bias=False), (0, 0), (2, 2)),
    (TCase("k3x2_rect_s2x3_d1x2", (3, 2), 3, 4, stride=(2, 3), dilation=(1, 2)), (1, 0), (1, 2)),
    (TCase("k1_s2", (1, 1), 4, 4, stride=(2, 2)), (0, 0), (1, 0)),
    (TCase("groups2_k3_s2", (3, 3), 8, 8, stride=(2, 2), groups=2), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("case,pad,op", [pytest.param(*r, id=r[0].id) for r in RECIPES])
def test_transpose_matches_conv_transpose2d(device, cb, case: TCase, pad, op) -> None:
    seed = sum(map(ord, case.id))
    tr, w, b, _ = case.make(device, seed)
    wt, (kox, koy) = R.torch_conv_transpose_equivalent(w, pad, kernel_size=case.kernel, dilation=case.dilation, groups=case.groups)
    tr.kernel_offset_x, tr.kernel_offset_y = kox, koy
    n, hs, ws = 2, 4, 5
    (kwd, khd), (sx, sy) = case.kwd(), case.stride
    wd, hd = (ws - 1) * sx - 2 * pad[0] + kwd + op[0], (hs - 1) * sy - 2 * pad[1] + khd + op[1]
    x_img, x = image(rand(seed + 2, (n, hs, ws, case.cin)), device)
    dst, before = poisoned((n, hd, wd, case.cout), device)
    tr.encode(cb, x_img, dst)
    finish(cb)
    expected = F.conv_transpose2d(nchw(x), torch.tensor(wt), None if b is None else torch.tensor(b, dtype=torch.float64),
                                  (sy, sx), (pad[1], pad[0]), (op[1], op[0]), case.groups, (case.dilation[1], case.dilation[0]))
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert_close(case.reference(x, w, b, tr, dest=before), expected, F64, msg="reference vs conv_transpose2d")
    assert_close(values(dst), expected, F32, TR_TOL, msg=case.id)


def test_transpose_properties(device) -> None:
    case = TCase("props", (3, 2), 8, 16, stride=(2, 3), groups=2)
    tr, _, _, ds = case.make(device, 1)
    assert tr.is_backwards is True
    assert (tr.kernel_offset_x, tr.kernel_offset_y) == (0, 0)
    assert (tr.input_feature_channels, tr.output_feature_channels, tr.groups) == (8, 16, 2)
    assert (tr.stride_in_pixels_x, tr.stride_in_pixels_y) == (2, 3)
    assert tr.data_source is ds and tr.label == "tr" and ds.load_count == ds.purge_count
    assert tr.accumulator_precision_option == m.MPSNNConvolutionAccumulatorPrecisionOption.float


# -- explicit geometry: offset, kernel offset, clip, channel windows, batch addressing ---------------------

GEOM_CASE = TCase("geom", (3, 4), 3, 5, stride=(2, 1), dilation=(1, 2))
GEOMS = [
    pytest.param(dict(offset=(0, 0, 0), ko=(0, 0)), id="plain"),
    pytest.param(dict(offset=(1, 0, 0), ko=(-1, 2)), id="offset_and_kernel_offset"),
    pytest.param(dict(offset=(-1, 1, 0), ko=(1, -1), clip=((1, 2, 0), (4, 3, 2))), id="clip_inside"),
    pytest.param(dict(offset=(0, 0, 0), ko=(2, 0), clip=((3, 1, 0), (20, 20, 2))), id="clip_partly_outside"),
    pytest.param(dict(offset=(0, 0, 0), ko=(1, 1), src_c_off=4, dst_c_off=4, src_c=8, dst_c=12), id="channel_offsets"),
    pytest.param(dict(offset=(0, 0, 1), ko=(0, 1), n_src=3), id="batch_offset_z"),
]


@pytest.mark.parametrize("geom", GEOMS)
def test_transpose_explicit_destination(device, cb, geom) -> None:
    tr, w, b, _ = GEOM_CASE.make(device, 11)
    tr.offset = MPSOffset(*geom["offset"])
    tr.kernel_offset_x, tr.kernel_offset_y = geom["ko"]
    if "clip" in geom:
        tr.clip_rect = region(*geom["clip"])
    tr.source_feature_channel_offset = geom.get("src_c_off", 0)
    tr.destination_feature_channel_offset = geom.get("dst_c_off", 0)
    x_img, x = image(rand(12, (geom.get("n_src", 2), 4, 5, geom.get("src_c", 3))), device)
    dst, before = poisoned((2, 7, 9, geom.get("dst_c", 5)), device)
    tr.encode(cb, x_img, dst)
    finish(cb)
    expected = GEOM_CASE.reference(x, w, b, tr, dest=before, clip_rect=geom.get("clip"), src_c_off=geom.get("src_c_off", 0),
                                   dst_c_off=geom.get("dst_c_off", 0))
    got = values(dst)
    written = ~np.isclose(expected, before, equal_nan=True)
    assert written.any() and not np.isnan(got[written]).any(), "every written element must change"
    assert_close(got, expected, F32, TR_TOL)


def test_transpose_fused_neuron_and_batch_norm(device, cb) -> None:
    case = TCase("post", (3, 3), 3, 4, stride=(2, 2))
    desc = case.descriptor()
    gamma, beta = rand(21, (4,), 0.5, 2.0).astype(np.float32), rand(22, (4,)).astype(np.float32)
    desc.set_batch_normalization_parameters_for_inference(None, None, gamma, beta, 0.0)
    desc.fused_neuron_descriptor = m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU, a=0.3)
    w, b = rand(23, (4, 3, 3, 3)).astype(np.float32), rand(24, (4,)).astype(np.float32)
    tr = m.MPSCNNConvolutionTranspose(device, m.ConvolutionDataSource(desc, w, b))
    x_img, x = image(rand(25, (1, 3, 4, 3)), device)
    y = tr.encode(cb, x_img)
    finish(cb)
    expected = case.reference(x, w, b, tr, dest_shape=y.shape, batch_norm=(None, None, gamma, beta, 0.0), neuron=(T.reLU, 0.3))
    assert_close(values(y), expected, F32, TR_TOL)


# -- auto sizing: padding policy with the reverse rule ----------------------------------------------------------

_SIZES = [("valid", int(MPSNNPaddingMethod.sizeValidOnly)), ("same", int(MPSNNPaddingMethod.sizeSame)), ("full", int(MPSNNPaddingMethod.sizeFull))]
_ALIGN = [("TL", 0), ("BR", 12), ("alignTopLeft", 1), ("alignBottomRight", 2)]
AUTO_CASES = [TCase("k3_s2", (3, 3), 3, 4, stride=(2, 2)), TCase("k4x2_s3x1_d1x2", (4, 2), 2, 3, stride=(3, 1), dilation=(1, 2))]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in AUTO_CASES])
@pytest.mark.parametrize("method", [pytest.param(a | s, id=f"{sn}_{an}") for sn, s in _SIZES for an, a in _ALIGN])
def test_transpose_auto_padding(device, cb, case: TCase, method) -> None:
    tr, w, b, _ = case.make(device, 31)
    tr.padding = method
    tr.offset = MPSOffset(3, 3, 0)                   # replaced by the policy
    x_img, x = image(rand(32, (1, 4, 5, case.cin)), device)
    y = tr.encode(cb, x_img)
    finish(cb)
    (kwd, khd), (sx, sy) = case.kwd(), case.stride
    style = {0: -1, 16: 0, 32: 1}[method & 0x30]
    assert (y.width, y.height) == ((5 - 1) * sx + 1 + style * (kwd - 1), (4 - 1) * sy + 1 + style * (khd - 1)), "destSizeReverse (§6.2)"
    p = m.padding.apply_padding_method(method, 5, 4, *case.kernel, *case.stride, *case.dilation, is_backwards=True)
    assert (y.width, y.height) == (p.width, p.height)
    assert tr.offset == MPSOffset(0, 0, 0) and (tr.kernel_offset_x, tr.kernel_offset_y) == (p.kernel_offset_x, p.kernel_offset_y)
    assert_close(values(y), case.reference(x, w, b, tr, dest_shape=y.shape), F32, TR_TOL)


def test_transpose_full_undoes_valid_convolution_size(device, cb) -> None:
    """Forward ValidOnly and reverse Full (kernel-base.md §6.4) restore the size when the
    stride divides evenly: 9 -> 4 -> 9 for k3 s2."""
    case = TCase("undo", (3, 3), 2, 2, stride=(2, 2))
    tr, _, _, _ = case.make(device, 33)
    tr.padding = int(MPSNNPaddingMethod.sizeFull)
    x_img, _ = image(rand(34, (1, 4, 4, 2)), device)
    y = tr.encode(cb, x_img)
    finish(cb)
    assert (y.width, y.height) == (9, 9)


# -- paired with a convolution's gradient state (autoencoder) ---------------------------------------------------

PAIRS = [
    pytest.param(((3, 3), (2, 2), (1, 1), int(MPSNNPaddingMethod.sizeSame)), id="k3_s2_same"),
    pytest.param(((4, 2), (2, 3), (1, 1), int(MPSNNPaddingMethod.sizeSame)), id="k4x2_even_s2x3"),
    pytest.param(((3, 3), (2, 2), (2, 1), int(MPSNNPaddingMethod.sizeValidOnly)), id="k3_d2x1_valid"),
    pytest.param(((2, 2), (3, 3), (1, 1), int(MPSNNPaddingMethod.sizeFull)), id="k2_s3_full"),
]


@pytest.mark.parametrize("pair", PAIRS)
def test_transpose_with_convolution_state(device, cb, pair) -> None:
    """``tr.encode(cb, y, conv_state)``: the result has the convolution's source size and
    ``kernel_offset = −conv.offset + (1 if the dilated kernel size is even)`` (§12.3). It
    equals the convolution gradient's data result for the channel-swapped, 180°-rotated weights
    (§12.2, "relationship to the convolution gradient")."""
    kernel, stride, dilation, method = pair
    kw, kh = kernel
    cin_conv, cout_conv = 3, 4
    t = rand(41, (cin_conv, kh, kw, cout_conv)).astype(np.float32)          # transpose: cout_conv -> cin_conv
    wc = np.ascontiguousarray(t[:, ::-1, ::-1, :].transpose(3, 1, 2, 0))     # W[k][q][p][c'] = T[c'][kH-1-q][kW-1-p][k]
    tcase = TCase("pair", kernel, cout_conv, cin_conv, stride=stride, dilation=dilation, bias=False)
    ds_t = m.ConvolutionDataSource(tcase.descriptor(), t)
    cdesc = m.MPSCNNConvolutionDescriptor(kernel_width=kw, kernel_height=kh, input_feature_channels=cin_conv, output_feature_channels=cout_conv)
    cdesc.stride_in_pixels_x, cdesc.stride_in_pixels_y = stride
    cdesc.dilation_rate_x, cdesc.dilation_rate_y = dilation
    ds_c = m.ConvolutionDataSource(cdesc, wc)
    conv = m.MPSCNNConvolution(device, ds_c)
    conv.padding = method
    conv.destination_image_allocator = m.MPSImage.default_allocator     # y is read several times below
    tr = m.MPSCNNConvolutionTranspose(device, ds_t)
    tr.destination_image_allocator = m.MPSImage.default_allocator
    x_img, x = image(rand(42, (1, 7, 8, cin_conv)), device)
    y, cstate = conv.encode(cb, x_img, destination_state_is_temporary=False)
    z = tr.encode(cb, y, cstate)                                               # Swift order: (cb, source, convolutionGradientState)
    zk, tstate = tr.encode(cb, y, convolution_gradient_state=cstate, destination_state_is_temporary=False)
    dst, before = poisoned((1, 7, 8, cin_conv), device)
    tr.encode(cb, y, cstate, dst)                                              # explicit destination form
    dst_b, _ = poisoned((1, 7, 8, cin_conv), device)
    tr.encode_batch(cb, [y], [cstate], [dst_b])                                # batch form, Swift order
    zb = tr.encode_batch(cb, [y], convolution_gradient_states=[cstate])
    e_img, e = image(rand(43, y.shape), device)
    grad = m.MPSCNNConvolutionGradient(device, ds_c)
    grad.destination_image_allocator = m.MPSImage.default_allocator
    dx = grad.encode(cb, e_img, x_img, cstate)
    z2 = tr.encode(cb, e_img, cstate)
    finish(cb)
    kwd, khd = tcase.kwd()
    ko = (-conv.offset.x + (1 if kwd % 2 == 0 else 0), -conv.offset.y + (1 if khd % 2 == 0 else 0))
    assert (tr.kernel_offset_x, tr.kernel_offset_y) == ko and tr.offset == MPSOffset(0, 0, 0)
    assert z.shape == (1, 7, 8, cin_conv) and zk.shape == z.shape, "the convolution's source size"
    assert isinstance(tstate, m.MPSCNNConvolutionTransposeGradientState)
    assert tstate.convolution is conv and tstate.convolution_transpose is tr
    yv = values(y)
    expected = R.convolution_transpose_forward(yv, t, None, dest_shape=z.shape, kernel_offset=ko, stride=stride, dilation=dilation)
    assert len(zb) == 1 and zb[0].shape == z.shape
    for got in (values(z), values(zk), values(dst), values(dst_b), values(zb[0])):
        assert_close(got, expected, F32, TR_TOL)
    assert_close(values(z2), values(dx), F32, TR_TOL, msg="transpose == convolution data gradient with rotated weights")
    assert_close(values(dx), R.convolution_gradient(e, x, wc, offset=conv.offset, stride=stride, dilation=dilation)[0], F32, TR_TOL)


# -- gradient ------------------------------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param(TCase("k3_s2", (3, 3), 3, 4, stride=(2, 2)), int(MPSNNPaddingMethod.sizeSame), id="k3_s2_same"),
    pytest.param(TCase("k4_s2_even", (4, 4), 2, 3, stride=(2, 2)), int(MPSNNPaddingMethod.sizeFull), id="k4_s2_even_full"),
    pytest.param(TCase("k3x2_s1x3_d2x1", (3, 2), 3, 2, stride=(1, 3), dilation=(2, 1)), int(MPSNNPaddingMethod.sizeValidOnly), id="k3x2_s1x3_d2x1_valid"),
    pytest.param(TCase("groups2", (3, 3), 8, 8, stride=(2, 1), groups=2), int(MPSNNPaddingMethod.sizeSame | MPSNNPaddingMethod.addRemainderToBottomRight),
                 id="groups2_same_BR"),
]


@pytest.mark.parametrize("case,method", GRAD_CASES)
def test_transpose_gradient(device, cb, case: TCase, method) -> None:
    tr, w, b, ds = case.make(device, 51)
    tr.padding = method
    tg = m.MPSCNNConvolutionTransposeGradient(device, ds)
    assert tg.source_gradient_feature_channels == case.cout and tg.source_image_feature_channels == case.cin
    assert tg.gradient_option == GO.all and tg.groups == case.groups
    x_img, x = image(rand(52, (2, 4, 5, case.cin)), device)
    y, tstate = tr.encode(cb, x_img, destination_state_is_temporary=False)
    assert isinstance(tstate, m.MPSCNNConvolutionTransposeGradientState) and tstate.convolution_transpose is tr
    e_img, e = image(rand(53, y.shape), device)
    tg.destination_image_allocator = m.MPSImage.default_allocator
    dx = tg.encode(cb, e_img, x_img, tstate)
    finish(cb)
    assert dx.shape == x_img.shape
    ko = (tr.kernel_offset_x, tr.kernel_offset_y)
    ds_ref, dw_ref, db_ref = R.convolution_transpose_gradient(e, x, w, offset=tr.offset, kernel_offset=ko, stride=case.stride,
                                                             dilation=case.dilation, groups=case.groups)
    # torch.autograd in float64 on conv_transpose2d with the random upstream gradient
    xt = nchw(x, grad=True)
    out, wt, bt = case.torch_forward(xt, w, b, ko, y.shape[1:3], wt_grad=True)
    assert_close(out.detach().permute(0, 2, 3, 1).numpy(), values(y), F32, TR_TOL, msg="forward vs torch")
    out.backward(nchw(e))
    dw_t = np.zeros_like(w, dtype=np.float64)                                  # wt [Cin][Cout/g][kH][kW] -> OHWI
    cin_g, cout_g = case.cin // case.groups, case.cout // case.groups
    g_wt = as_numpy(wt.grad)
    for g in range(case.groups):
        dw_t[g * cout_g:(g + 1) * cout_g] = g_wt[g * cin_g:(g + 1) * cin_g, :, ::-1, ::-1].transpose(1, 2, 3, 0)
    assert_close(ds_ref, as_numpy(xt.grad).transpose(0, 2, 3, 1), F64, msg="reference vs autograd (dS)")
    assert_close(dw_ref, dw_t, F64, msg="reference vs autograd (dW)")
    assert_close(values(dx), ds_ref, F32, TR_TOL, msg="dS")
    assert_close(as_numpy(tstate.gradient_for_weights), dw_ref, F32, TR_TOL, msg="dW")
    assert_close(as_numpy(tstate.gradient_for_biases), db_ref, F32, TR_TOL, msg="db")
    assert_close(as_numpy(tstate.gradient_for_biases), as_numpy(bt.grad), F32, TR_TOL, msg="db vs autograd")


@pytest.mark.parametrize("option", [GO.gradientWithData, GO.gradientWithWeightsAndBias], ids=["data_only", "weights_only"])
def test_transpose_gradient_option(device, cb, option) -> None:
    case = TCase("opt", (3, 3), 3, 4, stride=(2, 2))
    tr, w, b, ds = case.make(device, 61)
    tg = m.MPSCNNConvolutionTransposeGradient(device, ds)
    tg.gradient_option = option
    x_img, x = image(rand(62, (1, 3, 4, 3)), device)
    y, tstate = tr.encode(cb, x_img, destination_state_is_temporary=False)
    e_img, e = image(rand(63, y.shape), device)
    tstate.gradient_for_weights.fill_(float("nan"))
    tstate.gradient_for_biases.fill_(float("nan"))
    dx, _ = poisoned(x_img.shape, device)
    tg.encode(cb, e_img, x_img, tstate, dx)
    finish(cb)
    ds_ref, dw_ref, db_ref = R.convolution_transpose_gradient(e, x, w, offset=tr.offset, kernel_offset=(tr.kernel_offset_x, tr.kernel_offset_y),
                                                             stride=case.stride)
    gw, gb = as_numpy(tstate.gradient_for_weights), as_numpy(tstate.gradient_for_biases)
    if option == GO.gradientWithData:
        assert_close(values(dx), ds_ref, F32, TR_TOL)
        assert np.isnan(gw).all() and np.isnan(gb).all(), "weight and bias gradients untouched"
    else:
        assert np.isnan(values(dx)).all(), "the data gradient is untouched"
        assert_close(gw, dw_ref, F32, TR_TOL)
        assert_close(gb, db_ref, F32, TR_TOL)


# -- weight management -------------------------------------------------------------------------------------

def test_transpose_weight_management(device, queue) -> None:
    case = TCase("weights", (3, 2), 3, 4, stride=(2, 1))
    tr, w, b, ds = case.make(device, 71)
    cb = queue.make_command_buffer()
    st = tr.export_weights_and_biases(cb)
    finish(cb)
    np.testing.assert_array_equal(st.weights.cpu().numpy(), w)
    w2 = rand(72, w.shape).astype(np.float32)
    ds.set_weights(w2, b)
    tr.reload_weights_and_biases_from_data_source()
    x_img, x = image(rand(73, (1, 3, 4, 3)), device)
    cb = queue.make_command_buffer()
    y = tr.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), case.reference(x, w2, b, tr, dest_shape=y.shape), F32, TR_TOL)
    w3 = rand(74, w.shape).astype(np.float32)
    cb = queue.make_command_buffer()
    tr.reload_weights_and_biases_with_command_buffer(cb, m.MPSCNNConvolutionWeightsAndBiasesState(torch.from_numpy(w3).to(device.torch_device)))
    y3 = tr.encode(cb, x_img)
    finish(cb)
    assert_close(values(y3), case.reference(x, w3, b, tr, dest_shape=y3.shape), F32, TR_TOL)
    assert ds.load_count == ds.purge_count


# -- errors ----------------------------------------------------------------------------------------------------


def test_error_transpose_uint8_weights(device) -> None:
    case = TCase("u8", (3, 3), 2, 2)
    ds = m.ConvolutionDataSource(case.descriptor(), np.zeros((2, 3, 3, 2), np.uint8), ranges_for_uint8_kernel=np.array([[0, 1], [0, 1]], np.float32))
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTranspose.*data_type"):
        m.MPSCNNConvolutionTranspose(device, ds)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTransposeGradient.*data_type"):
        m.MPSCNNConvolutionTransposeGradient(device, ds)


def test_error_transpose_channels_and_states(device, cb) -> None:
    case = TCase("errs", (3, 3), 4, 2)
    tr, _, _, ds = case.make(device, 81)
    x3, _ = image(rand(82, (1, 3, 3, 3)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTranspose.*source_image\.feature_channels"):
        tr.encode(cb, x3)
    x4, _ = image(rand(83, (1, 3, 3, 4)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTranspose.*destination_image\.feature_channels"):
        tr.encode(cb, x4, poisoned((1, 3, 3, 1), device)[0])
    # the transpose gradient needs the transpose's own state, not a convolution's
    cdesc = m.MPSCNNConvolutionDescriptor(kernel_width=3, kernel_height=3, input_feature_channels=4, output_feature_channels=4)
    conv = m.MPSCNNConvolution(device, m.ConvolutionDataSource(cdesc, np.zeros((4, 3, 3, 4), np.float32)))
    _, cstate = conv.encode(cb, x4, destination_state_is_temporary=False)
    tg = m.MPSCNNConvolutionTransposeGradient(device, ds)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTransposeGradient.*gradient_state"):
        tg.encode(cb, image(rand(84, (1, 3, 3, 2)), device)[0], x4, cstate)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionTranspose.*convolution_gradient_state"):
        tr.encode(cb, x4, convolution_gradient_state="not a state")  # type: ignore[arg-type]
