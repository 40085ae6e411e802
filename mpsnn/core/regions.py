"""Reading a window of a source image with the edge rule (images.md §11, kernel-base.md §2.6).

:func:`read_window` is the one place where source coordinates outside the image are turned
into values: ``zero`` reads 0, ``clamp`` reads the nearest in-range pixel. Every kernel that
maps destination pixels to source pixels goes through it, so the edge rule lives once.
"""
from __future__ import annotations

import torch

from .enums import MPSImageEdgeMode
from .errors import value_error


def read_window(
    src: torch.Tensor,
    x0: int,
    y0: int,
    width: int,
    height: int,
    edge_mode: MPSImageEdgeMode,
    step_x: int = 1,
    step_y: int = 1,
    bounds: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Source pixels ``(x0 + i*step_x, y0 + j*step_y)`` for ``i < width``, ``j < height``.

    Args:
        src: ``[N, H, W, C]`` tensor (any view).
        x0, y0: first source coordinate (may be negative or past the image).
        width, height: number of samples along x and y.
        edge_mode: ``zero`` or ``clamp``; others are undefined for CNN kernels and refused.
        step_x, step_y: sampling step (the stride), >= 1.
        bounds: ``(x_lo, x_hi, y_lo, y_hi)`` valid region (default the whole image);
            coordinates outside it count as off the edge.

    Returns ``[N, height, width, C]``; a view of ``src`` when every sample is inside.
    """
    n, h, w, c = src.shape
    xl, xh, yl, yh = bounds if bounds is not None else (0, w, 0, h)
    x_last = x0 + (width - 1) * step_x
    y_last = y0 + (height - 1) * step_y
    if x0 >= xl and x_last < xh and y0 >= yl and y_last < yh:
        return src[:, y0:y_last + 1:step_y, x0:x_last + 1:step_x, :]
    mode = MPSImageEdgeMode(edge_mode)
    dev = src.device
    xs = torch.arange(width, device=dev) * step_x + x0
    ys = torch.arange(height, device=dev) * step_y + y0
    if mode == MPSImageEdgeMode.clamp:
        if xh <= xl or yh <= yl:
            return src.new_zeros((n, height, width, c))
        xi = xs.clamp(xl, xh - 1)
        yi = ys.clamp(yl, yh - 1)
        return src.index_select(1, yi).index_select(2, xi)
    if mode != MPSImageEdgeMode.zero:
        raise value_error("MPSCNNKernel", "edge_mode", mode.name, "be zero or clamp for CNN kernels (mirror, mirrorWithEdge and constant are MPSNNPad's)")
    out = src.new_zeros((n, height, width, c))
    # the in-range samples form a contiguous index range along each axis
    ix = [i for i in range(width) if xl <= x0 + i * step_x < xh]
    iy = [j for j in range(height) if yl <= y0 + j * step_y < yh]
    if ix and iy:
        i0, i1, j0, j1 = ix[0], ix[-1], iy[0], iy[-1]
        sx0, sy0 = x0 + i0 * step_x, y0 + j0 * step_y
        sx1, sy1 = x0 + i1 * step_x, y0 + j1 * step_y
        out[:, j0:j1 + 1, i0:i1 + 1, :] = src[:, sy0:sy1 + 1:step_y, sx0:sx1 + 1:step_x, :]
    return out
