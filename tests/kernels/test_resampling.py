"""MPSImageBilinearScale / MPSImageLanczosScale with MPSScaleTransform against the float64
reference ``mpsnn.testing.reference_resampling`` (2-D loops written from the spec, not the
separable tables of the production code), plus exact properties: identity transforms copy,
Lanczos weights sum to one (constant images stay constant), a 2x bilinear reduction averages
2x2 blocks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSImageEdgeMode, MPSOffset, MPSScaleTransform, MTLRegion
from mpsnn.backends import resampling as backend
from mpsnn.testing import reference_resampling as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
METHODS = ["bilinear", "lanczos"]
#: Lanczos sums up to ~19 x 19 signed float32 products (down-scaling by 3)
LANCZOS_TOL = {torch.float32: Tol(1e-5, 1e-5)}


def kernel(device, method):
    return mpsnn.MPSImageBilinearScale(device) if method == "bilinear" else mpsnn.MPSImageLanczosScale(device)


CASES = [
    # (id, source shape, destination shape, transform, properties)
    ("fit-up", (2, 3, 5, 3), (2, 7, 11, 3), None, {}),
    ("fit-down-3x", (1, 9, 12, 3), (1, 3, 4, 3), None, {}),
    ("transform", (1, 5, 6, 2), (1, 6, 6, 2), MPSScaleTransform(1.5, 0.75, -1.25, 0.5), {}),
    ("transform-down-offset", (1, 8, 9, 2), (1, 4, 5, 2), MPSScaleTransform(0.4, 0.6, 0.25, -0.5), dict(offset=MPSOffset(1, -1, 0))),
    ("fit-into-clip", (1, 4, 4, 2), (1, 7, 9, 2), None, dict(clip_rect=MTLRegion.make_2d(2, 1, 5, 30))),
    ("clip-channels-batch", (2, 4, 5, 8), (2, 6, 6, 8), MPSScaleTransform(1.25, 1.5, 0.0, 1.0),
     dict(clip_rect=MTLRegion.make_3d(1, 0, 0, 4, 5, 1), offset=MPSOffset(0, 0, 1), source_feature_channel_offset=4,
          source_feature_channel_max_count=3, destination_feature_channel_offset=4)),
]


def _ref_props(props):
    return dict(offset=props.get("offset", MPSOffset()), clip_rect=props.get("clip_rect"),
                src_c_off=props.get("source_feature_channel_offset", 0), src_c_max=props.get("source_feature_channel_max_count"),
                dst_c_off=props.get("destination_feature_channel_offset", 0))


# -- references ---------------------------------------------------------------------------------------------


def test_lanczos_window_values() -> None:
    assert ref.lanczos(0.0) == 1.0
    assert ref.lanczos(1.0) == ref.lanczos(-2.0) == ref.lanczos(3.0) == ref.lanczos(3.5) == 0.0
    t = 0.5
    expected = (math.sin(math.pi * t) / (math.pi * t)) * (math.sin(math.pi * t / 3) / (math.pi * t / 3))
    assert ref.lanczos(t) == pytest.approx(expected, rel=1e-15)
    assert ref.lanczos(1.5) < 0 < ref.lanczos(2.5)  # lobe signs
    np.testing.assert_allclose(backend.lanczos_weight(np.array([0.0, 0.5, 1.0, -1.7, 2.5, 3.0])),
                               [ref.lanczos(v) for v in (0.0, 0.5, 1.0, -1.7, 2.5, 3.0)], rtol=1e-14, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_reference_identity_and_constant(method) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 5, 2))
    same = ref.image_scale_reference(x, np.zeros_like(x), method=method)
    assert_close(same, x, torch.float64)
    const = np.full((1, 5, 7, 1), 0.75)
    down = ref.image_scale_reference(const, np.zeros((1, 2, 3, 1)), method=method, transform=(0.37, 0.41, 0.3, -0.2))
    assert_close(down, np.full((1, 2, 3, 1), 0.75), torch.float64)


# -- kernels --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("src_shape,dst_shape,transform,props", [pytest.param(*c[1:], id=c[0]) for c in CASES])
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(device, cb, method, src_shape, dst_shape, transform, props, dtype) -> None:
    rng = np.random.default_rng(sum(src_shape) + sum(dst_shape))
    x_img, x = image(rng.uniform(-1, 1, src_shape), device, dtype)
    k = kernel(device, method)
    k.scale_transform = transform
    for name, v in props.items():
        setattr(k, name, v)
    dst, before = poisoned(dst_shape, device, dtype=dtype)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = ref.image_scale_reference(x, before, method=method, transform=transform, **_ref_props(props))
    assert_close(values(dst), expected, dtype, LANCZOS_TOL, msg=f"{method} {transform} {props}")
    assert np.isnan(expected).any() == ("clip_rect" in props or "destination_feature_channel_offset" in props)


@pytest.mark.parametrize("method", METHODS)
def test_identity_transform_copies_exactly(device, cb, method) -> None:
    rng = np.random.default_rng(2)
    x_img, x = image(rng.normal(size=(2, 3, 5, 3)), device)
    k = kernel(device, method)
    a = poisoned(x.shape, device)[0]
    k.encode(cb, x_img, a)                                   # fit into a same-size destination
    k.scale_transform = MPSScaleTransform(1.0, 1.0, 2.0, -1.0)  # whole-pixel shift: a clamped copy
    b = poisoned(x.shape, device)[0]
    k.encode(cb, x_img, b)
    finish(cb)
    assert np.array_equal(values(a), x)
    cols = np.clip(np.arange(5) - 2, 0, 4)
    rows = np.clip(np.arange(3) + 1, 0, 2)
    assert np.array_equal(values(b), x[:, rows][:, :, cols])


def test_lanczos_keeps_constants(device, cb) -> None:
    x_img, _ = image(np.full((1, 9, 10, 2), 0.625), device)
    k = kernel(device, "lanczos")
    k.scale_transform = MPSScaleTransform(0.3, 0.45, 0.2, -0.7)
    d = poisoned((1, 4, 3, 2), device)[0]
    k.encode(cb, x_img, d)
    finish(cb)
    assert_close(values(d), np.full((1, 4, 3, 2), 0.625), torch.float32)


def test_bilinear_halving_averages_blocks(device, cb) -> None:
    """Fit 4x4 into 2x2: u = 2i + 0.5, the mean of each 2x2 block (dyadic values: exact)."""
    x_img, x = image(np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1), device)
    d = poisoned((1, 2, 2, 1), device)[0]
    kernel(device, "bilinear").encode(cb, x_img, d)
    finish(cb)
    assert np.array_equal(values(d)[0, :, :, 0], x[0, :, :, 0].reshape(2, 2, 2, 2).mean(axis=(1, 3)))


def test_edge_mode_has_no_effect(device, cb) -> None:
    rng = np.random.default_rng(3)
    x_img, _ = image(rng.normal(size=(1, 4, 4, 1)), device)
    outs = []
    for mode in (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp):
        k = kernel(device, "lanczos")
        k.edge_mode = mode
        k.scale_transform = MPSScaleTransform(2.0, 2.0, -3.0, -3.0)
        d = poisoned((1, 8, 8, 1), device)[0]
        k.encode(cb, x_img, d)
        outs.append(d)
    finish(cb)
    assert np.array_equal(values(outs[0]), values(outs[1]))


@pytest.mark.parametrize("method", METHODS)
def test_auto_sized_and_batch_forms(device, cb, method) -> None:
    rng = np.random.default_rng(4)
    x_img, x = image(rng.normal(size=(1, 4, 6, 2)), device)
    k = kernel(device, method)
    k.offset = MPSOffset(1, 1, 0)
    same = k.encode(cb, x_img)
    assert same.shape == x.shape and k.offset == MPSOffset(0, 0, 0)
    k.scale_transform = MPSScaleTransform(1.5, 0.5, 0.0, 0.0)
    scaled = k.encode(cb, x_img)
    assert scaled.shape == (1, 2, 9, 2)
    srcs = [image(rng.normal(size=(1, 3, 3, 1)), device) for _ in range(2)]
    batch = k.encode_batch(cb, [s for s, _ in srcs])
    explicit = [poisoned((1, 2, 4, 1), device)[0] for _ in range(2)]
    k.encode_batch(cb, [s for s, _ in srcs], explicit)
    img, state = k.encode(cb, x_img, destination_state_is_temporary=False)
    finish(cb)
    assert state is None and img.shape == (1, 2, 9, 2)
    assert np.array_equal(values(same), x)
    t = (1.5, 0.5, 0.0, 0.0)
    assert_close(values(scaled), ref.image_scale_reference(x, np.zeros((1, 2, 9, 2)), method=method, transform=t), torch.float32, LANCZOS_TOL)
    for (_, s), a, e in zip(srcs, batch, explicit):
        assert a.shape == (1, 2, 5, 1)  # round(3 * 0.5) = 2, round(3 * 1.5) = 5 (half-way rounds up)
        assert_close(values(a), ref.image_scale_reference(s, np.zeros((1, 2, 5, 1)), method=method, transform=t), torch.float32, LANCZOS_TOL)
        assert_close(values(e), ref.image_scale_reference(s, np.zeros((1, 2, 4, 1)), method=method, transform=t), torch.float32, LANCZOS_TOL)


def test_scale_transform_property(device) -> None:
    k = mpsnn.MPSImageLanczosScale(device)
    assert k.scale_transform is None
    t = MPSScaleTransform(2, 3, 0.5, -1)
    k.scale_transform = t
    assert k.scale_transform == MPSScaleTransform(2.0, 3.0, 0.5, -1.0) and isinstance(k.scale_transform.scale_x, float)
    k.scale_transform = None
    assert k.scale_transform is None
    assert MPSScaleTransform() == MPSScaleTransform(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad,match", [
    (MPSScaleTransform(0.0, 1.0, 0.0, 0.0), "scale_x"),
    (MPSScaleTransform(1.0, -2.0, 0.0, 0.0), "scale_y"),
    (MPSScaleTransform(1.0, 1.0, float("nan"), 0.0), "translate_x"),
    (MPSScaleTransform(1.0, 1.0, 0.0, float("inf")), "translate_y"),
    ((1.0, 1.0, 0.0, 0.0), "MPSScaleTransform"),
])
def test_bad_transforms(device, bad, match) -> None:
    k = mpsnn.MPSImageBilinearScale(device)
    with pytest.raises(mpsnn.MPSError, match=match):
        k.scale_transform = bad
    assert k.scale_transform is None


def test_base_class_cannot_encode(device, cb) -> None:
    k = mpsnn.MPSImageScale(device)
    assert k.scale_transform is None
    x_img = image(np.zeros((1, 2, 2, 1)), device)[0]
    with pytest.raises(mpsnn.MPSTypeError, match="MPSImageBilinearScale or MPSImageLanczosScale"):
        k.encode(cb, x_img, poisoned((1, 2, 2, 1), device)[0])


@pytest.mark.parametrize("method", METHODS)
def test_backend_entry_point(device, method) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 5, 4, 2))
    t = (0.7, 1.3, 0.4, -0.3)
    xt = torch.from_numpy(x).to(device.torch_device)
    y = backend.image_scale_nhwc(xt, 3, 6, t[0], t[1], t[2], t[3], method)
    assert y.dtype == torch.float64 and y.shape == (1, 6, 3, 2)
    assert_close(y, ref.image_scale_reference(x, np.zeros((1, 6, 3, 2)), method=method, transform=t), torch.float64,
                 {torch.float64: Tol(1e-12, 1e-12)})
