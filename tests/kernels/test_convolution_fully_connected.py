"""MPSCNNFullyConnected and MPSCNNFullyConnectedGradient (convolution.md §14) through the public API.

The weight order is the FC documentation's ``[Cout][sourceWidth][sourceHeight][Cin]``
(CONFLICT §14.1, resolved in the spec): sources have ``W != H`` so that the ``[Cout][H][W][Cin]``
reading would give a different result (checked). Oracles: ``reference_conv.fully_connected_*``
and torch.autograd in float64 with a random upstream gradient.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSCNNNeuronType as T
from mpsnn import MPSNNNeuronDescriptor, MPSOffset
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32 = torch.float32
#: Per-op override: one output sums Ws·Hs·Cin products (up to ~100, values in [-1, 1]).
FC_TOL = {"float32": Tol(1e-5, 1e-5)}


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def make_fc(device: m.Device, ws: int, hs: int, cin: int, cout: int, seed: int, bias: bool = True,
            neuron: MPSNNNeuronDescriptor | None = None) -> tuple[m.MPSCNNFullyConnected, np.ndarray, np.ndarray | None, m.ConvolutionDataSource]:
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=ws, kernel_height=hs, input_feature_channels=cin, output_feature_channels=cout)
    if neuron is not None:
        desc.fused_neuron_descriptor = neuron
    w = rand(seed, (cout, ws, hs, cin)).astype(np.float32)             # [Cout][W][H][Cin]
    b = rand(seed + 1, (cout,)).astype(np.float32) if bias else None
    ds = m.ConvolutionDataSource(desc, w, b, label="fc")
    return m.MPSCNNFullyConnected(device, ds), w, b, ds


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 2, 3), (2, 1, 3, 6), (3, 1, 1, 7)], ids=["N2_H3_W5", "N1_H4_W2", "row_H1", "1x1"])
def test_fully_connected_forward(device, cb, shape) -> None:
    n, hs, ws, cin = shape
    fc, w, b, ds = make_fc(device, ws, hs, cin, 5, sum(shape))
    assert int(fc.padding.padding_method) == int(m.MPSNNPaddingMethod.sizeValidOnly)
    assert fc.label == "fc" and ds.load_count == ds.purge_count
    x_img, x = image(rand(7, shape), device)
    y = fc.encode(cb, x_img)
    finish(cb)
    assert y.shape == (n, 1, 1, 5)
    expected = R.fully_connected_forward(x, w, b)
    assert_close(values(y), expected, F32, FC_TOL)
    if 1 not in (hs, ws):  # the weight order matters: reading the same array as [O][H][W][I] differs
        misread = R.fully_connected_forward(x, w.reshape(w.shape[0], hs, ws, cin), b, weight_order="HW")
        assert not np.allclose(expected, misread)
    direct = np.einsum("oxyc,nyxc->no", w.astype(np.float64), x) + b          # independent einsum
    assert_close(values(y)[:, 0, 0], direct, F32, FC_TOL)


def test_fully_connected_explicit_destination_and_neuron(device, cb) -> None:
    """Explicit 1x1 destination with a channel offset and a wider source read from a channel
    offset; the fused neuron is applied; untouched channels keep their poison."""
    neuron = MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU, a=0.2)
    fc, w, b, _ = make_fc(device, 4, 2, 3, 5, 11, neuron=neuron)
    fc.source_feature_channel_offset = 4
    fc.destination_feature_channel_offset = 4
    fc.offset = MPSOffset(7, -3, 0)                   # ignored by fully connected layers
    x_img, x = image(rand(12, (2, 2, 4, 8)), device)
    dst, before = poisoned((2, 1, 1, 12), device)
    fc.encode(cb, x_img, dst)
    finish(cb)
    expected = R.fully_connected_forward(x, w, b, dest=before, src_c_off=4, dst_c_off=4, neuron=(T.reLU, 0.2))
    got = values(dst)
    assert np.isnan(got[..., :4]).all() and np.isnan(got[..., 9:]).all()
    assert_close(got, expected, F32, FC_TOL)


def test_fully_connected_batch_norm(device, cb) -> None:
    fc, w, b, ds = make_fc(device, 3, 2, 4, 6, 21)
    desc = ds.descriptor()
    gamma, beta = rand(22, (6,), 0.5, 2.0).astype(np.float32), rand(23, (6,)).astype(np.float32)
    mean, var = rand(24, (6,)).astype(np.float32), rand(25, (6,), 0.5, 2.0).astype(np.float32)
    desc.set_batch_normalization_parameters_for_inference(mean, var, gamma, beta, 1e-3)
    fc = m.MPSCNNFullyConnected(device, ds)
    x_img, x = image(rand(26, (2, 2, 3, 4)), device)
    y = fc.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), R.fully_connected_forward(x, w, b, batch_norm=(mean, var, gamma, beta, float(np.float32(1e-3)))), F32, FC_TOL)


def test_fully_connected_export_layout(device, cb) -> None:
    fc, w, b, _ = make_fc(device, 3, 2, 4, 5, 31)
    st = fc.export_weights_and_biases(cb)
    finish(cb)
    np.testing.assert_array_equal(st.weights.cpu().numpy().reshape(w.shape), w)   # [Cout][W][H][Cin]
    np.testing.assert_array_equal(st.biases.cpu().numpy(), b)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 2, 1, 3)], ids=["N2_H3_W5", "N3_col_W1"])
def test_fully_connected_gradient(device, cb, shape) -> None:
    n, hs, ws, cin = shape
    cout = 5
    fc, w, b, ds = make_fc(device, ws, hs, cin, cout, 41)
    grad = m.MPSCNNFullyConnectedGradient(device, ds)
    assert grad.source_gradient_feature_channels == cout and grad.source_image_feature_channels == cin
    x_img, x = image(rand(42, shape), device)
    y, state = fc.encode(cb, x_img, destination_state_is_temporary=False)
    dy_img, e = image(rand(43, (n, 1, 1, cout)), device)
    dx, _ = poisoned(shape, device)
    grad.encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    ds_ref, dw_ref, db_ref = R.fully_connected_gradient(e, x, w)
    # torch.autograd in float64 with the random upstream gradient
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)           # [Cout][W][H][Cin]
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    out = torch.einsum("oxyc,nyxc->no", wt, xt) + bt
    out.backward(torch.tensor(e[:, 0, 0], dtype=torch.float64))
    assert_close(ds_ref, as_numpy(xt.grad), "float64")
    assert_close(dw_ref, as_numpy(wt.grad), "float64")
    assert tuple(state.gradient_for_weights.shape) == w.shape, "the FC layout [Cout][W][H][Cin]"
    assert_close(values(dx), as_numpy(xt.grad), F32, FC_TOL, msg="dS")
    assert_close(as_numpy(state.gradient_for_weights), as_numpy(wt.grad), F32, FC_TOL, msg="dW")
    assert_close(as_numpy(state.gradient_for_biases), as_numpy(bt.grad), F32, FC_TOL, msg="db")


def test_fully_connected_gradient_auto_and_batch(device, cb) -> None:
    fc, w, b, ds = make_fc(device, 3, 2, 3, 4, 51)
    grad = m.MPSCNNFullyConnectedGradient(device, ds)
    grad.destination_image_allocator = m.MPSImage.default_allocator
    xs = [image(rand(52 + k, (1, 2, 3, 3)), device) for k in range(2)]
    ys, states = fc.encode_batch(cb, [i for i, _ in xs], destination_state_is_temporary=False)
    dys = [image(rand(60 + k, (1, 1, 1, 4)), device) for k in range(2)]
    dxs = grad.encode_batch(cb, [d for d, _ in dys], [i for i, _ in xs], states)
    finish(cb)
    refs = [R.fully_connected_gradient(e, x, w) for (_, x), (_, e) in zip(xs, dys)]
    for dx, r in zip(dxs, refs):
        assert dx.shape == (1, 2, 3, 3)
        assert_close(values(dx), r[0], F32, FC_TOL)
    assert_close(as_numpy(states[0].gradient_for_weights), refs[0][1] + refs[1][1], F32, FC_TOL)
    assert_close(as_numpy(states[0].gradient_for_biases), refs[0][2] + refs[1][2], F32, FC_TOL)


def test_error_source_size_mismatch(device, cb) -> None:
    fc, w, b, ds = make_fc(device, 3, 2, 4, 5, 71)
    x_bad, _ = image(rand(72, (1, 3, 2, 4)), device)                       # H and W swapped
    with pytest.raises(m.MPSError, match=r"MPSCNNFullyConnected.*source_image"):
        fc.encode(cb, x_bad)
    dst, _ = poisoned((1, 1, 1, 5), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNFullyConnected.*source_image"):
        fc.encode(cb, x_bad, dst)
    x_ok, _ = image(rand(73, (1, 2, 3, 4)), device)
    y, state = fc.encode(cb, x_ok, destination_state_is_temporary=False)
    dy, _ = image(rand(74, (1, 1, 1, 5)), device)
    grad = m.MPSCNNFullyConnectedGradient(device, ds)
    with pytest.raises(m.MPSError, match=r"MPSCNNFullyConnectedGradient.*source_image"):
        grad.encode(cb, dy, x_bad, state, poisoned((1, 3, 2, 4), device)[0])


def test_error_fully_connected_strides(device) -> None:
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=3, kernel_height=2, input_feature_channels=2, output_feature_channels=2)
    desc.stride_in_pixels_x = 2
    with pytest.raises(m.MPSError, match=r"MPSCNNFullyConnected.*descriptor"):
        m.MPSCNNFullyConnected(device, m.ConvolutionDataSource(desc, np.zeros((2, 3, 2, 2), np.float32)))
