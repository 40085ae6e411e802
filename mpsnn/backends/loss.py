"""Loss numerics on NHWC tensors (torch, CPU and CUDA): per-element losses, their gradients
with respect to the predictions and the labels, label smoothing, weighting and the
reduction pipeline (spec/loss.md §4, §8-9).

Pure functions; the last axis of every tensor holds the feature channels of one pixel.
Loss types and reduction types are passed as ints (``MPSCNNLossType`` /
``MPSCNNReductionType`` are ``IntEnum``s with these values), so the YOLO loss can call the
per-type math on each channel group. Arithmetic is float32 whatever the input dtype
(float64 in gives float64); no host synchronisation, no branching on tensor values.

======================  =====================================  ==============================  ========================
type (value)            per-element loss l(y, t)               dl/dy                           dl/dt
======================  =====================================  ==============================  ========================
meanAbsoluteError 0     |y - t|                                sign(y - t)  (0 at y = t)       -sign(y - t)
meanSquaredError 1      (y - t)^2                              2 (y - t)                       -2 (y - t)
softMaxCrossEntropy 2   -t_c logsoftmax(y)_c  (over channels)  softmax(y)_c - t_c              -logsoftmax(y)_c
sigmoidCrossEntropy 3   max(y,0) - y t + log(1 + exp(-|y|))    sigmoid(y) - t                  -y
categoricalCE 4         -t log y                               -t / y                          -log y
hinge 5                 max(1 - s y, 0),  s = 2t - 1           -s where 1 - s y > 0, else 0    -2y where 1 - s y > 0
huber 6  (a = y - t)    a^2/2 if |a| <= d else d(|a| - d/2)    a if |a| <= d else d sign(a)    -(dl/dy)
cosineDistance 7        -y t  (the image adds 1: 1 - sum y t)  -t                              -y
log 8                   -t log(y+e) - (1-t) log(1-y+e)         (-2et - t + y + e)/(y(1-y)+e(e+1))  log((1-y+e)/(y+e))
kullbackLeibler 9       t (log t - y),  0 at t = 0             -t                              log t + 1 - y
======================  =====================================  ==============================  ========================

Label smoothing (before the loss and both gradients): softMaxCrossEntropy
``t' = t (1 - ls) + ls / numberOfClasses``; sigmoidCrossEntropy ``t' = t (1 - ls) + ls / 2``;
so ``dl/dt = (1 - ls) dl/dt'`` for those two types.

Reduction of one image (or, with ``reduceAcrossBatch``, the whole batch): ``v = w l``
summed over the region (``sum_weighted``), then :func:`finish_reduction` divides by the
element count (mean; softMaxCrossEntropy counts pixels) or by the number of non-zero
effective weights (sumByNonZeroWeights; 0 when there are none). cosineDistance adds the
scalar ``weight`` (the ``1`` of ``1 - sum y t``, weighted).
"""
from __future__ import annotations

import torch

__all__ = [
    "effective_weights",
    "finish_reduction",
    "loss_elementwise",
    "loss_gradient",
    "loss_label_gradient",
    "nonzero_count",
    "smooth_labels",
    "smoothing_factor",
    "sum_weighted",
]

MAE, MSE, SOFTMAX_CE, SIGMOID_CE, CATEGORICAL_CE, HINGE, HUBER, COSINE, LOG, KL = range(10)
R_NONE, R_SUM, R_MEAN, R_SUM_BY_NONZERO = range(4)


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def smooth_labels(loss_type: int, t: torch.Tensor, label_smoothing: float, number_of_classes: int) -> torch.Tensor:
    """Labels after label smoothing (unchanged for other types or ``label_smoothing == 0``)."""
    t = _compute(t)
    if label_smoothing == 0.0:
        return t
    if loss_type == SOFTMAX_CE:
        return t * (1.0 - label_smoothing) + label_smoothing / number_of_classes
    if loss_type == SIGMOID_CE:
        return t * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return t


def smoothing_factor(loss_type: int, label_smoothing: float) -> float:
    """``dt'/dt``: ``1 - label_smoothing`` for the two smoothing types, else 1."""
    return 1.0 - label_smoothing if loss_type in (SOFTMAX_CE, SIGMOID_CE) else 1.0


def loss_elementwise(loss_type: int, y: torch.Tensor, t: torch.Tensor, epsilon: float = 1e-7, delta: float = 1.0) -> torch.Tensor:
    """Un-weighted per-element loss ``l(y, t)`` of ``loss_type`` (table above); ``t`` already
    smoothed. ``y`` and ``t`` are ``[..., C]`` of one shape; returns float32 (float64)."""
    y, t = _compute(y), _compute(t)
    if loss_type == MAE:
        return (y - t).abs()
    if loss_type == MSE:
        return (y - t).square()
    if loss_type == SOFTMAX_CE:
        return -t * torch.log_softmax(y, dim=-1)
    if loss_type == SIGMOID_CE:
        return y.clamp_min(0) - y * t + torch.log1p(torch.exp(-y.abs()))
    if loss_type == CATEGORICAL_CE:
        return -t * torch.log(y)
    if loss_type == HINGE:
        return (1.0 - (2.0 * t - 1.0) * y).clamp_min(0)
    if loss_type == HUBER:
        a = (y - t).abs()
        return torch.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))
    if loss_type == COSINE:
        return -y * t
    if loss_type == LOG:
        return -t * torch.log(y + epsilon) - (1.0 - t) * torch.log(1.0 - y + epsilon)
    if loss_type == KL:
        return torch.xlogy(t, t) - t * y
    raise ValueError(f"loss_elementwise: unknown loss type {loss_type}")


def loss_gradient(loss_type: int, y: torch.Tensor, t: torch.Tensor, epsilon: float = 1e-7, delta: float = 1.0) -> torch.Tensor:
    """``dl/dy`` of :func:`loss_elementwise` (table above; the CONFLICT readings of spec §8)."""
    y, t = _compute(y), _compute(t)
    if loss_type == MAE:
        return torch.sign(y - t)
    if loss_type == MSE:
        return 2.0 * (y - t)
    if loss_type == SOFTMAX_CE:
        return torch.softmax(y, dim=-1) - t
    if loss_type == SIGMOID_CE:
        return torch.sigmoid(y) - t
    if loss_type == CATEGORICAL_CE:
        return -t / y
    if loss_type == HINGE:
        s = 2.0 * t - 1.0
        return torch.where(1.0 - s * y > 0, -s, torch.zeros_like(s))
    if loss_type == HUBER:
        a = y - t
        return torch.where(a.abs() <= delta, a, delta * torch.sign(a))
    if loss_type in (COSINE, KL):
        return -t
    if loss_type == LOG:
        return (-2.0 * epsilon * t - t + y + epsilon) / (y * (1.0 - y) + epsilon * (epsilon + 1.0))
    raise ValueError(f"loss_gradient: unknown loss type {loss_type}")


def loss_label_gradient(loss_type: int, y: torch.Tensor, t: torch.Tensor, epsilon: float = 1e-7, delta: float = 1.0) -> torch.Tensor:
    """``dl/dt'`` (with respect to the smoothed labels; multiply by :func:`smoothing_factor`)."""
    y, t = _compute(y), _compute(t)
    if loss_type == MAE:
        return -torch.sign(y - t)
    if loss_type == MSE:
        return -2.0 * (y - t)
    if loss_type == SOFTMAX_CE:
        return -torch.log_softmax(y, dim=-1)
    if loss_type == SIGMOID_CE:
        return -y
    if loss_type == CATEGORICAL_CE:
        return -torch.log(y)
    if loss_type == HINGE:
        s = 2.0 * t - 1.0
        return torch.where(1.0 - s * y > 0, -2.0 * y, torch.zeros_like(y))
    if loss_type == HUBER:
        return -loss_gradient(HUBER, y, t, epsilon, delta)
    if loss_type == COSINE:
        return -y
    if loss_type == LOG:
        return torch.log(1.0 - y + epsilon) - torch.log(y + epsilon)
    if loss_type == KL:
        return torch.log(t) + 1.0 - y
    raise ValueError(f"loss_label_gradient: unknown loss type {loss_type}")


def effective_weights(weight: float, weights: torch.Tensor | None) -> torch.Tensor | float:
    """``w_e = weight * W_e`` (a tensor), or the scalar ``weight`` when there is no weights image."""
    if weights is None:
        return weight
    return _compute(weights) * weight


def sum_weighted(values: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """``sum_e w_e l_e`` over every axis but the first: ``[N]`` float32 sums (one per image)."""
    v = values * w
    return v.reshape(v.shape[0], -1).sum(dim=1)


def nonzero_count(w: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Number of non-zero effective weights per image of ``like`` (``[N]``, on the device;
    a scalar ``w`` counts every element while it is non-zero)."""
    n = like.shape[0]
    per_image = like[0].numel() if n else 0
    if isinstance(w, torch.Tensor):
        return (w.expand_as(like) != 0).reshape(n, -1).sum(dim=1).to(_compute(like).dtype)
    return torch.full((n,), float(per_image) if w != 0 else 0.0, dtype=_compute(like).dtype, device=like.device)


def finish_reduction(reduction: int, loss_type: int, total: torch.Tensor, nonzero: torch.Tensor, element_count: int,
                     weight: float, images: int = 1) -> torch.Tensor:
    """The reduced loss from the weighted sum ``total`` (any shape), the non-zero-weight count
    ``nonzero`` (same shape) and the number of elements reduced ``element_count`` (pixels for
    softMaxCrossEntropy). cosineDistance (sum only) gives ``weight * images + total``: each of
    the ``images`` reduced contributes ``weight (1 - sum W y t)``."""
    if loss_type == COSINE:
        return total + weight * images
    if reduction == R_MEAN:
        return total / float(element_count)
    if reduction == R_SUM_BY_NONZERO:
        return torch.where(nonzero > 0, total / nonzero.clamp_min(1), torch.zeros_like(total))
    return total
