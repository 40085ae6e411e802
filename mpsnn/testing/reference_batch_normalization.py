"""Float64 NumPy references for batch normalization, written from spec/normalization.md §3.

Same function names as ``mpsnn.backends.batch_normalization`` but nothing shared with it:
plain NumPy, float64, explicit loops over channels, the spec's formulas written out (the
forward from mean/variance/gamma/beta directly, not from a folded scale and shift). Every
learned parameter (gamma, beta, epsilon) is a float32 value in the API, so it is rounded to
float32 first; mean and variance are used as given (float64 batch statistics, or float32
stored ones); the arithmetic is float64.

``neuron`` arguments are None or a tuple ``(type, a, b, c[, slopes])`` for
:func:`mpsnn.testing.reference.neuron_forward` / ``neuron_derivative``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .reference import neuron_derivative, neuron_forward

__all__ = ["batch_norm_gradient_nhwc", "batch_norm_inference_nhwc", "batch_norm_statistics_nhwc"]


def _f32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).astype(np.float64)


def _neuron_args(neuron: Any) -> tuple[Any, float, float, float, Any]:
    t, a, b, c, *rest = neuron
    return t, a, b, c, (rest[0] if rest else None)


def batch_norm_inference_nhwc(x: Any, mean: Any, variance: Any, gamma: Any, beta: Any, epsilon: float, neuron: Any = None) -> np.ndarray:
    """§3.1/3.3: ``Z = (X - mean[k])·gamma[k]/sqrt(variance[k] + epsilon) + beta[k]``,
    ``Y = f(Z)``; channels last."""
    x = np.asarray(x, dtype=np.float64)
    mean, variance, gamma = np.asarray(mean, np.float64), np.asarray(variance, np.float64), _f32(gamma)
    beta = np.zeros_like(gamma) if beta is None else _f32(beta)
    eps = float(np.float32(epsilon))
    z = np.empty_like(x)
    for k in range(x.shape[-1]):
        z[..., k] = (x[..., k] - mean[k]) * gamma[k] / np.sqrt(variance[k] + eps) + beta[k]
    if neuron is None:
        return z
    t, a, b, c, slopes = _neuron_args(neuron)
    return neuron_forward(z, t, a, b, c, slopes)


def batch_norm_statistics_nhwc(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """§3.6: per channel over every pixel of every image, ``mean = ΣX/n`` and the biased
    ``variance = Σ(X - mean)²/n`` (two passes, loops)."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    n = flat.shape[0]
    mean = np.zeros(c)
    var = np.zeros(c)
    for k in range(c):
        s = 0.0
        for v in flat[:, k]:
            s += v
        mean[k] = s / n
        s2 = 0.0
        for v in flat[:, k]:
            s2 += (v - mean[k]) ** 2
        var[k] = s2 / n
    return mean, var


def batch_norm_gradient_nhwc(dy: Any, x: Any, mean: Any, variance: Any, gamma: Any, epsilon: float, beta: Any = None,
                             neuron: Any = None, constant_statistics: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.7: ``(dX, dgamma, dbeta)`` over the whole batch ``x`` (every pixel of every image).

    ``sigma = sqrt(variance + eps)``, ``Xhat = (X - mean)/sigma``, ``G = dY·f'(Z)`` with
    ``Z = Xhat·gamma + beta`` (``G = dY`` without a neuron), ``dbeta = ΣG``,
    ``dgamma = ΣG·Xhat``, ``dX = (gamma/sigma)(G - dbeta/n - Xhat·dgamma/n)``; with
    ``constant_statistics`` ``dX = (gamma/sigma)·G``."""
    g_in = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    mean, variance, gamma = np.asarray(mean, np.float64), np.asarray(variance, np.float64), _f32(gamma)
    beta = np.zeros_like(gamma) if beta is None else _f32(beta)
    eps = float(np.float32(epsilon))
    c = x.shape[-1]
    n = x.size // c
    dx = np.empty_like(x)
    dgamma = np.zeros(c)
    dbeta = np.zeros(c)
    for k in range(c):
        sigma = np.sqrt(variance[k] + eps)
        xhat = (x[..., k] - mean[k]) / sigma
        if neuron is None:
            g = g_in[..., k]
        else:
            t, a, b, cc, slopes = _neuron_args(neuron)
            s = None if slopes is None else np.asarray(slopes, np.float32)[k:k + 1]
            g = g_in[..., k] * neuron_derivative((xhat * gamma[k] + beta[k])[..., None], t, a, b, cc, s)[..., 0]
        dbeta[k] = g.sum()
        dgamma[k] = (g * xhat).sum()
        if constant_statistics:
            dx[..., k] = gamma[k] / sigma * g
        else:
            dx[..., k] = gamma[k] / sigma * (g - dbeta[k] / n - xhat * dgamma[k] / n)
    return dx, dgamma, dbeta
