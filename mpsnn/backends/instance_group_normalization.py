"""Group (and instance) normalization over NHWC tensors, forward and gradient (torch, CPU and
CUDA). Instance normalization is the ``groups == C`` case.

Pure functions on ``[N, H, W, C]`` tensors (any strides); channel ``k`` belongs to group
``k // (C / G)``. Statistics and arithmetic are float32 whatever the input dtype (float64 in
gives float64 out); results come back in that compute dtype for the caller to store (one
rounding). No host synchronisation, no branching on values (normalization.md §4-5)::

    per image n, group g (m = (C/G)·H·W elements):
        mu = (1/m) Σ x          var = (1/m) Σ (x − mu)²  (biased)      rstd = 1/sqrt(var + eps)
        y  = (x − mu)·rstd·gamma[k] + beta[k]
    gradient (xhat = (x − mu)·rstd, h = gamma[k]·dy):
        dbeta[n, k]  = Σ_{y,x} dy          dgamma[n, k] = Σ_{y,x} dy·xhat
        dx = rstd · (h − mean_g(h) − xhat · mean_g(h·xhat))

A faster engine can replace these entry points; the signatures below are the contract.
"""
from __future__ import annotations

import torch

__all__ = ["group_normalization_gradient_nhwc", "group_normalization_nhwc", "group_statistics_nhwc", "window_adjoint"]


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _grouped(x: torch.Tensor, groups: int, dt: torch.dtype) -> torch.Tensor:
    """``[N, H, W, C]`` -> ``[N, H·W, G, C/G]`` in ``dt``."""
    n, h, w, c = x.shape
    return x.to(dt).reshape(n, h * w, groups, c // groups)


def group_statistics_nhwc(x: torch.Tensor, groups: int, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, group) mean and ``1/sqrt(biased variance + epsilon)``, each ``[N, G]`` in the
    compute dtype (float32, or float64 for float64 input). Two-pass (the variance is the mean
    of squared deviations, not ``E[x²] − mu²``)."""
    dt = _compute_dtype(x)
    xg = _grouped(x, groups, dt)
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=0)
    rstd = torch.rsqrt(var + float(epsilon))
    return mean, rstd


def group_normalization_nhwc(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, epsilon: float,
                             mean: torch.Tensor | None = None, rstd: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward group normalization.

    Args:
        x: ``[N, H, W, C]`` input (C divisible by ``groups``).
        gamma, beta: ``[C]`` float32 scale and bias (on ``x``'s device).
        groups: G.
        epsilon: the float32 stability term added to the variance.
        mean, rstd: precomputed ``[N, G]`` statistics (else computed from ``x``).

    Returns ``(y, mean, rstd)``: ``y`` ``[N, H, W, C]`` contiguous in the compute dtype, the
    statistics ``[N, G]``.
    """
    dt = _compute_dtype(x)
    if mean is None or rstd is None:
        mean, rstd = group_statistics_nhwc(x, groups, epsilon)
    n, h, w, c = x.shape
    cg = c // groups
    g32 = gamma.to(dt).view(1, groups, cg)
    scale = rstd.to(dt).unsqueeze(-1) * g32                                # [N, G, C/G]
    shift = beta.to(dt).view(1, groups, cg) - mean.to(dt).unsqueeze(-1) * scale
    y = torch.addcmul(shift.reshape(n, 1, 1, c), x.to(dt), scale.reshape(n, 1, 1, c))
    return y, mean, rstd


def group_normalization_gradient_nhwc(dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, groups: int,
                                      mean: torch.Tensor, rstd: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of :func:`group_normalization_nhwc` with the statistics treated as functions of
    ``x`` (exact derivative).

    Args:
        dy: ``[N, H, W, C]`` incoming gradient dL/dy.
        x: ``[N, H, W, C]`` forward input.
        gamma: ``[C]`` scale used by the forward pass.
        groups: G.
        mean, rstd: ``[N, G]`` forward statistics.

    Returns ``(dx, dgamma, dbeta)``: ``dx`` ``[N, H, W, C]`` in the compute dtype; ``dgamma``,
    ``dbeta`` ``[N, C]`` per image (sum over the pixels of that image).
    """
    dt = _compute_dtype(dy, x)
    n, h, w, c = x.shape
    cg = c // groups
    m = float(cg * h * w)
    g = dy.to(dt).reshape(n, h * w, groups, cg)
    mu = mean.to(dt).view(n, 1, groups, 1)
    rs = rstd.to(dt).view(n, 1, groups, 1)
    xhat = (x.to(dt).reshape(n, h * w, groups, cg) - mu) * rs
    dbeta = g.sum(dim=1)                                                    # [N, G, C/G]
    dgamma = (g * xhat).sum(dim=1)
    gam = gamma.to(dt).view(1, groups, cg)
    a = (gam * dbeta).sum(dim=-1) / m                                       # mean_g(h)       [N, G]
    b = (gam * dgamma).sum(dim=-1) / m                                      # mean_g(h·xhat)  [N, G]
    dx = rs * (g * gam.unsqueeze(1) - a.view(n, 1, groups, 1) - xhat * b.view(n, 1, groups, 1))
    return dx.reshape(n, h, w, c), dgamma.reshape(n, c), dbeta.reshape(n, c)


def window_adjoint(dwin: torch.Tensor, height: int, width: int, x0: int, y0: int, clamp: bool) -> torch.Tensor:
    """The adjoint of reading a ``[N, h, w, C]`` window at source origin ``(x0, y0)`` of a
    ``height × width`` image (``mpsnn.core.regions.read_window`` with unit steps).

    Returns ``[N, height, width, C]``: each window value added to the source pixel it was read
    from; off-image reads are dropped (edge mode zero) or added to the nearest edge pixel
    (clamp)."""
    n, h, w, c = dwin.shape
    out = dwin.new_zeros((n, height, width, c))
    if clamp:
        dev = dwin.device
        xi = (torch.arange(w, device=dev) + x0).clamp(0, width - 1)
        yi = (torch.arange(h, device=dev) + y0).clamp(0, height - 1)
        rows = dwin.new_zeros((n, height, w, c)).index_add_(1, yi, dwin)
        return out.index_add_(2, xi, rows)
    xa, xb = max(0, x0), min(width, x0 + w)
    ya, yb = max(0, y0), min(height, y0 + h)
    if xa < xb and ya < yb:
        out[:, ya:yb, xa:xb, :] = dwin[:, ya - y0:yb - y0, xa - x0:xb - x0, :]
    return out
