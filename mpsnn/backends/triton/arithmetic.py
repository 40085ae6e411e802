"""Triton kernel for the training form of the arithmetic kernels' forward pass: the result and
the clamp mask of its gradient state in one pass.

Semantics (``backends/arithmetic.py``'s ``arithmetic_forward`` with ``with_mask``, operation
for operation): both operands are loaded and converted to float32, scaled (``a·ps``, ``b·ss``),
combined (add, subtract, multiply or divide, a compile-time constant), ``bias`` is added, the
mask is ``min < r < max`` (False for NaN), ``r`` is clamped to ``[min, max]`` (NaN stays NaN)
and rounded once to the destination's dtype. Floating-point contraction is off, so
``a·ps + b·ss`` rounds as torch does. Operands, result and mask have one shape (no
broadcasting) and are contiguous; the mask is stored as one byte per element.

Performance: 2-byte operands move 7 bytes per element (two reads, a 2-byte result, a 1-byte
mask), where the torch path moves about 30 (float32 conversions, the float32 result, the
mask's comparisons). One program per ``BLOCK`` contiguous elements; full blocks take an
unmasked path.
"""
from __future__ import annotations

import torch

from .neuron import _block_start, available, tl, triton

__all__ = ["available", "forward_with_mask", "masked_copy"]

OPS = {"add": 0, "subtract": 1, "multiply": 2, "divide": 3}
BLOCK = 4096
WARPS = 8


@triton.jit
def _forward_mask_kernel(x_ptr, y_ptr, out_ptr, mask_ptr, n, ps, ss, bias, lo, hi,
                         OP: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_: tl.constexpr, WIDE: tl.constexpr):
    start = _block_start(BLOCK_, WIDE)
    offs = start + tl.arange(0, BLOCK_)
    full = start + BLOCK_ <= n
    inside = offs < n
    if full:
        a = tl.load(x_ptr + offs).to(tl.float32)
        b = tl.load(y_ptr + offs).to(tl.float32)
    else:
        a = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    a = a * ps
    b = b * ss
    if OP == 0:
        r = a + b
    elif OP == 1:
        r = a - b
    elif OP == 2:
        r = a * b
    else:
        r = tl.math.div_rn(a, b)          # IEEE division, as torch
    if HAS_BIAS:                     # as torch: no addition of a zero bias (-0 + 0 would be +0)
        r = r + bias
    keep = (r > lo) & (r < hi)
    r = tl.where(r < lo, lo, tl.where(r > hi, hi, r))
    if RELU:
        # a ReLU (a = 0) fused after the stored value: it reads the rounded result, and its
        # derivative (1 where that is >= 0) joins the mask
        r = r.to(out_ptr.dtype.element_ty).to(tl.float32)
        pos = r >= 0
        keep = keep & pos
        r = tl.where(pos, r, r * 0.0)
    if full:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty))
        tl.store(mask_ptr + offs, keep.to(tl.uint8))
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=inside)


def forward_with_mask(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, op: str, primary_scale: float, secondary_scale: float,
                      bias: float, minimum: float, maximum: float, relu: bool = False) -> torch.Tensor:
    """Write ``clamp(op(x·ps, y·ss) + bias)`` into ``out`` (contiguous, ``x``'s shape) and
    return the bool clamp mask of the same shape. ``relu``: a ReLU (slope 0) applied to the
    value rounded to ``out``'s dtype, as a separate ReLU filter would read it
    (``v >= 0 ? v : 0·v``), and the mask also False where it is below 0 (or NaN): the mask of
    the pair's gradient ``dy·mask``."""
    n = x.numel()
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if n:
        wide = n + BLOCK >= 2 ** 31
        _forward_mask_kernel[(triton.cdiv(n, BLOCK),)](x, y, out, mask, n, float(primary_scale), float(secondary_scale), float(bias),
                                                      float(minimum), float(maximum), OP=OPS[op], HAS_BIAS=bias != 0.0, RELU=bool(relu), BLOCK_=BLOCK, WIDE=wide,
                                                      num_warps=WARPS, enable_fp_fusion=False)
    return mask.view(torch.bool)


@triton.jit
def _masked_copy_kernel(g_ptr, mask_ptr, out_ptr, n, BLOCK_: tl.constexpr, WIDE: tl.constexpr):
    start = _block_start(BLOCK_, WIDE)
    offs = start + tl.arange(0, BLOCK_)
    inside = offs < n
    if start + BLOCK_ <= n:
        g = tl.load(g_ptr + offs)
        keep = tl.load(mask_ptr + offs) != 0
        tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)))
    else:
        g = tl.load(g_ptr + offs, mask=inside, other=0.0)
        keep = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=inside)


def masked_copy(g: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    """``out = mask ? g : 0`` element by element (``g``, ``out`` contiguous, one dtype; ``mask``
    a contiguous bool tensor of the same shape): an arithmetic gradient with unit scale, in
    the storage dtype (no arithmetic: the values are copied bit for bit)."""
    n = g.numel()
    if n:
        _masked_copy_kernel[(triton.cdiv(n, BLOCK),)](g, mask.view(torch.uint8), out, n, BLOCK_=BLOCK, WIDE=n + BLOCK >= 2 ** 31,
                                                      num_warps=WARPS)
