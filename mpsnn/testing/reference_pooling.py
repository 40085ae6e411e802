"""Float64 NumPy references for the pooling kernels, written from spec/pooling.md tap by tap
with Python loops (slow and obvious on purpose; nothing shared with ``backends/pooling.py``).

* :func:`pooling_forward` — what ``MPSCNNPoolingMax`` / ``Average`` / ``L2Norm`` /
  ``MPSCNNDilatedPoolingMax`` write into a destination (§2-6 with kernel-base.md §2.2-2.5).
* :func:`pooling_gradient` — what a pooling gradient kernel writes for given
  ``primary_offset``, ``source_size``, ``secondary_offset`` and ``clip_rect`` (§7).
* :func:`pooling_gradient_from_forward` — the same driven by a forward encode's geometry, as
  mpsnn's gradient state configures it (the result aligned with the forward source).

Conventions taken from the spec (its inferred readings included): taps ``centre − floor(E/2)
+ D·k``; max ignores NaN (``fmax``), its gradient goes to the first maximal tap in scan
order, a winning off-image zero (edge zero) drops it, a clamped tap gives it to the edge
pixel; average divides by ``kw·kh`` (zero) or by the shrunk count with ``zero_pad`` (clamp;
0 when no tap is inside the image); L2 reads edge pixels with clamp; its gradient is 0 where
the window's norm is 0.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reference import _edge, _region, _xyz

__all__ = ["pooling_forward", "pooling_gradient", "pooling_gradient_from_forward", "window_taps"]

_NO_CLIP = 1 << 62
MODES = ("max", "average", "l2")


def window_taps(centre: int, kernel: int, dilation: int = 1) -> list[int]:
    """Tap coordinates of one axis of a window centred at ``centre`` (§2.1, §6)."""
    extent = dilation * (kernel - 1) + 1
    start = centre - extent // 2
    return [start + dilation * k for k in range(kernel)]


def _shrunk_count(taps: list[int], size: int, zero_pad: int) -> int:
    """Taps of one axis inside ``[-zero_pad, size - 1 + zero_pad]`` (windows are contiguous)."""
    lo, hi = max(taps[0], -zero_pad), min(taps[-1], size - 1 + zero_pad)
    return max(0, hi - lo + 1)


def _window_value(img: np.ndarray, ys: list[int], xs: list[int], mode: str, edge: str, zero_pad: tuple[int, int]) -> np.ndarray:
    """One window of ``img`` ``[H, W, C]`` -> ``[C]``."""
    h, w, c = img.shape
    vals, inside_vals = [], []
    for yy in ys:
        for xx in xs:
            inside = 0 <= yy < h and 0 <= xx < w
            if inside:
                v = img[yy, xx]
                inside_vals.append(v)
            elif edge == "clamp":
                v = img[min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
            else:
                v = np.zeros(c)
            vals.append(v)
    if mode == "max":
        out = np.full(c, np.nan)
        for ch in range(c):
            numbers = [v[ch] for v in vals if not math.isnan(v[ch])]
            if numbers:
                out[ch] = max(numbers)
        return out
    if mode == "l2":
        return np.sqrt(sum(v * v for v in vals))
    s = sum(inside_vals) if inside_vals else np.zeros(c)
    if edge == "zero":
        return s / (len(ys) * len(xs))
    n = _shrunk_count(ys, h, zero_pad[1]) * _shrunk_count(xs, w, zero_pad[0])
    if not inside_vals or n == 0:
        return np.zeros(c)
    return s / n


def _depth(rdepth: int, *limits: int) -> int:
    return max(0, min(rdepth, *limits))


def pooling_forward(
    src: Any,
    dest: Any,
    *,
    mode: str,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    edge_mode: Any = "zero",
    zero_pad: tuple[int, int] = (0, 0),
    src_c_off: int = 0,
    src_c_max: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What a forward pooling kernel writes into ``dest`` (a float64 copy is returned).

    ``src`` / ``dest`` are ``[N, H, W, C]``; ``kernel``, ``stride``, ``dilation``,
    ``zero_pad`` are ``(x, y)``; ``offset`` an ``MPSOffset`` or ``(x, y, z)``; ``clip_rect``
    an ``MTLRegion``, ``((x, y, z), (w, h, d))`` or None. Destination pixel
    ``clip.origin + (i, j)`` of image ``clip.z + m`` pools the window centred at
    ``(offset.x + sx·i, offset.y + sy·j)`` of source image ``offset.z + m``.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    s = np.asarray(src, dtype=np.float64)
    out = np.array(dest, dtype=np.float64, copy=True)
    ns, hs, ws, cs = s.shape
    nin = cs - src_c_off if src_c_max is None else min(src_c_max, cs - src_c_off)
    ox, oy, oz = _xyz(offset)
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    edge = _edge(edge_mode)
    x1, y1 = min(rx + rw, out.shape[2]), min(ry + rh, out.shape[1])
    depth = _depth(rd, out.shape[0] - rz, ns - oz)
    for m in range(depth):
        img = s[oz + m, :, :, src_c_off:src_c_off + nin]
        for y in range(ry, y1):
            ys = window_taps(oy + stride[1] * (y - ry), kernel[1], dilation[1])
            for x in range(rx, x1):
                xs = window_taps(ox + stride[0] * (x - rx), kernel[0], dilation[0])
                out[rz + m, y, x, dst_c_off:dst_c_off + nin] = _window_value(img, ys, xs, mode, edge, zero_pad)
    return out


def _window_gradient(img: np.ndarray, acc: np.ndarray, g: np.ndarray, ys: list[int], xs: list[int], mode: str, edge: str,
                     zero_pad: tuple[int, int]) -> None:
    """Add ``g`` [C] times ∂window/∂img into ``acc`` ([H, W, C])."""
    h, w, c = img.shape
    taps: list[tuple[tuple[int, int] | None, np.ndarray, bool]] = []  # (source position or None, value [C], inside) in scan order
    for yy in ys:
        for xx in xs:
            if 0 <= yy < h and 0 <= xx < w:
                taps.append(((yy, xx), img[yy, xx], True))
            elif edge == "clamp":
                edge_pos = (min(max(yy, 0), h - 1), min(max(xx, 0), w - 1))
                taps.append((edge_pos, img[edge_pos], False))
            else:
                taps.append((None, np.zeros(c), False))
    if mode == "max":
        for ch in range(c):
            best, where = None, None
            for pos, v, _ in taps:
                if math.isnan(v[ch]):
                    continue
                if best is None or v[ch] > best:
                    best, where = v[ch], pos
            if where is not None:
                acc[where[0], where[1], ch] += g[ch]
        return
    if mode == "l2":
        norm = np.sqrt(sum(v * v for _, v, _ in taps))
        for pos, v, _ in taps:
            if pos is not None:
                acc[pos] += np.where(norm > 0, g * v / np.where(norm > 0, norm, 1.0), 0.0)
        return
    inside = [p for p, _, ins in taps if ins and p is not None]
    if edge == "zero":
        n = len(ys) * len(xs)
    else:
        n = _shrunk_count(ys, h, zero_pad[1]) * _shrunk_count(xs, w, zero_pad[0])
    if not inside or n == 0:
        return
    for p in inside:
        acc[p] += g / n


def pooling_gradient(
    dy: Any,
    x: Any,
    result: Any,
    *,
    mode: str,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    primary_offset: Any = (0, 0, 0),
    source_size: tuple[int, int, int] | None = None,
    secondary_offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    edge_mode: Any = "zero",
    zero_pad: tuple[int, int] = (0, 0),
    primary_c_off: int = 0,
    secondary_c_off: int = 0,
    channels: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """What a pooling gradient kernel writes into ``result`` (float64 copy returned), §7.1:

    gradient pixel ``p ∈ [primary_offset, primary_offset + source_size) ∩ dy`` is forward
    output ``i = p − primary_offset`` whose window is centred at ``secondary_offset + s·i``;
    ``D(y) = Σ_p dy(p)·∂out(p)/∂x(y)``; result pixel ``clip.origin + d`` of image
    ``clip.z + m`` gets ``D(y0 + d)`` (0 off the source) with
    ``y0 = max(0, secondary_offset − floor(E/2))``; ``dy`` image ``primary_offset.z + m``,
    ``x`` image ``secondary_offset.z + m``. ``channels`` defaults to all of ``x`` from
    ``secondary_c_off``.
    """
    g_all = np.asarray(dy, dtype=np.float64)
    xs_all = np.asarray(x, dtype=np.float64)
    out = np.array(result, dtype=np.float64, copy=True)
    edge = _edge(edge_mode)
    nch = xs_all.shape[3] - secondary_c_off if channels is None else channels
    pox, poy, poz = _xyz(primary_offset)
    sox, soy, soz = _xyz(secondary_offset)
    ssw, ssh, _ = source_size if source_size is not None else (_NO_CLIP, _NO_CLIP, _NO_CLIP)
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    hs, ws = xs_all.shape[1:3]
    depth = _depth(rd, out.shape[0] - rz, g_all.shape[0] - poz, xs_all.shape[0] - soz)
    y0x = max(0, window_taps(sox, kernel[0], dilation[0])[0])
    y0y = max(0, window_taps(soy, kernel[1], dilation[1])[0])
    x1, y1 = min(rx + rw, out.shape[2]), min(ry + rh, out.shape[1])
    for m in range(depth):
        img = xs_all[soz + m, :, :, secondary_c_off:secondary_c_off + nch]
        g = g_all[poz + m, :, :, primary_c_off:primary_c_off + nch]
        acc = np.zeros((hs, ws, nch))
        for py in range(max(poy, 0), min(poy + ssh, g.shape[0])):
            ys = window_taps(soy + stride[1] * (py - poy), kernel[1], dilation[1])
            for px in range(max(pox, 0), min(pox + ssw, g.shape[1])):
                xs = window_taps(sox + stride[0] * (px - pox), kernel[0], dilation[0])
                _window_gradient(img, acc, g[py, px], ys, xs, mode, edge, zero_pad)
        for y in range(ry, y1):
            for xx in range(rx, x1):
                sy_, sx_ = y0y + y - ry, y0x + xx - rx
                val = acc[sy_, sx_] if 0 <= sy_ < hs and 0 <= sx_ < ws else np.zeros(nch)
                out[rz + m, y, xx, dst_c_off:dst_c_off + nch] = val
    return out


def pooling_gradient_from_forward(
    dy: Any,
    x: Any,
    result: Any,
    *,
    mode: str,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    edge_mode: Any = "zero",
    zero_pad: tuple[int, int] = (0, 0),
    src_c_off: int = 0,
    channels: int | None = None,
    dst_c_off: int = 0,
) -> np.ndarray:
    """The gradient as mpsnn's gradient state configures the kernel from the *forward*
    parameters given here: ``primary_offset = clip.origin``, ``source_size = clip.size``,
    ``secondary_offset = offset``, result clip origin ``y0`` and pixels before ``y0`` set to 0,
    so result pixel ``y`` (every pixel, the forward channel window) is dL/dx(y)."""
    ox, oy, _ = _xyz(offset)
    (cx, cy, _), (cw, ch, _) = _region(clip_rect)
    y0x = max(0, window_taps(ox, kernel[0], dilation[0])[0])
    y0y = max(0, window_taps(oy, kernel[1], dilation[1])[0])
    nch = np.asarray(x).shape[3] - src_c_off if channels is None else channels
    out = pooling_gradient(dy, x, result, mode=mode, kernel=kernel, stride=stride, dilation=dilation, primary_offset=(cx, cy, 0),
                           source_size=(cw, ch, _NO_CLIP), secondary_offset=(ox, oy, 0), clip_rect=((y0x, y0y, 0), (_NO_CLIP, _NO_CLIP, _NO_CLIP)),
                           edge_mode=edge_mode, zero_pad=zero_pad, primary_c_off=dst_c_off, secondary_c_off=src_c_off, channels=nch,
                           dst_c_off=src_c_off)
    out[:, :y0y, :, src_c_off:src_c_off + nch] = 0.0
    out[:, :, :y0x, src_c_off:src_c_off + nch] = 0.0
    return out
