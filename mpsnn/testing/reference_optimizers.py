"""Float64 NumPy references of the optimizers (spec/optimizers.md §5-8), written from the
spec's formulas, one parameter array at a time; nothing shared with ``mpsnn.backends``.

Each ``*_step`` returns the new value and the new optimizer-state arrays (inputs untouched).
``pre`` is a plain dict: ``clip`` (bool), ``clip_min``, ``clip_max``, ``rescale``,
``regularization`` ("none" | "L1" | "L2"), ``regularization_scale``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["adam_step", "preprocess", "rmsprop_step", "sgd_step", "pre_of"]


def pre_of(optimizer: Any) -> dict[str, Any]:
    """The pre-processing settings of an mpsnn optimizer, as this module's dict."""
    return {"clip": optimizer.apply_gradient_clipping, "clip_min": optimizer.gradient_clip_min, "clip_max": optimizer.gradient_clip_max,
            "rescale": optimizer.gradient_rescale, "regularization": optimizer.regularization_type.name,
            "regularization_scale": optimizer.regularization_scale}


def preprocess(g: np.ndarray, v: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """g1 = clamp(g) if clipping; g2 = rescale*g1; g3 = g2 + scale*sign(v) (L1) or + scale*v (L2)."""
    g = np.asarray(g, np.float64)
    v = np.asarray(v, np.float64)
    out = np.empty_like(g)
    flat_g, flat_v, flat_o = g.reshape(-1), v.reshape(-1), out.reshape(-1)
    for i in range(flat_g.size):
        x = flat_g[i]
        if pre.get("clip"):
            x = min(max(x, pre["clip_min"]), pre["clip_max"])
        x = x * pre.get("rescale", 1.0)
        reg = pre.get("regularization", "none")
        if reg == "L1":
            s = 1.0 if flat_v[i] > 0 else (-1.0 if flat_v[i] < 0 else 0.0)
            x = x + pre["regularization_scale"] * s
        elif reg == "L2":
            x = x + pre["regularization_scale"] * flat_v[i]
        flat_o[i] = x
    return out


def sgd_step(v: np.ndarray, g: np.ndarray, m: np.ndarray | None, *, lr: float, momentum: float, nesterov: bool,
             pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    v = np.asarray(v, np.float64)
    g3 = preprocess(g, v, pre)
    if m is None:
        return v - lr * g3, None
    m = np.asarray(m, np.float64)
    if nesterov:
        m_new = momentum * m + g3
        return v - lr * (g3 + momentum * m_new), m_new
    m_new = momentum * m + lr * g3
    return v - m_new, m_new


def rmsprop_step(v: np.ndarray, g: np.ndarray, s: np.ndarray, *, lr: float, decay: float, eps: float,
                 pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(v, np.float64)
    g3 = preprocess(g, v, pre)
    s_new = decay * np.asarray(s, np.float64) + (1.0 - decay) * g3 * g3
    return v - lr * g3 / (np.sqrt(s_new) + eps), s_new


def adam_step(v: np.ndarray, g: np.ndarray, m: np.ndarray, vel: np.ndarray, vmax: np.ndarray | None, *, t: int, lr: float,
              beta1: float, beta2: float, eps: float, pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One Adam/AMSGrad step with step number ``t`` (the first update has t = 1)."""
    v = np.asarray(v, np.float64)
    g3 = preprocess(g, v, pre)
    lr_t = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    m_new = beta1 * np.asarray(m, np.float64) + (1.0 - beta1) * g3
    vel_new = beta2 * np.asarray(vel, np.float64) + (1.0 - beta2) * g3 ** 2
    if vmax is None:
        return v - lr_t * m_new / (np.sqrt(vel_new) + eps), m_new, vel_new, None
    x_new = np.maximum(np.asarray(vmax, np.float64), vel_new)
    return v - lr_t * m_new / (np.sqrt(x_new) + eps), m_new, vel_new, x_new
