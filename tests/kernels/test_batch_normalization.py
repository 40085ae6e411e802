"""Batch normalization (forward, statistics, gradients, states, data sources) against oracles.

1. ``mpsnn.testing.reference_batch_normalization`` (float64 NumPy from normalization.md §3)
   for every storage dtype and device, plus the coordinate reference for offsets, clip rects,
   channel windows, edge modes and batches, with poisoned destinations.
2. ``torch.autograd`` in float64 with a random upstream gradient for the training chain
   (statistics -> forward -> statistics gradient -> gradient).
3. Finite differences, only to validate the reference gradient.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    BatchNormalizationDataSource,
    MPSCNNBatchNormalization,
    MPSCNNBatchNormalizationDataSource,
    MPSCNNBatchNormalizationFlags,
    MPSCNNBatchNormalizationGradient,
    MPSCNNBatchNormalizationState,
    MPSCNNBatchNormalizationStatistics,
    MPSCNNBatchNormalizationStatisticsGradient,
    MPSCNNNeuronType,
    MPSCNNNormalizationGammaAndBetaState,
    MPSCNNNormalizationMeanAndVarianceState,
    MPSError,
    MPSImageEdgeMode,
    MPSNNNeuronDescriptor,
    MPSOffset,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.backends import batch_normalization as backend
from mpsnn.kernels.batch_normalization import FLT_MIN
from mpsnn.testing import reference as ref
from mpsnn.testing import reference_batch_normalization as bref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

STORAGE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
C = 5                      # channels not a multiple of 4
SHAPE = (2, 3, 4, C)       # batch 2, odd sizes
EPS = 1e-3
FD_STEP = 1e-6
FD_TOL = {torch.float64: Tol(1e-6, 1e-8)}
#: normalising divides by sigma ~ 0.5 and the gradient sums n products: a few ulps more
BN_TOL = {torch.float32: Tol(1e-5, 1e-5), torch.float16: Tol(4e-3, 4e-3), torch.bfloat16: Tol(3e-2, 3e-2)}
NEURONS = [pytest.param(None, id="no-neuron"), pytest.param((MPSCNNNeuronType.reLU, 0.1, 0.0, 0.0), id="leaky-relu"),
           pytest.param((MPSCNNNeuronType.tanH, 1.5, 0.5, 0.0), id="tanh")]


def params(seed: int = 0, c: int = C) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gamma": rng.uniform(0.5, 2.0, c).astype(np.float32), "beta": rng.uniform(-1, 1, c).astype(np.float32),
            "mean": rng.uniform(-0.5, 0.5, c).astype(np.float32), "variance": rng.uniform(0.2, 2.0, c).astype(np.float32)}


def data_source(seed: int = 0, c: int = C, **kw) -> BatchNormalizationDataSource:
    p = params(seed, c)
    kw.setdefault("epsilon", EPS)
    return BatchNormalizationDataSource(p["gamma"], p["beta"], p["mean"], p["variance"], **kw)


def random(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2.0, 2.0, shape)


def descriptor(neuron) -> MPSNNNeuronDescriptor | None:
    if neuron is None:
        return None
    return MPSNNNeuronDescriptor.cnn_neuron_descriptor(neuron[0], *neuron[1:4])


def inference_ref(x: np.ndarray, ds: BatchNormalizationDataSource, neuron=None, eps: float = EPS) -> np.ndarray:
    return bref.batch_norm_inference_nhwc(x, ds.mean(), ds.variance(), ds.gamma(), ds.beta(), eps, neuron)


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


# -- names, defaults, flags ------------------------------------------------------------------------


def test_public_names() -> None:
    for name in ("MPSCNNBatchNormalization", "MPSCNNBatchNormalizationDataSource", "MPSCNNBatchNormalizationState",
                 "MPSCNNNormalizationMeanAndVarianceState", "MPSCNNNormalizationGammaAndBetaState",
                 "MPSCNNBatchNormalizationStatistics", "MPSCNNBatchNormalizationGradient",
                 "MPSCNNBatchNormalizationStatisticsGradient", "MPSCNNBatchNormalizationFlags", "BatchNormalizationDataSource"):
        assert name in mpsnn.__all__ and isinstance(getattr(mpsnn, name), type)
    assert issubclass(MPSCNNBatchNormalization, mpsnn.MPSCNNKernel)
    assert issubclass(MPSCNNBatchNormalizationStatistics, mpsnn.MPSCNNKernel)
    assert issubclass(MPSCNNBatchNormalizationGradient, mpsnn.MPSCNNGradientKernel)
    assert issubclass(MPSCNNBatchNormalizationStatisticsGradient, mpsnn.MPSCNNGradientKernel)
    assert issubclass(MPSCNNBatchNormalizationState, mpsnn.MPSNNGradientState)
    assert issubclass(MPSCNNNormalizationGammaAndBetaState, mpsnn.MPSState)


def test_flags() -> None:
    F = MPSCNNBatchNormalizationFlags
    assert (F.default, F.calculateStatisticsAutomatic, F.calculateStatisticsAlways, F.calculateStatisticsNever,
            F.calculateStatisticsMask) == (0, 0, 1, 2, 3)
    assert F.calculateStatisticsNever & F.calculateStatisticsMask == F.calculateStatisticsNever


def test_defaults_and_properties(device) -> None:
    class Minimal(MPSCNNBatchNormalizationDataSource):   # no epsilon(): FLT_MIN
        def number_of_feature_channels(self): return 3
        def gamma(self): return np.ones(3, np.float32)
        def beta(self): return None
        def mean(self): return np.zeros(3, np.float32)
        def variance(self): return np.ones(3, np.float32)
        def load(self): return True
        def purge(self): pass
        def label(self): return "bn1"

    src = Minimal()
    k = MPSCNNBatchNormalization(device, data_source=src)
    assert k.epsilon == FLT_MIN == np.float32(1.17549435e-38)
    assert k.number_of_feature_channels == 3 and k.data_source is src and k.label == "bn1"
    assert k.fused_neuron_descriptor is None and k.offset == MPSOffset(0, 0, 0) and k.edge_mode == MPSImageEdgeMode.zero
    assert (k.kernel_width, k.kernel_height, k.stride_in_pixels_x) == (1, 1, 1) and k.is_result_state_reused_across_batch()
    k.epsilon = 0.1
    assert k.epsilon == np.float32(0.1)
    assert src.update_gamma_and_beta(None, None) is None and src.update_mean_and_variance_with_batch_normalization_state(None) is False
    assert src.copy() is src
    st = MPSCNNBatchNormalizationStatistics(device)
    assert st.is_state_modified and MPSCNNBatchNormalizationStatisticsGradient(device).fused_neuron_descriptor is None
    nd = MPSNNNeuronDescriptor.cnn_neuron_descriptor(MPSCNNNeuronType.reLU, 0.5)
    assert MPSCNNBatchNormalizationGradient(device, fused_neuron_descriptor=nd).fused_neuron_descriptor == nd


def test_load_and_purge_balance(device) -> None:
    ds = data_source()
    k = MPSCNNBatchNormalization(device, data_source=ds)
    k.reload_gamma_and_beta_from_data_source()
    k.reload_mean_and_variance_from_data_source()
    assert ds.load_count == ds.purge_count == 3


# -- the reference itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("neuron", NEURONS)
def test_reference_gradient_matches_finite_differences(neuron) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 2, (2, 2, 3, 2))
    dy = rng.normal(size=x.shape)
    p = params(1, 2)

    def loss(xv: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> float:
        m, v = bref.batch_norm_statistics_nhwc(xv)
        return float((bref.batch_norm_inference_nhwc(xv, m, v, gamma, beta, EPS, neuron) * dy).sum())

    m, v = bref.batch_norm_statistics_nhwc(x)
    dx, dgamma, dbeta = bref.batch_norm_gradient_nhwc(dy, x, m, v, p["gamma"], EPS, p["beta"], neuron)
    g64, b64 = p["gamma"].astype(np.float64), p["beta"].astype(np.float64)
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = FD_STEP
        fd[i] = (loss(x + e, g64, b64) - loss(x - e, g64, b64)) / (2 * FD_STEP)
    assert_close(dx, fd, torch.float64, FD_TOL, msg="dx")
    # dgamma/dbeta: the reference rounds parameters to float32, so step around float32-exact values
    for name, grad in (("gamma", dgamma), ("beta", dbeta)):
        fdp = np.zeros(2)
        for k in range(2):
            e = np.zeros(2)
            e[k] = 2.0 ** -12
            args_p = (g64 + e, b64) if name == "gamma" else (g64, b64 + e)
            args_m = (g64 - e, b64) if name == "gamma" else (g64, b64 - e)
            fdp[k] = (loss(x, *args_p) - loss(x, *args_m)) / (2 * 2.0 ** -12)
        assert_close(grad, fdp, torch.float64, {torch.float64: Tol(1e-5, 1e-7)}, msg=name)


def test_reference_statistics_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 6.0]).reshape(1, 2, 2, 1)
    m, v = bref.batch_norm_statistics_nhwc(x)
    assert m[0] == 3.0 and v[0] == 3.5   # biased: (4 + 1 + 0 + 9) / 4


# -- inference forward -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("neuron", NEURONS)
def test_inference_matches_reference(device, cb, dtype, neuron) -> None:
    ds = data_source(1)
    k = MPSCNNBatchNormalization(device, data_source=ds, fused_neuron_descriptor=descriptor(neuron))
    x_img, x = image(random(1, SHAPE), device, dtype)
    dst = poisoned(SHAPE, device, dtype=dtype)[0]
    k.encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), inference_ref(x, ds, neuron), dtype, BN_TOL)


def test_prelu_fused_and_slope_count(device, cb) -> None:
    slopes = np.linspace(0.1, 0.5, C).astype(np.float32)
    ds = data_source(2)
    k = MPSCNNBatchNormalization(device, data_source=ds, fused_neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes))
    x_img, x = image(random(2, SHAPE), device)
    y = k.encode(cb, x_img)
    finish(cb)
    assert_close(values(y), inference_ref(x, ds, (MPSCNNNeuronType.pReLU, 0, 0, 0, slopes)), torch.float32, BN_TOL)
    short = MPSCNNBatchNormalization(device, data_source=ds, fused_neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes[:3]))
    with pytest.raises(MPSError, match="PReLU slopes"):
        short.encode(device.make_command_queue().make_command_buffer(), x_img)


COORD_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"offset": MPSOffset(1, -1, 0)}, id="offset-zero-edge"),
    pytest.param({"offset": MPSOffset(-2, 1, 0), "edge_mode": MPSImageEdgeMode.clamp}, id="offset-clamp"),
    pytest.param({"clip_rect": region((1, 1, 0), (2, 5, 1))}, id="clip"),
    pytest.param({"offset": MPSOffset(0, 0, 1), "clip_rect": region((0, 0, 0), (9, 9, 1))}, id="batch-z"),
    pytest.param({"source_feature_channel_offset": 4, "destination_feature_channel_offset": 4}, id="channel-offsets"),
]


@pytest.mark.parametrize("props", COORD_CASES)
def test_inference_coordinates(device, cb, props) -> None:
    ds = data_source(3)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    for name, v in props.items():
        setattr(k, name, v)
    src_shape = (2, 3, 4, 11)   # more channels than C: the first C of the window are used
    x_img, x = image(random(3, src_shape), device)
    dst, before = poisoned((2, 3, 4, 12), device, value=7.0)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = ref.unary_kernel_reference(
        x, before, offset=k.offset, clip_rect=props.get("clip_rect"), src_c_off=k.source_feature_channel_offset,
        src_c_max=C, dst_c_off=k.destination_feature_channel_offset, edge_mode=k.edge_mode,
        fn=lambda b: inference_ref(b, ds))
    assert_close(values(dst), expected, torch.float32, BN_TOL)


def test_auto_sized_forms(device, cb) -> None:
    ds = data_source(4)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    imgs = [image(random(10 + i, (1, 3, 5, C)), device) for i in range(3)]
    outs = k.encode_batch(cb, [im for im, _ in imgs])
    single = k.encode(cb, imgs[0][0])
    dsts = [poisoned((1, 3, 5, C), device)[0] for _ in imgs]
    assert k.encode_batch(cb, [im for im, _ in imgs], dsts) is None
    finish(cb)
    assert len(outs) == 3 and single.feature_channels == C
    for (_, x), o, d in zip(imgs, outs, dsts):
        assert_close(values(o), inference_ref(x, ds), torch.float32, BN_TOL)
        assert_close(values(d), values(o), torch.float32)


def test_unorm_destination(device, cb) -> None:
    ds = data_source(5)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    x_img, x = image(random(5, SHAPE), device)
    desc = mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.unorm8, width=4, height=3,
                                    feature_channels=C, number_of_images=2)
    dst = mpsnn.MPSImage(device, image_descriptor=desc)
    k.encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), np.clip(inference_ref(x, ds), 0, 1), "unorm8")


# -- statistics and training forward -----------------------------------------------------------------


def test_statistics_and_sub_batches(device, cb) -> None:
    ds = data_source(6)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    xs = [image(random(20 + i, (1 + i % 2, 3, 4, C)) * (i + 1) + i, device) for i in range(4)]
    whole = np.concatenate([x for _, x in xs])
    st = k.result_state(xs[0][0])
    assert isinstance(st, MPSCNNBatchNormalizationState) and st.batch_normalization is k
    # before any statistics: the kernel's stored values
    np.testing.assert_array_equal(st.mean.cpu().numpy(), ds.mean())
    stats = MPSCNNBatchNormalizationStatistics(device)
    stats.encode_batch(cb, [im for im, _ in xs[:1]], st)
    stats.encode_batch(cb, [im for im, _ in xs[1:]], st)       # a second sub-batch accumulates
    finish(cb)
    m, v = bref.batch_norm_statistics_nhwc(whole)
    assert st.statistics_count == whole.size // C
    assert_close(st.mean, m, torch.float32, BN_TOL)
    assert_close(st.variance, v, torch.float32, BN_TOL)
    st.reset()
    assert st.statistics_count == 0 and st.gradient_for_gamma is None
    np.testing.assert_array_equal(st.variance.cpu().numpy(), ds.variance())


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_training_forward_uses_batch_statistics(device, cb, dtype) -> None:
    ds = data_source(7)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    x_img, x = image(random(7, SHAPE) * 3 + 1, device, dtype)
    st = k.temporary_result_state(cb, x_img)
    st.read_count = 2
    MPSCNNBatchNormalizationStatistics(device).encode(cb, x_img, st)
    y = k.encode(cb, x_img, st)                    # positional state, auto destination
    dst = poisoned(SHAPE, device, dtype=dtype)[0]
    k.encode(cb, x_img, batch_normalization_state=st, destination_image=dst)
    assert st.read_count == 0
    m, v = bref.batch_norm_statistics_nhwc(x)
    expected = bref.batch_norm_inference_nhwc(x, m.astype(np.float32), v.astype(np.float32), ds.gamma(), ds.beta(), EPS)
    finish(cb)
    assert_close(values(y), expected, dtype, BN_TOL)
    assert_close(values(dst), expected, dtype, BN_TOL)


# -- gradients -------------------------------------------------------------------------------------------


def torch_training_grads(x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray, neuron) -> tuple[np.ndarray, ...]:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(gamma.astype(np.float64), requires_grad=True)
    b = torch.tensor(beta.astype(np.float64), requires_grad=True)
    var, mean = torch.var_mean(xt, dim=(0, 1, 2), correction=0)
    z = (xt - mean) / torch.sqrt(var + float(np.float32(EPS))) * g + b
    if neuron is not None and neuron[0] == MPSCNNNeuronType.reLU:
        z = torch.where(z >= 0, z, float(np.float32(neuron[1])) * z)
    elif neuron is not None:
        z = float(np.float32(neuron[1])) * torch.tanh(float(np.float32(neuron[2])) * z)
    z.backward(torch.tensor(dy))
    return xt.grad.numpy(), g.grad.numpy(), b.grad.numpy()


def run_training(device, cb, xs, dys, ds, neuron, split: int = 1):
    """Statistics -> statistics gradient (in ``split`` sub-batches) -> gradient, batch of images."""
    nd = descriptor(neuron)
    k = MPSCNNBatchNormalization(device, data_source=ds, fused_neuron_descriptor=nd)
    st = k.result_state(xs[0])
    MPSCNNBatchNormalizationStatistics(device).encode_batch(cb, xs, st)
    k.encode_batch(cb, xs, st)
    sg = MPSCNNBatchNormalizationStatisticsGradient(device, fused_neuron_descriptor=nd)
    for i in range(0, len(xs), split):
        sg.encode_batch(cb, dys[i:i + split], xs[i:i + split], st)
    dxs = MPSCNNBatchNormalizationGradient(device, fused_neuron_descriptor=nd).encode_batch(cb, dys, xs, st)
    finish(cb)
    return dxs, st


@pytest.mark.parametrize("neuron", NEURONS)
def test_gradient_matches_reference_and_autograd(device, cb, neuron) -> None:
    ds = data_source(8)
    xs_np = [random(30 + i, (1, 3, 4, C)) * 1.5 + 0.3 for i in range(3)]
    dys_np = [np.random.default_rng(40 + i).normal(size=(1, 3, 4, C)) for i in range(3)]
    xs = [image(x, device)[0] for x in xs_np]
    dys = [image(d, device)[0] for d in dys_np]
    dxs, st = run_training(device, cb, xs, dys, ds, neuron, split=2)
    x, dy = np.concatenate(xs_np), np.concatenate(dys_np)
    m, v = bref.batch_norm_statistics_nhwc(x)
    rdx, rdg, rdb = bref.batch_norm_gradient_nhwc(dy, x, m, v, ds.gamma(), EPS, ds.beta(), neuron)
    got = np.concatenate([values(d) for d in dxs])
    assert_close(got, rdx, torch.float32, BN_TOL, msg="dx vs reference")
    assert_close(st.gradient_for_gamma, rdg, torch.float32, BN_TOL, msg="dgamma")
    assert_close(st.gradient_for_beta, rdb, torch.float32, BN_TOL, msg="dbeta")
    adx, adg, adb = torch_training_grads(x, dy, ds.gamma(), ds.beta(), neuron)
    assert_close(got, adx, torch.float32, BN_TOL, msg="dx vs autograd")
    assert_close(st.gradient_for_gamma, adg, torch.float32, BN_TOL, msg="dgamma vs autograd")
    assert_close(st.gradient_for_beta, adb, torch.float32, BN_TOL, msg="dbeta vs autograd")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_gradient_storage_dtypes(device, cb, dtype) -> None:
    ds = data_source(9)
    pairs = [image(random(9 + i, (1, 3, 4, C)), device, dtype) for i in range(2)]
    dpairs = [image(np.random.default_rng(9 + i).normal(size=(1, 3, 4, C)), device, dtype) for i in range(2)]
    dxs, st = run_training(device, cb, [p[0] for p in pairs], [p[0] for p in dpairs], ds, None)
    x, dy = np.concatenate([p[1] for p in pairs]), np.concatenate([p[1] for p in dpairs])
    m, v = bref.batch_norm_statistics_nhwc(x)
    rdx, rdg, _ = bref.batch_norm_gradient_nhwc(dy, x, m, v, ds.gamma(), EPS, ds.beta())
    assert dxs[0].dtype == dtype
    assert_close(np.concatenate([values(d) for d in dxs]), rdx, dtype, BN_TOL)
    assert_close(st.gradient_for_gamma, rdg, dtype, BN_TOL)


def test_gradient_with_inference_statistics_and_geometry(device, cb) -> None:
    """No statistics pass: constant statistics, dX = gamma/sigma*G; channel offsets and a
    clipped forward region (dY = 0 where the forward wrote nothing)."""
    ds = data_source(10)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    k.source_feature_channel_offset = 4
    k.clip_rect = region((1, 0, 0), (2, 3, 2))
    x_img, x = image(random(10, (2, 3, 4, 9)), device)
    y_img = poisoned((2, 3, 4, C), device, value=0.0)[0]
    st = k.result_state(x_img, destination_image=y_img)
    k.encode(cb, x_img, st, y_img)
    dy_img, dy = image(np.random.default_rng(10).normal(size=(2, 3, 4, C)), device)
    MPSCNNBatchNormalizationStatisticsGradient(device).encode(cb, dy_img, x_img, st)
    dx = MPSCNNBatchNormalizationGradient(device).encode(cb, dy_img, x_img, st)
    finish(cb)
    # forward: destination columns 1, 2 read source columns 0, 1 (offset 0 at clip origin 1),
    # so source pixel p pairs with dY at p + 1; dY is 0 where the forward wrote nothing
    g = np.zeros_like(dy)
    g[:, :, 0:2] = dy[:, :, 1:3]
    xs = x[..., 4:4 + C]
    rdx, rdg, rdb = bref.batch_norm_gradient_nhwc(g, xs, ds.mean(), ds.variance(), ds.gamma(), EPS, ds.beta(),
                                                  constant_statistics=True)
    expected = np.zeros((2, 3, 4, 9))
    expected[..., 4:4 + C] = rdx
    assert dx.shape == (2, 3, 4, 9)
    assert_close(values(dx), expected, torch.float32, BN_TOL)
    assert_close(st.gradient_for_beta, rdb, torch.float32, BN_TOL)


# -- reloads, states, data-source updates -------------------------------------------------------------------


def test_reloads(device, cb) -> None:
    ds = data_source(11)
    k = MPSCNNBatchNormalization(device, data_source=ds, fused_neuron_descriptor=None)
    x_img, x = image(random(11, SHAPE), device)
    p = params(12)
    ds.set_gamma_and_beta(p["gamma"], None)
    k.reload_gamma_and_beta_from_data_source()
    ds.set_mean_and_variance(p["mean"], p["variance"])
    k.reload_mean_and_variance_from_data_source()
    y1 = k.encode(cb, x_img)
    other = data_source(13, epsilon=0.25, label="other")
    k.reload_data_source(other)
    y2 = k.encode(cb, x_img)
    q = params(14, 8)   # states may hold more values than C
    gb = MPSCNNNormalizationGammaAndBetaState(torch.from_numpy(q["gamma"]).to(device.torch_device), torch.from_numpy(q["beta"]).to(device.torch_device))
    mv = MPSCNNNormalizationMeanAndVarianceState.temporary_state_with_command_buffer(cb, number_of_feature_channels=8)
    assert mv.number_of_feature_channels == 8 and mv.is_temporary
    k.reload_gamma_and_beta_with_command_buffer(cb, gb)
    k.reload_mean_and_variance(cb, mv)              # Swift spelling; zeros
    assert mv.read_count == 0
    y3 = k.encode(cb, x_img)
    finish(cb)
    assert_close(values(y1), bref.batch_norm_inference_nhwc(x, p["mean"], p["variance"], p["gamma"], None, EPS), torch.float32, BN_TOL)
    assert k.epsilon == np.float32(0.25) and k.label == "other" and k.data_source is other
    assert_close(values(y2), inference_ref(x, other, eps=0.25), torch.float32, BN_TOL)
    assert_close(values(y3), bref.batch_norm_inference_nhwc(x, np.zeros(C), np.zeros(C), q["gamma"][:C], q["beta"][:C], 0.25),
                 torch.float32, BN_TOL)


def test_running_statistics_update(device, cb) -> None:
    ds = data_source(15, momentum=0.25)
    k = MPSCNNBatchNormalization(device, data_source=ds)
    x_img, x = image(random(15, SHAPE), device)
    st = k.result_state(x_img)
    MPSCNNBatchNormalizationStatistics(device).encode(cb, x_img, st)
    mv = ds.update_mean_and_variance(cb, st)
    finish(cb)
    m, v = bref.batch_norm_statistics_nhwc(x)
    old_mean = ds.mean().astype(np.float64)
    assert_close(mv.mean, 0.75 * old_mean + 0.25 * m, torch.float32, BN_TOL)
    assert ds.update_mean_and_variance_with_batch_normalization_state(st) is True
    assert_close(ds.variance(), 0.75 * params(15)["variance"] + 0.25 * v, torch.float32, BN_TOL)
    assert data_source(15).update_mean_and_variance(cb, st) is None


def test_backend_accumulates_half_in_float32() -> None:
    x = torch.full((1, 64, 64, 1), 1000.0, dtype=torch.float16)
    x[0, 0, 0, 0] = 1001.0
    mean, var = backend.batch_norm_statistics_nhwc(x)
    assert mean.dtype == torch.float32 and abs(float(mean) - (1000.0 + 1 / 4096)) < 1e-4
    m, v = backend.merge_statistics(2, torch.tensor([1.0]), torch.tensor([1.0]), 2, torch.tensor([3.0]), torch.tensor([1.0]))
    assert float(m) == 2.0 and float(v) == 2.0   # {0, 2, 2, 4}


# -- errors --------------------------------------------------------------------------------------------


def test_init_errors(device) -> None:
    with pytest.raises(MPSError, match="data_source"):
        MPSCNNBatchNormalization(device)
    with pytest.raises(MPSError, match="MPSCNNBatchNormalizationDataSource"):
        MPSCNNBatchNormalization(device, data_source=object())
    ds = data_source()
    ds.load = lambda: False
    with pytest.raises(MPSError, match=r"load\(\)"):
        MPSCNNBatchNormalization(device, data_source=ds)
    with pytest.raises(MPSError, match="mean"):
        BatchNormalizationDataSource(np.ones(3), None, np.zeros(2), np.ones(3))
    bad = data_source()
    bad._variance = -np.ones(C, np.float32)
    with pytest.raises(MPSError, match="variance"):
        MPSCNNBatchNormalization(device, data_source=bad)
    with pytest.raises(MPSError, match="fused_neuron_descriptor"):
        MPSCNNBatchNormalization(device, data_source=data_source(), fused_neuron_descriptor="relu")
    with pytest.raises(MPSError, match="momentum"):
        data_source(momentum=2.0)


def test_encode_errors(device, cb) -> None:
    k = MPSCNNBatchNormalization(device, data_source=data_source())
    narrow, _ = image(random(0, (1, 2, 2, 3)), device)
    with pytest.raises(MPSError, match="number_of_feature_channels = 5"):
        k.encode(cb, narrow)
    x_img, _ = image(random(0, SHAPE), device)
    with pytest.raises(MPSError, match="unavailable"):
        k.encode(cb, x_img, destination_state_is_temporary=True)
    other = MPSCNNBatchNormalization(device, data_source=data_source(c=3))
    with pytest.raises(MPSError, match="5"):
        k.encode(cb, x_img, other.result_state(narrow))
    stats = MPSCNNBatchNormalizationStatistics(device)
    with pytest.raises(MPSError, match="state"):
        stats.encode_batch(cb, [x_img], None)
    stats.offset = MPSOffset(1, 0, 0)
    with pytest.raises(MPSError, match="whole images"):
        stats.encode_batch(cb, [x_img], k.result_state(x_img))


def test_gradient_order_errors(device, cb) -> None:
    k = MPSCNNBatchNormalization(device, data_source=data_source())
    xs = [image(random(i, (1, 2, 3, C)), device)[0] for i in range(2)]
    st = k.result_state(xs[0])
    stats = MPSCNNBatchNormalizationStatistics(device)
    stats.encode_batch(cb, xs, st)
    grad = MPSCNNBatchNormalizationGradient(device)
    with pytest.raises(MPSError, match="no accumulated gradients"):
        grad.encode(cb, xs[0], xs[1], st)
    MPSCNNBatchNormalizationStatisticsGradient(device).encode_batch(cb, xs[:1], xs[:1], st)
    with pytest.raises(MPSError, match="whole batch"):
        grad.encode_batch(cb, xs, xs, st)
    with pytest.raises(MPSError, match="MPSCNNBatchNormalizationState"):
        grad.encode(cb, xs[0], xs[1], None)
    tmp = k.temporary_result_state(cb, xs[0])
    k.encode(cb, xs[0], tmp)
    with pytest.raises(MPSError, match="read_count"):
        _ = tmp.mean
