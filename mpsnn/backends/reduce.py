"""Reduction numerics in torch (CPU and CUDA) on NHWC tensors.

Pure functions: ``[N, H, W, C]`` tensors in (any real dtype, any view), a new tensor out,
computed in float32 (float64 in, float64 out); the caller stores the result in the
destination's format. No host synchronisation: every choice depends on shapes and Python
parameters only.

* ``reduce_rows``          ``[N, H, W, C] -> [N, H, 1, C]``  (over x)
* ``reduce_columns``       ``[N, H, W, C] -> [N, 1, W, C]``  (over y)
* ``reduce_feature_channels`` ``[N, H, W, C] -> [N, H, W, 1]`` (over c)
* ``reduce_feature_channels_and_weights`` ``P, Q [N, H, W, C] -> [N, H, W, 1]``
* ``local_correlation``    ``A, B [N, H, W, C] -> [N, H, W, (2wx+1)(2wy+1)]``

``op`` is one of ``"min" "max" "sum" "mean" "argmin" "argmax"``. Arg-reductions return the
index (as a float) of the first extreme value along the axis (ties: lowest index); NaN
counts as the extreme (torch's convention, inferred). ``min``/``max`` propagate NaN.
"""
from __future__ import annotations

import torch

__all__ = ["OPS", "local_correlation", "reduce_columns", "reduce_feature_channels",
           "reduce_feature_channels_and_weights", "reduce_rows"]

OPS = ("min", "max", "sum", "mean", "argmin", "argmax")


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _reduce(x: torch.Tensor, dim: int, op: str, weight: float = 1.0) -> torch.Tensor:
    x = _compute(x)
    if op == "min":
        return torch.amin(x, dim=dim, keepdim=True)
    if op == "max":
        return torch.amax(x, dim=dim, keepdim=True)
    if op == "sum":
        return torch.sum(x * weight if weight != 1.0 else x, dim=dim, keepdim=True)
    if op == "mean":
        return torch.mean(x, dim=dim, keepdim=True)
    if op == "argmin":
        return torch.argmin(x, dim=dim, keepdim=True).to(x.dtype)
    if op == "argmax":
        return torch.argmax(x, dim=dim, keepdim=True).to(x.dtype)
    raise ValueError(f"unknown reduction {op!r}")


def reduce_rows(x: torch.Tensor, op: str) -> torch.Tensor:
    """One value per row: ``out[n, y, 0, c] = op_x x[n, y, x, c]``."""
    return _reduce(x, 2, op)


def reduce_columns(x: torch.Tensor, op: str) -> torch.Tensor:
    """One value per column: ``out[n, 0, x, c] = op_y x[n, y, x, c]``."""
    return _reduce(x, 1, op)


def reduce_feature_channels(x: torch.Tensor, op: str, weight: float = 1.0) -> torch.Tensor:
    """One value per pixel: ``out[n, y, x, 0] = op_c x[n, y, x, c]``; ``sum`` multiplies every
    value by ``weight`` before summing."""
    return _reduce(x, 3, op, weight)


def reduce_feature_channels_and_weights(p: torch.Tensor, q: torch.Tensor, mode: str) -> torch.Tensor:
    """Per pixel dot product of data ``p`` and weights ``q`` over channels.

    ``mode``: ``"sum"`` -> ``Σ_c p·q``; ``"mean"`` -> ``Σ_c p·q / C``; ``"nonzero"`` ->
    ``Σ_c p·q / K`` with ``K`` the number of channels where ``q != 0`` (0 where ``K = 0``).
    """
    p, q = _compute(p), _compute(q)
    dot = torch.sum(p * q, dim=3, keepdim=True)
    if mode == "sum":
        return dot
    if mode == "mean":
        return dot / p.shape[3]
    if mode == "nonzero":
        k = torch.count_nonzero(q, dim=3).unsqueeze(3).to(dot.dtype)
        return torch.where(k > 0, dot / k.clamp_min(1.0), torch.zeros_like(dot))
    raise ValueError(f"unknown weighted-reduction mode {mode!r}")


def local_correlation(a: torch.Tensor, b: torch.Tensor, bx0: int, by0: int, window_x: int, window_y: int,
                      stride_x: int, stride_y: int) -> torch.Tensor:
    """``out[n, y, x, f(m, k)] = Σ_z a[n, y, x, z] · b[n, by0 + y + N[k], bx0 + x + M[m], z]`` with
    ``M[m] = (m - window_x)·stride_x``, ``N[k] = (k - window_y)·stride_y`` and
    ``f(m, k) = k·(2·window_x + 1) + m``.

    ``a`` is the primary region ``[N, h, w, C]``; ``b`` the whole secondary image
    ``[N, Hb, Wb, C]`` whose pixel ``(bx0, by0)`` pairs with ``a``'s ``(0, 0)``; reads of ``b``
    outside its image are 0. Result ``[N, h, w, (2·window_x + 1)·(2·window_y + 1)]``."""
    a, b = _compute(a), _compute(b)
    h, w = a.shape[1], a.shape[2]
    hb, wb = b.shape[1], b.shape[2]
    px, py = window_x * stride_x, window_y * stride_y
    left, top = max(0, px - bx0), max(0, py - by0)
    right, bottom = max(0, bx0 + w + px - wb), max(0, by0 + h + py - hb)
    bp = torch.nn.functional.pad(b, (0, 0, left, right, top, bottom))
    outs = []
    for k in range(2 * window_y + 1):
        y0 = by0 + (k - window_y) * stride_y + top
        for m in range(2 * window_x + 1):
            x0 = bx0 + (m - window_x) * stride_x + left
            outs.append(torch.sum(a * bp[:, y0:y0 + h, x0:x0 + w, :], dim=3))
    return torch.stack(outs, dim=3)
