"""YOLO loss numerics on NHWC tensors (torch, CPU and CUDA): spec/loss.md §13-14, the math
documented in :mod:`mpsnn.kernels.yolo_loss` (every ``(inferred)`` choice is listed there).

One pure function, :func:`yolo_loss`, computes for a block of cells the gradient image, the
per-element scaled losses, and per part (xy, wh, confidence, classes) the per-image weighted
sums and non-zero-weight counts that the reduction needs. The per-type loss math is the
plain loss family's (:mod:`mpsnn.backends.loss`). Arithmetic in float32 (float64 in gives
float64); no host synchronisation, no branching on tensor values.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import loss as L

__all__ = ["YOLOLossParameters", "YOLOPart", "anchor_iou", "box_iou", "object_masks", "yolo_loss"]

#: the parts, in the order of every per-part result
PARTS = ("xy", "wh", "confidence", "classes")


class YOLOPart(NamedTuple):
    """The fields of one sub-descriptor the math uses (loss type as an int)."""

    loss_type: int
    weight: float
    label_smoothing: float
    number_of_classes: int
    epsilon: float
    delta: float


class YOLOLossParameters(NamedTuple):
    """Everything but the tensors: four parts, scales, thresholds, rescore."""

    xy: YOLOPart
    wh: YOLOPart
    confidence: YOLOPart
    classes: YOLOPart
    scale_xy: float
    scale_wh: float
    scale_no_object: float
    scale_object: float
    scale_class: float
    min_iou_for_object_presence: float
    max_iou_for_object_absence: float
    rescore: bool


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _ratio(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(inter))


def box_iou(cx1: torch.Tensor, cy1: torch.Tensor, w1: torch.Tensor, h1: torch.Tensor,
            cx2: torch.Tensor, cy2: torch.Tensor, w2: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """IOU of centred boxes (broadcasting); 0 where the union is not positive. Negative
    sizes count as 0."""
    w1, h1, w2, h2 = w1.clamp_min(0), h1.clamp_min(0), w2.clamp_min(0), h2.clamp_min(0)
    ix = (torch.minimum(cx1 + w1 / 2, cx2 + w2 / 2) - torch.maximum(cx1 - w1 / 2, cx2 - w2 / 2)).clamp_min(0)
    iy = (torch.minimum(cy1 + h1 / 2, cy2 + h2 / 2) - torch.maximum(cy1 - h1 / 2, cy2 - h2 / 2)).clamp_min(0)
    inter = ix * iy
    return _ratio(inter, w1 * h1 + w2 * h2 - inter)


def anchor_iou(aw: torch.Tensor, ah: torch.Tensor, lw: torch.Tensor, lh: torch.Tensor) -> torch.Tensor:
    """spec §14 [bin]: ``min(aw,lw) min(ah,lh) / (aw ah + lw lh - min(aw,lw) min(ah,lh))``."""
    lw, lh = lw.clamp_min(0), lh.clamp_min(0)
    inter = torch.minimum(aw, lw) * torch.minimum(ah, lh)
    return _ratio(inter, aw * ah + lw * lh - inter)


def object_masks(y: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor, p: YOLOLossParameters) -> tuple[torch.Tensor, ...]:
    """For ``y``, ``t`` of shape ``[N, H, W, A, 5 + K]`` and ``anchors`` ``[A, 2]``: the
    boolean masks ``obj`` and ``noobj`` (``[N, H, W, A]``) and the IOU of each slot's
    predicted box with its own ground truth (``[N, H, W, A]``)."""
    aw, ah = anchors[:, 0], anchors[:, 1]
    labelled = t[..., 4] == 1.0
    ia = anchor_iou(aw, ah, t[..., 2], t[..., 3])
    best = torch.where(labelled, ia, torch.full_like(ia, -1.0)).amax(dim=-1, keepdim=True)
    obj = labelled & ((ia >= best) | (ia > p.min_iou_for_object_presence))
    px, py = torch.sigmoid(y[..., 0]), torch.sigmoid(y[..., 1])
    pw, ph = aw * torch.exp(y[..., 2]), ah * torch.exp(y[..., 3])
    own = box_iou(px, py, pw, ph, t[..., 0], t[..., 1], t[..., 2], t[..., 3])
    # each slot's predicted box against every labelled slot's box of the same cell: [N,H,W,A,A']
    cross = box_iou(px[..., :, None], py[..., :, None], pw[..., :, None], ph[..., :, None],
                    t[..., None, :, 0], t[..., None, :, 1], t[..., None, :, 2], t[..., None, :, 3])
    cross = torch.where(labelled[..., None, :], cross, torch.zeros_like(cross))
    noobj = ~obj & (cross.amax(dim=-1) <= p.max_iou_for_object_absence)
    return obj, noobj, own


def _part(part: YOLOPart, y: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w l, w dl/dy) of one part; ``w`` is the full effective weight (scale x mask x weights)."""
    ts = L.smooth_labels(part.loss_type, t, part.label_smoothing, part.number_of_classes)
    lv = L.loss_elementwise(part.loss_type, y, ts, part.epsilon, part.delta)
    g = L.loss_gradient(part.loss_type, y, ts, part.epsilon, part.delta)
    # masked elements may hold non-finite values (e.g. log of an unused label): zero them exactly
    return torch.where(w != 0, lv * w, torch.zeros_like(lv)), torch.where(w != 0, g * w, torch.zeros_like(g))


def yolo_loss(y: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None, anchors: torch.Tensor,
              p: YOLOLossParameters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The YOLO loss of ``y`` (raw predictions, ``[N, H, W, A (5 + K)]``) against labels ``t``
    (same shape) with optional per-element ``weights`` (same shape) and ``anchors``
    (``[A, 2]`` float (width, height)).

    Returns ``(gradient, per_element, sums, counts)``: ``gradient`` and ``per_element``
    (the scaled weighted losses ``v_e``) of ``y``'s shape; ``sums`` and ``counts`` of shape
    ``[4, N]`` (parts in :data:`PARTS` order): per image the sum of ``v_e`` and the number
    of non-zero effective weights of that part.
    """
    y, t = _c(y), _c(t)
    n, h, w, c = y.shape
    a = anchors.shape[0]
    y5, t5 = y.reshape(n, h, w, a, c // a), t.reshape(n, h, w, a, c // a)
    wt = None if weights is None else _c(weights).reshape(n, h, w, a, c // a)
    anchors = anchors.to(y.dtype)
    obj, noobj, own = object_masks(y5, t5, anchors, p)
    objf = obj.to(y.dtype)[..., None]

    def eff(part: YOLOPart, mask_scale: torch.Tensor, sl: slice) -> torch.Tensor:
        base = mask_scale * part.weight
        return base if wt is None else base * wt[..., sl]

    # xy: loss on sigmoid(x, y); the chain rule through the sigmoid
    sxy = torch.sigmoid(y5[..., 0:2])
    wxy = eff(p.xy, objf * p.scale_xy, slice(0, 2)).expand_as(sxy)
    vxy, gxy = _part(p.xy, sxy, t5[..., 0:2], wxy)
    gxy = gxy * sxy * (1 - sxy)
    # wh: raw w, h against log(label / anchor) (responsible slots only)
    tw = torch.where(objf > 0, torch.log(t5[..., 2:4].clamp_min(torch.finfo(y.dtype).tiny) / anchors), torch.zeros_like(t5[..., 2:4]))
    wwh = eff(p.wh, objf * p.scale_wh, slice(2, 4)).expand_as(tw)
    vwh, gwh = _part(p.wh, y5[..., 2:4], tw, wwh)
    # confidence: target label C (times the IOU with rescore; a constant), scaleObject / scaleNoObject
    target = t5[..., 4:5] * own[..., None] if p.rescore else t5[..., 4:5]
    target = torch.where(objf > 0, target, torch.zeros_like(target))
    sconf = objf * p.scale_object + noobj.to(y.dtype)[..., None] * p.scale_no_object
    wc = eff(p.confidence, sconf, slice(4, 5)).expand_as(target)
    vc, gc = _part(p.confidence, y5[..., 4:5], target, wc)
    # classes: responsible slots only
    k = c // a - 5
    wk = eff(p.classes, objf * p.scale_class, slice(5, 5 + k)).expand(n, h, w, a, k)
    vk, gk = _part(p.classes, y5[..., 5:], t5[..., 5:], wk)
    grad = torch.cat([gxy, gwh, gc, gk], dim=-1).reshape(n, h, w, c)
    per = torch.cat([vxy, vwh, vc, vk], dim=-1).reshape(n, h, w, c)
    sums = torch.stack([v.reshape(n, -1).sum(dim=1) for v in (vxy, vwh, vc, vk)])
    counts = torch.stack([(e != 0).reshape(n, -1).sum(dim=1).to(y.dtype) for e in (wxy, wwh, wc, wk)])
    return grad, per, sums, counts
