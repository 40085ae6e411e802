"""MPSCNNNeuron / MPSCNNNeuronGradient numerics against three oracles.

1. ``mpsnn.testing.reference`` (float64 NumPy, written from the spec) for every neuron
   type, storage dtype and device; inputs are rounded to the storage dtype first, results
   compared with the dtype's row of ``mpsnn.testing.tolerances``.
2. ``torch.autograd`` in float64 on a torch forward written here, with a random upstream
   gradient, on inputs kept away from kinks.
3. Finite differences, only to validate the reference derivative itself.

Kinks get exact asserts. Geometry (offsets, clip rects, channel windows, batches, encode
forms) and error cases are in ``test_kernel_base.py``.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSCNNNeuronType as T
from mpsnn import MPSImage, MPSNNNeuronDescriptor
from mpsnn.testing import reference as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 7)        # N, H, W, C: batch of 2, odd sizes, channels not a multiple of 4
GRAD_SHAPE = (2, 3, 4, 5)
KINK_MARGIN = 0.05          # autograd inputs stay this far from every kink
FD_STEP = 1e-6              # central finite differences of the float64 reference
FD_TOL = Tol(rtol=1e-6, atol=1e-7)
DY_EXACT = 2.0              # upstream gradient for exact kink asserts (a power of 2: products are exact)


def _f32(v: float) -> float:
    return float(np.float32(v))


@dataclass(frozen=True)
class NeuronCase:
    """One neuron configuration: parameters, input range, kinks and a torch forward."""

    id: str
    type: T
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    lo: float = -3.0
    hi: float = 3.0
    kinks: tuple[float, ...] = ()
    torch_fn: Callable = field(default=None, repr=False)  # (x float64 tensor, a, b, c, slopes) -> y
    tol: dict = field(default_factory=dict)   # per-op tolerance overrides {dtype: Tol}

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def slopes(self, channels: int) -> np.ndarray | None:
        if self.type != T.pReLU:
            return None
        return np.random.default_rng(self.seed + 1).uniform(-0.5, 1.5, channels).astype(np.float32)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...], avoid_kinks: bool = False) -> np.ndarray:
        x = rng.uniform(self.lo, self.hi, shape)
        if avoid_kinks:
            for k in self.kinks:
                near = np.abs(x - k) < KINK_MARGIN
                x[near] = k + np.where(x[near] >= k, 1.0, -1.0) * 2 * KINK_MARGIN
        return x

    def descriptor(self, channels: int) -> MPSNNNeuronDescriptor:
        if self.type == T.pReLU:
            return MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(self.slopes(channels))
        return MPSNNNeuronDescriptor.cnn_neuron_descriptor(self.type, a=self.a, b=self.b, c=self.c)

    def ref_forward(self, x: np.ndarray) -> np.ndarray:
        return ref.neuron_forward(x, self.type, self.a, self.b, self.c, self.slopes(x.shape[-1]))

    def ref_derivative(self, x: np.ndarray) -> np.ndarray:
        return ref.neuron_derivative(x, self.type, self.a, self.b, self.c, self.slopes(x.shape[-1]))

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slopes(x.shape[-1])
        st = None if s is None else torch.from_numpy(s.astype(np.float64))
        return self.torch_fn(x, _f32(self.a), _f32(self.b), _f32(self.c), st)


def _gelu(x, a, b, c, s):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


CASES = [
    NeuronCase("none", T.none, torch_fn=lambda x, a, b, c, s: x * 1.0),
    NeuronCase("reLU", T.reLU, a=0.1, kinks=(0.0,), torch_fn=lambda x, a, b, c, s: torch.where(x >= 0, x, a * x)),
    NeuronCase("reLU_a0", T.reLU, a=0.0, kinks=(0.0,), torch_fn=lambda x, a, b, c, s: torch.where(x >= 0, x, a * x)),
    NeuronCase("linear", T.linear, a=1.5, b=-0.25, torch_fn=lambda x, a, b, c, s: a * x + b),
    NeuronCase("sigmoid", T.sigmoid, lo=-6.0, hi=6.0, torch_fn=lambda x, a, b, c, s: torch.sigmoid(x)),
    NeuronCase("hardSigmoid", T.hardSigmoid, a=0.2, b=0.5, lo=-4.0, hi=4.0, kinks=(-2.5, 2.5),
               torch_fn=lambda x, a, b, c, s: torch.clamp(a * x + b, 0.0, 1.0)),
    NeuronCase("tanH", T.tanH, a=1.3, b=0.7, torch_fn=lambda x, a, b, c, s: a * torch.tanh(b * x)),
    NeuronCase("absolute", T.absolute, kinks=(0.0,), torch_fn=lambda x, a, b, c, s: x.abs()),
    NeuronCase("softPlus", T.softPlus, a=0.8, b=1.5, torch_fn=lambda x, a, b, c, s: a * torch.log1p(torch.exp(b * x))),
    NeuronCase("softSign", T.softSign, torch_fn=lambda x, a, b, c, s: x / (1.0 + x.abs())),
    NeuronCase("ELU", T.ELU, a=0.9, kinks=(0.0,), torch_fn=lambda x, a, b, c, s: torch.where(x >= 0, x, a * (torch.exp(x) - 1.0))),
    NeuronCase("pReLU", T.pReLU, kinks=(0.0,), torch_fn=lambda x, a, b, c, s: torch.where(x >= 0, x, s * x)),
    NeuronCase("reLUN", T.reLUN, a=0.1, b=1.5, kinks=(0.0, 1.5),
               torch_fn=lambda x, a, b, c, s: torch.clamp_max(torch.where(x >= 0, x, a * x), b)),
    NeuronCase("power", T.power, a=0.5, b=2.0, c=1.7, torch_fn=lambda x, a, b, c, s: torch.pow(a * x + b, c)),
    NeuronCase("power_cube", T.power, a=1.0, b=0.0, c=3.0, lo=-2.0, hi=2.0, torch_fn=lambda x, a, b, c, s: torch.pow(a * x + b, c)),
    NeuronCase("exponential_e", T.exponential, a=0.7, b=-0.2, c=-1.0, torch_fn=lambda x, a, b, c, s: torch.exp(a * x + b)),
    NeuronCase("exponential_2", T.exponential, a=0.7, b=-0.2, c=2.0, torch_fn=lambda x, a, b, c, s: c ** (a * x + b)),
    NeuronCase("logarithm_e", T.logarithm, a=0.5, b=2.0, c=-1.0, torch_fn=lambda x, a, b, c, s: torch.log(a * x + b)),
    NeuronCase("logarithm_10", T.logarithm, a=0.5, b=2.0, c=10.0, torch_fn=lambda x, a, b, c, s: torch.log(a * x + b) / math.log(c)),
    NeuronCase("geLU", T.geLU, lo=-4.0, hi=4.0, torch_fn=_gelu),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def test_every_neuron_type_has_a_case() -> None:
    assert {c.type for c in CASES} == {t for t in T if t != T.count}


# -- helpers ------------------------------------------------------------------------------------


def run_forward(device, cb, case: NeuronCase, x_img: MPSImage, dtype: torch.dtype):
    kernel = mpsnn.MPSCNNNeuron(device, neuron_descriptor=case.descriptor(x_img.feature_channels))
    dst = poisoned(x_img.shape, device, dtype=dtype)[0]
    state = kernel.result_state(x_img, destination_image=dst)
    kernel.encode(cb, x_img, dst, destination_state=state)
    return dst, state


def run_gradient(device, cb, case: NeuronCase, x_img: MPSImage, dy_img: MPSImage, state, dtype: torch.dtype) -> MPSImage:
    grad = mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=case.descriptor(x_img.feature_channels))
    dx = poisoned(x_img.shape, device, dtype=dtype)[0]
    grad.encode(cb, dy_img, x_img, state, dx)
    return dx


# -- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_matches_reference(device, cb, case: NeuronCase, dtype) -> None:
    rng = np.random.default_rng(case.seed)
    x_img, x = image(case.sample(rng, SHAPE), device, dtype)
    dst, _ = run_forward(device, cb, case, x_img, dtype)
    finish(cb)
    assert_close(values(dst), case.ref_forward(x), dtype, case.tol, msg=f"{case.id} forward")


def test_forward_reference_is_not_trivial() -> None:
    """Guard against a reference that would agree with anything: distinct types differ."""
    x = np.linspace(-2.0, 2.0, 17)
    outs = {c.id: c.ref_forward(x[None, :, None].repeat(3, axis=2)) for c in CASES}
    assert not np.allclose(outs["reLU"], outs["none"])
    assert not np.allclose(outs["ELU"], outs["reLU"])
    assert not np.allclose(outs["exponential_e"], outs["exponential_2"])


LEGACY = [
    # (class, keyword parameters, equivalent descriptor parameters)
    (mpsnn.MPSCNNNeuronLinear, {"a": 1.5, "b": -0.25}, (T.linear, 1.5, -0.25, 0.0)),
    (mpsnn.MPSCNNNeuronReLU, {"a": 0.1}, (T.reLU, 0.1, 0.0, 0.0)),
    (mpsnn.MPSCNNNeuronSigmoid, {}, (T.sigmoid, 0.0, 0.0, 0.0)),
    (mpsnn.MPSCNNNeuronHardSigmoid, {"a": 0.2, "b": 0.5}, (T.hardSigmoid, 0.2, 0.5, 0.0)),
    (mpsnn.MPSCNNNeuronTanH, {"a": 1.3, "b": 0.7}, (T.tanH, 1.3, 0.7, 0.0)),
    (mpsnn.MPSCNNNeuronAbsolute, {}, (T.absolute, 0.0, 0.0, 0.0)),
    (mpsnn.MPSCNNNeuronSoftPlus, {"a": 0.8, "b": 1.5}, (T.softPlus, 0.8, 1.5, 0.0)),
    (mpsnn.MPSCNNNeuronSoftSign, {}, (T.softSign, 0.0, 0.0, 0.0)),
    (mpsnn.MPSCNNNeuronELU, {"a": 0.9}, (T.ELU, 0.9, 0.0, 0.0)),
    (mpsnn.MPSCNNNeuronReLUN, {"a": 0.1, "b": 1.5}, (T.reLUN, 0.1, 1.5, 0.0)),
    (mpsnn.MPSCNNNeuronPower, {"a": 0.5, "b": 2.0, "c": 1.7}, (T.power, 0.5, 2.0, 1.7)),
    (mpsnn.MPSCNNNeuronExponential, {"a": 0.7, "b": -0.2, "c": 2.0}, (T.exponential, 0.7, -0.2, 2.0)),
    (mpsnn.MPSCNNNeuronLogarithm, {"a": 0.5, "b": 2.0, "c": 10.0}, (T.logarithm, 0.5, 2.0, 10.0)),
]


@pytest.mark.parametrize("cls,kwargs,params", [pytest.param(*row, id=row[0].__name__) for row in LEGACY])
def test_legacy_subclass_forward(device, cb, cls, kwargs, params) -> None:
    t, a, b, c = params
    kernel = cls(device, **kwargs)
    assert kernel.neuron_type == t
    assert (kernel.a, kernel.b, kernel.c) == (_f32(a), _f32(b), _f32(c))
    x = np.random.default_rng(7).uniform(-3.0, 3.0, (1, 3, 4, 5)).astype(np.float32)
    x_img = MPSImage.from_numpy(x, device=device)          # the copying constructor
    dst = poisoned(x_img.shape, device, dtype=torch.float32)[0]
    kernel.encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), ref.neuron_forward(x, t, a, b, c), torch.float32, msg=cls.__name__)


@pytest.mark.parametrize("cls,expected", [
    pytest.param(mpsnn.MPSCNNNeuronReLU, (0.0, 0.0, 0.0), id="ReLU"),
    pytest.param(mpsnn.MPSCNNNeuronLinear, (1.0, 0.0, 0.0), id="Linear"),
    pytest.param(mpsnn.MPSCNNNeuronHardSigmoid, (0.2, 0.5, 0.0), id="HardSigmoid"),
    pytest.param(mpsnn.MPSCNNNeuronTanH, (1.0, 1.0, 0.0), id="TanH"),
    pytest.param(mpsnn.MPSCNNNeuronSoftPlus, (1.0, 1.0, 0.0), id="SoftPlus"),
    pytest.param(mpsnn.MPSCNNNeuronELU, (1.0, 0.0, 0.0), id="ELU"),
    pytest.param(mpsnn.MPSCNNNeuronReLUN, (1.0, 6.0, 0.0), id="ReLUN"),
])
def test_legacy_subclass_default_parameters(device, cls, expected) -> None:
    k = cls(device)
    assert (k.a, k.b, k.c) == tuple(_f32(v) for v in expected)


def test_descriptor_factory_fills_no_defaults() -> None:
    d = MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.hardSigmoid)
    assert (d.neuron_type, d.a, d.b, d.c, d.data) == (T.hardSigmoid, 0.0, 0.0, 0.0, None)


@pytest.mark.parametrize("how", ["legacy", "descriptor"])
def test_prelu_per_channel_slopes(device, cb, how) -> None:
    rng = np.random.default_rng(11)
    slopes = np.array([0.5, -1.0, 0.0, 2.0, 0.25], np.float32)
    x_img, x = image(rng.uniform(-2.0, 2.0, (2, 3, 3, 5)), device, torch.float32)
    if how == "legacy":
        kernel = mpsnn.MPSCNNNeuronPReLU(device, a=slopes)
    else:
        kernel = mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes.tobytes()))
    assert kernel.neuron_type == T.pReLU
    assert np.array_equal(np.frombuffer(kernel.data, np.float32), slopes)
    dst = poisoned(x_img.shape, device, dtype=torch.float32)[0]
    kernel.encode(cb, x_img, dst)
    finish(cb)
    expected = np.where(x >= 0, x, slopes.astype(np.float64) * x)
    assert_close(values(dst), expected, torch.float32)
    assert_close(values(dst), ref.neuron_forward(x, T.pReLU, slopes=slopes), torch.float32)


def test_prelu_extra_slopes_are_ignored(device, cb) -> None:
    slopes = np.arange(1, 9, dtype=np.float32) / 8      # 8 slopes, 3 channels
    x_img, x = image(-np.ones((1, 2, 2, 3)), device, torch.float32)
    dst = poisoned(x_img.shape, device, dtype=torch.float32)[0]
    mpsnn.MPSCNNNeuronPReLU(device, a=slopes).encode(cb, x_img, dst)
    finish(cb)
    assert np.array_equal(values(dst), -np.broadcast_to(slopes[:3].astype(np.float64), x.shape))


# -- unorm8 destination: clamp to [0, 1] and round to k/255 ---------------------------------------------


def test_unorm8_destination_clamps_and_rounds(device, cb) -> None:
    rng = np.random.default_rng(5)
    x_img, x = image(rng.uniform(-1.0, 1.0, (2, 3, 5, 3)), device, torch.float32)
    kernel = mpsnn.MPSCNNNeuronLinear(device, a=1.5, b=0.2)   # values in [-1.3, 1.7]: both clamps active
    desc = mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.unorm8,
                                    width=5, height=3, feature_channels=3, number_of_images=2)
    dst = MPSImage(device, image_descriptor=desc)
    kernel.encode(cb, x_img, dst)
    finish(cb)
    y = ref.neuron_forward(x, T.linear, 1.5, 0.2)
    assert (y < 0).any() and (y > 1).any()
    got = values(dst)
    assert_close(got, np.clip(y, 0.0, 1.0), "unorm8")     # rounded to nearest: within half a step
    levels = np.round(got * 255.0)
    assert np.array_equal(got.astype(np.float32), (levels / 255.0).astype(np.float32)), "unorm8 values must be k/255"
    raw = dst.read_bytes(image_index=1)
    assert raw.dtype == np.uint8
    assert np.array_equal(raw.astype(np.float64), levels[1])


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_gradient_matches_reference(device, cb, case: NeuronCase, dtype) -> None:
    rng = np.random.default_rng(case.seed + 2)
    x_img, x = image(case.sample(rng, GRAD_SHAPE), device, dtype)
    dy_img, dy = image(rng.normal(size=GRAD_SHAPE), device, dtype)
    _, state = run_forward(device, cb, case, x_img, dtype)
    dx = run_gradient(device, cb, case, x_img, dy_img, state, dtype)
    finish(cb)
    assert_close(values(dx), dy * case.ref_derivative(x), dtype, case.tol, msg=f"{case.id} gradient")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_gradient_matches_autograd(device, cb, case: NeuronCase) -> None:
    rng = np.random.default_rng(case.seed + 3)
    x_img, x = image(case.sample(rng, GRAD_SHAPE, avoid_kinks=True), device, torch.float32)
    dy_img, dy = image(rng.normal(size=GRAD_SHAPE), device, torch.float32)
    _, state = run_forward(device, cb, case, x_img, torch.float32)
    dx = run_gradient(device, cb, case, x_img, dy_img, state, torch.float32)
    finish(cb)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = case.torch_forward(xt)
    # the torch forward used as the second oracle is the same function as the reference
    assert_close(y.detach(), case.ref_forward(x), torch.float64, msg=f"{case.id} torch forward")
    (expected,) = torch.autograd.grad(y, xt, grad_outputs=torch.from_numpy(dy))
    assert_close(values(dx), expected, torch.float32, case.tol, msg=f"{case.id} gradient vs autograd")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_reference_derivative_matches_finite_differences(case: NeuronCase) -> None:
    rng = np.random.default_rng(case.seed + 4)
    x = case.sample(rng, (4, 6), avoid_kinks=True)
    fd = (case.ref_forward(x + FD_STEP) - case.ref_forward(x - FD_STEP)) / (2 * FD_STEP)
    assert_close(case.ref_derivative(x), fd, torch.float64, {torch.float64: FD_TOL}, msg=case.id)


# Exact values at kinks: (descriptor parameters, x, f(x), f'(x)); neurons.md §6 conventions.
A_HS, B_HS = 0.25, 0.5          # hardSigmoid: a*x + b hits 0 at x = -2 and 1 at x = 2 exactly
A_RN, B_RN = 0.125, 1.5         # reLUN: p == b at x = 1.5
SLOPE = 0.375
KINKS = [
    pytest.param(T.reLU, (0.25, 0, 0), 0.0, 0.0, 1.0, id="reLU@0"),
    pytest.param(T.reLU, (0.25, 0, 0), -0.0, -0.0, 1.0, id="reLU@-0"),
    pytest.param(T.reLU, (0.25, 0, 0), -1.0, -0.25, 0.25, id="reLU@-1"),
    pytest.param(T.reLU, (0, 0, 0), 0.0, 0.0, 1.0, id="plain-reLU@0"),         # a = 0: the CPU's ReLU fast path
    pytest.param(T.reLU, (0, 0, 0), -0.0, -0.0, 1.0, id="plain-reLU@-0"),
    pytest.param(T.reLU, (0, 0, 0), -1.0, 0.0, 0.0, id="plain-reLU@-1"),
    pytest.param(T.pReLU, None, 0.0, 0.0, 1.0, id="pReLU@0"),
    pytest.param(T.pReLU, None, -2.0, -2.0 * SLOPE, SLOPE, id="pReLU@-2"),
    pytest.param(T.ELU, (0.5, 0, 0), 0.0, 0.0, 1.0, id="ELU@0"),
    pytest.param(T.absolute, (0, 0, 0), 0.0, 0.0, 0.0, id="absolute@0"),
    pytest.param(T.absolute, (0, 0, 0), -3.0, 3.0, -1.0, id="absolute@-3"),
    pytest.param(T.hardSigmoid, (A_HS, B_HS, 0), -2.0, 0.0, A_HS, id="hardSigmoid@lower-edge"),
    pytest.param(T.hardSigmoid, (A_HS, B_HS, 0), 2.0, 1.0, A_HS, id="hardSigmoid@upper-edge"),
    pytest.param(T.hardSigmoid, (A_HS, B_HS, 0), -2.5, 0.0, 0.0, id="hardSigmoid@below"),
    pytest.param(T.hardSigmoid, (A_HS, B_HS, 0), 2.5, 1.0, 0.0, id="hardSigmoid@above"),
    pytest.param(T.reLUN, (A_RN, B_RN, 0), B_RN, B_RN, 0.0, id="reLUN@p==b"),
    pytest.param(T.reLUN, (A_RN, B_RN, 0), 2.0, B_RN, 0.0, id="reLUN@clamped"),
    pytest.param(T.reLUN, (A_RN, B_RN, 0), 1.25, 1.25, 1.0, id="reLUN@linear"),
    pytest.param(T.reLUN, (A_RN, B_RN, 0), 0.0, 0.0, 1.0, id="reLUN@0"),
    pytest.param(T.reLUN, (A_RN, B_RN, 0), -2.0, -2.0 * A_RN, A_RN, id="reLUN@negative"),
]


def _kink_descriptor(t: T, params, channels: int) -> MPSNNNeuronDescriptor:
    if t == T.pReLU:
        return MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(np.full(channels, SLOPE, np.float32))
    return MPSNNNeuronDescriptor.cnn_neuron_descriptor(t, *params)


@pytest.mark.parametrize("t,params,x0,fx,dfx", KINKS)
def test_exact_values_at_kinks(device, cb, t, params, x0, fx, dfx) -> None:
    shape = (1, 1, 2, 3)
    x_img, x = image(np.full(shape, x0), device, torch.float32)
    dy_img, _ = image(np.full(shape, DY_EXACT), device, torch.float32)
    desc = _kink_descriptor(t, params, 3)
    fwd = mpsnn.MPSCNNNeuron(device, neuron_descriptor=desc)
    y = poisoned(shape, device, dtype=torch.float32)[0]
    state = fwd.result_state(x_img)
    fwd.encode(cb, x_img, y, destination_state=state)
    dx = poisoned(shape, device, dtype=torch.float32)[0]
    mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=desc).encode(cb, dy_img, x_img, state, dx)
    finish(cb)
    assert np.array_equal(values(y), np.full(shape, fx)), f"f({x0})"
    assert np.array_equal(values(dx), np.full(shape, DY_EXACT * dfx)), f"f'({x0})"
    # the reference agrees exactly too
    a, b, c = params if params is not None else (0, 0, 0)
    slopes = np.full(3, SLOPE, np.float32)
    assert np.array_equal(ref.neuron_forward(x, t, a, b, c, slopes), np.full(shape, fx))
    assert np.array_equal(ref.neuron_derivative(x, t, a, b, c, slopes), np.full(shape, dfx))


def test_ieee_semantics_power_and_logarithm(device, cb) -> None:
    """(a*x+b)^c of a negative base with a non-integer exponent is NaN; log(0) is -inf."""
    x_img, x = image(np.array([-1.0, 0.0, 1.0, 4.0]).reshape(1, 1, 4, 1), device, torch.float32)
    outs = []
    for t, (a, b, c) in ((T.power, (1.0, 0.0, 0.5)), (T.logarithm, (1.0, 0.0, -1.0))):
        k = mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(t, a, b, c))
        d = poisoned(x_img.shape, device, 1234.0, dtype=torch.float32)[0]
        k.encode(cb, x_img, d)
        outs.append((d, ref.neuron_forward(x, t, a, b, c)))
    finish(cb)
    for d, expected in outs:
        assert_close(values(d), expected, torch.float32)
    assert np.isnan(outs[0][1][0, 0, 0, 0]) and outs[1][1][0, 0, 1, 0] == -np.inf
