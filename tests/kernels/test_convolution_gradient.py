"""MPSCNNConvolutionGradient (convolution.md §9, §11) through the public API.

Two independent oracles for every gradient: the float64 reference
``reference_conv.convolution_gradient`` (the §11.3 adjoint, tap by tap) and torch.autograd in
float64 on an equivalent ``conv2d`` (input padded / cropped so that output ``(i, j)`` has its
first tap at ``offset − (kWd >> 1) + s·(i, j)``) driven by a RANDOM upstream gradient. The
data gradient is the result image; the weight and bias gradients are read from the
``MPSCNNConvolutionGradientState`` (``gradient_for_weights`` in the data source's layout:
OHWI, depthwise ``[Cout][kH][kW]``).
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
from mpsnn import MPSImageEdgeMode, MPSNNPaddingMethod, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32 = torch.float32
Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
#: Per-op override: a weight gradient sums N·He·We products and a data gradient up to
#: Cout·kH·kW (inputs in [-1, 1]); float32 accumulation error ~1e-6 absolute.
GRAD_TOL = {"float32": Tol(1e-5, 1e-5)}
#: float64 oracle vs float64 oracle (reference vs autograd)
F64 = "float64"


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def torch_gradients(x: np.ndarray, w: np.ndarray, e: np.ndarray, *, offset: Any, stride: tuple[int, int], dilation: tuple[int, int],
                    groups: int = 1, depthwise: bool = False, src_c_off: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch.autograd (float64) of the §1 forward with zero edges, upstream gradient ``e``
    ``[N, He, We, Cout]``: returns ``(dS [N, H, W, Cin], dW (layout of w), db)``."""
    cin = w.shape[0] if depthwise else w.shape[3] * groups
    xt = torch.tensor(x[..., src_c_off:src_c_off + cin], dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(w.shape[0], dtype=torch.float64, requires_grad=True)
    wn = wt[:, None] if depthwise else wt.permute(0, 3, 1, 2)
    (sx, sy), (dx, dy) = stride, dilation
    kh, kw = w.shape[1:3]
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    n, he, we, _ = e.shape
    left, top = offset[0] - (kwd >> 1), offset[1] - (khd >> 1)
    span_w, span_h = (we - 1) * sx + kwd, (he - 1) * sy + khd
    h, wd = x.shape[1:3]
    pl, pt = max(0, -left), max(0, -top)
    pr, pb = max(0, left + span_w - wd), max(0, top + span_h - h)
    xp = F.pad(xt.permute(0, 3, 1, 2), (pl, pr, pt, pb))
    xc = xp[:, :, top + pt:top + pt + span_h, left + pl:left + pl + span_w]
    y = F.conv2d(xc, wn, bt, (sy, sx), 0, (dy, dx), cin if depthwise else groups)
    assert tuple(y.shape) == (n, w.shape[0], he, we)
    y.backward(torch.tensor(e, dtype=torch.float64).permute(0, 3, 1, 2))
    return as_numpy(xt.grad), as_numpy(wt.grad), as_numpy(bt.grad)


@dataclass(frozen=True)
class GCase:
    id: str
    kernel: tuple[int, int]
    cin: int
    cout: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    depthwise: bool = False
    padding: int = int(MPSNNPaddingMethod.sizeSame)
    src: tuple[int, int, int, int] | None = None        # N, H, W, C (default (2, 6, 7, cin))
    src_c_off: int = 0
    edge: MPSImageEdgeMode = Z

    def source_shape(self) -> tuple[int, int, int, int]:
        return self.src or (2, 6, 7, self.cin)

    def descriptor(self) -> m.MPSCNNConvolutionDescriptor:
        cls = m.MPSCNNDepthWiseConvolutionDescriptor if self.depthwise else m.MPSCNNConvolutionDescriptor
        d = cls(kernel_width=self.kernel[0], kernel_height=self.kernel[1], input_feature_channels=self.cin, output_feature_channels=self.cout)
        d.stride_in_pixels_x, d.stride_in_pixels_y = self.stride
        d.dilation_rate_x, d.dilation_rate_y = self.dilation
        d.groups = self.groups
        return d

    def weights(self, seed: int) -> np.ndarray:
        kw, kh = self.kernel
        shape = (self.cout, kh, kw) if self.depthwise else (self.cout, kh, kw, self.cin // self.groups)
        return rand(seed, shape).astype(np.float32)

    def make(self, device: m.Device, seed: int) -> tuple[m.MPSCNNConvolution, m.MPSCNNConvolutionGradient, np.ndarray, np.ndarray, m.ConvolutionDataSource]:
        w = self.weights(seed)
        b = rand(seed + 1, (self.cout,)).astype(np.float32)
        ds = m.ConvolutionDataSource(self.descriptor(), w, b)
        conv = m.MPSCNNConvolution(device, ds)
        conv.padding = self.padding
        conv.source_feature_channel_offset = self.src_c_off
        conv.edge_mode = self.edge
        return conv, m.MPSCNNConvolutionGradient(device, ds), w, b, ds

    def reference(self, e: np.ndarray, x: np.ndarray, w: np.ndarray, offset: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return R.convolution_gradient(e, x, w, offset=offset, stride=self.stride, dilation=self.dilation, groups=self.groups,
                                      depthwise=self.depthwise, edge_mode="zero" if self.edge == Z else "clamp", src_c_off=self.src_c_off)


SAME_BR = int(MPSNNPaddingMethod.sizeSame | MPSNNPaddingMethod.addRemainderToBottomRight)
GCASES = [
    GCase("k3_same", (3, 3), 3, 4),
    GCase("k3_stride2_same", (3, 3), 4, 5, stride=(2, 2)),
    GCase("k4x2_even_stride2x1", (4, 2), 3, 4, stride=(2, 1)),
    GCase("k2x3_dilation2x1", (2, 3), 3, 3, dilation=(2, 1)),
    GCase("k3x2_dilation1x2_stride3x1", (3, 2), 2, 3, stride=(3, 1), dilation=(1, 2)),
    GCase("k4_even_valid", (4, 4), 3, 2, padding=int(MPSNNPaddingMethod.sizeValidOnly)),
    GCase("k3_stride2_full", (3, 3), 3, 4, stride=(2, 2), padding=int(MPSNNPaddingMethod.sizeFull)),
    GCase("k4_stride3_tf_same", (4, 4), 2, 3, stride=(3, 3), padding=SAME_BR),
    GCase("k2_stride3_gt_kernel", (2, 2), 3, 2, stride=(3, 3), padding=int(MPSNNPaddingMethod.alignTopLeft | MPSNNPaddingMethod.sizeSame)),
    GCase("groups2", (3, 3), 8, 8, groups=2),
    GCase("groups4_stride2", (3, 2), 16, 16, stride=(2, 2), groups=4, src=(1, 5, 6, 16)),
    GCase("depthwise_k3", (3, 3), 5, 5, depthwise=True),
    GCase("depthwise_k4x3_stride2", (4, 3), 4, 4, stride=(2, 2), depthwise=True),
    GCase("src_channel_offset", (3, 3), 3, 4, stride=(1, 2), src=(2, 5, 6, 9), src_c_off=4),
    GCase("batch1_image_1x1", (3, 3), 3, 2, src=(1, 1, 1, 3)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GCASES])
def test_gradient_auto(device, cb, case: GCase) -> None:
    """Forward auto-encode with a state, gradient auto-encode: the result has the forward
    source's size and Cin channels; dW / db land in the state."""
    seed = sum(map(ord, case.id))
    conv, grad, w, b, _ = case.make(device, seed)
    x_img, x = image(rand(seed + 2, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    e = rand(seed + 3, y.shape)
    dy_img, e = image(e, device)
    grad.destination_image_allocator = m.MPSImage.default_allocator
    dx = grad.encode(cb, dy_img, x_img, state)
    finish(cb)
    n, h, wd, _ = case.source_shape()
    assert dx.shape == (n, h, wd, case.cin), "the result has the forward source's size and Cin channels"
    offset = (conv.offset.x, conv.offset.y)
    ds_ref, dw_ref, db_ref = case.reference(e, x, w, (*offset, 0))
    ds_t, dw_t, db_t = torch_gradients(x, w, e, offset=offset, stride=case.stride, dilation=case.dilation, groups=case.groups,
                                       depthwise=case.depthwise, src_c_off=case.src_c_off)
    assert_close(ds_ref, ds_t, F64, msg="reference vs autograd (dS)")
    assert_close(dw_ref, dw_t, F64, msg="reference vs autograd (dW)")
    assert tuple(state.gradient_for_weights.shape) == w.shape, "OHWI (depthwise [Cout][kH][kW])"
    for got, exp_ref, exp_t, name in ((values(dx), ds_ref, ds_t, "dS"), (as_numpy(state.gradient_for_weights), dw_ref, dw_t, "dW"),
                                      (as_numpy(state.gradient_for_biases), db_ref, db_t, "db")):
        assert_close(got, exp_ref, F32, GRAD_TOL, msg=f"{case.id} {name} vs reference")
        assert_close(got, exp_t, F32, GRAD_TOL, msg=f"{case.id} {name} vs autograd")


GEOMS = [
    pytest.param(dict(offset=(1, 0, 0), clip=None, dst=(2, 3, 4)), id="offset"),
    pytest.param(dict(offset=(-1, 2, 0), clip=((1, 1, 0), (3, 2, 2)), dst=(2, 4, 5)), id="offset_and_clip_inside"),
    pytest.param(dict(offset=(2, -1, 0), clip=((2, 0, 0), (9, 9, 2)), dst=(2, 3, 6)), id="clip_partly_outside"),
]


@pytest.mark.parametrize("geom", GEOMS)
def test_gradient_explicit_forward_geometry(device, cb, geom) -> None:
    """An explicit forward destination with an offset and a clip rectangle; the incoming
    gradient image has the forward destination's size and is read over the clip region."""
    case = GCase("explicit", (3, 2), 3, 4, stride=(2, 1), dilation=(1, 2))
    conv, grad, w, b, _ = case.make(device, 5)
    conv.offset = MPSOffset(*geom["offset"])
    if geom["clip"] is not None:
        conv.clip_rect = region(*geom["clip"])
    x_img, x = image(rand(6, case.source_shape()), device)
    y, _ = poisoned((*geom["dst"], 4), device, 0.0)
    state = conv.result_state(x_img, destination_image=y)
    conv.encode(cb, x_img, y, destination_state=state)
    dy_img, e_full = image(rand(7, y.shape), device)
    dx, _ = poisoned(x_img.shape, device)
    grad.encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    (cx, cy, _), (cw, ch, _) = geom["clip"] or ((0, 0, 0), (99, 99, 2))
    e = e_full[:, cy:cy + ch, cx:cx + cw]          # E covers the forward clip region (§11.3)
    ds_ref, dw_ref, db_ref = case.reference(e, x, w, geom["offset"])
    ds_t, dw_t, _ = torch_gradients(x, w, e, offset=geom["offset"], stride=case.stride, dilation=case.dilation)
    assert_close(ds_ref, ds_t, F64)
    assert_close(dw_ref, dw_t, F64)
    assert_close(values(dx), ds_ref, F32, GRAD_TOL, msg="dS")
    assert_close(as_numpy(state.gradient_for_weights), dw_ref, F32, GRAD_TOL, msg="dW")
    assert_close(as_numpy(state.gradient_for_biases), db_ref, F32, GRAD_TOL, msg="db")


def test_gradient_clamp_edge(device, cb) -> None:
    """Forward edge mode clamp: dW reads the source with clamp; dS drops the off-image taps
    (the zero-padding adjoint, §11.3). Reference only: autograd of a replicate pad would
    route the off-image taps to the edge pixels."""
    case = GCase("clamp", (3, 3), 3, 4, stride=(2, 1), edge=C)
    conv, grad, w, b, _ = case.make(device, 9)
    x_img, x = image(rand(10, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=True)
    dy_img, e = image(rand(11, y.shape), device)
    dx = grad.encode(cb, dy_img, x_img, state)
    out, _ = poisoned(x_img.shape, device)
    m.MPSCNNNeuron(device, neuron_descriptor=m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.none)).encode(cb, dx, out)
    finish(cb)
    ds_ref, dw_ref, db_ref = case.reference(e, x, w, (conv.offset.x, conv.offset.y, 0))
    zero_dw = R.convolution_gradient(e, x, w, offset=(conv.offset.x, conv.offset.y, 0), stride=(2, 1))[1]
    assert not np.allclose(dw_ref, zero_dw), "clamp must change dW in this case"
    assert_close(values(out), ds_ref, F32, GRAD_TOL)
    assert_close(as_numpy(state.gradient_for_weights), dw_ref, F32, GRAD_TOL)
    assert_close(as_numpy(state.gradient_for_biases), db_ref, F32, GRAD_TOL)


def test_gradient_properties(device) -> None:
    case = GCase("props", (3, 3), 8, 16, groups=2)
    _, grad, _, _, ds = case.make(device, 1)
    assert grad.source_gradient_feature_channels == 16 and grad.source_image_feature_channels == 8
    assert grad.groups == 2 and grad.channel_multiplier == 0 and grad.data_source is ds
    assert grad.gradient_option == GO.all
    assert grad.is_state_modified is True
    assert ds.load_count == ds.purge_count


# -- gradient_option: the part not selected is left untouched --------------------------------------------------


@pytest.mark.parametrize("option", [GO.gradientWithData, GO.gradientWithWeightsAndBias], ids=["data_only", "weights_only"])
def test_gradient_option(device, cb, option) -> None:
    case = GCase("option", (3, 3), 3, 4, stride=(2, 2))
    conv, grad, w, b, _ = case.make(device, 21)
    grad.gradient_option = option
    x_img, x = image(rand(22, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, e = image(rand(23, y.shape), device)
    state.gradient_for_weights.fill_(float("nan"))     # poison the state's buffers
    state.gradient_for_biases.fill_(float("nan"))
    dx, _ = poisoned(x_img.shape, device)
    grad.encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    ds_ref, dw_ref, db_ref = case.reference(e, x, w, (conv.offset.x, conv.offset.y, 0))
    gw, gb = as_numpy(state.gradient_for_weights), as_numpy(state.gradient_for_biases)
    if option == GO.gradientWithData:
        assert_close(values(dx), ds_ref, F32, GRAD_TOL)
        assert np.isnan(gw).all() and np.isnan(gb).all(), "weight and bias gradients untouched"
    else:
        assert np.isnan(values(dx)).all(), "the data gradient is untouched"
        assert_close(gw, dw_ref, F32, GRAD_TOL)
        assert_close(gb, db_ref, F32, GRAD_TOL)


# -- batches: encode_batch sums over the batch, encode overwrites ----------------------------------------------


def test_encode_batch_accumulates_and_encode_overwrites(device, queue) -> None:
    case = GCase("accumulate", (3, 2), 3, 4, stride=(1, 2))
    conv, grad, w, b, _ = case.make(device, 31)
    xs = [image(rand(32 + k, (1, 5, 6, 3)), device) for k in range(3)]
    cb = queue.make_command_buffer()
    ys, states = conv.encode_batch(cb, [i for i, _ in xs], destination_state_is_temporary=False)
    assert len(states) == 3 and all(s is states[0] for s in states), "one state shared by the batch"
    dys = [image(rand(40 + k, ys[0].shape), device) for k in range(3)]
    grad.destination_image_allocator = m.MPSImage.default_allocator
    dxs = grad.encode_batch(cb, [d for d, _ in dys], [i for i, _ in xs], states)
    finish(cb)
    offset = (conv.offset.x, conv.offset.y, 0)
    refs = [case.reference(e, x, w, offset) for (_, x), (_, e) in zip(xs, dys)]
    for dx, (ds_ref, _, _) in zip(dxs, refs):
        assert_close(values(dx), ds_ref, F32, GRAD_TOL)
    st = states[0]
    assert_close(as_numpy(st.gradient_for_weights), sum(r[1] for r in refs), F32, GRAD_TOL, msg="dW summed over the batch")
    assert_close(as_numpy(st.gradient_for_biases), sum(r[2] for r in refs), F32, GRAD_TOL, msg="db summed over the batch")
    # a plain encode overwrites the state's gradients with those of its own images
    cb2 = queue.make_command_buffer()
    grad.encode(cb2, dys[1][0], xs[1][0], st)
    finish(cb2)
    assert_close(as_numpy(st.gradient_for_weights), refs[1][1], F32, GRAD_TOL, msg="encode overwrites dW")
    assert_close(as_numpy(st.gradient_for_biases), refs[1][2], F32, GRAD_TOL, msg="encode overwrites db")


def test_multi_image_encode_sums_over_its_images(device, cb) -> None:
    case = GCase("multi", (3, 3), 3, 4, src=(2, 5, 5, 3))
    conv, grad, w, b, _ = case.make(device, 51)
    x_img, x = image(rand(52, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, e = image(rand(53, y.shape), device)
    state.gradient_for_weights.fill_(5.0)            # an encode overwrites whatever was there
    dx = grad.encode(cb, dy_img, x_img, state)
    finish(cb)
    ds_ref, dw_ref, db_ref = case.reference(e, x, w, (conv.offset.x, conv.offset.y, 0))
    assert_close(values(dx), ds_ref, F32, GRAD_TOL)
    assert_close(as_numpy(state.gradient_for_weights), dw_ref, F32, GRAD_TOL)


def test_gradient_reload_from_data_source(device, queue) -> None:
    """§10 flow 1: new weights in the data source, reload on the gradient kernel too."""
    case = GCase("reload", (3, 3), 3, 4)
    conv, grad, w, b, ds = case.make(device, 61)
    w2 = case.weights(62)
    ds.set_weights(w2, b)
    conv.reload_weights_and_biases_from_data_source()
    grad.reload_weights_and_biases_from_data_source()
    cb = queue.make_command_buffer()
    x_img, x = image(rand(63, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, e = image(rand(64, y.shape), device)
    dx = grad.encode(cb, dy_img, x_img, state)
    out, _ = poisoned(x_img.shape, device)
    m.MPSCNNNeuron(device, neuron_descriptor=m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.none)).encode(cb, dx, out)
    finish(cb)
    ds_ref = case.reference(e, x, w2, (conv.offset.x, conv.offset.y, 0))[0]
    assert_close(values(out), ds_ref, F32, GRAD_TOL)
    assert ds.load_count == ds.purge_count


def test_gradient_reload_with_command_buffer(device, cb) -> None:
    case = GCase("reload_gpu", (3, 3), 3, 4)
    conv, grad, w, b, _ = case.make(device, 71)
    w2 = case.weights(72)
    st = m.MPSCNNConvolutionWeightsAndBiasesState(torch.from_numpy(w2).to(device.torch_device), torch.from_numpy(b).to(device.torch_device))
    conv.reload_weights_and_biases_with_command_buffer(cb, st)
    grad.reload_weights_and_biases_with_command_buffer(cb, st)
    x_img, x = image(rand(73, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, e = image(rand(74, y.shape), device)
    dx, _ = poisoned(x_img.shape, device)
    grad.encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    assert_close(values(dx), case.reference(e, x, w2, (conv.offset.x, conv.offset.y, 0))[0], F32, GRAD_TOL)


# -- errors ---------------------------------------------------------------------------------------------------------


def test_error_gradient_with_non_convolution_state(device, cb) -> None:
    case = GCase("err", (3, 3), 3, 3)
    _, grad, _, _, _ = case.make(device, 81)
    x_img, _ = image(rand(82, case.source_shape()), device)
    neuron = m.MPSCNNNeuron(device, neuron_descriptor=m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.reLU))
    y, nstate = neuron.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, _ = image(rand(83, y.shape), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionGradient.*gradient_state"):
        grad.encode(cb, dy_img, x_img, nstate)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionGradient.*gradient_state"):
        grad.encode_batch(cb, [dy_img], [x_img], [nstate])


def test_error_gradient_of_sub_pixel(device) -> None:
    desc = m.MPSCNNSubPixelConvolutionDescriptor(kernel_width=3, kernel_height=3, input_feature_channels=4, output_feature_channels=8)
    desc.sub_pixel_scale_factor = 2
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionGradient.*sub_pixel_scale_factor"):
        m.MPSCNNConvolutionGradient(device, m.ConvolutionDataSource(desc, np.zeros((8, 3, 3, 4), np.float32)))


def test_error_gradient_too_few_channels(device, cb) -> None:
    case = GCase("err_ch", (3, 3), 3, 4)
    conv, grad, _, _, _ = case.make(device, 91)
    x_img, _ = image(rand(92, case.source_shape()), device)
    y, state = conv.encode(cb, x_img, destination_state_is_temporary=False)
    dy3, _ = image(rand(93, (*y.shape[:3], 3)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNConvolutionGradient.*source_gradient"):
        grad.encode(cb, dy3, x_img, state)
