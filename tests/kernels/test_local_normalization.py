"""MPSCNNCrossChannelNormalization / MPSCNNSpatialNormalization /
MPSCNNLocalContrastNormalization (spec/normalization.md §2) against the float64 references of
``mpsnn.testing.reference_local_normalization``: the spec formulas literally (whole image) and
the kernel-geometry reference (offsets, clip rects, edge modes, channel windows, batches,
padding policies) with poisoned destinations. Also properties, init forms and errors."""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn import MPSNNPaddingMethod as PM
from mpsnn.backends import local_normalization as backend
from mpsnn.testing import reference_local_normalization as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
F64 = "float64"
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
#: Per-op override: the window sums and the power amplify the input rounding a little
FWD_TOL = {"float32": Tol(2e-5, 2e-6)}


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.5, hi: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def make(kind: str, device: m.Device, kernel: Any, params: dict[str, float]) -> m.MPSCNNKernel:
    if kind == "cross_channel":
        return m.MPSCNNCrossChannelNormalization(device, kernel_size=kernel, **params)
    cls = m.MPSCNNSpatialNormalization if kind == "spatial" else m.MPSCNNLocalContrastNormalization
    return cls(device, kernel_width=kernel[0], kernel_height=kernel[1], **params)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    kernel: Any
    params: dict[str, float] = field(default_factory=dict)
    src: tuple[int, int, int, int] = (2, 5, 6, 7)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


CASES = [
    Case("lrn_n5_defaults", "cross_channel", 5),
    Case("lrn_n4_even", "cross_channel", 4, {"alpha": 0.7, "beta": 0.75, "delta": 2.0}),
    Case("lrn_n1", "cross_channel", 1, {"alpha": 0.5, "beta": 1.5, "delta": 0.5}),
    Case("lrn_n9_wider_than_channels", "cross_channel", 9, {"alpha": 2.0, "beta": 0.6, "delta": 1.5}, src=(1, 3, 4, 6)),
    Case("spatial_k3_defaults", "spatial", (3, 3)),
    Case("spatial_k2_even", "spatial", (2, 2), {"alpha": 0.8, "beta": 0.75, "delta": 1.25}),
    Case("spatial_k5", "spatial", (5, 5), {"alpha": 3.0, "beta": 0.5, "delta": 1.0}),
    Case("lcn_k3_defaults", "local_contrast", (3, 3)),
    Case("lcn_k3_alpha1", "local_contrast", (3, 3), {"alpha": 1.0, "beta": 0.5, "delta": 0.25, "p0": 0.8, "pm": 0.1, "ps": 1.3}),
    Case("lcn_k4_even", "local_contrast", (4, 4), {"alpha": 0.6, "beta": 0.8, "delta": 0.5, "p0": 1.0, "pm": -0.2, "ps": 0.7}),
]


def literal(case: Case, x: np.ndarray) -> np.ndarray:
    """The spec formula on whole images (zero outside), channels of each image."""
    if case.kind == "cross_channel":
        return R.cross_channel_normalization(x, case.kernel, case.params)
    fn = R.spatial_normalization if case.kind == "spatial" else R.local_contrast_normalization
    return np.stack([fn(img, case.kernel, case.params) for img in x])


# -- the reference itself --------------------------------------------------------------------------


def test_reference_by_hand() -> None:
    # one channel, N = 1: Y = X / (delta + alpha·X²)^beta
    x = np.array([[[[2.0]]]])
    assert np.allclose(R.cross_channel_normalization(x, 1, {"alpha": 0.5, "beta": 2.0, "delta": 1.0}), 2.0 / 3.0 ** 2)
    # N = 2 on 3 channels: Q(0) = [0, 0] (clipped, divisor still 2), Q(1) = [0, 1], Q(2) = [1, 2]
    v = np.array([1.0, 2.0, 3.0])
    got = R.cross_channel_normalization(v, 2, {"alpha": 2.0, "beta": 1.0, "delta": 1.0})
    assert np.allclose(got, [1 / (1 + 1), 2 / (1 + 5), 3 / (1 + 13)])
    # spatial 3x3 on a 1x1 image: only the centre is inside, divisor 9
    assert np.allclose(R.spatial_normalization(np.array([[[3.0]]]), (3, 3), {"alpha": 9.0, "beta": 1.0, "delta": 1.0}), 3.0 / 10.0)
    # local contrast with the documented parameters on a 3x3 image, window 3x3, centre pixel:
    img = np.arange(9.0).reshape(3, 3, 1)
    y = R.local_contrast_normalization(img, (3, 3), {"alpha": 1.0, "beta": 0.5, "delta": 0.0, "p0": 1.0, "pm": 0.0, "ps": 1.0})
    assert np.isclose(y[1, 1, 0], (4.0 - 4.0) / np.sqrt(np.var(np.arange(9.0))))
    assert np.isclose(y[0, 0, 0], (0.0 - (0 + 1 + 3 + 4) / 9) / np.sqrt((0 + 1 + 9 + 16) / 9 - ((0 + 1 + 3 + 4) / 9) ** 2))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_geometry_reference_agrees_with_the_literal_formulas(case: Case) -> None:
    x = rand(case.seed, case.src)
    geo = R.local_normalization_forward(x, np.zeros(case.src), kind=case.kind, kernel=case.kernel, params=case.params)
    assert_close(geo, literal(case, x), F64)


# -- kernels vs references -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_forward_auto_sized(device, cb, case: Case, dtype: torch.dtype) -> None:
    k = make(case.kind, device, case.kernel, case.params)
    x_img, x = image(rand(case.seed, case.src), device, dtype)
    y = k.encode(cb, x_img)
    finish(cb)
    assert y.shape == x_img.shape and y.dtype == dtype and k.offset == MPSOffset(0, 0, 0)
    assert_close(values(y), literal(case, x), dtype, FWD_TOL, msg=case.id)


@dataclass(frozen=True)
class Geom:
    id: str
    offset: tuple[int, int, int] = (0, 0, 0)
    clip: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    edge: MPSImageEdgeMode = Z
    c_off: int = 0
    c_max: int | None = None
    dst_c_off: int = 0
    src: tuple[int, int, int, int] = (3, 5, 6, 9)
    dest: tuple[int, int, int, int] = (3, 5, 6, 9)


GEOMS = [
    Geom("offset_clamp", offset=(1, -1, 0), edge=C),
    Geom("offset_zero_far_out", offset=(-3, 4, 0)),
    Geom("clip_and_image_range", offset=(2, 1, 1), clip=((1, 2, 1), (3, 2, 2)), edge=C),
    Geom("channel_windows", c_off=4, c_max=3, dst_c_off=4, dest=(3, 5, 6, 8)),
    Geom("channels_to_end_offset_clip", offset=(-1, 0, 0), clip=((2, 0, 0), (9, 3, 3)), c_off=4, dst_c_off=0, edge=C, dest=(3, 4, 7, 5)),
]
GEOM_CASES = [c for c in CASES if c.id in ("lrn_n4_even", "spatial_k2_even", "spatial_k3_defaults", "lcn_k3_alpha1")]


@pytest.mark.parametrize("geom", [pytest.param(g, id=g.id) for g in GEOMS])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GEOM_CASES])
def test_forward_explicit_geometry(device, cb, case: Case, geom: Geom) -> None:
    """Explicit destination: only the clip rect and the channel window change."""
    k = make(case.kind, device, case.kernel, case.params)
    k.offset = MPSOffset(*geom.offset)
    if geom.clip is not None:
        k.clip_rect = region(*geom.clip)
    k.edge_mode = geom.edge
    k.source_feature_channel_offset = geom.c_off
    if geom.c_max is not None:
        k.source_feature_channel_max_count = geom.c_max
    k.destination_feature_channel_offset = geom.dst_c_off
    x_img, x = image(rand(case.seed + 3, geom.src), device)
    d_img, before = poisoned(geom.dest, device, 1234.0)
    k.encode(cb, x_img, d_img)
    finish(cb)
    ref = R.local_normalization_forward(x, before, kind=case.kind, kernel=case.kernel, params=case.params, offset=geom.offset,
                                        clip_rect=geom.clip, edge_mode="clamp" if geom.edge == C else "zero", src_c_off=geom.c_off,
                                        src_c_max=geom.c_max, dst_c_off=geom.dst_c_off)
    assert_close(values(d_img), ref, "float32", FWD_TOL, msg=f"{case.id}/{geom.id}")


@pytest.mark.parametrize("kind,kernel", [("spatial", (3, 3)), ("local_contrast", (2, 2))])
def test_padding_valid_and_full(device, queue, kind: str, kernel: tuple[int, int]) -> None:
    params = {"alpha": 1.0, "beta": 0.5, "delta": 0.5}
    for method, size, off in ((PM.sizeValidOnly, (5 - kernel[1] + 1, 6 - kernel[0] + 1), kernel[0] // 2),
                              (PM.sizeFull, (5 + kernel[1] - 1, 6 + kernel[0] - 1), kernel[0] // 2 - (kernel[0] - 1))):
        k = make(kind, device, kernel, params)
        k.padding = int(method)
        k.edge_mode = C
        cb = queue.make_command_buffer()
        x_img, x = image(rand(11, (1, 5, 6, 3)), device)
        y = k.encode(cb, x_img)
        finish(cb)
        assert (y.height, y.width) == size and k.offset.x == off and k.offset.y == off
        ref = R.local_normalization_forward(x, np.zeros(y.shape), kind=kind, kernel=kernel, params=params, offset=(off, off, 0), edge_mode="clamp")
        assert_close(values(y), ref, "float32", FWD_TOL, msg=str(method))


def test_one_by_one_image_and_single_channel(device, cb) -> None:
    x_img, x = image(np.array([[[[0.75]]]]), device)
    results = []
    for k, expect in ((m.MPSCNNCrossChannelNormalization(device, kernel_size=5, alpha=5.0, beta=1.0), 0.75 / (1 + 0.75 ** 2)),
                      (m.MPSCNNSpatialNormalization(device, 3, 3, alpha=9.0, beta=2.0), 0.75 / (1 + 0.75 ** 2) ** 2),
                      (m.MPSCNNLocalContrastNormalization(device, 3, 3, alpha=0.0, delta=0.25, pm=1.0), 1.0 + (0.75 - 0.75 / 9) / 0.5)):
        results.append((k.encode(cb, x_img), expect, type(k).__name__))
    finish(cb)
    for y, expect, name in results:
        assert_close(values(y), np.full((1, 1, 1, 1), expect), "float32", msg=name)


def test_local_contrast_documented_example(device, cb) -> None:
    """pm=0, ps=1, p0=1, delta=0, alpha=1, beta=0.5 and a window covering the image: zero
    mean, unit variance."""
    k = m.MPSCNNLocalContrastNormalization(device, 5, 5, alpha=1.0, beta=0.5, delta=0.0, p0=1.0, pm=0.0, ps=1.0)
    k.padding = int(PM.sizeValidOnly)
    data = rand(5, (1, 5, 5, 2))
    x_img, x = image(data, device)
    y = k.encode(cb, x_img)
    finish(cb)
    assert y.shape == (1, 1, 1, 2)
    expect = (x[0, 2, 2] - x[0].mean(axis=(0, 1))) / x[0].std(axis=(0, 1))
    assert_close(values(y)[0, 0, 0], expect, "float32", FWD_TOL)


def test_lcn_default_alpha_is_mean_subtraction(device, cb) -> None:
    """alpha = 0 (the kernel default): Y = (X − M)·(1/1024)^−0.5 = 32·(X − M)."""
    k = m.MPSCNNLocalContrastNormalization(device, kernel_width=3, kernel_height=3)
    x_img, x = image(rand(6, (1, 4, 4, 1)), device)
    y = k.encode(cb, x_img)
    finish(cb)
    mean = np.zeros_like(x)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for yy in range(4):
        for xx in range(4):
            mean[0, yy, xx] = xp[0, yy:yy + 3, xx:xx + 3].sum(axis=(0, 1)) / 9
    assert_close(values(y), 32.0 * (x - mean), "float32", FWD_TOL)


def test_encode_batch_forward(device, cb) -> None:
    k = m.MPSCNNSpatialNormalization(device, 3, 3, alpha=2.0, beta=0.75)
    imgs = [image(rand(20 + i, (1, 4, 5, 6)), device) for i in range(3)]
    ys = k.encode_batch(cb, [i for i, _ in imgs])
    dests = [poisoned((1, 4, 5, 6), device)[0] for _ in range(3)]
    k.encode_batch(cb, [i for i, _ in imgs], dests)
    finish(cb)
    case = Case("b", "spatial", (3, 3), {"alpha": 2.0, "beta": 0.75})
    for (_, x), y, d in zip(imgs, ys, dests):
        assert_close(values(y), literal(case, x), "float32", FWD_TOL)
        assert_close(values(d), literal(case, x), "float32", FWD_TOL)


def test_unorm8_destination(device, cb) -> None:
    k = m.MPSCNNCrossChannelNormalization(device, kernel_size=3, alpha=0.1, beta=0.75)
    x_img, x = image(rand(30, (1, 3, 3, 4), 0.0, 1.0), device)
    d = m.MPSImage(device, image_descriptor=m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.unorm8, width=3,
                                                                   height=3, feature_channels=4))
    k.encode(cb, x_img, d)
    finish(cb)
    ref = np.clip(R.cross_channel_normalization(x, 3, {"alpha": 0.1, "beta": 0.75}), 0, 1)
    assert_close(values(d), ref, "unorm8")


# -- properties, init forms, errors ----------------------------------------------------------------


def test_properties_defaults_and_init_forms(device) -> None:
    lrn = m.MPSCNNCrossChannelNormalization(device, kernel_size=5)
    assert (lrn.alpha, lrn.beta, lrn.delta, lrn.kernel_size) == (1.0, 5.0, 1.0, 5)
    assert (lrn.kernel_width, lrn.kernel_height, lrn.stride_in_pixels_x) == (1, 1, 1)
    assert m.MPSCNNCrossChannelNormalization(device, 3).kernel_size == 3
    sp = m.MPSCNNSpatialNormalization(device, 3, 3)
    assert (sp.alpha, sp.beta, sp.delta, sp.kernel_width, sp.kernel_height) == (1.0, 5.0, 1.0, 3, 3)
    lcn = m.MPSCNNLocalContrastNormalization(device, kernel_width=4, kernel_height=4)
    assert (lcn.alpha, lcn.beta, lcn.delta, lcn.p0, lcn.pm, lcn.ps) == (0.0, 0.5, 1.0 / 1024, 1.0, 0.0, 1.0)
    for k in (lrn, sp, lcn):
        assert k.edge_mode == Z and k.offset == MPSOffset(0, 0, 0) and k.clip_rect == m.MPSRectNoClip and not k.is_backwards
        assert isinstance(k, m.MPSCNNKernel)
    lcn.alpha, lcn.p0, lcn.pm, lcn.ps = -0.5, 0.25, 2, 3.0   # no range stated for LCN's alpha
    assert (lcn.alpha, lcn.p0, lcn.pm, lcn.ps) == (-0.5, 0.25, 2.0, 3.0)
    sp.alpha = 0.1
    assert sp.alpha == float(np.float32(0.1))                 # float32 properties
    with pytest.raises(AttributeError):
        lrn.kernel_size = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        sp.kernel_width = 5  # type: ignore[misc]
    c = lrn.copy()
    c.alpha = 3.0
    assert lrn.alpha == 1.0 and c.kernel_size == 5
    assert {"MPSCNNCrossChannelNormalization", "MPSCNNSpatialNormalization", "MPSCNNLocalContrastNormalization",
            "MPSCNNCrossChannelNormalizationGradient", "MPSCNNSpatialNormalizationGradient",
            "MPSCNNLocalContrastNormalizationGradient"} <= set(m.__all__)


def test_errors(device, cb) -> None:
    with pytest.raises(m.MPSTypeError, match="MPSCNNCrossChannelNormalization: `kernel_size` is required"):
        m.MPSCNNCrossChannelNormalization(device)
    with pytest.raises(m.MPSTypeError, match="MPSCNNSpatialNormalization: `kernel_width` is required"):
        m.MPSCNNSpatialNormalization(device)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNCrossChannelNormalization: `kernel_size` \(=0\) must be an integer >= 1"):
        m.MPSCNNCrossChannelNormalization(device, 0)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalization: `kernel_height` \(=5\) must equal kernel_width=3"):
        m.MPSCNNSpatialNormalization(device, 3, 5)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNLocalContrastNormalization: `kernel_height` \(=2\) must equal"):
        m.MPSCNNLocalContrastNormalization(device, 4, 2)
    sp = m.MPSCNNSpatialNormalization(device, 3, 3)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalization: `alpha` \(=-1.0\) must be >= 0"):
        sp.alpha = -1.0
    with pytest.raises(m.MPSValueError, match=r"`alpha` \(=-0.1\) must be >= 0"):
        m.MPSCNNCrossChannelNormalization(device, 3, alpha=-0.1)
    with pytest.raises(m.MPSValueError, match=r"`beta` \(=nan\) must be a finite real number"):
        sp.beta = float("nan")
    with pytest.raises(m.MPSValueError, match=r"`delta` \(='1'\) must be a real number, but got str"):
        sp.delta = "1"
    with pytest.raises(m.MPSValueError, match=r"`ps` \(=1e\+300\) must fit in a float32"):
        m.MPSCNNLocalContrastNormalization(device, 3, 3).ps = 1e300
    assert sp.alpha == 1.0 and sp.beta == 5.0  # a refused value changes nothing
    sp.edge_mode = MPSImageEdgeMode.mirror
    x_img, _ = image(rand(1, (1, 3, 3, 2)), device)
    d_img, before = poisoned((1, 3, 3, 2), device)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNSpatialNormalization: `edge_mode` \(='mirror'\) must be zero or clamp"):
        sp.encode(cb, x_img, d_img)
    assert np.isnan(values(d_img)).all()
    lrn = m.MPSCNNCrossChannelNormalization(device, 3)
    with pytest.raises(m.MPSValueError, match=r"`destination_image.feature_channels` \(=2\) must be >= destination_feature_channel_offset \+ 4"):
        lrn.encode(cb, image(rand(2, (1, 3, 3, 4)), device)[0], d_img)


# -- backend contract ------------------------------------------------------------------------------


def test_backend_functions_on_plain_tensors() -> None:
    x = torch.from_numpy(rand(40, (1, 4, 5, 6)))
    y = backend.cross_channel_normalization_nhwc(x.half(), 3, 1.0, 0.75, 1.0)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(backend.cross_channel_normalization_nhwc(x, 3, 1.0, 0.75, 1.0),
                 R.cross_channel_normalization(x.numpy(), 3, {"alpha": 1.0, "beta": 0.75}), F64)
    block = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    assert_close(backend.spatial_normalization_nhwc(block, 3, 3, 2.0, 0.5, 1.0)[0],
                 R.spatial_normalization(x[0].numpy(), (3, 3), {"alpha": 2.0, "beta": 0.5}), F64)
    p = {"alpha": 1.0, "beta": 0.5, "delta": 0.375, "p0": 0.875, "pm": 0.125, "ps": 1.25}  # exact in float32
    assert_close(backend.local_contrast_normalization_nhwc(block, 3, 3, *p.values())[0],
                 R.local_contrast_normalization(x[0].numpy(), (3, 3), p), F64)
    # fold_block: clamp sums aliased rows/columns into the edge, zero drops them
    d = torch.ones(1, 4, 4, 1, dtype=torch.float64)
    assert backend.fold_block(d, -1, -1, 2, 2, True)[0, :, :, 0].tolist() == [[4.0, 4.0], [4.0, 4.0]]
    assert backend.fold_block(d, -1, -1, 2, 2, False)[0, :, :, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert backend.fold_block(d, 1, 0, 3, 6, True)[0, :, :, 0].tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]] * 2 + [[0.0, 2.0, 2.0, 2.0, 2.0, 0.0]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_backend_does_not_synchronise_the_host() -> None:
    x = torch.randn(2, 8, 8, 16, device="cuda", dtype=torch.bfloat16)
    blk = torch.randn(2, 10, 10, 16, device="cuda", dtype=torch.float16)
    g = torch.randn(2, 8, 8, 16, device="cuda")

    def run() -> None:
        backend.cross_channel_normalization_gradient_nhwc(g, x, 5, 1e-4, 0.75, 1.0)
        backend.cross_channel_normalization_nhwc(x, 5, 1e-4, 0.75, 1.0)
        backend.spatial_normalization_gradient_nhwc(g, blk, 3, 3, 1.0, 0.75, 1.0)
        backend.local_contrast_normalization_gradient_nhwc(g, blk, 3, 3, 1.0, 0.5, 0.1, 1.0, 0.0, 1.0)
        backend.fold_block(blk, -1, -1, 8, 8, True)
    run()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sync debug mode is a prototype feature"
        try:
            torch.cuda.set_sync_debug_mode("error")
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
