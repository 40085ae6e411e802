"""ResNet-50 v1.5 (``mpsnn.models.resnet``) against a float64 torch reference written here from
torchvision's definition (conv + batch norm in inference + ReLU, bottlenecks with the stride on
the 3x3, global average pool, fully connected): logits for odd and even input sizes, float32
and 16-bit graph formats, weights given as NumPy arrays or torch tensors, and clear errors for
a bad state dict or size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.models.resnet import BLOCKS, build_resnet50, final_size, random_resnet50_state, state_shapes
from mpsnn.testing.reference_resnet import resnet50_forward

STATE = random_resnet50_state(1, num_classes=10)


def reference(x: torch.Tensor, st: dict[str, np.ndarray]) -> torch.Tensor:
    """torchvision's resnet50 forward in float64 (NCHW input), eval mode."""
    t = {k: torch.from_numpy(v).double() for k, v in st.items()}

    def batch_norm(y: torch.Tensor, bn: str) -> torch.Tensor:
        return F.batch_norm(y, t[bn + ".running_mean"], t[bn + ".running_var"], t[bn + ".weight"], t[bn + ".bias"], False, 0.0, 1e-5)
    return resnet50_forward(x, t, batch_norm)


def run(dev: m.Device, graph: m.MPSNNGraph, x: torch.Tensor) -> torch.Tensor:
    out = graph.run([m.MPSImage.from_torch(x.to(dev.torch_device))])
    assert out is not None
    return out.tensor.reshape(x.shape[0], -1).double().cpu()


@pytest.mark.parametrize("size", [64, 70])
def test_float32_logits_match_the_reference(device: m.Device, size: int) -> None:
    x = torch.randn(2, size, size, 3, generator=torch.Generator().manual_seed(size))
    g = build_resnet50(device, STATE, size=size, num_classes=10, graph_format=m.MPSImageFeatureChannelFormat.float32)
    got, want = run(device, g, x), reference(x.permute(0, 3, 1, 2).double(), STATE)
    assert float((got - want).abs().max() / want.abs().max()) < 2e-5
    assert got.argmax(1).tolist() == want.argmax(1).tolist()


@pytest.mark.parametrize("fmt", [m.MPSImageFeatureChannelFormat.float16, m.MPSImageFeatureChannelFormat.bfloat16])
def test_16_bit_graphs_and_torch_weights(device: m.Device, fmt: m.MPSImageFeatureChannelFormat) -> None:
    """Logits relative to their largest magnitude (random weights give logits in the
    hundreds, where probabilities would amplify the storage rounding of 53 layers)."""
    x = torch.randn(3, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    torch_state = {k: torch.from_numpy(v) for k, v in STATE.items()}
    got = run(device, build_resnet50(device, torch_state, size=64, num_classes=10, graph_format=fmt), x)
    want = reference(x.permute(0, 3, 1, 2).double(), STATE)
    tol = 1e-2 if fmt == m.MPSImageFeatureChannelFormat.float16 else 5e-2
    assert float((got - want).abs().max() / want.abs().max()) < tol


def test_softmax_ends_in_probabilities(device: m.Device) -> None:
    x = torch.randn(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    state = dict(STATE, **{"fc.weight": STATE["fc.weight"] * 1e-2})       # logits of order 1
    got = run(device, build_resnet50(device, state, size=64, num_classes=10, graph_format=m.MPSImageFeatureChannelFormat.float32,
                                     softmax=True), x)
    want = torch.softmax(reference(x.permute(0, 3, 1, 2).double(), state), 1)
    assert float((got - want).abs().max()) < 1e-5


def test_default_weights_are_random_and_seeded() -> None:
    a, b = random_resnet50_state(0), random_resnet50_state(0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], random_resnet50_state(1)["conv1.weight"])
    shapes = state_shapes()
    assert shapes["layer3.0.downsample.0.weight"] == (1024, 512, 1, 1) and shapes["fc.weight"] == (1000, 2048)
    n = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
    assert n == 25_557_032, "torchvision's resnet50 parameter count"
    assert final_size(224) == 7 and final_size(70) == 3


def test_bad_state_and_size_are_named() -> None:
    dev = m.Device("cpu")
    bad = dict(STATE)
    del bad["layer2.1.bn2.running_var"]
    with pytest.raises(m.MPSValueError, match=r"build_resnet50.*layer2\.1\.bn2\.running_var"):
        build_resnet50(dev, bad, size=64, num_classes=10)
    bad = dict(STATE, **{"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(m.MPSValueError, match=r"layer1\.0\.conv2\.weight.*\(64, 64, 3, 3\)"):
        build_resnet50(dev, bad, size=64, num_classes=10)
    with pytest.raises(m.MPSValueError, match="size"):
        build_resnet50(dev, STATE, size=16, num_classes=10)


def test_plan_finds_every_residual_tail() -> None:
    """Graph fusion: each of the 16 bottlenecks ends conv3 -> add -> ReLU; the 4 first blocks of
    a stage add a downsample convolution, whose bias folds into conv3's."""
    g = build_resnet50(m.Device("cpu"), STATE, size=64, num_classes=10, graph_format=m.MPSImageFeatureChannelFormat.float32)
    fusions = g.plan.fusions
    assert len(fusions) == sum(BLOCKS)
    assert sum(f.fold is not None for f in fusions) == len(BLOCKS)
    assert all(f.conv.node.label.endswith("conv3") for f in fusions)
    assert all(f.fold.node.label.endswith("downsample.0") for f in fusions if f.fold is not None)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_residual_tails_match_the_reference(device: m.Device, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual tails fused (one epilogue per block, downsample biases folded) and run as
    three filters each give the reference logits."""
    import mpsnn.kernels.convolution as kc
    monkeypatch.setattr(kc, "FUSED_CUDNN_RELU", fused)
    done: list[bool] = []
    fuse = m.MPSNNGraph._fuse
    monkeypatch.setattr(m.MPSNNGraph, "_fuse", lambda self, *a: done.append(fuse(self, *a)) or done[-1])
    x = torch.randn(2, 64, 64, 3, generator=torch.Generator().manual_seed(9))
    g = build_resnet50(device, STATE, size=64, num_classes=10, graph_format=m.MPSImageFeatureChannelFormat.float32)
    got, want = run(device, g, x), reference(x.permute(0, 3, 1, 2).double(), STATE)
    assert done == ([True] * sum(BLOCKS) if fused else [])
    assert float((got - want).abs().max() / want.abs().max()) < 2e-5


def test_residual_tails_that_cannot_fuse_run_their_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a tail judged fusable is ruled out at the addition (``_fuse`` declines, as for
    operands of other shapes), the convolution, the folded bias, the addition and the ReLU
    all run unfused and the logits stay the reference's."""
    monkeypatch.setattr(m.MPSNNGraph, "_fuse", lambda self, *a: False)
    dev = m.Device("cpu")
    x = torch.randn(2, 64, 64, 3, generator=torch.Generator().manual_seed(10))
    g = build_resnet50(dev, STATE, size=64, num_classes=10, graph_format=m.MPSImageFeatureChannelFormat.float32)
    got, want = run(dev, g, x), reference(x.permute(0, 3, 1, 2).double(), STATE)
    assert float((got - want).abs().max() / want.abs().max()) < 2e-5
