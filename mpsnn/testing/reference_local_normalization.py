"""Float64 NumPy references for the local-response normalizations, written from
spec/normalization.md §2 with Python loops (slow and obvious on purpose; nothing shared with
``backends/local_normalization.py``).

Two layers:

* The spec's formulas literally, on whole images with zero outside (offset 0, edge mode
  zero): :func:`cross_channel_normalization`, :func:`spatial_normalization`,
  :func:`local_contrast_normalization` and their ``..._gradient`` functions, the gradients
  written as the spec's transposed-window sums (``R(k)``, ``W^T(p)``).
* The kernels' geometry (kernel-base.md §2.2-2.5): :func:`local_normalization_forward` (what
  a forward kernel writes into a destination, for any offset, clip rect, edge mode, channel
  window, image range) and :func:`local_normalization_gradient` (what a gradient kernel
  writes: dL/dX accumulated window by window from the analytic partial derivatives of each
  window's output with respect to each tap value, routed to the pixel the tap read — the
  edge pixel for a clamped off-image tap, nowhere for a zero one).

``kind`` is ``"cross_channel"`` (``kernel`` = N), ``"spatial"`` or ``"local_contrast"``
(``kernel`` = ``(kw, kh)``); ``params`` a mapping with ``alpha``, ``beta``, ``delta`` and for
local contrast ``p0``, ``pm``, ``ps`` (defaults: the spec's kernel defaults).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .reference import _edge, _region, _xyz

__all__ = [
    "DEFAULTS",
    "cross_channel_normalization",
    "cross_channel_normalization_gradient",
    "local_contrast_normalization",
    "local_contrast_normalization_gradient",
    "local_normalization_forward",
    "local_normalization_gradient",
    "local_normalization_gradient_from_forward",
    "spatial_normalization",
    "spatial_normalization_gradient",
]

_NO_CLIP = 1 << 62
KINDS = ("cross_channel", "spatial", "local_contrast")
#: the spec's kernel defaults (§2.1-2.3)
DEFAULTS: dict[str, dict[str, float]] = {
    "cross_channel": {"alpha": 1.0, "beta": 5.0, "delta": 1.0},
    "spatial": {"alpha": 1.0, "beta": 5.0, "delta": 1.0},
    "local_contrast": {"alpha": 0.0, "beta": 0.5, "delta": 1.0 / 1024, "p0": 1.0, "pm": 0.0, "ps": 1.0},
}


def _params(kind: str, params: Mapping[str, float] | None) -> dict[str, float]:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    p = dict(DEFAULTS[kind])
    p.update(params or {})
    return {k: float(np.float32(v)) for k, v in p.items()}  # the kernels' float properties


# -- the spec's formulas, whole images, zero outside -------------------------------------------------


def _q(k: int, n: int, d: int) -> range:
    """Q(k) = [max(0, k − floor(N/2)), min(D − 1, k + floor((N − 1)/2))]."""
    return range(max(0, k - n // 2), min(d - 1, k + (n - 1) // 2) + 1)


def _r(k: int, n: int, d: int) -> range:
    """R(k) = [max(0, k − floor((N − 1)/2)), min(D − 1, k + floor(N/2))]."""
    return range(max(0, k - (n - 1) // 2), min(d - 1, k + n // 2) + 1)


def cross_channel_normalization(x: Any, kernel_size: int, params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.1 on ``x`` ``[..., D]``: ``Y_k = X_k / L(k)^beta``."""
    p = _params("cross_channel", params)
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    out = np.empty_like(x)
    for k in range(d):
        lk = p["delta"] + p["alpha"] / kernel_size * sum(x[..., q] ** 2 for q in _q(k, kernel_size, d))
        out[..., k] = x[..., k] / lk ** p["beta"]
    return out


def _lrn_l(x: np.ndarray, n: int, p: dict[str, float]) -> np.ndarray:
    d = x.shape[-1]
    return np.stack([p["delta"] + p["alpha"] / n * sum(x[..., q] ** 2 for q in _q(k, n, d)) for k in range(d)], axis=-1)


def cross_channel_normalization_gradient(dy: Any, x: Any, kernel_size: int, params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.1 gradient as the spec writes it:
    ``dX_k = dY_k·L(k)^−beta − (2·alpha·beta/N)·X_k·Σ_{r∈R(k)} dY_r·X_r·L(r)^(−beta−1)``."""
    p = _params("cross_channel", params)
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    n, b, d = kernel_size, p["beta"], x.shape[-1]
    lv = _lrn_l(x, n, p)
    out = np.empty_like(x)
    for k in range(d):
        s = sum(dy[..., r] * x[..., r] * lv[..., r] ** (-b - 1) for r in _r(k, n, d))
        out[..., k] = dy[..., k] * lv[..., k] ** -b - 2 * p["alpha"] * b / n * x[..., k] * s
    return out


def _taps(c: int, k: int) -> range:
    """One axis of W(p): [c − floor(k/2), c + floor((k − 1)/2)]."""
    return range(c - k // 2, c + (k - 1) // 2 + 1)


def _taps_t(c: int, k: int) -> range:
    """One axis of the transposed window W^T(p): [c − floor((k − 1)/2), c + floor(k/2)]."""
    return range(c - (k - 1) // 2, c + k // 2 + 1)


def _sum_window(img: np.ndarray, y: int, x: int, kw: int, kh: int, power: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = np.zeros(img.shape[2:])
    for yy in _taps(y, kh):
        for xx in _taps(x, kw):
            if 0 <= yy < h and 0 <= xx < w:
                s = s + img[yy, xx] ** power
    return s


def _spatial_t(img: np.ndarray, kw: int, kh: int, p: dict[str, float]) -> np.ndarray:
    h, w = img.shape[:2]
    return np.array([[p["delta"] + p["alpha"] / (kw * kh) * _sum_window(img, y, x, kw, kh, 2) for x in range(w)] for y in range(h)])


def spatial_normalization(img: Any, kernel: tuple[int, int], params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.2 on one image ``[H, W, C]`` (zero outside): ``Y_p = X_p / T(p)^beta``."""
    p = _params("spatial", params)
    img = np.asarray(img, dtype=np.float64)
    return img / _spatial_t(img, kernel[0], kernel[1], p) ** p["beta"]


def spatial_normalization_gradient(dy: Any, img: Any, kernel: tuple[int, int], params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.2 gradient as the spec writes it (one image, zero outside):
    ``dX_p = dY_p·T(p)^−beta − (2·alpha·beta/n)·X_p·Σ_{q∈W^T(p)} dY_q·X_q·T(q)^(−beta−1)``."""
    p = _params("spatial", params)
    img, dy = np.asarray(img, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    (kw, kh), b = kernel, p["beta"]
    h, w = img.shape[:2]
    t = _spatial_t(img, kw, kh, p)
    out = np.empty_like(img)
    for y in range(h):
        for x in range(w):
            s = np.zeros(img.shape[2:])
            for qy in _taps_t(y, kh):
                for qx in _taps_t(x, kw):
                    if 0 <= qy < h and 0 <= qx < w:
                        s = s + dy[qy, qx] * img[qy, qx] * t[qy, qx] ** (-b - 1)
            out[y, x] = dy[y, x] * t[y, x] ** -b - 2 * p["alpha"] * b / (kw * kh) * img[y, x] * s
    return out


def _lcn_stats(img: np.ndarray, kw: int, kh: int, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    n = kw * kh
    m = np.array([[_sum_window(img, y, x, kw, kh, 1) / n for x in range(w)] for y in range(h)])
    v = np.array([[_sum_window(img, y, x, kw, kh, 2) / n for x in range(w)] for y in range(h)]) - m * m
    return m, p["delta"] + p["alpha"] * v


def local_contrast_normalization(img: Any, kernel: tuple[int, int], params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.3 on one image ``[H, W, C]`` (zero outside): ``Y = pm + ps·(X − p0·M)/T^beta``."""
    p = _params("local_contrast", params)
    img = np.asarray(img, dtype=np.float64)
    m, t = _lcn_stats(img, kernel[0], kernel[1], p)
    return p["pm"] + p["ps"] * (img - p["p0"] * m) / t ** p["beta"]


def local_contrast_normalization_gradient(dy: Any, img: Any, kernel: tuple[int, int], params: Mapping[str, float] | None = None) -> np.ndarray:
    """§2.3 gradient as the spec writes it (one image, zero outside): ``dX_p = ps·[dY_p·T(p)^−beta
    − Σ_{q∈W^T(p)} dY_q·T(q)^−beta·(p0/n + (2·alpha·beta/n)·(X_q − p0·M(q))·(X_p − M(q))/T(q))]``."""
    p = _params("local_contrast", params)
    img, dy = np.asarray(img, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    (kw, kh), b, n = kernel, p["beta"], kernel[0] * kernel[1]
    h, w = img.shape[:2]
    m, t = _lcn_stats(img, kw, kh, p)
    out = np.empty_like(img)
    for y in range(h):
        for x in range(w):
            s = np.zeros(img.shape[2:])
            for qy in _taps_t(y, kh):
                for qx in _taps_t(x, kw):
                    if 0 <= qy < h and 0 <= qx < w:
                        mq, tq = m[qy, qx], t[qy, qx]
                        s = s + dy[qy, qx] * tq ** -b * (p["p0"] / n + 2 * p["alpha"] * b / n * (img[qy, qx] - p["p0"] * mq) * (img[y, x] - mq) / tq)
            out[y, x] = p["ps"] * (dy[y, x] * t[y, x] ** -b - s)
    return out


# -- one window: value and partial derivatives with respect to its taps ----------------------------


def _window_value_and_partials(kind: str, vals: np.ndarray, centre: int, kernel: Any, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """``vals`` ``[taps, C]`` the tap values of one window (``centre`` the centre tap's index).
    Returns the output ``[C]`` and ``∂out_c/∂vals[t, c]`` ``[taps, C]`` (spatial kinds: each
    channel on its own)."""
    a, b, dl = p["alpha"], p["beta"], p["delta"]
    n = vals.shape[0]
    xc = vals[centre]
    onehot = np.zeros((n, 1))
    onehot[centre] = 1.0
    if kind == "spatial":
        t = dl + a / n * (vals ** 2).sum(0)
        y = xc * t ** -b
        dy_dv = onehot * t ** -b + xc * (-b) * t ** (-b - 1) * (2 * a / n) * vals
        return y, dy_dv
    m = vals.mean(0)
    v = (vals ** 2).mean(0) - m * m
    t = dl + a * v
    y = p["pm"] + p["ps"] * (xc - p["p0"] * m) * t ** -b
    dy_dv = p["ps"] * ((onehot - p["p0"] / n) * t ** -b + (xc - p["p0"] * m) * (-b) * t ** (-b - 1) * a * (2.0 / n) * (vals - m))
    return y, dy_dv


def _lrn_value_and_jacobian(v: np.ndarray, n: int, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """One pixel's channel vector ``v`` ``[D]`` -> ``Y`` ``[D]`` and ``J[k, j] = ∂Y_k/∂v_j``."""
    a, b = p["alpha"], p["beta"]
    d = v.shape[0]
    y, jac = np.empty(d), np.zeros((d, d))
    for k in range(d):
        lk = p["delta"] + a / n * sum(v[q] ** 2 for q in _q(k, n, d))
        y[k] = v[k] * lk ** -b
        jac[k, k] += lk ** -b
        for j in _q(k, n, d):
            jac[k, j] += v[k] * (-b) * lk ** (-b - 1) * (a / n) * 2 * v[j]
    return y, jac


def _read(img: np.ndarray, yy: int, xx: int, edge: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The value a tap reads and the pixel it reads (None for an off-image zero)."""
    h, w = img.shape[:2]
    if 0 <= yy < h and 0 <= xx < w:
        return img[yy, xx], (yy, xx)
    if edge == "clamp":
        pos = (min(max(yy, 0), h - 1), min(max(xx, 0), w - 1))
        return img[pos], pos
    return np.zeros(img.shape[2]), None


def _window_taps(cy: int, cx: int, kind: str, kernel: Any) -> tuple[list[tuple[int, int]], int]:
    kw, kh = (1, 1) if kind == "cross_channel" else kernel
    taps = [(yy, xx) for yy in _taps(cy, kh) for xx in _taps(cx, kw)]
    return taps, taps.index((cy, cx))


def _depth(rdepth: int, *limits: int) -> int:
    return max(0, min(rdepth, *limits))


def local_normalization_forward(
    src: Any,
    dest: Any,
    *,
    kind: str,
    kernel: Any,
    params: Mapping[str, float] | None = None,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    edge_mode: Any = "zero",
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What a forward kernel writes into ``dest`` (a float64 copy is returned): destination
    pixel ``clip.origin + (i, j)`` of image ``clip.z + m`` is the output of the window centred
    at source pixel ``(offset.x + i, offset.y + j)`` of image ``offset.z + m``, over the source
    channels ``[src_c_off, src_c_off + Nin)``, written at ``dst_c_off``."""
    p = _params(kind, params)
    s = np.asarray(src, dtype=np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    ns, _, _, cs = s.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    edge = _edge(edge_mode)
    x1, y1 = min(rx + rw, out.shape[2]), min(ry + rh, out.shape[1])
    for m in range(_depth(rd, out.shape[0] - rz, ns - oz)):
        img = s[oz + m, :, :, src_c_off:src_c_off + nin]
        for y in range(ry, y1):
            for x in range(rx, x1):
                cy, cx = oy + y - ry, ox + x - rx
                if kind == "cross_channel":
                    val = _lrn_value_and_jacobian(_read(img, cy, cx, edge)[0], kernel, p)[0]
                else:
                    taps, centre = _window_taps(cy, cx, kind, kernel)
                    vals = np.stack([_read(img, yy, xx, edge)[0] for yy, xx in taps])
                    val = _window_value_and_partials(kind, vals, centre, kernel, p)[0]
                out[rz + m, y, x, dst_c_off:dst_c_off + nin] = val
    return out


def local_normalization_gradient(
    dy: Any,
    x: Any,
    result: Any,
    *,
    kind: str,
    kernel: Any,
    params: Mapping[str, float] | None = None,
    primary_offset: Any = (0, 0, 0),
    secondary_offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    bounds: tuple[int, int, int, int] | None = None,
    edge_mode: Any = "zero",
    primary_c_off: int = 0,
    secondary_c_off: int = 0,
    channels: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What a gradient kernel writes into ``result`` (float64 copy returned):

    incoming-gradient pixel ``g`` (inside ``dy`` and ``bounds = (x_lo, x_hi, y_lo, y_hi)``)
    is the forward output of the window centred at source pixel ``g − primary_offset +
    secondary_offset``; ``D(s) = Σ_g dy(g)·∂out(g)/∂x(s)``; result pixel ``clip.origin + u`` of
    image ``clip.z + m`` gets ``D(secondary_offset + u)`` (0 off the source), ``dy`` image
    ``primary_offset.z + m``, ``x`` image ``secondary_offset.z + m``."""
    p = _params(kind, params)
    g_all = np.asarray(dy, dtype=np.float64)
    xs_all = np.asarray(x, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    edge = _edge(edge_mode)
    nch = xs_all.shape[3] - secondary_c_off if channels is None else channels
    pox, poy, poz = _xyz(primary_offset)
    sox, soy, soz = _xyz(secondary_offset)
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    hs, ws = xs_all.shape[1:3]
    gx0, gx1, gy0, gy1 = bounds if bounds is not None else (0, _NO_CLIP, 0, _NO_CLIP)
    gx0, gy0, gx1, gy1 = max(gx0, 0), max(gy0, 0), min(gx1, g_all.shape[2]), min(gy1, g_all.shape[1])
    x1, y1 = min(rx + rw, out.shape[2]), min(ry + rh, out.shape[1])
    for m in range(_depth(rd, out.shape[0] - rz, g_all.shape[0] - poz, xs_all.shape[0] - soz)):
        img = xs_all[soz + m, :, :, secondary_c_off:secondary_c_off + nch]
        g = g_all[poz + m, :, :, primary_c_off:primary_c_off + nch]
        acc = np.zeros((hs, ws, nch))
        for gy in range(gy0, gy1):
            for gx in range(gx0, gx1):
                cy, cx = gy - poy + soy, gx - pox + sox
                if kind == "cross_channel":
                    v, pos = _read(img, cy, cx, edge)
                    if pos is not None:
                        acc[pos] += g[gy, gx] @ _lrn_value_and_jacobian(v, kernel, p)[1]
                    continue
                taps, centre = _window_taps(cy, cx, kind, kernel)
                reads = [_read(img, yy, xx, edge) for yy, xx in taps]
                partials = _window_value_and_partials(kind, np.stack([v for v, _ in reads]), centre, kernel, p)[1]
                for (_, pos), part in zip(reads, partials):
                    if pos is not None:
                        acc[pos] += g[gy, gx] * part
        for y in range(ry, y1):
            for xx in range(rx, x1):
                sy_, sx_ = soy + y - ry, sox + xx - rx
                val = acc[sy_, sx_] if 0 <= sy_ < hs and 0 <= sx_ < ws else np.zeros(nch)
                out[rz + m, y, xx, dst_c_off:dst_c_off + nch] = val
    return out


def local_normalization_gradient_from_forward(
    dy: Any,
    x: Any,
    result: Any,
    *,
    kind: str,
    kernel: Any,
    params: Mapping[str, float] | None = None,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    edge_mode: Any = "zero",
    src_c_off: int = 0,
    channels: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """The gradient as mpsnn's gradient state configures the kernel from the *forward*
    properties given here: ``primary_offset = clip.origin − offset``, ``secondary_offset = 0``,
    only the incoming-gradient pixels of the forward clip rectangle count, and every result
    pixel ``p`` (forward channel window) is dL/dX_p."""
    ox, oy, _ = _xyz(offset)
    (cx, cy, _), (cw, ch, _) = _region(clip_rect)
    g = np.asarray(dy)
    bounds = (cx, min(cx + cw, g.shape[2]), cy, min(cy + ch, g.shape[1]))
    return local_normalization_gradient(dy, x, result, kind=kind, kernel=kernel, params=params, primary_offset=(cx - ox, cy - oy, 0),
                                        bounds=bounds, edge_mode=edge_mode, primary_c_off=dst_c_off, secondary_c_off=src_c_off,
                                        channels=channels, dst_c_off=src_c_off)
