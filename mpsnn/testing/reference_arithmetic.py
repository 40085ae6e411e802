"""Float64 NumPy references for the arithmetic kernels (spec/arithmetic.md), independent of
``mpsnn.backends``: element by element, with Python loops over the destination positions.

* :func:`arithmetic_forward` — the element-wise formula of §2 (and the comparison of §3).
* :func:`arithmetic_kernel_reference` — what an ``MPSCNNArithmetic`` encode writes, with the
  broadcast read positions ``πP(q)``, ``πS(q)`` of §1, edge modes, clip rect, channel windows,
  batch addressing; also returns the clamp mask of §4.
* :func:`arithmetic_gradient_reference` — what an arithmetic gradient kernel writes (§5.1-5.2):
  for every forward position ``q`` with ``m(q) = 1`` the target element ``πT(q)`` (after the
  target's edge rule: dropped off the image for zero, the nearest edge pixel for clamp)
  receives ``(gps*g(q)) [* gss*Z(q)]``; ``bias`` is added to every result element afterwards.

Parameters are float32 in the API: they are rounded to float32 first, then the arithmetic is
float64. ``FLT_MAX`` is the float32 maximum.

Test-case helpers (:func:`dyadic`, :data:`DYADIC_PARAMS`, :func:`configure_kernel`) sit at
the end: dyadic inputs and parameters keep every sum and product exact in float32, so a
forward result never lands on a clamp bound by rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["COMPARISON_TYPES", "DYADIC_PARAMS", "FLT_MAX", "Operand", "arithmetic_forward", "arithmetic_gradient_reference",
           "arithmetic_kernel_reference", "configure_kernel", "dyadic", "output_channels"]

FLT_MAX = float(np.finfo(np.float32).max)
COMPARISON_TYPES = {"equal": 0, "notEqual": 1, "less": 2, "lessOrEqual": 3, "greater": 4, "greaterOrEqual": 5}
_NO_CLIP = 1 << 62


def _f32(v: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(v))


@dataclass(frozen=True)
class Operand:
    """How one input is read: offset ``(x, y, z)``, strides ``(x, y, channels)`` in {0, 1},
    edge mode ``"zero"``/``"clamp"``, channel window offset and max count (None: unlimited)."""

    offset: tuple[int, int, int] = (0, 0, 0)
    stride: tuple[int, int, int] = (1, 1, 1)
    edge: str = "zero"
    c_off: int = 0
    c_max: int | None = None

    def channels_used(self, image: np.ndarray) -> int:
        avail = image.shape[3] - self.c_off
        return avail if self.c_max is None else min(self.c_max, avail)


def arithmetic_forward(x: Any, y: Any, operation: str, primary_scale: float = 1.0, secondary_scale: float = 1.0,
                       bias: float = 0.0, minimum_value: float = -FLT_MAX, maximum_value: float = FLT_MAX,
                       comparison_type: int = 0, threshold: float = 0.0, clamp: bool = True) -> np.ndarray:
    """The element-wise result in float64 (``clamp=False``: the unclamped ``r``)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(all="ignore"):
        if operation == "compare":
            t, th = int(comparison_type), _f32(threshold)
            res = {0: lambda: np.abs(x - y) <= th, 1: lambda: np.abs(x - y) > th, 2: lambda: x < y,
                   3: lambda: x <= y, 4: lambda: x > y, 5: lambda: x >= y}[t]()
            return np.where(res, 1.0, 0.0)
        a, b = _f32(primary_scale) * x, _f32(secondary_scale) * y
        r = {"add": lambda: a + b, "subtract": lambda: a - b, "multiply": lambda: a * b, "divide": lambda: a / b}[operation]()
        r = r + _f32(bias)
        if not clamp:
            return r
        # min(max(r, lo), hi) with NaN propagating
        return np.where(np.isnan(r), r, np.minimum(np.maximum(r, _f32(minimum_value)), _f32(maximum_value)))


def output_channels(P: np.ndarray, S: np.ndarray, p: Operand, s: Operand) -> int:
    """Channels written: those of the input with channel stride 1 (equal when both are)."""
    np_, ns = p.channels_used(P), s.channels_used(S)
    if p.stride[2] and s.stride[2]:
        if np_ != ns:
            raise ValueError(f"channel counts differ: {np_} vs {ns}")
        return np_
    return np_ if p.stride[2] else (ns if s.stride[2] else 1)


def _region(clip_rect: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if clip_rect is None:
        return (0, 0, 0), (_NO_CLIP, _NO_CLIP, _NO_CLIP)
    if hasattr(clip_rect, "origin"):
        o, sz = clip_rect.origin, clip_rect.size
        return (int(o.x), int(o.y), int(o.z)), (int(sz.width), int(sz.height), int(sz.depth))
    (ox, oy, oz), (w, h, d) = clip_rect
    return (int(ox), int(oy), int(oz)), (int(w), int(h), int(d))


def _read(img: np.ndarray, n: int, y: int, x: int, c: int, edge: str) -> tuple[float, tuple[int, int, int, int] | None]:
    """Value at (n, y, x, c) under the edge rule, and the element actually read (None: zero)."""
    _, h, w, _ = img.shape
    if not (0 <= x < w and 0 <= y < h):
        if edge == "zero":
            return 0.0, None
        x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
    return float(img[n, y, x, c]), (n, y, x, c)


def _positions(P: np.ndarray, S: np.ndarray, dest_shape: tuple[int, ...], p: Operand, s: Operand, clip_rect: Any):  # type: ignore[no-untyped-def]
    """Yield ``(m, y, x, k, dest_index, P element, S element, x value, y value)`` for every
    destination element the encode writes."""
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    nd, hd, wd, _ = dest_shape
    n_out = output_channels(P, S, p, s)
    depth = min(rd, nd - rz, P.shape[0] - p.offset[2], S.shape[0] - s.offset[2])
    for m in range(max(0, depth)):
        for y in range(ry, min(ry + rh, hd)):
            for x in range(rx, min(rx + rw, wd)):
                i, j = x - rx, y - ry
                for k in range(n_out):
                    xv, pe = _read(P, p.offset[2] + m, p.offset[1] + j * p.stride[1], p.offset[0] + i * p.stride[0], p.c_off + k * p.stride[2], p.edge)
                    yv, se = _read(S, s.offset[2] + m, s.offset[1] + j * s.stride[1], s.offset[0] + i * s.stride[0], s.c_off + k * s.stride[2], s.edge)
                    yield m, y, x, k, rz + m, pe, se, xv, yv


def arithmetic_kernel_reference(P: Any, S: Any, dest: Any, *, operation: str, params: dict[str, Any] | None = None,
                                primary: Operand = Operand(), secondary: Operand = Operand(), clip_rect: Any = None,
                                dst_c_off: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(new destination contents, clamp mask)`` of one forward encode.

    ``params`` holds the keyword parameters of :func:`arithmetic_forward`. The mask has the
    destination's shape: 1.0 where ``minimum_value < r < maximum_value`` at a written element,
    0.0 elsewhere (also at elements not written)."""
    Pa, Sa = np.asarray(P, np.float64), np.asarray(S, np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    mask = np.zeros_like(out)
    kw = dict(params or {})
    lo, hi = _f32(kw.get("minimum_value", -FLT_MAX)), _f32(kw.get("maximum_value", FLT_MAX))
    for _m, y, x, k, nd, _pe, _se, xv, yv in _positions(Pa, Sa, out.shape, primary, secondary, clip_rect):
        out[nd, y, x, dst_c_off + k] = arithmetic_forward(xv, yv, operation, **kw)
        r = arithmetic_forward(xv, yv, operation, **{**kw, "clamp": False}) if operation != "compare" else 0.0
        mask[nd, y, x, dst_c_off + k] = 1.0 if (operation == "compare" or lo < r < hi) else 0.0
    return out, mask


def arithmetic_gradient_reference(g: Any, P: Any, S: Any, result: Any, *, operation: str, is_secondary: bool,
                                  params: dict[str, Any] | None = None, primary: Operand = Operand(),
                                  secondary: Operand = Operand(), clip_rect: Any = None, dst_c_off: int = 0,
                                  primary_scale: float = 1.0, secondary_scale: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """What an arithmetic gradient kernel writes into ``result`` (the target input's size).

    Args:
        g: incoming gradient, the forward destination's size.
        P, S: the forward inputs.
        result: previous contents of the result image; a float64 copy is returned.
        operation, params, primary, secondary, clip_rect, dst_c_off: the forward encode.
        is_secondary: which input's gradient (False: P, True: S).
        primary_scale, secondary_scale, bias: the *gradient* kernel's parameters.

    Written: every pixel and image of the target, channels ``[c_off, c_off + Cw)`` of the
    target's window (``Cw`` = its channels used, 1 when it was channel-broadcast)."""
    Pa, Sa, ga = (np.asarray(a, np.float64) for a in (P, S, g))
    out = np.array(result, dtype=np.float64, copy=True)
    target, tgt_op = (Sa, secondary) if is_secondary else (Pa, primary)
    cw = tgt_op.channels_used(target) if tgt_op.stride[2] else 1
    acc = np.zeros(target.shape[:3] + (cw,))
    kw = dict(params or {})
    lo, hi = _f32(kw.get("minimum_value", -FLT_MAX)), _f32(kw.get("maximum_value", FLT_MAX))
    gps, gss = _f32(primary_scale), _f32(secondary_scale)
    for _m, y, x, k, nd, pe, se, xv, yv in _positions(Pa, Sa, ga.shape, primary, secondary, clip_rect):
        r = arithmetic_forward(xv, yv, operation, **{**kw, "clamp": False})
        if not lo < r < hi:
            continue
        elem = se if is_secondary else pe
        if elem is None:  # read off the image with edge mode zero: no gradient flows back
            continue
        val = gps * ga[nd, y, x, dst_c_off + k]
        if operation == "multiply":
            val *= gss * (xv if is_secondary else yv)
        n, ty, tx, tc = elem
        acc[n, ty, tx, tc - tgt_op.c_off] += val
    out[..., tgt_op.c_off:tgt_op.c_off + cw] = acc + _f32(bias)
    return out


# -- test-case helpers ------------------------------------------------------------------------------

#: dyadic kernel parameters: with :func:`dyadic` inputs every add/subtract/multiply result is
#: exact in float32 and at least 2^-10 away from both bounds
DYADIC_PARAMS: dict[str, float] = {"primary_scale": 0.5, "secondary_scale": -1.5, "bias": 0.25,
                                   "minimum_value": -1.0 - 2.0 ** -10, "maximum_value": 1.0 + 2.0 ** -10}


def dyadic(seed: int, shape: tuple[int, ...], nonzero: bool = False) -> np.ndarray:
    """Multiples of 1/8 in [-2, 2] (``nonzero``: magnitudes in [0.5, 2]); exact in float16
    and bfloat16."""
    rng = np.random.default_rng(seed)
    if nonzero:
        return rng.integers(4, 17, shape) / 8.0 * rng.choice([-1.0, 1.0], shape)
    return rng.integers(-16, 17, shape) / 8.0


def configure_kernel(kernel: Any, p: Operand, s: Operand, params: dict[str, float] | None = None, clip: Any = None, dst_c_off: int = 0) -> Any:
    """Set a forward arithmetic kernel's properties from two :class:`Operand` records (by
    property name only; returns the kernel)."""
    from ..core.enums import MPSImageEdgeMode
    from ..core.structs import MPSOffset

    for name, value in (params or {}).items():
        setattr(kernel, name, value)
    for which, o in (("primary", p), ("secondary", s)):
        setattr(kernel, f"{which}_offset", MPSOffset(*o.offset))
        setattr(kernel, f"{which}_stride_in_pixels_x", o.stride[0])
        setattr(kernel, f"{which}_stride_in_pixels_y", o.stride[1])
        setattr(kernel, f"{which}_stride_in_feature_channels", o.stride[2])
        setattr(kernel, f"{which}_edge_mode", MPSImageEdgeMode[o.edge])
        setattr(kernel, f"{which}_source_feature_channel_offset", o.c_off)
        if o.c_max is not None:
            setattr(kernel, f"{which}_source_feature_channel_max_count", o.c_max)
    if clip is not None:
        kernel.clip_rect = clip
    kernel.destination_feature_channel_offset = dst_c_off
    return kernel
