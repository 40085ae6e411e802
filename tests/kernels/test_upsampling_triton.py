"""Triton upsampling engine (``mpsnn.backends.triton.upsampling``) on CUDA against the float64
references of ``mpsnn.testing.reference_upsampling`` (pixel-loop formulas from the spec):
nearest and bilinear (both alignments), forward and gradient, factors 1-4 per axis, one-pixel
and two-pixel sources (where aligned bilinear reads are densest), channel counts around the
block width, strided destinations, and determinism of the gathers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpsnn.testing import reference_upsampling as R
from mpsnn.testing.engines import triton_module

tu = triton_module("upsampling")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(tu is None, reason="no CUDA device with Triton"),
]

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
#: the last is wider and taller than one gradient rectangle (programs that own fewer columns
#: than their tile, several row and column tiles)
SHAPES = [(2, 5, 7, 3), (1, 1, 4, 20), (1, 2, 2, 70), (2, 9, 6, 64), (1, 11, 45, 8)]
FACTORS = [(2, 2), (3, 1), (1, 4), (2, 3)]


def close(got: torch.Tensor, ref: np.ndarray, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.double().cpu(), torch.from_numpy(np.asarray(ref, np.float64)), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sx, sy", FACTORS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_and_gradient(shape: tuple[int, int, int, int], sx: int, sy: int, dtype: torch.dtype) -> None:
    assert tu is not None
    n, h, w, c = shape
    g = torch.Generator(device="cuda").manual_seed(h * 31 + w + sx)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    dy = torch.randn(n, h * sy, w * sx, c, device="cuda", generator=g).to(dtype)
    xs, dys = x.double().cpu().numpy(), dy.double().cpu().numpy()
    y = torch.full((n, h * sy, w * sx, c), float("nan"), device="cuda", dtype=dtype)
    tu.nearest_forward(x, y, sx, sy)
    close(y, R.upsample_nearest_nhwc(xs, sx, sy), dtype)
    d = torch.full_like(x, float("nan"))
    tu.nearest_gradient(dy, d, sx, sy)
    close(d, R.upsample_nearest_gradient_nhwc(dys, sx, sy), dtype)
    for align in (False, True):
        tu.bilinear_forward(x, y, sx, sy, align)
        close(y, R.upsample_bilinear_nhwc(xs, sx, sy, align), dtype)
        tu.bilinear_gradient(dy, d, sx, sy, align)
        close(d, R.upsample_bilinear_gradient_nhwc(dys, sx, sy, align), dtype)
        again = torch.empty_like(d)
        tu.bilinear_gradient(dy, again, sx, sy, align)
        assert torch.equal(d, again), "the same input gives the same bits"


def test_strided_destination_and_channel_window() -> None:
    assert tu is not None
    big = torch.randn(2, 4, 5, 40, device="cuda")
    x = big[:, :, :, 8:24]
    dest = torch.full((2, 10, 12, 30), 3.0, device="cuda")
    out = dest[:, 1:9, 1:11, 4:20]
    tu.bilinear_forward(x, out, 2, 2, True)
    close(out, R.upsample_bilinear_nhwc(x.double().cpu().numpy(), 2, 2, True), torch.float32)
    mask = torch.ones_like(dest, dtype=torch.bool)
    mask[:, 1:9, 1:11, 4:20] = False
    assert (dest[mask] == 3.0).all(), "nothing outside the destination window is written"
