"""``dispatch.column_sum``: the convolution bias gradient ``db[c] = Σ_{n,y,x} e[n, y, x, c]``,
accumulated in float32, written into a given buffer (or added to it) and its choice of engine:
torch's reduction for small or non-contiguous tensors and on the CPU; on CUDA for large
contiguous tensors cuBLAS (a ones-row matrix product with a float32 result) for 16-bit data
and the Triton column sum for float32. Every engine is checked against a float64 sum."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from mpsnn.backends import dispatch
from mpsnn.testing.engines import triton_module

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def data(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def check(got: torch.Tensor, e: torch.Tensor) -> None:
    ref = e.double().sum(tuple(range(e.dim() - 1)))
    m = e.numel() // e.shape[-1]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # float32 accumulation of m terms of magnitude ~1 (16-bit inputs are exact in float32)
    torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=0, atol=1e-6 * m + 1e-5)


@pytest.fixture
def engines(monkeypatch) -> dict[str, int]:
    """Counts the calls of the fast engines (cuBLAS matrix product, Triton column sum)."""
    counts = {"mm": 0, "triton": 0}
    real_mm = dispatch._mm_column_sum

    def mm(*a: Any) -> Any:
        counts["mm"] += 1
        return real_mm(*a)
    monkeypatch.setattr(dispatch, "_mm_column_sum", mm)
    tr = triton_module("reduce")
    if tr is not None:
        real_tr = tr.column_sum

        def tri(x: torch.Tensor) -> torch.Tensor:
            counts["triton"] += 1
            return real_tr(x)
        monkeypatch.setattr(tr, "column_sum", tri)
        monkeypatch.setattr(dispatch, "_triton_reduce", tr)
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("fast", [False, True], ids=["small", "large"])
def test_column_sum_new_into_and_accumulate(device: str, dtype: torch.dtype, fast: bool, engines: dict[str, int], monkeypatch) -> None:
    if fast:
        monkeypatch.setattr(dispatch, "COLUMN_SUM_FAST_MIN", 0)   # every contiguous tensor takes the fast engine
    e = data((3, 5, 7, 24), dtype, device, 1)
    check(dispatch.column_sum(e), e)
    out = torch.full((24,), float("nan"), device=device)
    assert dispatch.column_sum(e, out=out) is out
    check(out, e)
    e2 = data((3, 5, 7, 24), dtype, device, 2)
    assert dispatch.column_sum(e2, out=out, accumulate=True) is out
    check(out, torch.cat([e, e2]))
    again = dispatch.column_sum(e)
    assert torch.equal(again, dispatch.column_sum(e)), "the same input gives the same bits"
    if device == "cpu" or not fast:
        assert engines == {"mm": 0, "triton": 0}, "torch's reduction"
    elif dtype == torch.float32:
        assert engines["mm"] == 0, "float32 never goes through a matrix product (TF32 could round its inputs)"
        assert engines["triton"] > 0 or triton_module("reduce") is None
    else:
        assert engines["mm"] == 5
        assert dispatch._mm_mode in ("out", "new", False)
        if dispatch._mm_mode is False:   # this torch has no mm(out_dtype=): Triton instead
            assert engines["triton"] > 0 or triton_module("reduce") is None


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_tall_inputs(device: str, engines: dict[str, int], monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "COLUMN_SUM_FAST_MIN", 0)
    e = data((2, 6, 6, 16), torch.bfloat16, device, 3)
    view = e[:, 1:5, :, 4:12]                       # a window: torch's reduction
    check(dispatch.column_sum(view), view)
    assert engines == {"mm": 0, "triton": 0}
    tall = data((64, 56, 56, 3), torch.bfloat16, device, 4)   # 200704 rows: long float32 accumulations
    check(dispatch.column_sum(tall), tall)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_small_tensors_stay_on_torch_and_large_ones_do_not(engines: dict[str, int]) -> None:
    small = data((2, 5, 6, 12), torch.bfloat16, "cuda", 5)
    check(dispatch.column_sum(small), small)
    assert engines == {"mm": 0, "triton": 0}
    large = data((8, 32, 32, dispatch.COLUMN_SUM_FAST_MIN // (8 * 32 * 32)), torch.bfloat16, "cuda", 6)
    check(dispatch.column_sum(large), large)
    assert engines["mm"] + engines["triton"] == 1 or (engines["mm"] == 1 and dispatch._mm_mode is False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_special_values_through_the_matrix_product(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "COLUMN_SUM_FAST_MIN", 0)
    e = torch.zeros(300, 6, device="cuda", dtype=torch.bfloat16)
    e[17, 0] = float("nan")
    e[5, 1] = float("inf")
    e[:, 2] = -0.0
    e[:, 3] = 3.0e38     # float32 accumulation overflows to inf like torch's float32 sum
    got = dispatch.column_sum(e.view(1, 1, 300, 6)).cpu()
    assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == 0 and got[3] == float("inf")
    assert torch.equal(got[4:], torch.zeros(2))
