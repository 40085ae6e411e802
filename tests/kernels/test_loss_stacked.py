"""The graph's form of the loss over a stacked batch (``MPSCNNLoss._encode_stacked``): one
pass over all images without a view per image, the same values as ``encode_batch`` over the
views, and the labels' derived tensors remembered only while the same lasting labels objects
come back (refilled in place between encodes, as a training loop does)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as tf

import mpsnn as m
from mpsnn import MPSCNNLossLabels, MPSCNNLossType, MPSCNNReductionType

CPU = m.Device("cpu")
F32 = m.MPSImageFeatureChannelFormat.float32
N, K = 6, 10


def _loss() -> m.MPSCNNLoss:
    d = m.MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
    d.weight = 0.5
    return m.MPSCNNLoss(CPU, loss_descriptor=d)


def _labels() -> tuple[m.MPSImage, list[MPSCNNLossLabels]]:
    onehot = m.MPSImage(CPU, m.MPSImageDescriptor(channel_format=F32, width=1, height=1, feature_channels=K, number_of_images=N))
    return onehot, [MPSCNNLossLabels(CPU, labels_image=v) for v in onehot.batch_representation()]


def _fill(onehot: m.MPSImage, ys: torch.Tensor) -> None:
    onehot.tensor.zero_()
    onehot.tensor.view(-1, K).scatter_(1, ys.view(-1, 1), 1.0)


def _run(kernel: m.MPSCNNLoss, logits: torch.Tensor, labels: list[MPSCNNLossLabels]) -> tuple[np.ndarray, np.ndarray]:
    cb = CPU.make_command_queue().make_command_buffer()
    src = m.MPSImage.from_torch(logits.view(N, 1, 1, K).clone())
    dest = m.MPSImage(CPU, m.MPSImageDescriptor(channel_format=F32, width=1, height=1, feature_channels=K, number_of_images=N))
    assert kernel._encode_stacked(cb, src, labels, dest)
    cb.commit()
    cb.wait_until_completed()
    losses = np.array([float(lab.loss_image().tensor.sum()) for lab in labels])
    return losses, dest.tensor.view(N, K).numpy().copy()


def _reference(logits: torch.Tensor, ys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    z = logits.double().requires_grad_()
    per = 0.5 * tf.cross_entropy(z, ys, reduction="none")
    per.sum().backward()
    return per.detach().numpy(), z.grad.numpy()


def test_refilled_labels_give_each_step_its_own_values() -> None:
    kernel = _loss()
    onehot, labels = _labels()
    g = torch.Generator().manual_seed(3)
    for step in range(3):                       # steps 2 and 3 reuse the memoised tensors
        logits = torch.randn(N, K, generator=g)
        ys = torch.randint(0, K, (N,), generator=g)
        _fill(onehot, ys)
        got_loss, got_grad = _run(kernel, logits, labels)
        want_loss, want_grad = _reference(logits, ys)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-6, err_msg=f"step {step}")
        assert kernel._labels_memo is not None and kernel._labels_memo[0] is not labels
        assert all(a is b for a, b in zip(kernel._labels_memo[0], labels))


def test_other_labels_objects_are_read_afresh() -> None:
    kernel = _loss()
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(N, K, generator=g)
    for seed in (5, 6):
        onehot, labels = _labels()              # new objects each time (new images, too)
        ys = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(seed))
        _fill(onehot, ys)
        got_loss, _ = _run(kernel, logits, labels)
        np.testing.assert_allclose(got_loss, _reference(logits, ys)[0], rtol=1e-5)
        assert all(a is b for a, b in zip(kernel._labels_memo[0], labels))


def test_matches_encode_batch_over_views() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, K, generator=g)
    ys = torch.randint(0, K, (N,), generator=g)
    onehot, labels = _labels()
    _fill(onehot, ys)
    stacked_loss, stacked_grad = _run(_loss(), logits, labels)
    cb = CPU.make_command_queue().make_command_buffer()
    src = m.MPSImage.from_torch(logits.view(N, 1, 1, K).clone())
    outs = _loss().encode_batch(cb, src.batch_representation(), labels)
    cb.commit()
    cb.wait_until_completed()
    views_loss = np.array([float(lab.loss_image().tensor.sum()) for lab in labels])
    views_grad = np.concatenate([o.tensor.view(1, K).numpy() for o in outs])
    np.testing.assert_array_equal(stacked_loss, views_loss)
    np.testing.assert_array_equal(stacked_grad, views_grad)
