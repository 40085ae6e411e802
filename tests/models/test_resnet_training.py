"""ResNet-50 v1.5 training (``mpsnn.models.resnet_training``) against torch.autograd in float64:
one SGD step from the same weights on the same batch gives the same loss, the same updated
weights (so the same gradients: the first momentum step moves by ``lr·g``), the same gamma/beta
and the same running statistics; a second step uses the momentum; errors for bad arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.kernels.loss_labels import MPSCNNLossLabels
from mpsnn.models.resnet import BLOCKS, random_resnet50_state
from mpsnn.models.resnet_training import build_resnet50_training
from mpsnn.testing.reference_resnet import resnet50_forward

CLASSES, SIZE, BATCH, LR, MU = 10, 64, 4, 1e-3, 0.9
STATE = random_resnet50_state(2, num_classes=CLASSES)


def forward(x: torch.Tensor, t: dict[str, torch.Tensor], stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """torchvision's resnet50 in training mode (NCHW float64); ``stats`` gets each batch norm's
    batch mean and unbiased variance (what torch's running statistics take)."""

    def batch_norm(y: torch.Tensor, bn: str) -> torch.Tensor:
        stats[bn] = (y.mean((0, 2, 3)).detach(), y.var((0, 2, 3), unbiased=True).detach())
        return F.batch_norm(y, None, None, t[bn + ".weight"], t[bn + ".bias"], True, 0.0, 1e-5)
    return resnet50_forward(x, t, batch_norm)


def mpsnn_step(dev: m.Device, tr, x: torch.Tensor, y: torch.Tensor) -> float:
    img = m.MPSImage.from_torch(x.to(dev.torch_device))
    onehot = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.float32, width=1, height=1,
                                                  feature_channels=CLASSES, number_of_images=x.shape[0]))
    onehot.tensor.zero_()
    onehot.tensor.view(-1, CLASSES).scatter_(1, y.view(-1, 1).to(dev.torch_device), 1.0)
    labels = [MPSCNNLossLabels(dev, labels_image=v) for v in onehot.batch_representation()]
    cb = dev.make_command_queue().make_command_buffer()
    assert tr.graph.encode_batch(cb, [img.batch_representation()], [labels]) is None
    cb.commit()
    cb.wait_until_completed()
    return sum(float(lab.loss_image().tensor.sum()) for lab in labels)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def test_two_sgd_steps_match_autograd(device: m.Device) -> None:
    """Against float64 autograd, mpsnn's float32 step is as accurate as torch's own float32
    step (this small network's batch norms see few values per channel in the last stage, so
    float32 rounding grows along the backward pass: torch float32 itself is off by up to
    ~1e-1 there): each value is within 3x torch float32's error (on the CPU) of float64, plus
    1e-5 (loss, running statistics) or 2e-4 (weights, gamma, beta: cuDNN and the batch-norm
    engine accumulate in other orders than the CPU), over two steps."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(BATCH, SIZE, SIZE, 3, generator=gen) for _ in range(2)]
    ys = [torch.randint(0, CLASSES, (BATCH,), generator=gen) for _ in range(2)]
    tr = build_resnet50_training(device, BATCH, STATE, size=SIZE, num_classes=CLASSES, graph_format=m.MPSImageFeatureChannelFormat.float32,
                                 learning_rate=LR, momentum=MU)
    peers = {}
    for dt in (torch.float64, torch.float32):
        t = {k: torch.from_numpy(v).to(dt).requires_grad_(not k.endswith(("running_mean", "running_var"))) for k, v in STATE.items()}
        peers[dt] = (t, torch.optim.SGD([v for v in t.values() if v.requires_grad], lr=LR, momentum=MU))
    running = {dt: {k: torch.from_numpy(v).double() for k, v in STATE.items() if k.endswith(("running_mean", "running_var"))}
               for dt in peers}
    for step in range(2):
        got = mpsnn_step(device, tr, xs[step], ys[step])
        losses: dict[torch.dtype, float] = {}
        for dt, (t, opt) in peers.items():
            stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            opt.zero_grad()
            loss = F.cross_entropy(forward(xs[step].permute(0, 3, 1, 2).to(dt), t, stats), ys[step])
            loss.backward()
            opt.step()
            losses[dt] = float(loss.detach())
            for bn, (mean, var) in stats.items():
                running[dt][bn + ".running_mean"].lerp_(mean.double(), 0.1)
                running[dt][bn + ".running_var"].lerp_(var.double(), 0.1)
        want_loss, loss32 = losses[torch.float64], losses[torch.float32]
        assert abs(got - want_loss) <= 3 * abs(loss32 - want_loss) + 1e-5 * max(1.0, abs(want_loss)), (step, got, want_loss, loss32)
        t64, t32 = peers[torch.float64][0], peers[torch.float32][0]
        for name, ds in tr.convolutions.items():
            mine = ds.weights_tensor.cpu()

            def layout(w: torch.Tensor) -> torch.Tensor:
                w = w.detach()
                return w.permute(0, 2, 3, 1) if w.dim() == 4 else w.reshape(mine.shape)  # noqa: B023
            ours, theirs = rel(mine, layout(t64[name + ".weight"])), rel(layout(t32[name + ".weight"]), layout(t64[name + ".weight"]))
            assert ours <= 3 * theirs + 2e-4, (step, name, ours, theirs)
        for name, ds in tr.batch_norms.items():
            for mine, key in ((ds.gamma_tensor, ".weight"), (ds.beta_tensor, ".bias")):
                ours, theirs = rel(mine, t64[name + key].detach()), rel(t32[name + key].detach(), t64[name + key].detach())
                assert ours <= 3 * theirs + 2e-4, (step, name + key, ours, theirs)
            for mine, key in ((ds.mean_tensor, ".running_mean"), (ds.variance_tensor, ".running_var")):
                want = running[torch.float64][name + key]
                ours, theirs = rel(mine, want), rel(running[torch.float32][name + key], want)
                assert ours <= 3 * theirs + 1e-5, (step, name + key, ours, theirs)
    moved = rel(tr.convolutions["conv1"].weights_tensor, torch.from_numpy(STATE["conv1.weight"]).permute(0, 2, 3, 1))
    assert moved > 1e-3                                         # the steps changed the weights


def test_bad_arguments_raise() -> None:
    dev = m.Device("cpu")
    with pytest.raises(m.MPSValueError, match="batch_size"):
        build_resnet50_training(dev, 0, STATE, size=SIZE, num_classes=CLASSES)
    with pytest.raises(m.MPSValueError, match="size"):
        build_resnet50_training(dev, 2, STATE, size=16, num_classes=CLASSES)
    bad = dict(STATE)
    bad["layer1.0.conv2.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(m.MPSValueError, match="layer1.0.conv2.weight"):
        build_resnet50_training(dev, 2, bad, size=SIZE, num_classes=CLASSES)


def test_graph_fuses_each_batch_norm_relu_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph fusion: the 33 batch norms followed by a ReLU (stem, and the first two of each
    bottleneck) run with the ReLU fused into the batch-norm kernels, forward and gradient; each
    residual addition applies its ReLU and folds the ReLU's derivative into its mask, and its
    two gradients are one image. The two-step test above checks the numbers of that fused
    graph against autograd."""
    tr = build_resnet50_training(m.Device("cpu"), 2, STATE, size=SIZE, num_classes=CLASSES,
                                 graph_format=m.MPSImageFeatureChannelFormat.float32)
    pairs = tr.graph.plan.norm_relu
    assert len(pairs) == 1 + 2 * sum(BLOCKS)
    assert {p.norm.node.label for p in pairs} == {"bn1"} | {f"layer{s}.{b}.bn{k}" for s, n in enumerate(BLOCKS, 1) for b in range(n) for k in (1, 2)}
    assert len(tr.graph.plan.shared_gradients) == sum(BLOCKS)      # one addition per bottleneck
    assert {id(f.gradients) for f in tr.graph.plan.add_relu} == {id(g) for g in tr.graph.plan.shared_gradients}   # each followed by a ReLU
    decided: list[object] = []
    shared: list[object] = []
    orig, orig_share = m.MPSNNGraph._norm_relu_neuron, m.MPSNNGraph._shareable
    monkeypatch.setattr(m.MPSNNGraph, "_norm_relu_neuron", lambda self, f: decided.append(orig(self, f)) or decided[-1])
    monkeypatch.setattr(m.MPSNNGraph, "_shareable", lambda self, *a: shared.append(orig_share(self, *a)) or shared[-1])
    gen = torch.Generator().manual_seed(1)
    mpsnn_step(m.Device("cpu"), tr, torch.randn(2, SIZE, SIZE, 3, generator=gen), torch.tensor([1, 2]))
    assert len(decided) == len(pairs) and all(d for d in decided)
    assert shared == [True] * sum(BLOCKS)
