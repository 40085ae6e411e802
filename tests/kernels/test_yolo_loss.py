"""MPSCNNYOLOLossDescriptor and MPSCNNYOLOLoss against two oracles.

1. ``mpsnn.testing.reference_yolo_loss`` (float64 NumPy loops over cells and anchors) for the
   gradient and the loss image: every reduction, A = 1 and A = 3, rescore on/off, a few
   loss-type combinations, weights, reduceAcrossBatch, offsets/clip rects/channel offsets,
   float16/bfloat16.
2. ``torch.autograd`` in float64 on an independent torch formulation of the documented
   forward loss (masks and the rescore IOU target held constant: stop-gradient), with a
   random upstream weighting.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSCNNLoss,
    MPSCNNLossDataDescriptor,
    MPSCNNLossLabels,
    MPSCNNLossType,
    MPSCNNReductionType,
    MPSCNNYOLOLoss,
    MPSCNNYOLOLossDescriptor,
    MPSDataLayout,
    MPSOffset,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.backends import yolo_loss as backend
from mpsnn.testing import reference_yolo_loss as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

T = MPSCNNLossType
R = MPSCNNReductionType
REDUCTIONS = [R.none, R.sum, R.mean, R.sumByNonZeroWeights]
DEFAULT_TYPES = (T.meanSquaredError, T.huber, T.sigmoidCrossEntropy, T.softMaxCrossEntropy)
COMBOS = [DEFAULT_TYPES,
          (T.meanAbsoluteError, T.meanSquaredError, T.log, T.sigmoidCrossEntropy),
          (T.huber, T.meanAbsoluteError, T.meanSquaredError, T.categoricalCrossEntropy)]
ANCHORS = {1: [[1.5, 1.0]], 3: [[0.6, 0.8], [1.5, 1.2], [3.0, 2.5]]}
#: losses are sums of ~100 float32 terms with scales up to 100
LOSS_TOL = {"float32": Tol(3e-5, 3e-5)}
GRAD_TOL = {"float32": Tol(2e-5, 2e-5)}
#: float16/bfloat16: inputs rounded to the storage format, float32 arithmetic, one rounding on store
LOW_LOSS_TOL = {"float16": Tol(3e-5, 3e-5), "bfloat16": Tol(3e-5, 3e-5)}
AUTOGRAD_TOL = {"float64": Tol(1e-10, 1e-12)}


def anchors_of(a: int) -> np.ndarray:
    return np.asarray(ANCHORS[a], np.float32)


def make_inputs(h: int, w: int, a: int, k: int, seed: int, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Predictions ``[n, H, W, A(5+K)]`` and labels: about half the slots labelled (box of
    random size near the anchors, one-hot class), sometimes several in one cell."""
    rng = np.random.default_rng(seed)
    c = 5 + k
    y = rng.normal(0, 1, (n, h, w, a, c))
    y[..., 2:4] = rng.normal(0, 0.4, (n, h, w, a, 2))
    t = np.zeros((n, h, w, a, c))
    lab = rng.uniform(0, 1, (n, h, w, a)) < 0.5
    anc = anchors_of(a)
    t[..., 0:2] = rng.uniform(0.05, 0.95, (n, h, w, a, 2))
    t[..., 2:4] = anc * np.exp(rng.normal(0, 0.4, (n, h, w, a, 2)))
    t[..., 4] = 1.0
    if k:
        cls = rng.integers(0, k, (n, h, w, a))
        t[..., 5:] = np.eye(k)[cls]
    t[~lab] = 0.0
    if t[..., 4].sum() == 0:
        t[0, 0, 0, 0, :5] = [0.5, 0.5, 1.0, 1.0, 1.0]
    return y.reshape(n, h, w, a * c), t.reshape(n, h, w, a * c)


def data_desc(arr: np.ndarray) -> MPSCNNLossDataDescriptor:
    h, w, c = arr.shape
    return MPSCNNLossDataDescriptor(np.ascontiguousarray(arr, np.float32), MPSDataLayout.HeightxWidthxFeatureChannels, MTLSize(w, h, c))


def labels_for(device, t: np.ndarray, w: np.ndarray | None = None, size: MTLSize | None = None) -> MPSCNNLossLabels:
    return MPSCNNLossLabels(device, loss_image_size=size or MTLSize(1, 1, 1), labels_descriptor=data_desc(t),
                            weights_descriptor=None if w is None else data_desc(w))


def descriptor(a: int, reduction: R = R.sum, types=DEFAULT_TYPES, **fields) -> MPSCNNYOLOLossDescriptor:
    d = MPSCNNYOLOLossDescriptor.cnn_loss_descriptor_with_xy_loss_type(*types, reduction, anchors_of(a).tobytes(), a)
    for key, v in fields.items():
        setattr(d, key, v)
    return d


def params_of(d: MPSCNNYOLOLossDescriptor) -> dict:
    parts = [dict(loss_type=int(s.loss_type), weight=s.weight, label_smoothing=s.label_smoothing, number_of_classes=s.number_of_classes,
                  epsilon=s.epsilon, delta=s.delta)
             for s in (d.xy_loss_descriptor, d.wh_loss_descriptor, d.confidence_loss_descriptor, d.classes_loss_descriptor)]
    return dict(parts=parts, scale_xy=d.scale_xy, scale_wh=d.scale_wh, scale_no_object=d.scale_no_object, scale_object=d.scale_object,
                scale_class=d.scale_class, min_iou=d.min_iou_for_object_presence, max_iou=d.max_iou_for_object_absence, rescore=d.rescore,
                reduction=int(d.reduction_type), reduce_across_batch=d.reduce_across_batch)


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float64)


def run(device, d: MPSCNNYOLOLossDescriptor, ys, ts, ws=None, dtype=torch.float32):
    """Encode a batch (one labels object per entry); returns gradients, losses, rounded inputs."""
    k = MPSCNNYOLOLoss(device, loss_descriptor=d)
    ws = ws or [None] * len(ys)
    cb = device.make_command_queue().make_command_buffer()
    srcs, yr = zip(*[image(y[None], device, dtype) for y in ys])
    size = MTLSize(ys[0].shape[1], ys[0].shape[0], ys[0].shape[2]) if d.reduction_type == R.none else MTLSize(1, 1, 1)
    labs = [labels_for(device, t, w, size) for t, w in zip(ts, ws)]
    dests = [poisoned((1, *y.shape), device, dtype=dtype)[0] for y in ys]
    assert k.encode_batch(cb, list(srcs), labs, dests) is None
    finish(cb)
    return [values(x)[0] for x in dests], [values(lab.loss_image())[0] for lab in labs], [r[0] for r in yr]


def check(device, d, ys, ts, ws=None, dtype=torch.float32) -> None:
    grads, losses, yr = run(device, d, ys, ts, ws, dtype)
    ws_ = [None if w is None else f32(w) for w in (ws or [None] * len(ys))]
    eg, el = ref.batch_reference(yr, [f32(t) for t in ts], ws_, anchors_of(d.number_of_anchor_boxes), params_of(d))
    key = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    for k, (g, e) in enumerate(zip(grads, eg)):
        if dtype == torch.float32:
            assert_close(g, e, key, GRAD_TOL, msg=f"gradient {k}")
        else:  # float32 arithmetic on the rounded inputs, one rounding of the result
            assert_close(g, e, key, msg=f"gradient {k}")
    for k, (lv, e) in enumerate(zip(losses, el)):
        assert_close(lv.reshape(np.shape(e)), e, "float32" if dtype == torch.float32 else key,
                     LOSS_TOL if dtype == torch.float32 else LOW_LOSS_TOL, msg=f"loss {k}")


# -- descriptor -------------------------------------------------------------------------------------------------


def test_public_names() -> None:
    for name in ("MPSCNNYOLOLoss", "MPSCNNYOLOLossDescriptor"):
        assert name in mpsnn.__all__ and hasattr(mpsnn, name)
    assert issubclass(MPSCNNYOLOLoss, mpsnn.MPSCNNKernel)


@pytest.mark.parametrize("form", ["bytes", "numpy", "torch"])
def test_descriptor_defaults_and_anchor_forms(form: str) -> None:
    anc = anchors_of(3)
    data = {"bytes": anc.tobytes(), "numpy": anc, "torch": torch.from_numpy(anc.reshape(-1))}[form]
    d = MPSCNNYOLOLossDescriptor.cnn_loss_descriptor_with_xy_loss_type(*DEFAULT_TYPES, R.mean, data, 3)
    assert (d.xy_loss_descriptor.loss_type, d.wh_loss_descriptor.loss_type, d.confidence_loss_descriptor.loss_type,
            d.classes_loss_descriptor.loss_type) == DEFAULT_TYPES
    for s in (d.xy_loss_descriptor, d.wh_loss_descriptor, d.confidence_loss_descriptor, d.classes_loss_descriptor):
        assert s.reduction_type == R.mean and s.weight == 1.0 and s.label_smoothing == 0.0
    assert (d.reduction_type, d.reduce_across_batch, d.rescore, d.scale_xy, d.scale_wh, d.scale_no_object, d.scale_object, d.scale_class,
            d.number_of_anchor_boxes, d.anchor_boxes) == (R.mean, False, True, 10.0, 10.0, 5.0, 100.0, 2.0, 3, anc.tobytes())
    assert d.min_iou_for_object_presence == pytest.approx(0.7) and d.max_iou_for_object_absence == pytest.approx(0.3)
    same = MPSCNNYOLOLossDescriptor(*DEFAULT_TYPES, R.mean, data, 3)
    assert same.anchor_boxes == d.anchor_boxes and MPSCNNYOLOLossDescriptor.cnn_loss_descriptor is not None


def test_descriptor_read_write_and_deep_copy() -> None:
    d = descriptor(3)
    d.scale_xy, d.scale_wh, d.scale_no_object, d.scale_object, d.scale_class = 1.0, 2.0, 3.0, 4.0, 5.0
    d.min_iou_for_object_presence, d.max_iou_for_object_absence = 0.6, 0.2
    d.rescore, d.reduce_across_batch, d.reduction_type = False, True, R.mean
    d.number_of_anchor_boxes = 1
    d.anchor_boxes = np.array([2.0, 3.0], np.float32)
    c = d.copy()
    assert (c.scale_xy, c.scale_wh, c.scale_no_object, c.scale_object, c.scale_class, c.rescore, c.reduce_across_batch, c.reduction_type,
            c.number_of_anchor_boxes) == (1.0, 2.0, 3.0, 4.0, 5.0, False, True, R.mean, 1)
    assert c.min_iou_for_object_presence == pytest.approx(0.6) and c.anchor_boxes == np.array([2.0, 3.0], np.float32).tobytes()
    assert c.xy_loss_descriptor is not d.xy_loss_descriptor and c.xy_loss_descriptor == d.xy_loss_descriptor
    c.xy_loss_descriptor.weight = 0.5
    c.scale_xy = 7.0
    assert d.xy_loss_descriptor.weight == 1.0 and d.scale_xy == 1.0
    new = mpsnn.MPSCNNLossDescriptor(T.huber, R.mean)
    d.wh_loss_descriptor = new
    assert d.wh_loss_descriptor is new


@pytest.mark.parametrize("field,value,err", [
    ("scale_xy", float("inf"), mpsnn.MPSValueError), ("scale_object", "x", mpsnn.MPSValueError), ("rescore", 1, mpsnn.MPSValueError),
    ("reduce_across_batch", "yes", mpsnn.MPSValueError), ("reduction_type", R.count, mpsnn.MPSValueError),
    ("number_of_anchor_boxes", 0, mpsnn.MPSValueError), ("anchor_boxes", b"\x00" * 12, mpsnn.MPSValueError),
    ("anchor_boxes", np.zeros(4, np.float64), mpsnn.MPSTypeError), ("anchor_boxes", [1.0] * 6, mpsnn.MPSTypeError),
    ("anchor_boxes", np.array([1, 1, 1, math.nan, 1, 1], np.float32), mpsnn.MPSValueError),
    ("xy_loss_descriptor", 3, mpsnn.MPSTypeError)])
def test_descriptor_bad_values(field: str, value, err) -> None:
    d = descriptor(3)
    with pytest.raises(err, match=f"MPSCNNYOLOLossDescriptor: `{field}`"):
        setattr(d, field, value)


def test_descriptor_bad_factory_arguments() -> None:
    with pytest.raises(mpsnn.MPSValueError, match="anchor_boxes.*16 bytes"):
        MPSCNNYOLOLossDescriptor(*DEFAULT_TYPES, R.sum, anchors_of(3).tobytes(), 2)  # 24 bytes for 2 anchors
    with pytest.raises(mpsnn.MPSValueError, match="anchor_boxes.*6 values"):
        MPSCNNYOLOLossDescriptor(*DEFAULT_TYPES, R.sum, np.zeros(4, np.float32), 3)
    with pytest.raises(mpsnn.MPSValueError, match="classes_loss_type"):
        MPSCNNYOLOLossDescriptor(T.huber, T.huber, T.huber, T.count, R.sum, anchors_of(1), 1)
    with pytest.raises(mpsnn.MPSValueError, match="reduction_type"):
        MPSCNNYOLOLossDescriptor(*DEFAULT_TYPES, R.count, anchors_of(1), 1)


# -- kernel init -----------------------------------------------------------------------------------------------


def test_kernel_properties(device) -> None:
    d = descriptor(3, R.mean, scale_class=3.0, rescore=False, reduce_across_batch=True)
    d.wh_loss_descriptor.delta = 0.5
    k = MPSCNNYOLOLoss(device, loss_descriptor=d)
    assert all(isinstance(x, MPSCNNLoss) for x in (k.loss_xy, k.loss_wh, k.loss_confidence, k.loss_classes))
    assert (k.loss_xy.loss_type, k.loss_wh.loss_type, k.loss_confidence.loss_type, k.loss_classes.loss_type) == DEFAULT_TYPES
    assert k.loss_wh.delta == 0.5 and k.loss_classes.reduction_type == R.mean
    assert (k.scale_xy, k.scale_wh, k.scale_no_object, k.scale_object, k.scale_class, k.reduction_type, k.number_of_anchor_boxes,
            k.anchor_boxes, k.reduce_across_batch, k.rescore) == (10.0, 10.0, 5.0, 100.0, 3.0, R.mean, 3, anchors_of(3).tobytes(), True, False)
    assert k.min_iou_for_object_presence == pytest.approx(0.7) and k.max_iou_for_object_absence == pytest.approx(0.3)
    d.scale_xy = 1.0  # copied at init
    assert k.scale_xy == 10.0
    for name in ("scale_xy", "loss_xy", "anchor_boxes"):
        with pytest.raises(AttributeError):
            setattr(k, name, 1.0)


def test_kernel_init_errors(device) -> None:
    d = descriptor(3, R.sum)
    d.confidence_loss_descriptor.reduction_type = R.mean
    with pytest.raises(mpsnn.MPSValueError, match="confidence_loss_descriptor.reduction_type.*same reductionType"):
        MPSCNNYOLOLoss(device, loss_descriptor=d)
    d = descriptor(3, R.sum)
    d.reduction_type = R.mean  # the sub-descriptors keep sum
    with pytest.raises(mpsnn.MPSValueError, match="same reductionType"):
        MPSCNNYOLOLoss(device, loss_descriptor=d)
    d = descriptor(3, R.sum, types=(T.meanSquaredError, T.huber, T.cosineDistance, T.softMaxCrossEntropy))
    with pytest.raises(mpsnn.MPSValueError, match="cosineDistance"):
        MPSCNNYOLOLoss(device, loss_descriptor=d)
    d = descriptor(3, R.sum)
    d.number_of_anchor_boxes = 2  # anchor data still holds 3 pairs
    with pytest.raises(mpsnn.MPSValueError, match="anchor_boxes"):
        MPSCNNYOLOLoss(device, loss_descriptor=d)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSCNNYOLOLossDescriptor"):
        MPSCNNYOLOLoss(device, loss_descriptor=d.xy_loss_descriptor)


# -- against the float64 reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("a,k", [(1, 3), (3, 2)], ids=["A1", "A3"])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=lambda r: r.name)
def test_reference_reductions(device, reduction: R, a: int, k: int) -> None:
    ys, ts = make_inputs(3, 4, a, k, seed=int(reduction) + 10 * a, n=2)
    check(device, descriptor(a, reduction), list(ys), list(ts))


@pytest.mark.parametrize("rescore", [True, False], ids=["rescore", "no-rescore"])
@pytest.mark.parametrize("types", COMBOS, ids=["default", "mae-mse-log-sig", "huber-mae-mse-cce"])
def test_reference_loss_type_combinations(device, types, rescore: bool) -> None:
    ys, ts = make_inputs(3, 3, 3, 3, seed=5)
    if types[2] == T.log:  # log loss expects probabilities
        ys[..., 4::8] = 1 / (1 + np.exp(-ys[..., 4::8]))
    if types[3] == T.categoricalCrossEntropy:  # expects positive probabilities
        for a in range(3):
            ys[..., a * 8 + 5:a * 8 + 8] = np.random.default_rng(a).uniform(0.1, 1.0, ys[..., a * 8 + 5:a * 8 + 8].shape)
    d = descriptor(3, R.sum, types=types, rescore=rescore)
    check(device, d, list(ys), list(ts))


def test_reference_weights_and_sub_descriptor_fields(device) -> None:
    ys, ts = make_inputs(3, 4, 3, 2, seed=7, n=2)
    ws = [np.random.default_rng(s).uniform(0, 2, ys[0].shape) * (np.random.default_rng(s + 1).uniform(0, 1, ys[0].shape) > 0.2) for s in (1, 2)]
    for reduction in (R.sum, R.sumByNonZeroWeights, R.none):
        d = descriptor(3, reduction, scale_no_object=2.0, min_iou_for_object_presence=0.5, max_iou_for_object_absence=0.4)
        d.xy_loss_descriptor.weight = 0.5
        d.wh_loss_descriptor.delta = 0.3
        d.confidence_loss_descriptor.label_smoothing = 0.1
        d.classes_loss_descriptor.label_smoothing = 0.2
        d.classes_loss_descriptor.number_of_classes = 2
        check(device, d, list(ys), list(ts), ws)


@pytest.mark.parametrize("reduction", [R.sum, R.mean, R.sumByNonZeroWeights])
def test_reference_reduce_across_batch(device, reduction: R) -> None:
    ys, ts = make_inputs(2, 3, 3, 1, seed=11, n=3)
    check(device, descriptor(3, reduction, reduce_across_batch=True), list(ys), list(ts))


def test_reference_no_classes_and_no_objects(device) -> None:
    """K = 0 (5 channels per anchor) and an image without labelled slots (all no-object)."""
    ys, ts = make_inputs(3, 3, 3, 0, seed=3)
    check(device, descriptor(3, R.mean), list(ys), list(ts))
    ts[:] = 0.0
    check(device, descriptor(3, R.mean), list(ys), list(ts))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_reference_low_precision(device, dtype) -> None:
    ys, ts = make_inputs(3, 3, 3, 2, seed=13)
    check(device, descriptor(3, R.sum), list(ys), list(ts), dtype=dtype)


def test_masks_known_cell() -> None:
    """One hand-made cell: the better-matching labelled anchor is responsible, the other
    labelled slot with a poor shape is not; a far prediction is a confident absence."""
    anc = torch.tensor([[1.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    d = descriptor(1)
    p = backend.YOLOLossParameters(*[backend.YOLOPart(1, 1.0, 0.0, 1, 1e-7, 1.0)] * 4, 1, 1, 1, 1, 1, 0.7, 0.3, True)
    t = torch.tensor([[0.5, 0.5, 1.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64).reshape(1, 1, 1, 2, 5)
    y = torch.zeros(1, 1, 1, 2, 5, dtype=torch.float64)  # predicted boxes: anchors, centred
    obj, noobj, own = backend.object_masks(y, t, anc, p)
    assert obj.tolist() == [[[[True, False]]]] and noobj.tolist() == [[[[False, True]]]]  # IOU(4x4, 1x1) = 1/16 <= 0.3
    assert own[0, 0, 0, 0].item() == pytest.approx(1.0) and own[0, 0, 0, 1].item() == pytest.approx(1 / 16)
    assert d.number_of_anchor_boxes == 1


# -- torch.autograd on an independent formulation ------------------------------------------------------------------


def torch_yolo_forward(y: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor, obj: torch.Tensor, noobj: torch.Tensor,
                       iou: torch.Tensor, s: dict) -> torch.Tensor:
    """Per-element weighted losses for xy=MSE, wh=Huber(delta), conf=sigmoidCE, classes=softmaxCE;
    ``obj``, ``noobj``, ``iou`` are constants (stop-gradient)."""
    objf, noobjf = obj.double(), noobj.double()
    sxy = torch.sigmoid(y[..., 0:2])
    lxy = s["xy"] * objf[..., None] * (sxy - t[..., 0:2]) ** 2
    tw = torch.where(obj[..., None], torch.log(t[..., 2:4].clamp_min(1e-30) / anchors), torch.zeros_like(t[..., 2:4]))
    a = y[..., 2:4] - tw
    hub = torch.where(a.abs() <= s["delta"], 0.5 * a * a, s["delta"] * (a.abs() - 0.5 * s["delta"]))
    lwh = s["wh"] * objf[..., None] * hub
    tc = (t[..., 4] * iou) * objf
    x = y[..., 4]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, tc, reduction="none")
    lc = (s["obj"] * objf + s["noobj"] * noobjf) * bce
    lcls = s["cls"] * objf[..., None] * (-t[..., 5:] * torch.log_softmax(y[..., 5:], dim=-1))
    return torch.cat([lxy, lwh, lc[..., None], lcls], dim=-1)


@pytest.mark.parametrize("a,k", [(1, 3), (3, 2)], ids=["A1", "A3"])
def test_gradient_against_autograd(device, a: int, k: int) -> None:
    ys, ts = make_inputs(3, 4, a, k, seed=21 + a)
    d = descriptor(a, R.sum, scale_xy=2.0, scale_wh=3.0, scale_no_object=1.5, scale_object=4.0, scale_class=0.7)
    d.wh_loss_descriptor.delta = 0.3
    anc = torch.from_numpy(anchors_of(a).astype(np.float64)).to(device.torch_device)
    y = torch.from_numpy(ys).to(device.torch_device).requires_grad_(True)
    t = torch.from_numpy(ts).to(device.torch_device)
    shape5 = (1, 3, 4, a, 5 + k)
    params = backend.YOLOLossParameters(*(backend.YOLOPart(int(s.loss_type), s.weight, s.label_smoothing, s.number_of_classes, s.epsilon, s.delta)
                                          for s in (d.xy_loss_descriptor, d.wh_loss_descriptor, d.confidence_loss_descriptor, d.classes_loss_descriptor)),
                                        d.scale_xy, d.scale_wh, d.scale_no_object, d.scale_object, d.scale_class,
                                        d.min_iou_for_object_presence, d.max_iou_for_object_absence, True)
    obj, noobj, iou = backend.object_masks(y.detach().reshape(shape5), t.reshape(shape5), anc, params)
    per = torch_yolo_forward(y.reshape(shape5), t.reshape(shape5), anc, obj, noobj, iou.detach(),
                             dict(xy=d.scale_xy, wh=d.scale_wh, obj=d.scale_object, noobj=d.scale_no_object, cls=d.scale_class,
                                  delta=d.wh_loss_descriptor.delta)).reshape(y.shape)
    upstream = torch.from_numpy(np.random.default_rng(1).uniform(0.5, 1.5, (1, 3, 4, 1))).to(device.torch_device)
    (expected,) = torch.autograd.grad((per * upstream).sum(), y, retain_graph=True)
    # the backend in float64, the per-cell upstream weight applied as a weights image
    grad, per_b, _, _ = backend.yolo_loss(y.detach(), t, upstream.expand_as(y), anc, params)
    assert_close(grad, expected, "float64", AUTOGRAD_TOL, msg="backend gradient vs autograd")
    assert_close(per_b, per.detach() * upstream, "float64", AUTOGRAD_TOL, msg="backend loss vs the torch forward")
    # the kernel (float32 images): gradient without weights vs autograd with upstream 1
    (plain,) = torch.autograd.grad(per.sum(), y)
    grads, _, _ = run(device, d, list(ys), list(ts))
    assert_close(grads[0], plain[0], "float32", GRAD_TOL, msg="kernel gradient vs autograd")


# -- encode forms and coordinates ----------------------------------------------------------------------------------


def test_allocating_forms_and_read_count(device) -> None:
    ys, ts = make_inputs(3, 3, 3, 1, seed=31, n=2)
    d = descriptor(3, R.sum)
    k = MPSCNNYOLOLoss(device, loss_descriptor=d)
    cb = device.make_command_queue().make_command_buffer()
    src, yr = image(ys[0:1], device, torch.float16)
    lab = MPSCNNLossLabels(device, labels_descriptor=data_desc(ts[0]))
    g = k.encode(cb, src, lab)
    srcs = [image(y[None], device)[0] for y in ys]
    labs = [MPSCNNLossLabels(device, labels_descriptor=data_desc(t), command_buffer=cb) for t in ts]
    gb = k.encode_batch(cb, srcs, labs)
    finish(cb)
    assert isinstance(g, mpsnn.MPSImage) and g.shape == (1, 3, 3, 18) and g.dtype == torch.float16
    eg, el = ref.batch_reference([yr[0]], [f32(ts[0])], [None], anchors_of(3), params_of(d))
    assert_close(values(g)[0], eg[0], "float16")
    assert_close(values(lab.loss_image()).reshape(()), el[0], "float32", LOSS_TOL)
    assert len(gb) == 2 and all(x.shape == (1, 3, 3, 18) for x in gb)
    assert all(lb.read_count == 0 for lb in labs)
    eg, _ = ref.batch_reference([f32(y) for y in ys], [f32(t) for t in ts], [None, None], anchors_of(3), params_of(d))
    for x, e in zip(gb, eg):
        assert_close(values(x)[0], e, "float32", GRAD_TOL)


def test_offsets_clip_rect_and_channel_offsets(device) -> None:
    """Source channels 4.. hold the prediction (source_feature_channel_offset=4); the region
    processed is the 2x2 block at source (1, 1) (offset) written to destination (1, 0)
    (clip rect) at channel 4; labels are indexed in source coordinates."""
    ys, ts = make_inputs(4, 4, 1, 2, seed=41)  # 7 channels
    full = np.concatenate([np.random.default_rng(0).normal(0, 1, (1, 4, 4, 4)), ys], axis=-1)
    d = descriptor(1, R.sum)
    k = MPSCNNYOLOLoss(device, loss_descriptor=d)
    k.source_feature_channel_offset = 4
    k.destination_feature_channel_offset = 4
    k.offset = MPSOffset(0, 1, 0)
    k.clip_rect = MTLRegion(origin=MTLOrigin(1, 0, 0), size=MTLSize(2, 2, 1))
    cb = device.make_command_queue().make_command_buffer()
    src, _ = image(full, device)
    dest, before = poisoned((1, 3, 3, 12), device)
    lab = MPSCNNLossLabels(device, labels_descriptor=data_desc(ts[0]))
    k.encode(cb, src, lab, dest)
    finish(cb)
    # source x = 0 + (dest x - 1), y = 1 + dest y: the block x in [0, 2), y in [1, 3)
    eg, el = ref.batch_reference([f32(ys[0, 1:3, 0:2])], [f32(ts[0, 1:3, 0:2])], [None], anchors_of(1), params_of(d))
    out = values(dest)[0]
    assert_close(out[0:2, 1:3, 4:11], eg[0], "float32", GRAD_TOL)
    expected = before[0].copy()
    expected[0:2, 1:3, 4:11] = out[0:2, 1:3, 4:11]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))  # nothing else written
    assert_close(values(lab.loss_image()).reshape(()), el[0], "float32", LOSS_TOL)


def test_encode_errors(device) -> None:
    d = descriptor(3, R.sum)
    k = MPSCNNYOLOLoss(device, loss_descriptor=d)
    cb = device.make_command_queue().make_command_buffer()
    for c, rule in ((20, "multiple of number_of_anchor_boxes=3"), (12, "at least 5 per anchor")):
        src, _ = image(np.zeros((1, 2, 2, c)), device)
        lab = MPSCNNLossLabels(device, labels_descriptor=data_desc(np.zeros((2, 2, c))))
        with pytest.raises(mpsnn.MPSValueError, match=rule):
            k.encode(cb, src, lab)
    src, _ = image(np.zeros((1, 2, 2, 18)), device)
    small = MPSCNNLossLabels(device, labels_descriptor=data_desc(np.zeros((2, 1, 18))))
    with pytest.raises(mpsnn.MPSValueError, match="cover the source pixels"):
        k.encode(cb, src, small)
    none = MPSCNNYOLOLoss(device, loss_descriptor=descriptor(3, R.none))
    with pytest.raises(mpsnn.MPSValueError, match="reduction none"):
        none.encode(cb, src, MPSCNNLossLabels(device, labels_descriptor=data_desc(np.zeros((2, 2, 18)))))
    with pytest.raises(mpsnn.MPSValueError, match="labels"):
        k.encode_batch(cb, [src, src], [MPSCNNLossLabels(device, labels_descriptor=data_desc(np.zeros((2, 2, 18))))])
