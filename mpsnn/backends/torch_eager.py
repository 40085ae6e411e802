"""Neuron forward and derivative in torch (CPU and CUDA), computed in float32 or better.

Inputs are real-valued tensors (any dtype); results are float32 (float64 in, float64 out).
Edge conventions (neurons.md §5-6): ReLU/PReLU/ELU take the ``x >= 0`` branch at 0;
HardSigmoid's derivative is ``a`` where ``0 <= a*x+b <= 1`` (both edges inclusive); ReLUN's
derivative is 0 where the clamp is active (``p >= b``); Absolute's derivative is ``sign(x)``
(0 at 0); GeLU uses the exact erf form and its exact derivative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.enums import MPSCNNNeuronType as T

_INV_SQRT2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class NeuronParams:
    """What the numerics need to know about a neuron."""

    neuron_type: T
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    slopes: torch.Tensor | None = None  # PReLU: one float32 slope per processed channel


def _log(c: float) -> float:
    """Natural log of a scalar base with IEEE semantics (-inf at 0, NaN below)."""
    return math.log(c) if c > 0 else (-math.inf if c == 0 else math.nan)


def _pow(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """IEEE ``pow`` with a scalar exponent. ``torch.pow(t, 0.5)`` is rewritten to ``sqrt``
    (NaN at -inf where IEEE pow gives +inf); a 0-d tensor exponent, made on the device
    without a host round trip, keeps the IEEE semantics."""
    return torch.pow(base, base.new_full((), exponent))


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def neuron_forward(x: torch.Tensor, p: NeuronParams) -> torch.Tensor:
    """f(x) for every element; channels are the last axis (for PReLU)."""
    x = _compute_dtype(x)
    t, a, b, c = p.neuron_type, p.a, p.b, p.c
    if t == T.none:
        return x.clone()
    if t == T.reLU:
        return torch.where(x >= 0, x, a * x)
    if t == T.linear:
        return a * x + b
    if t == T.sigmoid:
        return torch.sigmoid(x)
    if t == T.hardSigmoid:
        return (a * x + b).clamp(0.0, 1.0)
    if t == T.tanH:
        return a * torch.tanh(b * x)
    if t == T.absolute:
        return x.abs()
    if t == T.softPlus:
        return a * F.softplus(b * x)
    if t == T.softSign:
        return x / (1.0 + x.abs())
    if t == T.ELU:
        return torch.where(x >= 0, x, a * torch.expm1(x))
    if t == T.pReLU:
        s = p.slopes.to(x.dtype)  # type: ignore[union-attr]
        return torch.where(x >= 0, x, s * x)
    if t == T.reLUN:
        return torch.clamp_max(torch.where(x >= 0, x, a * x), b)
    if t == T.power:
        return _pow(a * x + b, c)
    if t == T.exponential:
        return torch.exp(a * x + b) if c == -1.0 else torch.pow(c, a * x + b)
    if t == T.logarithm:
        return torch.log(a * x + b) if c == -1.0 else torch.log(a * x + b) / _log(c)
    if t == T.geLU:
        return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT2))
    raise ValueError(f"unknown neuron type {t!r}")


def neuron_derivative(x: torch.Tensor, p: NeuronParams) -> torch.Tensor:
    """f'(x) for every element."""
    x = _compute_dtype(x)
    t, a, b, c = p.neuron_type, p.a, p.b, p.c
    one = torch.ones_like(x)
    if t == T.none:
        return one
    if t == T.reLU:
        return torch.where(x >= 0, one, a * one)
    if t == T.linear:
        return a * one
    if t == T.sigmoid:
        s = torch.sigmoid(x)
        return s * (1.0 - s)
    if t == T.hardSigmoid:
        u = a * x + b
        return torch.where((u >= 0) & (u <= 1), a * one, 0.0 * one)
    if t == T.tanH:
        th = torch.tanh(b * x)
        return a * b * (1.0 - th * th)
    if t == T.absolute:
        return torch.sign(x)
    if t == T.softPlus:
        return a * b * torch.sigmoid(b * x)
    if t == T.softSign:
        d = 1.0 + x.abs()
        return 1.0 / (d * d)
    if t == T.ELU:
        return torch.where(x < 0, a * torch.exp(x), one)
    if t == T.pReLU:
        s = p.slopes.to(x.dtype)  # type: ignore[union-attr]
        return torch.where(x >= 0, one, s * one)
    if t == T.reLUN:
        pos = torch.where(x >= 0, x, a * x)
        return torch.where(pos >= b, 0.0 * one, torch.where(x >= 0, one, a * one))
    if t == T.power:
        return a * c * _pow(a * x + b, c - 1.0)
    if t == T.exponential:
        if c == -1.0:
            return a * torch.exp(a * x + b)
        return a * _log(c) * torch.pow(c, a * x + b)
    if t == T.logarithm:
        if c == -1.0:
            return a / (a * x + b)
        return a / (_log(c) * (a * x + b))
    if t == T.geLU:
        return 0.5 * (1.0 + torch.erf(x * _INV_SQRT2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    raise ValueError(f"unknown neuron type {t!r}")
