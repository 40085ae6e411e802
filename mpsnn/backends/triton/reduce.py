"""Triton column sum of a row-major ``[M, C]`` matrix in float32: the bias gradient of a
convolution (``db[o] = Σ_{n,y,x} E[n, y, x, o]`` over an NHWC gradient viewed as
``[N·H·W, C]``).

torch's ``sum(0)`` of such a matrix, and the bias gradient ``convolution_backward`` computes
for channels-last tensors, run far below the memory bandwidth for the tall, narrow matrices
of CNN gradients (measured 0.25 ms for ``[802816, 128]`` bfloat16, ~0.8 TB/s, on an H100).
Here every program sums a band of ``rows_per_program`` rows over ``BC`` columns into float32
registers (tiles of ``BM x BC``, rows read as contiguous runs of ``BC`` elements) and writes
one partial row; the partials ``[bands, C]`` are then summed by torch. The result does not
depend on scheduling (no atomics): the same input gives the same bits every time.
"""
from __future__ import annotations

import torch

from .neuron import available, tl, triton

__all__ = ["available", "column_sum"]

if triton is not None:
    @triton.jit
    def _column_sum_kernel(x_ptr, part_ptr, M, C, rows_per_program, BM: tl.constexpr, BC: tl.constexpr):
        pid_c = tl.program_id(0)
        pid_m = tl.program_id(1)
        cols = pid_c * BC + tl.arange(0, BC)
        cmask = cols < C
        m0 = pid_m * rows_per_program
        m1 = tl.minimum(m0 + rows_per_program, M)
        acc = tl.zeros([BM, BC], dtype=tl.float32)
        for m in range(m0, m1, BM):
            rows = m + tl.arange(0, BM)
            mask = (rows[:, None] < m1) & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid_m.to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=cmask)


def _config(m: int, c: int, element_size: int) -> tuple[int, int, int]:
    """(BC, BM, bands): ~256-byte row runs, ~16 KB tiles, about 4 bands per SM in total."""
    bc = min(triton.next_power_of_2(c), max(16, 256 // element_size))
    bm = max(8, min(128, 16384 // (bc * element_size)))
    col_blocks = triton.cdiv(c, bc)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    bands = max(1, min(triton.cdiv(m, bm), (4 * sms + col_blocks - 1) // col_blocks))
    return bc, bm, bands


_configs: dict[tuple[int, int, int, int | None], tuple[int, int, int]] = {}


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0)`` in float32 for a contiguous CUDA ``[M, C]`` float32/float16/bfloat16 matrix."""
    m, c = x.shape
    key = (m, c, x.element_size(), x.device.index)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = _configs[key] = _config(m, c, x.element_size())
    bc, bm, bands = cfg
    rows = triton.cdiv(triton.cdiv(m, bands), bm) * bm
    bands = triton.cdiv(m, rows)
    part = torch.empty((bands, c), dtype=torch.float32, device=x.device)
    _column_sum_kernel[(triton.cdiv(c, bc), bands)](x, part, m, c, rows, BM=bm, BC=bc)
    return part[0] if bands == 1 else part.sum(0)
