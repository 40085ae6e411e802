"""MPSNNReshape / MPSNNReshapeGradient against the float64 loop references of
``mpsnn.testing.reference_reshape`` and, for the gradient, torch.autograd in float64 on
``torch.reshape`` of an NHWC tensor with a random upstream gradient.

A reshape is a copy: results must be bit-exact in the storage dtype (float64 comparison of
the already-rounded inputs with tolerance 0 would also pass; the table's row is used).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MTLOrigin, MTLRegion, MTLSize
from mpsnn.testing import reference_reshape as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import assert_close

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
F64 = "float64"


def rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


def autograd_reshape_gradient(x: np.ndarray, upstream: np.ndarray, target: tuple[int, int, int]) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    w, h, c = target
    y = xt.reshape(x.shape[0], h, w, c)
    (y * torch.tensor(upstream)).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [(3, 10, 3), (1, 1, 90), (15, 2, 3), (6, 5, 3)])
def test_reshape_auto_form(device, cb, dtype, target) -> None:
    img, x = image(rand(1, (2, 3, 5, 6)), device, dtype)
    out = m.MPSNNReshape(device).encode(cb, img, reshaped_width=target[0], reshaped_height=target[1], reshaped_feature_channels=target[2])
    assert out.shape == (2, target[1], target[0], target[2])
    got = values(out)
    finish(cb)
    assert_close(got, R.reshape(x, *target), dtype)


def test_reshape_channel_window_and_explicit_destination_with_channel_offset(device, cb) -> None:
    img, x = image(rand(2, (1, 2, 3, 9)), device)
    k = m.MPSNNReshape(device)
    k.source_feature_channel_offset = 4
    k.source_feature_channel_max_count = 4           # 2x3x4 = 24 values
    k.destination_feature_channel_offset = 4
    dst, before = poisoned((1, 4, 2, 7), device)      # C' = 24 / 8 = 3 channels at 4..6
    k.encode(cb, img, dst)
    finish(cb)
    expected = before.copy()
    expected[..., 4:7] = R.reshape(x[..., 4:8], 2, 4, 3)
    assert_close(values(dst), expected, "float32")


def test_reshape_batch_and_image_addressing(device, cb) -> None:
    img, x = image(rand(3, (3, 2, 2, 3)), device)
    k = m.MPSNNReshape(device)
    k.offset = m.MPSOffset(0, 0, 1)
    k.clip_rect = MTLRegion(MTLOrigin(0, 0, 1), MTLSize(1 << 40, 1 << 40, 2))
    dst, before = poisoned((3, 1, 4, 3), device)
    k.encode(cb, img, dst)
    imgs = [image(rand(10 + i, (1, 2, 2, 3)), device) for i in range(2)]
    outs = m.MPSNNReshape(device).encode_batch(cb, [i for i, _ in imgs], reshaped_width=12, reshaped_height=1, reshaped_feature_channels=1)
    got = [values(o) for o in outs]
    finish(cb)
    expected = before.copy()
    expected[1:3] = R.reshape(x[1:3], 4, 1, 3)
    assert_close(values(dst), expected, "float32")
    for (_, xi), g in zip(imgs, got):
        assert_close(g, R.reshape(xi, 12, 1, 1), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temporary", [True, False])
def test_reshape_gradient_matches_reference_and_autograd(device, cb, dtype, temporary) -> None:
    img, x = image(rand(4, (2, 3, 4, 5)), device, dtype)
    k = m.MPSNNReshape(device)
    y, state = k.encode(cb, img, reshaped_width=6, reshaped_height=5, reshaped_feature_channels=2, destination_state_is_temporary=temporary)
    assert isinstance(state, m.MPSNNGradientState) and state.is_temporary == temporary
    dy, dyv = image(rand(5, (2, 5, 6, 2)), device, dtype)
    dx = m.MPSNNReshapeGradient(device).encode(cb, dy, img, state)
    got = values(dx)
    finish(cb)
    assert got.shape == x.shape
    assert_close(R.reshape_gradient(dyv, 4, 3, 5), autograd_reshape_gradient(x, dyv, (6, 5, 2)), F64)
    assert_close(got, R.reshape_gradient(dyv, 4, 3, 5), dtype)


def test_reshape_gradient_channel_windows_zero_elsewhere(device, cb) -> None:
    img, x = image(rand(6, (1, 2, 2, 10)), device)
    k = m.MPSNNReshape(device)
    k.source_feature_channel_offset = 4
    k.source_feature_channel_max_count = 3             # 12 values
    k.destination_feature_channel_offset = 4
    dst = m.MPSImage(device, image_descriptor=m.MPSImageDescriptor(width=3, height=1, feature_channels=8))
    state = k.result_state(img, destination_image=dst)
    k.encode(cb, img, dst, destination_state=state)
    g, gv = image(rand(7, (1, 1, 3, 8)), device)       # incoming gradient, read at channels 4..7
    grad = m.MPSNNReshapeGradient(device)
    out = grad.encode(cb, g, img, state)
    got = values(out)
    explicit, before = poisoned((1, 2, 2, 10), device)
    grad.encode(cb, g, img, state, explicit)
    finish(cb)
    expected = np.zeros((1, 2, 2, 10))
    expected[..., 4:7] = R.reshape_gradient(gv[..., 4:8], 2, 2, 3)
    assert_close(got, expected, "float32")
    assert_close(values(explicit), expected, "float32")


def test_reshape_gradient_without_state_and_batch(device, cb) -> None:
    xs = [image(rand(20 + i, (1, 2, 3, 2)), device) for i in range(2)]
    gs = [image(rand(30 + i, (1, 3, 1, 4)), device) for i in range(2)]
    grad = m.MPSNNReshapeGradient(device)
    outs = grad.encode_batch(cb, [g for g, _ in gs], [x for x, _ in xs], None)
    got = [values(o) for o in outs]
    finish(cb)
    for (_, gv), o in zip(gs, got):
        assert_close(o, R.reshape_gradient(gv, 3, 2, 2), "float32")


def test_descriptor_with_reshaped_size(device) -> None:
    img, _ = image(rand(1, (2, 2, 3, 4)), device)
    k = m.MPSNNReshape(device)
    d = k.destination_image_descriptor([img], reshaped_width=1, reshaped_height=4, reshaped_feature_channels=6)
    assert (d.width, d.height, d.feature_channels, d.number_of_images) == (1, 4, 6, 2)
    same = k.destination_image_descriptor([img])
    assert (same.width, same.height, same.feature_channels) == (3, 2, 4)


# -- errors -------------------------------------------------------------------------------------------

def test_error_reshape_count_mismatch(device, cb) -> None:
    img, _ = image(rand(1, (1, 2, 3, 4)), device)
    with pytest.raises(m.MPSValueError, match=r"MPSNNReshape: `reshaped size` \(='5x5x1'\) must hold the source's 3x2x4 = 24 values"):
        m.MPSNNReshape(device).encode(cb, img, reshaped_width=5, reshaped_height=5, reshaped_feature_channels=1)
    dst, _ = poisoned((1, 5, 5, 1), device)
    with pytest.raises(m.MPSValueError, match="destination size"):
        m.MPSNNReshape(device).encode(cb, img, dst)


def test_error_reshape_partial_or_bad_sizes(device, cb) -> None:
    img, _ = image(rand(1, (1, 2, 3, 4)), device)
    with pytest.raises(m.MPSValueError, match="go together"):
        m.MPSNNReshape(device).encode(cb, img, reshaped_width=24)
    with pytest.raises(m.MPSValueError, match="reshaped_height"):
        m.MPSNNReshape(device).encode(cb, img, reshaped_width=24, reshaped_height=0, reshaped_feature_channels=1)


def test_error_reshape_is_whole_image(device, cb) -> None:
    img, _ = image(rand(1, (1, 2, 3, 4)), device)
    dst, _ = poisoned((1, 4, 3, 2), device)
    k = m.MPSNNReshape(device)
    k.offset = m.MPSOffset(1, 0, 0)
    with pytest.raises(m.MPSValueError, match="whole images"):
        k.encode(cb, img, dst)
    k.offset = m.MPSOffset()
    k.clip_rect = MTLRegion(MTLOrigin(1, 0, 0), MTLSize(2, 4, 1))
    with pytest.raises(m.MPSValueError, match="clip_rect"):
        k.encode(cb, img, dst)


def test_error_reshape_gradient_wrong_source_image(device, cb) -> None:
    img, _ = image(rand(1, (1, 2, 3, 4)), device)
    other, _ = image(rand(2, (1, 3, 2, 4)), device)
    y, state = m.MPSNNReshape(device).encode(cb, img, reshaped_width=4, reshaped_height=6, reshaped_feature_channels=1,
                                             destination_state_is_temporary=False)
    with pytest.raises(m.MPSValueError, match="source_image"):
        m.MPSNNReshapeGradient(device).encode(cb, y, other, state)


def test_reshape_result_never_aliases_the_source(device, cb) -> None:
    img, x = image(rand(9, (1, 2, 3, 4)), device)
    k = m.MPSNNReshape(device)
    k.destination_image_allocator = m.MPSImage.default_allocator
    out = k.encode(cb, img, reshaped_width=4, reshaped_height=3, reshaped_feature_channels=2)
    finish(cb)
    img.tensor.fill_(5.0)
    assert_close(values(out), R.reshape(x, 4, 3, 2), "float32")
