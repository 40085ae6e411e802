"""MPSCNNInstanceNormalization, its data source, gradient and gradient state, against three oracles.

1. ``mpsnn.testing.reference_instance_group_normalization`` (float64 NumPy from
   normalization.md §4) for every storage dtype and device, plus the coordinate references
   (offsets, clip rects, channel offsets, edge modes, batches) with poisoned destinations.
2. ``torch.autograd`` in float64 (``torch.nn.functional.instance_norm``) with a random
   upstream gradient, for dx, dgamma and dbeta.
3. Finite differences, only to validate the reference gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpsnn
from mpsnn import MPSImage, MPSImageEdgeMode, MPSOffset, MTLOrigin, MTLRegion, MTLSize
from mpsnn.kernels.batch_normalization import FLT_MIN, MPSCNNNormalizationGammaAndBetaState
from mpsnn.testing import reference as ref
from mpsnn.testing import reference_instance_group_normalization as nref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (2, 3, 5, 7)        # batch 2, odd sizes, channels not a multiple of 4
C = SHAPE[3]
EPS = 1e-3
POISON = 1234.0
FD_STEP = 1e-6
FD_TOL = {torch.float64: Tol(rtol=1e-5, atol=1e-7)}
#: normalized results are O(1) and the statistics are float32 sums: a few ulps more than one op
FWD_TOL = {torch.float32: Tol(2e-5, 2e-6)}
#: the gradient subtracts two group means from h: cancellation costs a few more ulps
GRAD_TOL = {torch.float32: Tol(1e-4, 1e-5), torch.float16: Tol(4e-3, 4e-3), torch.bfloat16: Tol(3e-2, 3e-2)}


def random(seed: int, shape: tuple[int, ...], lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def params(c: int = C, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return rng.uniform(0.5, 2.0, c).astype(np.float32), rng.uniform(-1.0, 1.0, c).astype(np.float32)


def source(c: int = C, epsilon: float = EPS, **kw: Any) -> mpsnn.InstanceNormalizationDataSource:
    gamma, beta = params(c)
    return mpsnn.InstanceNormalizationDataSource(gamma, beta, epsilon=epsilon, **kw)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


class MinimalSource(mpsnn.MPSCNNInstanceNormalizationDataSource):
    """Only the required methods: epsilon, load, purge and the updates take the defaults."""

    def __init__(self, c: int) -> None:
        self.g, self.b = params(c, seed=3)

    def gamma(self) -> Any:
        return self.g

    def beta(self) -> Any:
        return torch.from_numpy(self.b)

    def number_of_feature_channels(self) -> int:
        return self.g.size

    def label(self) -> str | None:
        return None


# -- API surface ---------------------------------------------------------------------------------------------


def test_public_names() -> None:
    for name in ("MPSCNNInstanceNormalization", "MPSCNNInstanceNormalizationGradient", "MPSCNNInstanceNormalizationGradientState",
                 "MPSCNNInstanceNormalizationDataSource", "InstanceNormalizationDataSource"):
        assert name in mpsnn.__all__ and isinstance(getattr(mpsnn, name), type)
    assert issubclass(mpsnn.MPSCNNInstanceNormalization, mpsnn.MPSCNNKernel)
    assert issubclass(mpsnn.MPSCNNInstanceNormalizationGradient, mpsnn.MPSCNNGradientKernel)
    assert issubclass(mpsnn.MPSCNNInstanceNormalizationGradientState, mpsnn.MPSNNGradientState)
    with pytest.raises(TypeError):
        mpsnn.MPSCNNInstanceNormalizationDataSource()  # type: ignore[abstract]


def test_properties_and_data_source(device) -> None:
    ds = source(label="in1")
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    assert k.data_source is ds and k.label == "in1"
    assert k.epsilon == float(np.float32(EPS))
    assert (ds.load_count, ds.purge_count) == (1, 1)
    assert (k.kernel_width, k.kernel_height, k.offset, k.edge_mode) == (1, 1, MPSOffset(0, 0, 0), MPSImageEdgeMode.zero)
    k.epsilon = 0.5
    assert k.epsilon == 0.5
    for bad in (-1.0, float("nan"), float("inf"), "x", True):
        with pytest.raises(mpsnn.MPSValueError, match="epsilon"):
            k.epsilon = bad
    with pytest.raises(AttributeError):
        k.data_source = ds  # read-only
    # a data source without epsilon() gives FLT_MIN, without load/purge works, beta may be a tensor
    m = mpsnn.MPSCNNInstanceNormalization(device, data_source=MinimalSource(5))
    assert m.epsilon == FLT_MIN == float(np.float32(1.17549435e-38)) and m.label is None
    g = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    assert (g.kernel_offset_x, g.kernel_offset_y) == (0, 0)


def test_data_source_errors(device) -> None:
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNInstanceNormalization: `data_source`"):
        mpsnn.MPSCNNInstanceNormalization(device, data_source=None)
    with pytest.raises(mpsnn.MPSTypeError, match="data_source"):
        mpsnn.MPSCNNInstanceNormalization(device, data_source=mpsnn.GroupNormalizationDataSource(np.ones(4)))

    class Refuses(MinimalSource):
        def load(self) -> bool:
            return False

    with pytest.raises(mpsnn.MPSValueError, match=r"load\(\)"):
        mpsnn.MPSCNNInstanceNormalization(device, data_source=Refuses(4))

    class WrongBeta(MinimalSource):
        def beta(self) -> Any:
            return np.zeros(3)

    with pytest.raises(mpsnn.MPSValueError, match=r"beta\(\).*hold number_of_feature_channels=4"):
        mpsnn.MPSCNNInstanceNormalization(device, data_source=WrongBeta(4))
    with pytest.raises(mpsnn.MPSValueError, match="beta"):
        mpsnn.InstanceNormalizationDataSource(np.ones(4), np.ones(5))
    with pytest.raises(mpsnn.MPSValueError, match="epsilon"):
        mpsnn.InstanceNormalizationDataSource(np.ones(4), epsilon=-1.0)


# -- the reference itself ----------------------------------------------------------------------------------------


def test_reference_by_hand_and_finite_differences() -> None:
    x = random(1, (2, 3, 4, 3))
    y = nref.instance_normalization_nhwc(x, np.ones(3), np.zeros(3), 0.0)
    assert np.allclose(y.mean(axis=(1, 2)), 0.0) and np.allclose(y.var(axis=(1, 2)), 1.0)
    # instance normalization = group normalization with one group per channel
    gamma, beta = params(3)
    assert np.allclose(nref.instance_normalization_nhwc(x, gamma, beta, EPS), nref.group_normalization_nhwc(x, gamma, beta, 3, EPS))
    dy = random(2, x.shape)
    dx, dgamma, dbeta = nref.group_normalization_gradient_nhwc(dy, x, gamma, 3, EPS)
    # the spec's instance form: dx = gamma/sigma (dy - dbeta/n - xhat dgamma/n)
    mu, sigma = x.mean(axis=(1, 2), keepdims=True), np.sqrt(x.var(axis=(1, 2), keepdims=True) + np.float32(EPS))
    xhat, n = (x - mu) / sigma, x.shape[1] * x.shape[2]
    spec = gamma / sigma * (dy - dbeta[:, None, None, :] / n - xhat * dgamma[:, None, None, :] / n)
    assert_close(dx, spec, torch.float64, overrides=FD_TOL)
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += FD_STEP
        xm[idx] -= FD_STEP
        loss = lambda v: (dy * nref.group_normalization_nhwc(v, gamma, beta, 3, EPS)).sum()  # noqa: E731
        fd[idx] = (loss(xp) - loss(xm)) / (2 * FD_STEP)
    assert_close(dx, fd, torch.float64, overrides=FD_TOL, msg="reference dx vs finite differences")
    assert np.allclose(dbeta, dy.sum(axis=(1, 2)))


# -- forward ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_forward_matches_reference(device, cb, dtype) -> None:
    ds = source()
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    src, xs = image(random(3, SHAPE, -4.0, 6.0), device, dtype)
    y = k.encode(cb, src)
    finish(cb)
    assert y.to_torch().dtype == dtype and y.to_torch().shape == SHAPE
    expected = nref.instance_normalization_nhwc(xs, ds.gamma(), ds.beta(), EPS)
    assert_close(values(y), expected, dtype, overrides=FWD_TOL)


CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(offset=MPSOffset(1, 1, 0), edge_mode=MPSImageEdgeMode.zero), id="offset-zero"),
    pytest.param(dict(offset=MPSOffset(-1, 2, 0), edge_mode=MPSImageEdgeMode.clamp), id="offset-clamp"),
    pytest.param(dict(clip_rect=region((1, 1, 0), (3, 2, 2))), id="clip"),
    pytest.param(dict(clip_rect=region((2, 0, 1), (9, 9, 1)), offset=MPSOffset(0, 1, 0)), id="clip-beyond-z1"),
    pytest.param(dict(source_feature_channel_offset=4, destination_feature_channel_offset=4), id="channel-offsets"),
    pytest.param(dict(offset=MPSOffset(0, 0, 1), clip_rect=region((0, 0, 0), (9, 9, 1))), id="offset-z"),
]


def _configure(k: Any, props: dict[str, Any]) -> None:
    for name, v in props.items():
        setattr(k, name, v)


@pytest.mark.parametrize("props", CASES)
def test_forward_coordinates(device, cb, props) -> None:
    c = 5
    ds = source(c)
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    _configure(k, props)
    src, xs = image(random(4, (2, 6, 5, 12)), device)
    dest, before = poisoned((2, 4, 6, 12), device, POISON)
    k.encode(cb, src, dest)
    finish(cb)
    expected = ref.unary_kernel_reference(
        xs, before, offset=k.offset, clip_rect=k.clip_rect, src_c_off=k.source_feature_channel_offset, src_c_max=c,
        dst_c_off=k.destination_feature_channel_offset, edge_mode=k.edge_mode,
        fn=lambda b: nref.instance_normalization_nhwc(b, ds.gamma(), ds.beta(), EPS))
    assert_close(values(dest), expected, torch.float32, overrides=FWD_TOL)


def test_batch_and_state_forms(device, cb) -> None:
    ds = source()
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    imgs = [image(random(10 + i, (1, 3, 4, C)), device) for i in range(3)]
    outs, states = k.encode_batch(cb, [im for im, _ in imgs], destination_state_is_temporary=False)
    plain = k.encode_batch(cb, [im for im, _ in imgs])
    dests = [poisoned((1, 3, 4, C), device, POISON)[0] for _ in imgs]
    explicit_states = k.result_state_batch([im for im, _ in imgs])
    k.encode_batch(cb, [im for im, _ in imgs], dests, destination_states=explicit_states)
    finish(cb)
    assert len(outs) == len(states) == 3 and len({id(s) for s in states}) == 3
    for i, (_, xs) in enumerate(imgs):
        expected = nref.instance_normalization_nhwc(xs, ds.gamma(), ds.beta(), EPS)
        for got in (outs[i], plain[i], dests[i]):
            assert_close(values(got), expected, torch.float32, overrides=FWD_TOL)
        assert isinstance(states[i], mpsnn.MPSCNNInstanceNormalizationGradientState)
        assert states[i].instance_normalization is k and explicit_states[i]._mean is not None
    assert k.is_result_state_reused_across_batch() is False


def test_forward_errors(device, cb) -> None:
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=source(8))
    src, _ = image(random(5, (1, 2, 2, 6)), device)
    with pytest.raises(mpsnn.MPSValueError, match="supply number_of_feature_channels=8"):
        k.encode(cb, src)
    k2 = mpsnn.MPSCNNInstanceNormalization(device, data_source=source(4))
    k2.source_feature_channel_offset = 4
    with pytest.raises(mpsnn.MPSValueError, match="number_of_feature_channels=4"):
        k2.encode(cb, src)
    dest, _ = poisoned((1, 2, 2, 3), device)
    k2.source_feature_channel_offset = 0
    with pytest.raises(mpsnn.MPSValueError, match="destination_image.feature_channels"):
        k2.encode(cb, src, dest)
    wrong_state = mpsnn.MPSCNNGroupNormalization(device, data_source=mpsnn.GroupNormalizationDataSource(np.ones(4))).result_state(src)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNInstanceNormalizationGradientState"):
        k2.encode(cb, src, poisoned((1, 2, 2, 4), device)[0], destination_state=wrong_state)


# -- gradient -----------------------------------------------------------------------------------------------------------


def torch_instance_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 NHWC forward in plain torch ops, for autograd. (Not ``F.instance_norm``: in torch
    2.13 on CPU its backward is wrong for a one-image channels-last input; see
    ``test_torch_instance_norm_oracle``.)"""
    mu = x.mean(dim=(1, 2), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(1, 2), keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * gamma + beta


def test_torch_instance_norm_oracle() -> None:
    """The autograd oracle agrees with torch's instance_norm forward (NCHW contiguous)."""
    x = torch.from_numpy(random(80, (2, 3, 4, 5)))
    gamma, beta = (torch.from_numpy(p).double() for p in params(5))
    expected = F.instance_norm(x.permute(0, 3, 1, 2).contiguous(), weight=gamma, bias=beta, eps=EPS).permute(0, 2, 3, 1)
    assert_close(torch_instance_norm(x, gamma, beta, EPS), expected, torch.float64)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gradient_matches_autograd(device, cb, dtype) -> None:
    ds = source()
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    gk = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    src, xs = image(random(6, SHAPE), device, dtype)
    dyi, dys = image(random(7, SHAPE), device, dtype)
    y, state = k.encode(cb, src, destination_state_is_temporary=True)
    state.read_count = 2          # the gradient and our reads below
    dx = gk.encode(cb, dyi, src, state)
    finish(cb)
    x = torch.from_numpy(xs).requires_grad_()
    gamma = torch.from_numpy(ds.gamma()).double().requires_grad_()
    beta = torch.from_numpy(ds.beta()).double().requires_grad_()
    torch_instance_norm(x, gamma, beta, float(np.float32(EPS))).backward(torch.from_numpy(dys))
    assert dx.to_torch().dtype == dtype and dx.to_torch().shape == SHAPE
    assert_close(values(dx), x.grad, dtype, overrides=GRAD_TOL, msg="dx")
    assert state.gradient_for_gamma.dtype == torch.float32 and state.gradient_for_gamma.shape == (C,)
    assert_close(state.gradient_for_gamma, gamma.grad, torch.float32, overrides={torch.float32: Tol(1e-4, 1e-4)}, msg="dgamma")
    assert_close(state.gradient_for_beta, beta.grad, torch.float32, overrides={torch.float32: Tol(1e-4, 1e-4)}, msg="dbeta")
    assert torch.equal(state.gamma.cpu(), torch.from_numpy(ds.gamma()))


GRADIENT_CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(offset=MPSOffset(1, 1, 0)), id="offset-zero"),
    pytest.param(dict(offset=MPSOffset(-1, 2, 0), edge_mode=MPSImageEdgeMode.clamp), id="offset-clamp"),
    pytest.param(dict(clip_rect=region((1, 1, 0), (3, 2, 2))), id="clip"),
    pytest.param(dict(source_feature_channel_offset=4, destination_feature_channel_offset=4), id="channel-offsets"),
]


@pytest.mark.parametrize("props", GRADIENT_CASES)
def test_gradient_coordinates(device, cb, props) -> None:
    c = 5
    ds = source(c)
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    _configure(k, props)
    src, xs = image(random(8, (2, 6, 5, 12)), device)
    fwd_dest, _ = poisoned((2, 4, 6, 12), device, 0.0)
    state = k.result_state(src, None, fwd_dest)
    k.encode(cb, src, fwd_dest, destination_state=state)
    dyi, dys = image(random(9, (2, 4, 6, 12)), device)
    gk = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    dx = gk.encode(cb, dyi, src, state)
    dx2, before = poisoned((2, 6, 5, 12), device, POISON)
    gk.encode(cb, dyi, src, state, dx2)
    finish(cb)
    expected, dgam, dbet = nref.normalization_gradient_reference(
        dys, xs, before, gamma=ds.gamma(), groups=c, epsilon=EPS, channels=c, offset=k.offset, clip_rect=k.clip_rect,
        src_c_off=k.source_feature_channel_offset, dst_c_off=k.destination_feature_channel_offset, edge_mode=k.edge_mode)
    assert_close(values(dx2), expected, torch.float32, overrides=GRAD_TOL, msg="explicit destination")
    assert dx.to_torch().shape == (2, 6, 5, 12)
    lo, hi = k.source_feature_channel_offset, k.source_feature_channel_offset + c
    assert_close(values(dx)[..., lo:hi], expected[..., lo:hi], torch.float32, overrides=GRAD_TOL, msg="auto destination")
    assert np.all(values(dx)[..., :lo] == 0) and np.all(values(dx)[..., hi:] == 0)
    assert_close(state.gradient_for_gamma, dgam, torch.float32, overrides=GRAD_TOL)
    assert_close(state.gradient_for_beta, dbet, torch.float32, overrides=GRAD_TOL)


def test_gradient_clamp_is_autograd_adjoint(device, cb) -> None:
    """The clamp-mode adjoint (edge pixels collect the gradient of replicated reads) against autograd."""
    ds = source(3)
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    k.offset, k.edge_mode = MPSOffset(-2, 1, 0), MPSImageEdgeMode.clamp
    src, xs = image(random(11, (1, 4, 5, 3)), device)
    dest, _ = poisoned((1, 4, 5, 3), device, 0.0)
    st = k.result_state(src, None, dest)
    k.encode(cb, src, dest, destination_state=st)
    dyi, dys = image(random(12, (1, 4, 5, 3)), device)
    dx = mpsnn.MPSCNNInstanceNormalizationGradient(device).encode(cb, dyi, src, st)
    finish(cb)
    x = torch.from_numpy(xs).requires_grad_()
    yi = torch.arange(4).add(1).clamp(0, 3)
    xi = torch.arange(5).sub(2).clamp(0, 4)
    win = x[:, yi][:, :, xi]
    torch_instance_norm(win, torch.from_numpy(ds.gamma()).double(), torch.from_numpy(ds.beta()).double(),
                        float(np.float32(EPS))).backward(torch.from_numpy(dys))
    assert_close(values(dx), x.grad, torch.float32, overrides=GRAD_TOL)


def test_gradient_batch_per_image_states(device, cb) -> None:
    ds = source()
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    gk = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    srcs = [image(random(20 + i, (1, 3, 4, C)), device) for i in range(2)]
    dys = [image(random(30 + i, (1, 3, 4, C)), device) for i in range(2)]
    _, states = k.encode_batch(cb, [s for s, _ in srcs], destination_state_is_temporary=False)
    dxs = gk.encode_batch(cb, [d for d, _ in dys], [s for s, _ in srcs], states)
    finish(cb)
    for i in range(2):
        dx, dg, db = nref.group_normalization_gradient_nhwc(dys[i][1], srcs[i][1], ds.gamma(), C, EPS)
        assert_close(values(dxs[i]), dx, torch.float32, overrides=GRAD_TOL)
        assert_close(states[i].gradient_for_gamma, dg[0], torch.float32, overrides=GRAD_TOL, msg=f"image {i}")
        assert_close(states[i].gradient_for_beta, db[0], torch.float32, overrides=GRAD_TOL)


def test_gradient_errors(device, cb) -> None:
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=source(4))
    gk = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    src, _ = image(random(13, (1, 3, 3, 4)), device)
    dy, _ = image(random(14, (1, 3, 3, 4)), device)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNInstanceNormalizationGradientState"):
        gk.encode(cb, dy, src, None)
    with pytest.raises(mpsnn.MPSTypeError, match="gradient_states"):
        gk.encode_batch(cb, [dy], [src], None)
    unfilled = k.result_state(src)
    assert torch.equal(unfilled.gradient_for_gamma, torch.zeros(4, device=device.torch_device))
    with pytest.raises(mpsnn.MPSStateError, match="holds no statistics"):
        gk.encode(cb, dy, src, unfilled)
    _, st = k.encode(cb, src, destination_state_is_temporary=True)
    small, _ = image(random(15, (1, 2, 3, 4)), device)
    with pytest.raises(mpsnn.MPSValueError, match="source_image"):
        gk.encode(cb, dy, small, st)
    gk.encode(cb, dy, src, st)     # consumes the temporary state
    with pytest.raises(mpsnn.MPSStateError):
        _ = st.gradient_for_gamma
    with pytest.raises(mpsnn.MPSStateError):
        gk.encode(cb, dy, src, st)
    finish(cb)


# -- reload, updates ------------------------------------------------------------------------------------------------


def test_reload_paths(device, cb) -> None:
    ds = source(4)
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    src, xs = image(random(16, (1, 3, 3, 4)), device)
    old_state = k.result_state(src)
    ds.set_gamma_and_beta(np.full(4, 2.0), np.full(4, -1.0))
    k.reload_gamma_and_beta_from_data_source()
    assert torch.equal(old_state.gamma.cpu(), torch.from_numpy(params(4)[0]))   # the state keeps its values
    y1 = k.encode(cb, src)
    # GPU-side reload from a gamma/beta state
    gb = MPSCNNNormalizationGammaAndBetaState(gamma=torch.full((4,), 3.0, device=device.torch_device),
                                      beta=torch.zeros(4, device=device.torch_device))
    k.reload_gamma_and_beta_with_command_buffer(cb, gb)
    y2 = k.encode(cb, src)
    with pytest.raises(mpsnn.MPSTypeError, match="gamma_and_beta_state"):
        k.reload_gamma_and_beta(cb, object())
    bad = MPSCNNNormalizationGammaAndBetaState(gamma=torch.ones(3), beta=torch.ones(3))
    if bad.device == device:
        with pytest.raises(mpsnn.MPSValueError, match="gamma"):
            k.reload_gamma_and_beta_with_command_buffer(cb, bad)
    # reload_data_source adopts a new data source, possibly with another channel count
    ds6 = source(6)
    k.reload_data_source(ds6)
    assert k.data_source is ds6
    src6, xs6 = image(random(17, (1, 3, 3, 6)), device)
    y3 = k.encode(cb, src6)
    finish(cb)
    assert_close(values(y1), nref.instance_normalization_nhwc(xs, np.full(4, 2.0), np.full(4, -1.0), EPS), torch.float32, overrides=FWD_TOL)
    assert_close(values(y2), nref.instance_normalization_nhwc(xs, np.full(4, 3.0), np.zeros(4), EPS), torch.float32, overrides=FWD_TOL)
    assert_close(values(y3), nref.instance_normalization_nhwc(xs6, ds6.gamma(), ds6.beta(), EPS), torch.float32, overrides=FWD_TOL)
    with pytest.raises(mpsnn.MPSTypeError):
        k.reload_data_source(object())  # type: ignore[arg-type]
    ds6.set_gamma_and_beta(np.ones(6))
    ds6._channels = 5
    ds6._gamma, ds6._beta = np.ones(5, np.float32), np.zeros(5, np.float32)
    with pytest.raises(mpsnn.MPSValueError, match="stay 6"):
        k.reload_gamma_and_beta_from_data_source()


def test_data_source_updates(device, cb) -> None:
    lr = 0.25
    ds = source(4, learning_rate=lr)
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=ds)
    gk = mpsnn.MPSCNNInstanceNormalizationGradient(device)
    pairs = [(image(random(40 + i, (1, 3, 3, 4)), device)[0], image(random(50 + i, (1, 3, 3, 4)), device)[0]) for i in range(2)]
    _, states = k.encode_batch(cb, [s for s, _ in pairs], destination_state_is_temporary=True)
    for st in states:
        st.read_count = 2                # the gradient, then the update
    gk.encode_batch(cb, [d for _, d in pairs], [s for s, _ in pairs], states)
    total_g = sum(st.gradient_for_gamma.cpu() for st in states)
    total_b = sum(st.gradient_for_beta.cpu() for st in states)
    g0, b0 = ds.gamma(), ds.beta()
    new = ds.update_gamma_and_beta_with_command_buffer(cb, states)
    assert all(st.read_count == 0 for st in states)
    k.reload_gamma_and_beta_with_command_buffer(cb, new)
    finish(cb)
    expected_g = torch.from_numpy(g0) - lr * total_g
    assert_close(new.gamma, expected_g, torch.float32)
    assert_close(k._gamma, expected_g, torch.float32)
    assert_close(ds.gamma(), expected_g, torch.float32)
    assert_close(new.beta, torch.from_numpy(b0) - lr * total_b, torch.float32)
    # the CPU form
    cb2 = device.make_command_queue().make_command_buffer()
    src, _ = image(random(60, (1, 3, 3, 4)), device)
    dy, _ = image(random(61, (1, 3, 3, 4)), device)
    _, st = k.encode(cb2, src, destination_state_is_temporary=False)
    gk.encode(cb2, dy, src, st)
    finish(cb2)
    before = ds.gamma()
    assert ds.update_gamma_and_beta_with_instance_normalization_state_batch([st]) is True
    assert_close(ds.gamma(), before - lr * st.gradient_for_gamma.cpu().numpy(), torch.float32)
    with pytest.raises(mpsnn.MPSTypeError, match="instance_normalization_state_batch"):
        ds.update_gamma_and_beta_with_instance_normalization_state_batch([object()])
    # without a learning rate (and in the protocol's defaults) the hooks do nothing
    plain = source(4)
    assert plain.update_gamma_and_beta_with_command_buffer(cb2, [st]) is None
    assert plain.update_gamma_and_beta_with_instance_normalization_state_batch([st]) is False
    assert MinimalSource(4).update_gamma_and_beta_with_command_buffer(cb2, [st]) is None
    copy = ds.copy()
    assert copy is not ds and np.array_equal(copy.gamma(), ds.gamma()) and copy.learning_rate == lr


def test_kernel_copy(device, cb) -> None:
    k = mpsnn.MPSCNNInstanceNormalization(device, data_source=source(4))
    k.epsilon = 0.25
    k2 = k.copy()
    assert k2.epsilon == 0.25 and k2.data_source is k.data_source
    src, xs = image(random(70, (1, 2, 3, 4)), device)
    y = k2.encode(cb, src)
    finish(cb)
    ds = k.data_source
    assert_close(values(y), nref.instance_normalization_nhwc(xs, ds.gamma(), ds.beta(), 0.25), torch.float32, overrides=FWD_TOL)
    assert isinstance(MPSImage, type)
