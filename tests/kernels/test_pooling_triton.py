"""Triton pooling engine (``mpsnn.backends.triton.pooling``) on CUDA against a float64
reference written here from spec/pooling.md (taps gathered one by one with torch indexing on
the same device): max / average / L2 forward, max and average gradients, zero and clamp edge
modes, dilation, zero-pad sizes, windows leaving the image on every side, channel windows
and odd channel counts, ties (first maximal tap in scan order), NaN inputs, determinism."""
from __future__ import annotations

import itertools

import pytest
import torch

from mpsnn.testing.engines import triton_module

tp = triton_module("pooling")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(tp is None, reason="no CUDA device with Triton"),
]

F64 = torch.float64


def axis(size: int, k: int, s: int, d: int = 1, offset: int | None = None, out: int | None = None, zero_pad: int = 0):  # type: ignore[no-untyped-def]
    """Centre of window 0 at ``offset`` (default floor(E/2): the valid-only recipe)."""
    assert tp is not None
    e = d * (k - 1) + 1
    centre = e // 2 if offset is None else offset
    if out is None:
        out = max(1, (size - e) // s + 1) if offset is None else max(1, -(-size // s))
    return tp.Axis(size=size, out=out, first=centre - e // 2, stride=s, dilation=d, taps=k, zero_pad=zero_pad)


def taps(x: torch.Tensor, ay, ax, clamp: bool):  # type: ignore[no-untyped-def]
    """Per tap (scan order): (values [N, OH, OW, C] float64, inside mask [OH, OW], source row, source column)."""
    n, h, w, c = x.shape
    j = torch.arange(ay.out, device=x.device)
    i = torch.arange(ax.out, device=x.device)
    res = []
    for ky, kx in itertools.product(range(ay.taps), range(ax.taps)):
        yy = ay.first + ay.stride * j + ay.dilation * ky
        xx = ax.first + ax.stride * i + ax.dilation * kx
        inside = ((yy >= 0) & (yy < h))[:, None] & ((xx >= 0) & (xx < w))[None, :]
        yc, xc = yy.clamp(0, h - 1), xx.clamp(0, w - 1)
        v = x.double()[:, yc][:, :, xc]
        if not clamp:
            v = torch.where(inside[None, :, :, None], v, torch.zeros((), dtype=F64, device=x.device))
        res.append((v, inside, yc[:, None].expand(-1, ax.out), xc[None, :].expand(ay.out, -1)))
    return res


def ref_forward(x, ay, ax, mode: str, clamp: bool):  # type: ignore[no-untyped-def]
    t = taps(x, ay, ax, clamp and mode != "avg")
    vals = torch.stack([v for v, *_ in t])
    if mode == "max":
        m = torch.where(torch.isnan(vals), torch.tensor(-torch.inf, dtype=F64, device=x.device), vals).max(0).values
        return torch.where(torch.isnan(vals).all(0), torch.tensor(torch.nan, dtype=F64, device=x.device), m)
    if mode == "l2":
        return vals.pow(2).sum(0).sqrt()
    s = vals.sum(0)
    if not clamp:
        return s / (ay.taps * ax.taps)
    h, w = x.shape[1:3]
    j = torch.arange(ay.out, device=x.device)
    i = torch.arange(ax.out, device=x.device)
    y0, x0 = ay.first + ay.stride * j, ax.first + ax.stride * i
    y1, x1 = y0 + ay.extent - 1, x0 + ax.extent - 1
    ny = (torch.minimum(y1, torch.tensor(h - 1 + ay.zero_pad)) - torch.maximum(y0, torch.tensor(-ay.zero_pad)) + 1).clamp(min=0)
    nx = (torch.minimum(x1, torch.tensor(w - 1 + ax.zero_pad)) - torch.maximum(x0, torch.tensor(-ax.zero_pad)) + 1).clamp(min=0)
    inside = ((y1 >= 0) & (y0 < h))[:, None] & ((x1 >= 0) & (x0 < w))[None, :]
    cnt = (ny[:, None] * nx[None, :]).double()
    div = torch.where(inside & (cnt > 0), cnt, torch.zeros_like(cnt))
    return torch.where(div[None, :, :, None] > 0, s / div.clamp(min=1)[None, :, :, None], torch.zeros_like(s))


def ref_max_gradient(g, x, ay, ax, clamp: bool):  # type: ignore[no-untyped-def]
    t = taps(x, ay, ax, clamp)
    vals = torch.stack([v for v, *_ in t])
    nan = torch.isnan(vals)
    key = torch.where(nan, torch.tensor(-torch.inf, dtype=F64, device=x.device), vals)
    cand = (key == key.max(0).values) & ~nan
    win = torch.where(cand.any(0), cand.int().argmax(0), -1)   # first maximal number in scan order; none: no gradient
    n, h, w, c = x.shape
    dx = torch.zeros(n, h * w, c, dtype=F64, device=x.device)
    for k, (_, inside, yc, xc) in enumerate(t):
        sel = (win == k)
        if not clamp:
            sel = sel & inside[None, :, :, None]
        pos = (yc * w + xc)[None, :, :, None].expand_as(sel).reshape(n, -1, c)
        dx.scatter_add_(1, pos, torch.where(sel, g.double(), torch.zeros((), dtype=F64, device=x.device)).reshape(n, -1, c))
    return dx.view(n, h, w, c)


def ref_average_gradient(g, shape, ay, ax, clamp: bool):  # type: ignore[no-untyped-def]
    """Autograd of the average reference (independent of the engine's gather arithmetic)."""
    x = torch.zeros(shape, dtype=F64, device=g.device, requires_grad=True)
    ref_forward(x, ay, ax, "avg", clamp).backward(g.double())
    assert x.grad is not None
    return x.grad


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * scale
    torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol, equal_nan=True)


GEOMETRIES = [
    # (H, W, ky, kx, sy, sx, dy, dx, offset_y, offset_x) — offsets None = valid-only windows
    (9, 11, 3, 3, 2, 2, 1, 1, None, None),
    (8, 8, 2, 2, 2, 2, 1, 1, None, None),
    (7, 10, 3, 3, 2, 2, 1, 1, 1, 0),          # windows leave the top/left (and bottom/right)
    (6, 7, 3, 2, 1, 3, 1, 1, 0, 0),
    (10, 9, 2, 3, 3, 2, 2, 3, 1, 2),          # dilated, uneven
    (5, 5, 5, 5, 1, 1, 1, 1, 2, 2),           # 'same' 5x5 stride 1: every window leaves the image
    (4, 6, 3, 3, 4, 5, 1, 1, -1, 7),          # windows entirely off-image on some sides
]


#: every geometry in float32, two in 16-bit formats (each case compiles its own kernels: keep few)
CASES = [(g, torch.float32) for g in GEOMETRIES] + [(GEOMETRIES[0], torch.bfloat16), (GEOMETRIES[2], torch.float16)]


@pytest.mark.parametrize("clamp", [False, True], ids=["zero", "clamp"])
@pytest.mark.parametrize("geom, dtype", CASES)
def test_forward_and_gradients(geom, clamp: bool, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    assert tp is not None
    h, w, ky, kx, sy, sx, dly, dlx, oy, ox = geom
    ay = axis(h, ky, sy, dly, oy, None if oy is None else -(-h // sy), zero_pad=1)
    ax = axis(w, kx, sx, dlx, ox, None if ox is None else -(-w // sx), zero_pad=0)
    g = torch.Generator(device="cuda").manual_seed(h * 100 + w)
    for c in ((3, 130) if geom == GEOMETRIES[0] else (130,)):
        x = torch.randn(2, h, w, c, device="cuda", generator=g).to(dtype)
        for mode, code in (("max", tp.MAX), ("avg", tp.AVERAGE), ("l2", tp.L2)):
            if mode != "max" and (dly, dlx) != (1, 1):
                continue
            out = torch.full((2, ay.out, ax.out, c), float("nan"), device="cuda", dtype=dtype)
            tp.pool_forward(x, out, ay, ax, code, clamp)
            close(out, ref_forward(x, ay, ax, mode, clamp), dtype)
        dy = torch.randn(2, ay.out, ax.out, c, device="cuda", generator=g).to(dtype)
        dx = torch.full_like(x, float("nan"))
        if tp.gradient_supported(ay, ax, clamp):
            tp.pool_max_gradient(dy, x, dx, ay, ax, clamp)
            close(dx, ref_max_gradient(dy, x, ay, ax, clamp), dtype, 2.0)
        else:   # clamp with dilated taps or windows off the image: the torch path's job
            assert clamp and ((dly, dlx) != (1, 1) or oy == -1 or (h, w) == (4, 6))
            with pytest.raises(ValueError):
                tp.pool_max_gradient(dy, x, dx, ay, ax, clamp)
        if (dly, dlx) == (1, 1):
            dx.fill_(float("nan"))
            tp.pool_average_gradient(dy, dx, ay, ax, clamp)
            close(dx, ref_average_gradient(dy, tuple(x.shape), ay, ax, clamp), dtype, 2.0)


@pytest.mark.parametrize("clamp", [False, True], ids=["zero", "clamp"])
def test_ties_go_to_the_first_tap_and_results_repeat(clamp: bool) -> None:
    assert tp is not None
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randint(-2, 3, (2, 9, 9, 16), device="cuda", generator=g).float()   # many ties
    ay, ax = axis(9, 3, 2, offset=0, out=5), axis(9, 3, 2, offset=1, out=5)
    dy = torch.randn(2, 5, 5, 16, device="cuda", generator=g)
    dx = torch.empty_like(x)
    tp.pool_max_gradient(dy, x, dx, ay, ax, clamp)
    close(dx, ref_max_gradient(dy, x, ay, ax, clamp), torch.float32)
    again = torch.empty_like(x)
    tp.pool_max_gradient(dy, x, again, ay, ax, clamp)
    assert torch.equal(dx, again), "the same input gives the same bits"


def test_nan_is_ignored_unless_every_tap_is_nan() -> None:
    assert tp is not None
    x = torch.zeros(1, 4, 4, 2, device="cuda") - 1.0
    x[0, 0, 0, 0] = float("nan")
    x[0, 2:4, 2:4, 1] = float("nan")
    ay = ax = axis(4, 2, 2)
    out = torch.empty(1, 2, 2, 2, device="cuda")
    tp.pool_forward(x, out, ay, ax, tp.MAX, False)
    assert out[0, 0, 0, 0] == -1.0, "a NaN tap loses against -1"
    assert torch.isnan(out[0, 1, 1, 1]), "a window of NaNs gives NaN"
    dy = torch.ones(1, 2, 2, 2, device="cuda")
    dx = torch.empty_like(x)
    tp.pool_max_gradient(dy, x, dx, ay, ax, False)
    assert dx[0, 2:4, 2:4, 1].eq(0).all(), "a window of NaNs passes no gradient"
    assert dx[0, 0:2, 0:2, 0].sum() == 1 and dx[0, 0, 0, 0] == 0, "the NaN tap gets nothing"
    x[0, 0:2, 2:4, 0] = float("-inf")
    x[0, 0, 3, 0] = float("nan")
    tp.pool_max_gradient(dy, x, dx, ay, ax, False)
    assert dx[0, 0, 2, 0] == 1, "all numbers -inf: the first number tap wins"


def test_channel_windows_and_strided_destinations() -> None:
    assert tp is not None
    g = torch.Generator(device="cuda").manual_seed(4)
    big = torch.randn(2, 10, 10, 40, device="cuda", generator=g)
    x = big[:, :, :, 8:32]                       # a channel window of a wider image
    ay = ax = axis(10, 3, 2)
    dest = torch.full((2, 8, 8, 50), 7.0, device="cuda")
    out = dest[:, 2:2 + ay.out, 1:1 + ax.out, 10:34]
    tp.pool_forward(x, out, ay, ax, tp.MAX, False)
    close(out, ref_forward(x, ay, ax, "max", False), torch.float32)
    mask = torch.ones_like(dest, dtype=torch.bool)
    mask[:, 2:2 + ay.out, 1:1 + ax.out, 10:34] = False
    assert (dest[mask] == 7.0).all(), "nothing outside the destination window is written"
