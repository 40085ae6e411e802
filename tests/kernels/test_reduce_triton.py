"""The Triton column sum (``mpsnn.backends.triton.reduce``), the convolution bias gradient's
engine for large float32 tensors on CUDA, against a float64 sum of the same values.
``dispatch.column_sum`` (all engines) is tested in ``test_column_sum.py``."""
from __future__ import annotations

import pytest
import torch

from mpsnn.testing.engines import triton_module

tr = triton_module("reduce")
cuda = pytest.mark.skipif(tr is None, reason="no CUDA device with Triton")
SHAPES = [(1, 1), (1, 7), (5, 3), (37, 64), (1000, 5), (4099, 128), (802816 // 16, 128), (12544, 2048), (3, 4100)]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{c}" for m, c in SHAPES])
def test_column_sum_matches_float64(shape: tuple[int, int], dtype: torch.dtype) -> None:
    assert tr is not None
    g = torch.Generator(device="cuda").manual_seed(shape[0] * 31 + shape[1])
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    got = tr.column_sum(x)
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    ref = x.double().sum(0)
    # float32 accumulation of m terms of magnitude ~1: error ~ sqrt(m) * 2^-24 * m at worst
    tol = 1e-6 * shape[0] + 1e-6
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)
    assert torch.equal(tr.column_sum(x), got), "the same input gives the same bits"


@cuda
def test_column_sum_special_values() -> None:
    assert tr is not None
    x = torch.zeros(300, 6, device="cuda")
    x[17, 0] = float("nan")
    x[5, 1] = float("inf")
    x[:, 2] = -0.0
    x[:, 3] = 3.0e38     # float32 accumulation overflows to inf like torch's float32 sum
    got = tr.column_sum(x).cpu()
    assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == 0 and got[3] == float("inf")
    assert torch.equal(got[4:], torch.zeros(2))
