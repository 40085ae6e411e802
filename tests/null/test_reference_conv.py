"""Validation of the float64 convolution reference (mpsnn/testing/reference_conv.py), device-free.

Every oracle here is built from PyTorch float64 (conv2d, conv_transpose2d, autograd, matmul,
batch_norm, avg_pool2d) or from explicit NumPy, using the equivalence recipes of
convolution.md (§1 PyTorch recipe, §12.2 transpose recipe) — never from the reference
itself. Random data everywhere; gradients use a random upstream gradient (never ``.sum()``).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpsnn.testing import reference_conv as R
from mpsnn.testing.tolerances import Tol, assert_close

F64 = "float64"
LEAK = float(np.float32(0.1))  # neuron parameters are float32 (reference.neuron_forward rounds them)
#: quantization round trip, relative to the channel's range: half a code step, 1/510
QUANT_TOL = {"float64": Tol(0.0, 1.0 / 510 + 1e-12)}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- torch helpers ---------------------------------------------------------------------------


def tt(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=grad)


def nchw(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return tt(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))), grad)


def nhwc(y: torch.Tensor) -> np.ndarray:
    return y.detach().permute(0, 2, 3, 1).numpy()


def oihw(w: np.ndarray, grad: bool = False) -> torch.Tensor:
    return tt(np.ascontiguousarray(np.transpose(w, (0, 3, 1, 2))), grad)


def out_size(n: int, k: int, s: int, d: int, p: int) -> int:
    """PyTorch / §1 output size ``floor((n + 2P − kd)/s) + 1``."""
    return (n + 2 * p - ((k - 1) * d + 1)) // s + 1


def torch_conv_at(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, offset, out_hw, stride, dilation, groups=1, mode="zero"):
    """conv2d whose output ``(i, j)`` has its first tap at ``offset − (kd >> 1) + s·(i, j)`` for
    any offset (zero or replicate padding, then a crop): an independent rendering of §1."""
    (sx, sy), (dx, dy) = stride, dilation
    kh, kw = w.shape[2:]
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    ho, wo = out_hw
    hs, ws = x.shape[2:]
    ox, oy = offset[0] - (kwd >> 1), offset[1] - (khd >> 1)
    pl, pt = max(0, -ox), max(0, -oy)
    pr, pb = max(0, ox + sx * (wo - 1) + kwd - ws), max(0, oy + sy * (ho - 1) + khd - hs)
    xp = F.pad(x, (pl, pr, pt, pb), mode="replicate" if mode == "clamp" else "constant")
    xp = xp[:, :, oy + pt:, ox + pl:]
    return F.conv2d(xp, w, b, stride=(sy, sx), dilation=(dy, dx), groups=groups)[:, :, :ho, :wo]


# -- 1. forward vs conv2d (§1 PyTorch equivalence recipe) --------------------------------------


def _forward_cases():
    cases = []
    gs, ps = itertools.cycle([1, 2, 4]), itertools.cycle([0, 1, 2, 1])
    for kw, s, d in itertools.product(range(1, 6), range(1, 4), range(1, 3)):
        kh = (kw % 5) + 1 if s != 2 else kw  # square and rectangular (incl. even) kernels
        cases.append((kw, kh, s, (s % 3) + 1, d, 3 - d, next(gs), next(ps), next(ps)))
    return cases


@pytest.mark.parametrize("kw,kh,sx,sy,dx,dy,g,px,py", _forward_cases())
def test_forward_matches_conv2d(kw, kh, sx, sy, dx, dy, g, px, py):
    r = rng(kw * 1000 + kh * 100 + sx * 10 + dx + g)
    n, hs, ws, cin_g, cout_g = 2, 9, 8, 2, 3
    cin, cout = cin_g * g, cout_g * g
    x = r.standard_normal((n, hs, ws, cin + 3))  # src_c_off = 2 and one spare channel
    w = r.standard_normal((cout, kh, kw, cin_g))
    b = r.standard_normal(cout)
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    hd, wd = out_size(hs, kh, sy, dy, py), out_size(ws, kw, sx, dx, px)
    assert hd > 0 and wd > 0
    dest = r.standard_normal((n, hd, wd, cout + 3))
    got = R.convolution_forward(x, w, b, dest=dest, offset=((kwd >> 1) - px, (khd >> 1) - py, 0), stride=(sx, sy), dilation=(dx, dy),
                                groups=g, src_c_off=2, dst_c_off=1)
    ref = F.conv2d(nchw(x[..., 2:2 + cin]), oihw(w), tt(b), stride=(sy, sx), padding=(py, px), dilation=(dy, dx), groups=g)
    assert_close(got[..., 1:1 + cout], nhwc(ref), F64, msg="conv2d")
    assert_close(got[..., :1], dest[..., :1], F64, msg="channels below dst_c_off untouched")
    assert_close(got[..., 1 + cout:], dest[..., 1 + cout:], F64, msg="channels above the window untouched")


def test_forward_recipe_example_values():
    """A 1x3 kernel on a 1x4 row, zero padding 1 (offset 0): hand-computed cross-correlation."""
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 4, 1)
    w = np.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1)
    got = R.convolution_forward(x, w, dest_shape=(1, 1, 4, 1), offset=(0, 0, 0))
    # window of output i reads x[i-1], x[i], x[i+1] with weights 1, 10, 100 (no flip)
    assert got[0, 0, :, 0].tolist() == [210.0, 321.0, 432.0, 43.0]
    even = R.convolution_forward(x, np.array([1.0, 10.0]).reshape(1, 1, 2, 1), dest_shape=(1, 1, 4, 1))
    # kW = 2 reads cx-1, cx (kernel-base.md §2.2)
    assert even[0, 0, :, 0].tolist() == [10.0, 21.0, 32.0, 43.0]


@pytest.mark.parametrize("clip,offset", [
    (((1, 2, 1), (3, 2, 1)), (2, 1, 1)),
    (((0, 0, 0), (5, 4, 2)), (-1, 3, 0)),
    (((-1, 1, 0), (4, 9, 9)), (0, 0, 1)),  # clip partly outside the destination
])
def test_forward_clip_rect_and_batch(clip, offset):
    r = rng(7)
    x = r.standard_normal((3, 6, 7, 5))
    w = r.standard_normal((4, 3, 2, 5))
    b = r.standard_normal(4)
    dest = r.standard_normal((2, 5, 6, 4))
    st, dl = (2, 1), (1, 2)
    got = R.convolution_forward(x, w, b, dest=dest, offset=offset, clip_rect=clip, stride=st, dilation=dl)
    (rx, ry, rz), (cw, ch, cd) = clip
    x0, x1, y0, y1 = max(rx, 0), min(rx + cw, 6), max(ry, 0), min(ry + ch, 5)
    z1 = min(rz + cd, 2, rz + 3 - offset[2])
    full = nhwc(torch_conv_at(nchw(x), oihw(w), tt(b), offset=offset, out_hw=(y1 - ry, x1 - rx), stride=st, dilation=dl))
    expect = dest.copy()
    for nd in range(rz, z1):
        expect[nd, y0:y1, x0:x1] = full[offset[2] + nd - rz, y0 - ry:, x0 - rx:]
    assert_close(got, expect, F64)
    assert not np.allclose(got, dest)


def test_forward_edge_clamp_matches_replicate_pad():
    r = rng(11)
    x = r.standard_normal((2, 5, 6, 3))
    for (kw, kh), p in [((3, 3), 1), ((5, 4), 2), ((2, 3), 1)]:
        w = r.standard_normal((4, kh, kw, 3))
        xr = F.pad(nchw(x), (p, p, p, p), mode="replicate")
        ref = nhwc(F.conv2d(xr, oihw(w)))
        got = R.convolution_forward(x, w, dest_shape=ref.shape, offset=((kw >> 1) - p, (kh >> 1) - p, 0), edge_mode="clamp")
        assert_close(got, ref, F64, msg=f"clamp k={kw}x{kh}")
        zero = R.convolution_forward(x, w, dest_shape=ref.shape, offset=((kw >> 1) - p, (kh >> 1) - p, 0), edge_mode="zero")
        assert not np.allclose(zero, ref)


def test_depthwise_matches_grouped_conv2d():
    r = rng(3)
    c = 6
    x = r.standard_normal((2, 7, 6, c))
    for (kw, kh), (sx, sy), (dx, dy), p in [((3, 3), (1, 1), (1, 1), 1), ((4, 2), (2, 1), (1, 2), 2), ((5, 3), (3, 2), (1, 2), 1)]:
        w = r.standard_normal((c, kh, kw))
        b = r.standard_normal(c)
        ref = nhwc(F.conv2d(nchw(x), tt(w[:, None]), tt(b), stride=(sy, sx), padding=p, dilation=(dy, dx), groups=c))
        kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
        got = R.convolution_forward(x, w, b, dest_shape=ref.shape, offset=((kwd >> 1) - p, (khd >> 1) - p, 0), stride=(sx, sy),
                                    dilation=(dx, dy), depthwise=True)
        assert_close(got, ref, F64)


# -- 2. sub-pixel (§4.3) ---------------------------------------------------------------------


def depth_to_space_dcr(io: np.ndarray, r: int) -> np.ndarray:
    """TensorFlow depth_to_space NHWC (DCR): channel = (r·(y mod r) + (x mod r))·Nr + c."""
    n, h, w, ch = io.shape
    nr = ch // (r * r)
    return io.reshape(n, h, w, r, r, nr).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, nr)


@pytest.mark.parametrize("r_,hd,wd", [(2, 6, 5), (3, 7, 9), (2, 4, 4)])
def test_sub_pixel_is_depth_to_space(r_, hd, wd):
    rg = rng(r_ * 100 + wd)
    nr = 2
    cout = nr * r_ * r_
    x = rg.standard_normal((2, 5, 4, 3))
    w = rg.standard_normal((cout, 3, 2, 3))
    b = rg.standard_normal(cout)
    hi, wi = math.ceil(hd / r_), math.ceil(wd / r_)
    off = (1, 0, 0)
    io = nhwc(torch_conv_at(nchw(x), oihw(w), tt(b), offset=off, out_hw=(hi, wi), stride=(1, 1), dilation=(1, 1)))
    dest = rg.standard_normal((2, hd, wd, nr + 1))
    got = R.convolution_forward(x, w, b, dest=dest, offset=off, sub_pixel_scale=r_, dst_c_off=1)
    assert_close(got[..., 1:], depth_to_space_dcr(io, r_)[:, :hd, :wd], F64)
    assert_close(got[..., :1], dest[..., :1], F64)
    shuffled = nhwc(F.pixel_shuffle(torch.tensor(io).permute(0, 3, 1, 2), r_))[:, :hd, :wd]
    assert not np.allclose(got[..., 1:], shuffled), "MPS order must differ from PyTorch pixel_shuffle"


def test_sub_pixel_with_clip_rect_and_stride():
    rg = rng(5)
    r_, nr = 2, 3
    x = rg.standard_normal((1, 8, 9, 4))
    w = rg.standard_normal((nr * 4, 3, 3, 4))
    dest = rg.standard_normal((1, 7, 8, nr))
    clip, off = ((3, 1, 0), (5, 5, 1)), (2, 1, 0)
    got = R.convolution_forward(x, w, dest=dest, offset=off, clip_rect=clip, stride=(2, 2), sub_pixel_scale=r_)
    io = nhwc(torch_conv_at(nchw(x), oihw(w), None, offset=off, out_hw=(3, 3), stride=(2, 2), dilation=(1, 1)))
    expect = dest.copy()
    expect[:, 1:6, 3:8] = depth_to_space_dcr(io, r_)[:, :5, :5]
    assert_close(got, expect, F64)


# -- 3. convolution gradient (§11.3) vs autograd ----------------------------------------------


GRAD_CASES = [
    # kw, kh, stride, dilation, groups, offset, out_hw, depthwise
    (3, 3, (1, 1), (1, 1), 1, (1, 1, 0), (7, 6), False),
    (3, 3, (2, 2), (1, 1), 1, (0, 0, 1), (4, 3), False),
    (2, 4, (2, 1), (2, 1), 2, (1, 2, 0), (5, 4), False),
    (4, 2, (1, 2), (2, 2), 4, (3, -1, 1), (3, 4), False),
    (5, 3, (3, 2), (1, 2), 1, (-2, 2, 0), (4, 3), False),
    (1, 1, (2, 3), (1, 1), 2, (1, 0, 0), (3, 3), False),
    (3, 2, (2, 1), (2, 1), 1, (0, 1, 1), (4, 6), True),
]


@pytest.mark.parametrize("kw,kh,st,dl,g,off,out_hw,dw_", GRAD_CASES)
def test_convolution_gradient_matches_autograd(kw, kh, st, dl, g, off, out_hw, dw_):
    r = rng(kw * 31 + kh * 7 + g)
    cin = 4
    cout = cin if dw_ else 8
    src = r.standard_normal((3, 7, 6, cin + 2))  # src_c_off = 1, one spare channel
    w = r.standard_normal((cout, kh, kw) if dw_ else (cout, kh, kw, cin // g))
    ho, wo = out_hw
    e = r.standard_normal((2, ho, wo, cout))
    x = nchw(src[..., 1:1 + cin], grad=True)
    wt = tt(w[:, None], grad=True) if dw_ else oihw(w, grad=True)
    b = tt(np.zeros(cout), grad=True)
    y = torch_conv_at(x[off[2]:off[2] + 2], wt, b, offset=off, out_hw=out_hw, stride=st, dilation=dl, groups=cin if dw_ else g)
    y.backward(nchw(e))
    ds, dwt, db = R.convolution_gradient(e, src, w, offset=off, stride=st, dilation=dl, groups=1 if dw_ else g, depthwise=dw_, src_c_off=1)
    assert ds.shape == (3, 7, 6, cin)
    assert_close(ds, nhwc(x.grad), F64, msg="dS")
    assert_close(dwt, wt.grad.numpy()[:, 0] if dw_ else wt.grad.permute(0, 2, 3, 1).numpy(), F64, msg="dW")
    assert_close(db, b.grad.numpy(), F64, msg="db")
    ds_only, none_w, _ = R.convolution_gradient(e, None, w, offset=off, stride=st, dilation=dl, groups=1 if dw_ else g, depthwise=dw_,
                                                src_shape=(3, 7, 6))
    assert none_w is None
    assert_close(ds_only, ds, F64)


def test_convolution_gradient_clamp_edge():
    """Clamp: dW/db are the autograd of the replicate-padded forward; dS drops off-image
    taps (§11.3), i.e. equals the zero-padding adjoint."""
    r = rng(21)
    src = r.standard_normal((2, 5, 6, 3))
    w = r.standard_normal((4, 3, 4, 3))
    e = r.standard_normal((2, 5, 6, 4))
    kw = dict(offset=(1, 1, 0), out_hw=(5, 6), stride=(1, 1), dilation=(1, 1))
    grads = {}
    for mode in ("clamp", "zero"):
        x, wt = nchw(src, grad=True), oihw(w, grad=True)
        torch_conv_at(x, wt, None, mode=mode, **kw).backward(nchw(e))
        grads[mode] = (nhwc(x.grad), wt.grad.permute(0, 2, 3, 1).numpy())
    ds, dwt, _ = R.convolution_gradient(e, src, w, offset=(1, 1, 0), edge_mode="clamp")
    assert_close(dwt, grads["clamp"][1], F64, msg="dW clamp")
    assert_close(ds, grads["zero"][0], F64, msg="dS drops off-image taps")
    assert not np.allclose(grads["clamp"][1], grads["zero"][1])


def test_convolution_gradient_finite_differences():
    """Second oracle for dW under clamp (where autograd needs the replicate emulation)."""
    r = rng(8)
    src = r.standard_normal((1, 4, 5, 2))
    w = r.standard_normal((3, 2, 3, 2))
    e = r.standard_normal((1, 3, 3, 3))
    args = dict(offset=(0, 1, 0), stride=(2, 1), dilation=(1, 2), edge_mode="clamp")
    _, dwt, _ = R.convolution_gradient(e, src, w, **args)
    h = 1e-6
    fd = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        wp, wm = w.copy(), w.copy()
        wp[idx] += h
        wm[idx] -= h
        fp = R.convolution_forward(src, wp, dest_shape=e.shape, **args)
        fm = R.convolution_forward(src, wm, dest_shape=e.shape, **args)
        fd[idx] = np.sum(e * (fp - fm)) / (2 * h)
    assert_close(dwt, fd, F64, overrides={"float64": Tol(1e-7, 1e-7)}, msg="finite differences")


# -- 4. transpose (§12.2, §13.2) ---------------------------------------------------------------


def _transpose_cases():
    cases = []
    for k, s, d, p, op in itertools.product(range(1, 5), range(1, 4), range(1, 3), range(3), range(2)):
        if op >= max(s, d):  # PyTorch: output_padding < stride or dilation
            continue
        if (4 - 1) * s - 2 * p + (k - 1) * d + 1 + op <= 0:
            continue
        cases.append((k, s, d, p, op))
    return cases


TRANSPOSE_CASES = _transpose_cases()


def test_transpose_matches_conv_transpose2d():
    r = rng(99)
    n, hs, ws, cin, cout = 1, 3, 4, 3, 2
    assert len(TRANSPOSE_CASES) > 80
    for idx, (k, s, d, p, op) in enumerate(TRANSPOSE_CASES):
        ky, sy, dy, py = (k % 4) + 1, (s % 3) + 1, 3 - d, (p + 1) % 3  # a different y axis
        opy = idx % 2 if max(sy, dy) > 1 else 0
        if (hs - 1) * sy - 2 * py + (ky - 1) * dy + 1 + opy <= 0:
            py = 0
        x = r.standard_normal((n, hs, ws, cin))
        w = r.standard_normal((cout, ky, k, cin))
        b = r.standard_normal(cout)
        wt, kofs = R.torch_conv_transpose_equivalent(w, (p, py), (k, ky), (d, dy))
        ref = F.conv_transpose2d(nchw(x), tt(wt), tt(b), stride=(sy, s), padding=(py, p), output_padding=(opy, op), dilation=(dy, d))
        hd, wd = ref.shape[2:]
        assert wd == (ws - 1) * s - 2 * p + (k - 1) * d + 1 + op
        got = R.convolution_transpose_forward(x, w, b, dest_shape=(n, hd, wd, cout), kernel_offset=kofs, stride=(s, sy), dilation=(d, dy))
        assert_close(got, nhwc(ref), F64, msg=f"k={k}x{ky} s={s},{sy} d={d},{dy} P={p},{py} op={op},{opy}")


def test_transpose_grouped_and_channel_offsets():
    r = rng(4)
    x = r.standard_normal((2, 4, 3, 7))
    g, cin, cout = 2, 4, 6
    w = r.standard_normal((cout, 3, 2, cin // g))
    wt, kofs = R.torch_conv_transpose_equivalent(w, 1, None, 1, groups=g)
    ref = nhwc(F.conv_transpose2d(nchw(x[..., 2:2 + cin]), tt(wt), stride=2, padding=1, groups=g))
    dest = r.standard_normal(ref.shape[:3] + (cout + 1,))
    got = R.convolution_transpose_forward(x, w, dest=dest, kernel_offset=kofs, stride=2, groups=g, src_c_off=2, dst_c_off=1)
    assert_close(got[..., 1:], ref, F64)
    assert_close(got[..., 0], dest[..., 0], F64)


def test_transpose_offset_clip_and_post_processing():
    """offset.x shifts the Z window by offset·s (§12.2 step 2); clip/batch as kernel-base §2.2;
    bias → BN → neuron order as §3.1."""
    r = rng(6)
    x = r.standard_normal((3, 3, 4, 2))
    w = r.standard_normal((3, 3, 3, 2))
    b = r.standard_normal(3)
    full = R.convolution_transpose_forward(x, w, b, dest_shape=(3, 9, 11, 3), stride=2, kernel_offset=(-1, 1))
    wt, _ = R.torch_conv_transpose_equivalent(w, 0, 3, 1)
    dest = r.standard_normal((2, 6, 6, 3))
    bn = (r.standard_normal(3), r.random(3) + 0.5, r.standard_normal(3), r.standard_normal(3), 1e-3)
    got = R.convolution_transpose_forward(x, w, b, dest=dest, offset=(1, 2, 1), clip_rect=((2, 1, 1), (3, 4, 1)), stride=2,
                                          kernel_offset=(-1, 1), batch_norm=bn, neuron=(1, 0.25))
    expect = dest.copy()
    z = (full[1, 4:8, 2:5] - bn[0]) / np.sqrt(bn[1] + bn[4]) * bn[2] + bn[3]
    expect[1, 1:5, 2:5] = np.where(z >= 0, z, 0.25 * z)
    assert_close(got, expect, F64)
    # against torch: padding 0 ↔ kernelOffset −1 (recipe) in x; kernelOffset +1 in y = 2 rows later
    ref = nhwc(F.conv_transpose2d(nchw(x), tt(wt), tt(b), stride=2))  # [3, 7, 9, 3]
    assert_close(full[:, :5, :9], ref[:, 2:, :], F64)
    assert_close(full[:, 5:], 0 * full[:, 5:] + b, F64, msg="rows past the zero-inserted image: bias only")


def test_transpose_equals_convolution_data_gradient():
    """§12.2 'relationship': transpose with T equals the §11.3 data gradient of a convolution
    with W[k][q][p][c'] = T[c'][kH−1−q][kW−1−p][k], kernelOffset = −ox_f + (kWd even) (§11.4)."""
    r = rng(12)
    for (kw, kh), (sx, sy), (dx, dy), (oxf, oyf) in [((3, 3), (2, 2), (1, 1), (1, 1)), ((4, 2), (2, 3), (1, 2), (0, 2)), ((2, 5), (1, 2), (2, 1), (2, -1))]:
        cin, cout = 3, 4  # of the forward convolution
        wconv = r.standard_normal((cout, kh, kw, cin))
        t = wconv[:, ::-1, ::-1, :].transpose(3, 1, 2, 0)  # T[c'][q][p][k]
        e = r.standard_normal((2, 4, 3, cout))
        ds, _, _ = R.convolution_gradient(e, None, wconv, offset=(oxf, oyf, 0), stride=(sx, sy), dilation=(dx, dy), src_shape=(2, 7, 8))
        kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
        kofs = (-oxf + (1 - kwd % 2), -oyf + (1 - khd % 2))
        got = R.convolution_transpose_forward(e, t, dest_shape=(2, 7, 8, cin), kernel_offset=kofs, stride=(sx, sy), dilation=(dx, dy))
        assert_close(got, ds, F64)


@pytest.mark.parametrize("k,s,d,p,op", [(3, 2, 1, 1, 1), (4, 2, 1, 1, 0), (2, 3, 2, 0, 1), (5, 1, 2, 2, 0), (1, 3, 1, 0, 2)])
def test_transpose_gradient_matches_autograd(k, s, d, p, op):
    r = rng(k * 13 + s)
    n, hs, ws, cin, cout = 2, 3, 4, 3, 5
    src = r.standard_normal((n, hs, ws, cin + 1))
    w = r.standard_normal((cout, k, k, cin))
    wt_np, kofs = R.torch_conv_transpose_equivalent(w, p, k, d)
    x, wt, b = nchw(src[..., 1:], grad=True), tt(wt_np, grad=True), tt(np.zeros(cout), grad=True)
    y = F.conv_transpose2d(x, wt, b, stride=s, padding=p, output_padding=op, dilation=d)
    e = r.standard_normal(tuple(y.shape[i] for i in (0, 2, 3, 1)))
    y.backward(nchw(e))
    ds, dwt, db = R.convolution_transpose_gradient(e, src, w, kernel_offset=kofs, stride=s, dilation=d, src_c_off=1)
    assert_close(ds, nhwc(x.grad), F64, msg="dS")
    dw_ref = wt.grad.numpy()[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)  # back to W[o][q][p][c]
    assert_close(dwt, dw_ref, F64, msg="dW")
    assert_close(db, b.grad.numpy(), F64, msg="db")


# -- 5. fully connected (§14) ------------------------------------------------------------------


def test_fully_connected_forward_and_gradient():
    r = rng(14)
    n, hs, ws, cin, cout = 3, 3, 4, 5, 6
    src = r.standard_normal((n, hs, ws, cin + 2))
    wfc = r.standard_normal((cout, ws, hs, cin))  # [O][W][H][I]
    b = r.standard_normal(cout)
    x = src[..., 2:]
    flat = x.transpose(0, 2, 1, 3).reshape(n, -1)  # W-major, then H, then C
    expect = flat @ wfc.reshape(cout, -1).T + b
    got = R.fully_connected_forward(src, wfc, b, src_c_off=2, dst_c_off=1)
    assert got.shape == (n, 1, 1, cout + 1)
    assert_close(got[:, 0, 0, 1:], expect, F64)
    assert np.all(got[..., 0] == 0)
    # the H-before-W reading differs when both Ws, Hs > 1 ...
    w_hw = wfc.reshape(cout, hs, ws, cin)  # the same memory read as [O][H][W][I]
    hw = R.fully_connected_forward(src, w_hw, b, src_c_off=2, weight_order="HW")
    assert not np.allclose(hw[:, 0, 0], expect)
    assert_close(hw[:, 0, 0], x.reshape(n, -1) @ wfc.reshape(cout, -1).T + b, F64)
    # ... and is what a plain convolution reading that memory as OHWI computes (§14.1 note)
    conv = R.convolution_forward(x, w_hw, b, dest_shape=(n, 1, 1, cout), offset=(ws >> 1, hs >> 1, 0))
    assert_close(hw, conv, F64)
    # gradients vs autograd of the matmul
    xt, wtt = tt(flat, grad=True), tt(wfc.reshape(cout, -1), grad=True)
    e = r.standard_normal((n, cout))
    (xt @ wtt.T).backward(tt(e))
    ds, dw, db = R.fully_connected_gradient(e.reshape(n, 1, 1, cout), src, wfc, src_c_off=2)
    assert_close(ds, xt.grad.numpy().reshape(n, ws, hs, cin).transpose(0, 2, 1, 3), F64, msg="dS")
    assert_close(dw, wtt.grad.numpy().reshape(cout, ws, hs, cin), F64, msg="dW")
    assert_close(db, e.sum(0), F64, msg="db")
    _, dw2, _ = R.fully_connected_gradient(e, src, w_hw, src_c_off=2, weight_order="HW")
    assert dw2.shape == w_hw.shape
    assert not np.allclose(dw2.reshape(cout, -1), dw.reshape(cout, -1))
    assert_close(dw2, np.einsum("no,nyxc->oyxc", e, x), F64, msg="dW in [O][H][W][I]")


def test_fully_connected_orders_coincide_for_a_row():
    r = rng(15)
    src = r.standard_normal((2, 1, 5, 3))
    wfc = r.standard_normal((4, 5, 1, 3))
    a = R.fully_connected_forward(src, wfc)
    bb = R.fully_connected_forward(src, wfc.reshape(4, 1, 5, 3), weight_order="HW")
    assert_close(a, bb, F64)


# -- 6. binary convolution (§15) ----------------------------------------------------------------


def test_pack_binary_weights_bit_order():
    v = -np.ones((1, 1, 1, 40))
    v[..., 0] = 1
    v[..., 33] = 1
    v[..., 31] = 1
    words = R.pack_binary_weights(v)
    assert words.dtype == np.uint32
    assert words.tolist() == [[[[1 + (1 << 31), 2]]]]
    assert R.pack_binary_weights((v > 0).astype(int)).tolist() == words.tolist()
    assert_close(R.unpack_binary_weights(words, 40), (v > 0).astype(float), F64)


def test_binary_hand_example():
    """One pixel, 1x1 kernel, Cin = 3: S = [0.5, −2, 0], weight bits 0b101 (+1, −1, +1)."""
    s = np.array([0.5, -2.0, 0.0]).reshape(1, 1, 1, 3)
    w = np.array([[[[0b101]]]], dtype=np.uint32)
    kw = dict(kernel=(1, 1), cin=3, cout=1, dest_shape=(1, 1, 1, 1))
    one = lambda t, **k: R.binary_convolution_forward(s, w, type=t, **kw, **k)[0, 0, 0, 0]  # noqa: E731
    assert one("binaryWeights") == 0.5 + 2.0 + 0.0
    assert one("XNOR") == 3.0  # bin(0) = +1 matches the +1 weight
    assert one("AND") == 2.0  # [x' >= 0] = [1, 0, 1] · bits [1, 0, 1]
    assert one(1, output_scale=2.0, output_bias=1.0) == 7.0
    # β = A = (0.5 + 2 + 0) / 3 for a 1x1 window
    assert math.isclose(one("XNOR", flags=1), 3.0 * 2.5 / 3, rel_tol=1e-15)
    # input bias/scale act as a threshold: x' = (S + 1)·(−1) = [−1.5, 1, −1]
    assert one("XNOR", input_bias=1.0, input_scale=-1.0) == -1.0 + -1.0 + -1.0
    assert one("AND", input_bias=[1.0, 1.0, 1.0], input_scale=[-1.0, -1.0, -1.0]) == 0.0


@pytest.mark.parametrize("kind", ["binaryWeights", "XNOR", "AND"])
@pytest.mark.parametrize("beta", [0, 1])
@pytest.mark.parametrize("mode", ["zero", "clamp"])
def test_binary_convolution_matches_float_conv(kind, beta, mode):
    r = rng(len(kind) * 10 + beta + (mode == "clamp") * 100)
    n, hs, ws, cin, cout, kw, kh, p = 2, 6, 7, 37, 5, 3, 2, 1
    sx, sy = 1, 2
    src = r.standard_normal((n, hs, ws, cin))
    bits = r.integers(0, 2, (cout, kh, kw, cin))
    words = R.pack_binary_weights(bits)
    words[..., 1] |= np.uint32(0xFFFFFFE0)  # garbage in the unused bits of channels 37..63
    iscale = r.uniform(0.5, 1.5, cin) * np.where(np.arange(cin) % 5 == 0, -1.0, 1.0)
    ibias = 0.3 * r.standard_normal(cin)
    oscale, obias = r.uniform(0.5, 2.0, cout), r.standard_normal(cout)
    hd, wd = out_size(hs, kh, sy, 1, p), out_size(ws, kw, sx, 1, p)
    got = R.binary_convolution_forward(src, words, kernel=(kw, kh), cin=cin, cout=cout, type=kind, flags=beta, output_scale=oscale,
                                       output_bias=obias, input_scale=iscale, input_bias=ibias, offset=((kw >> 1) - p, (kh >> 1) - p, 0),
                                       stride=(sx, sy), edge_mode=mode, dest_shape=(n, hd, wd, cout))
    pad_mode = "replicate" if mode == "clamp" else "constant"
    xs = F.pad(nchw(src), (p, p, p, p), mode=pad_mode)  # S̃ on the padded grid
    xp = (xs + tt(ibias)[:, None, None]) * tt(iscale)[:, None, None]
    wsign = oihw(2.0 * bits - 1.0)
    if kind == "binaryWeights":
        acc = F.conv2d(xp, wsign, stride=(sy, sx))
    elif kind == "XNOR":
        acc = F.conv2d(torch.where(xp < 0, -1.0, 1.0).double(), wsign, stride=(sy, sx))
    else:
        acc = F.conv2d((xp >= 0).double(), oihw(bits.astype(float)), stride=(sy, sx))
    b_ = torch.ones_like(acc[:, :1])
    if beta:
        a = ((nchw(src) + tt(ibias)[:, None, None]) * tt(iscale)[:, None, None]).abs().mean(1, keepdim=True)
        b_ = F.avg_pool2d(F.pad(a, (p, p, p, p), mode=pad_mode), (kh, kw), stride=(sy, sx))
    ref = nhwc(acc * tt(oscale)[:, None, None] * b_ + tt(obias)[:, None, None])
    assert_close(got, ref, F64)


def test_binary_fully_connected_h_before_w_and_beta():
    r = rng(17)
    n, hs, ws, cin, cout = 2, 3, 4, 35, 3
    src = r.standard_normal((n, hs, ws, cin))
    bits = r.integers(0, 2, (cout, hs, ws, cin))  # [Cout][kH][kW][Cin]
    words = R.pack_binary_weights(bits)
    for kind, flags in [("binaryWeights", 1), ("XNOR", 0), ("AND", 1)]:
        got = R.binary_fully_connected_forward(src, words, cin=cin, cout=cout, type=kind, flags=flags, output_scale=0.5,
                                               neuron=(1, LEAK))
        xv = {"binaryWeights": src, "XNOR": np.where(src < 0, -1.0, 1.0), "AND": (src >= 0) * 1.0}[kind]
        wv = bits * 1.0 if kind == "AND" else 2.0 * bits - 1.0
        acc = np.einsum("nyxc,oyxc->no", xv, wv)
        beta = np.abs(src).mean(axis=(1, 2, 3)) if flags else np.ones(n)
        z = acc * 0.5 * beta[:, None]
        assert got.shape == (n, 1, 1, cout)
        assert_close(got[:, 0, 0], np.where(z >= 0, z, LEAK * z), F64, msg=kind)


# -- 7. post-processing: BN folding, neuron order (§3) ------------------------------------------


def test_batch_norm_folding_and_neuron_order():
    r = rng(19)
    x = r.standard_normal((2, 6, 5, 4))
    w = r.standard_normal((6, 3, 3, 2))
    b = r.standard_normal(6)
    mean, var, gamma, beta = r.standard_normal(6), r.random(6) + 0.1, r.standard_normal(6), r.standard_normal(6)
    eps = 1e-2
    kw = dict(dest_shape=(2, 6, 5, 6), offset=(1, 1, 0), groups=2)
    plain = R.convolution_forward(x, w, b, **kw)
    ref = F.batch_norm(nchw(plain), tt(mean), tt(var), tt(gamma), tt(beta), training=False, eps=eps)
    bn = R.convolution_forward(x, w, b, batch_norm=(mean, var, gamma, beta, eps), **kw)
    assert_close(bn, nhwc(ref), F64, msg="BN after conv + bias")
    wf, bf = R.fold_batch_norm(w, b, mean, var, gamma, beta, eps)
    assert_close(R.convolution_forward(x, wf, bf, **kw), bn, F64, msg="folded weights")
    slopes = r.uniform(0.1, 0.9, 6).astype(np.float32).astype(np.float64)  # neuron parameters are float32
    pre = R.convolution_forward(x, w, b, batch_norm=(mean, var, gamma, beta, eps), neuron=(10, 0.0, 0.0, 0.0, slopes), **kw)
    assert_close(pre, np.where(bn >= 0, bn, slopes * bn), F64, msg="PReLU after BN")
    sig = R.convolution_forward(x, w, None, neuron=(3,), **kw)
    assert_close(sig, 1.0 / (1.0 + np.exp(-R.convolution_forward(x, w, **kw))), F64, msg="sigmoid")
    # None arrays take the identity defaults (mean 0, variance 1, gamma 1, beta 0)
    ident = R.convolution_forward(x, w, b, batch_norm=(None, None, None, None, 0.0), **kw)
    assert_close(ident, plain, F64)
    wdw = r.standard_normal((4, 2, 2))
    wf2, bf2 = R.fold_batch_norm(wdw, None, mean[:4], var[:4], None, None, eps)
    assert_close(wf2, wdw / np.sqrt(var[:4] + eps)[:, None, None], F64)
    assert_close(bf2, -mean[:4] / np.sqrt(var[:4] + eps), F64)


# -- 8. quantization (§5.2) ---------------------------------------------------------------------


def test_uint8_quantization():
    r = rng(23)
    w = r.standard_normal((5, 3, 3, 4))
    ranges = np.stack([w.reshape(5, -1).min(1), w.reshape(5, -1).max(1)], axis=1)
    ranges[0] = (-2.0, 2.0)  # widest range: 4.0
    w[0] = np.clip(w[0], -2.0, 2.0)
    u = R.quantize_linear_uint8(w, ranges)
    assert u.dtype == np.uint8
    back = R.dequantize_uint8(u, ranges=ranges)
    span = (ranges[:, 1] - ranges[:, 0])[:, None, None, None]
    assert_close((back - w) / span, np.zeros_like(w), F64, overrides=QUANT_TOL, msg="within half a code step")
    assert u.reshape(5, -1)[1:].min(1).tolist() == [0] * 4 and u.reshape(5, -1)[1:].max(1).tolist() == [255] * 4
    codes = np.array([[0, 51, 255]], dtype=np.uint8)
    assert_close(R.dequantize_uint8(codes, ranges=[(-1.0, 4.0)]), [[-1.0, 0.0, 4.0]], F64)
    lut = np.linspace(-1, 1, 256) ** 3
    assert_close(R.dequantize_uint8(codes, lut=lut), lut[[0, 51, 255]][None], F64)
    with pytest.raises(ValueError):
        R.dequantize_uint8(codes)


def test_argument_validation():
    x = np.zeros((1, 4, 4, 4))
    with pytest.raises(ValueError):
        R.convolution_forward(x, np.zeros((6, 3, 3, 4)), dest_shape=(1, 2, 2, 6), sub_pixel_scale=2)
    with pytest.raises(ValueError):
        R.convolution_forward(x, np.zeros((6, 3, 3, 2)), dest_shape=(1, 2, 2, 6), groups=4)
    with pytest.raises(ValueError):
        R.convolution_forward(x, np.zeros((4, 3, 3, 4)), dest_shape=(1, 2, 2, 4), src_c_off=1)
    with pytest.raises(ValueError):
        R.convolution_forward(x, np.zeros((4, 3, 3, 4)))
