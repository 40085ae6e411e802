"""Float64 NumPy references for instance and group normalization, written from
spec/normalization.md §4-5.

Same function names as ``mpsnn.backends.instance_group_normalization``
(:func:`group_normalization_nhwc`, :func:`group_normalization_gradient_nhwc`) but nothing
shared with it: explicit loops over images and groups, float64, the spec's formulas written
out (the gradient is the spec's ``dx = (gamma/sigma)(dY − dbeta/n − Xhat·dgamma/n)`` for
instance normalization and ``(1/sigma)(h − mean(h) − Xhat·mean(h·Xhat))`` for groups).
``epsilon`` is rounded to float32 first (the kernels' property is a float).

The coordinate references apply the normalization to the block a windowless kernel reads
(:func:`mpsnn.testing.reference.unary_kernel_reference` with ``fn=...``) and, for the
gradient, scatter the block's gradient back to the source pixels it was read from
(:func:`normalization_gradient_reference`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .reference import _edge, _effective_region, _region, _xyz

__all__ = ["group_normalization_gradient_nhwc", "group_normalization_nhwc", "instance_normalization_nhwc",
           "normalization_gradient_reference"]


def _eps(epsilon: float) -> float:
    return float(np.float32(epsilon))


def _f32_vector(v: Any, c: int, default: float = 0.0) -> np.ndarray:
    if v is None:
        return np.full(c, default)
    return np.asarray(v, dtype=np.float32).astype(np.float64).reshape(-1)


def group_normalization_nhwc(x: Any, gamma: Any, beta: Any, groups: int, epsilon: float) -> np.ndarray:
    """§5 forward: per image and group of ``C/G`` consecutive channels, biased statistics over
    all pixels and channels of the group; ``y = (x − mu)·gamma[k]/sqrt(var + eps) + beta[k]``."""
    x = np.asarray(x, dtype=np.float64)
    n, h, w, c = x.shape
    cg = c // groups
    gam, bet = _f32_vector(gamma, c, 1.0), _f32_vector(beta, c)
    eps = _eps(epsilon)
    out = np.empty_like(x)
    for b in range(n):
        for g in range(groups):
            block = x[b, :, :, g * cg:(g + 1) * cg]
            count = block.size
            mu = block.sum() / count
            var = ((block - mu) ** 2).sum() / count
            sigma = np.sqrt(var + eps)
            for k in range(g * cg, (g + 1) * cg):
                out[b, :, :, k] = (x[b, :, :, k] - mu) * gam[k] / sigma + bet[k]
    return out


def instance_normalization_nhwc(x: Any, gamma: Any, beta: Any, epsilon: float) -> np.ndarray:
    """§4 forward: per image and channel, statistics over the H×W pixels of that channel."""
    x = np.asarray(x, dtype=np.float64)
    n, h, w, c = x.shape
    gam, bet = _f32_vector(gamma, c, 1.0), _f32_vector(beta, c)
    eps = _eps(epsilon)
    out = np.empty_like(x)
    for b in range(n):
        for k in range(c):
            v = x[b, :, :, k]
            mu = v.mean()
            var = ((v - mu) ** 2).mean()
            out[b, :, :, k] = (v - mu) * gam[k] / np.sqrt(var + eps) + bet[k]
    return out


def group_normalization_gradient_nhwc(dy: Any, x: Any, gamma: Any, groups: int, epsilon: float
                                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§4-5 gradients with the statistics recomputed from ``x``: returns ``(dx, dgamma, dbeta)``
    with ``dgamma``/``dbeta`` of shape ``[N, C]`` (per image)."""
    g = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n, h, w, c = x.shape
    cg = c // groups
    gam = _f32_vector(gamma, c, 1.0)
    eps = _eps(epsilon)
    dx = np.empty_like(x)
    dgamma = np.zeros((n, c))
    dbeta = np.zeros((n, c))
    for b in range(n):
        for grp in range(groups):
            ks = range(grp * cg, (grp + 1) * cg)
            block = x[b, :, :, grp * cg:(grp + 1) * cg]
            m = block.size
            mu = block.sum() / m
            sigma = np.sqrt(((block - mu) ** 2).sum() / m + eps)
            xhat = (block - mu) / sigma
            gb = g[b, :, :, grp * cg:(grp + 1) * cg]
            for j, k in enumerate(ks):
                dbeta[b, k] = gb[:, :, j].sum()
                dgamma[b, k] = (gb[:, :, j] * xhat[:, :, j]).sum()
            hh = gb * gam[grp * cg:(grp + 1) * cg]
            mean_h = hh.sum() / m
            mean_hx = (hh * xhat).sum() / m
            dx[b, :, :, grp * cg:(grp + 1) * cg] = (hh - mean_h - xhat * mean_hx) / sigma
    return dx, dgamma, dbeta


def normalization_gradient_reference(
    dy: Any,
    x: Any,
    result: Any,
    *,
    gamma: Any,
    groups: int,
    epsilon: float,
    channels: int,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    dst_c_off: int = 0,
    edge_mode: Any = "zero",
    dest_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the normalization gradient kernels write, from the *forward* kernel's properties.

    The forward pass read block ``B[m, j, i] = x̃(offset + (i, j))`` (edge mode applied) for the
    forward region ``R`` (``clip_rect`` ∩ the forward destination of size ``dest_size``, default
    ``dy``'s), normalized it and wrote it at ``R``. The gradient is the adjoint: the block
    gradient (:func:`group_normalization_gradient_nhwc` on ``dy[R]`` and ``B``) is added to the
    source pixel each block value was read from (clamped reads: the edge pixel; zero-mode
    off-image reads: dropped). Every other pixel of the channel window
    ``[src_c_off, src_c_off + channels)`` gets 0; other channels keep ``result``'s values.

    Returns ``(dx, dgamma, dbeta)``: the new result contents and the per-channel sums over images.
    """
    g = np.asarray(dy, dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    ns, hs, ws, _ = xs.shape
    ox, oy, oz = _xyz(offset)
    (rx, ry, _), _ = _region(clip_rect)
    dshape = (g.shape[0], dest_size[1], dest_size[0], g.shape[3]) if dest_size else g.shape
    x0, x1, y0, y1, _, depth = _effective_region(dshape, ns, oz, clip_rect)
    mode = _edge(edge_mode)
    acc = np.zeros((ns, hs, ws, channels))
    dgam = np.zeros(channels)
    dbet = np.zeros(channels)
    if depth and x1 > x0 and y1 > y0:
        bw, bh = x1 - x0, y1 - y0
        block = np.zeros((depth, bh, bw, channels))
        where: dict[tuple[int, int], tuple[int, int] | None] = {}
        for j in range(bh):
            for i in range(bw):
                sx, sy = ox + (x0 + i - rx), oy + (y0 + j - ry)
                if not (0 <= sx < ws and 0 <= sy < hs):
                    if mode == "zero":
                        where[(j, i)] = None
                        continue
                    sx, sy = min(max(sx, 0), ws - 1), min(max(sy, 0), hs - 1)
                where[(j, i)] = (sy, sx)
                block[:, j, i, :] = xs[oz:oz + depth, sy, sx, src_c_off:src_c_off + channels]
        gb = g[:depth, y0:y1, x0:x1, dst_c_off:dst_c_off + channels]
        dblock, dgamma, dbeta = group_normalization_gradient_nhwc(gb, block, gamma, groups, epsilon)
        dgam, dbet = dgamma.sum(axis=0), dbeta.sum(axis=0)
        for (j, i), src in where.items():
            if src is not None:
                acc[oz:oz + depth, src[0], src[1], :] += dblock[:, j, i, :]
    n_out = min(out.shape[0], ns)
    h_out, w_out = min(out.shape[1], hs), min(out.shape[2], ws)
    out[:n_out, :, :, src_c_off:src_c_off + channels] = 0.0
    out[:n_out, :h_out, :w_out, src_c_off:src_c_off + channels] = acc[:n_out, :h_out, :w_out]
    return out, dgam, dbet
