"""The three local-normalization gradient kernels (spec/normalization.md §2, exact derivatives)
against two oracles: the float64 reference ``mpsnn.testing.reference_local_normalization``
(the spec's transposed-window formulas, and window-by-window partial derivatives for any
geometry) and torch.autograd in float64 on an independent torch forward written here
(``F.unfold`` taps), driven by a RANDOM upstream gradient. Finite differences validate the
reference. Also: the properties the gradient state sets, the kernel driven by its own
properties, 16-bit images, encode_batch, errors."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn import MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn import MPSNNPaddingMethod as PM
from mpsnn.testing import reference_local_normalization as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
F64 = "float64"
#: Per-op overrides: a gradient sums up to kw·kh (or N) products of float32 terms
GRAD_TOL = {"float32": Tol(5e-5, 5e-6), "float16": Tol(4e-3, 2e-3), "bfloat16": Tol(3e-2, 2e-2)}
FD_TOL = {F64: Tol(1e-6, 1e-8)}
FD_STEP = 1e-6


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.5, hi: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def params32(kind: str, params: dict[str, float]) -> dict[str, float]:
    p = dict(R.DEFAULTS[kind])
    p.update(params)
    return {k: float(np.float32(v)) for k, v in p.items()}


# -- an independent torch forward (float64, differentiable) ------------------------------------------


def torch_forward(xt: torch.Tensor, kind: str, kernel: Any, params: dict[str, float], offset: tuple[int, int],
                  out: tuple[int, int], clamp: bool) -> torch.Tensor:
    """NHWC ``xt`` -> NHWC output of ``out = (w, h)`` windows centred at ``offset + (i, j)``."""
    p = params32(kind, params)
    n, h, w, c = xt.shape
    kw, kh = (1, 1) if kind == "cross_channel" else kernel
    xi = torch.arange(out[0] + kw - 1) + offset[0] - kw // 2
    yi = torch.arange(out[1] + kh - 1) + offset[1] - kh // 2
    inside = ((yi >= 0) & (yi < h))[:, None] & ((xi >= 0) & (xi < w))[None, :]
    blk = xt.permute(0, 3, 1, 2)[:, :, yi.clamp(0, h - 1)][:, :, :, xi.clamp(0, w - 1)]
    if not clamp:
        blk = blk * inside
    if kind == "cross_channel":
        nk = kernel
        sq = blk * blk
        sums = torch.stack([sq[:, max(0, k - nk // 2):min(c, k + (nk - 1) // 2 + 1)].sum(1) for k in range(c)], 1)
        y = blk * (p["delta"] + p["alpha"] / nk * sums) ** -p["beta"]
        return y.permute(0, 2, 3, 1)
    taps = F.unfold(blk, (kh, kw)).reshape(n, c, kh * kw, out[1], out[0])
    centre = taps[:, :, (kh // 2) * kw + kw // 2]
    if kind == "spatial":
        t = p["delta"] + p["alpha"] * (taps * taps).mean(2)
        return (centre * t ** -p["beta"]).permute(0, 2, 3, 1)
    mean = taps.mean(2)
    t = p["delta"] + p["alpha"] * ((taps * taps).mean(2) - mean * mean)
    return (p["pm"] + p["ps"] * (centre - p["p0"] * mean) * t ** -p["beta"]).permute(0, 2, 3, 1)


def autograd_dx(x: np.ndarray, e: np.ndarray, kind: str, kernel: Any, params: dict[str, float], offset: tuple[int, int], clamp: bool) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = torch_forward(xt, kind, kernel, params, offset, (e.shape[2], e.shape[1]), clamp)
    y.backward(torch.tensor(e, dtype=torch.float64))
    return xt.grad.numpy()  # type: ignore[union-attr]


def make(kind: str, device: m.Device, kernel: Any, params: dict[str, float], gradient: bool = False) -> Any:
    if kind == "cross_channel":
        cls: Any = m.MPSCNNCrossChannelNormalizationGradient if gradient else m.MPSCNNCrossChannelNormalization
        return cls(device, kernel_size=kernel, **params)
    if kind == "spatial":
        cls = m.MPSCNNSpatialNormalizationGradient if gradient else m.MPSCNNSpatialNormalization
    else:
        cls = m.MPSCNNLocalContrastNormalizationGradient if gradient else m.MPSCNNLocalContrastNormalization
    return cls(device, kernel_width=kernel[0], kernel_height=kernel[1], **params)


@dataclass(frozen=True)
class GCase:
    id: str
    kind: str
    kernel: Any
    params: dict[str, float] = field(default_factory=dict)
    padding: int = int(PM.sizeSame)
    edge: MPSImageEdgeMode = Z
    src: tuple[int, int, int, int] = (2, 5, 6, 7)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


LRN_P = {"alpha": 1.5, "beta": 0.75, "delta": 1.0}
SP_P = {"alpha": 2.0, "beta": 0.75, "delta": 1.0}
LCN_P = {"alpha": 1.0, "beta": 0.5, "delta": 0.5, "p0": 0.8, "pm": 0.25, "ps": 1.25}
GCASES = [
    GCase("lrn_n5_defaults", "cross_channel", 5),
    GCase("lrn_n4_even", "cross_channel", 4, LRN_P),
    GCase("lrn_n3_clamp_full", "cross_channel", 3, LRN_P, padding=int(PM.sizeFull), edge=C),
    GCase("spatial_k3_same_zero", "spatial", (3, 3), SP_P),
    GCase("spatial_k2_even", "spatial", (2, 2), SP_P),
    GCase("spatial_k3_full_clamp", "spatial", (3, 3), SP_P, padding=int(PM.sizeFull), edge=C),
    GCase("spatial_k4_valid", "spatial", (4, 4), {"alpha": 1.0, "beta": 1.5, "delta": 0.75}, padding=int(PM.sizeValidOnly)),
    GCase("lcn_k3_defaults", "local_contrast", (3, 3)),
    GCase("lcn_k3_alpha1_clamp", "local_contrast", (3, 3), LCN_P, edge=C),
    GCase("lcn_k2_even_full", "local_contrast", (2, 2), LCN_P, padding=int(PM.sizeFull)),
    GCase("lcn_image_1x1_clamp", "local_contrast", (3, 3), LCN_P, edge=C, src=(1, 1, 1, 3)),
]


# -- the reference itself ------------------------------------------------------------------------------


def _literal_forward(kind: str, x: np.ndarray, kernel: Any, params: dict[str, float]) -> np.ndarray:
    if kind == "cross_channel":
        return R.cross_channel_normalization(x, kernel, params)
    fn = R.spatial_normalization if kind == "spatial" else R.local_contrast_normalization
    return np.stack([fn(img, kernel, params) for img in x])


def _literal_gradient(kind: str, e: np.ndarray, x: np.ndarray, kernel: Any, params: dict[str, float]) -> np.ndarray:
    if kind == "cross_channel":
        return R.cross_channel_normalization_gradient(e, x, kernel, params)
    fn = R.spatial_normalization_gradient if kind == "spatial" else R.local_contrast_normalization_gradient
    return np.stack([fn(gi, xi, kernel, params) for gi, xi in zip(e, x)])


@pytest.mark.parametrize("kind,kernel,params", [("cross_channel", 4, LRN_P), ("spatial", (3, 3), SP_P), ("spatial", (2, 2), SP_P),
                                                ("local_contrast", (3, 3), LCN_P), ("local_contrast", (2, 2), LCN_P)])
def test_reference_gradients_match_finite_differences_and_each_other(kind: str, kernel: Any, params: dict[str, float]) -> None:
    """The spec's transposed-window formulas = central differences of the spec's forward =
    the window-by-window geometry reference."""
    x = rand(1, (1, 3, 4, 5))
    e = rand(2, x.shape)
    lit = _literal_gradient(kind, e, x, kernel, params)
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += FD_STEP
        xm[idx] -= FD_STEP
        fd[idx] = ((_literal_forward(kind, xp, kernel, params) - _literal_forward(kind, xm, kernel, params)) * e).sum() / (2 * FD_STEP)
    assert_close(lit, fd, F64, FD_TOL, msg="spec formula vs finite differences")
    geo = R.local_normalization_gradient(e, x, np.zeros(x.shape), kind=kind, kernel=kernel, params=params)
    assert_close(geo, lit, F64, msg="geometry reference vs spec formula")
    assert_close(autograd_dx(x, e, kind, kernel, params, (0, 0), False), lit, F64, msg="autograd vs spec formula")


def test_header_formulas_differ_from_the_exact_derivative() -> None:
    """The spec's CONFLICT is real: the header's LRN formula (no 1/N) is not the derivative."""
    x, e = rand(3, (1, 1, 1, 6)), rand(4, (1, 1, 1, 6))
    p = params32("cross_channel", LRN_P)
    exact = R.cross_channel_normalization_gradient(e, x, 3, LRN_P)
    lv = np.stack([p["delta"] + p["alpha"] / 3 * sum(x[..., q] ** 2 for q in range(max(0, k - 1), min(6, k + 2))) for k in range(6)], -1)
    header = e * lv ** -p["beta"] - 2 * p["alpha"] * p["beta"] * x * np.stack(
        [sum(e[..., r] * x[..., r] * lv[..., r] ** (-p["beta"] - 1) for r in range(max(0, k - 1), min(6, k + 2))) for k in range(6)], -1)
    assert not np.allclose(exact, header, rtol=1e-3)


# -- kernels vs both oracles ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GCASES])
def test_gradient_from_state(device, cb, case: GCase) -> None:
    """Forward auto-encode with a state, gradient auto-encode with it: the result is the
    forward source's size and equals dL/dX from both oracles."""
    f = make(case.kind, device, case.kernel, case.params)
    g = make(case.kind, device, case.kernel, case.params, gradient=True)
    f.padding = case.padding
    f.edge_mode = case.edge
    x_img, x = image(rand(case.seed, case.src), device)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=True)
    e_img, e = image(rand(case.seed + 1, y.shape), device)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert dx.shape == x_img.shape and state.read_count == 0
    off = (f.offset.x, f.offset.y)
    clamp = case.edge == C
    ref = R.local_normalization_gradient_from_forward(e, x, np.full(x.shape, np.nan), kind=case.kind, kernel=case.kernel, params=case.params,
                                                      offset=(*off, 0), edge_mode="clamp" if clamp else "zero")
    auto = autograd_dx(x, e, case.kind, case.kernel, case.params, off, clamp)
    assert_close(ref, auto, F64, msg="reference vs autograd")
    assert_close(values(dx), ref, "float32", GRAD_TOL, msg=f"{case.id} vs reference")
    assert g.secondary_edge_mode == case.edge and g.secondary_offset == MPSOffset(0, 0, 0)
    assert g.primary_offset == MPSOffset(-off[0], -off[1], 0)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GCASES if c.id in ("lrn_n4_even", "spatial_k3_same_zero", "lcn_k3_alpha1_clamp")])
def test_gradient_16bit(device, cb, case: GCase, dtype: torch.dtype) -> None:
    f = make(case.kind, device, case.kernel, case.params)
    g = make(case.kind, device, case.kernel, case.params, gradient=True)
    f.edge_mode = case.edge
    x_img, x = image(rand(case.seed, case.src), device, dtype)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    e_img, e = image(rand(case.seed + 1, y.shape), device, dtype)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert dx.dtype == dtype
    ref = R.local_normalization_gradient_from_forward(e, x, np.zeros(x.shape), kind=case.kind, kernel=case.kernel, params=case.params,
                                                      edge_mode="clamp" if case.edge == C else "zero")
    assert_close(values(dx), ref, dtype, GRAD_TOL)


@pytest.mark.parametrize("kind,kernel,params", [("cross_channel", 3, LRN_P), ("spatial", (3, 3), SP_P), ("local_contrast", (2, 2), LCN_P)])
def test_gradient_state_with_forward_offset_clip_and_channels(device, cb, kind: str, kernel: Any, params: dict[str, float]) -> None:
    """Explicit forward destination with offset, clip rect and channel windows; the explicit
    gradient destination gets the forward channel window (the rest untouched) in full."""
    f = make(kind, device, kernel, params)
    g = make(kind, device, kernel, params, gradient=True)
    f.offset = MPSOffset(-1, 2, 0)
    f.clip_rect = region((1, 0, 0), (3, 3, 2))
    f.source_feature_channel_offset = 4
    f.source_feature_channel_max_count = 3
    f.destination_feature_channel_offset = 4
    f.edge_mode = C
    x_img, x = image(rand(7, (2, 6, 7, 8)), device)
    y, _ = poisoned((2, 4, 5, 8), device, 0.0)
    state = f.result_state(x_img, destination_image=y)
    f.encode(cb, x_img, y, destination_state=state)
    e_img, e = image(rand(8, y.shape), device)
    dx, before = poisoned(x_img.shape, device)
    g.encode(cb, e_img, x_img, state, dx)
    finish(cb)
    ref = R.local_normalization_gradient_from_forward(e, x, before, kind=kind, kernel=kernel, params=params, offset=(-1, 2, 0),
                                                      clip_rect=((1, 0, 0), (3, 3, 2)), edge_mode="clamp", src_c_off=4, channels=3, dst_c_off=4)
    assert_close(values(dx), ref, "float32", GRAD_TOL)
    # the second oracle on the channel window: autograd of the forward restricted to the clip rect
    e_clip = np.zeros((2, 3, 3, 3))
    e_clip[:] = e[:, 0:3, 1:4, 4:7]
    auto = autograd_dx(x[..., 4:7], e_clip, kind, kernel, params, (-1, 2), True)
    assert_close(values(dx)[..., 4:7], auto, "float32", GRAD_TOL)


@pytest.mark.parametrize("kind,kernel,params", [("spatial", (3, 3), SP_P), ("cross_channel", 2, LRN_P)])
def test_gradient_without_state_uses_kernel_properties(device, cb, kind: str, kernel: Any, params: dict[str, float]) -> None:
    g = make(kind, device, kernel, params, gradient=True)
    g.primary_offset = MPSOffset(1, 0, 0)
    g.secondary_offset = MPSOffset(0, 1, 0)
    g.secondary_edge_mode = C
    g.clip_rect = region((1, 1, 0), (4, 3, 1))
    x_img, x = image(rand(9, (1, 5, 6, 4)), device)
    e_img, e = image(rand(10, (1, 4, 6, 4)), device)
    dx, before = poisoned((1, 5, 6, 4), device)
    g.encode(cb, e_img, x_img, None, dx)
    auto_sized = g.encode(cb, e_img, x_img, None)
    finish(cb)
    ref = R.local_normalization_gradient(e, x, before, kind=kind, kernel=kernel, params=params, primary_offset=(1, 0, 0),
                                         secondary_offset=(0, 1, 0), clip_rect=((1, 1, 0), (4, 3, 1)), edge_mode="clamp")
    assert_close(values(dx), ref, "float32", GRAD_TOL)
    assert auto_sized.shape == x_img.shape


def test_encode_batch_gradient(device, cb) -> None:
    f = m.MPSCNNLocalContrastNormalization(device, 3, 3, **LCN_P)
    g = m.MPSCNNLocalContrastNormalizationGradient(device, 3, 3, **LCN_P)
    xs = [image(rand(30 + i, (1, 4, 5, 3)), device) for i in range(3)]
    ys, states = f.encode_batch(cb, [i for i, _ in xs], destination_state_is_temporary=True)
    es = [image(rand(40 + i, (1, 4, 5, 3)), device) for i in range(3)]
    dxs = g.encode_batch(cb, [i for i, _ in es], [i for i, _ in xs], states)
    finish(cb)
    assert len(dxs) == 3 and all(s.read_count == 0 for s in states)
    for (_, x), (_, e), dx in zip(xs, es, dxs):
        assert_close(values(dx), _literal_gradient("local_contrast", e, x, (3, 3), LCN_P), "float32", GRAD_TOL)


# -- properties and errors -----------------------------------------------------------------------------


def test_gradient_properties_and_init_forms(device) -> None:
    g = m.MPSCNNCrossChannelNormalizationGradient(device, kernel_size=5)
    assert (g.alpha, g.beta, g.delta, g.kernel_size) == (1.0, 5.0, 1.0, 5)
    s = m.MPSCNNSpatialNormalizationGradient(device, 3, 3)
    assert (s.alpha, s.beta, s.delta, s.kernel_width, s.kernel_height) == (1.0, 5.0, 1.0, 3, 3)
    lc = m.MPSCNNLocalContrastNormalizationGradient(device, kernel_width=2, kernel_height=2)
    assert (lc.alpha, lc.beta, lc.delta, lc.p0, lc.pm, lc.ps) == (0.0, 0.5, 1.0 / 1024, 1.0, 0.0, 1.0)
    for k in (g, s, lc):
        assert isinstance(k, m.MPSCNNGradientKernel) and (k.kernel_offset_x, k.kernel_offset_y) == (0, 0)
    s.alpha, s.beta, s.delta = 0.5, 0.25, 2.0
    assert (s.alpha, s.beta, s.delta) == (0.5, 0.25, 2.0)
    with pytest.raises(m.MPSTypeError, match="MPSCNNCrossChannelNormalizationGradient: `kernel_size` is required"):
        m.MPSCNNCrossChannelNormalizationGradient(device)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalizationGradient: `kernel_height` \(=2\) must equal kernel_width=3"):
        m.MPSCNNSpatialNormalizationGradient(device, 3, 2)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalizationGradient: `alpha` \(=-2.0\) must be >= 0"):
        s.alpha = -2.0


def test_gradient_errors(device, cb) -> None:
    x_img, _ = image(rand(50, (1, 4, 4, 4)), device)
    f = m.MPSCNNSpatialNormalization(device, 3, 3)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    e_img, _ = image(rand(51, (1, 4, 4, 4)), device)
    g = m.MPSCNNSpatialNormalizationGradient(device, 3, 3, alpha=0.5)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalizationGradient: `gradient_state` .*alpha=1.0.* must match this kernel's .*alpha=0.5"):
        g.encode(cb, e_img, x_img, state)
    with pytest.raises(m.MPSValueError, match=r"window=\(3, 3\).* must match this kernel's window=\(5, 5\)"):
        m.MPSCNNSpatialNormalizationGradient(device, 5, 5).encode(cb, e_img, x_img, state)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNLocalContrastNormalizationGradient: `gradient_state` \(='a state of MPSCNNSpatialNormalization'\) "
                                              r"must come from a forward MPSCNNLocalContrastNormalization encode"):
        m.MPSCNNLocalContrastNormalizationGradient(device, 3, 3).encode(cb, e_img, x_img, state)
    _, pool_state = m.MPSCNNPoolingMax(device, 2, 2).encode(cb, x_img, destination_state_is_temporary=False)
    with pytest.raises(m.MPSValueError, match="must come from a forward MPSCNNSpatialNormalization encode"):
        m.MPSCNNSpatialNormalizationGradient(device, 3, 3).encode(cb, e_img, x_img, pool_state)
    lrn = m.MPSCNNCrossChannelNormalizationGradient(device, 3)
    with pytest.raises(m.MPSValueError, match=r"`source_gradient` \(='4 channels used'\) must match the 3 channels used of source_image"):
        lrn.encode(cb, e_img, image(rand(52, (1, 4, 4, 3)), device)[0], None)
    lrn.primary_edge_mode = C
    with pytest.raises(m.MPSValueError, match=r"`primary_edge_mode` \(='clamp'\) must be zero"):
        lrn.encode(cb, e_img, x_img, None)
    lrn.primary_edge_mode = Z
    lrn.secondary_stride_in_pixels_x = 2
    with pytest.raises(m.MPSValueError, match=r"`secondary_stride_in_pixels_x` \(=2\) must be 1"):
        lrn.encode(cb, e_img, x_img, None)
    lrn.secondary_stride_in_pixels_x = 1
    lrn.secondary_edge_mode = MPSImageEdgeMode.constant
    with pytest.raises(m.MPSValueError, match=r"`secondary_edge_mode` \(='constant'\) must be zero or clamp"):
        lrn.encode(cb, e_img, x_img, None)
    # a forward pass that moved images cannot feed a gradient kernel
    f2 = m.MPSCNNCrossChannelNormalization(device, 3)
    x3, _ = image(rand(53, (3, 2, 2, 4)), device)
    d2, _ = poisoned((2, 2, 2, 4), device)
    f2.offset = MPSOffset(0, 0, 1)
    st = f2.result_state(x3, destination_image=d2)
    f2.encode(cb, x3, d2, destination_state=st)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNCrossChannelNormalizationGradient: `gradient_state`"):
        m.MPSCNNCrossChannelNormalizationGradient(device, 3).encode(cb, d2, x3, st, poisoned((3, 2, 2, 4), device)[0])
