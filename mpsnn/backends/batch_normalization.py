"""Batch-normalization numerics on NHWC tensors (torch, CPU and CUDA).

Pure functions; channels are the **last** axis, every other axis (images, rows, columns) is
one population. Arithmetic and every reduction are float32 whatever the input dtype (float64
in gives float64); results are float32 (or float64) for the caller to store. No host
synchronisation, no branching on tensor values: these are the only numerics entry points of
``mpsnn.kernels.batch_normalization``, so a faster engine (Triton, for large contiguous CUDA
tensors) can be slotted in behind the same signatures.

==================================  ==========================================================
function                            math (per channel k; sums over every n, y, x; n = N*H*W)
==================================  ==========================================================
batch_norm_inference_nhwc           y = f(x*scale[k] + shift[k])       (f: fused neuron or id)
batch_norm_statistics_nhwc          mean = Σx/n, variance = Σ(x - mean)²/n   (biased)
batch_norm_gradient_nhwc            xhat = (x - mean)/sigma, sigma = sqrt(variance + eps),
                                    G = dy*f'(xhat*gamma + beta) (dy without a neuron),
                                    dbeta = ΣG, dgamma = ΣG*xhat,
                                    dx = gamma/sigma * (G - dbeta/n - xhat*dgamma/n)
==================================  ==========================================================
"""
from __future__ import annotations

import torch

from ..core.enums import MPSCNNNeuronType
from . import dispatch
from .torch_eager import NeuronParams

__all__ = ["batch_norm_gradient_nhwc", "batch_norm_inference_nhwc", "batch_norm_statistics_nhwc", "merge_statistics"]

_REDUCE = (0, 1, 2)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _engine(*tensors: torch.Tensor):  # type: ignore[no-untyped-def]
    """The Triton batch-norm engine for these NHWC tensors (CUDA, 16/32-bit floats, pixels as
    equally spaced rows of contiguous channels), or None: the torch path below."""
    tri = dispatch.triton_engine("batch_norm", *tensors)
    return tri if tri is not None and all(tri.rows_view(t) is not None for t in tensors) else None


def _engine_gradient(tri, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor, gamma: torch.Tensor,  # type: ignore[no-untyped-def]
                     epsilon: float, totals: tuple[torch.Tensor, torch.Tensor, int] | None, need_dx: bool,
                     constant_statistics: bool, out_dtype: torch.dtype | None = None,
                     out: torch.Tensor | None = None, relu: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`batch_norm_gradient_nhwc` without a fused neuron, or with a fused ReLU
    (``relu`` = ``(γ, β, a)``), on the Triton engine: one read of ``dy`` and ``x`` for the sums
    (dβ = Σ G, dγ = rstd·Σ G·(x − mean), ``G = dy·f'(z)``), one more of both for ``dx``
    (float32)."""
    mean = mean.float()
    rr = None if relu is None else (torch.rsqrt(variance.float() + epsilon), relu[0], relu[1], relu[2])
    if totals is None:
        dgamma, dbeta = tri.gradient_totals(dy, x, mean, variance, epsilon, rr)
        n = x.numel() // x.shape[-1]
    else:
        dgamma, dbeta, n = totals[0].float(), totals[1].float(), totals[2]
    if not need_dx:
        return None, dgamma, dbeta
    rstd = torch.rsqrt(variance.float() + epsilon)
    k = gamma.float() * rstd
    dx = dispatch.engine_out(out, x.shape, out_dtype or torch.float32, x.device, tri.rows_view)
    if constant_statistics:
        tri.apply(dy, dx, k, torch.zeros_like(k))
    else:
        tri.gradient_data(dy, x, dx, mean, k, dbeta / n, rstd * dgamma / n, rr)
    return dx, dgamma, dbeta


def batch_norm_inference_nhwc(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                              neuron: NeuronParams | None = None, out_dtype: torch.dtype | None = None,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = f(x*scale + shift)`` per channel.

    Args:
        x: ``[N, H, W, C]`` (any float dtype, any strides).
        scale, shift: float32 ``[C]``, precomputed by the kernel:
            ``scale = gamma/sqrt(variance + epsilon)``, ``shift = beta - mean*scale``.
        neuron: the fused neuron (PReLU slopes ``[C]``) or None.

    Returns a new contiguous float32 tensor (float64 for float64 input) of ``x``'s shape; the
    Triton engine (CUDA) writes ``out_dtype`` (the destination's dtype: one rounding) where
    given, into ``out`` (the destination region) where it can.
    """
    dt = _compute_dtype(x)
    tri = _engine(x)
    if tri is not None:
        y = dispatch.engine_out(out, x.shape, out_dtype or dt, x.device, tri.rows_view)
        tri.apply(x, y, scale, shift, neuron)
        return y
    y = torch.addcmul(shift.to(dt), x.to(dt), scale.to(dt))
    if neuron is not None:
        dispatch.neuron_forward(y, y, neuron)
    return y


def batch_norm_statistics_nhwc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, variance)`` over ``N*H*W`` (biased variance, divide by n).

    Returns two float32 ``[C]`` tensors (float64 for float64 input); accumulation in float32
    (two-pass: the variance is the mean of squared deviations from the mean)."""
    dt = _compute_dtype(x)
    tri = _engine(x)
    if tri is not None and x.numel() > 0:
        return tri.statistics(x)
    xf = x.to(dt)
    var, mean = torch.var_mean(xf, dim=_REDUCE, correction=0)
    return mean, var


def merge_statistics(count_a: int, mean_a: torch.Tensor, var_a: torch.Tensor,
                     count_b: int, mean_b: torch.Tensor, var_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(mean, variance)`` of the union of two populations of ``count_a`` and
    ``count_b`` values (Chan et al.'s pairwise update; counts are host integers)."""
    n = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / n)
    m2 = var_a * count_a + var_b * count_b + delta * delta * (count_a * count_b / n)
    return mean, m2 / n


def batch_norm_gradient_nhwc(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    gamma: torch.Tensor,
    epsilon: float,
    beta: torch.Tensor | None = None,
    neuron: NeuronParams | None = None,
    *,
    totals: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    need_dx: bool = True,
    constant_statistics: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Training-mode batch-norm gradient: ``(dx, dgamma, dbeta)``.

    Args:
        dy: ``[N, H, W, C]`` incoming gradient dL/dy.
        x: ``[N, H, W, C]`` the forward input.
        mean, variance: float32 ``[C]`` statistics the forward pass normalised with.
        gamma: float32 ``[C]``; beta: float32 ``[C]`` or None (0), only needed with a neuron.
        epsilon: added to the variance.
        neuron: fused neuron (its derivative is taken at the pre-activation
            ``xhat*gamma + beta``), or None.
        totals: ``(dgamma, dbeta, n)`` accumulated over the **whole** batch (several calls
            of this function with ``need_dx=False``); when given, ``dx`` uses them instead of
            this call's sums and they are returned as they are.
        need_dx: False returns ``(None, dgamma, dbeta)`` of this call only (a reduction).
        constant_statistics: the statistics are constants (inference statistics): then
            ``dx = gamma/sigma * G``.
        out_dtype, out: the Triton engine writes ``dx`` in ``out_dtype`` (the destination's
            dtype), into ``out`` (the destination region) where it can.

    Returns float32 tensors (float64 when an input is float64): ``dx`` of ``x``'s shape,
    ``dgamma`` and ``dbeta`` ``[C]``.
    """
    dt = _compute_dtype(dy, x)
    # the engine takes no neuron, or a fused ReLU (any slope) with batch statistics
    relu = (neuron is not None and neuron.neuron_type == MPSCNNNeuronType.reLU and neuron.slopes is None and not constant_statistics)
    tri = _engine(dy, x) if (neuron is None or relu) and dy.shape == x.shape and x.numel() > 0 else None
    if tri is not None:
        rp = None
        if relu:
            assert neuron is not None
            rp = (gamma.float(), torch.zeros_like(gamma, dtype=torch.float32) if beta is None else beta.float(), float(neuron.a))
        return _engine_gradient(tri, dy, x, mean, variance, gamma, epsilon, totals, need_dx, constant_statistics, out_dtype, out, rp)
    xf = x.to(dt)
    inv_sigma = torch.rsqrt(variance.to(dt) + epsilon)
    xhat = (xf - mean.to(dt)) * inv_sigma
    if neuron is not None:
        z = xhat * gamma.to(dt)
        if beta is not None:
            z = z + beta.to(dt)
        g = torch.empty(xhat.shape, dtype=dt, device=xhat.device)
        dispatch.neuron_gradient(dy, z, g, neuron)
    else:
        g = dy.to(dt)
    if totals is None:
        dbeta = g.sum(dim=_REDUCE, dtype=dt)
        dgamma = (g * xhat).sum(dim=_REDUCE, dtype=dt)
        n = xhat.numel() // max(1, xhat.shape[-1])
    else:
        dgamma, dbeta, n = totals[0].to(dt), totals[1].to(dt), totals[2]
    if not need_dx:
        return None, dgamma, dbeta
    k = gamma.to(dt) * inv_sigma
    if constant_statistics:
        dx = g * k
    else:
        dx = k * (g - dbeta / n - xhat * (dgamma / n))
    return dx, dgamma, dbeta
