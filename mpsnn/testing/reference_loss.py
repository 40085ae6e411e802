"""Float64 NumPy references for the loss family, written from spec/loss.md §4, §8-9.

Same function names as ``mpsnn.backends.loss`` (:func:`smooth_labels`,
:func:`loss_elementwise`, :func:`loss_gradient`, :func:`loss_label_gradient`) but nothing
shared with it: plain NumPy in float64, every formula written out per type, the softmax by an
explicit loop over channels. :func:`batch_loss_reference` is the reference of a whole
(batch) encode: per-entry gradients and the loss values after weighting, reduction and
reduceAcrossBatch. Loss and reduction types are ints (the enums' values).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["batch_loss_reference", "inputs", "loss_elementwise", "loss_gradient", "loss_label_gradient", "smooth_labels", "torch_loss", "weights"]

NAMES = ("meanAbsoluteError", "meanSquaredError", "softMaxCrossEntropy", "sigmoidCrossEntropy", "categoricalCrossEntropy",
         "hinge", "huber", "cosineDistance", "log", "kullbackLeiblerDivergence")


def _f(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _log_softmax(y: np.ndarray) -> np.ndarray:
    c = y.shape[-1]
    m = y[..., 0].copy()
    for k in range(1, c):
        m = np.maximum(m, y[..., k])
    s = np.zeros(y.shape[:-1])
    for k in range(c):
        s += np.exp(y[..., k] - m)
    out = np.empty_like(y)
    for k in range(c):
        out[..., k] = y[..., k] - m - np.log(s)
    return out


def smooth_labels(loss_type: int, t: Any, label_smoothing: float, number_of_classes: int) -> np.ndarray:
    """spec §4: softMaxCE ``t(1-ls) + ls/K``; sigmoidCE ``t(1-ls) + ls/2``; others unchanged."""
    t = _f(t)
    if label_smoothing > 0 and NAMES[loss_type] == "softMaxCrossEntropy":
        return t * (1 - label_smoothing) + label_smoothing / number_of_classes
    if label_smoothing > 0 and NAMES[loss_type] == "sigmoidCrossEntropy":
        return t * (1 - label_smoothing) + label_smoothing / 2
    return t


def loss_elementwise(loss_type: int, y: Any, t: Any, epsilon: float = 1e-7, delta: float = 1.0) -> np.ndarray:
    """Per-element loss of spec §8 (recommended readings: hinge s = 2t-1, standard Huber,
    KL with 0 log 0 = 0; cosine's per-element part ``-y t``)."""
    y, t = _f(y), _f(t)
    name = NAMES[loss_type]
    with np.errstate(all="ignore"):
        if name == "meanAbsoluteError":
            return np.abs(y - t)
        if name == "meanSquaredError":
            return (y - t) ** 2
        if name == "softMaxCrossEntropy":
            return -t * _log_softmax(y)
        if name == "sigmoidCrossEntropy":
            return np.maximum(y, 0) - y * t + np.log(1 + np.exp(-np.abs(y)))
        if name == "categoricalCrossEntropy":
            return -t * np.log(y)
        if name == "hinge":
            return np.maximum(1 - (2 * t - 1) * y, 0)
        if name == "huber":
            a = np.abs(y - t)
            return np.where(a <= delta, 0.5 * a * a, 0.5 * delta * delta + delta * (a - delta))
        if name == "cosineDistance":
            return -y * t
        if name == "log":
            return -t * np.log(y + epsilon) - (1 - t) * np.log(1 - y + epsilon)
        tlogt = np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t)))
        return tlogt - t * y


def loss_gradient(loss_type: int, y: Any, t: Any, epsilon: float = 1e-7, delta: float = 1.0) -> np.ndarray:
    """dl/dy of spec §8 (MAE 0 at y = t; softMaxCE softmax - t; KL -t)."""
    y, t = _f(y), _f(t)
    name = NAMES[loss_type]
    with np.errstate(all="ignore"):
        if name == "meanAbsoluteError":
            d = y - t
            return np.where(d == 0, 0.0, d / np.where(d == 0, 1.0, np.abs(d)))
        if name == "meanSquaredError":
            return 2 * (y - t)
        if name == "softMaxCrossEntropy":
            return np.exp(_log_softmax(y)) - t
        if name == "sigmoidCrossEntropy":
            return 1 / (1 + np.exp(-y)) - t
        if name == "categoricalCrossEntropy":
            return -t / y
        if name == "hinge":
            return np.where(1 + (1 - 2 * t) * y > 0, 1 - 2 * t, 0.0)
        if name == "huber":
            d = y - t
            return np.where(np.abs(d) > delta, delta * np.sign(d), d)
        if name in ("cosineDistance", "kullbackLeiblerDivergence"):
            return -t
        return (-2 * epsilon * t - t + y + epsilon) / (y * (1 - y) + epsilon * (epsilon + 1))


def loss_label_gradient(loss_type: int, y: Any, t: Any, epsilon: float = 1e-7, delta: float = 1.0) -> np.ndarray:
    """dl/dt (with respect to the smoothed labels), differentiated by hand from §8."""
    y, t = _f(y), _f(t)
    name = NAMES[loss_type]
    with np.errstate(all="ignore"):
        if name == "meanAbsoluteError":
            return -loss_gradient(loss_type, y, t)
        if name == "meanSquaredError":
            return 2 * (t - y)
        if name == "softMaxCrossEntropy":
            return -_log_softmax(y)
        if name == "sigmoidCrossEntropy":
            return -y
        if name == "categoricalCrossEntropy":
            return -np.log(y)
        if name == "hinge":
            return np.where(1 - (2 * t - 1) * y > 0, -2 * y, 0.0)
        if name == "huber":
            return -loss_gradient(loss_type, y, t, epsilon, delta)
        if name == "cosineDistance":
            return -y
        if name == "log":
            return -np.log(y + epsilon) + np.log(1 - y + epsilon)
        return np.log(t) + 1 - y


def batch_loss_reference(
    loss_type: int, reduction: int, ys: Sequence[Any], ts: Sequence[Any], ws: Sequence[Any] | None = None, *,
    weight: float = 1.0, label_smoothing: float = 0.0, number_of_classes: int = 1, epsilon: float = 1e-7,
    delta: float = 1.0, reduce_across_batch: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Reference of one batch encode (spec §9). ``ys[k]``, ``ts[k]``, ``ws[k]``: ``[n, H, W, C]``
    (the processed region of entry ``k``). Returns ``(gradients, losses)``: per entry the
    gradient ``w l'`` and the loss -- ``[n, H, W, C]`` per-element ``w l`` for reduction none,
    else ``[n]`` reduced values (with reduceAcrossBatch: the total at entry 0 image 0, zeros
    elsewhere)."""
    grads, losses, sums, counts, elems = [], [], [], [], []
    is_cos = NAMES[loss_type] == "cosineDistance"
    for k, (y, t) in enumerate(zip(ys, ts)):
        y = _f(y)
        t2 = smooth_labels(loss_type, t, label_smoothing, number_of_classes)
        w = weight * (_f(ws[k]) if ws is not None and ws[k] is not None else np.ones_like(y))
        grads.append(w * loss_gradient(loss_type, y, t2, epsilon, delta))
        v = w * loss_elementwise(loss_type, y, t2, epsilon, delta)
        n = y.shape[0]
        per_image_elems = y.shape[1] * y.shape[2] * (1 if NAMES[loss_type] == "softMaxCrossEntropy" else y.shape[3])
        s = np.array([v[i].sum() for i in range(n)])
        c = np.array([float(np.count_nonzero(w[i])) for i in range(n)])
        sums.append(s)
        counts.append(c)
        elems.append(per_image_elems)
        if reduction == 0:
            losses.append(v)
        elif is_cos:
            losses.append(s + weight)
        elif reduction == 1:
            losses.append(s)
        elif reduction == 2:
            losses.append(s / per_image_elems)
        else:
            losses.append(np.where(c > 0, s / np.where(c > 0, c, 1), 0.0))
    if reduce_across_batch and reduction != 0 and ys:
        total = sum(float(s.sum()) for s in sums)
        count = sum(float(c.sum()) for c in counts)
        nimg = sum(len(s) for s in sums)
        if is_cos:
            value = total + weight * nimg
        elif reduction == 1:
            value = total
        elif reduction == 2:
            value = total / sum(e * len(s) for e, s in zip(elems, sums))
        else:
            value = total / count if count > 0 else 0.0
        losses = [np.zeros(len(s)) for s in sums]
        losses[0][0] = value
    return grads, losses


# -- test inputs and the autograd oracle -----------------------------------------------------------


def inputs(loss_type: Any, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels in each type's domain."""
    rng = np.random.default_rng(seed)
    name = NAMES[int(loss_type)]
    if name in ("categoricalCrossEntropy", "log"):
        y = rng.uniform(0.1, 0.9, shape)
    elif name == "kullbackLeiblerDivergence":
        y = rng.uniform(-3.0, -0.1, shape)
    else:
        y = rng.uniform(-2.0, 2.0, shape)
    if name == "hinge":
        t = rng.integers(0, 2, shape).astype(np.float64)
    elif name in ("meanAbsoluteError", "meanSquaredError", "huber", "cosineDistance"):
        t = rng.uniform(-2.0, 2.0, shape)
    elif name == "softMaxCrossEntropy":
        t = rng.uniform(0.0, 1.0, shape)
        t /= t.sum(axis=-1, keepdims=True)
    else:
        t = rng.uniform(0.05, 1.0, shape)
    return y, t


def weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).uniform(0.2, 1.5, shape)
    w.reshape(-1)[::4] = 0.0  # some zero weights (sumByNonZeroWeights)
    return w


def torch_loss(loss_type: Any, y: torch.Tensor, t: torch.Tensor, eps: float, delta: float) -> torch.Tensor:
    """Independent torch formulations of the per-element losses (differentiable)."""
    name = NAMES[int(loss_type)]
    if name == "meanAbsoluteError":
        return (y - t).abs()
    if name == "meanSquaredError":
        return (y - t) ** 2
    if name == "softMaxCrossEntropy":
        return -t * torch.nn.functional.log_softmax(y, dim=-1)
    if name == "sigmoidCrossEntropy":
        return torch.nn.functional.binary_cross_entropy_with_logits(y, t, reduction="none")
    if name == "categoricalCrossEntropy":
        return -t * torch.log(y)
    if name == "hinge":
        return torch.relu(1 - (2 * t - 1) * y)
    if name == "huber":
        return torch.nn.functional.huber_loss(y, t, reduction="none", delta=delta)
    if name == "cosineDistance":
        return -(y * t)
    if name == "log":
        return -t * torch.log(y + eps) - (1 - t) * torch.log(1 - y + eps)
    return t * torch.log(t) - t * y
