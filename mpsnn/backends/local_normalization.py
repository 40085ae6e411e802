"""Local-response normalizations in torch (CPU and CUDA) on NHWC tensors: cross-channel
(LRN), spatial and local-contrast normalization, forward and exact gradients
(spec/normalization.md §2).

Pure functions; the kernel classes (``mpsnn/kernels/local_normalization.py``) do the
geometry. Two shapes of input:

* cross-channel works per pixel: ``x`` is ``[N, H, W, C]`` (any strides), the result has
  ``x``'s shape. ``D = C`` is the channel count the window is clipped to.
* spatial and local contrast work on a **tap block**: ``block`` is ``[N, h + kh − 1,
  w + kw − 1, C]``, the source values every window of an ``h × w`` grid of centres reads
  (off-image taps already replaced by the edge rule). Centre ``(j, i)`` reads block rows
  ``j … j + kh − 1`` and columns ``i … i + kw − 1``; its own value is
  ``block[j + kh//2, i + kw//2]`` (windows reach ``floor(k/2)`` before the centre and
  ``floor((k − 1)/2)`` after it). Gradients come back on the block; :func:`fold_block`
  maps them onto the source (the adjoint of the edge rule).

Math (``n = kw·kh``; ``Σ_W`` a window sum; ``N`` the LRN kernel size)::

    cross-channel   L_k = delta + (alpha/N)·Σ_{q∈Q(k)} x_q²,  Q(k) = [k − N//2, k + (N−1)//2] ∩ [0, D)
                    y_k = x_k · L_k^−beta
    spatial         T = delta + (alpha/n)·Σ_W x²,             y = x_c · T^−beta
    local contrast  M = Σ_W x / n,  V = Σ_W x² / n − M²,  T = delta + alpha·V,
                    y = pm + ps·(x_c − p0·M)·T^−beta

Gradients are the exact derivatives of these formulas (the spec's normative reading; the
header formulas are not): with ``G = dL/dy`` and ``spread`` the adjoint of a window sum
(each centre's value added to every tap of its window)::

    cross-channel   dx_k = G_k·L_k^−beta − (2·alpha·beta/N)·x_k·Σ_{r∈R(k)} G_r·x_r·L_r^(−beta−1),
                    R(k) = [k − (N−1)//2, k + N//2] ∩ [0, D)
    spatial         dblock = centre(G·T^−beta) − (2·alpha·beta/n)·block·spread(G·x_c·T^(−beta−1))
    local contrast  g = ps·G;  dT = −beta·g·(x_c − p0·M)·T^(−beta−1);  dM = −p0·g·T^−beta − 2·alpha·M·dT
                    dblock = centre(g·T^−beta) + spread(dM)/n + 2·alpha·block·spread(dT)/n

Arithmetic is float32 whatever the input dtype (float64 in gives float64 out); results come
back in that compute dtype for the caller to store. No host synchronisation, no branching on
tensor values; window sums use torch's pooling on channels-last views (no NCHW copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cross_channel_normalization_gradient_nhwc",
    "cross_channel_normalization_nhwc",
    "fold_block",
    "local_contrast_normalization_gradient_nhwc",
    "local_contrast_normalization_nhwc",
    "spatial_normalization_gradient_nhwc",
    "spatial_normalization_nhwc",
]


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


# -- window sums and their adjoint ------------------------------------------------------------------


def _channel_window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``out_k = Σ_{q = k − before}^{k + after} t_q`` over the last axis (zeros outside)."""
    if before == 0 and after == 0:
        return t
    padded = F.pad(t, (before, after))
    return padded.unfold(-1, before + after + 1, 1).sum(-1)


def _window_mean(block: torch.Tensor, kw: int, kh: int) -> torch.Tensor:
    """``Σ_W block / (kw·kh)`` for every centre: ``[N, Hb, Wb, C] -> [N, Hb−kh+1, Wb−kw+1, C]``."""
    if kw == 1 and kh == 1:
        return block
    return _nhwc(F.avg_pool2d(_nchw(block), (kh, kw), stride=1))


def _spread(g: torch.Tensor, kw: int, kh: int) -> torch.Tensor:
    """Adjoint of the window sum: ``[N, h, w, C] -> [N, h+kh−1, w+kw−1, C]``, each centre's
    value added to every tap of its window (a full correlation with a box of ones)."""
    if kw == 1 and kh == 1:
        return g
    padded = F.pad(_nchw(g), (kw - 1, kw - 1, kh - 1, kh - 1))
    return _nhwc(F.avg_pool2d(padded, (kh, kw), stride=1, divisor_override=1))


def _centre(block: torch.Tensor, kw: int, kh: int) -> torch.Tensor:
    """The centre value of every window of the block."""
    h, w = block.shape[1] - kh + 1, block.shape[2] - kw + 1
    return block[:, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w, :]


def _add_centre(dblock: torch.Tensor, d_centre: torch.Tensor, kw: int, kh: int) -> torch.Tensor:
    """``dblock`` plus ``d_centre`` at the centre positions (in place on ``dblock``)."""
    _centre(dblock, kw, kh).add_(d_centre)
    return dblock


def _check_block(block: torch.Tensor, kw: int, kh: int) -> None:
    if block.dim() != 4 or block.shape[1] < kh or block.shape[2] < kw:
        raise ValueError(f"block of shape {tuple(block.shape)} is smaller than the {kw}x{kh} window")


def fold_block(dblock: torch.Tensor, left: int, top: int, height: int, width: int, clamp: bool) -> torch.Tensor:
    """Adjoint of reading a block with the edge rule: the block's row ``r`` / column ``c``
    read source row ``top + r`` / column ``left + c``. Edge mode zero (``clamp`` False) drops
    off-image positions; clamp adds them into the edge row / column they read. Returns
    ``[N, height, width, C]`` (a view of ``dblock`` when it is exactly the source)."""
    out = dblock
    for dim, first, size in ((1, top, height), (2, left, width)):
        out = _fold_axis(out, first, size, dim, clamp)
    return out


def _fold_axis(t: torch.Tensor, first: int, size: int, dim: int, clamp: bool) -> torch.Tensor:
    length = t.shape[dim]
    lo = min(max(-first, 0), length)            # block positions before the image
    hi = max(min(size - first, length), lo)     # block positions up to the image's end
    if first <= 0 and first + length >= size and not (clamp and (lo > 0 or hi < length)):
        return t.narrow(dim, lo, size)  # the block covers the source; nothing aliases
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    if hi > lo:
        out.narrow(dim, first + lo, hi - lo).copy_(t.narrow(dim, lo, hi - lo))
    if clamp and size > 0:
        if lo > 0:
            out.narrow(dim, 0, 1).add_(t.narrow(dim, 0, lo).sum(dim, keepdim=True))
        if hi < length:
            out.narrow(dim, size - 1, 1).add_(t.narrow(dim, hi, length - hi).sum(dim, keepdim=True))
    return out


# -- cross-channel (LRN) ----------------------------------------------------------------------------


def cross_channel_normalization_nhwc(x: torch.Tensor, kernel_size: int, alpha: float, beta: float, delta: float) -> torch.Tensor:
    """``y_k = x_k · (delta + (alpha/N)·Σ_{q∈Q(k)} x_q²)^−beta`` over the last axis of ``x``
    (``[..., C]``); float32 result (float64 for float64 input)."""
    dt = _compute_dtype(x)
    xf = x.to(dt)
    n = kernel_size
    s = _channel_window_sum(xf * xf, n // 2, (n - 1) // 2)
    return xf * torch.pow(s * (alpha / n) + delta, -beta)


def cross_channel_normalization_gradient_nhwc(dy: torch.Tensor, x: torch.Tensor, kernel_size: int, alpha: float, beta: float,
                                              delta: float) -> torch.Tensor:
    """dL/dx of :func:`cross_channel_normalization_nhwc` for the incoming gradient ``dy``
    (``x``'s shape); float32 result (float64 when either input is float64)."""
    dt = _compute_dtype(dy, x)
    xf, g = x.to(dt), dy.to(dt)
    n = kernel_size
    lv = _channel_window_sum(xf * xf, n // 2, (n - 1) // 2) * (alpha / n) + delta
    lb = torch.pow(lv, -beta)
    inner = _channel_window_sum(g * xf * lb / lv, (n - 1) // 2, n // 2)
    return g * lb - (2.0 * alpha * beta / n) * xf * inner


# -- spatial ------------------------------------------------------------------------------------------


def spatial_normalization_nhwc(block: torch.Tensor, kernel_width: int, kernel_height: int, alpha: float, beta: float,
                               delta: float) -> torch.Tensor:
    """``y = x_c · (delta + (alpha/n)·Σ_W x²)^−beta`` for every window of the tap ``block``:
    ``[N, h+kh−1, w+kw−1, C] -> [N, h, w, C]`` (float32, or float64 for float64 input)."""
    kw, kh = kernel_width, kernel_height
    _check_block(block, kw, kh)
    b = block.to(_compute_dtype(block))
    t = _window_mean(b * b, kw, kh) * alpha + delta
    return _centre(b, kw, kh) * torch.pow(t, -beta)


def spatial_normalization_gradient_nhwc(dy: torch.Tensor, block: torch.Tensor, kernel_width: int, kernel_height: int,
                                        alpha: float, beta: float, delta: float) -> torch.Tensor:
    """dL/dblock of :func:`spatial_normalization_nhwc` for ``dy`` ``[N, h, w, C]``: the
    block's shape (fold it onto the source with :func:`fold_block`)."""
    kw, kh = kernel_width, kernel_height
    _check_block(block, kw, kh)
    dt = _compute_dtype(dy, block)
    b, g = block.to(dt), dy.to(dt)
    t = _window_mean(b * b, kw, kh) * alpha + delta
    tb = torch.pow(t, -beta)
    d_t = g * _centre(b, kw, kh) * tb / t        # dL/dT = −beta · d_t
    dblock = b * _spread(d_t, kw, kh) * (-2.0 * alpha * beta / (kw * kh))
    return _add_centre(dblock, g * tb, kw, kh)


# -- local contrast -----------------------------------------------------------------------------------


def _lcn_statistics(b: torch.Tensor, kw: int, kh: int, alpha: float, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean ``M`` and ``T = delta + alpha·V`` (biased local variance) per window."""
    mean = _window_mean(b, kw, kh)
    var = _window_mean(b * b, kw, kh) - mean * mean
    return mean, var * alpha + delta


def local_contrast_normalization_nhwc(block: torch.Tensor, kernel_width: int, kernel_height: int, alpha: float, beta: float,
                                      delta: float, p0: float, pm: float, ps: float) -> torch.Tensor:
    """``y = pm + ps·(x_c − p0·M)·(delta + alpha·V)^−beta`` for every window of the tap
    ``block`` (``M``, ``V``: window mean and biased variance with divisor ``kw·kh``)."""
    kw, kh = kernel_width, kernel_height
    _check_block(block, kw, kh)
    b = block.to(_compute_dtype(block))
    mean, t = _lcn_statistics(b, kw, kh, alpha, delta)
    return (_centre(b, kw, kh) - mean * p0) * torch.pow(t, -beta) * ps + pm


def local_contrast_normalization_gradient_nhwc(dy: torch.Tensor, block: torch.Tensor, kernel_width: int, kernel_height: int,
                                               alpha: float, beta: float, delta: float, p0: float, pm: float,
                                               ps: float) -> torch.Tensor:
    """dL/dblock of :func:`local_contrast_normalization_nhwc` for ``dy`` ``[N, h, w, C]``
    (``pm`` does not enter the derivative)."""
    kw, kh = kernel_width, kernel_height
    _check_block(block, kw, kh)
    dt = _compute_dtype(dy, block)
    b, g = block.to(dt), dy.to(dt) * ps
    n = kw * kh
    mean, t = _lcn_statistics(b, kw, kh, alpha, delta)
    tb = torch.pow(t, -beta)
    gt = g * tb
    d_t = gt * (_centre(b, kw, kh) - mean * p0) / t * (-beta)
    d_m = gt * (-p0) - d_t * mean * (2.0 * alpha)
    dblock = _spread(d_m, kw, kh) / n + b * _spread(d_t, kw, kh) * (2.0 * alpha / n)
    return _add_centre(dblock, gt, kw, kh)
