"""MPSCNNGroupNormalization, its data source, gradient and gradient state, against three oracles.

1. ``mpsnn.testing.reference_instance_group_normalization`` (float64 NumPy from
   normalization.md §5) for every storage dtype and device, plus the coordinate references.
2. ``torch.autograd`` in float64 on a plain-torch group-norm forward (and torch's own
   ``F.group_norm`` forward as a check of that oracle), random upstream gradient.
3. Finite differences, only to validate the reference gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn
from mpsnn import MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.kernels.batch_normalization import FLT_MIN, MPSCNNNormalizationGammaAndBetaState
from mpsnn.testing import reference as ref
from mpsnn.testing import reference_instance_group_normalization as nref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 6)        # batch 2, odd sizes, 6 channels (groups of 1, 2, 3 or 6 channels)
C = SHAPE[3]
EPS = 1e-3
POISON = 1234.0
FD_STEP = 1e-6
FD_TOL = {torch.float64: Tol(rtol=1e-5, atol=1e-7)}
#: normalized results are O(1) and the statistics are float32 sums: a few ulps more than one op
FWD_TOL = {torch.float32: Tol(2e-5, 2e-6)}
#: the gradient subtracts two group means from h: cancellation costs a few more ulps
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-5), torch.float16: Tol(4e-3, 4e-3), torch.bfloat16: Tol(3e-2, 3e-2)}
SUM_TOL = {torch.float32: Tol(1e-4, 1e-4)}


def random(seed: int, shape: tuple[int, ...], lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def params(c: int = C, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(200 + seed)
    return rng.uniform(0.5, 2.0, c).astype(np.float32), rng.uniform(-1.0, 1.0, c).astype(np.float32)


def source(c: int = C, groups: int = 2, epsilon: float = EPS, **kw: Any) -> mpsnn.GroupNormalizationDataSource:
    gamma, beta = params(c)
    return mpsnn.GroupNormalizationDataSource(gamma, beta, groups, epsilon=epsilon, **kw)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def torch_group_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """float64 NHWC group normalization in plain torch ops (the autograd oracle)."""
    n, h, w, c = x.shape
    xg = x.reshape(n, h * w, groups, c // groups)
    mu = xg.mean(dim=(1, 3), keepdim=True)
    var = ((xg - mu) ** 2).mean(dim=(1, 3), keepdim=True)
    return ((xg - mu) / torch.sqrt(var + eps)).reshape(n, h, w, c) * gamma + beta


class UserSource(mpsnn.MPSCNNGroupNormalizationDataSource):
    """A user's data source: the required members only (``number_of_groups`` read-write)."""

    def __init__(self, c: int, groups: int) -> None:
        self.g, self.b = params(c, seed=5)
        self._groups = groups

    def gamma(self) -> Any:
        return self.g.tobytes()

    def beta(self) -> Any:
        return None

    def number_of_feature_channels(self) -> int:
        return self.g.size

    def label(self) -> str | None:
        return "user"

    @property
    def number_of_groups(self) -> int:
        return self._groups

    @number_of_groups.setter
    def number_of_groups(self, value: int) -> None:
        self._groups = value


# -- API surface ---------------------------------------------------------------------------------------------------


def test_public_names_and_defaults(device) -> None:
    for name in ("MPSCNNGroupNormalization", "MPSCNNGroupNormalizationGradient", "MPSCNNGroupNormalizationGradientState",
                 "MPSCNNGroupNormalizationDataSource", "GroupNormalizationDataSource"):
        assert name in mpsnn.__all__ and isinstance(getattr(mpsnn, name), type)
    assert issubclass(mpsnn.MPSCNNGroupNormalizationGradient, mpsnn.MPSCNNGradientKernel)
    with pytest.raises(TypeError):
        mpsnn.MPSCNNGroupNormalizationDataSource()  # type: ignore[abstract]
    ds = source(label="gn")
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    assert (k.data_source, k.label, k.number_of_groups, k.epsilon) == (ds, "gn", 2, float(np.float32(EPS)))
    assert not hasattr(k, "reload_data_source")          # Apple's group normalization has none
    u = mpsnn.MPSCNNGroupNormalization(device, data_source=UserSource(6, 3))
    assert (u.epsilon, u.label, u.number_of_groups) == (FLT_MIN, "user", 3)
    assert mpsnn.GroupNormalizationDataSource(np.ones(4)).number_of_groups == 1


def test_group_count_errors(device) -> None:
    with pytest.raises(mpsnn.MPSValueError, match=r"number_of_groups.*divide number_of_feature_channels=6"):
        mpsnn.GroupNormalizationDataSource(np.ones(6), number_of_groups=4)
    ds = source()
    for bad in (0, -2, 2.5, True):
        with pytest.raises(mpsnn.MPSValueError, match="number_of_groups"):
            ds.number_of_groups = bad
    with pytest.raises(mpsnn.MPSValueError, match="MPSCNNGroupNormalization: `data_source.number_of_groups`"):
        mpsnn.MPSCNNGroupNormalization(device, data_source=UserSource(6, 4))
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNGroupNormalizationDataSource"):
        mpsnn.MPSCNNGroupNormalization(device, data_source=mpsnn.InstanceNormalizationDataSource(np.ones(6)))


def test_reference_by_hand_and_finite_differences() -> None:
    x = random(1, (2, 2, 3, 4))
    y = nref.group_normalization_nhwc(x, np.ones(4), np.zeros(4), 2, 0.0)
    blocks = y.reshape(2, 6, 2, 2)
    assert np.allclose(blocks.mean(axis=(1, 3)), 0.0) and np.allclose(blocks.var(axis=(1, 3)), 1.0)
    gamma, beta = params(4)
    dy = random(2, x.shape)
    dx, dgamma, dbeta = nref.group_normalization_gradient_nhwc(dy, x, gamma, 2, EPS)
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += FD_STEP
        xm[idx] -= FD_STEP
        loss = lambda v: (dy * nref.group_normalization_nhwc(v, gamma, beta, 2, EPS)).sum()  # noqa: E731
        fd[idx] = (loss(xp) - loss(xm)) / (2 * FD_STEP)
    assert_close(dx, fd, torch.float64, overrides=FD_TOL, msg="reference dx vs finite differences")
    xhat = (nref.group_normalization_nhwc(x, np.ones(4), np.zeros(4), 2, EPS))
    assert np.allclose(dgamma, (dy * xhat).sum(axis=(1, 2))) and np.allclose(dbeta, dy.sum(axis=(1, 2)))


def test_torch_oracle_matches_group_norm() -> None:
    x = torch.from_numpy(random(3, SHAPE))
    gamma, beta = (torch.from_numpy(p).double() for p in params())
    expected = F.group_norm(x.permute(0, 3, 1, 2).contiguous(), 3, gamma, beta, EPS).permute(0, 2, 3, 1)
    assert_close(torch_group_norm(x, gamma, beta, 3, EPS), expected, torch.float64)


# -- forward ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_forward_matches_reference(device, cb, dtype, groups) -> None:
    ds = source(groups=groups)
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    src, xs = image(random(4, SHAPE, -4.0, 6.0), device, dtype)
    y = k.encode(cb, src)
    finish(cb)
    assert y.to_torch().dtype == dtype
    assert_close(values(y), nref.group_normalization_nhwc(xs, ds.gamma(), ds.beta(), groups, EPS), dtype, overrides=FWD_TOL)
    if groups == C:   # G = C is instance normalization
        assert_close(values(y), nref.instance_normalization_nhwc(xs, ds.gamma(), ds.beta(), EPS), dtype, overrides=FWD_TOL)


@pytest.mark.parametrize("props", [
    pytest.param(dict(offset=MPSOffset(1, -1, 0), edge_mode=MPSImageEdgeMode.clamp), id="offset-clamp"),
    pytest.param(dict(clip_rect=region((1, 0, 1), (3, 9, 1)), offset=MPSOffset(0, 1, 0)), id="clip-z1"),
    pytest.param(dict(source_feature_channel_offset=4, destination_feature_channel_offset=8), id="channel-offsets"),
])
def test_forward_coordinates(device, cb, props) -> None:
    ds = source()
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    for name, v in props.items():
        setattr(k, name, v)
    src, xs = image(random(5, (2, 5, 4, 11)), device)
    dest, before = poisoned((2, 4, 5, 14), device, POISON)
    k.encode(cb, src, dest)
    finish(cb)
    expected = ref.unary_kernel_reference(
        xs, before, offset=k.offset, clip_rect=k.clip_rect, src_c_off=k.source_feature_channel_offset, src_c_max=C,
        dst_c_off=k.destination_feature_channel_offset, edge_mode=k.edge_mode,
        fn=lambda b: nref.group_normalization_nhwc(b, ds.gamma(), ds.beta(), 2, EPS))
    assert_close(values(dest), expected, torch.float32, overrides=FWD_TOL)


# -- gradient -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gradient_matches_autograd(device, cb, dtype, groups) -> None:
    ds = source(groups=groups)
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    src, xs = image(random(6, SHAPE), device, dtype)
    dyi, dys = image(random(7, SHAPE), device, dtype)
    dest, _ = poisoned(SHAPE, device, POISON, dtype)
    state = k.temporary_result_state(cb, src, None, dest)
    state.read_count = 2
    k.encode(cb, src, dest, destination_state=state)
    dx = mpsnn.MPSCNNGroupNormalizationGradient(device).encode(cb, dyi, src, state)
    finish(cb)
    assert state.group_normalization is k and state.read_count == 1
    x = torch.from_numpy(xs).requires_grad_()
    gamma = torch.from_numpy(ds.gamma()).double().requires_grad_()
    beta = torch.from_numpy(ds.beta()).double().requires_grad_()
    torch_group_norm(x, gamma, beta, groups, float(np.float32(EPS))).backward(torch.from_numpy(dys))
    assert dx.to_torch().dtype == dtype
    assert_close(values(dx), x.grad, dtype, overrides=GRAD_TOL, msg="dx")
    assert_close(state.gradient_for_gamma, gamma.grad, torch.float32, overrides=SUM_TOL, msg="dgamma")
    assert_close(state.gradient_for_beta, beta.grad, torch.float32, overrides=SUM_TOL, msg="dbeta")


@pytest.mark.parametrize("props", [
    pytest.param(dict(offset=MPSOffset(-1, 1, 0), edge_mode=MPSImageEdgeMode.clamp), id="offset-clamp"),
    pytest.param(dict(offset=MPSOffset(1, 0, 0), clip_rect=region((0, 1, 0), (3, 2, 2))), id="offset-clip"),
    pytest.param(dict(source_feature_channel_offset=4, destination_feature_channel_offset=8), id="channel-offsets"),
])
def test_gradient_coordinates(device, cb, props) -> None:
    ds = source(groups=3)
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    for name, v in props.items():
        setattr(k, name, v)
    src, xs = image(random(8, (2, 5, 4, 11)), device)
    y, _ = poisoned((2, 4, 3, C + k.destination_feature_channel_offset), device, 0.0)
    state = k.result_state(src, None, y)
    k.encode(cb, src, y, destination_state=state)
    dyi, dys = image(random(9, (2, y.height, y.width, y.feature_channels)), device)
    dx, before = poisoned((2, 5, 4, 11), device, POISON)
    mpsnn.MPSCNNGroupNormalizationGradient(device).encode(cb, dyi, src, state, dx)
    finish(cb)
    expected, dgam, dbet = nref.normalization_gradient_reference(
        dys, xs, before, gamma=ds.gamma(), groups=3, epsilon=EPS, channels=C, offset=k.offset, clip_rect=k.clip_rect,
        src_c_off=k.source_feature_channel_offset, dst_c_off=k.destination_feature_channel_offset, edge_mode=k.edge_mode,
        dest_size=(y.width, y.height))
    assert_close(values(dx), expected, torch.float32, overrides=GRAD_TOL)
    assert_close(state.gradient_for_gamma, dgam, torch.float32, overrides=SUM_TOL)
    assert_close(state.gradient_for_beta, dbet, torch.float32, overrides=SUM_TOL)


def test_gradient_errors(device, cb) -> None:
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=source(4))
    gk = mpsnn.MPSCNNGroupNormalizationGradient(device)
    src, _ = image(random(10, (1, 3, 3, 4)), device)
    _, st = k.encode(cb, src, destination_state_is_temporary=False)
    inst = mpsnn.MPSCNNInstanceNormalization(device, data_source=mpsnn.InstanceNormalizationDataSource(np.ones(4)))
    _, inst_state = inst.encode(cb, src, destination_state_is_temporary=False)
    small_dy, _ = image(random(11, (1, 2, 2, 4)), device)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNGroupNormalizationGradientState"):
        gk.encode(cb, src, src, inst_state)
    with pytest.raises(mpsnn.MPSValueError, match="source_gradient"):
        gk.encode(cb, small_dy, src, st)
    narrow, _ = image(random(12, (1, 3, 3, 2)), device)
    with pytest.raises(mpsnn.MPSValueError):
        gk.encode(cb, narrow, src, st)
    finish(cb)


# -- reload, updates ------------------------------------------------------------------------------------------------


def test_reload_and_updates(device, cb) -> None:
    lr = 0.5
    ds = source(groups=2, learning_rate=lr)
    k = mpsnn.MPSCNNGroupNormalization(device, data_source=ds)
    src, xs = image(random(13, (1, 3, 4, C)), device)
    dy, _ = image(random(14, (1, 3, 4, C)), device)
    _, st = k.encode(cb, src, destination_state_is_temporary=False)
    mpsnn.MPSCNNGroupNormalizationGradient(device).encode(cb, dy, src, st)
    g0 = ds.gamma()
    new = ds.update_gamma_and_beta_with_command_buffer(cb, [st, st])   # unique states are summed once
    assert isinstance(new, MPSCNNNormalizationGammaAndBetaState)
    k.reload_gamma_and_beta(cb, new)
    y1 = k.encode(cb, src)
    finish(cb)
    g1 = torch.from_numpy(g0) - lr * st.gradient_for_gamma.cpu()
    assert_close(k._gamma, g1, torch.float32)
    assert_close(values(y1), nref.group_normalization_nhwc(xs, g1.numpy(), new.beta.cpu().numpy(), 2, EPS), torch.float32, overrides=FWD_TOL)
    # number_of_groups is read-write on the data source and re-read by reload_gamma_and_beta_from_data_source
    ds.number_of_groups = 3
    assert ds.update_gamma_and_beta_with_group_normalization_state_batch([st]) is True
    k.reload_gamma_and_beta_from_data_source()
    assert k.number_of_groups == 3
    cb2 = device.make_command_queue().make_command_buffer()
    y2 = k.encode(cb2, src)
    finish(cb2)
    assert_close(values(y2), nref.group_normalization_nhwc(xs, ds.gamma(), ds.beta(), 3, EPS), torch.float32, overrides=FWD_TOL)
    assert UserSource(6, 2).update_gamma_and_beta_with_group_normalization_state_batch([st]) is False
    assert UserSource(6, 2).update_gamma_and_beta_with_command_buffer(cb2, [st]) is None
    c = ds.copy()
    assert c.number_of_groups == 3 and np.array_equal(c.gamma(), ds.gamma())
