"""The weight transfers of mpsnn's graph update (``_ConvolutionWeights`` in
``mpsnn.kernels.convolution``): the copy-on-write export (``_export_shared``), a gradient
kernel reading its forward kernel's master (``_borrow_master``), and the fully-connected
master kept in the data source's ``[Cout][W][H][Cin]`` layout."""
from __future__ import annotations

import numpy as np
import torch

import mpsnn as m
from mpsnn.kernels.convolution_data import MPSCNNConvolutionWeightsAndBiasesState
from mpsnn.testing.images import finish, image, values


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def fc_source(ws: int = 3, hs: int = 2, cin: int = 4, cout: int = 5, seed: int = 1) -> tuple[m.ConvolutionDataSource, np.ndarray, np.ndarray]:
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=ws, kernel_height=hs, input_feature_channels=cin, output_feature_channels=cout)
    w, b = rand(seed, (cout, ws, hs, cin)), rand(seed + 1, (cout,))
    return m.ConvolutionDataSource(desc, w, b, label="fc"), w, b


def state_of(device: m.Device, w: np.ndarray, b: np.ndarray) -> MPSCNNConvolutionWeightsAndBiasesState:
    t = device.torch_device
    return MPSCNNConvolutionWeightsAndBiasesState(torch.from_numpy(w).to(t), torch.from_numpy(b).to(t))


def test_shared_export_is_a_snapshot_when_kept(device, queue, cb) -> None:
    ds, w, b = fc_source()
    fc = m.MPSCNNFullyConnected(device, ds)
    kept = fc._export_shared(cb)
    only_tensor = fc._export_shared(cb).weights            # the state is dropped, its tensor kept
    np.testing.assert_array_equal(kept.weights.cpu().numpy(), w)
    w2, b2 = rand(7, w.shape), rand(8, b.shape)
    fc.reload_weights_and_biases_with_command_buffer(cb, state_of(device, w2, b2))
    finish(cb)
    np.testing.assert_array_equal(kept.weights.cpu().numpy(), w)        # copied before the master changed
    np.testing.assert_array_equal(kept.biases.cpu().numpy(), b)
    np.testing.assert_array_equal(only_tensor.cpu().numpy(), w)
    np.testing.assert_array_equal(fc.export_weights_and_biases(queue.make_command_buffer()).weights.cpu().numpy(), w2)


def test_shared_export_views_the_master_until_written(device, cb) -> None:
    ds, w, b = fc_source()
    fc = m.MPSCNNFullyConnected(device, ds)
    st = fc._export_shared(cb)
    assert st.weights.data_ptr() == fc._w32.data_ptr()                 # no copy was made
    del st
    fc.reload_weights_and_biases_with_command_buffer(cb, state_of(device, rand(7, w.shape), rand(8, b.shape)))
    finish(cb)
    assert fc._exports == []                                             # nothing left to copy


def test_gradient_kernel_borrows_forward_master(device, queue, cb) -> None:
    ds, w, b = fc_source()
    fwd = m.MPSCNNFullyConnected(device, ds)
    grad = m.MPSCNNFullyConnectedGradient(device, ds)
    w2, b2 = rand(7, w.shape), rand(8, b.shape)
    fwd.reload_weights_and_biases_with_command_buffer(cb, state_of(device, w2, b2))
    assert grad._borrow_master(fwd)
    assert not fwd._borrow_master(grad)                                  # no borrowing from a borrower
    np.testing.assert_array_equal(grad.export_weights_and_biases(cb).weights.cpu().numpy(), w2)
    # the gradient kernel's own reload takes an own master and leaves the forward kernel's be
    w3, b3 = rand(9, w.shape), rand(10, b.shape)
    grad.reload_weights_and_biases_with_command_buffer(cb, state_of(device, w3, b3))
    finish(cb)
    assert not grad._borrowed and grad._w32.data_ptr() != fwd._w32.data_ptr()
    np.testing.assert_array_equal(fwd.export_weights_and_biases(queue.make_command_buffer()).weights.cpu().numpy(), w2)
    np.testing.assert_array_equal(grad.export_weights_and_biases(queue.make_command_buffer()).biases.cpu().numpy(), b3)


def test_borrow_refused_for_another_geometry(device) -> None:
    ds, _, _ = fc_source()
    other, _, _ = fc_source(ws=2, hs=3)
    assert not m.MPSCNNFullyConnectedGradient(device, ds)._borrow_master(m.MPSCNNFullyConnected(device, other))


def test_fully_connected_master_in_data_source_layout(device, cb) -> None:
    """The master is ``[Cout][W][H][Cin]``: export and reload are plain copies (the dW layout
    and its sum over an ``encode_batch`` are checked in test_convolution_fully_connected)."""
    ds, w, b = fc_source()
    fwd = m.MPSCNNFullyConnected(device, ds)
    assert tuple(fwd._w32.shape) == w.shape and fwd._w32.is_contiguous()
    np.testing.assert_array_equal(fwd._w32.cpu().numpy(), w)
    st = fwd.export_weights_and_biases(cb)
    assert st.weights.is_contiguous() and tuple(st.weights.shape) == w.shape
    x_img, x = image(rand(20, (2, 2, 3, 4)), device)                   # H=2, W=3: the two orders differ
    y = fwd.encode(cb, x_img)
    finish(cb)
    np.testing.assert_allclose(values(y)[:, 0, 0], np.einsum("owhc,nhwc->no", w, x) + b, rtol=1e-5, atol=1e-5)
