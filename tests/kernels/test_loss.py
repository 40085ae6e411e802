"""The loss family: enums, MPSCNNLossDescriptor, MPSCNNLossDataDescriptor, MPSCNNLossLabels
and MPSCNNLoss against two oracles.

1. ``mpsnn.testing.reference_loss`` (float64 NumPy from loss.md) for every loss type x
   reduction (weights, label smoothing, reduceAcrossBatch, clip rects, channel offsets).
2. ``torch.autograd`` in float64 for every per-element gradient (independent torch
   formulations of the losses below), with random weights.
The forward/gradient-split kernels are in ``test_loss_forward_gradient.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNLoss,
    MPSCNNLossDataDescriptor,
    MPSCNNLossDescriptor,
    MPSCNNLossLabels,
    MPSCNNLossType,
    MPSCNNReductionType,
    MPSDataLayout,
    MPSOffset,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.backends import loss as backend
from mpsnn.testing import reference_loss as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.reference_loss import inputs, torch_loss, weights
from mpsnn.testing.tolerances import Tol, assert_close

T = MPSCNNLossType
R = MPSCNNReductionType
LOSS_TYPES = [t for t in T if t != T.count]
REDUCTIONS = [r for r in R if r != R.count]
COMBOS = [pytest.param(t, r, id=f"{t.name}-{r.name}") for t in LOSS_TYPES for r in REDUCTIONS if t != T.cosineDistance or r == R.sum]
HWC = (3, 4, 5)  # odd sizes, channels not a multiple of 4
#: float32 losses are sums of ~60 float32 terms
LOSS_TOL = {"float32": Tol(2e-5, 2e-5), "float16": Tol(2e-5, 2e-5), "bfloat16": Tol(2e-5, 2e-5)}
GRAD_TOL = {"float32": Tol(2e-5, 1e-5)}
AUTOGRAD_TOL = {"float64": Tol(1e-10, 1e-12)}


def data_desc(a: np.ndarray) -> MPSCNNLossDataDescriptor:
    h, w, c = a.shape
    return MPSCNNLossDataDescriptor.cnn_loss_data_descriptor(np.ascontiguousarray(a, np.float32), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(w, h, c))


def labels_for(device, t: np.ndarray, w: np.ndarray | None = None, loss_size: MTLSize | None = None, **kw) -> MPSCNNLossLabels:
    h, wd, c = t.shape
    return MPSCNNLossLabels(device, loss_image_size=loss_size or MTLSize(1, 1, 1), labels_descriptor=data_desc(t),
                            weights_descriptor=None if w is None else data_desc(w), **kw)


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float64)


def kernel(device, loss_type: T, reduction: R, **fields) -> MPSCNNLoss:
    d = MPSCNNLossDescriptor.cnn_loss_descriptor(loss_type, reduction)
    for k, v in fields.items():
        setattr(d, k, v)
    return MPSCNNLoss(device, loss_descriptor=d)


# -- enums and descriptors ------------------------------------------------------------------------------------


def test_public_names_and_enums() -> None:
    for name in ("MPSCNNLoss", "MPSCNNLossDescriptor", "MPSCNNLossDataDescriptor", "MPSCNNLossLabels", "MPSCNNLossLabelsBatch",
                 "MPSCNNLossType", "MPSCNNReductionType", "MPSNNForwardLoss", "MPSNNLossGradient", "MPSNNInitialGradient"):
        assert name in mpsnn.__all__ and hasattr(mpsnn, name)
    assert issubclass(MPSCNNLoss, mpsnn.MPSCNNKernel) and issubclass(MPSCNNLossLabels, mpsnn.MPSState)
    assert [t.name for t in T] == list(ref.NAMES) + ["count"] and [int(t) for t in T] == list(range(11))
    assert [(r.name, int(r)) for r in R] == [("none", 0), ("sum", 1), ("mean", 2), ("sumByNonZeroWeights", 3), ("count", 4)]
    assert mpsnn.MPSCNNLossLabelsBatch is list


def test_descriptor_defaults_factory_copy() -> None:
    d = MPSCNNLossDescriptor.cnn_loss_descriptor(T.huber, R.mean)
    assert d == MPSCNNLossDescriptor(T.huber, R.mean)
    assert (d.loss_type, d.reduction_type, d.reduce_across_batch, d.weight, d.label_smoothing, d.number_of_classes, d.delta) == (
        T.huber, R.mean, False, 1.0, 0.0, 1, 1.0)
    assert d.epsilon == pytest.approx(1e-7)
    d.delta = 2.5
    d.weight = 0.25
    d.reduce_across_batch = True
    c = d.copy()
    assert c == d and c is not d
    c.delta = 3.0
    assert d.delta == 2.5 and c != d
    d.loss_type = 3
    assert d.loss_type is T.sigmoidCrossEntropy


@pytest.mark.parametrize("field,value", [("label_smoothing", 1.5), ("label_smoothing", -0.1), ("number_of_classes", 0),
                                         ("epsilon", -1.0), ("delta", 0.0), ("weight", float("nan")), ("weight", "x"),
                                         ("reduce_across_batch", 1), ("loss_type", 10), ("loss_type", 99), ("reduction_type", 4),
                                         ("reduction_type", -1)])
def test_descriptor_bad_values(field: str, value) -> None:
    d = MPSCNNLossDescriptor(T.softMaxCrossEntropy, R.sum)
    with pytest.raises(mpsnn.MPSValueError, match=f"MPSCNNLossDescriptor: `{field}`"):
        setattr(d, field, value)


def test_descriptor_bad_factory_arguments() -> None:
    with pytest.raises(mpsnn.MPSValueError, match="count"):
        MPSCNNLossDescriptor.cnn_loss_descriptor(T.count, R.sum)
    with pytest.raises(mpsnn.MPSValueError, match="reduction_type"):
        MPSCNNLossDescriptor.cnn_loss_descriptor(T.hinge, R.count)


@pytest.mark.parametrize("field,value,loss_type", [("label_smoothing", 0.1, T.huber), ("number_of_classes", 3, T.sigmoidCrossEntropy),
                                                   ("epsilon", 1e-3, T.huber), ("delta", 2.0, T.log)])
def test_descriptor_unused_parameter_warns_and_stores(field: str, value, loss_type: T) -> None:
    d = MPSCNNLossDescriptor(loss_type, R.sum)
    with pytest.warns(UserWarning, match=f"`{field}` is used only by"):
        setattr(d, field, value)
    assert getattr(d, field) == pytest.approx(value)


# -- data descriptors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "numpy", "torch"])
def test_data_descriptor_layouts_and_defaults(device, kind: str) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # H=2, W=3, C=4
    for layout, host in ((MPSDataLayout.HeightxWidthxFeatureChannels, a), (MPSDataLayout.FeatureChannelsxHeightxWidth, a.transpose(2, 0, 1))):
        host = np.ascontiguousarray(host)
        data = {"bytes": host.tobytes(), "numpy": host, "torch": torch.from_numpy(host)}[kind]
        d = MPSCNNLossDataDescriptor.cnn_loss_data_descriptor(data, layout, MTLSize(3, 2, 4))
        row = 4 * 3 * 4 if layout == MPSDataLayout.HeightxWidthxFeatureChannels else 4 * 3
        assert (d.layout, d.size, d.bytes_per_row, d.bytes_per_image) == (layout, MTLSize(3, 2, 4), row, 2 * row)
        lab = MPSCNNLossLabels(device, d)
        np.testing.assert_array_equal(values(lab.labels_image())[0], a)
        assert lab.weights_image() is None and lab.loss_image_size == MTLSize(1, 1, 1)
        assert d.copy().data == d.data


def test_data_descriptor_non_dense_strides(device) -> None:
    a = np.random.default_rng(0).uniform(-1, 1, (2, 3, 2)).astype(np.float32)  # H, W, C
    # HWC rows padded to 8 floats
    buf = np.zeros((2, 8), np.float32)
    buf[:, :6] = a.reshape(2, 6)
    d = MPSCNNLossDataDescriptor(buf.tobytes(), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(3, 2, 2))
    d.bytes_per_row = 32
    np.testing.assert_array_equal(values(MPSCNNLossLabels(device, d).labels_image())[0], a)
    # CHW with padded rows (4 floats) and padded planes (12 floats)
    planes = np.zeros((2, 12), np.float32)
    for c in range(2):
        p = np.zeros((3, 4), np.float32)
        p[:2, :3] = a[:, :, c]
        planes[c] = p.reshape(-1)
    d = MPSCNNLossDataDescriptor(planes, MPSDataLayout.FeatureChannelsxHeightxWidth, MTLSize(3, 2, 2))
    d.bytes_per_row, d.bytes_per_image = 16, 48
    np.testing.assert_array_equal(values(MPSCNNLossLabels(device, d).labels_image())[0], a)


def test_data_descriptor_errors(device) -> None:
    good = np.zeros((2, 2, 1), np.float32)
    with pytest.raises(mpsnn.MPSValueError, match="`layout`"):
        MPSCNNLossDataDescriptor(good, 7, MTLSize(2, 2, 1))
    with pytest.raises(mpsnn.MPSTypeError, match="float32"):
        MPSCNNLossDataDescriptor(good.astype(np.float64), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(2, 2, 1))
    with pytest.raises(mpsnn.MPSTypeError, match="float32"):
        MPSCNNLossDataDescriptor(torch.zeros(4, dtype=torch.float16), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(2, 2, 1))
    with pytest.raises(mpsnn.MPSValueError, match="size.depth"):
        MPSCNNLossDataDescriptor(good, MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(2, 2, 0))
    d = MPSCNNLossDataDescriptor(good, MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(2, 2, 1))
    with pytest.raises(mpsnn.MPSValueError, match="bytes_per_row"):
        d.bytes_per_row = 6
    for data, rule in ((good[:1], "hold the 2x2x1 values"), (np.zeros(5, np.float32), "at most"), (b"", "non-empty"), (b"abc", "whole number")):
        bad = MPSCNNLossDataDescriptor(data, MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(2, 2, 1))
        with pytest.raises(mpsnn.MPSValueError, match=rule):
            MPSCNNLossLabels(device, bad)
    d.bytes_per_row = 4
    with pytest.raises(mpsnn.MPSValueError, match="bytes_per_row"):
        MPSCNNLossLabels(device, d)


# -- labels ---------------------------------------------------------------------------------------------------


def test_labels_init_forms(device) -> None:
    t = np.random.default_rng(1).uniform(0, 1, (3, 4, 2))
    w = np.random.default_rng(2).uniform(0, 1, (3, 4, 2))
    one = MPSCNNLossLabels(device, labels_descriptor=data_desc(t))
    assert one.loss_image_size == MTLSize(1, 1, 1) and one.weights_image() is None
    two = MPSCNNLossLabels(device, MTLSize(4, 3, 2), data_desc(t), data_desc(w))
    assert_close(values(two.weights_image())[0], f32(w), "float32")
    assert values(two.loss_image()).shape == (1, 3, 4, 2)
    limg, _ = image(t[None], device)
    wimg, _ = image(w[None], device, torch.float16)
    three = MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1), labels_image=limg, weights_image=wimg)
    assert three.labels_image() is limg and three.weights_image() is wimg  # retained, not copied
    assert MPSCNNLossLabels(device, MTLSize(1, 1, 1), limg).labels_image() is limg


def test_labels_errors(device) -> None:
    t = np.zeros((3, 4, 2))
    with pytest.raises(mpsnn.MPSValueError, match="loss image size"):
        labels_for(device, t, loss_size=MTLSize(5, 3, 2))  # labels narrower than the loss image
    with pytest.raises(mpsnn.MPSValueError, match="loss_image_size.height"):
        labels_for(device, t, loss_size=MTLSize(1, 0, 1))
    with pytest.raises(mpsnn.MPSValueError, match="weights_descriptor.size"):
        labels_for(device, t, w=np.zeros((3, 4, 1)))
    with pytest.raises(mpsnn.MPSTypeError, match="exactly one"):
        MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1))
    limg, _ = image(np.zeros((1, 3, 4, 2)), device)
    wimg, _ = image(np.zeros((1, 3, 3, 2)), device)
    with pytest.raises(mpsnn.MPSValueError, match="weights_image"):
        MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1), labels_image=limg, weights_image=wimg)
    two, _ = image(np.zeros((2, 3, 4, 2)), device)
    with pytest.raises(mpsnn.MPSValueError, match="number_of_images"):
        MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1), labels_image=two)
    with pytest.raises(mpsnn.MPSTypeError, match="weights must come"):
        MPSCNNLossLabels(device, loss_image_size=MTLSize(1, 1, 1), labels_image=limg, weights_descriptor=data_desc(t))


# -- MPSCNNLoss against the float64 reference ---------------------------------------------------------------------


def run_batch(device, loss_type: T, reduction: R, ys, ts, ws, across: bool = False, dtype=torch.float32, **fields):
    k = kernel(device, loss_type, reduction, reduce_across_batch=across, **fields)
    cb = device.make_command_queue().make_command_buffer()
    srcs, yr = zip(*[image(y[None], device, dtype) for y in ys])
    size = MTLSize(ys[0].shape[1], ys[0].shape[0], ys[0].shape[2]) if reduction == R.none else MTLSize(1, 1, 1)
    labs = [labels_for(device, t, w, loss_size=size) for t, w in zip(ts, ws)]
    dests = [poisoned((1, *y.shape), device, dtype=dtype)[0] for y in ys]
    assert k.encode_batch(cb, list(srcs), labs, dests) is None
    finish(cb)
    return [values(d) for d in dests], [values(lab.loss_image()) for lab in labs], list(yr)


@pytest.mark.parametrize("across", [False, True], ids=["per-image", "across"])
@pytest.mark.parametrize("loss_type,reduction", COMBOS)
def test_loss_every_type_and_reduction(device, loss_type: T, reduction: R, across: bool) -> None:
    ys, ts = zip(*[inputs(loss_type, HWC, s) for s in (1, 2)])
    ws = [weights(HWC, 3), None]  # entry 1 without a weights image
    fields = {"weight": 0.75}
    if loss_type == T.huber:
        fields["delta"] = 0.8
    if loss_type == T.log:
        fields["epsilon"] = 1e-3
    grads, losses, yr = run_batch(device, loss_type, reduction, ys, ts, ws, across, **fields)
    rg, rl = ref.batch_loss_reference(int(loss_type), int(reduction), [y for y in yr], [f32(t)[None] for t in ts],
                                      [f32(ws[0])[None], None], reduce_across_batch=across, **fields)
    for k in range(2):
        assert_close(grads[k], rg[k], "float32", GRAD_TOL, msg=f"gradient {k}")
        expected = rl[k] if reduction == R.none else rl[k].reshape(1, 1, 1, 1)
        assert_close(losses[k], expected, "float32", LOSS_TOL, msg=f"loss {k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("loss_type", [T.softMaxCrossEntropy, T.huber, T.log, T.sigmoidCrossEntropy])
def test_loss_half_formats(device, loss_type: T, dtype: torch.dtype) -> None:
    ys, ts = zip(*[inputs(loss_type, HWC, s) for s in (4, 5)])
    grads, losses, yr = run_batch(device, loss_type, R.mean, ys, ts, [None, weights(HWC, 6)], dtype=dtype)
    rg, rl = ref.batch_loss_reference(int(loss_type), int(R.mean), yr, [f32(t)[None] for t in ts], [None, f32(weights(HWC, 6))[None]])
    key = "float16" if dtype == torch.float16 else "bfloat16"
    for k in range(2):
        assert_close(grads[k], rg[k], key, msg="gradient in the source's format")
        assert_close(losses[k], rl[k].reshape(1, 1, 1, 1), "float32", LOSS_TOL, msg="float32 loss of the rounded inputs")


@pytest.mark.parametrize("loss_type", [T.softMaxCrossEntropy, T.sigmoidCrossEntropy])
def test_label_smoothing(device, loss_type: T) -> None:
    y, t = inputs(loss_type, HWC, 7)
    grads, losses, yr = run_batch(device, loss_type, R.sum, [y], [t], [None], label_smoothing=0.2,
                                  **({"number_of_classes": 5} if loss_type == T.softMaxCrossEntropy else {}))
    smoothed = f32(t) * 0.8 + (0.2 / 5 if loss_type == T.softMaxCrossEntropy else 0.1)
    rg, rl = ref.batch_loss_reference(int(loss_type), int(R.sum), yr, [smoothed[None]])
    assert_close(grads[0], rg[0], "float32", GRAD_TOL)
    assert_close(losses[0], rl[0].reshape(1, 1, 1, 1), "float32", LOSS_TOL)


def test_per_element_loss_image_with_a_reduction(device) -> None:
    """A source-sized loss image holds the weighted per-element losses whatever the reduction."""
    y, t = inputs(T.meanSquaredError, HWC, 8)
    w = weights(HWC, 9)
    grads, losses, yr = run_batch(device, T.meanSquaredError, R.none, [y], [t], [w], weight=2.0)
    assert_close(losses[0], 2.0 * f32(w)[None] * (yr[0] - f32(t)[None]) ** 2, "float32")


def test_clip_rect_offset_and_channel_offsets(device) -> None:
    rng = np.random.default_rng(10)
    src_v = rng.uniform(-2, 2, (1, 5, 6, 8))
    t = rng.uniform(-2, 2, (5, 6, 4))
    k = kernel(device, T.meanSquaredError, R.sum)
    k.offset = MPSOffset(2, 1, 0)
    k.clip_rect = MTLRegion(MTLOrigin(1, 2, 0), MTLSize(3, 2, 1))
    k.source_feature_channel_offset = 4
    k.destination_feature_channel_offset = 4
    src, sv = image(src_v, device)
    dest, before = poisoned((1, 4, 5, 8), device)
    lab = labels_for(device, t)
    cb = device.make_command_queue().make_command_buffer()
    k.encode(cb, src, lab, dest)
    finish(cb)
    out = values(dest)
    y = sv[:, 1:3, 2:5, 4:8]
    tt = f32(t)[None, 1:3, 2:5, :]
    expected = before.copy()
    expected[:, 2:4, 1:4, 4:8] = 2 * (y - tt)
    assert_close(out, expected, "float32", GRAD_TOL)  # only the clipped region and channels are written
    assert_close(values(lab.loss_image()), ((y - tt) ** 2).sum().reshape(1, 1, 1, 1), "float32", LOSS_TOL)


def test_multi_image_source_one_image_selected(device) -> None:
    ys, ts = inputs(T.meanAbsoluteError, (2, *HWC), 11)
    k = kernel(device, T.meanAbsoluteError, R.mean)
    src, sv = image(ys, device)
    lab = labels_for(device, ts[1])
    cb = device.make_command_queue().make_command_buffer()
    dest, _ = poisoned((1, *HWC), device)
    with pytest.raises(mpsnn.MPSValueError, match="one image per MPSCNNLossLabels"):
        k.encode(cb, src, lab, poisoned((2, *HWC), device)[0])
    k.offset = MPSOffset(0, 0, 1)
    k.encode(cb, src, lab, dest)
    finish(cb)
    assert_close(values(lab.loss_image()), np.abs(sv[1] - f32(ts[1])).mean().reshape(1, 1, 1, 1), "float32", LOSS_TOL)


def test_allocating_forms_and_read_count(device) -> None:
    y, t = inputs(T.hinge, HWC, 12)
    k = kernel(device, T.hinge, R.sum)
    cb = device.make_command_queue().make_command_buffer()
    src, sv = image(y[None], device, torch.float16)
    lab = labels_for(device, t, command_buffer=cb)
    assert lab.is_temporary and lab.read_count == 1
    g = k.encode(cb, src, lab)
    assert isinstance(g, mpsnn.MPSImage) and g.shape == (1, *HWC) and g.dtype == torch.float16
    assert lab.read_count == 0
    with pytest.raises(mpsnn.MPSStateError):
        k.encode(cb, src, lab)
    labs = [labels_for(device, t), labels_for(device, t)]
    gs = k.encode_batch(cb, [src, src], labs)
    finish(cb)
    rg, _ = ref.batch_loss_reference(int(T.hinge), int(R.sum), [sv], [f32(t)[None]])
    for out in [g, *gs]:
        assert_close(values(out), rg[0], "float16")


def test_loss_errors(device) -> None:
    y, t = inputs(T.meanSquaredError, HWC, 13)
    cb = device.make_command_queue().make_command_buffer()
    src, _ = image(y[None], device)
    dest, _ = poisoned((1, *HWC), device)
    with pytest.raises(mpsnn.MPSValueError, match="cosineDistance"):
        kernel(device, T.cosineDistance, R.mean)
    with pytest.raises(mpsnn.MPSTypeError, match="loss_descriptor"):
        MPSCNNLoss(device, loss_descriptor=3)
    small = labels_for(device, t[:2])
    with pytest.raises(mpsnn.MPSValueError, match="cover the source pixels read"):
        kernel(device, T.meanSquaredError, R.sum).encode(cb, src, small, dest)
    odd = labels_for(device, t, loss_size=MTLSize(2, 2, 1))
    with pytest.raises(mpsnn.MPSValueError, match="loss_image_size"):
        kernel(device, T.meanSquaredError, R.sum).encode(cb, src, odd, dest)
    with pytest.raises(mpsnn.MPSValueError, match="for reduction none"):
        kernel(device, T.meanSquaredError, R.none).encode(cb, src, labels_for(device, t), dest)
    with pytest.raises(mpsnn.MPSValueError, match="match the 1 source images"):
        kernel(device, T.meanSquaredError, R.sum).encode_batch(cb, [src], [], [dest])
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNLossLabels"):
        kernel(device, T.meanSquaredError, R.sum).encode(cb, src, src, dest)
    k = kernel(device, T.meanSquaredError, R.sum)
    k.offset = MPSOffset(-1, 0, 0)
    with pytest.raises(mpsnn.MPSValueError, match="cover the source pixels read"):
        k.encode(cb, src, labels_for(device, t), dest)


def test_kernel_properties_copied_at_init(device) -> None:
    d = MPSCNNLossDescriptor(T.huber, R.sumByNonZeroWeights)
    d.delta, d.weight, d.reduce_across_batch = 0.5, 3.0, True
    k = MPSCNNLoss(device, loss_descriptor=d)
    d.delta = 2.0
    assert (k.loss_type, k.reduction_type, k.delta, k.weight, k.reduce_across_batch, k.label_smoothing, k.number_of_classes) == (
        T.huber, R.sumByNonZeroWeights, 0.5, 3.0, True, 0.0, 1)
    assert k.epsilon == pytest.approx(1e-7)
    with pytest.raises(AttributeError):
        k.delta = 1.0  # type: ignore[misc]


# -- kinks and conventions (exact) --------------------------------------------------------------------------------


def test_exact_values_at_kinks(device) -> None:
    y = np.array([[[0.5, -1.0, 1.0, 2.0]]])
    cases = [
        (T.meanAbsoluteError, {}, np.array([[[0.5, -1.0, 1.0, 2.0]]]), [0.0, 0.0, 0.0, 0.0]),        # y == t
        (T.hinge, {}, np.array([[[1.0, 0.0, 1.0, 0.0]]]), [-1.0, 0.0, 0.0, 1.0]),                    # 1 - s y = 0.5, 0, 0, -1 -> grads -1, 0(kink), 0, 1? see below
        (T.huber, {"delta": 0.5}, np.array([[[0.0, -0.5, 1.5, 2.0]]]), [0.5, -0.5, -0.5, 0.0]),      # |a| = delta exactly (a), a = 0
        (T.kullbackLeiblerDivergence, {}, np.array([[[0.0, 0.25, 0.5, 1.0]]]), [-0.0, -0.25, -0.5, -1.0]),
    ]
    for loss_type, fields, t, expected in cases:
        if loss_type == T.hinge:
            # s = 2t - 1: y=0.5,t=1 -> m=0.5>0 -> -1; y=-1,t=0 -> m=0 (kink) -> 0; y=1,t=1 -> m=0 -> 0; y=2,t=0 -> m=3 -> +1
            expected = [-1.0, 0.0, 0.0, 1.0]
        grads, losses, _ = run_batch(device, loss_type, R.none, [y], [t], [None], **fields)
        np.testing.assert_array_equal(grads[0].reshape(-1), np.array(expected), err_msg=loss_type.name)
    _, losses, _ = run_batch(device, T.kullbackLeiblerDivergence, R.none, [y], [np.zeros_like(y)], [None])
    np.testing.assert_array_equal(losses[0], 0.0)  # t = 0 -> 0 (not NaN)
    _, losses, _ = run_batch(device, T.hinge, R.none, [y], [np.array([[[1.0, 0.0, 1.0, 0.0]]])], [None])
    np.testing.assert_array_equal(losses[0].reshape(-1), [0.5, 0.0, 0.0, 3.0])


def test_gradient_independent_of_reduction(device) -> None:
    y, t = inputs(T.log, HWC, 14)
    out = [run_batch(device, T.log, r, [y], [t], [weights(HWC, 15)], across=a)[0][0] for r in REDUCTIONS for a in (False, True)]
    for o in out[1:]:
        np.testing.assert_array_equal(o, out[0])


def test_sum_by_nonzero_weights_all_zero_gives_zero(device) -> None:
    y, t = inputs(T.meanSquaredError, HWC, 16)
    _, losses, _ = run_batch(device, T.meanSquaredError, R.sumByNonZeroWeights, [y], [t], [np.zeros(HWC)])
    np.testing.assert_array_equal(losses[0], 0.0)


def test_softmax_ce_gradient_is_softmax_minus_labels(device) -> None:
    """Labels that do not sum to 1: the gradient is softmax - t (the spec's recommendation),
    not the exact derivative softmax * sum(t) - t."""
    y, _ = inputs(T.softMaxCrossEntropy, HWC, 17)
    t = np.full(HWC, 0.5)
    grads, _, yr = run_batch(device, T.softMaxCrossEntropy, R.sum, [y], [t], [None])
    sm = np.exp(yr[0]) / np.exp(yr[0]).sum(-1, keepdims=True)
    assert_close(grads[0], sm - 0.5, "float32", GRAD_TOL)


# -- torch.autograd (float64) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_backend_gradients_match_autograd(loss_type: T) -> None:
    """Backend dl/dy and dl/dt (float64) against autograd of sum(g_up * w * l)."""
    y, t = inputs(loss_type, (2, 3, 4, 5), 20)
    w = torch.from_numpy(weights((2, 3, 4, 5), 21))
    up = torch.from_numpy(np.random.default_rng(22).normal(size=(2, 3, 4, 5)))
    yt = torch.from_numpy(y).requires_grad_(True)
    tt = torch.from_numpy(t).requires_grad_(True)
    eps, delta = 1e-3, 0.7
    (torch_loss(loss_type, yt, tt, eps, delta) * w * up).sum().backward()
    kind = int(loss_type)
    gy = backend.loss_gradient(kind, yt.detach(), tt.detach(), eps, delta) * w * up
    gt = backend.loss_label_gradient(kind, yt.detach(), tt.detach(), eps, delta) * w * up
    assert gy.dtype == torch.float64
    if loss_type == T.softMaxCrossEntropy:
        # exact derivative softmax * sum(t) - t; labels sum to 1 per pixel here
        assert_close(tt.detach().sum(-1), np.ones((2, 3, 4)), "float64")
        gy = (backend.loss_gradient(kind, yt.detach(), tt.detach()) * w * up)
        exact = torch.softmax(yt.detach(), -1) * (w * up * tt.detach()).sum(-1, keepdim=True) - w * up * tt.detach()
        assert_close(yt.grad, exact, "float64", AUTOGRAD_TOL)
        # per-element weights break the shortcut: compare with equal weights per pixel instead
        wp = w[..., :1].expand_as(w)
        yt.grad = None
        (torch_loss(loss_type, yt, tt.detach(), eps, delta) * wp).sum().backward()
        gy = backend.loss_gradient(kind, yt.detach(), tt.detach()) * wp
    assert_close(gy, yt.grad, "float64", AUTOGRAD_TOL, msg="dl/dy")
    assert_close(gt, tt.grad, "float64", AUTOGRAD_TOL, msg="dl/dt")
    # the loss itself against the float64 reference
    assert_close(backend.loss_elementwise(kind, yt.detach(), tt.detach(), eps, delta),
                 ref.loss_elementwise(kind, y, t, eps, delta), "float64", AUTOGRAD_TOL)
    assert_close(backend.loss_gradient(kind, yt.detach(), tt.detach(), eps, delta), ref.loss_gradient(kind, y, t, eps, delta), "float64", AUTOGRAD_TOL)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kernel_gradient_matches_autograd(device, loss_type: T) -> None:
    """MPSCNNLoss's gradient image (float32) against autograd of sum(w * l) in float64."""
    y, t = inputs(loss_type, HWC, 23)
    w = weights(HWC, 24)
    if loss_type == T.softMaxCrossEntropy:
        w = np.repeat(w[..., :1], HWC[2], axis=-1)  # per-pixel weights: softmax - t is exact there
    grads, _, yr = run_batch(device, loss_type, R.sum, [y], [t], [w], weight=0.5, delta=0.7) if loss_type == T.huber else \
        run_batch(device, loss_type, R.sum, [y], [t], [w], weight=0.5)
    yt = torch.from_numpy(yr[0]).requires_grad_(True)
    (torch_loss(loss_type, yt, torch.from_numpy(f32(t)[None]), 1e-7, 0.7) * 0.5 * torch.from_numpy(f32(w)[None])).sum().backward()
    assert_close(grads[0], yt.grad, "float32", GRAD_TOL)


# -- a batch of views of one image: one pass over the whole batch ---------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss_type, reduction", COMBOS)
def test_batch_of_views_in_one_pass_matches_entry_by_entry(device, loss_type: T, reduction: R, weighted: bool) -> None:
    """A batch of one-image views of one image (what a graph hands its loss node) is encoded
    in one pass; the per-entry encode of the same batch as separate images is the oracle
    (itself checked against the float64 references above). Both loss-image forms, and
    reduceAcrossBatch."""
    rng = np.random.default_rng(int(loss_type) * 10 + int(reduction))
    n, (h, w, c) = 4, HWC
    y = rng.standard_normal((n, h, w, c))
    t = rng.random((n, h, w, c))
    wt = rng.random((n, h, w, c)) if weighted else None
    per_element = reduction == R.none
    size = MTLSize(w, h, c) if per_element else MTLSize(1, 1, 1)
    for across in ([False] if per_element or loss_type == T.cosineDistance else [False, True]):
        got = {}
        for mode in ("views", "separate"):
            k = kernel(device, loss_type, reduction, weight=0.7, reduce_across_batch=across)
            labs = [labels_for(device, t[i], None if wt is None else wt[i], size) for i in range(n)]
            cb = device.make_command_queue().make_command_buffer()
            if mode == "views":
                src, _ = image(y, device)
                dest, _ = poisoned((n, h, w, c), device)
                k.encode_batch(cb, src.batch_representation(), labs, dest.batch_representation())
                grad = values(dest)
            else:
                srcs = [image(y[i:i + 1], device)[0] for i in range(n)]
                dests = [poisoned((1, h, w, c), device)[0] for _ in range(n)]
                k.encode_batch(cb, srcs, labs, dests)
                grad = np.concatenate([values(d) for d in dests])
            finish(cb)
            got[mode] = (grad, np.stack([values(lab.loss_image()) for lab in labs]))
        np.testing.assert_allclose(got["views"][0], got["separate"][0], rtol=1e-6, atol=1e-7, err_msg="gradient")
        np.testing.assert_allclose(got["views"][1], got["separate"][1], rtol=1e-5, atol=1e-7, err_msg=f"losses, across={across}")
        assert np.isfinite(got["views"][0]).all(), "every gradient element written"


def test_batch_of_views_is_one_pass(device) -> None:
    """The batched path runs: each labels object's loss comes from one pass (checked by the
    pass's entry count, not by timing)."""
    k = kernel(device, T.softMaxCrossEntropy, R.sum)
    n, (h, w, c) = 3, HWC
    rng = np.random.default_rng(5)
    src, _ = image(rng.standard_normal((n, h, w, c)), device)
    labs = [labels_for(device, rng.random((h, w, c))) for _ in range(n)]
    calls = []
    orig = type(k)._encode_batch_region

    def spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(self._stack[2]))
        return orig(self, *a, **kw)
    type(k)._encode_batch_region = spy  # type: ignore[method-assign]
    try:
        cb = device.make_command_queue().make_command_buffer()
        dest, _ = poisoned((n, h, w, c), device)
        k.encode_batch(cb, src.batch_representation(), labs, dest.batch_representation())
        finish(cb)
    finally:
        type(k)._encode_batch_region = orig  # type: ignore[method-assign]
    assert calls == [n]
