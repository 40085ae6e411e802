"""Triton multi-tensor optimizer updates: SGD (plain, momentum, Nesterov), RMSProp, Adam and
AMSGrad over any number of float32 tensors in ONE launch (plus one tiny launch that advances
the Adam step counts).

Each update is an *entry*: the pointers of its operands (value, gradient, result, up to three
optimizer-state operands, Adam's device step count), its element count and its scalars
(learning rate, betas / momentum / decay, epsilon, the step offset, the pre-processing
constants). :func:`launch` packs the entries into two device tables, splits every entry into
``BLOCK``-element pieces (a third table maps each program to its entry and start), and runs
:func:`_update_kernel` over all pieces. The tables are cached by their contents, so a steady
training loop uploads nothing and a captured CUDA graph replays the same tables.

Math per element (float32; ``g`` pre-processed first, spec/optimizers.md §5-8)::

    g = clamp(g, clip_min, clip_max) if CLIP ;  g = g * rescale
    g += reg_scale * sign(v)  (REG 1)  |  g += reg_scale * v  (REG 2)
    KIND 0  sgd           r = v - lr*g
    KIND 1  momentum      m = mu*m + lr*g ;  r = v - m
    KIND 2  nesterov      m = mu*m + g ;     r = v - lr*(g + mu*m)
    KIND 3  rmsprop       s = d*s + (1-d)*g^2 ;  r = v - lr*g/(sqrt(s) + eps)
    KIND 4  adam          t = step + offset ; lr_t = lr*sqrt(1 - b2^t)/(1 - b1^t)
                          m = b1*m + (1-b1)*g ; q = b2*q + (1-b2)*g^2 ; r = v - lr_t*m/(sqrt(q) + eps)
    KIND 5  amsgrad       as 4 with x = max(x, q) ; r = v - lr_t*m/(sqrt(x) + eps)

``step`` is the optimizer's device step count BEFORE the launch; ``offset`` (1, 2, ...) is the
entry's position among that optimizer's updates in the launch; :func:`launch` then adds each
optimizer's number of updates to its step count (the ``_bump_kernel``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .neuron import available, tl, triton

__all__ = ["BLOCK", "Entry", "KINDS", "available", "launch"]

#: elements per program, warps per program
BLOCK = 1024
WARPS = 4
#: KIND codes of :func:`_update_kernel`
KINDS = {"sgd": 0, "momentum": 1, "nesterov": 2, "rmsprop": 3, "adam": 4, "amsgrad": 5}

# float-table columns
_LR, _A, _B, _EPS, _OFF, _CMIN, _CMAX, _RESCALE, _REG, _LOG2_B1, _LOG2_B2 = range(11)
_NF = 12
# pointer-table columns: value, gradient, result, s1, s2, s3, step, numel
_NP = 8

if triton is not None:

    @triton.jit
    def _operand(row, j: tl.constexpr):
        """Operand ``j`` of a pointer-table row: every operand is 16-byte aligned (checked by
        :func:`usable`), so the loads vectorise."""
        return tl.multiple_of(tl.load(row + j), 16).to(tl.pointer_type(tl.float32))

    @triton.jit
    def _update_kernel(ptr_tab, f_tab, blk_tab, KIND: tl.constexpr, CLIP: tl.constexpr, REG: tl.constexpr,
                       BLOCK_: tl.constexpr):
        pid = tl.program_id(0)
        e = tl.load(blk_tab + 2 * pid).to(tl.int64)
        start = tl.multiple_of(tl.load(blk_tab + 2 * pid + 1), BLOCK_)
        row = ptr_tab + e * 8
        fr = f_tab + e * 12
        n = tl.load(row + 7)
        offs = start + tl.arange(0, BLOCK_)
        mask = offs < n
        vp = _operand(row, 0)
        gp = _operand(row, 1)
        rp = _operand(row, 2)
        lr = tl.load(fr + 0)
        v = tl.load(vp + offs, mask=mask, other=0.0)
        g = tl.load(gp + offs, mask=mask, other=0.0)
        if CLIP:
            g = tl.minimum(tl.maximum(g, tl.load(fr + 5)), tl.load(fr + 6))
        g = g * tl.load(fr + 7)
        if REG == 1:
            sgn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
            g = g + tl.load(fr + 8) * sgn
        if REG == 2:
            g = g + tl.load(fr + 8) * v
        if KIND == 0:
            r = v - lr * g
        else:
            s1p = _operand(row, 3)
            s1 = tl.load(s1p + offs, mask=mask, other=0.0)
            a = tl.load(fr + 1)
            if KIND == 1:
                s1 = a * s1 + lr * g
                r = v - s1
            elif KIND == 2:
                s1 = a * s1 + g
                r = v - lr * (g + a * s1)
            elif KIND == 3:
                s1 = a * s1 + (1.0 - a) * (g * g)
                r = v - lr * g / (tl.sqrt(s1) + tl.load(fr + 3))
            else:
                b = tl.load(fr + 2)
                stp = tl.load(row + 6).to(tl.pointer_type(tl.float32))
                # bias corrections in float64: 1 - beta^t cancels (beta2 = 0.999 at t = 1 keeps
                # three digits), so float32 exp2's last-bit error would show in lr_t
                t = (tl.load(stp) + tl.load(fr + 4)).to(tl.float64)
                c2 = 1.0 - tl.exp2(t * tl.load(fr + 10).to(tl.float64))
                c1 = 1.0 - tl.exp2(t * tl.load(fr + 9).to(tl.float64))
                lr_t = (lr.to(tl.float64) * tl.sqrt(c2) / c1).to(tl.float32)
                s2p = _operand(row, 4)
                s2 = tl.load(s2p + offs, mask=mask, other=0.0)
                s1 = a * s1 + (1.0 - a) * g
                s2 = b * s2 + (1.0 - b) * (g * g)
                if KIND == 5:
                    s3p = _operand(row, 5)
                    s3 = tl.maximum(tl.load(s3p + offs, mask=mask, other=0.0), s2)
                    tl.store(s3p + offs, s3, mask=mask)
                    den = tl.sqrt(s3) + tl.load(fr + 3)
                else:
                    den = tl.sqrt(s2) + tl.load(fr + 3)
                tl.store(s2p + offs, s2, mask=mask)
                r = v - lr_t * (s1 / den)
            tl.store(s1p + offs, s1, mask=mask)
        tl.store(rp + offs, r, mask=mask)

    @triton.jit
    def _bump_kernel(step_tab, count_tab):
        i = tl.program_id(0)
        p = tl.load(step_tab + i).to(tl.pointer_type(tl.float32))
        tl.store(p, tl.load(p) + tl.load(count_tab + i))


@dataclass
class Entry:
    """One tensor's update: its operands (contiguous float32 tensors of equal size; ``s1`` ..
    ``s3`` the optimizer-state operands the KIND uses, else None), Adam's device step tensor
    (0-d float32) and the entry's scalars."""

    value: torch.Tensor
    gradient: torch.Tensor
    result: torch.Tensor
    s1: torch.Tensor | None
    s2: torch.Tensor | None
    s3: torch.Tensor | None
    step: torch.Tensor | None
    lr: float
    a: float = 0.0          # momentum scale / decay / beta1
    b: float = 0.0          # beta2
    eps: float = 0.0
    offset: int = 0         # Adam: position among its optimizer's updates in this launch (1, 2, ...)
    clip_min: float = -math.inf
    clip_max: float = math.inf
    rescale: float = 1.0
    reg_scale: float = 0.0


def usable(t: torch.Tensor) -> bool:
    """Can the engine address ``t`` (a contiguous, 16-byte aligned float32 tensor; the
    dispatcher checks the device)?"""
    return t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 16 == 0


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else -math.inf


#: (kind, entries' key) -> (ptr table, float table, block table, step table, count table, pinned host copies)
_cache: dict[tuple, tuple] = {}
_CACHE_LIMIT = 64


def _tables(entries: Sequence[Entry], device: torch.device) -> tuple:
    ptrs = np.zeros((len(entries), _NP), dtype=np.int64)
    fl = np.zeros((len(entries), _NF), dtype=np.float32)
    nblocks = []
    for i, e in enumerate(entries):
        n = e.value.numel()
        ptrs[i] = (e.value.data_ptr(), e.gradient.data_ptr(), e.result.data_ptr(),
                   0 if e.s1 is None else e.s1.data_ptr(), 0 if e.s2 is None else e.s2.data_ptr(),
                   0 if e.s3 is None else e.s3.data_ptr(), 0 if e.step is None else e.step.data_ptr(), n)
        fl[i, [_LR, _A, _B, _EPS, _OFF, _CMIN, _CMAX, _RESCALE, _REG, _LOG2_B1, _LOG2_B2]] = (
            e.lr, e.a, e.b, e.eps, e.offset, e.clip_min, e.clip_max, e.rescale, e.reg_scale, _log2(e.a), _log2(e.b))
        nblocks.append((n + BLOCK - 1) // BLOCK)
    counts = np.asarray(nblocks, dtype=np.int64)
    owner = np.repeat(np.arange(len(entries), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * BLOCK
    blk = np.stack([owner, start], axis=1).reshape(-1)
    steps: dict[int, int] = {}              # step tensor -> its optimizer's encodes in this launch
    for e in entries:
        if e.step is not None:
            steps[e.step.data_ptr()] = max(steps.get(e.step.data_ptr(), 0), e.offset)
    parts: list[np.ndarray] = [ptrs.reshape(-1), fl.reshape(-1), blk, np.asarray(list(steps), dtype=np.int64),
             np.asarray(list(steps.values()), dtype=np.float32)]
    # one upload for the five tables (one copy node in a captured graph): back to back in one
    # byte buffer, each starting 8-byte aligned, viewed with its dtype on the device
    offsets, size = [], 0
    for a in parts:
        offsets.append(size)
        size += (a.nbytes + 7) // 8 * 8
    buf = np.zeros(max(size, 8), dtype=np.uint8)
    for a, o in zip(parts, offsets):
        buf[o:o + a.nbytes] = a.view(np.uint8)
    host = torch.from_numpy(buf)
    if device.type == "cuda":
        host = host.pin_memory()
    whole = host.to(device, non_blocking=True)
    dev = [whole[o:o + a.nbytes].view(torch.int64 if a.dtype == np.int64 else torch.float32) for a, o in zip(parts, offsets)]
    return (*dev, len(blk) // 2, len(steps), host)


def launch(kind: str, entries: Sequence[Entry], clip: bool, regularization: int) -> None:
    """Update every entry in one launch of ``_update_kernel`` (and advance each Adam step
    tensor by its optimizer's number of encodes, the largest offset of its entries, in one
    launch of ``_bump_kernel``)."""
    if not entries:
        return
    device = entries[0].value.device
    key = (kind, clip, regularization, tuple(
        (e.value.data_ptr(), e.gradient.data_ptr(), e.result.data_ptr(), 0 if e.s1 is None else e.s1.data_ptr(),
         0 if e.s2 is None else e.s2.data_ptr(), 0 if e.s3 is None else e.s3.data_ptr(), 0 if e.step is None else e.step.data_ptr(),
         e.value.numel(), e.lr, e.a, e.b, e.eps, e.offset, e.clip_min, e.clip_max, e.rescale, e.reg_scale) for e in entries))
    tabs = _cache.get(key)
    if tabs is None:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.pop(next(iter(_cache)))
        tabs = _cache[key] = _tables(entries, device)
    ptr_t, f_t, blk_t, step_t, count_t, nprog, nsteps, _host = tabs
    _update_kernel[(nprog,)](ptr_t, f_t, blk_t, KIND=KINDS[kind], CLIP=clip, REG=regularization, BLOCK_=BLOCK, num_warps=WARPS)
    if kind in ("adam", "amsgrad") and nsteps:
        _bump_kernel[(nsteps,)](step_t, count_t)
