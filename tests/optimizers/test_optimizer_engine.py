"""The fused multi-tensor optimizer engine (``mpsnn.backends.triton.optimizers``) behind the
public optimizers on CUDA: encodes are queued on the command buffer and launched together,
every kind against the float64 reference, order kept where updates depend on each other, and
a captured CUDA graph replaying whole steps with the step count on the device.

The CPU-only runs skip these tests; ``-p mpsnn.testing.interpret`` runs the queueing tests on
the CPU through Triton's interpreter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn.backends import dispatch
from mpsnn.testing import reference_optimizers as ref
from mpsnn.testing.tolerances import Tol, assert_close

OPT_TOL = {"float32": Tol(2e-5, 2e-6)}


def _engine_device() -> mpsnn.Device | None:
    for name in ("cuda", "cpu"):
        if name == "cuda" and not torch.cuda.is_available():
            continue
        probe = torch.zeros(1, device=name)
        if dispatch.triton_engine("optimizers", probe) is not None:
            return mpsnn.Device(name)
    return None


DEV = _engine_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="no device with the Triton optimizer engine")

SIZES = [5, 4096, 4097, 10000, 1]


def _arrays(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    assert DEV is not None
    return torch.from_numpy(a.copy()).to(DEV.torch_device)


def _ref(kind: str, opt, v: np.ndarray, g: np.ndarray, st: dict, t: int) -> tuple[np.ndarray, dict]:  # type: ignore[no-untyped-def]
    """One float64 reference step of ``kind`` with ``opt``'s hyper-parameters."""
    pre = ref.pre_of(opt)
    if kind == "sgd":
        return ref.sgd_step(v, g, None, lr=opt.learning_rate, momentum=0.0, nesterov=False, pre=pre)[0], st
    if kind in ("momentum", "nesterov"):
        nv, m = ref.sgd_step(v, g, st["momentum"], lr=opt.learning_rate, momentum=opt.momentum_scale,
                             nesterov=opt.use_nestrov_momentum, pre=pre)
        return nv, {"momentum": m}
    if kind == "rmsprop":
        nv, s = ref.rmsprop_step(v, g, st["sum_of_squares"], lr=opt.learning_rate, decay=opt.decay, eps=opt.epsilon, pre=pre)
        return nv, {"sum_of_squares": s}
    nv, m, vel, x = ref.adam_step(v, g, st["momentum"], st["velocity"], st.get("maximum_velocity"), t=t, lr=opt.learning_rate,
                                  beta1=opt.beta1, beta2=opt.beta2, eps=opt.epsilon, pre=pre)
    out = {"momentum": m, "velocity": vel}
    if "maximum_velocity" in st:
        out["maximum_velocity"] = x
    return nv, out


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import mpsnn.backends.triton.optimizers as tri
    calls: list[int] = []
    real = tri.launch

    def counting(kind, entries, clip, reg):  # type: ignore[no-untyped-def]
        calls.append(len(entries))
        real(kind, entries, clip, reg)
    monkeypatch.setattr(tri, "launch", counting)
    return calls


def _make(kind: str) -> mpsnn.MPSNNOptimizer:
    desc = mpsnn.MPSNNOptimizerDescriptor(0.01, 0.5, apply_gradient_clipping=True, gradient_clip_max=1.0, gradient_clip_min=-0.8,
                                          regularization_type=mpsnn.MPSNNRegularizationType.L2, regularization_scale=0.1)
    if kind == "sgd":
        return mpsnn.MPSNNOptimizerStochasticGradientDescent(DEV, momentum_scale=0.0, optimizer_descriptor=desc)
    if kind in ("momentum", "nesterov"):
        return mpsnn.MPSNNOptimizerStochasticGradientDescent(DEV, momentum_scale=0.9, use_nestrov_momentum=kind == "nesterov",
                                                             optimizer_descriptor=desc)
    if kind == "rmsprop":
        return mpsnn.MPSNNOptimizerRMSProp(DEV, decay=0.9, epsilon=1e-3, optimizer_descriptor=desc)
    return mpsnn.MPSNNOptimizerAdam(DEV, beta1=0.8, beta2=0.95, epsilon=1e-3, time_step=3, optimizer_descriptor=desc)


ROLES = {"sgd": [], "momentum": ["momentum"], "nesterov": ["momentum"], "rmsprop": ["sum_of_squares"],
         "adam": ["momentum", "velocity"], "amsgrad": ["momentum", "velocity", "maximum_velocity"]}
KEYS = {"momentum": "input_momentum_vector", "sum_of_squares": "input_sum_of_squares_vector",
        "velocity": "input_velocity_vector", "maximum_velocity": "maximum_velocity_vector"}


@pytest.mark.parametrize("kind", list(ROLES))
def test_every_kind_in_one_launch_matches_the_reference(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several optimizers of one kind, several tensors each, two steps: one launch per step,
    float64-reference values for every operand (in place and out of place)."""
    assert DEV is not None
    calls = _count_launches(monkeypatch)
    opts = [_make(kind) for _ in range(2)]
    rng = np.random.default_rng(1)
    params = []
    for i, n in enumerate(SIZES):
        v, g = _arrays(10 + i, n)
        st = {r: np.abs(rng.standard_normal(n)).astype(np.float32) * 0.1 for r in ROLES[kind]}
        params.append((opts[i % 2], v, g, st, i % 3 == 0))
    tensors = [(_t(v), _t(g), {r: _t(a) for r, a in st.items()}, None if inplace else torch.zeros(v.size, device=DEV.torch_device))
               for _o, v, g, st, inplace in params]
    expect = [(v.astype(np.float64), {r: a.astype(np.float64) for r, a in st.items()}) for _o, v, g, st, _i in params]
    queue = DEV.make_command_queue()
    for _step in range(2):
        cb = queue.make_command_buffer()
        for i, ((opt, _v, g, _st, _inp), (tv, tg, ts, tr)) in enumerate(zip(params, tensors)):
            res = tv if tr is None else tr
            opt.encode(cb, input_gradient_vector=tg, input_values_vector=tv, result_values_vector=res,
                       **{KEYS[r]: t for r, t in ts.items()})
            t_adam = opt.time_step if kind in ("adam", "amsgrad") else 0
            ev, est = expect[i]
            expect[i] = _ref(kind, opt, ev, g.astype(np.float64), est, t_adam)
        cb.commit()
        cb.wait_until_completed()
        for (tv, _tg, _ts, tr) in tensors:
            if tr is not None:
                tv.copy_(tr)       # the next step starts from the result
    assert calls == [len(SIZES), len(SIZES)]
    for (tv, _tg, ts, _tr), (ev, est) in zip(tensors, expect):
        assert_close(tv.cpu().numpy(), ev, "float32", OPT_TOL)
        for r, t in ts.items():
            assert_close(t.cpu().numpy(), est[r], "float32", OPT_TOL)


def test_dependent_updates_keep_encode_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second update of the same tensor launches after the first (two launches); another
    kernel's encode sees every queued update done."""
    assert DEV is not None
    calls = _count_launches(monkeypatch)
    opt = mpsnn.MPSNNOptimizerStochasticGradientDescent(DEV, learning_rate=0.5)
    v, g = _t(np.ones(7, np.float32)), _t(np.full(7, 2.0, np.float32))
    cb = DEV.make_command_queue().make_command_buffer()
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, result_values_vector=v)
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, result_values_vector=v)
    assert calls == [1]                      # the second encode flushed the first
    with cb.encoding("test"):                # any other encode launches the queue first
        seen = v.clone()
    assert calls == [1, 1]
    cb.commit()
    cb.wait_until_completed()
    assert seen.tolist() == [-1.0] * 7


def test_adam_time_step_written_between_queued_encodes() -> None:
    """Encodes queued before ``time_step`` is set use the old count, later ones the new."""
    assert DEV is not None
    opt = mpsnn.MPSNNOptimizerAdam(DEV, learning_rate=0.1)
    a_v, a_g = _arrays(3, 6)
    b_v, b_g = _arrays(4, 6)
    ops = [(_t(a_v), _t(a_g), _t(np.zeros(6, np.float32)), _t(np.zeros(6, np.float32))),
           (_t(b_v), _t(b_g), _t(np.zeros(6, np.float32)), _t(np.zeros(6, np.float32)))]
    cb = DEV.make_command_queue().make_command_buffer()
    v, g, m, q = ops[0]
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=m, input_velocity_vector=q,
               result_values_vector=v)
    opt.time_step = 50
    v, g, m, q = ops[1]
    opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=m, input_velocity_vector=q,
               result_values_vector=v)
    cb.commit()
    cb.wait_until_completed()
    assert opt.time_step == 51
    assert float(opt.time_step_tensor()) == 51.0
    for (v, _g, _m, _q), (v0, g0), t in zip(ops, ((a_v, a_g), (b_v, b_g)), (1, 51)):
        ev, _ = _ref("adam", opt, v0.astype(np.float64), g0.astype(np.float64),
                                   {"momentum": np.zeros(6), "velocity": np.zeros(6)}, t)
        assert_close(v.cpu().numpy(), ev, "float32", OPT_TOL)


@pytest.mark.skipif(DEV is None or not DEV.is_cuda, reason="CUDA graphs need a CUDA device")
def test_adam_step_replays_from_a_cuda_graph() -> None:
    """Encodes of a whole step captured once; every replay is one more Adam step (the bias
    correction follows the step count kept on the device)."""
    assert DEV is not None
    opts = [mpsnn.MPSNNOptimizerAdam(DEV, learning_rate=0.05) for _ in range(3)]
    host = [_arrays(20 + i, n) for i, n in enumerate((300, 5000, 17))]
    ops = [(_t(v), _t(g), _t(np.zeros(v.size, np.float32)), _t(np.zeros(v.size, np.float32))) for v, g in host]
    queue = DEV.make_command_queue()

    def step() -> None:
        cb = queue.make_command_buffer()
        for opt, (v, g, m, q) in zip(opts, ops):
            opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=m, input_velocity_vector=q,
                       result_values_vector=v)
        cb.flush_deferred()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()                                  # warm-up: compiles, uploads the tables
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for opt, (v, _g, _m, _q), (v0, g0) in zip(opts, ops, host):
        ev, est = v0.astype(np.float64), {"momentum": np.zeros(v0.size), "velocity": np.zeros(v0.size)}
        for t in range(1, 5):               # the warm-up step and 3 replays (capturing runs nothing)
            ev, est = _ref("adam", opt, ev, g0.astype(np.float64), est, t)
        assert_close(v.cpu().numpy(), ev, "float32", OPT_TOL)
        assert float(opt.time_step_tensor()) == 4.0     # the device count; the host counted 2 encodes


@pytest.mark.parametrize("operand", ["gradient", "values"])
def test_a_strided_read_operand_is_copied_and_keeps_the_one_launch_update(operand: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only operand the engine cannot address (a strided view, as a fully connected
    layer's weights and weight gradient in the data source's layout are) is copied once: the
    update still runs in the fused engine, with the same bits as for a contiguous operand."""
    assert DEV is not None
    calls = _count_launches(monkeypatch)
    r = np.random.default_rng(11)
    n = 4097
    wide_v = _t(r.standard_normal((n, 2)).astype(np.float32))
    wide_g = _t(r.standard_normal((n, 2)).astype(np.float32))
    results = []
    for strided in (True, False):
        g = wide_g[:, 0] if strided and operand == "gradient" else wide_g[:, 0].contiguous()
        v = wide_v[:, 0] if strided and operand == "values" else wide_v[:, 0].contiguous()
        opt = _make("adam")
        out, m, vel = _t(np.zeros(n, np.float32)), _t(np.zeros(n, np.float32)), _t(np.zeros(n, np.float32))
        cb = DEV.make_command_queue().make_command_buffer()
        opt.encode(cb, input_gradient_vector=g, input_values_vector=v, result_values_vector=out,
                   input_momentum_vector=m, input_velocity_vector=vel)
        cb.commit()
        cb.wait_until_completed()
        results.append(out.cpu())
    assert calls == [1, 1], "both updates ran in the fused engine"
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], wide_v[:, 0].cpu()) and results[0].abs().sum() > 0
