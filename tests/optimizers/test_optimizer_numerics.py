"""Optimizer numerics against the independent float64 references (mpsnn.testing.reference_optimizers)
in every encode form, with every pre-processing option; torch.optim as a second oracle for
the backend functions (spec/optimizers.md §5-9)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSMatrix,
    MPSMatrixDescriptor,
    MPSNNOptimizerAdam,
    MPSNNOptimizerDescriptor,
    MPSNNOptimizerRMSProp,
    MPSNNOptimizerStochasticGradientDescent,
    MPSNNRegularizationType,
    MPSVector,
)
from mpsnn.backends import optimizers as B
from mpsnn.testing import reference_optimizers as R
from mpsnn.testing.tolerances import Tol, assert_close

#: float32 updates over 3 steps (rsqrt / division in float32, small denominators in RMSProp/Adam)
OPT_TOL = {"float32": Tol(2e-5, 2e-6)}
PREFIX = {"momentum": "input_momentum", "velocity": "input_velocity", "maximum_velocity": "maximum_velocity",
          "sum_of_squares": "input_sum_of_squares"}
#: kind -> (class, init keywords, state roles)
KINDS: dict[str, tuple[type, dict[str, Any], tuple[str, ...]]] = {
    "sgd": (MPSNNOptimizerStochasticGradientDescent, {}, ()),
    "momentum": (MPSNNOptimizerStochasticGradientDescent, {"momentum_scale": 0.9}, ("momentum",)),
    "nesterov": (MPSNNOptimizerStochasticGradientDescent, {"momentum_scale": 0.8, "use_nestrov_momentum": True}, ("momentum",)),
    "rmsprop": (MPSNNOptimizerRMSProp, {"decay": 0.7, "epsilon": 1e-3}, ("sum_of_squares",)),
    "adam": (MPSNNOptimizerAdam, {"beta1": 0.8, "beta2": 0.95, "epsilon": 1e-4}, ("momentum", "velocity")),
    "amsgrad": (MPSNNOptimizerAdam, {"beta1": 0.8, "beta2": 0.95, "epsilon": 1e-4}, ("momentum", "velocity", "maximum_velocity")),
}
R_ = MPSNNRegularizationType
PRES: dict[str, dict[str, Any]] = {
    "plain": {},
    "clip_rescale": {"apply_gradient_clipping": True, "gradient_clip_max": 0.4, "gradient_clip_min": -0.3, "gradient_rescale": 0.5},
    "rescale": {"gradient_rescale": 2.0},
    "L1": {"regularization_type": R_.L1, "regularization_scale": 0.05},
    "L2": {"regularization_type": R_.L2, "regularization_scale": 0.1, "apply_gradient_clipping": True, "gradient_clip_max": 0.5,
           "gradient_clip_min": -0.5},
}


def make(kind: str, pre: str, device: Any, lr: float = 0.1) -> Any:
    cls, kw, _ = KINDS[kind]
    return cls(device, optimizer_descriptor=MPSNNOptimizerDescriptor(lr, **PRES[pre]), **kw)


def rng_arrays(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    v = r.normal(size=n).astype(np.float32)
    v[0] = 0.0                                           # sign(0) = 0 under L1
    return v, r.normal(size=n).astype(np.float32)


def ref_step(kind: str, opt: Any, v: np.ndarray, g: np.ndarray, st: dict[str, np.ndarray | None], t: int) -> tuple[np.ndarray, dict]:
    pre = R.pre_of(opt)
    if kind == "sgd" or (kind in ("momentum", "nesterov") and st.get("momentum") is None):
        return R.sgd_step(v, g, None, lr=opt.learning_rate, momentum=0.0, nesterov=False, pre=pre)[0], st
    if kind in ("momentum", "nesterov"):
        nv, m = R.sgd_step(v, g, st["momentum"], lr=opt.learning_rate, momentum=opt.momentum_scale, nesterov=opt.use_nestrov_momentum, pre=pre)
        return nv, {"momentum": m}
    if kind == "rmsprop":
        if st.get("sum_of_squares") is None:
            return R.sgd_step(v, g, None, lr=opt.learning_rate, momentum=0.0, nesterov=False, pre=pre)[0], st
        nv, s = R.rmsprop_step(v, g, st["sum_of_squares"], lr=opt.learning_rate, decay=opt.decay, eps=opt.epsilon, pre=pre)
        return nv, {"sum_of_squares": s}
    if st.get("momentum") is None:
        return R.sgd_step(v, g, None, lr=opt.learning_rate, momentum=0.0, nesterov=False, pre=pre)[0], st
    nv, m, vel, x = R.adam_step(v, g, st["momentum"], st["velocity"], st.get("maximum_velocity"), t=t, lr=opt.learning_rate,
                                beta1=opt.beta1, beta2=opt.beta2, eps=opt.epsilon, pre=pre)
    out = {"momentum": m, "velocity": vel}
    if "maximum_velocity" in st:
        out["maximum_velocity"] = x
    return nv, out


def dev_tensor(a: np.ndarray, device: Any) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, device=mpsnn.Device(device).torch_device)


def host(t: Any) -> np.ndarray:
    if isinstance(t, (MPSVector, MPSMatrix)):
        t = t.tensor
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


# -- vectors and matrices --------------------------------------------------------------------------

@pytest.mark.parametrize("pre", list(PRES))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
def test_vector_form_three_steps(device, kind, pre, in_place) -> None:
    opt = make(kind, pre, device)
    roles = KINDS[kind][2]
    n = 7
    v_np, _ = rng_arrays(1, n)
    values = MPSVector(dev_tensor(v_np, device))
    result = values if in_place else MPSVector(dev_tensor(np.full(n, 99.0, np.float32), device))
    ref_v = v_np.astype(np.float64)
    st_ops = {r: MPSVector(dev_tensor(np.zeros(n, np.float32), device)) for r in roles}
    ref_st: dict[str, Any] = {r: np.zeros(n) for r in roles}
    for step in range(3):
        if step == 2:
            opt.set_learning_rate(0.03)                  # a schedule: effective for later encodes
        g_np = rng_arrays(10 + step, n)[1]
        cb = mpsnn.Device(device).make_command_queue().make_command_buffer()
        kw = {PREFIX[r] + "_vector": st_ops[r] for r in roles}
        src = values if in_place or step == 0 else result  # out of place: chain through the result
        opt.encode(cb, input_gradient_vector=MPSVector(dev_tensor(g_np, device)), input_values_vector=src, result_values_vector=result, **kw)
        cb.commit()
        cb.wait_until_completed()
        ref_v, ref_st = ref_step(kind, opt, ref_v, g_np, ref_st, step + 1)
        assert_close(host(result), ref_v, "float32", OPT_TOL, msg=f"values after step {step + 1}")
        for r in roles:
            assert_close(host(st_ops[r]), ref_st[r], "float32", OPT_TOL, msg=f"{r} after step {step + 1}")
    if not in_place:
        np.testing.assert_array_equal(host(values), v_np)  # the source values are not written
    if isinstance(opt, MPSNNOptimizerAdam):
        assert opt.time_step == 3 and float(opt.time_step_tensor()) == 3.0


@pytest.mark.parametrize("kind", ["momentum", "rmsprop", "amsgrad"])
def test_matrix_form_with_row_padding(device, kind) -> None:
    """Row-padded matrices: every rows x columns element is updated, the padding is not."""
    opt = make(kind, "L1", device)
    roles = KINDS[kind][2]
    desc = MPSMatrixDescriptor(rows=3, columns=5, row_bytes=32)          # 8 floats per row, 3 of padding
    rng = np.random.default_rng(3)

    def mat(a: np.ndarray) -> MPSMatrix:
        buf = np.full((3, 8), -7.0, np.float32)
        buf[:, :5] = a
        return MPSMatrix(dev_tensor(buf.reshape(-1), device), descriptor=desc)

    v_np = rng.normal(size=(3, 5)).astype(np.float32)
    g_np = rng.normal(size=(3, 5)).astype(np.float32)
    values, grad = mat(v_np), mat(g_np)
    st = {r: mat(np.zeros((3, 5), np.float32)) for r in roles}
    cb = mpsnn.Device(device).make_command_queue().make_command_buffer()
    opt.encode(cb, input_gradient_matrix=grad, input_values_matrix=values, result_values_matrix=values,
               **{PREFIX[r] + "_matrix": st[r] for r in roles})
    cb.commit()
    cb.wait_until_completed()
    ref_v, ref_st = ref_step(kind, opt, v_np, g_np, {r: np.zeros((3, 5)) for r in roles}, 1)
    assert_close(host(values), ref_v, "float32", OPT_TOL)
    for r in roles:
        assert_close(host(st[r]), ref_st[r], "float32", OPT_TOL, msg=r)
    pad = host(values.data).reshape(3, 8)[:, 5:]
    assert (pad == -7.0).all(), "row padding must not be written"


def test_plain_tensors_and_numpy_in_place(device) -> None:
    opt = make("momentum", "plain", device)
    v_np, g_np = rng_arrays(5, 6)
    if mpsnn.Device(device).is_cuda:
        v, g, m = dev_tensor(v_np, device), dev_tensor(g_np, device), dev_tensor(np.zeros(6, np.float32), device)
    else:
        v, g, m = v_np.copy(), g_np.copy(), np.zeros(6, np.float32)    # NumPy arrays, updated in place
    cb = mpsnn.Device(device).make_command_queue().make_command_buffer()
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=m, result_values_vector=v)
    cb.commit()
    cb.wait_until_completed()
    ref_v, ref_st = ref_step("momentum", opt, v_np, g_np, {"momentum": np.zeros(6)}, 1)
    assert_close(host(v), ref_v, "float32", OPT_TOL)
    assert_close(host(m), ref_st["momentum"], "float32", OPT_TOL)
    np.testing.assert_array_equal(host(g), g_np)          # the gradient operand is not modified


def test_clip_then_rescale_order_exact(device) -> None:
    """clip bounds apply BEFORE rescaling: g=10 -> clamp to 1 -> *0.5 = 0.5; L2 term unclipped."""
    desc = MPSNNOptimizerDescriptor(1.0, 0.5, apply_gradient_clipping=True, gradient_clip_max=1.0, gradient_clip_min=-1.0,
                                    regularization_type=R_.L2, regularization_scale=4.0)
    opt = MPSNNOptimizerStochasticGradientDescent(device, optimizer_descriptor=desc)
    v = torch.tensor([2.0, -1.0, 0.0], device=device.torch_device)
    g = torch.tensor([10.0, -10.0, 0.5], device=device.torch_device)
    cb = device.make_command_queue().make_command_buffer()
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, result_values_vector=v)
    cb.commit()
    cb.wait_until_completed()
    # g3 = 0.5*clamp(g) + 4*v = [0.5+8, -0.5-4, 0.25]
    assert v.tolist() == [2.0 - 8.5, -1.0 + 4.5, -0.25]


def test_l1_uses_sign_with_zero(device) -> None:
    opt = MPSNNOptimizerStochasticGradientDescent(device, optimizer_descriptor=MPSNNOptimizerDescriptor(
        1.0, 1.0, regularization_type=R_.L1, regularization_scale=0.5))
    v = torch.tensor([3.0, 0.0, -2.0], device=device.torch_device)
    cb = device.make_command_queue().make_command_buffer()
    opt.encode(cb, input_gradient_vector=torch.zeros(3, device=device.torch_device), input_values_vector=v, result_values_vector=v)
    cb.commit()
    cb.wait_until_completed()
    assert v.tolist() == [2.5, 0.0, -1.5]


def test_adam_time_step_write_changes_bias_correction(device) -> None:
    """Setting time_step makes the next encode use time_step + 1 (host and device copy)."""
    n = 5
    v_np, g_np = rng_arrays(7, n)
    outs = []
    for t0 in (0, 9):
        opt = make("adam", "plain", device)
        opt.time_step_tensor()                           # a device copy exists before the write
        opt.time_step = t0
        v = dev_tensor(v_np, device)
        m, vel = torch.zeros_like(v), torch.zeros_like(v)
        cb = mpsnn.Device(device).make_command_queue().make_command_buffer()
        opt.encode(cb, input_gradient_vector=dev_tensor(g_np, device), input_values_vector=v, input_momentum_vector=m,
                   input_velocity_vector=vel, result_values_vector=v)
        cb.commit()
        cb.wait_until_completed()
        assert opt.time_step == t0 + 1 and float(opt.time_step_tensor()) == t0 + 1
        ref_v = R.adam_step(v_np, g_np, np.zeros(n), np.zeros(n), None, t=t0 + 1, lr=opt.learning_rate, beta1=opt.beta1,
                            beta2=opt.beta2, eps=opt.epsilon, pre=R.pre_of(opt))[0]
        assert_close(host(v), ref_v, "float32", OPT_TOL, msg=f"t={t0 + 1}")
        outs.append(host(v))
    assert not np.allclose(outs[0], outs[1]), "the bias correction depends on the time step"


# -- torch.optim as a second oracle for the backend (float64) --------------------------------------------

def _torch_optim_run(make_torch, our_step, n_params: int = 2, steps: int = 3) -> None:
    rng = np.random.default_rng(11)
    shapes = [(4, 3), (5,)][:n_params]
    init = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
    params = [torch.tensor(a, requires_grad=True) for a in init]
    topt = make_torch(params)
    ours = [torch.tensor(a) for a in init]
    for k in range(steps):
        for p, gk in zip(params, grads[k]):
            p.grad = torch.tensor(gk)
        topt.step()
        our_step(ours, [torch.tensor(gk) for gk in grads[k]])
    for p, o in zip(params, ours):
        assert_close(o.numpy(), p.detach().numpy(), "float64")


def test_backend_sgd_matches_torch_optim() -> None:
    _torch_optim_run(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
                     lambda v, g: B.sgd_step(v, g, None, v, lr=0.1, momentum=0.0, nesterov=False,
                                             pre=B.Preprocess(regularization=2, regularization_scale=0.01)))


def test_backend_sgd_momentum_matches_torch_optim() -> None:
    """Classic momentum: ours keeps m = lr*b (lr folded), torch b; equal for a constant lr."""
    ms: list[torch.Tensor] = []

    def ours(v, g):
        if not ms:
            ms.extend(torch.zeros_like(t) for t in v)
        B.sgd_step(v, g, ms, v, lr=0.1, momentum=0.9, nesterov=False, pre=B.Preprocess())
    _torch_optim_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ours)


def test_backend_nesterov_matches_torch_optim() -> None:
    ms: list[torch.Tensor] = []

    def ours(v, g):
        if not ms:
            ms.extend(torch.zeros_like(t) for t in v)
        B.sgd_step(v, g, ms, v, lr=0.1, momentum=0.9, nesterov=True, pre=B.Preprocess())
    _torch_optim_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), ours)


def test_backend_rmsprop_matches_torch_optim() -> None:
    ss: list[torch.Tensor] = []

    def ours(v, g):
        if not ss:
            ss.extend(torch.zeros_like(t) for t in v)
        B.rmsprop_step(v, g, ss, v, lr=0.01, decay=0.9, eps=1e-6, pre=B.Preprocess())
    _torch_optim_run(lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6), ours)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_backend_adam_matches_torch_optim(amsgrad) -> None:
    """With eps = 0 Apple's epsilon placement (outside the root, not bias-corrected) and
    torch's coincide."""
    st: dict[str, Any] = {}

    def ours(v, g):
        if not st:
            st.update(m=[torch.zeros_like(t) for t in v], v=[torch.zeros_like(t) for t in v],
                      x=[torch.zeros_like(t) for t in v] if amsgrad else None, t=torch.zeros((), dtype=torch.float64))
        B.adam_step(v, g, st["m"], st["v"], st["x"], v, lr=0.01, beta1=0.9, beta2=0.99, eps=0.0, step_tensor=st["t"], pre=B.Preprocess())
    _torch_optim_run(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=0.0, amsgrad=amsgrad), ours)
