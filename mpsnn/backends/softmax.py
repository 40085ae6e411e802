"""Softmax and log-softmax over the channels of NHWC tensors, and their gradients (torch,
CPU and CUDA).

Pure functions on tensors whose **last** axis holds the feature channels of one pixel
(softmax.md §2-5); every other axis (images, rows, columns) is independent. Arithmetic is
float32 whatever the input dtype (float64 in gives float64 out); results are float32 (or
float64) for the caller to store. No host synchronisation, no branching on values.

=================  ==============================================  =========================================
function           forward  (x -> y)                               gradient (g = dL/dy, y = forward result)
=================  ==============================================  =========================================
softmax            y_k = exp(x_k - m) / sum_j exp(x_j - m)         dx_k = y_k * (g_k - sum_j g_j * y_j)
log-softmax        y_k = x_k - m - log sum_j exp(x_j - m)          dx_k = g_k - exp(y_k) * sum_j g_j
=================  ==============================================  =========================================

with ``m = max_j x_j`` (overflow-safe; torch's softmax kernels subtract the maximum).
A later Triton engine can replace these entry points for large contiguous CUDA tensors: the
signatures below are the contract.
"""
from __future__ import annotations

import torch

from . import dispatch

__all__ = ["softmax_gradient_nhwc", "softmax_nhwc"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softmax_nhwc(x: torch.Tensor, log: bool, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax (``log=False``) or log-softmax (``log=True``) over the last axis of ``x``.

    Args:
        x: ``[..., C]`` real tensor (any float dtype, any strides).
        log: compute the natural log of the softmax.

    Returns a new float32 tensor (float64 for float64 input) of ``x``'s shape; on CUDA the
    Triton engine (``mpsnn.backends.triton.softmax``) computes it and writes ``out_dtype``
    (the destination's dtype: one rounding) where given.
    """
    dt = _compute_dtype(x)
    tri = dispatch.triton_engine("softmax", x)
    if tri is not None and tri.rows_view(x) is not None and 0 < x.shape[-1] <= tri.MAX_CHANNELS:
        y = dispatch.engine_out(out, x.shape, out_dtype or dt, x.device, tri.rows_view)
        tri.softmax_forward(x, y, log)
        return y
    return torch.log_softmax(x, dim=-1, dtype=dt) if log else torch.softmax(x, dim=-1, dtype=dt)


def softmax_gradient_nhwc(dy: torch.Tensor, y: torch.Tensor, log: bool, out_dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx of softmax (``log=False``) or log-softmax (``log=True``) over the last axis.

    Args:
        dy: ``[..., C]`` incoming gradient dL/dy.
        y: ``[..., C]`` the forward **result** (softmax probabilities, or log-probabilities).
        log: which forward ``y`` came from.

    Returns a new float32 tensor (float64 when either input is float64).
    """
    dt = torch.float64 if torch.float64 in (dy.dtype, y.dtype) else torch.float32
    tri = dispatch.triton_engine("softmax", dy, y)
    if (tri is not None and dy.shape == y.shape and tri.rows_view(dy) is not None and tri.rows_view(y) is not None
            and 0 < dy.shape[-1] <= tri.MAX_CHANNELS):
        dx = dispatch.engine_out(out, dy.shape, out_dtype or dt, dy.device, tri.rows_view)
        tri.softmax_gradient(dy, y, dx, log)
        return dx
    g = dy.to(dt)
    s = y.to(dt)
    if log:
        return g - torch.exp(s) * g.sum(dim=-1, keepdim=True)
    return s * (g - (g * s).sum(dim=-1, keepdim=True))
