"""Float64 NumPy reference of the convolution family (convolution.md), independent of ``backends/``.

Written from the spec equations, tap by tap (a Python loop over the kernel taps, an einsum
over channels, NumPy gathers for the pixels): slow and obvious on purpose. Nothing is
imported from mpsnn except :func:`mpsnn.testing.reference.neuron_forward` (fused neurons) and that
module's argument normalisers (offsets, clip rectangles, edge modes).

Conventions (all functions):

* Images are NHWC float64 arrays ``[N, H, W, C]``; coordinates are written ``(x, y)`` and
  every ``(x, y)`` pair argument (stride, dilation, kernel size, padding) is **x first**.
* Weights: regular ``[Cout][kH][kW][Cin/g]`` (OHWI, §1/§5.3); depthwise ``[Cout][kH][kW]``
  (§4.2, M = 1); fully connected ``[Cout][Ws][Hs][Cin]`` (§14.1); binary uint32
  ``[Cout][kH][kW][ceil(Cin/32)]`` (§15.2); transpose OHWI like regular (§12.2).
* ``offset`` = ``(x, y, z)`` or an object with ``.x/.y/.z``; ``clip_rect`` = None (no clip),
  ``((x, y, z), (w, h, d))`` or an ``MTLRegion``-like object.
* Effective region (kernel-base.md §2.3/§2.5): ``R = clip ∩ destination``; the number of
  images is also limited by the source images available from ``offset.z``; positions
  ``i = x − clip.origin.x`` are measured from the *given* clip origin (§2.2).
* Edge modes ``"zero"`` / ``"clamp"`` (or 0 / 1), images.md §11.
* Fused post-processing (§3.1): ``sum → + bias → batch norm (folded, §3.2) → neuron``.
  ``batch_norm = (mean, variance, gamma, beta, epsilon)`` (any array may be None: 0, 1, 1, 0);
  ``neuron = (type, a, b, c, slopes)`` (trailing items may be left out; ``slopes`` = one
  PReLU slope per output channel), evaluated by ``neuron_forward``.
* Parameters are used as given (no float32 / float16 rounding): pass values that are
  representable in the production dtype when comparing against it.

Spec points resolved here (inferred where the spec is silent):

* Sub-pixel (§4.3): the intermediate pixel of destination pixel ``x`` is
  ``(x − clip.origin.x) // r`` (relative to the given clip origin, as §2.2 does for ``i``);
  with a clip inside the destination this is exactly the §4.3 formula.
* Binary (§15.2): ``x' = (S̃ + inputBias)·inputScale`` is applied to the edge-handled read,
  so a zero-mode tap outside the image gives ``x' = inputBias·inputScale`` (literal reading
  of the equation). β averages the image ``A`` read with the edge mode: zero mode gives
  ``A = 0`` outside the source, clamp the nearest in-image ``A``.
* Transpose (§12.2): ``Z`` positions outside the zero-inserted image read 0 (there is no
  edge mode on ``Z``); images of ``E`` / ``src`` pair as ``src[offset.z + m] ↔ E[m]``.
* Gradients (§11.3, §13.2, §14.2): sums over the batch; ``dS`` drops contributions of
  forward taps that were outside the source, whatever the edge mode.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mpsnn.testing.reference import _edge, _region, _xyz, neuron_forward

__all__ = [
    "BINARY_TYPES",
    "binary_convolution_forward",
    "binary_fully_connected_forward",
    "convolution_forward",
    "convolution_gradient",
    "convolution_transpose_forward",
    "convolution_transpose_gradient",
    "dequantize_uint8",
    "fold_batch_norm",
    "fully_connected_forward",
    "fully_connected_gradient",
    "pack_binary_weights",
    "quantize_linear_uint8",
    "torch_conv_transpose_equivalent",
    "unpack_binary_weights",
]

#: Raw values of ``MPSCNNBinaryConvolutionType`` (§15.1).
BINARY_TYPES: dict[str, int] = {"binaryWeights": 0, "XNOR": 1, "AND": 2}
#: ``MPSCNNBinaryConvolutionFlagsUseBetaScaling`` (§15.1).
USE_BETA_SCALING = 1


Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


# -- small parsers ---------------------------------------------------------------------------


def _pair(v: Any, name: str) -> tuple[int, int]:
    """``(x, y)`` from an int or a pair."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"`{name}` must be an int or an (x, y) pair, got {v!r}")
    return t[0], t[1]


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _dest(dest: Any, dest_shape: Any) -> np.ndarray:
    if dest is not None:
        out = np.array(dest, dtype=np.float64, copy=True)
    elif dest_shape is not None:
        out = np.zeros(tuple(int(v) for v in dest_shape), dtype=np.float64)
    else:
        raise ValueError("give `dest` (previous destination contents) or `dest_shape`")
    if out.ndim != 4:
        raise ValueError(f"destination must be [N, H, W, C], got shape {out.shape}")
    return out


def _effective(dest_shape: tuple[int, ...], src_images: int, oz: int, clip_rect: Any) -> tuple[int, int, int, int, int, int, int, int, int]:
    """``(rx, ry, rz, x0, x1, y0, y1, z0, z1)``: given clip origin, and the effective region
    ``R = clip ∩ destination`` (kernel-base.md §2.3), image range limited by the source
    images available from ``offset.z`` (§2.5)."""
    if oz < 0:
        raise ValueError(f"offset.z (={oz}) must be >= 0")
    nd, hd, wd = dest_shape[:3]
    (rx, ry, rz), (rw, rh, rd) = _region(clip_rect)
    x0, x1 = max(rx, 0), min(rx + rw, wd)
    y0, y1 = max(ry, 0), min(ry + rh, hd)
    z0, z1 = max(rz, 0), min(rz + rd, nd, rz + src_images - oz)
    return rx, ry, rz, x0, max(x0, x1), y0, max(y0, y1), z0, max(z0, z1)


# -- reads ---------------------------------------------------------------------------------


def _read(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, mode: str) -> np.ndarray:
    """``S̃`` on the grid ``ys × xs`` of one image ``[H, W, C]`` → ``[len(ys), len(xs), C]``
    (kernel-base.md §2.6: zero → 0 off-image, clamp → nearest pixel)."""
    h, w = img.shape[:2]
    if mode == "clamp":
        return img[np.ix_(np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))]
    out = np.zeros((len(ys), len(xs)) + img.shape[2:])
    iy = (ys >= 0) & (ys < h)
    ix = (xs >= 0) & (xs < w)
    out[np.ix_(iy, ix)] = img[np.ix_(ys[iy], xs[ix])]
    return out


def _read_zero_inserted(img: np.ndarray, us: np.ndarray, vs: np.ndarray, sx: int, sy: int) -> np.ndarray:
    """``Z(u, v) = S(u/sX, v/sY)`` if both divide and land inside the source, else 0
    (§12.2 step 1) on the grid ``vs × us`` → ``[len(vs), len(us), C]``."""
    h, w = img.shape[:2]
    out = np.zeros((len(vs), len(us)) + img.shape[2:])
    okx = (us % sx == 0) & (us >= 0) & (us // sx < w)
    oky = (vs % sy == 0) & (vs >= 0) & (vs // sy < h)
    out[np.ix_(oky, okx)] = img[np.ix_(vs[oky] // sy, us[okx] // sx)]
    return out


# -- shared accumulation and post-processing --------------------------------------------------


def _accumulate(sample: Sampler, w: np.ndarray, xs: np.ndarray, ys: np.ndarray, dil: tuple[int, int], groups: int, depthwise: bool) -> np.ndarray:
    """``acc[j, i, o] = Σ_{q,p,c} W[o][q][p][c] · sample(xs[i] + p·dX, ys[j] + q·dY)[G(o)·Cin_g + c]``
    (§1 with ``xs``/``ys`` the first-tap positions; depthwise §4.2: channel ``o`` reads ``o``)."""
    dx, dy = dil
    cout, kh, kw = w.shape[:3]
    acc = np.zeros((len(ys), len(xs), cout))
    for q in range(kh):
        for p in range(kw):
            tap = sample(xs + p * dx, ys + q * dy)  # [B, A, Cin]
            if depthwise:
                acc += tap * w[:, q, p]
                continue
            cin_g, cout_g = w.shape[3], cout // groups
            for g in range(groups):
                oc, ic = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
                acc[..., oc] += np.einsum("bac,oc->bao", tap[..., ic], w[oc, q, p, :])
    return acc


def _bn_coefficients(batch_norm: Any, cout: int) -> tuple[np.ndarray, np.ndarray]:
    """``I = gamma / sqrt(variance + eps)``, ``J = beta − I·mean`` (§3.2); None arrays take
    the identity defaults mean 0, variance 1, gamma 1, beta 0."""
    mean, var, gamma, beta, eps = batch_norm

    def arr(v: Any, default: float) -> np.ndarray:
        return np.full(cout, default) if v is None else _f64(v).reshape(cout)

    i_ = arr(gamma, 1.0) / np.sqrt(arr(var, 1.0) + float(eps))
    return i_, arr(beta, 0.0) - i_ * arr(mean, 0.0)


def _apply_neuron(z: np.ndarray, neuron: Any) -> np.ndarray:
    if neuron is None:
        return z
    if isinstance(neuron, (int, str, np.integer)):
        neuron = (neuron,)
    t, *rest = tuple(neuron)
    a, b, c, slopes = (list(rest) + [0.0, 0.0, 0.0, None])[:4]
    return neuron_forward(z, t, a, b, c, slopes)


def _post(acc: np.ndarray, bias: Any, batch_norm: Any, neuron: Any) -> np.ndarray:
    """§3.1: ``f(bn(acc + b))`` with channels on the last axis."""
    cout = acc.shape[-1]
    z = acc + (0.0 if bias is None else _f64(bias).reshape(cout))
    if batch_norm is not None:
        i_, j_ = _bn_coefficients(batch_norm, cout)
        z = z * i_ + j_
    return _apply_neuron(z, neuron)


def _check_weights(w: np.ndarray, groups: int, depthwise: bool) -> tuple[int, int]:
    """``(Cin, Cout)`` of a regular / depthwise weight array."""
    if depthwise:
        if w.ndim != 3:
            raise ValueError(f"depthwise weights must be [Cout][kH][kW], got shape {w.shape}")
        if groups != 1:
            raise ValueError(f"depthwise convolution needs groups == 1, got {groups}")
        return w.shape[0], w.shape[0]  # M = 1 only (§4.2)
    if w.ndim != 4:
        raise ValueError(f"weights must be [Cout][kH][kW][Cin/g], got shape {w.shape}")
    if groups < 1 or w.shape[0] % groups:
        raise ValueError(f"Cout (={w.shape[0]}) must be divisible by groups (={groups})")
    return w.shape[3] * groups, w.shape[0]


def _source_shape(s: np.ndarray | None, src_shape: Any) -> tuple[int, ...]:
    """``(Ns, Hs, Ws, ...)`` of the forward source for a gradient (``src_shape`` wins)."""
    if src_shape is not None:
        return tuple(int(v) for v in src_shape)
    if s is None:
        raise ValueError("give `src` or `src_shape` (the forward source's [N, H, W(, C)])")
    return tuple(s.shape)


# -- 1. convolution (§1, §3, §4) -------------------------------------------------------------


def convolution_forward(
    src: Any,
    weights: Any,
    bias: Any = None,
    *,
    dest: Any = None,
    dest_shape: Any = None,
    offset: Any = (0, 0, 0),
    clip_rect: Any = None,
    stride: Any = (1, 1),
    dilation: Any = (1, 1),
    groups: int = 1,
    depthwise: bool = False,
    edge_mode: Any = "zero",
    src_c_off: int = 0,
    dst_c_off: int = 0,
    batch_norm: Any = None,
    neuron: Any = None,
    sub_pixel_scale: int = 1,
) -> np.ndarray:
    """``MPSCNNConvolution`` forward (convolution.md §1, §3, §4.1-4.3; kernel-base.md §2.2-2.6).

    For each pixel ``(x, y)`` of the effective clip region and image slot ``m``::

        i = x − clip.x,  left = offset.x + i·sX − (kWd >> 1)      (same for y)
        acc(o) = Σ_{q,p,c} W[o][q][p][c] · S̃(offset.z + m, left + p·dX, top + q·dY, cs0 + G(o)·Cin_g + c)
        D[clip.z + m, y, x, cd0 + o] = f(bn(acc(o) + b[o]))

    Depthwise (§4.2, M = 1): ``acc(o) = Σ_{q,p} Wdw[o][q][p] · S̃(..., cs0 + o)``.
    Sub-pixel ``r`` (§4.3): the above on the intermediate grid ``(i', j')``, then
    ``D[x, y, cd0 + c] = Io[(x−clip.x)//r, (y−clip.y)//r, Nr·(r·(y' mod r) + (x' mod r)) + c]``
    with ``x' = x − clip.x``, ``Nr = Cout/r²`` (TensorFlow depth_to_space order, DCR).

    Returns a copy of ``dest`` (or zeros of ``dest_shape``) with only the effective clip
    region and channels ``[cd0, cd0 + Cout/r²)`` written.
    """
    s, w = _f64(src), _f64(weights)
    cin, cout = _check_weights(w, groups, depthwise)
    ns, _, _, cs = s.shape
    if src_c_off < 0 or src_c_off + cin > cs:
        raise ValueError(f"source has {cs} channels, need src_c_off + Cin = {src_c_off} + {cin}")
    r = int(sub_pixel_scale)
    if r < 1 or cout % (r * r):
        raise ValueError(f"Cout (={cout}) must be a multiple of subPixelScaleFactor² (={r}²)")
    nr = cout // (r * r)
    out = _dest(dest, dest_shape)
    if dst_c_off < 0 or dst_c_off + nr > out.shape[3]:
        raise ValueError(f"destination has {out.shape[3]} channels, need dst_c_off + {nr}")
    (sx, sy), (dx, dy), mode = _pair(stride, "stride"), _pair(dilation, "dilation"), _edge(edge_mode)
    ox, oy, oz = _xyz(offset)
    kh, kw = w.shape[1:3]
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    rx, ry, rz, x0, x1, y0, y1, z0, z1 = _effective(out.shape, ns, oz, clip_rect)
    if x1 == x0 or y1 == y0:
        return out
    xrel, yrel = np.arange(x0, x1) - rx, np.arange(y0, y1) - ry
    ii = np.arange(xrel[0] // r, xrel[-1] // r + 1)  # intermediate grid (= xrel when r == 1)
    jj = np.arange(yrel[0] // r, yrel[-1] // r + 1)
    for nd in range(z0, z1):
        img = s[oz + nd - rz, :, :, src_c_off:src_c_off + cin]

        def sample(xs: np.ndarray, ys: np.ndarray, img: np.ndarray = img) -> np.ndarray:
            return _read(img, xs, ys, mode)

        acc = _accumulate(sample, w, ox + ii * sx - (kwd >> 1), oy + jj * sy - (khd >> 1), (dx, dy), groups, depthwise)
        io = _post(acc, bias, batch_norm, neuron)  # [len(jj), len(ii), Cout]
        if r == 1:
            out[nd, y0:y1, x0:x1, dst_c_off:dst_c_off + cout] = io
            continue
        for b_, yr in enumerate(yrel):
            for a_, xr in enumerate(xrel):
                block = r * (yr % r) + (xr % r)
                out[nd, y0 + b_, x0 + a_, dst_c_off:dst_c_off + nr] = io[yr // r - jj[0], xr // r - ii[0], nr * block:nr * (block + 1)]
    return out


def convolution_gradient(
    E: Any,
    src: Any,
    weights: Any,
    *,
    offset: Any = (0, 0, 0),
    stride: Any = (1, 1),
    dilation: Any = (1, 1),
    groups: int = 1,
    depthwise: bool = False,
    edge_mode: Any = "zero",
    src_c_off: int = 0,
    src_shape: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``MPSCNNConvolutionGradient`` (convolution.md §11.3, exact adjoint of §1).

    ``E`` ``[M, He, We, Cout]`` is the incoming gradient over the forward clip region,
    indexed from 0; image ``m`` pairs with forward source image ``offset.z + m``. With
    ``ox = offset.x − (kWd >> 1)`` (``oy`` likewise)::

        dW[o][q][p][c] = Σ_n Σ_{i,j} E(n,i,j,o) · S̃(n, sX·i + ox + dX·p, sY·j + oy + dY·q, cs0 + G(o)·Cin_g + c)
        db[o]          = Σ_n Σ_{i,j} E(n,i,j,o)
        dS(n, u, v, G·Cin_g + c) = Σ_{o∈G} Σ_{q,p} Σ_{(i,j) tapping (u,v)} E(n,i,j,o) · W[o][q][p][c]

    ``S̃`` uses ``edge_mode``; ``dS`` drops taps that were off the source image (any edge
    mode). Returns ``(dS [Ns, Hs, Ws, Cin], dW (layout of weights), db [Cout])``.
    ``src`` may be None (then ``src_shape = (Ns, Hs, Ws[, C])`` is required and dW is None).
    """
    e, w = _f64(E), _f64(weights)
    cin, cout = _check_weights(w, groups, depthwise)
    if e.ndim != 4 or e.shape[3] != cout:
        raise ValueError(f"E must be [M, He, We, Cout={cout}], got shape {e.shape}")
    s = None if src is None else _f64(src)
    shape = _source_shape(s, src_shape)
    ns, hs, ws = shape[:3]
    (sx, sy), (dx, dy), mode = _pair(stride, "stride"), _pair(dilation, "dilation"), _edge(edge_mode)
    oxf, oyf, oz = _xyz(offset)
    kh, kw = w.shape[1:3]
    ox, oy = oxf - (((kw - 1) * dx + 1) >> 1), oyf - (((kh - 1) * dy + 1) >> 1)
    m_count, he, we = e.shape[:3]
    if oz + m_count > ns:
        raise ValueError(f"E has {m_count} images but the source has only {ns - oz} from offset.z")
    ds = np.zeros((ns, hs, ws, cin))
    dw = None if s is None else np.zeros_like(w)
    db = e.sum(axis=(0, 1, 2))
    cout_g = cout // groups
    cin_g = 1 if depthwise else cin // groups
    for m in range(m_count):
        n = oz + m
        em = e[m]  # [He, We, Cout]
        for q in range(kh):
            for p in range(kw):
                us, vs = sx * np.arange(we) + ox + dx * p, sy * np.arange(he) + oy + dy * q
                iu, iv = (us >= 0) & (us < ws), (vs >= 0) & (vs < hs)
                e_in = em[np.ix_(iv, iu)]  # gradient of the taps that were inside the source
                rows, cols = vs[iv][:, None], us[iu][None, :]
                if dw is not None and s is not None:
                    tap = _read(s[n, :, :, src_c_off:src_c_off + cin], us, vs, mode)  # [He, We, Cin]
                if depthwise:
                    if dw is not None:
                        dw[:, q, p] += np.einsum("jio,jio->o", em, tap)
                    ds[n][rows, cols, :] += e_in * w[:, q, p]  # rows/cols distinct within one tap
                    continue
                for g in range(groups):
                    oc, ic = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
                    if dw is not None:
                        dw[oc, q, p, :] += np.einsum("jio,jic->oc", em[..., oc], tap[..., ic])
                    ds[n][rows, cols, ic] += np.einsum("jio,oc->jic", e_in[..., oc], w[oc, q, p, :])
    return ds, dw, db


# -- 2. convolution transpose (§12, §13) -----------------------------------------------------


def torch_conv_transpose_equivalent(weights_ohwi: Any, padding: Any, kernel_size: Any = None, dilation: Any = 1, groups: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """§12.2 "Equivalence recipe": MPS transpose weights ``W`` (OHWI) → PyTorch
    ``conv_transpose2d`` weights ``wt [Cin][Cout/g][kH][kW]`` with
    ``W[o][q][p][c] = wt[c][o][kH−1−q][kW−1−p]`` (per group), and the MPS ``kernelOffset``
    ``(P_x − (kWd − 1) + (kWd >> 1), P_y − (kHd − 1) + (kHd >> 1))`` that makes
    ``convolution_transpose_forward(x, W, offset=0, kernel_offset=...)`` equal
    ``conv_transpose2d(x, wt, stride=s, padding=P, dilation=d, output_padding=op, groups=g)``
    on a destination of width ``(Ws−1)·s − 2P + kWd + op``. ``padding``, ``kernel_size``
    and ``dilation`` are ints or ``(x, y)`` pairs (``kernel_size`` only checked)."""
    w = _f64(weights_ohwi)
    cout, kh, kw, cin_g = w.shape
    if kernel_size is not None and _pair(kernel_size, "kernel_size") != (kw, kh):
        raise ValueError(f"kernel_size {kernel_size!r} does not match weights (kW={kw}, kH={kh})")
    (px, py), (dx, dy) = _pair(padding, "padding"), _pair(dilation, "dilation")
    cout_g = cout // groups
    wt = np.zeros((cin_g * groups, cout_g, kh, kw))
    for g in range(groups):
        wt[g * cin_g:(g + 1) * cin_g] = w[g * cout_g:(g + 1) * cout_g, ::-1, ::-1, :].transpose(3, 0, 1, 2)
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    return wt, (px - (kwd - 1) + (kwd >> 1), py - (khd - 1) + (khd >> 1))


def convolution_transpose_forward(
    src: Any,
    weights: Any,
    bias: Any = None,
    *,
    dest: Any = None,
    dest_shape: Any = None,
    offset: Any = (0, 0, 0),
    kernel_offset: Any = (0, 0),
    stride: Any = (1, 1),
    dilation: Any = (1, 1),
    groups: int = 1,
    clip_rect: Any = None,
    dst_c_off: int = 0,
    src_c_off: int = 0,
    batch_norm: Any = None,
    neuron: Any = None,
) -> np.ndarray:
    """``MPSCNNConvolutionTranspose`` forward (convolution.md §12.2).

    ``Z`` = source with ``sX − 1`` / ``sY − 1`` zeros inserted; ``tx = offset.x·sX +
    kernelOffsetX`` (``ty`` likewise); unit-stride correlation **without** kernel rotation::

        acc(o) = Σ_{q,p,c} W[o][q][p][c] · Z(offset.z + m, tx + i − (kWd>>1) + p·dX, ty + j − (kHd>>1) + q·dY, G(o)·Cin_g + c)
        D[clip.z + m, y, x, cd0 + o] = f(bn(acc(o) + b[o]))

    ``i, j`` relative to the clip origin; ``Z`` reads 0 outside the zero-inserted image.
    Returns a copy of ``dest`` (or zeros of ``dest_shape``) with the clip region written.
    """
    s, w = _f64(src), _f64(weights)
    cin, cout = _check_weights(w, groups, False)
    ns, _, _, cs = s.shape
    if src_c_off < 0 or src_c_off + cin > cs:
        raise ValueError(f"source has {cs} channels, need src_c_off + Cin = {src_c_off} + {cin}")
    out = _dest(dest, dest_shape)
    if dst_c_off < 0 or dst_c_off + cout > out.shape[3]:
        raise ValueError(f"destination has {out.shape[3]} channels, need dst_c_off + {cout}")
    (sx, sy), (dx, dy) = _pair(stride, "stride"), _pair(dilation, "dilation")
    kox, koy = _pair(kernel_offset, "kernel_offset")
    ox, oy, oz = _xyz(offset)
    tx, ty = ox * sx + kox, oy * sy + koy
    kh, kw = w.shape[1:3]
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    rx, ry, rz, x0, x1, y0, y1, z0, z1 = _effective(out.shape, ns, oz, clip_rect)
    if x1 == x0 or y1 == y0:
        return out
    ii, jj = np.arange(x0, x1) - rx, np.arange(y0, y1) - ry
    for nd in range(z0, z1):
        img = s[oz + nd - rz, :, :, src_c_off:src_c_off + cin]

        def sample(us: np.ndarray, vs: np.ndarray, img: np.ndarray = img) -> np.ndarray:
            return _read_zero_inserted(img, us, vs, sx, sy)

        acc = _accumulate(sample, w, tx + ii - (kwd >> 1), ty + jj - (khd >> 1), (dx, dy), groups, False)
        out[nd, y0:y1, x0:x1, dst_c_off:dst_c_off + cout] = _post(acc, bias, batch_norm, neuron)
    return out


def convolution_transpose_gradient(
    E: Any,
    src: Any,
    weights: Any,
    *,
    offset: Any = (0, 0, 0),
    kernel_offset: Any = (0, 0),
    stride: Any = (1, 1),
    dilation: Any = (1, 1),
    groups: int = 1,
    src_c_off: int = 0,
    src_shape: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``MPSCNNConvolutionTransposeGradient`` (convolution.md §13.2, adjoint of §12.2).

    ``E`` ``[M, He, We, Cout]`` over the transpose's output region (indexed from 0), image
    ``m`` ↔ source image ``offset.z + m``; ``Z`` the zero-inserted source::

        dW[o][q][p][c] = Σ_n Σ_{i,j} E(n,i,j,o) · Z(n, tx + i − (kWd>>1) + p·dX, ty + j − (kHd>>1) + q·dY, G(o)·Cin_g + c)
        db[o]          = Σ_n Σ_{i,j} E(n,i,j,o)
        dS(n, a, b, G·Cin_g + c) = Σ_{o∈G} Σ_{q,p} Σ_{(i,j): Z position = (a·sX, b·sY)} E(n,i,j,o) · W[o][q][p][c]

    Returns ``(dS [Ns, Hs, Ws, Cin], dW [Cout][kH][kW][Cin/g], db [Cout])``; ``src`` may be
    None (then ``src_shape`` is required and dW is None).
    """
    e, w = _f64(E), _f64(weights)
    cin, cout = _check_weights(w, groups, False)
    if e.ndim != 4 or e.shape[3] != cout:
        raise ValueError(f"E must be [M, He, We, Cout={cout}], got shape {e.shape}")
    s = None if src is None else _f64(src)
    shape = _source_shape(s, src_shape)
    ns, hs, ws = shape[:3]
    (sx, sy), (dx, dy) = _pair(stride, "stride"), _pair(dilation, "dilation")
    kox, koy = _pair(kernel_offset, "kernel_offset")
    ox, oy, oz = _xyz(offset)
    kh, kw = w.shape[1:3]
    tx = ox * sx + kox - (((kw - 1) * dx + 1) >> 1)  # Z column of tap p = 0 for i = 0
    ty = oy * sy + koy - (((kh - 1) * dy + 1) >> 1)
    m_count, he, we = e.shape[:3]
    if oz + m_count > ns:
        raise ValueError(f"E has {m_count} images but the source has only {ns - oz} from offset.z")
    ds = np.zeros((ns, hs, ws, cin))
    dw = None if s is None else np.zeros_like(w)
    db = e.sum(axis=(0, 1, 2))
    cin_g, cout_g = cin // groups, cout // groups
    for m in range(m_count):
        n = oz + m
        em = e[m]
        for q in range(kh):
            for p in range(kw):
                us, vs = tx + np.arange(we) + p * dx, ty + np.arange(he) + q * dy
                okx = (us % sx == 0) & (us >= 0) & (us // sx < ws)
                oky = (vs % sy == 0) & (vs >= 0) & (vs // sy < hs)
                e_in = em[np.ix_(oky, okx)]
                rows, cols = (vs[oky] // sy)[:, None], (us[okx] // sx)[None, :]
                if dw is not None and s is not None:
                    z = _read_zero_inserted(s[n, :, :, src_c_off:src_c_off + cin], us, vs, sx, sy)
                for g in range(groups):
                    oc, ic = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
                    if dw is not None:
                        dw[oc, q, p, :] += np.einsum("jio,jic->oc", em[..., oc], z[..., ic])
                    ds[n][rows, cols, ic] += np.einsum("jio,oc->jic", e_in[..., oc], w[oc, q, p, :])
    return ds, dw, db


# -- 3. fully connected (§14) ----------------------------------------------------------------


def _fc_weights(weights_fc: Any, weight_order: str) -> np.ndarray:
    """FC weights as ``[Cout][W][H][Cin]`` (§14.1; ``weight_order="HW"`` reads the
    conflicting ``[Cout][H][W][Cin]`` reading of §16 row 2)."""
    w = _f64(weights_fc)
    if w.ndim != 4:
        raise ValueError(f"FC weights must be 4-D, got shape {w.shape}")
    if weight_order == "WH":
        return w
    if weight_order == "HW":
        return w.transpose(0, 2, 1, 3)
    raise ValueError(f"weight_order must be 'WH' or 'HW', got {weight_order!r}")


def fully_connected_forward(
    src: Any,
    weights_fc: Any,
    bias: Any = None,
    *,
    dest: Any = None,
    src_c_off: int = 0,
    dst_c_off: int = 0,
    batch_norm: Any = None,
    neuron: Any = None,
    weight_order: str = "WH",
) -> np.ndarray:
    """``MPSCNNFullyConnected`` (convolution.md §14.1)::

        acc(o) = Σ_{x<Ws} Σ_{y<Hs} Σ_{c<Cin} Wfc[o][x][y][c] · S(n, x, y, cs0 + c)
        D[n, 0, 0, cd0 + o] = f(bn(acc(o) + b[o]))

    Weights ``[Cout][Ws][Hs][Cin]`` (W before H); ``weight_order="HW"`` is the switch for
    the conflicting ``[Cout][Hs][Ws][Cin]`` reading. Returns ``[N, 1, 1, cd0 + Cout]``
    (zeros outside the written channels) or a copy of ``dest`` with pixel (0, 0) written.
    """
    s = _f64(src)
    w = _fc_weights(weights_fc, weight_order)
    cout, kw, kh, cin = w.shape
    n, hs, ws, cs = s.shape
    if (kw, kh) != (ws, hs):
        raise ValueError(f"FC kernel {kw}x{kh} must equal the source size {ws}x{hs}")
    if src_c_off < 0 or src_c_off + cin > cs:
        raise ValueError(f"source has {cs} channels, need src_c_off + Cin = {src_c_off} + {cin}")
    out = _dest(dest, None if dest is not None else (n, 1, 1, dst_c_off + cout))
    acc = np.einsum("oxyc,nyxc->no", w, s[..., src_c_off:src_c_off + cin])
    out[:n, 0, 0, dst_c_off:dst_c_off + cout] = _post(acc, bias, batch_norm, neuron)
    return out


def fully_connected_gradient(E: Any, src: Any, weights_fc: Any, *, src_c_off: int = 0, weight_order: str = "WH") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MPSCNNFullyConnectedGradient`` (convolution.md §14.2), ``E`` = ``[N, 1, 1, Cout]``
    or ``[N, Cout]``::

        dW[o][x][y][c] = Σ_n E(n,o) · S(n, x, y, cs0 + c)     (layout of the FC weights)
        db[o]          = Σ_n E(n,o)
        dS(n, x, y, c) = Σ_o E(n,o) · Wfc[o][x][y][c]

    Returns ``(dS [N, Hs, Ws, Cin], dW (same layout/order as given), db [Cout])``."""
    s, e = _f64(src), _f64(E)
    e = e.reshape(e.shape[0], e.shape[-1])
    w = _fc_weights(weights_fc, weight_order)
    cin = w.shape[3]
    x = s[..., src_c_off:src_c_off + cin]
    dw = np.einsum("no,nyxc->oxyc", e, x)
    ds = np.einsum("no,oxyc->nyxc", e, w)
    if weight_order == "HW":
        dw = dw.transpose(0, 2, 1, 3)
    return ds, dw, e.sum(axis=0)


# -- 4. binary convolution (§15) -------------------------------------------------------------


def pack_binary_weights(signs_or_bits: Any) -> np.ndarray:
    """``[Cout][kH][kW][Cin]`` of signs (±1) or bits (0/1) → uint32
    ``[Cout][kH][kW][ceil(Cin/32)]`` (§15.2): bit ``t`` (value ``1 << t``) of word ``w`` is
    input channel ``32·w + t``; a value ``> 0`` is bit 1, anything else bit 0; unused bits 0."""
    v = np.asarray(signs_or_bits)
    *lead, cin = v.shape
    words = np.zeros(tuple(lead) + ((cin + 31) // 32,), dtype=np.uint64)
    for f in range(cin):
        words[..., f // 32] |= (v[..., f] > 0).astype(np.uint64) << np.uint64(f % 32)
    return words.astype(np.uint32)


def unpack_binary_weights(words: Any, cin: int) -> np.ndarray:
    """Inverse of :func:`pack_binary_weights`: bits ``[..., Cin]`` in {0, 1} (int64); bits of
    channels ``>= Cin`` in the last word are ignored (§15.2, inferred)."""
    u = np.asarray(words).astype(np.uint64)
    if u.shape[-1] * 32 < cin:
        raise ValueError(f"{u.shape[-1]} words hold fewer than Cin = {cin} channels")
    f = np.arange(cin)
    return ((u[..., f // 32] >> (f % 32).astype(np.uint64)) & np.uint64(1)).astype(np.int64)


def _binary_type(t: Any) -> int:
    if isinstance(t, str):
        if t not in BINARY_TYPES:
            raise ValueError(f"binary convolution type {t!r} not in {sorted(BINARY_TYPES)}")
        return BINARY_TYPES[t]
    if int(t) not in BINARY_TYPES.values():
        raise ValueError(f"binary convolution type {t!r} must be 0, 1 or 2")
    return int(t)


def _per_channel(v: Any, n: int, default: float, name: str) -> np.ndarray:
    if v is None:
        return np.full(n, default)
    a = _f64(v)
    if a.ndim == 0:
        return np.full(n, float(a))
    if a.size != n:
        raise ValueError(f"`{name}` needs {n} values, got {a.size}")
    return a.reshape(n)


def binary_convolution_forward(
    src: Any,
    weights_u32: Any,
    *,
    kernel: Any,
    cin: int,
    cout: int,
    type: Any = "binaryWeights",
    flags: int = 0,
    output_scale: Any = None,
    output_bias: Any = None,
    input_scale: Any = None,
    input_bias: Any = None,
    offset: Any = (0, 0, 0),
    stride: Any = (1, 1),
    edge_mode: Any = "zero",
    neuron: Any = None,
    dest_shape: Any = None,
    dest: Any = None,
    clip_rect: Any = None,
    src_c_off: int = 0,
    dst_c_off: int = 0,
) -> np.ndarray:
    """``MPSCNNBinaryConvolution`` (convolution.md §15.2). ``kernel = (kW, kH)``; window
    placement as §1 with dilation 1; per output pixel and input channel ``f``::

        x'(f) = (S̃(f) + inputBias[f]) · inputScale[f]      bin(v) = v < 0 ? −1 : +1
        wsign = bit ? +1 : −1
        binaryWeights (0): acc = Σ x'·wsign      XNOR (1): acc = Σ bin(x')·wsign
        AND (2):           acc = Σ [x' ≥ 0]·bit
        out(o) = acc(o)·scale[o]·β(x, y) + outBias[o];  D = f_neuron(out)

    With ``flags & 1`` (UseBetaScaling): ``A = mean_c |x'|`` on the source grid and
    ``β`` = mean of ``A`` over the ``kW × kH`` window (read with the edge mode: zero → 0
    off-image); otherwise ``β = 1``. ``output_scale``/``output_bias`` scalar or ``[Cout]``
    (None → 1 / 0); ``input_scale``/``input_bias`` scalar or ``[Cin]`` (None → 1 / 0).
    """
    s = _f64(src)
    kind = _binary_type(type)
    kw, kh = _pair(kernel, "kernel")
    u = np.asarray(weights_u32)
    if u.shape != (cout, kh, kw, (cin + 31) // 32):
        raise ValueError(f"binary weights must be [Cout][kH][kW][ceil(Cin/32)] = {(cout, kh, kw, (cin + 31) // 32)}, got {u.shape}")
    bits = unpack_binary_weights(u, cin).astype(np.float64)  # [Cout][kH][kW][Cin]
    wsign = 2.0 * bits - 1.0
    ns, _, _, cs = s.shape
    if src_c_off < 0 or src_c_off + cin > cs:
        raise ValueError(f"source has {cs} channels, need src_c_off + Cin = {src_c_off} + {cin}")
    out = _dest(dest, dest_shape)
    if dst_c_off < 0 or dst_c_off + cout > out.shape[3]:
        raise ValueError(f"destination has {out.shape[3]} channels, need dst_c_off + {cout}")
    oscale = _per_channel(output_scale, cout, 1.0, "output_scale")
    obias = _per_channel(output_bias, cout, 0.0, "output_bias")
    iscale = _per_channel(input_scale, cin, 1.0, "input_scale")
    ibias = _per_channel(input_bias, cin, 0.0, "input_bias")
    (sx, sy), mode = _pair(stride, "stride"), _edge(edge_mode)
    ox, oy, oz = _xyz(offset)
    rx, ry, rz, x0, x1, y0, y1, z0, z1 = _effective(out.shape, ns, oz, clip_rect)
    if x1 == x0 or y1 == y0:
        return out
    lefts = ox + (np.arange(x0, x1) - rx) * sx - (kw >> 1)
    tops = oy + (np.arange(y0, y1) - ry) * sy - (kh >> 1)
    for nd in range(z0, z1):
        img = s[oz + nd - rz, :, :, src_c_off:src_c_off + cin]
        acc = np.zeros((len(tops), len(lefts), cout))
        beta = np.zeros((len(tops), len(lefts)))
        a_img = np.mean(np.abs((img + ibias) * iscale), axis=-1, keepdims=True)  # A(x, y), [H, W, 1]
        for q in range(kh):
            for p in range(kw):
                xp = (_read(img, lefts + p, tops + q, mode) + ibias) * iscale  # x', [B, A, Cin]
                if kind == 0:
                    acc += np.einsum("bac,oc->bao", xp, wsign[:, q, p])
                elif kind == 1:
                    acc += np.einsum("bac,oc->bao", np.where(xp < 0, -1.0, 1.0), wsign[:, q, p])
                else:
                    acc += np.einsum("bac,oc->bao", (xp >= 0).astype(np.float64), bits[:, q, p])
                beta += _read(a_img, lefts + p, tops + q, mode)[..., 0]
        beta = beta / (kw * kh) if flags & USE_BETA_SCALING else np.ones_like(beta)
        res = acc * oscale * beta[..., None] + obias
        out[nd, y0:y1, x0:x1, dst_c_off:dst_c_off + cout] = _apply_neuron(res, neuron)
    return out


def binary_fully_connected_forward(
    src: Any,
    weights_u32: Any,
    *,
    cin: int,
    cout: int,
    type: Any = "binaryWeights",
    flags: int = 0,
    output_scale: Any = None,
    output_bias: Any = None,
    input_scale: Any = None,
    input_bias: Any = None,
    neuron: Any = None,
    src_c_off: int = 0,
) -> np.ndarray:
    """``MPSCNNBinaryFullyConnected`` (convolution.md §15.3): §15.2 with the window covering
    the whole source (``kW = Ws``, ``kH = Hs``, first tap at (0, 0)); bit layout
    ``[Cout][kH][kW][ceil(Cin/32)]`` (H before W, unlike §14.1). Returns ``[N, 1, 1, Cout]``."""
    s = _f64(src)
    n, hs, ws, _ = s.shape
    return binary_convolution_forward(
        s, weights_u32, kernel=(ws, hs), cin=cin, cout=cout, type=type, flags=flags,
        output_scale=output_scale, output_bias=output_bias, input_scale=input_scale, input_bias=input_bias,
        offset=(ws >> 1, hs >> 1, 0), stride=(1, 1), edge_mode="zero", neuron=neuron,
        dest_shape=(n, 1, 1, cout), src_c_off=src_c_off,
    )


# -- 5. weight helpers (§3.2, §5.2) -----------------------------------------------------------


def quantize_linear_uint8(w: Any, ranges: Any) -> np.ndarray:
    """Nearest 8-bit code of ``w`` under §5.2 Linear quantization: ``u = round((w − min) /
    (max − min) · 255)`` clipped to [0, 255], per output channel (first axis of ``w``;
    ``ranges`` ``[Cout][2]`` = (min, max)). A channel with ``max == min`` gets 0."""
    a = _f64(w)
    r = _f64(ranges).reshape(a.shape[0], 2)
    shape = (a.shape[0],) + (1,) * (a.ndim - 1)
    lo, hi = r[:, 0].reshape(shape), r[:, 1].reshape(shape)
    span = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(span != 0, (a - lo) / np.where(span != 0, span, 1.0), 0.0)
    return np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)


def dequantize_uint8(u: Any, ranges: Any = None, lut: Any = None) -> np.ndarray:
    """§5.2: Linear ``w = (u/255)·(max[o] − min[o]) + min[o]`` (``o`` = first axis of ``u``,
    ``ranges`` ``[Cout][2]``) or LookupTable ``w = lut[u]`` (256 values shared by all
    channels). Exactly one of ``ranges`` / ``lut`` must be given."""
    codes = np.asarray(u).astype(np.int64)
    if (ranges is None) == (lut is None):
        raise ValueError("give exactly one of `ranges` (Linear) or `lut` (LookupTable)")
    if lut is not None:
        table = _f64(lut).reshape(-1)
        if table.size != 256:
            raise ValueError(f"lookup table needs 256 entries, got {table.size}")
        return table[codes]
    r = _f64(ranges).reshape(codes.shape[0], 2)
    shape = (codes.shape[0],) + (1,) * (codes.ndim - 1)
    lo, hi = r[:, 0].reshape(shape), r[:, 1].reshape(shape)
    return codes / 255.0 * (hi - lo) + lo


def fold_batch_norm(weights: Any, bias: Any, mean: Any, variance: Any, gamma: Any, beta: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """§3.2: ``I = gamma/sqrt(variance + eps)``, ``J = beta − I·mean``, ``W' = W·I[o]``,
    ``b' = b·I + J`` (``b`` None → 0; None arrays → mean 0, variance 1, gamma 1, beta 0).
    ``o`` is the first axis of ``weights`` (any of the OHWI / depthwise / FC layouts)."""
    w = _f64(weights)
    cout = w.shape[0]
    i_, j_ = _bn_coefficients((mean, variance, gamma, beta, eps), cout)
    b = np.zeros(cout) if bias is None else _f64(bias).reshape(cout)
    return w * i_.reshape((cout,) + (1,) * (w.ndim - 1)), b * i_ + j_
