"""Float64 NumPy reference of the YOLO loss (spec/loss.md §13-14 with the choices documented
in :mod:`mpsnn.kernels.yolo_loss`), written separately from :mod:`mpsnn.backends.yolo_loss`:
explicit loops over images, cells and anchors, scalar box arithmetic, and the per-type
formulas of :mod:`mpsnn.testing.reference_loss` (itself independent of the backend).

``params`` is a plain dict: ``parts`` -> four dicts (``loss_type``, ``weight``,
``label_smoothing``, ``number_of_classes``, ``epsilon``, ``delta``) in the order xy, wh,
confidence, classes; ``scale_xy``, ``scale_wh``, ``scale_no_object``, ``scale_object``,
``scale_class``, ``min_iou``, ``max_iou``, ``rescore``, ``reduction`` (int),
``reduce_across_batch``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import reference_loss as RL

__all__ = ["batch_reference", "yolo_loss"]

SOFTMAX_CE = 2


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _iou(b1: tuple[float, float, float, float], b2: tuple[float, float, float, float]) -> float:
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    w1, h1, w2, h2 = max(w1, 0.0), max(h1, 0.0), max(w2, 0.0), max(h2, 0.0)
    ix = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    iy = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    inter = ix * iy
    union = w1 * h1 + w2 * h2 - inter
    return inter / union if union > 0 else 0.0


def _anchor_iou(aw: float, ah: float, lw: float, lh: float) -> float:
    lw, lh = max(lw, 0.0), max(lh, 0.0)
    inter = min(aw, lw) * min(ah, lh)
    union = aw * ah + lw * lh - inter
    return inter / union if union > 0 else 0.0


def _apply(part: dict[str, Any], y: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ts = RL.smooth_labels(part["loss_type"], t, part["label_smoothing"], part["number_of_classes"])
    return (RL.loss_elementwise(part["loss_type"], y, ts, part["epsilon"], part["delta"]),
            RL.loss_gradient(part["loss_type"], y, ts, part["epsilon"], part["delta"]))


def yolo_loss(y: Any, t: Any, w: Any, anchors: Any, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(gradient, per_element, sums[4, N], counts[4, N])`` for ``y``, ``t``, ``w``
    (``w`` may be None) of shape ``[N, H, W, A (5 + K)]``; ``anchors`` ``[A, 2]``."""
    y, t = np.asarray(y, np.float64), np.asarray(t, np.float64)
    wt = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    anchors = np.asarray(anchors, np.float64).reshape(-1, 2)
    nimg, hh, ww, c = y.shape
    na = anchors.shape[0]
    per_anchor = c // na
    grad, per = np.zeros_like(y), np.zeros_like(y)
    sums, counts = np.zeros((4, nimg)), np.zeros((4, nimg))
    xy, wh, cf, cl = params["parts"]
    for n in range(nimg):
        for i in range(hh):
            for j in range(ww):
                sl = [slice(a * per_anchor, (a + 1) * per_anchor) for a in range(na)]
                ys = [y[n, i, j, s] for s in sl]
                ts = [t[n, i, j, s] for s in sl]
                ws = [wt[n, i, j, s] for s in sl]
                labelled = [ts[a][4] == 1.0 for a in range(na)]
                ia = [_anchor_iou(anchors[a, 0], anchors[a, 1], ts[a][2], ts[a][3]) for a in range(na)]
                best = max([ia[a] for a in range(na) if labelled[a]], default=-1.0)
                gt = [(ts[a][0], ts[a][1], ts[a][2], ts[a][3]) for a in range(na) if labelled[a]]
                for a in range(na):
                    o = a * per_anchor
                    obj = labelled[a] and (ia[a] >= best or ia[a] > params["min_iou"])
                    pred = (_sig(ys[a][0]), _sig(ys[a][1]), anchors[a, 0] * math.exp(ys[a][2]), anchors[a, 1] * math.exp(ys[a][3]))
                    best_pred = max([_iou(pred, g) for g in gt], default=0.0)
                    noobj = (not obj) and best_pred <= params["max_iou"]
                    # xy
                    s = np.array([pred[0], pred[1]])
                    lv, g = _apply(xy, s, ts[a][0:2])
                    e = params["scale_xy"] * float(obj) * xy["weight"] * ws[a][0:2]
                    for q in range(2):
                        if e[q] != 0:
                            per[n, i, j, o + q] = e[q] * lv[q]
                            grad[n, i, j, o + q] = e[q] * g[q] * s[q] * (1 - s[q])
                            sums[0, n] += e[q] * lv[q]
                            counts[0, n] += 1
                    # wh
                    if obj:
                        tw = np.array([math.log(ts[a][2] / anchors[a, 0]), math.log(ts[a][3] / anchors[a, 1])])
                        lv, g = _apply(wh, ys[a][2:4], tw)
                        e = params["scale_wh"] * wh["weight"] * ws[a][2:4]
                        for q in range(2):
                            if e[q] != 0:
                                per[n, i, j, o + 2 + q] = e[q] * lv[q]
                                grad[n, i, j, o + 2 + q] = e[q] * g[q]
                                sums[1, n] += e[q] * lv[q]
                                counts[1, n] += 1
                    # confidence
                    if obj:
                        target = ts[a][4] * _iou(pred, (ts[a][0], ts[a][1], ts[a][2], ts[a][3])) if params["rescore"] else ts[a][4]
                        scale = params["scale_object"]
                    else:
                        target, scale = 0.0, params["scale_no_object"] if noobj else 0.0
                    e1 = scale * cf["weight"] * ws[a][4]
                    if e1 != 0:
                        lv, g = _apply(cf, ys[a][4:5], np.array([target]))
                        per[n, i, j, o + 4] = e1 * lv[0]
                        grad[n, i, j, o + 4] = e1 * g[0]
                        sums[2, n] += e1 * lv[0]
                        counts[2, n] += 1
                    # classes
                    if obj and per_anchor > 5:
                        lv, g = _apply(cl, ys[a][5:], ts[a][5:])
                        e = params["scale_class"] * cl["weight"] * ws[a][5:]
                        for q in range(per_anchor - 5):
                            if e[q] != 0:
                                per[n, i, j, o + 5 + q] = e[q] * lv[q]
                                grad[n, i, j, o + 5 + q] = e[q] * g[q]
                                sums[3, n] += e[q] * lv[q]
                                counts[3, n] += 1
    return grad, per, sums, counts


def batch_reference(ys: Sequence[np.ndarray], ts: Sequence[np.ndarray], ws: Sequence[Any], anchors: Any,
                    params: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per entry ``[H, W, C]`` arrays -> (gradients ``[H, W, C]``, loss values): the
    reduced scalar per entry (reduceAcrossBatch: the total at entry 0, 0 elsewhere) or the
    per-element ``[H, W, C]`` losses for reduction none."""
    red = params["reduction"]
    grads, pers, sums, counts, elements = [], [], [], [], []
    na = np.asarray(anchors).reshape(-1, 2).shape[0]
    for y, t, w in zip(ys, ts, ws):
        g, p, s, c = yolo_loss(y[None], t[None], None if w is None else w[None], anchors, params)
        grads.append(g[0])
        pers.append(p[0])
        sums.append(s[:, 0])
        counts.append(c[:, 0])
        hh, ww, ch = y.shape
        k = ch // na - 5
        elements.append([hh * ww * na * (1 if part["loss_type"] == SOFTMAX_CE else cp) for part, cp in zip(params["parts"], (2, 2, 1, k))])
    if red == 0:
        return grads, pers

    def reduce(s: np.ndarray, c: np.ndarray, e: list[int]) -> float:
        out = 0.0
        for q in range(4):
            if red == 1:
                out += s[q]
            elif red == 2:
                out += s[q] / max(e[q], 1)
            else:
                out += s[q] / c[q] if c[q] > 0 else 0.0
        return out

    if params["reduce_across_batch"]:
        tot = reduce(np.sum(sums, axis=0), np.sum(counts, axis=0), list(np.sum(elements, axis=0)))
        return grads, [np.array(tot)] + [np.array(0.0) for _ in ys[1:]]
    return grads, [np.array(reduce(s, c, e)) for s, c, e in zip(sums, counts, elements)]
