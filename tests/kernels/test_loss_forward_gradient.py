"""MPSNNForwardLoss, MPSNNLossGradient and MPSNNInitialGradient: the float64 loss reference
(``mpsnn.testing.reference_loss``) for the forward, ``torch.autograd`` in float64 with a
random upstream gradient for the gradient (w.r.t. predictions and labels)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNLossDescriptor,
    MPSCNNLossType,
    MPSCNNReductionType,
    MPSNNForwardLoss,
    MPSNNInitialGradient,
    MPSNNLossGradient,
    MPSOffset,
)
from mpsnn.testing import reference_loss as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.reference_loss import inputs, torch_loss, weights
from mpsnn.testing.tolerances import Tol, assert_close

T = MPSCNNLossType
R = MPSCNNReductionType
SHAPE = (2, 3, 4, 5)  # two images per entry, odd sizes
LOSS_TOL = {"float32": Tol(2e-5, 2e-5)}
GRAD_TOL = {"float32": Tol(2e-5, 1e-5)}
LOSS_TYPES = [t for t in T if t != T.count]
COMBOS = [pytest.param(t, r, id=f"{t.name}-{r.name}") for t in LOSS_TYPES for r in R if r != R.count and (t != T.cosineDistance or r == R.sum)]


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float64)


def desc(loss_type: T, reduction: R, **fields) -> MPSCNNLossDescriptor:
    d = MPSCNNLossDescriptor(loss_type, reduction)
    for k, v in fields.items():
        setattr(d, k, v)
    return d


def cbuf(device):
    return device.make_command_queue().make_command_buffer()


@pytest.mark.parametrize("across", [False, True], ids=["per-image", "across"])
@pytest.mark.parametrize("loss_type,reduction", COMBOS)
def test_forward_loss_every_type_and_reduction(device, loss_type: T, reduction: R, across: bool) -> None:
    ys, ts = zip(*[inputs(loss_type, SHAPE, s) for s in (30, 31)])
    w0 = weights(SHAPE, 32)
    k = MPSNNForwardLoss(device, loss_descriptor=desc(loss_type, reduction, reduce_across_batch=across, weight=0.6))
    cb = cbuf(device)
    srcs, yr = zip(*[image(y, device) for y in ys])
    labs = [image(t, device)[0] for t in ts]
    wts = [image(w0, device)[0], image(np.ones(SHAPE), device)[0]]
    out = k.encode_batch(cb, list(srcs), labs, wts)
    finish(cb)
    _, rl = ref.batch_loss_reference(int(loss_type), int(reduction), list(yr), [f32(t) for t in ts], [f32(w0), np.ones(SHAPE)],
                                     weight=0.6, reduce_across_batch=across)
    for e in range(2):
        assert out[e].dtype == torch.float32
        expected = rl[e] if reduction == R.none else rl[e].reshape(2, 1, 1, 1)
        assert_close(values(out[e]), expected, "float32", LOSS_TOL, msg=f"entry {e}")


def test_forward_loss_states_destinations_and_dynamic_values(device) -> None:
    y, t = inputs(T.huber, SHAPE, 33)
    k = MPSNNForwardLoss(device, loss_descriptor=desc(T.huber, R.sum, delta=0.5))
    k.delta, k.weight = 0.75, 2.0
    assert (k.delta, k.weight, k.loss_type, k.reduction_type, k.number_of_classes) == (0.75, 2.0, T.huber, R.sum, 1)
    with pytest.raises(mpsnn.MPSValueError, match="label_smoothing"):
        k.label_smoothing = 2.0
    cb = cbuf(device)
    src, yr = image(y, device)
    lab, _ = image(t, device)
    out, states = k.encode_batch(cb, [src], [lab], destination_state_is_temporary=False)
    assert states[0].delta == 0.75 and states[0].weight == 2.0 and not states[0].is_temporary
    assert isinstance(states[0], mpsnn.MPSNNGradientState)
    dest, _ = poisoned((2, 1, 1, 4), device)
    k.destination_feature_channel_offset = 0
    st = k.result_state_batch([src])
    k.delta = 0.25
    assert k.encode_batch(cb, [src], [lab], None, st, [dest]) is None
    assert st[0].delta == 0.25
    finish(cb)
    _, rl = ref.batch_loss_reference(int(T.huber), int(R.sum), [yr], [f32(t)], weight=2.0, delta=0.75)
    assert_close(values(out[0]), rl[0].reshape(2, 1, 1, 1), "float32", LOSS_TOL)
    _, rl = ref.batch_loss_reference(int(T.huber), int(R.sum), [yr], [f32(t)], weight=2.0, delta=0.25)
    assert_close(values(dest)[..., 0], rl[0].reshape(2, 1, 1), "float32", LOSS_TOL)
    assert np.isnan(values(dest)[..., 1:]).all()  # other channels untouched


def test_forward_loss_errors(device) -> None:
    y, t = inputs(T.meanSquaredError, SHAPE, 34)
    cb = cbuf(device)
    src, _ = image(y, device)
    lab, _ = image(t, device)
    with pytest.raises(mpsnn.MPSValueError, match="cosineDistance"):
        MPSNNForwardLoss(device, loss_descriptor=desc(T.cosineDistance, R.none))
    k = MPSNNForwardLoss(device, loss_descriptor=desc(T.meanSquaredError, R.mean))
    with pytest.raises(mpsnn.MPSValueError, match="labels\\[0\\]"):
        k.encode_batch(cb, [src], [image(t[:, :2], device)[0]])
    with pytest.raises(mpsnn.MPSValueError, match="weights\\[0\\]"):
        k.encode_batch(cb, [src], [lab], [image(t[:1], device)[0]])
    with pytest.raises(mpsnn.MPSValueError, match="destination_images\\[0\\]"):
        k.encode_batch(cb, [src], [lab], None, None, [poisoned(SHAPE, device)[0]])
    with pytest.raises(mpsnn.MPSValueError, match="match the 1 source images"):
        k.encode_batch(cb, [src], [lab, lab])
    k.offset = MPSOffset(1, 0, 0)
    with pytest.raises(mpsnn.MPSValueError, match="offset/clip_rect"):
        k.encode_batch(cb, [src], [lab])


@pytest.mark.parametrize("labels_side", [False, True], ids=["dy", "dlabels"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_gradient_matches_autograd(device, loss_type: T, labels_side: bool) -> None:
    """Per-element (reduction none) incoming gradient, random; weights random; states carry
    the forward's dynamic values."""
    y, t = inputs(loss_type, SHAPE, 35)
    w = weights(SHAPE, 36)
    if loss_type == T.softMaxCrossEntropy and not labels_side:
        w = np.repeat(w[..., :1], SHAPE[3], axis=-1)
    up = np.random.default_rng(37).normal(size=SHAPE)
    if loss_type == T.softMaxCrossEntropy and not labels_side:
        up = np.repeat(up[..., :1], SHAPE[3], axis=-1)  # softmax - t' is exact for per-pixel sg * w
    red = R.sum if loss_type == T.cosineDistance else R.none
    ls = 0.1 if loss_type in (T.softMaxCrossEntropy, T.sigmoidCrossEntropy) else 0.0
    classes = {"number_of_classes": SHAPE[3]} if loss_type == T.softMaxCrossEntropy else {}
    fwd = MPSNNForwardLoss(device, loss_descriptor=desc(loss_type, red, **classes))
    fwd.weight, fwd.label_smoothing = 0.7, ls
    grad = MPSNNLossGradient(device, loss_descriptor=desc(loss_type, red, **classes))
    grad.compute_label_gradients = labels_side
    cb = cbuf(device)
    src, yr = image(y, device)
    lab, tr = image(t, device)
    wt, wr = image(w, device)
    sg, upr = image(up if red == R.none else up[:, :1, :1, :1], device)
    _, states = fwd.encode_batch(cb, [src], [lab], [wt], destination_state_is_temporary=True)
    out = grad.encode_batch(cb, [sg], [src], [lab], [wt], states)
    finish(cb)
    assert out[0].shape == SHAPE and states[0].read_count == 0
    yt = torch.from_numpy(yr).requires_grad_(True)
    tt = torch.from_numpy(tr).requires_grad_(True)
    ts = tt * (1 - ls) + (ls / SHAPE[3] if loss_type == T.softMaxCrossEntropy else ls / 2) if ls else tt
    (torch_loss(loss_type, yt, ts, 1e-7, 1.0) * 0.7 * torch.from_numpy(wr) * torch.from_numpy(upr)).sum().backward()
    assert_close(values(out[0]), tt.grad if labels_side else yt.grad, "float32", {"float32": Tol(1e-4, 1e-5)})


def test_loss_gradient_reduced_and_across_batch(device) -> None:
    """1x1 incoming gradient: one value per image; with reduce_across_batch the value of image 0
    of entry 0 serves every entry (the only non-constant loss output)."""
    ys, ts = zip(*[inputs(T.meanSquaredError, SHAPE, s) for s in (40, 41)])
    ups = [np.array([3.0, -2.0]).reshape(2, 1, 1, 1), np.array([5.0, 7.0]).reshape(2, 1, 1, 1)]
    for across in (False, True):
        grad = MPSNNLossGradient(device, loss_descriptor=desc(T.meanSquaredError, R.mean, reduce_across_batch=across))
        cb = cbuf(device)
        srcs, yr = zip(*[image(y, device) for y in ys])
        labs = [image(t, device)[0] for t in ts]
        out = grad.encode_batch(cb, [image(u, device)[0] for u in ups], list(srcs), labs)
        finish(cb)
        for e in range(2):
            sg = 3.0 if across else ups[e]
            assert_close(values(out[e]), sg * 2 * (yr[e] - f32(ts[e])), "float32", GRAD_TOL, msg=f"across={across} entry {e}")


def test_loss_gradient_errors_and_channel_offsets(device) -> None:
    y, t = inputs(T.meanSquaredError, (1, 2, 3, 8), 42)
    cb = cbuf(device)
    src, yr = image(y, device)
    lab, _ = image(t[..., :4], device)
    g = MPSNNLossGradient(device, loss_descriptor=desc(T.meanSquaredError, R.none))
    with pytest.raises(mpsnn.MPSValueError, match="compute_label_gradients"):
        g.compute_label_gradients = 1
    with pytest.raises(mpsnn.MPSValueError, match="source_gradients\\[0\\]"):
        g.encode_batch(cb, [image(np.ones((1, 2, 2, 4)), device)[0]], [src], [lab])
    g.secondary_source_feature_channel_offset = 4
    g.destination_feature_channel_offset = 4
    dest, before = poisoned((1, 2, 3, 8), device)
    g.encode_batch(cb, [image(np.ones((1, 2, 3, 4)), device)[0]], [src], [lab], None, None, [dest])
    finish(cb)
    out = values(dest)
    assert np.isnan(out[..., :4]).all()
    assert_close(out[..., 4:], 2 * (yr[..., 4:] - f32(t[..., :4])), "float32", GRAD_TOL)
    g.primary_offset = MPSOffset(1, 0, 0)
    with pytest.raises(mpsnn.MPSValueError, match="keep their defaults"):
        g.encode_batch(cbuf(device), [src], [src], [lab])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_initial_gradient(device, dtype: torch.dtype) -> None:
    k = MPSNNInitialGradient(device)
    cb = cbuf(device)
    src, _ = image(np.random.default_rng(0).normal(size=(1, 3, 4, 5)), device, dtype)
    out = k.encode(cb, src)
    batch = k.encode_batch(cb, [src, src])
    dest, before = poisoned((1, 3, 4, 5), device, dtype=dtype)
    k.clip_rect = mpsnn.MTLRegion(mpsnn.MTLOrigin(1, 1, 0), mpsnn.MTLSize(2, 1, 1))
    k.encode(cb, src, dest)
    finish(cb)
    assert out.dtype == dtype and out.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(values(out), 1.0)
    for b in batch:
        np.testing.assert_array_equal(values(b), 1.0)
    expected = before.copy()
    expected[:, 1:2, 1:3, :] = 1.0
    np.testing.assert_array_equal(values(dest), expected)
