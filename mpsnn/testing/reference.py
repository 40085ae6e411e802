"""Float64 NumPy reference implementations, written from the spec, independent of ``backends/``.

Same function names as ``mpsnn.backends.torch_eager`` where one exists
(:func:`neuron_forward`, :func:`neuron_derivative`), but a different signature style: plain
NumPy in, float64 NumPy out, parameters passed explicitly. The coordinate references
(:func:`unary_kernel_reference`, :func:`unary_gradient_reference`) implement kernel-base.md
§2.2-2.5 and images.md §11 pixel by pixel with Python loops: slow and obvious on purpose.

Conventions re-derived from neurons.md §5-6 (not copied from the production code):

* ``a``, ``b``, ``c`` are float32 parameters: they are rounded to float32 first, then the
  arithmetic is float64.
* ReLU / PReLU / ELU take the ``x >= 0`` branch at 0 (value and derivative); Absolute's
  derivative at 0 is 0; HardSigmoid's derivative is ``a`` where ``0 <= a*x+b <= 1``
  (both edges inclusive, pre-clamp value); ReLUN's derivative is 0 where ``p >= b`` with
  ``p = x >= 0 ? x : a*x``; GeLU is the exact erf form with its exact derivative.
* IEEE semantics for power / exponential / logarithm (NaN and +-inf, no warnings).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["NEURON_TYPES", "neuron_derivative", "neuron_forward", "unary_gradient_reference", "unary_kernel_reference"]

#: Raw values of ``MPSCNNNeuronType`` (neurons.md §2; part of Apple's API).
NEURON_TYPES: dict[str, int] = {
    "none": 0, "reLU": 1, "linear": 2, "sigmoid": 3, "hardSigmoid": 4, "tanH": 5, "absolute": 6,
    "softPlus": 7, "softSign": 8, "ELU": 9, "pReLU": 10, "reLUN": 11, "power": 12, "exponential": 13,
    "logarithm": 14, "geLU": 15,
}
_NAMES = {v: k for k, v in NEURON_TYPES.items()}
_NO_CLIP = 1 << 62  # any size at least this large means "no clip" (MPSRectNoClip uses ULONG_MAX)

_erf = np.frompyfunc(math.erf, 1, 1)


def _type_name(neuron_type: Any) -> str:
    if isinstance(neuron_type, str):
        if neuron_type not in NEURON_TYPES:
            raise ValueError(f"unknown neuron type {neuron_type!r}")
        return neuron_type
    raw = int(neuron_type)
    if raw not in _NAMES:
        raise ValueError(f"unknown neuron type {neuron_type!r}")
    return _NAMES[raw]


def _f32(v: float) -> float:
    return float(np.float32(v))


def _ln(c: float) -> float:
    """Natural log of a scalar with IEEE semantics."""
    if c > 0:
        return math.log(c)
    return -math.inf if c == 0 else math.nan


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _slopes(slopes: Any, x: np.ndarray) -> np.ndarray:
    if slopes is None:
        raise ValueError("pReLU needs `slopes` (one per channel, channels on the last axis)")
    s = np.asarray(slopes, dtype=np.float32).astype(np.float64).reshape(-1)
    if x.ndim == 0 or s.size < x.shape[-1]:
        raise ValueError(f"pReLU: {s.size} slopes for {x.shape[-1] if x.ndim else 0} channels")
    return s[: x.shape[-1]]


def neuron_forward(x: Any, neuron_type: Any, a: float = 0.0, b: float = 0.0, c: float = 0.0, slopes: Any = None) -> np.ndarray:
    """f(x) in float64 for every element (channels on the last axis, for PReLU)."""
    x = np.asarray(x, dtype=np.float64)
    t = _type_name(neuron_type)
    a, b, c = _f32(a), _f32(b), _f32(c)
    with np.errstate(all="ignore"):
        if t == "none":
            return x.copy()
        if t == "reLU":
            return np.where(x >= 0, x, a * x)
        if t == "linear":
            return a * x + b
        if t == "sigmoid":
            return _sigmoid(x)
        if t == "hardSigmoid":
            return np.minimum(np.maximum(a * x + b, 0.0), 1.0)
        if t == "tanH":
            return a * np.tanh(b * x)
        if t == "absolute":
            return np.abs(x)
        if t == "softPlus":
            z = b * x
            return a * (np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z))))
        if t == "softSign":
            return x / (1.0 + np.abs(x))
        if t == "ELU":
            return np.where(x >= 0, x, a * (np.exp(x) - 1.0))
        if t == "pReLU":
            return np.where(x >= 0, x, _slopes(slopes, x) * x)
        if t == "reLUN":
            return np.minimum(np.where(x >= 0, x, a * x), b)
        if t == "power":
            return np.power(a * x + b, c)
        if t == "exponential":
            return np.exp(a * x + b) if c == -1.0 else np.power(c, a * x + b)
        if t == "logarithm":
            u = a * x + b
            return np.log(u) if c == -1.0 else np.log(u) / _ln(c)
        if t == "geLU":
            return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
    raise AssertionError(t)  # pragma: no cover


def neuron_derivative(x: Any, neuron_type: Any, a: float = 0.0, b: float = 0.0, c: float = 0.0, slopes: Any = None) -> np.ndarray:
    """f'(x) in float64 for every element (neurons.md §6, with the kink conventions above)."""
    x = np.asarray(x, dtype=np.float64)
    t = _type_name(neuron_type)
    a, b, c = _f32(a), _f32(b), _f32(c)
    one = np.ones_like(x)
    with np.errstate(all="ignore"):
        if t == "none":
            return one
        if t == "reLU":
            return np.where(x >= 0, 1.0, a) * one
        if t == "linear":
            return a * one
        if t == "sigmoid":
            s = _sigmoid(x)
            return s * (1.0 - s)
        if t == "hardSigmoid":
            u = a * x + b
            return np.where((u >= 0.0) & (u <= 1.0), a, 0.0) * one
        if t == "tanH":
            return a * b * (1.0 - np.tanh(b * x) ** 2)
        if t == "absolute":
            return np.sign(x)
        if t == "softPlus":
            return a * b * _sigmoid(b * x)
        if t == "softSign":
            return 1.0 / (1.0 + np.abs(x)) ** 2
        if t == "ELU":
            return np.where(x < 0, a * np.exp(x), 1.0)
        if t == "pReLU":
            return np.where(x >= 0, 1.0, _slopes(slopes, x)) * one
        if t == "reLUN":
            p = np.where(x >= 0, x, a * x)
            return np.where(p >= b, 0.0, np.where(x >= 0, 1.0, a))
        if t == "power":
            return a * c * np.power(a * x + b, c - 1.0)
        if t == "exponential":
            if c == -1.0:
                return a * np.exp(a * x + b)
            return a * _ln(c) * np.power(c, a * x + b)
        if t == "logarithm":
            u = a * x + b
            return a / u if c == -1.0 else a / (_ln(c) * u)
        if t == "geLU":
            cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
            return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    raise AssertionError(t)  # pragma: no cover


# -- coordinate references -------------------------------------------------------------------


def _xyz(offset: Any) -> tuple[int, int, int]:
    if offset is None:
        return 0, 0, 0
    if hasattr(offset, "x"):
        return int(offset.x), int(offset.y), int(getattr(offset, "z", 0))
    t = tuple(int(v) for v in offset)
    return (t + (0, 0, 0))[:3]  # type: ignore[return-value]


def _region(clip_rect: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((x, y, z), (w, h, d)) from an MTLRegion-like object, a pair of triples, or None."""
    if clip_rect is None:
        return (0, 0, 0), (_NO_CLIP, _NO_CLIP, _NO_CLIP)
    if hasattr(clip_rect, "origin"):
        o, s = clip_rect.origin, clip_rect.size
        return (int(o.x), int(o.y), int(o.z)), (int(s.width), int(s.height), int(s.depth))
    (ox, oy, oz), (w, h, d) = clip_rect
    return (int(ox), int(oy), int(oz)), (int(w), int(h), int(d))


def _edge(edge_mode: Any) -> str:
    if isinstance(edge_mode, str):
        name = edge_mode
    else:
        name = {0: "zero", 1: "clamp"}.get(int(edge_mode), "")
    if name not in ("zero", "clamp"):
        raise ValueError(f"edge mode {edge_mode!r}: CNN kernels define only zero and clamp")
    return name


def _effective_region(dest_shape: tuple[int, ...], src_images: int, offset_z: int, clip_rect: Any) -> tuple[int, int, int, int, int, int]:
    """(x0, x1, y0, y1, z0, depth) of R = clipRect ∩ destination, depth limited by the source
    images available from offset.z (kernel-base.md §2.3, §2.5)."""
    nd, hd, wd, _ = dest_shape
    (rx, ry, rz), (rw, rh, rdepth) = _region(clip_rect)
    x1 = min(rx + rw, wd)
    y1 = min(ry + rh, hd)
    depth = min(rdepth, nd - rz, src_images - offset_z)
    return rx, max(rx, x1), ry, max(ry, y1), rz, max(0, depth)


def unary_kernel_reference(
    src: Any,
    dest: Any,
    *,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
    edge_mode: Any = "zero",
    fn: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """What a windowless (1x1, stride 1) ``MPSCNNKernel`` writes into ``dest``.

    Args:
        src: ``[N, H, W, C]`` source values (real numbers).
        dest: ``[N, H, W, C]`` previous destination contents; a float64 copy is returned.
        offset: ``MPSOffset`` or ``(x, y, z)``: source position of ``clip_rect.origin``;
            ``z`` is the first source image.
        clip_rect: ``MTLRegion``, ``((x, y, z), (w, h, d))`` or None (no clip).
        src_c_off, src_c_max: source channel window (``src_c_max`` None = unlimited).
        dst_c_off: first destination channel written.
        edge_mode: ``"zero"``/``"clamp"`` or an ``MPSImageEdgeMode``.
        fn: float64 ``[..., Nin]`` -> ``[..., Nin]`` (element-wise; channels last).

    For each destination pixel ``(x, y)`` of ``R`` and image slot ``m``: source pixel
    ``(offset.x + x - clip.x, offset.y + y - clip.y)`` of image ``offset.z + m``, off-image
    reads 0 (zero) or the nearest edge pixel (clamp); the result goes to image
    ``clip.z + m``, channels ``[dst_c_off, dst_c_off + Nin)``. Nothing else changes.
    """
    s = np.asarray(src, dtype=np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    ns, hs, ws, cs = s.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    if nin <= 0:
        raise ValueError("no source channels left after src_c_off")
    if dst_c_off + nin > out.shape[3]:
        raise ValueError("destination has too few channels")
    ox, oy, oz = _xyz(offset)
    (rx, ry, _), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(out.shape, ns, oz, clip_rect)
    mode = _edge(edge_mode)
    if depth == 0 or x1 == x0 or y1 == y0:
        return out
    block = np.zeros((depth, y1 - y0, x1 - x0, nin))
    for m in range(depth):
        n_src = oz + m
        for y in range(y0, y1):
            for x in range(x0, x1):
                sx = ox + (x - rx)
                sy = oy + (y - ry)
                inside = 0 <= sx < ws and 0 <= sy < hs
                if not inside:
                    if mode == "zero":
                        continue  # block already holds 0
                    sx = min(max(sx, 0), ws - 1)
                    sy = min(max(sy, 0), hs - 1)
                block[m, y - y0, x - x0, :] = s[n_src, sy, sx, src_c_off:src_c_off + nin]
    out[z0:z0 + depth, y0:y1, x0:x1, dst_c_off:dst_c_off + nin] = np.asarray(fn(block), dtype=np.float64)
    return out


def unary_gradient_reference(
    dy: Any,
    x: Any,
    result: Any,
    *,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
    dfn: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """What the gradient of a windowless unary forward kernel writes (documented behaviour of
    ``MPSCNNGradientKernel`` / ``MPSNNGradientState`` in mpsnn).

    Args:
        dy: ``[Nd, Hd, Wd, Cd]`` incoming gradient, the size of the forward destination.
        x: ``[Ns, Hs, Ws, Cs]`` the forward source.
        result: previous contents of the result image (the forward source's size); a float64
            copy is returned.
        offset, clip_rect, src_c_off, src_c_max, dst_c_off: the *forward* kernel's properties.
        dfn: f'(x), element-wise, channels last.

    Result pixel ``p = (px, py, n)`` (every pixel, every image of ``result`` that ``x`` has),
    channel ``src_c_off + k`` for ``k < Nin``::

        d = p - forward.offset + forward.clip_rect.origin        # in x, y and image index
        result[p, src_c_off + k] = dy[d, dst_c_off + k] * f'(x[p, src_c_off + k])   if d in R
                                   0                                                   otherwise

    with ``R`` the region the forward pass wrote. Channels outside the window are untouched.
    This is the exact adjoint of the forward pass for edge mode zero.
    """
    g = np.asarray(dy, dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    ns, hs, ws, cs = xs.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, rz), _ = _region(clip_rect)
    x0, x1, y0, y1, z0, depth = _effective_region(g.shape, ns, oz, clip_rect)
    n_out = min(out.shape[0], ns)
    h_out, w_out = min(out.shape[1], hs), min(out.shape[2], ws)
    deriv = np.asarray(dfn(xs[..., src_c_off:src_c_off + nin]), dtype=np.float64)
    for n in range(n_out):
        dn = n - oz + rz
        for py in range(h_out):
            for px in range(w_out):
                dx_, dy_ = px - ox + rx, py - oy + ry
                inside = z0 <= dn < z0 + depth and y0 <= dy_ < y1 and x0 <= dx_ < x1
                if inside:
                    val = g[dn, dy_, dx_, dst_c_off:dst_c_off + nin] * deriv[n, py, px]
                else:
                    val = np.zeros(nin)
                out[n, py, px, src_c_off:src_c_off + nin] = val
    return out
