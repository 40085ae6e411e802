"""Triton softmax engine (``mpsnn.backends.triton.softmax``) on CUDA against float64
references written here from spec/softmax.md: forward (softmax, log-softmax) and gradients
(from the forward result), channel counts around the power-of-two block sizes, channel windows
of wider images, large inputs (the max subtraction), -inf entries."""
from __future__ import annotations

import pytest
import torch

from mpsnn.testing.engines import triton_module

ts = triton_module("softmax")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ts is None, reason="no CUDA device with Triton"),
]

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def ref(x: torch.Tensor, log: bool) -> torch.Tensor:
    x = x.double()
    m = x.max(-1, keepdim=True).values
    e = (x - m).exp()
    s = e.sum(-1, keepdim=True)
    return x - m - s.log() if log else e / s


def ref_grad(g: torch.Tensor, y: torch.Tensor, log: bool) -> torch.Tensor:
    g, y = g.double(), y.double()
    if log:
        return g - y.exp() * g.sum(-1, keepdim=True)
    return y * (g - (g * y).sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("c", [1, 3, 10, 64, 65, 1000, 4100])
def test_forward_and_gradient(c: int, log: bool, dtype: torch.dtype) -> None:
    assert ts is not None
    g = torch.Generator(device="cuda").manual_seed(c)
    x = (torch.randn(3, 5, 7, c, device="cuda", generator=g) * 4).to(dtype)
    y = torch.full_like(x, float("nan"))
    ts.softmax_forward(x, y, log)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref(x, log), rtol=tol, atol=tol)
    dy = torch.randn(3, 5, 7, c, device="cuda", generator=g).to(dtype)
    dx = torch.full_like(x, float("nan"))
    ts.softmax_gradient(dy, y, dx, log)
    torch.testing.assert_close(dx.double(), ref_grad(dy, y, log), rtol=2 * tol, atol=2 * tol)
    # against autograd of the float64 reference (the formula's derivation)
    xd = x.double().requires_grad_()
    ref(xd, log).backward(dy.double())
    assert xd.grad is not None
    torch.testing.assert_close(dx.double(), xd.grad, rtol=20 * tol, atol=20 * tol)


def test_channel_windows_large_values_and_minus_inf() -> None:
    assert ts is not None
    big = torch.randn(2, 4, 4, 50, device="cuda") * 1000
    big[0, 0, 0, 12] = float("-inf")
    x = big[:, :, :, 10:40]
    assert ts.rows_view(x) == (32, 30, 50)
    dest = torch.full((2, 4, 4, 60), 5.0, device="cuda")
    y = dest[:, :, :, 20:50]
    ts.softmax_forward(x, y, False)
    torch.testing.assert_close(y.double(), ref(x, False), rtol=1e-5, atol=1e-6)
    assert y[0, 0, 0, 2] == 0
    assert (dest[:, :, :, :20] == 5).all() and (dest[:, :, :, 50:] == 5).all()
    ts.softmax_forward(x, y, True)
    assert y[0, 0, 0, 2] == float("-inf") and torch.isfinite(y[0, 0, 0, 3])


def test_rows_view_refuses_spatial_windows() -> None:
    assert ts is not None
    t = torch.empty(2, 6, 6, 8, device="cuda")
    assert ts.rows_view(t[:, 1:3]) is None and ts.rows_view(t[:, :, 1:3]) is None
    assert ts.rows_view(t[:1]) == (36, 8, 8)
