"""Triton batch-normalization engine (``mpsnn.backends.triton.batch_norm``) on CUDA against
float64 references written here (spec/normalization.md §3.7: biased variance, the
training-mode gradient) and ``torch.autograd`` of a float64 batch norm with a random upstream
gradient: the affine map with and without a fused neuron, statistics of data with a large
mean (no cancellation), the two gradient halves, channel windows, odd sizes, determinism."""
from __future__ import annotations

import pytest
import torch

from mpsnn.backends.torch_eager import NeuronParams
from mpsnn.core.enums import MPSCNNNeuronType as T
from mpsnn.testing.engines import triton_module

tb = triton_module("batch_norm")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(tb is None, reason="no CUDA device with Triton"),
]

DEV = "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 8, 8, 64), (2, 5, 4, 130)]


def data(shape: tuple[int, ...], dtype: torch.dtype, seed: int, mean: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + mean).to(device=DEV, dtype=dtype)


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    t = TOL[dtype] * scale
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), rtol=t, atol=t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_apply_with_and_without_a_neuron(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    assert tb is not None
    c = shape[-1]
    x = data(shape, dtype, 1)
    scale, shift = data((c,), torch.float32, 2), data((c,), torch.float32, 3)
    out = torch.full_like(x, float("nan"))
    tb.apply(x, out, scale, shift)
    z = x.double() * scale.double() + shift.double()
    close(out, z, dtype)
    tb.apply(x, out, scale, shift, NeuronParams(T.reLU, 0.1, 0.0, 0.0))
    close(out, torch.where(z >= 0, z, 0.1 * z), dtype)
    slopes = data((c,), torch.float32, 4)
    tb.apply(x, out, scale, shift, NeuronParams(T.pReLU, 0.0, 0.0, 0.0, slopes=slopes))
    close(out, torch.where(z >= 0, z, slopes.double() * z), dtype)
    tb.apply(x, out, scale, shift, NeuronParams(T.sigmoid, 0.0, 0.0, 0.0))
    close(out, torch.sigmoid(z), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("mean", [0.0, 1000.0])
def test_statistics(shape: tuple[int, ...], mean: float) -> None:
    assert tb is not None
    x = data(shape, torch.float32, 5, mean)
    mu, var = tb.statistics(x)
    xd = x.double().reshape(-1, shape[-1])
    torch.testing.assert_close(mu.double().cpu(), xd.mean(0).cpu(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double().cpu(), xd.var(0, unbiased=False).cpu(), rtol=1e-4, atol=1e-5)
    again = tb.statistics(x)
    assert torch.equal(again[0], mu) and torch.equal(again[1], var), "the same input gives the same bits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=["x".join(map(str, s)) for s in SHAPES[:1] + SHAPES[2:]])
def test_training_gradient_against_autograd(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    assert tb is not None
    c = shape[-1]
    x, dy = data(shape, dtype, 6, 3.0), data(shape, dtype, 7)
    gamma, eps = data((c,), torch.float32, 8), 1e-3
    mean, var = tb.statistics(x)
    s1, s2 = tb.gradient_sums(dy, x, mean)
    m = x.numel() // c
    rstd = torch.rsqrt(var + eps)
    dx = torch.full_like(x, float("nan"))
    tb.gradient_data(dy, x, dx, mean, gamma * rstd, s1 / m, rstd * rstd * s2 / m)
    xd = x.double().requires_grad_()
    gd = gamma.double().requires_grad_()
    bd = torch.zeros(c, dtype=torch.float64, device=DEV, requires_grad=True)
    mu = xd.mean((0, 1, 2))
    v = xd.var((0, 1, 2), unbiased=False)
    y = (xd - mu) * torch.rsqrt(v + eps) * gd + bd
    y.backward(dy.double())
    assert xd.grad is not None and gd.grad is not None and bd.grad is not None
    close(dx, xd.grad, dtype, 4.0)
    close(s1, bd.grad, torch.float32, 10.0)
    close(rstd * s2, gd.grad, torch.float32, 10.0)
    dgamma, dbeta = tb.gradient_totals(dy, x, mean, var, eps)      # the finished form, one more launch
    close(dbeta, bd.grad, torch.float32, 10.0)
    close(dgamma, gd.grad, torch.float32, 10.0)


def test_channel_windows() -> None:
    assert tb is not None
    big = data((2, 4, 4, 50), torch.float32, 9)
    x = big[:, :, :, 10:40]
    mu, var = tb.statistics(x)
    xd = x.double().reshape(-1, 30)
    torch.testing.assert_close(mu.double().cpu(), xd.mean(0).cpu(), rtol=1e-6, atol=1e-6)
    dest = torch.full((2, 4, 4, 60), 5.0, device=DEV)
    out = dest[:, :, :, 20:50]
    tb.apply(x, out, torch.ones(30, device=DEV), torch.zeros(30, device=DEV))
    assert torch.equal(out, x)
    assert (dest[:, :, :, :20] == 5).all() and (dest[:, :, :, 50:] == 5).all()


def test_statistics_of_many_bands_and_channel_blocks_repeat_and_replay() -> None:
    """Hundreds of bands over five channel blocks: the last band of each block finishes it
    and leaves the block's arrival counter at 0, so a second launch and a CUDA-graph replay
    give the same bits."""
    assert tb is not None
    x = data((8, 40, 40, 300), torch.bfloat16, 11, 5.0)
    mu, var = tb.statistics(x)
    xd = x.double().reshape(-1, 300)
    torch.testing.assert_close(mu.double().cpu(), xd.mean(0).cpu(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double().cpu(), xd.var(0, unbiased=False).cpu(), rtol=1e-4, atol=1e-5)
    again = tb.statistics(x)
    assert torch.equal(again[0], mu) and torch.equal(again[1], var)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tb.statistics(x)                       # the side stream's counters exist before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tb.statistics(x)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], mu) and torch.equal(captured[1], var)
