"""Triton forward-with-mask engine of the arithmetic kernels (``mpsnn.backends.triton.arithmetic``)
on CUDA against a float64 reference written here from spec/arithmetic.md: every operation,
scales, bias, clamp bounds (the mask is ``min < r < max``; NaN results keep NaN and a False
mask), float32/float16/bfloat16 storage, sizes with a partial last block; and the training
encode of ``MPSCNNAdd`` through it, whose gradient matches torch.autograd."""
from __future__ import annotations

import pytest
import torch

import mpsnn as m
from mpsnn.backends.arithmetic import FLT_MAX, ArithmeticParams, arithmetic_forward
from mpsnn.testing.engines import triton_module

ta = triton_module("arithmetic")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ta is None, reason="no CUDA device with Triton"),
]

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]


def reference(x: torch.Tensor, y: torch.Tensor, op: str, ps: float, ss: float, bias: float, lo: float, hi: float):  # type: ignore[no-untyped-def]
    """(clamped result, mask) in float64 from the stored values."""
    a, b = x.double() * ps, y.double() * ss
    r = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}[op] + bias
    mask = (r > lo) & (r < hi)
    return torch.where(r < lo, torch.full_like(r, lo), torch.where(r > hi, torch.full_like(r, hi), r)), mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add", "subtract", "multiply", "divide"])
@pytest.mark.parametrize("params", [(1.0, 1.0, 0.0, -FLT_MAX, FLT_MAX), (0.5, -2.0, 0.25, -1.5, 2.0)], ids=["defaults", "scaled-clamped"])
def test_forward_with_mask_matches_reference(dtype: torch.dtype, op: str, params: tuple[float, ...]) -> None:
    assert ta is not None
    g = torch.Generator(device="cuda").manual_seed(7)
    n = 3 * ta.BLOCK + 123                                     # full blocks and a partial one
    x = (torch.randn(n, device="cuda", generator=g) * 2).to(dtype)
    y = (torch.randn(n, device="cuda", generator=g) * 2).to(dtype)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0], dtype=dtype)
    y[:6] = torch.tensor([1.0, 1.0, -float("inf"), -0.0, 0.0, float("nan")], dtype=dtype)
    out = torch.empty_like(x)
    mask = ta.forward_with_mask(x, y, out, op, *params)
    # 1. exactly the torch engine (float32 arithmetic, one rounding to storage)
    p = ArithmeticParams(op, *params)
    want32, want_mask32 = arithmetic_forward(x, y, p, with_mask=True)
    assert mask.dtype == torch.bool and torch.equal(mask, want_mask32)
    assert torch.equal(out.isnan(), want32.isnan()) and torch.equal(out[~out.isnan()], want32.to(dtype)[~out.isnan()])
    # 2. the float64 reference: the mask away from float32 rounding at the bounds, the values
    #    within storage rounding
    want, want_mask = reference(x, y, op, *params)
    far = ((want - params[3]).abs() > 1e-5) & ((want - params[4]).abs() > 1e-5)
    assert torch.equal(mask[far], want_mask[far])
    fin = want.isfinite() & out.isfinite()
    # float32 arithmetic (cancellation in add/subtract: relative to the operands) plus one
    # rounding to storage (relative to the result; subnormals absolute)
    ps, ss, bias = params[:3]
    size = (x.double() * ps).abs() + (y.double() * ss).abs() + abs(bias)
    eps, tiny = {torch.float32: (1.2e-7, 1e-44), torch.float16: (9.8e-4, 6e-8), torch.bfloat16: (7.9e-3, 1e-38)}[dtype]
    bound = 2.4e-7 * size + eps * want.abs() + tiny
    assert bool(((out.double() - want).abs() <= bound)[fin].all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_add_and_its_gradient(dtype: torch.dtype) -> None:
    """MPSCNNAdd with a result state (the engine's path) and both add gradients against
    torch.autograd with a random upstream gradient."""
    dev = m.Device("cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    a, b = (torch.randn(2, 5, 7, 12, device="cuda", generator=g).to(dtype) for _ in range(2))
    e = torch.randn(2, 5, 7, 12, device="cuda", generator=g).to(dtype)
    ia, ib, ie = (m.MPSImage.from_torch(t) for t in (a, b, e))
    add = m.MPSCNNAdd(dev)
    add.minimum_value, add.maximum_value = -1.0, 1.5
    cb = dev.make_command_queue().make_command_buffer()
    out, state = add.encode(cb, ia, ib, destination_state_is_temporary=False)
    grads = [m.MPSCNNAddGradient(dev, is_secondary_source_filter=sec).encode(cb, ie, src, state) for sec, src in ((False, ia), (True, ib))]
    cb.commit()
    cb.wait_until_completed()
    av, bv = a.double().requires_grad_(), b.double().requires_grad_()
    s = av + bv
    y = s.clamp(-1.0, 1.5)
    y.backward(e.double())
    assert torch.allclose(out.tensor.double(), y.detach(), rtol=8e-3 if dtype == torch.bfloat16 else 1e-6, atol=0)
    away = ((s - -1.0).abs() > 1e-3) & ((s - 1.5).abs() > 1e-3)     # autograd's clamp passes the bounds themselves
    assert bool(away.any()) and bool(((s < -1.0) | (s > 1.5)).any())
    for got, want in zip(grads, (av.grad, bv.grad)):
        assert torch.equal(got.tensor.double()[away], want[away].to(dtype).double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_fused_relu(dtype: torch.dtype) -> None:
    """``relu=True`` (a graph's fused addition -> ReLU): the ReLU of the value rounded to
    storage (``v >= 0 ? v : 0·v``, so -0 below 0 and NaN for NaN) and its derivative in the
    mask, against the torch engine followed by a separate ReLU."""
    assert ta is not None
    g = torch.Generator(device="cuda").manual_seed(8)
    n = 2 * ta.BLOCK + 77
    x, y = ((torch.randn(n, device="cuda", generator=g) * 2).to(dtype) for _ in range(2))
    x[:4] = torch.tensor([float("nan"), -float("inf"), 1.0, -1.0], dtype=dtype)
    y[:4] = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=dtype)
    out = torch.empty_like(x)
    mask = ta.forward_with_mask(x, y, out, "add", 1.0, 1.0, 0.0, -1.5, 3.0, relu=True)
    r, clamp_mask = arithmetic_forward(x, y, ArithmeticParams("add", 1.0, 1.0, 0.0, -1.5, 3.0), with_mask=True)
    s = r.to(dtype).float()
    want = torch.where(s >= 0, s, s * 0.0).to(dtype)
    assert torch.equal(mask, clamp_mask & (s >= 0))
    assert torch.equal(out.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(out[ok], want[ok]) and torch.equal(out[ok].signbit(), want[ok].signbit())
    assert bool((s < 0).any()) and not bool(mask[s < 0].any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_copy(dtype: torch.dtype) -> None:
    """The unit-scale gradient ``mask ? g : 0`` copies values bit for bit (NaN and -0 too)."""
    assert ta is not None
    gen = torch.Generator(device="cuda").manual_seed(9)
    n = ta.BLOCK + 301
    g = torch.randn(n, device="cuda", generator=gen).to(dtype)
    g[:3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=dtype)
    mask = torch.rand(n, device="cuda", generator=gen) > 0.3
    mask[:3] = True
    out = torch.full_like(g, 7.0)
    ta.masked_copy(g, mask, out)
    want = torch.where(mask, g, torch.zeros((), dtype=dtype, device="cuda"))
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
