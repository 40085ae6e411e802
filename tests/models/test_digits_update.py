"""``DigitsDataSource.update`` inside the training graph: one Adam step (optimizers.md §8)
from the weights the graph hands over (copy-on-write views of the forward kernel's weights),
the same new values in the data source's buffers, the returned state and both kernels of every
layer (the gradient kernel reading the forward kernel's weights); a temporary source state
works alike (the result in the data source's own state)."""
from __future__ import annotations

import math

import torch

import mpsnn as m
from mpsnn.kernels.convolution_data import MPSCNNConvolutionWeightsAndBiasesState
from mpsnn.kernels.loss_labels import MPSCNNLossLabels
from mpsnn.models.digits import DigitsDataSource, build_digits_graphs, make_data_sources

F = m.MPSImageFeatureChannelFormat


def adam_first_step(w: torch.Tensor, g: torch.Tensor, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    w, g = w.double(), g.double()
    mom, vel = (1 - b1) * g, (1 - b2) * g * g
    return w - lr * math.sqrt(1 - b2) / (1 - b1) * mom / (vel.sqrt() + eps)


def test_graph_step_updates_data_sources_and_kernels(device) -> None:
    batch = 3
    ds = make_data_sources(device, init="he", seed=3)
    graphs = build_digits_graphs(device, ds, batch, graph_format=F.float32, keep_probability=None, input_gradient_needed=False)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    returned: dict[str, MPSCNNConvolutionWeightsAndBiasesState] = {}
    for d in ds:
        def spy(cb, gradient_state, source_state, d=d):  # type: ignore[no-untyped-def]
            seen[d.label()] = (source_state.weights.clone(), source_state.biases.clone(),
                               gradient_state.gradient_for_weights.clone(), gradient_state.gradient_for_biases.clone())
            returned[d.label()] = st = DigitsDataSource.update(d, cb, gradient_state, source_state)
            return st
        d.update = spy  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(4)
    img = m.MPSImage(device, m.MPSImageDescriptor(channel_format=F.float32, width=28, height=28, feature_channels=1, number_of_images=batch))
    img.tensor.copy_(torch.rand(batch, 28, 28, 1, generator=gen).to(device.torch_device))
    onehot = m.MPSImage(device, m.MPSImageDescriptor(channel_format=F.float32, width=1, height=1, feature_channels=12, number_of_images=batch))
    onehot.tensor.zero_()
    onehot.tensor.view(-1, 12)[torch.arange(batch), torch.tensor([1, 4, 7])] = 1.0
    labels = [MPSCNNLossLabels(device, labels_image=v) for v in onehot.batch_representation()]
    queue = device.make_command_queue()
    cb = queue.make_command_buffer()
    graphs.training.encode_batch(cb, [img.batch_representation()], [labels])
    cb.commit()
    cb.wait_until_completed()
    kernels = graphs.training._kernels
    for d in ds:
        w0, b0, gw, gb = seen[d.label()]
        want_w, want_b = adam_first_step(w0, gw), adam_first_step(b0, gb)
        torch.testing.assert_close(d.weights_tensor.double(), want_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d.biases_tensor.double(), want_b, rtol=1e-5, atol=1e-6)
        assert torch.equal(returned[d.label()].weights.reshape(d.weights_tensor.shape), d.weights_tensor)
        owners = [k for k in kernels.values() if getattr(k, "_data_source", None) is d]
        assert len(owners) == 2                                     # the forward and the gradient kernel
        for k in owners:
            got = k.export_weights_and_biases(queue.make_command_buffer())
            assert torch.equal(got.weights.reshape(d.weights_tensor.shape), d.weights_tensor), (d.label(), type(k).__name__)
            assert torch.equal(got.biases, d.biases_tensor)


def test_temporary_source_state_updates_the_data_source(device) -> None:
    d = DigitsDataSource(device, "conv", 3, 2, 4)
    conv = m.MPSCNNConvolution(device, d)
    queue = device.make_command_queue()
    cb = queue.make_command_buffer()
    x = m.MPSImage(device, m.MPSImageDescriptor(channel_format=F.float32, width=5, height=5, feature_channels=2, number_of_images=1))
    x.tensor.copy_(torch.rand(1, 5, 5, 2, generator=torch.Generator().manual_seed(1)).to(device.torch_device))
    _, gs = conv.encode(cb, x, destination_state_is_temporary=False)
    gs.gradient_for_weights.copy_(torch.rand(gs.gradient_for_weights.shape, generator=torch.Generator().manual_seed(2)).to(device.torch_device))
    gs.gradient_for_biases.fill_(0.5)
    src = MPSCNNConvolutionWeightsAndBiasesState.temporary_cnn_convolution_weights_and_biases_state(cb, d.descriptor())
    src.weights.copy_(d.weights_tensor)
    src.biases.copy_(d.biases_tensor)
    w0 = d.weights_tensor.clone()
    out = d.update(cb, gs, src)
    cb.commit()
    cb.wait_until_completed()
    assert out is d.state
    torch.testing.assert_close(d.weights_tensor.double(), adam_first_step(w0, gs.gradient_for_weights), rtol=1e-5, atol=1e-6)
