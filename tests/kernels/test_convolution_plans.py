"""Encode plans of MPSCNNConvolution and MPSCNNConvolutionGradient: the first encode of a
geometry records a plan, later encodes of that geometry replay it without the general path.

Every replayed result is checked against the float64 reference (and the gradients against
torch.autograd with a random upstream gradient), with fresh data on every encode so that a
plan that kept stale tensors fails. The general path is counted, so a test fails when a
replay silently falls back to it, and when a change that must invalidate a plan (kernel
properties, weights, gradient option, forward geometry) does not.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn import MPSImageEdgeMode, MPSNNNeuronDescriptor, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.core.binary_kernel import MPSCNNBinaryKernel
from mpsnn.core.kernel import MPSCNNKernel
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
CONV_TOL = {"float32": Tol(1e-5, 1e-5), "bfloat16": Tol(1.6e-2, 3e-2)}
GRAD_TOL = {"float32": Tol(1e-5, 1e-4), "bfloat16": Tol(1.6e-2, 6e-2)}


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


def rounded(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, np.float64)).to(dtype).double().numpy()


def make(device: m.Device, kernel: int, cin: int, cout: int, stride: int = 1, dilation: int = 1, groups: int = 1, seed: int = 0,
         neuron: MPSNNNeuronDescriptor | None = None) -> tuple[m.MPSCNNConvolution, m.MPSCNNConvolutionGradient, np.ndarray, np.ndarray]:
    d = m.MPSCNNConvolutionDescriptor(kernel_width=kernel, kernel_height=kernel, input_feature_channels=cin, output_feature_channels=cout)
    d.stride_in_pixels_x = d.stride_in_pixels_y = stride
    d.dilation_rate_x = d.dilation_rate_y = dilation
    d.groups = groups
    if neuron is not None:
        d.fused_neuron_descriptor = neuron
    w = rand(seed, (cout, kernel, kernel, cin // groups)).astype(np.float32)
    b = rand(seed + 1, (cout,)).astype(np.float32)
    ds = m.ConvolutionDataSource(d, w, b)
    return m.MPSCNNConvolution(device, ds), m.MPSCNNConvolutionGradient(device, ds), w, b


@pytest.fixture
def general_paths(monkeypatch) -> dict[str, int]:
    """Counts the encodes that took the general (unplanned) path."""
    counts = {"forward": 0, "gradient": 0}
    fwd, grad = MPSCNNKernel._encode_checked, MPSCNNBinaryKernel._encode_checked

    def fwd_counting(self, *a: Any) -> Any:
        counts["forward"] += 1
        return fwd(self, *a)

    def grad_counting(self, *a: Any) -> Any:
        counts["gradient"] += 1
        return grad(self, *a)
    monkeypatch.setattr(MPSCNNKernel, "_encode_checked", fwd_counting)
    monkeypatch.setattr(MPSCNNBinaryKernel, "_encode_checked", grad_counting)
    return counts


def forward_once(conv: m.MPSCNNConvolution, device: m.Device, queue: Any, x: np.ndarray, dest_shape: tuple[int, ...], dtype: torch.dtype,
                 **ref: Any) -> None:
    """One explicit-destination encode on fresh data, checked against the reference."""
    x_img, xv = image(x, device, dtype)
    y_img, before = poisoned(dest_shape, device, dtype=dtype)
    cb = queue.make_command_buffer()
    conv.encode(cb, x_img, y_img)
    finish(cb)
    w, b = ref.pop("w"), ref.pop("b")
    expected = R.convolution_forward(xv, rounded(w, dtype), rounded(b, dtype), dest=before, offset=conv.offset, clip_rect=conv.clip_rect,
                                     **ref)
    assert_close(values(y_img), expected, dtype, CONV_TOL)


# -- forward ------------------------------------------------------------------------------------------------


FORWARD = [
    pytest.param(dict(kernel=3, cin=8, cout=12), (2, 9, 7), (0, 0, 0), id="k3_same"),
    pytest.param(dict(kernel=1, cin=8, cout=4, stride=2), (2, 9, 8), (0, 0, 0), id="k1_s2"),
    pytest.param(dict(kernel=3, cin=8, cout=8, stride=2, groups=2), (1, 8, 8), (0, 0, 0), id="k3_s2_groups2"),
    pytest.param(dict(kernel=3, cin=4, cout=4, dilation=2), (2, 7, 9), (0, 0, 0), id="k3_dilated"),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("spec, src, offset", FORWARD)
def test_forward_replays_one_plan(device, queue, general_paths, spec: dict[str, int], src: tuple[int, int, int], offset: tuple[int, int, int],
                                  dtype: torch.dtype) -> None:
    conv, _, w, b = make(device, **spec)
    conv.offset = MPSOffset(*offset)
    s = spec.get("stride", 1)
    dest = (src[0], -(-src[1] // s), -(-src[2] // s), spec["cout"])
    ref = dict(w=w, b=b, stride=(s, s), dilation=(spec.get("dilation", 1),) * 2, groups=spec.get("groups", 1))
    for k in range(3):
        forward_once(conv, device, queue, rand(10 + k, (*src, spec["cin"])), dest, dtype, **dict(ref))
    assert len(conv._plans) == 1, "the first encode records a plan"
    assert general_paths["forward"] == 1, "the later encodes replay it"


def test_forward_plan_follows_kernel_properties(device, queue, general_paths) -> None:
    """Changing a property the geometry depends on records a new plan; every result is right."""
    conv, _, w, b = make(device, 3, 4, 8)
    src, dest = (2, 6, 7, 4), (2, 6, 7, 8)
    ref = dict(w=w, b=b)
    forward_once(conv, device, queue, rand(1, src), dest, F32, **dict(ref))
    conv.offset = MPSOffset(1, 0, 0)
    forward_once(conv, device, queue, rand(2, src), dest, F32, **dict(ref))
    conv.clip_rect = MTLRegion(MTLOrigin(1, 2, 0), MTLSize(4, 3, 2))
    forward_once(conv, device, queue, rand(3, src), dest, F32, **dict(ref))
    forward_once(conv, device, queue, rand(4, src), dest, F32, **dict(ref))   # replay of the clipped plan
    conv.clip_rect = m.MPSRectNoClip
    conv.destination_feature_channel_offset = 4
    forward_once(conv, device, queue, rand(5, src), (2, 6, 7, 12), F32, dst_c_off=4, **dict(ref))
    forward_once(conv, device, queue, rand(6, src), (2, 6, 7, 12), F32, dst_c_off=4, **dict(ref))
    conv.destination_feature_channel_offset = 0
    conv.source_feature_channel_offset = 4
    forward_once(conv, device, queue, rand(7, (2, 6, 7, 8)), dest, F32, src_c_off=4, **dict(ref))
    forward_once(conv, device, queue, rand(8, (2, 6, 7, 8)), dest, F32, src_c_off=4, **dict(ref))
    assert general_paths["forward"] == 5, "one general encode per new geometry, replays otherwise"


def test_forward_plan_follows_weight_reloads(device, queue, general_paths) -> None:
    conv, _, w, b = make(device, 3, 4, 4)
    src, dest = (1, 5, 5, 4), (1, 5, 5, 4)
    forward_once(conv, device, queue, rand(1, src), dest, F32, w=w, b=b)
    forward_once(conv, device, queue, rand(2, src), dest, F32, w=w, b=b)
    w2, b2 = rand(3, w.shape).astype(np.float32), rand(4, b.shape).astype(np.float32)
    cb = queue.make_command_buffer()
    conv.reload_weights_and_biases(cb, m.MPSCNNConvolutionWeightsAndBiasesState(torch.from_numpy(w2).to(device.torch_device),
                                                                                    torch.from_numpy(b2).to(device.torch_device)))
    finish(cb)
    forward_once(conv, device, queue, rand(5, src), dest, F32, w=w2, b=b2)
    forward_once(conv, device, queue, rand(6, src), dest, F32, w=w2, b=b2)
    conv.data_source.weights()[...] = w          # the data source still holds the first weights
    conv.reload_weights_and_biases_from_data_source()
    forward_once(conv, device, queue, rand(7, src), dest, F32, w=w, b=b)
    assert general_paths["forward"] == 3, "a reload clears the plans"


@pytest.mark.parametrize("neuron", ["reLU", "pReLU"])
def test_forward_replay_applies_the_fused_neuron(device, queue, general_paths, neuron: str) -> None:
    if neuron == "pReLU":
        slopes = np.linspace(-0.5, 0.5, 8).astype(np.float32)
        nd = MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes)
        ref_neuron: Any = (m.MPSCNNNeuronType.pReLU, 0, 0, 0, slopes)
    else:
        nd = MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.reLU, 0.1)
        ref_neuron = (m.MPSCNNNeuronType.reLU, 0.1)
    conv, _, w, b = make(device, 3, 4, 8, neuron=nd)
    src, dest = (2, 5, 6, 4), (2, 5, 6, 8)
    for k in range(3):
        forward_once(conv, device, queue, rand(k, src), dest, F32, w=w, b=b, neuron=ref_neuron)
    assert general_paths["forward"] == 1


def test_forward_general_geometries_are_not_planned(device, queue, general_paths) -> None:
    """A window that leaves the image unevenly (explicit padding) and edge mode clamp take
    the general path on every encode, and stay correct."""
    conv, _, w, b = make(device, 3, 4, 4)
    conv.offset = MPSOffset(3, -2, 0)
    conv.edge_mode = MPSImageEdgeMode.clamp
    for k in range(2):
        forward_once(conv, device, queue, rand(k, (1, 6, 6, 4)), (1, 6, 6, 4), F32, w=w, b=b, edge_mode="clamp")
    assert conv._plans == {} and general_paths["forward"] == 2


def test_auto_sized_form_replays(device, queue, general_paths) -> None:
    conv, _, w, b = make(device, 3, 4, 8, stride=2)
    for k in range(3):
        x_img, xv = image(rand(k, (2, 7, 8, 4)), device)
        cb = queue.make_command_buffer()
        y = conv.encode(cb, x_img)
        got = y.to_torch().clone()
        finish(cb)
        expected = R.convolution_forward(xv, w, b, dest_shape=tuple(got.shape), offset=conv.offset, stride=(2, 2))
        assert_close(got.double().cpu().numpy(), expected, F32, CONV_TOL)
    assert general_paths["forward"] == 1


def test_views_take_the_general_path(device, queue, general_paths) -> None:
    conv, _, w, b = make(device, 3, 4, 4)
    x_img, xv = image(rand(1, (3, 5, 5, 4)), device)
    y_img, before = poisoned((3, 5, 5, 4), device)
    for _ in range(2):
        cb = queue.make_command_buffer()
        conv.encode(cb, x_img.batch_representation()[2], y_img.batch_representation()[0])
        finish(cb)
    expected = R.convolution_forward(xv[2:3], w, b, dest=before[0:1])
    assert_close(values(y_img)[0:1], expected, F32, CONV_TOL)
    assert np.isnan(values(y_img)[1:]).all(), "images 1 and 2 are left alone"
    assert conv._plans == {} and general_paths["forward"] == 2


# -- gradient -----------------------------------------------------------------------------------------------


def autograd_gradients(x: np.ndarray, w_ohwi: np.ndarray, e: np.ndarray, stride: int, pad: int, dilation: int, groups: int) -> tuple[np.ndarray, ...]:
    """dS, dW (OHWI) and db of ``conv2d(x, w, pad)`` for the upstream gradient ``e`` (all NHWC)."""
    xt = torch.tensor(x, dtype=F64).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.tensor(w_ohwi, dtype=F64).permute(0, 3, 1, 2).requires_grad_()
    bt = torch.zeros(w_ohwi.shape[0], dtype=F64, requires_grad=True)
    y = F.conv2d(xt, wt, bt, stride, pad, dilation, groups)
    y.backward(torch.tensor(e, dtype=F64).permute(0, 3, 1, 2))
    assert xt.grad is not None and wt.grad is not None and bt.grad is not None
    return xt.grad.permute(0, 2, 3, 1).numpy(), wt.grad.permute(0, 2, 3, 1).numpy(), bt.grad.numpy()


GRADIENT = [
    pytest.param(dict(kernel=3, cin=8, cout=4), (2, 7, 6), id="k3"),
    pytest.param(dict(kernel=1, cin=4, cout=8, stride=2), (2, 8, 9), id="k1_s2"),
    pytest.param(dict(kernel=3, cin=8, cout=8, stride=2, groups=2), (1, 9, 8), id="k3_s2_groups2"),
    pytest.param(dict(kernel=3, cin=4, cout=4, dilation=2), (2, 7, 7), id="k3_dilated"),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("spec, src", GRADIENT)
def test_gradient_replays_one_plan(device, queue, general_paths, spec: dict[str, int], src: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Forward with a state, then the gradient into an explicit destination, three times on
    fresh data (a new state each time, as in training): dS, dW and db against the reference
    and autograd; one general gradient encode."""
    conv, grad, w, _ = make(device, **spec)
    k, s, d = spec["kernel"], spec.get("stride", 1), spec.get("dilation", 1)
    kd = (k - 1) * d + 1
    conv.offset = MPSOffset(kd >> 1, kd >> 1, 0)    # windows start at the image's corner: torch's padding 0
    n, h, wd = src
    oh, ow = (h - kd) // s + 1, (wd - kd) // s + 1
    for step in range(3):
        x_img, xv = image(rand(20 + step, (n, h, wd, spec["cin"])), device, dtype)
        y_img, _ = poisoned((n, oh, ow, spec["cout"]), device, dtype=dtype)
        e_img, ev = image(rand(30 + step, (n, oh, ow, spec["cout"])), device, dtype)
        dx_img, _ = poisoned((n, h, wd, spec["cin"]), device, dtype=dtype)
        cb = queue.make_command_buffer()
        state = conv.result_state(x_img, None, y_img)
        conv.encode(cb, x_img, y_img, destination_state=state)
        grad.encode(cb, e_img, x_img, state, dx_img)
        finish(cb)
        wr = rounded(w, dtype)
        ds_ref, dw_ref, db_ref = R.convolution_gradient(ev, xv, wr, offset=(conv.offset.x, conv.offset.y, 0), stride=(s, s),
                                                        dilation=(d, d), groups=spec.get("groups", 1))
        ds_t, dw_t, db_t = autograd_gradients(xv, wr, ev, s, 0, d, spec.get("groups", 1))
        assert_close(ds_ref, ds_t, F64, msg="reference vs autograd (dS)")
        assert_close(dw_ref, dw_t, F64, msg="reference vs autograd (dW)")
        for got, exp, name in ((values(dx_img), ds_t, "dS"), (state.gradient_for_weights.double().cpu().numpy(), dw_t, "dW"),
                               (state.gradient_for_biases.double().cpu().numpy(), db_t, "db")):
            assert_close(got, exp, dtype, GRAD_TOL, msg=f"step {step} {name}")
    assert len(grad._plans) == 1
    assert general_paths["gradient"] == 1, "the later gradient encodes replay the plan"


@pytest.mark.parametrize("stride", [1, 2])
def test_auto_sized_gradient_replays(device, queue, general_paths, stride: int) -> None:
    """The form that returns the data gradient replays the plan too (after the descriptor
    pipeline sized and allocated the result): dS, dW and db against autograd on every step."""
    conv, grad, w, _ = make(device, 3, 4, 6, stride=stride)
    conv.offset = MPSOffset(1, 1, 0)                 # torch's padding 0
    n, h, wd = 2, 9, 8
    oh, ow = (h - 3) // stride + 1, (wd - 3) // stride + 1
    for step in range(3):
        x_img, xv = image(rand(40 + step, (n, h, wd, 4)), device)
        y_img, _ = poisoned((n, oh, ow, 6), device)
        e_img, ev = image(rand(50 + step, (n, oh, ow, 6)), device)
        cb = queue.make_command_buffer()
        state = conv.result_state(x_img, None, y_img)
        conv.encode(cb, x_img, y_img, destination_state=state)
        dx = grad.encode(cb, e_img, x_img, state)
        got = dx.to_torch().double().cpu().numpy()
        finish(cb)
        ds_t, dw_t, db_t = autograd_gradients(xv, w, ev, stride, 0, 1, 1)
        assert got.shape == ds_t.shape
        assert_close(got, ds_t, F32, GRAD_TOL, msg=f"step {step} dS")
        assert_close(state.gradient_for_weights.double().cpu().numpy(), dw_t, F32, GRAD_TOL, msg=f"step {step} dW")
        assert_close(state.gradient_for_biases.double().cpu().numpy(), db_t, F32, GRAD_TOL, msg=f"step {step} db")
    assert general_paths["gradient"] == 1, "the later auto-sized encodes replay the plan"


def test_batch_gradient_replays_and_sums(device, queue, general_paths) -> None:
    """``encode_batch`` with one shared state replays the plan per image and sums dW and db
    over the batch (the first image overwrites the state's buffers, the rest add)."""
    conv, grad, w, _ = make(device, 3, 4, 4)
    conv.offset = MPSOffset(1, 1, 0)
    for step in range(2):
        xs = [image(rand(60 + 4 * step + k, (1, 6, 6, 4)), device) for k in range(3)]
        es = [image(rand(70 + 4 * step + k, (1, 4, 4, 4)), device) for k in range(3)]
        ys = [poisoned((1, 4, 4, 4), device)[0] for _ in range(3)]
        dxs = [poisoned((1, 6, 6, 4), device)[0] for _ in range(3)]
        cb = queue.make_command_buffer()
        states = conv.result_state_batch([x for x, _ in xs], None, ys)
        conv.encode_batch(cb, [x for x, _ in xs], ys, destination_states=states)
        grad.encode_batch(cb, [e for e, _ in es], [x for x, _ in xs], states, dxs)
        finish(cb)
        xv = np.concatenate([v for _, v in xs])
        ev = np.concatenate([v for _, v in es])
        ds_t, dw_t, db_t = autograd_gradients(xv, w, ev, 1, 0, 1, 1)
        assert_close(np.concatenate([values(d) for d in dxs]), ds_t, F32, GRAD_TOL)
        assert_close(states[0].gradient_for_weights.double().cpu().numpy(), dw_t, F32, GRAD_TOL, msg="dW summed over the batch")
        assert_close(states[0].gradient_for_biases.double().cpu().numpy(), db_t, F32, GRAD_TOL, msg="db summed over the batch")
    assert general_paths["gradient"] == 1, "one general encode records the plan; the other five replay it"


def test_gradient_plan_follows_option_and_forward_geometry(device, queue, general_paths) -> None:
    conv, grad, w, _ = make(device, 3, 4, 4)
    n, h, wd = 2, 6, 6

    def step(seed: int, offset: tuple[int, int], option: m.MPSCNNConvolutionGradientOption, trim: int = 0) -> None:
        grad.gradient_option = option
        conv.offset = MPSOffset(*offset, 0)
        x_img, xv = image(rand(seed, (n, h, wd, 4)), device)
        y_img, _ = poisoned((n, h - trim, wd - trim, 4), device)
        e_img, ev = image(rand(seed + 1, (n, h - trim, wd - trim, 4)), device)
        dx_img, before = poisoned((n, h, wd, 4), device)
        cb = queue.make_command_buffer()
        state = conv.result_state(x_img, None, y_img)
        conv.encode(cb, x_img, y_img, destination_state=state)
        grad.encode(cb, e_img, x_img, state, dx_img)
        finish(cb)
        ds, dw, db = R.convolution_gradient(ev, xv, w, offset=(*offset, 0))
        data = bool(option & m.MPSCNNConvolutionGradientOption.gradientWithData)
        weights = bool(option & m.MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias)
        if data:
            assert_close(values(dx_img), ds, F32, GRAD_TOL)
        else:
            assert np.isnan(values(dx_img)).all(), "no data gradient asked for: the destination is left alone"
        got_w, got_b = state.gradient_for_weights.double().cpu().numpy(), state.gradient_for_biases.double().cpu().numpy()
        if weights:
            assert_close(got_w, dw, F32, GRAD_TOL)
            assert_close(got_b, db, F32, GRAD_TOL)
        else:
            assert not got_w.any() and not got_b.any(), "no weight gradient asked for: the state's buffers stay 0"

    Opt = m.MPSCNNConvolutionGradientOption
    step(1, (0, 0), Opt.all)
    step(3, (0, 0), Opt.all)                     # replay
    step(5, (0, 0), Opt.gradientWithData)        # new plan: data only
    step(7, (0, 0), Opt.gradientWithData)        # replay
    step(9, (0, 0), Opt.gradientWithWeightsAndBias)
    step(11, (1, 1), Opt.all, trim=2)            # another forward geometry ("valid" windows)
    step(13, (1, 1), Opt.all, trim=2)            # replay
    assert general_paths["gradient"] == 4
    step(15, (1, 0), Opt.all)                    # windows off the image on one side only: the general path,
    step(17, (1, 0), Opt.all)                    # every time
    assert general_paths["gradient"] == 6
