"""Optimizer state forms: convolution gradient + weights-and-biases states, batch-norm state
and batch-norm gradient + source states, operand arrays (nil, count 1, count 2) and their
errors (spec/optimizers.md §9-10), against the float64 references."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_optimizer_numerics import KINDS, OPT_TOL, PREFIX, host, make, ref_step  # noqa: E402  (same folder, on sys.path)

import mpsnn
from mpsnn import (
    BatchNormalizationDataSource,
    ConvolutionDataSource,
    MPSCNNBatchNormalization,
    MPSCNNBatchNormalizationGradient,
    MPSCNNBatchNormalizationStatistics,
    MPSCNNBatchNormalizationStatisticsGradient,
    MPSCNNConvolution,
    MPSCNNConvolutionDescriptor,
    MPSCNNConvolutionWeightsAndBiasesState,
    MPSCNNNormalizationGammaAndBetaState,
    MPSImage,
    MPSVector,
)
from mpsnn.core.errors import MPSStateError, MPSTypeError, MPSValueError
from mpsnn.testing.tolerances import assert_close

COUT, CIN, K = 4, 4, 3


def cb_of(device: Any) -> Any:
    return mpsnn.Device(device).make_command_queue().make_command_buffer()


def finish(cb: Any) -> None:
    cb.commit()
    cb.wait_until_completed()


def conv_setup(device: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """A convolution gradient state with random gradient_for_weights/biases and a source state."""
    rng = np.random.default_rng(seed)
    desc = MPSCNNConvolutionDescriptor(kernel_width=K, kernel_height=K, input_feature_channels=CIN, output_feature_channels=COUT)
    w = rng.normal(size=(COUT, K, K, CIN)).astype(np.float32)
    b = rng.normal(size=COUT).astype(np.float32)
    conv = MPSCNNConvolution(device, ConvolutionDataSource(desc, w, b))
    x = MPSImage.from_torch(torch.zeros(1, 4, 4, CIN, device=mpsnn.Device(device).torch_device))
    gs = conv.result_state(x)
    gs.gradient_for_weights.copy_(torch.tensor(rng.normal(size=(COUT, K, K, CIN)), dtype=torch.float32))
    gs.gradient_for_biases.copy_(torch.tensor(rng.normal(size=COUT), dtype=torch.float32))
    dev = mpsnn.Device(device).torch_device
    src = MPSCNNConvolutionWeightsAndBiasesState(torch.tensor(w, device=dev), torch.tensor(b, device=dev))
    return gs, src, desc


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("count", [None, 1, 2], ids=["nil", "count1", "count2"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
def test_convolution_state_form(device, kind, count, in_place) -> None:
    gs, src, desc = conv_setup(device)
    opt = make(kind, "L2", device)
    roles = KINDS[kind][2] if count is not None else ()
    w0, b0 = host(src.weights).copy(), host(src.biases).copy()
    if in_place:
        res = src
    else:
        res = MPSCNNConvolutionWeightsAndBiasesState.temporary_cnn_convolution_weights_and_biases_state(cb := cb_of(device), desc)
        res.biases.fill_(5.0)
    cb = res.command_buffer if not in_place else cb_of(device)
    nparams = 2 if count is None or not roles else count       # plain SGD has no operand arrays
    arrays = {r: [MPSVector(torch.zeros(n, device=mpsnn.Device(device).torch_device)) for n in (w0.size, COUT)][:nparams] for r in roles}
    kw = {PREFIX[r] + "_vectors": arrays[r] for r in roles}
    t_before = getattr(opt, "time_step", None)
    opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=res, **kw)
    finish(cb)
    st0 = {r: np.zeros(w0.size) for r in roles}
    ref_w, ref_sw = ref_step(kind, opt, w0.reshape(-1), host(gs.gradient_for_weights).reshape(-1), st0, 1)
    assert_close(host(res.weights).reshape(-1), ref_w, "float32", OPT_TOL, msg="weights")
    for r in roles:
        assert_close(host(arrays[r][0]), ref_sw[r], "float32", OPT_TOL, msg=f"{r}[0]")
    if nparams == 2:
        ref_b, ref_sb = ref_step(kind, opt, b0, host(gs.gradient_for_biases), {r: np.zeros(COUT) for r in roles}, 1)
        assert_close(host(res.biases), ref_b, "float32", OPT_TOL, msg="biases")
        for r in roles:
            assert_close(host(arrays[r][1]), ref_sb[r], "float32", OPT_TOL, msg=f"{r}[1]")
    else:                                                # count 1: biases are not updated, the result's are untouched
        np.testing.assert_array_equal(host(res.biases), b0 if in_place else np.full(COUT, 5.0, np.float32))
    if t_before is not None:
        assert opt.time_step == t_before + 1, "one encode advances time_step once, whatever it updates"
        assert float(opt.time_step_tensor()) == opt.time_step, "the device step count advances once too"
    if not in_place:
        np.testing.assert_array_equal(host(src.weights), w0)


def bn_setup(device: Any) -> tuple[Any, Any]:
    """A batch-norm state after a real training pass (gradient_for_gamma/beta filled)."""
    rng = np.random.default_rng(4)
    c = 4
    ds = BatchNormalizationDataSource(rng.normal(size=c) + 1.0, rng.normal(size=c), np.zeros(c), np.ones(c))
    dev = mpsnn.Device(device).torch_device
    xs = [MPSImage.from_torch(torch.tensor(rng.normal(size=(1, 2, 3, c)), dtype=torch.float32, device=dev)) for _ in range(2)]
    dys = [MPSImage.from_torch(torch.tensor(rng.normal(size=(1, 2, 3, c)), dtype=torch.float32, device=dev)) for _ in range(2)]
    k = MPSCNNBatchNormalization(device, data_source=ds)
    st = k.result_state(xs[0])
    cb = cb_of(device)
    MPSCNNBatchNormalizationStatistics(device).encode_batch(cb, xs, st)
    k.encode_batch(cb, xs, st)
    MPSCNNBatchNormalizationStatisticsGradient(device).encode_batch(cb, dys, xs, st)
    MPSCNNBatchNormalizationGradient(device).encode_batch(cb, dys, xs, st)
    finish(cb)
    return k, st


@pytest.mark.parametrize("kind", ["momentum", "rmsprop", "amsgrad", "adam"])
@pytest.mark.parametrize("two_states", [False, True], ids=["one_state", "gradient_and_source"])
@pytest.mark.parametrize("count", [None, 1, 2], ids=["nil", "count1", "count2"])
def test_batch_normalization_state_forms(device, kind, two_states, count) -> None:
    k, st = bn_setup(device)
    opt = make(kind, "clip_rescale", device)
    roles = KINDS[kind][2] if count is not None else ()
    g0, b0 = host(st.gamma).copy(), host(st.beta).copy()
    dg, db = host(st.gradient_for_gamma).copy(), host(st.gradient_for_beta).copy()
    dev = mpsnn.Device(device).torch_device
    res = MPSCNNNormalizationGammaAndBetaState(torch.full((4,), 3.0, device=dev), torch.full((4,), 3.0, device=dev))
    nparams = 2 if count is None else count
    arrays = {r: [MPSVector(torch.zeros(4, device=dev)) for _ in range(nparams)] for r in roles}
    kw = {PREFIX[r] + "_vectors": arrays[r] for r in roles}
    cb = cb_of(device)
    if two_states:
        opt.encode(cb, batch_normalization_gradient_state=st, batch_normalization_source_state=st, result_state=res, **kw)
    else:
        opt.encode(cb, batch_normalization_state=st, result_state=res, **kw)
    finish(cb)
    ref_g, ref_sg = ref_step(kind, opt, g0, dg, {r: np.zeros(4) for r in roles}, 1)
    assert_close(host(res.gamma), ref_g, "float32", OPT_TOL, msg="gamma")
    for r in roles:
        assert_close(host(arrays[r][0]), ref_sg[r], "float32", OPT_TOL, msg=f"{r}[0]")
    if nparams == 2:
        ref_b, _ = ref_step(kind, opt, b0, db, {r: np.zeros(4) for r in roles}, 1)
        assert_close(host(res.beta), ref_b, "float32", OPT_TOL, msg="beta")
    else:
        np.testing.assert_array_equal(host(res.beta), np.full(4, 3.0, np.float32))
    np.testing.assert_array_equal(host(st.gamma), g0)      # out of place: the source is untouched


def test_convolution_state_errors(device) -> None:
    gs, src, desc = conv_setup(device)
    opt = make("momentum", "plain", device)
    dev = mpsnn.Device(device).torch_device
    cb = cb_of(device)
    small = MPSCNNConvolutionWeightsAndBiasesState(torch.zeros(3, device=dev), torch.zeros(COUT, device=dev))
    with pytest.raises(MPSValueError, match="number_of_weights"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=small)
    with pytest.raises(MPSTypeError, match="convolution_gradient_state.*MPSCNNConvolutionGradientState"):
        opt.encode(cb, convolution_gradient_state=src, convolution_source_state=src, result_state=src)
    with pytest.raises(MPSTypeError, match="result_state.*MPSCNNConvolutionWeightsAndBiasesState"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=gs)
    with pytest.raises(MPSValueError, match="input_momentum_vectors.*1 or 2"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, input_momentum_vectors=[], result_state=src)
    with pytest.raises(MPSTypeError, match="list of MPSVector"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, input_momentum_vectors=MPSVector(torch.zeros(4)),
                   result_state=src)
    with pytest.raises(MPSValueError, match=r"input_momentum_vectors\[1\]"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src,
                   input_momentum_vectors=[torch.zeros(src.weights.numel(), device=dev), torch.zeros(COUT + 1, device=dev)], result_state=src)
    no_bias = MPSCNNConvolutionWeightsAndBiasesState(torch.zeros_like(src.weights), None)
    with pytest.raises(MPSValueError, match="result_state.*biases"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=no_bias)
    adam = make("adam", "plain", device)
    with pytest.raises(MPSValueError, match="both"):
        adam.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=src,
                    input_momentum_vectors=[torch.zeros(src.weights.numel(), device=dev)])
    assert adam.time_step == 0, "a refused encode does not advance the time step"
    with pytest.raises(MPSValueError, match="equally many"):
        adam.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=src,
                    input_momentum_vectors=[torch.zeros(src.weights.numel(), device=dev)],
                    input_velocity_vectors=[torch.zeros(src.weights.numel(), device=dev), torch.zeros(COUT, device=dev)])
    tmp = MPSCNNConvolutionWeightsAndBiasesState.temporary_cnn_convolution_weights_and_biases_state(cb_of(device), desc)
    with pytest.raises(MPSStateError, match="another command buffer"):
        opt.encode(cb, convolution_gradient_state=gs, convolution_source_state=src, result_state=tmp)


def test_batch_normalization_state_errors(device) -> None:
    k, st = bn_setup(device)
    opt = make("sgd", "plain", device)
    cb = cb_of(device)
    dev = mpsnn.Device(device).torch_device
    with pytest.raises(MPSTypeError, match="result_state.*MPSCNNNormalizationGammaAndBetaState"):
        opt.encode(cb, batch_normalization_state=st, result_state=st)
    with pytest.raises(MPSValueError, match="number_of_feature_channels"):
        opt.encode(cb, batch_normalization_state=st, result_state=MPSCNNNormalizationGammaAndBetaState(torch.zeros(3, device=dev),
                                                                                                     torch.zeros(3, device=dev)))
    with pytest.raises(MPSTypeError, match="batch_normalization_state.*MPSCNNBatchNormalizationState"):
        opt.encode(cb, batch_normalization_state=object(), result_state=st)
    fresh = k.result_state(MPSImage.from_torch(torch.zeros(1, 2, 2, 4, device=dev)))
    res = MPSCNNNormalizationGammaAndBetaState(torch.zeros(4, device=dev), torch.zeros(4, device=dev))
    with pytest.raises(MPSStateError, match="gradient_for_gamma"):
        opt.encode(cb, batch_normalization_state=fresh, result_state=res)
