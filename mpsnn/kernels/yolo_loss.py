"""YOLO loss: MPSCNNYOLOLossDescriptor and MPSCNNYOLOLoss (spec/loss.md §13-14), built on the
loss family (:mod:`mpsnn.kernels.loss`, :mod:`mpsnn.kernels.loss_labels`); numerics in
:mod:`mpsnn.backends.yolo_loss`.

Layout (spec §14): ``A`` anchors, ``K = C/A - 5`` classes; anchor ``a`` owns channels
``[(5+K) a, (5+K)(a+1))`` in the order ``X, Y, W, H, C, F0..F(K-1)``; labels and weights use the
same layout. ``sigma`` is the logistic sigmoid; per slot (image n, cell x, y, anchor a):

* predicted box (inferred, YOLOv2): centre ``(sigma(X), sigma(Y))`` inside the cell, size
  ``(aw exp(W), ah exp(H))`` in anchor units; ground-truth box: centre ``(tX, tY)``, size
  ``(tW, tH)`` (label W, H are box sizes in the anchors' units, as the [bin] counting rule
  compares them with the anchors). IOU of centred boxes; 0 when the union is 0.
* ``labelled = (tC == 1)``. ``obj`` (responsible slot) = labelled and (its anchor IOU
  ``IOU_a`` >= the largest ``IOU_a`` of the cell's labelled slots, or ``IOU_a >
  minIOUForObjectPresence``) -- exactly spec §14's [bin] object-counting rule, used as the
  object mask (inferred). ``noobj`` = not obj and the best IOU of the slot's predicted box
  with the boxes of the cell's labelled slots is ``<= maxIOUForObjectAbsence`` (confident
  absence; a cell without labels gives IOU 0). Slots that are neither are not penalised.
* xy (channels X, Y): ``l_xy(sigma(X,Y), tXY)`` on obj slots, scale ``scaleXY``; gradient
  through the sigmoid: ``scaleXY w l'(sigma) sigma (1 - sigma)``.
* wh (channels W, H): ``l_wh(W, log(tW/aw))``, ``l_wh(H, log(tH/ah))`` on obj slots, scale
  ``scaleWH`` (raw W, H against the log-space target, YOLOv2's ``t_w``; inferred).
* confidence (channel C): target ``tC * IOU(pred, own ground truth)`` with ``rescore``
  (the IOU is a constant for the gradient: stop-gradient), ``tC`` without; scale
  ``scaleObject`` on obj slots, ``scaleNoObject`` (target 0) on noobj slots, 0 elsewhere.
* classes (F0..): ``l_cls(F, tF)`` on obj slots only, scale ``scaleClass`` (inferred).
* Each part uses its sub-descriptor's loss type, label smoothing, epsilon, delta and
  ``weight``; effective weight ``w_e = scale_e * mask_e * weight_part * W_e`` (``W_e`` the
  per-element weights image, else 1). Gradient image ``g_e = w_e dl/dy`` (chain rule for
  xy), independent of the reduction (as MPSCNNLoss).
* Loss image: reduction none -> source-sized ``v_e = w_e l_e``; otherwise each part is
  reduced by its own rule over the region (sum; mean divides by that part's element count
  ``W H A c_part``, softMaxCrossEntropy ``W H A``; sumByNonZeroWeights by the number of
  non-zero ``w_e`` of the part, 0 when none) and the four reduced values are ADDED (inferred).
  reduceAcrossBatch: per part over the batch, total to entry 0, others 0 (as MPSCNNLoss).
* The object count (spec [bin] ``countOfPresentObjects``) is not used as a normaliser (its
  use is not visible); it equals the number of obj slots.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..backends import loss as LB
from ..backends import yolo_loss as B
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import InputGeometry, Region
from ..images.image import MPSImage
from ..images.state import MPSState
from .loss import MPSCNNLoss, _LabelledLossKernel
from .loss_labels import (
    MPSCNNLossDescriptor,
    MPSCNNLossLabels,
    MPSCNNLossType,
    MPSCNNReductionType,
    loss_type_value,
    real_value,
    reduction_type_value,
)
from .results import write_result

__all__ = ["MPSCNNYOLOLoss", "MPSCNNYOLOLossDescriptor"]

_D = "MPSCNNYOLOLossDescriptor"
_SUBS = ("xy_loss_descriptor", "wh_loss_descriptor", "confidence_loss_descriptor", "classes_loss_descriptor")
_SCALES = {"scale_xy": 10.0, "scale_wh": 10.0, "scale_no_object": 5.0, "scale_object": 100.0, "scale_class": 2.0,
           "min_iou_for_object_presence": 0.7, "max_iou_for_object_absence": 0.3}


def anchor_values(owner: str, anchor_boxes: Any, number_of_anchor_boxes: int) -> np.ndarray:
    """``anchor_boxes`` (bytes / float32 NumPy / float32 torch) as a ``[A, 2]`` float32 array;
    exactly ``8 A`` bytes, finite values."""
    if isinstance(anchor_boxes, (bytes, bytearray, memoryview)):
        raw = bytes(anchor_boxes)
        if len(raw) != 8 * number_of_anchor_boxes:
            raise value_error(owner, "anchor_boxes", f"{len(raw)} bytes", f"hold number_of_anchor_boxes={number_of_anchor_boxes} float32 (width, height) pairs = {8 * number_of_anchor_boxes} bytes")
        arr = np.frombuffer(raw, dtype=np.float32).copy()
    elif isinstance(anchor_boxes, torch.Tensor) or isinstance(anchor_boxes, np.ndarray):
        if anchor_boxes.dtype not in (torch.float32, np.float32):
            raise MPSTypeError(f"{owner}: `anchor_boxes` must hold float32 values, but got {anchor_boxes.dtype}")
        arr = (anchor_boxes.detach().cpu().numpy() if isinstance(anchor_boxes, torch.Tensor) else np.asarray(anchor_boxes)).reshape(-1).copy()
        if arr.size != 2 * number_of_anchor_boxes:
            raise value_error(owner, "anchor_boxes", f"{arr.size} values", f"hold number_of_anchor_boxes={number_of_anchor_boxes} (width, height) pairs = {2 * number_of_anchor_boxes} values")
    else:
        raise MPSTypeError(f"{owner}: `anchor_boxes` must be bytes, a float32 NumPy array or a float32 torch tensor, but got {type(anchor_boxes).__name__}")
    if not np.all(np.isfinite(arr)):
        raise value_error(owner, "anchor_boxes", arr.tolist(), "hold finite values")
    return arr.reshape(number_of_anchor_boxes, 2)


def _count(owner: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, "number_of_anchor_boxes", value, "be an integer >= 1")
    return int(value)


class MPSCNNYOLOLossDescriptor:
    """``MPSCNNYOLOLossDescriptor``: the parameters of the YOLO loss (spec §13).

    Make one with the factory :meth:`cnn_loss_descriptor_with_xy_loss_type` (Swift
    ``cnnLossDescriptor(withXYLossType:whLossType:confidenceLossType:classesLossType:reductionType:anchorBoxes:numberOfAnchorBoxes:)``;
    alias :meth:`cnn_loss_descriptor`) or the constructor with the same arguments
    ``(xy_loss_type, wh_loss_type, confidence_loss_type, classes_loss_type, reduction_type,
    anchor_boxes, number_of_anchor_boxes)``. Each sub-descriptor is
    ``MPSCNNLossDescriptor(type, reduction_type)`` (weight 1, no smoothing, **[bin]**).

    Properties (all read-write, validated on assignment; defaults):

    * ``xy_loss_descriptor``, ``wh_loss_descriptor``, ``confidence_loss_descriptor``,
      ``classes_loss_descriptor`` (:class:`~mpsnn.MPSCNNLossDescriptor`, from the factory
      types; assigning stores the descriptor itself, as Objective-C would).
    * ``reduction_type`` (factory argument; assigning does NOT change the sub-descriptors'
      -- MPSCNNYOLOLoss checks that they agree, **[bin]**), ``reduce_across_batch`` (False),
      ``rescore`` (True), ``scale_xy`` (10), ``scale_wh`` (10), ``scale_no_object`` (5),
      ``scale_object`` (100), ``scale_class`` (2), ``min_iou_for_object_presence`` (0.7),
      ``max_iou_for_object_absence`` (0.3).
    * ``number_of_anchor_boxes`` (>= 1) and ``anchor_boxes``: ``A`` float32 ``(width,
      height)`` pairs, given as bytes (exactly ``8 A``), a float32 NumPy array or a float32
      torch tensor (``2 A`` values); read back as ``bytes``. Setting ``anchor_boxes`` checks
      it against the current ``number_of_anchor_boxes``; set the count first, the data is
      re-checked when the kernel is built (:class:`~mpsnn.MPSValueError` otherwise).

    ``copy()`` is deep (the four sub-descriptors are copied, **[bin]**).
    """

    def __init__(self, xy_loss_type: MPSCNNLossType, wh_loss_type: MPSCNNLossType, confidence_loss_type: MPSCNNLossType,
                 classes_loss_type: MPSCNNLossType, reduction_type: MPSCNNReductionType, anchor_boxes: Any,
                 number_of_anchor_boxes: int) -> None:
        red = reduction_type_value(_D, "reduction_type", reduction_type)
        subs = []
        for name, lt in zip(("xy_loss_type", "wh_loss_type", "confidence_loss_type", "classes_loss_type"),
                            (xy_loss_type, wh_loss_type, confidence_loss_type, classes_loss_type)):
            subs.append(MPSCNNLossDescriptor(loss_type_value(_D, name, lt), red))
        self._xy_loss_descriptor, self._wh_loss_descriptor, self._confidence_loss_descriptor, self._classes_loss_descriptor = subs
        self._reduction_type = red
        self._reduce_across_batch = False
        self._rescore = True
        for k, v in _SCALES.items():
            setattr(self, "_" + k, v)
        self._number_of_anchor_boxes = _count(_D, number_of_anchor_boxes)
        self._anchors = anchor_values(_D, anchor_boxes, self._number_of_anchor_boxes)

    @classmethod
    def cnn_loss_descriptor_with_xy_loss_type(cls, xy_loss_type: MPSCNNLossType, wh_loss_type: MPSCNNLossType,
                                              confidence_loss_type: MPSCNNLossType, classes_loss_type: MPSCNNLossType,
                                              reduction_type: MPSCNNReductionType, anchor_boxes: Any,
                                              number_of_anchor_boxes: int) -> "MPSCNNYOLOLossDescriptor":
        """``cnnLossDescriptor(withXYLossType:whLossType:confidenceLossType:classesLossType:reductionType:anchorBoxes:numberOfAnchorBoxes:)``."""
        return cls(xy_loss_type, wh_loss_type, confidence_loss_type, classes_loss_type, reduction_type, anchor_boxes, number_of_anchor_boxes)

    cnn_loss_descriptor = cnn_loss_descriptor_with_xy_loss_type

    def _sub(name: str) -> property:  # type: ignore[misc]
        attr = "_" + name

        def get(self: "MPSCNNYOLOLossDescriptor") -> MPSCNNLossDescriptor:
            return getattr(self, attr)  # type: ignore[no-any-return]

        def set_(self: "MPSCNNYOLOLossDescriptor", value: MPSCNNLossDescriptor) -> None:
            if not isinstance(value, MPSCNNLossDescriptor):
                raise MPSTypeError(f"{_D}: `{name}` must be an MPSCNNLossDescriptor, but got {type(value).__name__}")
            setattr(self, attr, value)
        return property(get, set_)

    def _real(name: str) -> property:  # type: ignore[misc]
        attr = "_" + name

        def get(self: "MPSCNNYOLOLossDescriptor") -> float:
            return getattr(self, attr)  # type: ignore[no-any-return]

        def set_(self: "MPSCNNYOLOLossDescriptor", value: float) -> None:
            setattr(self, attr, real_value(_D, name, value))
        return property(get, set_)

    def _flag(name: str) -> property:  # type: ignore[misc]
        attr = "_" + name

        def get(self: "MPSCNNYOLOLossDescriptor") -> bool:
            return getattr(self, attr)  # type: ignore[no-any-return]

        def set_(self: "MPSCNNYOLOLossDescriptor", value: bool) -> None:
            if not isinstance(value, (bool, np.bool_)):
                raise value_error(_D, name, value, "be a bool")
            setattr(self, attr, bool(value))
        return property(get, set_)

    xy_loss_descriptor = _sub("xy_loss_descriptor")
    wh_loss_descriptor = _sub("wh_loss_descriptor")
    confidence_loss_descriptor = _sub("confidence_loss_descriptor")
    classes_loss_descriptor = _sub("classes_loss_descriptor")
    scale_xy = _real("scale_xy")
    scale_wh = _real("scale_wh")
    scale_no_object = _real("scale_no_object")
    scale_object = _real("scale_object")
    scale_class = _real("scale_class")
    min_iou_for_object_presence = _real("min_iou_for_object_presence")
    max_iou_for_object_absence = _real("max_iou_for_object_absence")
    rescore = _flag("rescore")
    reduce_across_batch = _flag("reduce_across_batch")
    del _sub, _real, _flag

    @property
    def reduction_type(self) -> MPSCNNReductionType:
        return self._reduction_type

    @reduction_type.setter
    def reduction_type(self, value: MPSCNNReductionType) -> None:
        self._reduction_type = reduction_type_value(_D, "reduction_type", value)

    @property
    def number_of_anchor_boxes(self) -> int:
        return self._number_of_anchor_boxes

    @number_of_anchor_boxes.setter
    def number_of_anchor_boxes(self, value: int) -> None:
        self._number_of_anchor_boxes = _count(_D, value)

    @property
    def anchor_boxes(self) -> bytes:
        """The anchors as float32 ``(width, height)`` pairs (bytes, like Apple's NSData)."""
        return self._anchors.astype(np.float32).tobytes()

    @anchor_boxes.setter
    def anchor_boxes(self, value: Any) -> None:
        self._anchors = anchor_values(_D, value, self._number_of_anchor_boxes)

    def copy(self) -> "MPSCNNYOLOLossDescriptor":
        """``copyWithZone:``: deep copy (sub-descriptors and anchors copied)."""
        new = MPSCNNYOLOLossDescriptor.__new__(MPSCNNYOLOLossDescriptor)
        new.__dict__.update(self.__dict__)
        for s in _SUBS:
            setattr(new, "_" + s, getattr(self, "_" + s).copy())
        new._anchors = self._anchors.copy()
        return new

    def __repr__(self) -> str:
        subs = ", ".join(f"{s}={getattr(self, s).loss_type.name}" for s in _SUBS)
        return (f"MPSCNNYOLOLossDescriptor({subs}, reduction_type={self._reduction_type.name}, "
                f"number_of_anchor_boxes={self._number_of_anchor_boxes}, anchor_boxes={self._anchors.tolist()})")


def _part(d: MPSCNNLossDescriptor) -> B.YOLOPart:
    return B.YOLOPart(int(d.loss_type), d.weight, d.label_smoothing, d.number_of_classes, d.epsilon, d.delta)


class MPSCNNYOLOLoss(_LabelledLossKernel):
    """``MPSCNNYOLOLoss``: the YOLO (v2) detection loss and its gradient in one pass (spec
    §14); an :class:`~mpsnn.MPSCNNKernel` with :class:`~mpsnn.MPSCNNLoss`'s interface.

    Args:
        device: the device (positional, first).
        loss_descriptor: an :class:`MPSCNNYOLOLossDescriptor`; its values are copied.

    Read-only properties: ``loss_xy``, ``loss_wh``, ``loss_confidence``, ``loss_classes``
    (:class:`~mpsnn.MPSCNNLoss` kernels built from the sub-descriptors), ``scale_xy``,
    ``scale_wh``, ``scale_no_object``, ``scale_object``, ``scale_class``,
    ``min_iou_for_object_presence``, ``max_iou_for_object_absence``, ``reduction_type``,
    ``number_of_anchor_boxes``, ``anchor_boxes`` (bytes), ``reduce_across_batch``; plus
    ``rescore`` (Apple stores it without a property; exposed read-only as a Python
    convenience) and those of :class:`~mpsnn.MPSCNNKernel`.

    Init rules (:class:`~mpsnn.MPSValueError`): every sub-descriptor's ``reduction_type``
    equals the descriptor's (**[bin]** "all losses in YOLOLoss must have the same
    reductionType"); no sub-descriptor of type cosineDistance (its ``1 - sum`` per image has
    no per-slot meaning; inferred); anchor data of exactly ``number_of_anchor_boxes`` pairs.

    Encode forms (as MPSCNNLoss): ``encode(cb, source_image, labels, destination_image)``,
    ``encode(cb, source_image, labels) -> MPSImage`` (gradient allocated: source size,
    channels used, source format), ``encode_batch(cb, source_images, labels[,
    destination_images])``. Gradient into the destination, loss into ``labels.loss_image()``
    (``{1,1,1}`` for a reduction, the source's size for ``none``). Encode rule: the channels
    used must be a multiple of ``A`` with at least 5 per anchor (:class:`~mpsnn.MPSValueError`).
    Coordinates (offset, clip rect, channel offsets, edge mode) as MPSCNNLoss: labels and
    weights are indexed in source coordinates. Math and every ``(inferred)`` choice: module
    docstring. float32 arithmetic for every storage format; no host synchronisation.
    """

    def __init__(self, device: Device | str, loss_descriptor: MPSCNNYOLOLossDescriptor) -> None:
        super().__init__(device)
        owner = type(self).__name__
        d = loss_descriptor
        if not isinstance(d, MPSCNNYOLOLossDescriptor):
            raise MPSTypeError(f"{owner}: `loss_descriptor` must be an MPSCNNYOLOLossDescriptor, but got {type(d).__name__}")
        for s in _SUBS:
            sub = getattr(d, s)
            if sub.reduction_type != d.reduction_type:
                raise value_error(owner, f"loss_descriptor.{s}.reduction_type", sub.reduction_type.name,
                                  f"equal loss_descriptor.reduction_type={d.reduction_type.name} (all losses in YOLOLoss must have the same reductionType)")
            if sub.loss_type == MPSCNNLossType.cosineDistance:
                raise value_error(owner, f"loss_descriptor.{s}.loss_type", "cosineDistance", "be a per-element loss type (cosineDistance reduces a whole image)")
        anchors = anchor_values(owner, d.anchor_boxes, d.number_of_anchor_boxes)
        self._losses = [MPSCNNLoss(self.device, loss_descriptor=getattr(d, s).copy()) for s in _SUBS]
        self._scale_xy: float = d.scale_xy
        self._scale_wh: float = d.scale_wh
        self._scale_no_object: float = d.scale_no_object
        self._scale_object: float = d.scale_object
        self._scale_class: float = d.scale_class
        self._min_iou_for_object_presence: float = d.min_iou_for_object_presence
        self._max_iou_for_object_absence: float = d.max_iou_for_object_absence
        self._rescore: bool = d.rescore
        self._reduce_across_batch: bool = d.reduce_across_batch
        self._reduction_type: MPSCNNReductionType = d.reduction_type
        self._number_of_anchor_boxes: int = d.number_of_anchor_boxes
        self._anchors_np = anchors
        self._anchors = torch.from_numpy(anchors.copy()).to(self.device.torch_device)
        self._parts = [_part(getattr(d, s)) for s in _SUBS]
        self._params = B.YOLOLossParameters(self._parts[0], self._parts[1], self._parts[2], self._parts[3], self._scale_xy, self._scale_wh,
                                            self._scale_no_object, self._scale_object, self._scale_class,
                                            self._min_iou_for_object_presence, self._max_iou_for_object_absence, self._rescore)
        self._pending: list[tuple[MPSCNNLossLabels, torch.Tensor, torch.Tensor, list[int]]] = []

    loss_xy = property(lambda self: self._losses[0])
    loss_wh = property(lambda self: self._losses[1])
    loss_confidence = property(lambda self: self._losses[2])
    loss_classes = property(lambda self: self._losses[3])
    scale_xy = property(lambda self: self._scale_xy)
    scale_wh = property(lambda self: self._scale_wh)
    scale_no_object = property(lambda self: self._scale_no_object)
    scale_object = property(lambda self: self._scale_object)
    scale_class = property(lambda self: self._scale_class)
    min_iou_for_object_presence = property(lambda self: self._min_iou_for_object_presence)
    max_iou_for_object_absence = property(lambda self: self._max_iou_for_object_absence)
    reduction_type = property(lambda self: self._reduction_type)
    number_of_anchor_boxes = property(lambda self: self._number_of_anchor_boxes)
    anchor_boxes = property(lambda self: self._anchors_np.tobytes())
    reduce_across_batch = property(lambda self: self._reduce_across_batch)
    rescore = property(lambda self: self._rescore)

    def _moved_to_device(self) -> None:
        super()._moved_to_device()
        self._anchors = self._anchors.to(self.device.torch_device)
        self._losses = [k.copy(self.device) for k in self._losses]  # type: ignore[misc]

    def _check_source(self, name: str, src: MPSImage) -> None:
        n, a = self.source_channels_used(src), self._number_of_anchor_boxes
        if n % a or n // a < 5:
            raise value_error(self._name(), f"{name}.feature_channels", f"{n} channels used",
                              f"be a multiple of number_of_anchor_boxes={a} with at least 5 per anchor (X, Y, W, H, C, classes...)")

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        r = self._read_labelled(src, inp, region, state)
        grad, per, sums, counts = B.yolo_loss(r.y, r.t, r.wt, self._anchors, self._params)
        write_result(dest, region, grad)
        if r.loss_view is not None:
            r.loss_view.copy_(per)
        else:
            a, k = self._number_of_anchor_boxes, r.n // self._number_of_anchor_boxes - 5
            cells = r.w * r.h * a
            elements = [cells * (1 if p.loss_type == LB.SOFTMAX_CE else c) for p, c in zip(self._parts, (2, 2, 1, k))]
            self._pending.append((r.labels, sums[:, 0], counts[:, 0], elements))

    def _finish(self, labels: list[MPSCNNLossLabels]) -> None:
        """Reduce each part (spec §9 per part) and add the four (module docstring)."""
        if not self._pending:
            return
        red = int(self._reduction_type)

        def total(s: torch.Tensor, c: torch.Tensor, e: list[int]) -> torch.Tensor:
            parts = [LB.finish_reduction(red, self._parts[i].loss_type, s[i], c[i], max(e[i], 1), 1.0) for i in range(4)]
            return torch.stack(parts).sum()

        if self._reduce_across_batch:
            s = torch.stack([p[1] for p in self._pending]).sum(dim=0)
            c = torch.stack([p[2] for p in self._pending]).sum(dim=0)
            e = [sum(p[3][i] for p in self._pending) for i in range(4)]
            self._write_batch_total(labels, total(s, c, e))
            return
        for lab, s, c, e in self._pending:
            lab.loss_image().tensor.copy_(total(s, c, e).reshape(1, 1, 1, 1))

