"""MPSCNNUpsampling{Nearest,Bilinear} and their gradients against three oracles.

1. ``mpsnn.testing.reference_upsampling`` (float64 NumPy loops written from the spec) for
   every mode, factors, storage dtype and device, whole images and awkward geometry
   (offsets, clip rects, channel windows, batches, edge modes).
2. ``torch.autograd`` in float64 on torch forwards written here (``F.interpolate`` where its
   formula is the spec's, an explicit gather otherwise), random upstream gradients.
3. The adjoint identity ``<F x, g> = <x, F^T g>`` for the references (validates them) and
   for the kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn
from mpsnn import MPSImageEdgeMode, MPSOffset, MTLRegion
from mpsnn.backends import upsampling as backend
from mpsnn.testing import reference_upsampling as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 7)            # N, H, W, C: odd sizes, channels not a multiple of 4
#: float32 sums of up to sX*sY (<= 9) products with weights of a few ulps each
GRAD_TOL = {torch.float32: Tol(1e-5, 1e-5)}

# (id, method, sx, sy, align_corners)
MODES = [
    ("nearest-2x2", "nearest", 2, 2, False),
    ("nearest-3x1", "nearest", 3, 1, False),
    ("nearest-1x1", "nearest", 1, 1, False),
    ("bilinear-2x3", "bilinear", 2, 3, False),
    ("bilinear-1x1", "bilinear", 1, 1, False),
    ("bilinear-align-2x2", "bilinear", 2, 2, True),
    ("bilinear-align-3x2", "bilinear", 3, 2, True),
]
MODE_PARAMS = [pytest.param(*m[1:], id=m[0]) for m in MODES]


def forward_kernel(device, method, sx, sy, align=False):
    if method == "nearest":
        return mpsnn.MPSCNNUpsamplingNearest(device, integer_scale_factor_x=sx, integer_scale_factor_y=sy)
    return mpsnn.MPSCNNUpsamplingBilinear(device, integer_scale_factor_x=sx, integer_scale_factor_y=sy, align_corners=align)


def gradient_kernel(device, method, sx, sy):
    cls = mpsnn.MPSCNNUpsamplingNearestGradient if method == "nearest" else mpsnn.MPSCNNUpsamplingBilinearGradient
    return cls(device, integer_scale_factor_x=sx, integer_scale_factor_y=sy)


def ref_forward(x, method, sx, sy, align):
    return ref.upsample_nearest_nhwc(x, sx, sy) if method == "nearest" else ref.upsample_bilinear_nhwc(x, sx, sy, align)


def ref_gradient(g, method, sx, sy, align):
    return ref.upsample_nearest_gradient_nhwc(g, sx, sy) if method == "nearest" else ref.upsample_bilinear_gradient_nhwc(g, sx, sy, align)


def up_shape(shape, sx, sy):
    n, h, w, c = shape
    return (n, sy * h, sx * w, c)


# -- references validate each other ------------------------------------------------------------------------


@pytest.mark.parametrize("method,sx,sy,align", MODE_PARAMS)
def test_reference_gradient_is_the_adjoint_of_the_reference_forward(method, sx, sy, align) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 2))
    g = rng.normal(size=up_shape(x.shape, sx, sy))
    lhs = np.sum(ref_forward(x, method, sx, sy, align) * g)
    rhs = np.sum(x * ref_gradient(g, method, sx, sy, align))
    assert_close(lhs, rhs, torch.float64)


def test_reference_kernel_matches_whole_image_reference() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 3, 4, 2))
    for method, sx, sy, align in [m[1:] for m in MODES]:
        dest = np.zeros(up_shape(x.shape, sx, sy))
        got = ref.upsampling_kernel_reference(x, dest, method=method, sx=sx, sy=sy, align_corners=align)
        assert_close(got, ref_forward(x, method, sx, sy, align), torch.float64, msg=f"{method} {sx}x{sy}")


# -- forward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("method,sx,sy,align", MODE_PARAMS)
def test_forward_matches_reference(device, cb, method, sx, sy, align, dtype) -> None:
    rng = np.random.default_rng(sx * 10 + sy)
    x_img, x = image(rng.uniform(-2, 2, SHAPE), device, dtype)
    k = forward_kernel(device, method, sx, sy, align)
    dst = poisoned(up_shape(SHAPE, sx, sy), device, dtype=dtype)[0]
    k.encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), ref_forward(x, method, sx, sy, align), dtype, msg=f"{method} {sx}x{sy} align={align}")


def test_nearest_documented_example_exact(device, cb) -> None:
    x_img, x = image(np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1), device)
    y = forward_kernel(device, "nearest", 2, 2).encode(cb, x_img)
    finish(cb)
    expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], np.float64)
    assert np.array_equal(values(y)[0, :, :, 0], expected)


def test_bilinear_without_aligned_corners_known_values(device, cb) -> None:
    """u = i/s, clamped to W-1: [0, 4] upsampled by 2 is [0, 2, 4, 4] (no half-pixel shift)."""
    x_img, _ = image(np.array([0.0, 4.0]).reshape(1, 1, 2, 1), device)
    y = forward_kernel(device, "bilinear", 2, 1).encode(cb, x_img)
    finish(cb)
    assert np.array_equal(values(y)[0, 0, :, 0], [0.0, 2.0, 4.0, 4.0])


def test_bilinear_aligned_corners_keep_corner_values(device, cb) -> None:
    rng = np.random.default_rng(3)
    x_img, x = image(rng.normal(size=(1, 3, 4, 2)), device)
    y_img = forward_kernel(device, "bilinear", 3, 2, True).encode(cb, x_img)
    # [0, 3] with aligned corners, factor 2: u = i * 1/3
    x2_img, _ = image(np.array([0.0, 3.0]).reshape(1, 1, 2, 1), device)
    y2 = forward_kernel(device, "bilinear", 2, 1, True).encode(cb, x2_img)
    finish(cb)
    y = values(y_img)
    for yy, xx, sy, sx in ((0, 0, 0, 0), (0, -1, 0, -1), (-1, 0, -1, 0), (-1, -1, -1, -1)):
        assert np.array_equal(y[0, yy, xx], x[0, sy, sx])
    assert_close(values(y2)[0, 0, :, 0], [0.0, 1.0, 2.0, 3.0], torch.float32)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_factor_one_is_a_copy(device, cb, method) -> None:
    rng = np.random.default_rng(4)
    x_img, x = image(rng.normal(size=SHAPE), device)
    y = forward_kernel(device, method, 1, 1).encode(cb, x_img)
    finish(cb)
    assert np.array_equal(values(y), x)
    assert y.tensor.data_ptr() != x_img.tensor.data_ptr()


GEOMETRIES = [
    # (id, method, sx, sy, align, properties)
    ("nearest-offset-clip", "nearest", 2, 2, False, dict(offset=MPSOffset(1, 0, 0), clip_rect=MTLRegion.make_2d(1, 2, 5, 4))),
    ("nearest-negative-offset-zero", "nearest", 2, 3, False, dict(offset=MPSOffset(-1, -1, 0), edge_mode=MPSImageEdgeMode.zero)),
    ("nearest-negative-offset-clamp", "nearest", 2, 3, False, dict(offset=MPSOffset(-1, 1, 0), edge_mode=MPSImageEdgeMode.clamp)),
    ("nearest-channels", "nearest", 2, 1, False, dict(source_feature_channel_offset=4, source_feature_channel_max_count=2,
                                                       destination_feature_channel_offset=4)),
    ("nearest-batch", "nearest", 3, 2, False, dict(offset=MPSOffset(0, 0, 1), clip_rect=MTLRegion.make_3d(0, 0, 0, 99, 99, 1))),
    ("bilinear-offset-zero-edge", "bilinear", 2, 2, False, dict(offset=MPSOffset(-1, 2, 0), edge_mode=MPSImageEdgeMode.zero)),
    ("bilinear-clip-channels", "bilinear", 3, 2, False, dict(clip_rect=MTLRegion.make_2d(2, 1, 9, 3), source_feature_channel_offset=4,
                                                              destination_feature_channel_offset=0)),
    ("bilinear-align-offset-batch", "bilinear", 2, 2, True, dict(offset=MPSOffset(1, 1, 1), clip_rect=MTLRegion.make_3d(0, 1, 1, 7, 99, 1))),
]


def _ref_props(props):
    clip = props.get("clip_rect")
    return dict(offset=props.get("offset", MPSOffset()), clip_rect=clip, src_c_off=props.get("source_feature_channel_offset", 0),
                src_c_max=props.get("source_feature_channel_max_count"), dst_c_off=props.get("destination_feature_channel_offset", 0),
                edge_mode=props.get("edge_mode", MPSImageEdgeMode.zero))


@pytest.mark.parametrize("dtype", [STORAGE_DTYPES[0], STORAGE_DTYPES[1]])
@pytest.mark.parametrize("method,sx,sy,align,props", [pytest.param(*g[1:], id=g[0]) for g in GEOMETRIES])
def test_forward_geometry_matches_reference(device, cb, method, sx, sy, align, props, dtype) -> None:
    rng = np.random.default_rng(5)
    x_img, x = image(rng.uniform(-2, 2, (2, 3, 4, 8)), device, dtype)
    k = forward_kernel(device, method, sx, sy, align)
    for name, v in props.items():
        setattr(k, name, v)
    dst, before = poisoned((2, 3 * sy, 4 * sx, 8), device, dtype=dtype)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = ref.upsampling_kernel_reference(x, before, method=method, sx=sx, sy=sy, align_corners=align, **_ref_props(props))
    assert_close(values(dst), expected, dtype, msg=f"{method} {props}")
    assert np.isnan(expected).any() == ("clip_rect" in props or "destination_feature_channel_offset" in props)


def test_bilinear_ignores_edge_mode(device, cb) -> None:
    rng = np.random.default_rng(6)
    x_img, _ = image(rng.normal(size=(1, 3, 4, 2)), device)
    outs = []
    for mode in (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp):
        k = forward_kernel(device, "bilinear", 2, 2)
        k.offset, k.edge_mode = MPSOffset(-2, -1, 0), mode
        d = poisoned((1, 6, 8, 2), device)[0]
        k.encode(cb, x_img, d)
        outs.append(d)
    finish(cb)
    assert np.array_equal(values(outs[0]), values(outs[1]))


def test_unorm8_destination(device, cb) -> None:
    rng = np.random.default_rng(7)
    x_img, x = image(rng.uniform(-0.2, 1.2, (1, 2, 3, 3)), device)
    desc = mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.unorm8, width=6, height=4, feature_channels=3)
    dst = mpsnn.MPSImage(device, image_descriptor=desc)
    forward_kernel(device, "bilinear", 2, 2).encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), np.clip(ref.upsample_bilinear_nhwc(x, 2, 2, False), 0, 1), "unorm8")


# -- encode forms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_auto_sized_forms(device, cb, method) -> None:
    rng = np.random.default_rng(8)
    x_img, x = image(rng.normal(size=(1, 3, 5, 6)), device)
    k = forward_kernel(device, method, 3, 2)
    k.offset = MPSOffset(1, 1, 0)
    k.source_feature_channel_offset = 4
    y = k.encode(cb, x_img)
    assert y.shape == (1, 6, 15, 2) and k.offset == MPSOffset(0, 0, 0)
    y2, st = k.encode(cb, x_img, destination_state_is_temporary=True)
    assert isinstance(st, mpsnn.MPSNNGradientState) and st.is_temporary and (st.source_width, st.source_height) == (5, 3)
    batch_src = [image(rng.normal(size=(1, 2, 2, 3)), device)[0] for _ in range(3)]
    k.source_feature_channel_offset = 0
    ys = k.encode_batch(cb, batch_src)
    ys2, sts = k.encode_batch(cb, batch_src, destination_state_is_temporary=False)
    finish(cb)
    expected = ref_forward(x[..., 4:], method, 3, 2, False)
    assert_close(values(y), expected, torch.float32)
    assert_close(values(y2), expected, torch.float32)
    assert len(ys) == 3 and len(sts) == 3 and not sts[0].is_temporary
    for s, a, b in zip(batch_src, ys, ys2):
        assert a.shape == (1, 4, 6, 3)
        assert_close(values(a), ref_forward(values(s), method, 3, 2, False), torch.float32)
        assert np.array_equal(values(a), values(b))


def test_explicit_batch_form(device, cb) -> None:
    rng = np.random.default_rng(9)
    srcs = [image(rng.normal(size=(1, 2, 3, 2)), device) for _ in range(2)]
    dsts = [poisoned((1, 4, 6, 2), device)[0] for _ in range(2)]
    k = forward_kernel(device, "bilinear", 2, 2, True)
    k.encode_batch(cb, [s for s, _ in srcs], dsts)
    finish(cb)
    for (_, x), d in zip(srcs, dsts):
        assert_close(values(d), ref_forward(x, "bilinear", 2, 2, True), torch.float32)


def test_descriptor_and_properties(device) -> None:
    k = forward_kernel(device, "bilinear", 2, 3, True)
    assert (k.scale_factor_x, k.scale_factor_y, k.align_corners) == (2.0, 3.0, True)
    assert isinstance(k.scale_factor_x, float)
    assert forward_kernel(device, "bilinear", 2, 3).align_corners is False
    n = forward_kernel(device, "nearest", 4.0, 1)
    assert (n.scale_factor_x, n.align_corners) == (4.0, False)
    x_img = image(np.zeros((2, 3, 5, 9)), device)[0]
    k.source_feature_channel_max_count = 5
    desc = k.destination_image_descriptor([x_img])
    assert (desc.width, desc.height, desc.feature_channels, desc.number_of_images) == (10, 9, 5, 2)
    with pytest.raises(AttributeError):
        k.scale_factor_x = 3.0  # type: ignore[misc]
    g = gradient_kernel(device, "bilinear", 2, 3)
    assert (g.scale_factor_x, g.scale_factor_y) == (2.0, 3.0) and not hasattr(g, "align_corners")


@pytest.mark.parametrize("bad", [0, -1, 2.5, float("nan"), float("inf"), True, "2", None])
def test_bad_scale_factors(device, bad) -> None:
    with pytest.raises(mpsnn.MPSError, match="integer_scale_factor_x"):
        mpsnn.MPSCNNUpsamplingNearest(device, integer_scale_factor_x=bad, integer_scale_factor_y=2)
    with pytest.raises(mpsnn.MPSError, match="integer_scale_factor_y"):
        mpsnn.MPSCNNUpsamplingBilinearGradient(device, integer_scale_factor_x=2, integer_scale_factor_y=bad)


def test_construction_errors(device) -> None:
    with pytest.raises(mpsnn.MPSTypeError, match="base class"):
        mpsnn.MPSCNNUpsampling(device, integer_scale_factor_x=2, integer_scale_factor_y=2)
    with pytest.raises(mpsnn.MPSTypeError, match="base class"):
        mpsnn.MPSCNNUpsamplingGradient(device, integer_scale_factor_x=2, integer_scale_factor_y=2)
    with pytest.raises(mpsnn.MPSTypeError, match="required"):
        mpsnn.MPSCNNUpsamplingBilinear(device)
    with pytest.raises(mpsnn.MPSTypeError, match="align_corners"):
        mpsnn.MPSCNNUpsamplingBilinear(device, integer_scale_factor_x=2, integer_scale_factor_y=2, align_corners=1)


def test_unsupported_edge_mode_is_refused(device, cb) -> None:
    k = forward_kernel(device, "nearest", 2, 2)
    k.edge_mode = MPSImageEdgeMode.mirror
    with pytest.raises(mpsnn.MPSError, match="edge_mode"):
        k.encode(cb, image(np.zeros((1, 2, 2, 1)), device)[0])


# -- gradients ---------------------------------------------------------------------------------------------


def run_forward_with_state(device, cb, k, x_img, dst):
    st = k.result_state(x_img, destination_image=dst)
    k.encode(cb, x_img, dst, destination_state=st)
    return st


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("method,sx,sy,align", MODE_PARAMS)
def test_gradient_matches_reference(device, cb, method, sx, sy, align, dtype) -> None:
    rng = np.random.default_rng(20 + sx * 3 + sy)
    x_img, x = image(rng.normal(size=SHAPE), device, dtype)
    k = forward_kernel(device, method, sx, sy, align)
    st = run_forward_with_state(device, cb, k, x_img, poisoned(up_shape(SHAPE, sx, sy), device, dtype=dtype)[0])
    g_img, g = image(rng.normal(size=up_shape(SHAPE, sx, sy)), device, dtype)
    dx = poisoned(SHAPE, device, dtype=dtype)[0]
    gradient_kernel(device, method, sx, sy).encode(cb, g_img, x_img, st, dx)
    finish(cb)
    assert_close(values(dx), ref_gradient(g, method, sx, sy, align), dtype, GRAD_TOL, msg=f"{method} {sx}x{sy} align={align}")


def _torch_bilinear_no_align(x: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
    """Spec §4 without aligned corners, as a differentiable float64 torch function (NHWC)."""
    n, h, w, c = x.shape

    def axis(t: torch.Tensor, dim: int, n_in: int, s: int) -> torch.Tensor:
        u = torch.clamp(torch.arange(s * n_in, dtype=torch.float64) / s, max=n_in - 1)
        i0 = torch.floor(u).long()
        i1 = torch.clamp(i0 + 1, max=n_in - 1)
        frac = (u - i0).view([-1 if d == dim else 1 for d in range(4)])
        return t.index_select(dim, i0) * (1 - frac) + t.index_select(dim, i1) * frac

    return axis(axis(x, 2, w, sx), 1, h, sy)


def torch_forward(x: torch.Tensor, method: str, sx: int, sy: int, align: bool) -> torch.Tensor:
    if method == "bilinear" and not align:
        return _torch_bilinear_no_align(x, sx, sy)
    nchw = x.permute(0, 3, 1, 2)
    if method == "nearest":
        y = F.interpolate(nchw, scale_factor=(sy, sx), mode="nearest")
    else:
        y = F.interpolate(nchw, scale_factor=(sy, sx), mode="bilinear", align_corners=True)
    return y.permute(0, 2, 3, 1)


@pytest.mark.parametrize("method,sx,sy,align", MODE_PARAMS)
def test_gradient_matches_autograd(device, cb, method, sx, sy, align) -> None:
    rng = np.random.default_rng(40 + sx + sy)
    x_img, x = image(rng.normal(size=SHAPE), device)
    k = forward_kernel(device, method, sx, sy, align)
    y_img = poisoned(up_shape(SHAPE, sx, sy), device)[0]
    st = run_forward_with_state(device, cb, k, x_img, y_img)
    g_img, g = image(rng.normal(size=up_shape(SHAPE, sx, sy)), device)
    dx = gradient_kernel(device, method, sx, sy).encode(cb, g_img, x_img, st)
    finish(cb)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch_forward(xt, method, sx, sy, align)
    assert_close(yt.detach(), ref_forward(x, method, sx, sy, align), torch.float64, msg="torch forward = reference")
    assert_close(values(y_img), yt.detach(), torch.float32, msg="kernel forward vs torch")
    (expected,) = torch.autograd.grad(yt, xt, grad_outputs=torch.from_numpy(g))
    assert_close(values(dx), expected, torch.float32, GRAD_TOL, msg="gradient vs autograd")


GRAD_GEOMETRIES = [
    ("nearest-offset-clip", "nearest", 2, 2, False, dict(offset=MPSOffset(1, 0, 0), clip_rect=MTLRegion.make_3d(1, 2, 0, 5, 4, 2))),
    ("nearest-reads-off-grid", "nearest", 2, 3, False, dict(offset=MPSOffset(-1, 1, 0), edge_mode=MPSImageEdgeMode.clamp)),
    ("bilinear-channels", "bilinear", 2, 2, False, dict(source_feature_channel_offset=4, source_feature_channel_max_count=3,
                                                         destination_feature_channel_offset=4)),
    ("bilinear-align-offset-clip", "bilinear", 3, 2, True, dict(offset=MPSOffset(1, 0, 0), clip_rect=MTLRegion.make_3d(0, 1, 0, 7, 4, 2))),
]


@pytest.mark.parametrize("method,sx,sy,align,props", [pytest.param(*g[1:], id=g[0]) for g in GRAD_GEOMETRIES])
def test_gradient_geometry_matches_reference(device, cb, method, sx, sy, align, props) -> None:
    rng = np.random.default_rng(60)
    shape = (2, 3, 4, 8)
    x_img, x = image(rng.normal(size=shape), device)
    k = forward_kernel(device, method, sx, sy, align)
    for name, v in props.items():
        setattr(k, name, v)
    y_img = poisoned(up_shape(shape, sx, sy), device)[0]
    st = run_forward_with_state(device, cb, k, x_img, y_img)
    g_img, g = image(rng.normal(size=up_shape(shape, sx, sy)), device)
    dx, before = poisoned(shape, device)
    gradient_kernel(device, method, sx, sy).encode(cb, g_img, x_img, st, dx)
    dx_auto = gradient_kernel(device, method, sx, sy).encode(cb, g_img, x_img, st)
    finish(cb)
    rp = _ref_props(props)
    rp.pop("edge_mode")
    expected = ref.upsampling_gradient_reference(g, x, before, method=method, sx=sx, sy=sy, align_corners=align, **rp)
    assert_close(values(dx), expected, torch.float32, GRAD_TOL, msg=f"{method} {props}")
    # the auto-sized result is the forward source's size, zero outside the channel window
    assert dx_auto.shape == shape
    expected_auto = ref.upsampling_gradient_reference(g, x, np.zeros(shape), method=method, sx=sx, sy=sy, align_corners=align, **rp)
    assert_close(values(dx_auto), expected_auto, torch.float32, GRAD_TOL)


def test_gradient_is_the_adjoint_of_the_forward(device, cb) -> None:
    """<F x, g> = <x, F^T g> for a forward with an offset and a clip rect inside the grid."""
    rng = np.random.default_rng(70)
    shape = (1, 4, 5, 3)
    x_img, x = image(rng.normal(size=shape), device)
    k = forward_kernel(device, "bilinear", 3, 2, True)
    # destination x in [2, 14) reads grid column x + 1 < 15, row y in [0, 6) reads y + 2 < 8: all on the grid
    k.offset, k.clip_rect = MPSOffset(1, 1, 0), MTLRegion.make_2d(2, 0, 12, 6)
    y_img = image(np.zeros((1, 8, 15, 3)), device)[0]
    st = run_forward_with_state(device, cb, k, x_img, y_img)
    g_img, g = image(rng.normal(size=(1, 8, 15, 3)), device)
    dx = gradient_kernel(device, "bilinear", 3, 2).encode(cb, g_img, x_img, st)
    finish(cb)
    assert_close(np.sum(values(y_img) * g), np.sum(x * values(dx)), torch.float32, {torch.float32: Tol(1e-5, 1e-4)})


def test_gradient_batch_forms(device, cb) -> None:
    rng = np.random.default_rng(80)
    k = forward_kernel(device, "nearest", 2, 3)
    xs = [image(rng.normal(size=(1, 2, 3, 5)), device) for _ in range(2)]
    ys, sts = k.encode_batch(cb, [i for i, _ in xs], destination_state_is_temporary=False)
    gs = [image(rng.normal(size=(1, 6, 6, 5)), device) for _ in range(2)]
    grad = gradient_kernel(device, "nearest", 2, 3)
    auto = grad.encode_batch(cb, [i for i, _ in gs], [i for i, _ in xs], sts)
    explicit = [poisoned((1, 2, 3, 5), device)[0] for _ in range(2)]
    grad.encode_batch(cb, [i for i, _ in gs], [i for i, _ in xs], sts, explicit)
    finish(cb)
    for (_, g), a, e in zip(gs, auto, explicit):
        expected = ref.upsample_nearest_gradient_nhwc(g, 2, 3)
        assert_close(values(a), expected, torch.float32, GRAD_TOL)
        assert_close(values(e), expected, torch.float32, GRAD_TOL)


def test_gradient_without_state(device, cb) -> None:
    rng = np.random.default_rng(90)
    x_img, _ = image(rng.normal(size=(1, 3, 4, 2)), device)
    g_img, g = image(rng.normal(size=(1, 6, 8, 2)), device)
    grad = gradient_kernel(device, "bilinear", 2, 2)
    dx = grad.encode(cb, g_img, x_img, None)
    with pytest.raises(mpsnn.MPSValueError, match="source_gradient"):
        grad.encode(cb, image(np.zeros((1, 6, 7, 2)), device)[0], x_img, None)
    finish(cb)
    assert dx.shape == (1, 3, 4, 2)
    assert_close(values(dx), ref.upsample_bilinear_gradient_nhwc(g, 2, 2, False), torch.float32, GRAD_TOL)


def test_gradient_state_errors(device, cb) -> None:
    x_img, _ = image(np.zeros((1, 3, 4, 2)), device)
    g_img, _ = image(np.zeros((1, 6, 8, 2)), device)
    st = run_forward_with_state(device, cb, forward_kernel(device, "nearest", 2, 2), x_img, poisoned((1, 6, 8, 2), device)[0])
    with pytest.raises(mpsnn.MPSValueError, match="scale_factor_y"):
        gradient_kernel(device, "nearest", 2, 3).encode(cb, g_img, x_img, st)
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNUpsamplingBilinear forward"):
        gradient_kernel(device, "bilinear", 2, 2).encode(cb, g_img, x_img, st)
    with pytest.raises(mpsnn.MPSValueError, match="source_image"):
        gradient_kernel(device, "nearest", 2, 2).encode(cb, g_img, image(np.zeros((1, 3, 5, 2)), device)[0], st)
    with pytest.raises(mpsnn.MPSValueError, match="destination_gradient"):
        gradient_kernel(device, "nearest", 2, 2).encode(cb, g_img, x_img, st, poisoned((1, 3, 5, 2), device)[0])
    with pytest.raises(mpsnn.MPSValueError, match="source_gradient"):
        gradient_kernel(device, "nearest", 2, 2).encode(cb, image(np.zeros((1, 5, 8, 2)), device)[0], x_img, st)
    neuron = mpsnn.MPSCNNNeuronReLU(device)
    nst = neuron.result_state(x_img)
    neuron.encode(cb, x_img, poisoned((1, 3, 4, 2), device)[0], destination_state=nst)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNUpsampling forward"):
        gradient_kernel(device, "nearest", 2, 2).encode(cb, g_img, x_img, nst)
    finish(cb)


# -- backend entry points ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,sx,sy,align", MODE_PARAMS)
def test_backend_entry_points(device, method, sx, sy, align) -> None:
    rng = np.random.default_rng(100)
    x = rng.normal(size=(1, 2, 3, 2))
    g = rng.normal(size=up_shape(x.shape, sx, sy))
    xt = torch.from_numpy(x).to(device.torch_device, torch.float32)
    gt = torch.from_numpy(g).to(device.torch_device, torch.float32)
    if method == "nearest":
        y, d = backend.upsample_nearest_nhwc(xt, sx, sy), backend.upsample_nearest_gradient_nhwc(gt, sx, sy)
    else:
        y, d = backend.upsample_bilinear_nhwc(xt, sx, sy, align), backend.upsample_bilinear_gradient_nhwc(gt, sx, sy, align)
    assert y.data_ptr() != xt.data_ptr() and d.data_ptr() != gt.data_ptr()
    assert_close(y, ref_forward(x, method, sx, sy, align), torch.float32)
    assert_close(d, ref_gradient(g, method, sx, sy, align), torch.float32, GRAD_TOL)
    # float64 in, float64 out
    y64 = (backend.upsample_nearest_nhwc if method == "nearest" else
           lambda t, a, b: backend.upsample_bilinear_nhwc(t, a, b, align))(xt.double(), sx, sy)
    assert y64.dtype == torch.float64
    assert_close(y64, ref_forward(x.astype(np.float32), method, sx, sy, align), torch.float64)
