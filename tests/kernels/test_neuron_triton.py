"""Triton neuron kernels (``mpsnn.backends.triton.neuron``) against torch_eager, on CUDA.

Every neuron type, forward and gradient, float32 / float16 / bfloat16 storage (and mixed
source / destination dtypes), inputs that hit the kinks exactly, exact zeros of both signs,
NaN and infinities, PReLU with C in {1, 3, 5, 16, 24, 168} (flat slope gather and whole-pixel
tiles), element counts that are not multiples of the block (full blocks + a masked tail),
the small-tensor configuration, the int64-offset path, no host synchronisation, the public
API's dispatch to these kernels, and a dense float32 sweep of GeLU (its erf). The reference
is ``mpsnn.backends.torch_eager`` on the same device, the engine the dispatcher falls back
to, so both engines must agree to storage rounding.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mpsnn
from mpsnn.backends import dispatch
from mpsnn.backends import torch_eager as te
from mpsnn.backends.torch_eager import NeuronParams
from mpsnn.core.enums import MPSCNNNeuronType as T
from mpsnn.testing.engines import triton_module

tn = triton_module("neuron")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and tn is None, reason="Triton is not usable on this CUDA install"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: (rtol, atol) of a destination dtype: float32 allows a few ulp (libdevice vs torch special
#: cases such as pow(x, 2) = x*x); half formats allow one unit of their rounding.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}

#: (type, a, b, c) cases; parameters exercise both signs, base e and base c, and kinks that
#: fall on representable inputs (HardSigmoid 0.25x+0.5 has its edges at x = -2 and 2).
CASES = [
    (T.none, 0.0, 0.0, 0.0),
    (T.reLU, 0.0, 0.0, 0.0),
    (T.reLU, 0.1, 0.0, 0.0),
    (T.linear, 1.5, -0.25, 0.0),
    (T.sigmoid, 0.0, 0.0, 0.0),
    (T.hardSigmoid, 0.25, 0.5, 0.0),
    (T.hardSigmoid, 0.2, 0.5, 0.0),
    (T.tanH, 1.0, 1.0, 0.0),
    (T.tanH, 1.7159, 0.6667, 0.0),
    (T.absolute, 0.0, 0.0, 0.0),
    (T.softPlus, 1.0, 1.0, 0.0),
    (T.softPlus, 0.5, 8.0, 0.0),
    (T.softSign, 0.0, 0.0, 0.0),
    (T.ELU, 1.0, 0.0, 0.0),
    (T.ELU, 0.3, 0.0, 0.0),
    (T.reLUN, 0.0, 6.0, 0.0),
    (T.reLUN, 0.1, 1.0, 0.0),
    (T.power, 0.5, 3.0, 1.5),
    (T.power, 1.0, 0.0, 3.0),
    (T.power, 1.0, 0.5, -1.0),
    (T.exponential, 0.5, 0.1, -1.0),
    (T.exponential, 1.0, 0.0, 2.0),
    (T.exponential, 0.5, 0.0, 0.5),
    (T.exponential, 1.0, 0.0, -2.0),
    (T.logarithm, 1.0, 5.0, -1.0),
    (T.logarithm, 1.0, 5.0, 10.0),
    (T.logarithm, 0.5, 3.0, 0.5),
    (T.logarithm, 1.0, 5.0, -2.0),
    (T.geLU, 0.0, 0.0, 0.0),
]

#: Inputs placed at the start of every test tensor: zeros of both signs, the kinks of the
#: cases above, SoftPlus's threshold (b*x = 20), saturating magnitudes, NaN and infinities.
SPECIALS = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 6.0, -6.0, 2.5, 20.0, -0.5, 30.0, -30.0, 100.0, -100.0,
            1e-3, -1e-3, 2.0 ** -10, float("nan"), float("inf"), float("-inf")]
#: torch.pow(t, 0.5) is sqrt (NaN at -inf) where IEEE pow (libdevice) gives +inf: infinities
#: are left out of Power's inputs.
FINITE_ONLY = {T.power}


def _case_id(case) -> str:
    t, a, b, c = case
    return f"{t.name}-{a:g}-{b:g}-{c:g}"


def _inputs(shape, dtype, neuron_type, seed=0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * 4.0
    specials = [v for v in SPECIALS if neuron_type not in FINITE_ONLY or abs(v) != float("inf")]
    flat = x.view(-1)
    m = min(flat.numel(), len(specials))
    flat[:m] = torch.tensor(specials[:m], device="cuda")
    return x.to(dtype)


def _params(case, channels: int, seed=1) -> NeuronParams:
    t, a, b, c = case
    slopes = None
    if t == T.pReLU:
        g = torch.Generator(device="cuda").manual_seed(seed)
        slopes = torch.rand(channels, device="cuda", generator=g) * 2.0 - 0.5
    return NeuronParams(t, a, b, c, slopes)


def _check(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    rtol, atol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.float(), ref.to(got.dtype).float(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _run_both(case, shape, x_dtype, out_dtype, seed=0):
    p = _params(case, shape[-1])
    x = _inputs(shape, x_dtype, case[0], seed)
    dy = torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 7)).to(x_dtype)
    out = torch.empty(shape, device="cuda", dtype=out_dtype)
    tn.neuron_forward(x, out, p)
    _check(out, te.neuron_forward(x, p), f"forward {_case_id(case)} {x_dtype}->{out_dtype} {shape}")
    grad = torch.empty(shape, device="cuda", dtype=out_dtype)
    tn.neuron_gradient(dy, x, grad, p)
    _check(grad, dy.float() * te.neuron_derivative(x, p), f"gradient {_case_id(case)} {x_dtype}->{out_dtype} {shape}")


# 2 x 33 x 67 x 5 = 22110 elements: several full blocks and a masked tail for every dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_type_matches_eager(case, dtype):
    _run_both(case, (2, 33, 67, 5), dtype, dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 7, 3), (2, 5, 9, 5)], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (T.reLU, T.sigmoid, T.ELU, T.geLU, T.logarithm)], ids=_case_id)
def test_small_tensors(case, shape):
    _run_both(case, shape, torch.float32, torch.float32)


# C = 1, 3, 5: the flat kernel gathers slopes; 16, 24, 168: whole-pixel tiles (rows 16-byte
# aligned), 168 with padding to 256 lanes; (2, 3, 7) x small C is the small-tensor configuration
@pytest.mark.parametrize("channels", [1, 3, 5, 16, 24, 168])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 29, 31)], ids=str)
def test_prelu_channels(channels, dtype, shape):
    _run_both((T.pReLU, 0.0, 0.0, 0.0), (*shape, channels), dtype, dtype)


# a convolution's bias in the neuron's pass: f(x + b[c]) for the channel c = i % C, small and
# large C (the flat kernel gathers the bias per element), PReLU (slopes and bias together)
@pytest.mark.parametrize("channels", [1, 5, 64, 168])
@pytest.mark.parametrize("case", [(T.reLU, 0.0, 0.0, 0.0), (T.pReLU, 0.0, 0.0, 0.0), (T.sigmoid, 0.0, 0.0, 0.0)], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_in_the_same_pass(case, dtype, channels):
    shape = (2, 11, 13, channels)
    p = _params(case, channels)
    x = _inputs(shape, dtype, case[0], 3)
    bias = torch.randn(channels, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    out = torch.empty(shape, device="cuda", dtype=dtype)
    tn.neuron_forward(x, out, p, bias=bias)
    _check(out, te.neuron_forward(x.float() + bias, p), f"forward+bias {_case_id(case)} {dtype} C={channels}")
    with pytest.raises(ValueError, match="bias"):
        tn.neuron_forward(x, out, p, bias=bias[:-1] if channels > 1 else torch.zeros(2, device="cuda"))


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float32), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("case", [(T.geLU, 0.0, 0.0, 0.0), (T.pReLU, 0.0, 0.0, 0.0), (T.tanH, 1.0, 1.0, 0.0)], ids=_case_id)
def test_mixed_dtypes(case, x_dtype, out_dtype):
    _run_both(case, (2, 17, 19, 8), x_dtype, out_dtype)


@pytest.mark.parametrize("channels", [7, 16])
@pytest.mark.parametrize("case", [(T.geLU, 0.0, 0.0, 0.0), (T.pReLU, 0.0, 0.0, 0.0)], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int64_offsets(monkeypatch, case, dtype, channels):
    monkeypatch.setattr(tn, "INT64_THRESHOLD", 0)
    _run_both(case, (2, 29, 31, channels), dtype, dtype)


KINKS = {
    # type, a, b: inputs on the kinks, where the derivative must equal torch_eager's exactly
    (T.reLU, 0.1, 0.0): [0.0, -0.0],
    (T.ELU, 0.3, 0.0): [0.0, -0.0],
    (T.absolute, 0.0, 0.0): [0.0, -0.0],
    (T.hardSigmoid, 0.25, 0.5): [-2.0, 2.0],
    (T.reLUN, 0.1, 6.0): [6.0, 0.0, -0.0],
    (T.pReLU, 0.0, 0.0): [0.0, -0.0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", list(KINKS), ids=lambda k: k[0].name)
def test_kinks_exact(key, dtype):
    t, a, b = key
    values = KINKS[key]
    x = torch.tensor(values * 3, device="cuda", dtype=dtype).view(1, 1, -1, 1)
    p = _params((t, a, b, 0.0), 1)
    dy = torch.ones_like(x)
    grad = torch.empty_like(x)
    tn.neuron_gradient(dy, x, grad, p)
    assert torch.equal(grad.float(), te.neuron_derivative(x, p).to(dtype).float())
    out = torch.empty_like(x)
    tn.neuron_forward(x, out, p)
    assert torch.equal(out.float(), te.neuron_forward(x, p).to(dtype).float())


def test_no_host_synchronisation():
    x = torch.randn(4, 8, 8, 16, device="cuda", dtype=torch.bfloat16)
    out, grad = torch.empty_like(x), torch.empty_like(x)
    p = _params((T.pReLU, 0.0, 0.0, 0.0), 16)
    tn.neuron_forward(x, out, p)  # compile outside the check
    tn.neuron_gradient(x, x, grad, p)
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sync debug mode is a prototype feature"
        torch.cuda.set_sync_debug_mode("error")
        try:
            tn.neuron_forward(x, out, p)
            tn.neuron_gradient(x, x, grad, p)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_public_api_uses_triton_and_matches_eager():
    assert dispatch._triton() is not None, "the dispatcher should pick the Triton neuron kernels on CUDA"
    dev = mpsnn.Device("cuda")
    cb = dev.make_command_queue().make_command_buffer()
    xt = _inputs((2, 9, 11, 6), torch.bfloat16, T.geLU)
    x = mpsnn.MPSImage.from_torch(xt)
    y = mpsnn.MPSImage.from_torch(torch.empty_like(xt))
    dx = mpsnn.MPSImage.from_torch(torch.empty_like(xt))
    gelu_desc = mpsnn.MPSNNNeuronDescriptor.cnn_neuron_descriptor(mpsnn.MPSCNNNeuronType.geLU)
    gelu = mpsnn.MPSCNNNeuron(dev, neuron_descriptor=gelu_desc)
    state = gelu.result_state(x, None, y)
    gelu.encode(cb, x, y, destination_state=state)
    grad = mpsnn.MPSCNNNeuronGradient(dev, neuron_descriptor=gelu.neuron_descriptor)
    grad.encode(cb, y, x, state, dx)
    cb.commit()
    cb.wait_until_completed()
    p = NeuronParams(T.geLU)
    _check(y.tensor, te.neuron_forward(xt, p), "MPSCNNNeuron geLU")
    _check(dx.tensor, y.tensor.float() * te.neuron_derivative(xt, p), "MPSCNNNeuronGradient geLU")


def test_gelu_float32_sweep():
    """GeLU's erf (libdevice's erff algorithm, evaluated branch-free) against torch's CUDA erf
    on a dense float32 sweep: erf may differ by one unit of 1.0 (2^-24 below 1), which GeLU
    scales by 0.5*|x| (forward) or 0.5 (derivative); all else agrees to 2 ulp."""
    x = torch.linspace(-12.0, 12.0, 2_000_003, device="cuda")
    x = torch.cat([x, torch.logspace(-40, 1, 4001, device="cuda")])
    x = torch.cat([x, -x]).view(1, 1, -1, 1)
    p = NeuronParams(T.geLU)
    inf = torch.tensor(float("inf"), device="cuda")

    def within(got, ref, erf_scale):
        ulp = torch.nextafter(ref.abs(), inf) - ref.abs()
        bad = (got - ref).abs() > erf_scale * 2.0**-23 + 2 * ulp
        assert not bool(bad.any()), f"{int(bad.sum())} values off, first at x = {x[bad][0].item()}: {got[bad][0].item()} vs {ref[bad][0].item()}"

    y = torch.empty_like(x)
    tn.neuron_forward(x, y, p)
    within(y, te.neuron_forward(x, p), 0.5 * x.abs())
    d = torch.empty_like(x)
    tn.neuron_gradient(torch.ones_like(x), x, d, p)
    within(d, te.neuron_derivative(x, p), 0.5)
