"""Reshape and pad numerics in torch (CPU and CUDA) on NHWC tensors.

Pure functions, no host synchronisation. Index plans (which source index every result row,
column and channel reads) are computed on the host from integers by the kernel module and
passed in as Python lists; ``-1`` marks "outside the source: use the fill value".

* :func:`reshape_nhwc` ``[N, H, W, C] -> [N, H', W', C']`` in NHWC flatten order.
* :func:`gather_padded` ``[N, H, W, C] -> [N, len(iy), len(ix), len(ic)]``.
* :func:`scatter_padded` the adjoint of :func:`gather_padded` (fill positions dropped).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["gather_padded", "reshape_nhwc", "scatter_padded"]


def reshape_nhwc(x: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    """Each image flattened in ``(y, x, c)`` order (channel fastest) and refilled into
    ``height x width x channels`` in the same order."""
    return x.reshape(x.shape[0], height, width, channels)


def _plan(idx: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(index tensor with -1 replaced by 0, validity mask or None when every index is valid)."""
    if all(i >= 0 for i in idx):
        return torch.tensor(list(idx), dtype=torch.long, device=device), None
    mask = torch.tensor([i >= 0 for i in idx], dtype=torch.bool, device=device)
    return torch.tensor([max(i, 0) for i in idx], dtype=torch.long, device=device), mask


def _contiguous_range(idx: Sequence[int]) -> tuple[int, int] | None:
    if idx and all(i >= 0 for i in idx) and list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return idx[0], idx[0] + len(idx)
    return None


def _take(x: torch.Tensor, dim: int, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    r = _contiguous_range(idx)
    if r is not None:
        return x.narrow(dim, r[0], r[1] - r[0]), None
    t, mask = _plan(idx, x.device)
    return x.index_select(dim, t), mask


def gather_padded(x: torch.Tensor, iy: Sequence[int], ix: Sequence[int], ic: Sequence[int], fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``out[n, j, i, k] = x[n, iy[j], ix[i], ic[k]]``, or ``fill`` (a scalar or a ``[len(ic)]``
    tensor indexed by ``k``) where any of the three indices is -1. Keeps ``x``'s dtype."""
    out, my = _take(x, 1, iy)
    out, mx = _take(out, 2, ix)
    out, mc = _take(out, 3, ic)
    mask = None
    for m, shape in ((my, (1, -1, 1, 1)), (mx, (1, 1, -1, 1)), (mc, (1, 1, 1, -1))):
        if m is not None:
            m = m.view(shape)
            mask = m if mask is None else mask & m
    if mask is None:
        return out
    if isinstance(fill, torch.Tensor):
        f = fill.to(device=out.device, dtype=out.dtype).view(1, 1, 1, -1)
    else:
        f = torch.full((), float(fill), dtype=out.dtype, device=out.device)
    return torch.where(mask, out, f)


def _scatter(g: torch.Tensor, dim: int, idx: Sequence[int], size: int) -> torch.Tensor:
    r = _contiguous_range(idx)
    shape = list(g.shape)
    shape[dim] = size
    if r is not None and r == (0, size):
        return g
    out = g.new_zeros(shape)
    if r is not None:
        out.narrow(dim, r[0], r[1] - r[0]).copy_(g)
        return out
    keep = [k for k, i in enumerate(idx) if i >= 0]
    if not keep:
        return out
    src = g.index_select(dim, torch.tensor(keep, dtype=torch.long, device=g.device))
    dst = torch.tensor([idx[k] for k in keep], dtype=torch.long, device=g.device)
    return out.index_add_(dim, dst, src)


def scatter_padded(g: torch.Tensor, iy: Sequence[int], ix: Sequence[int], ic: Sequence[int], height: int, width: int, channels: int) -> torch.Tensor:
    """Adjoint of :func:`gather_padded`: ``[N, height, width, channels]`` where every source
    position receives the sum of the ``g`` entries that read it (fill entries dropped).
    Accumulates in float32 (float64 for float64 ``g``)."""
    g = g if g.dtype == torch.float64 else g.float()
    out = _scatter(g, 1, iy, height)
    out = _scatter(out, 2, ix, width)
    return _scatter(out, 3, ic, channels)
