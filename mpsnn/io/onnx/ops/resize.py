"""Resampling and slicing operators: Resize, Upsample, Pad, Slice, Split.

**Resize / Upsample** resample the H and W axes of an ``(N, C, H, W)`` image (or the L axis of
``(N, C, L)``); the scale on N and C must be 1. Per resampled axis of input length ``L``, ONNX
(reference ``onnx.reference.ops.op_resize``) uses a scale ``s`` and an output length ``O``:
``scales`` given: ``s`` the (float32) scale, ``O = floor(s·L)``; ``sizes`` given: ``O`` the
size, ``s = O / L`` (with ``keep_aspect_ratio_policy`` not_larger / not_smaller: one ``s``,
the min / max over the axes, and ``O = round_half_up(s·L)``). An axis with ``s`` close to 1
and ``O = L`` is left alone (as the reference does). Output index ``i`` reads source
coordinate ``x(i)`` by ``coordinate_transformation_mode`` (``Of = s·L``)::

    half_pixel            (i + 0.5)/s - 0.5        asymmetric     i/s
    pytorch_half_pixel    half_pixel, -0.5 if Of == 1
    align_corners         i·(L - 1)/(Of - 1), 0 if Of == 1
    half_pixel_symmetric  off + (i + 0.5)/s - 0.5, off = L/2·(1 - O/Of)
    tf_half_pixel_for_nn  (i + 0.5)/s

Upsample (opset 9) and Resize-10 use ``asymmetric``; their nearest rounding and output
length are onnxruntime's (ONNX has no reference for them): ``floor(x)`` when ``s >= 1``,
``ceil(x)`` when down-scaling, ``O = floor(s·L)`` in float32. Samples outside ``[0, L - 1]``
read the edge pixel.

Two cases where ONNX's reference and onnxruntime disagree are refused (give ``sizes``): (1)
``align_corners`` with ``scales`` where ``s·L`` is not an integer (the reference and the
ONNX text divide by ``s·L - 1``; onnxruntime and PyTorch by ``O - 1``; for linear, a product
within float32 rounding of an integer, such as ``0.6·5``, is accepted and follows the
reference, the two then differ by ~1e-7 relative; for nearest such a difference can move a
coordinate across a rounding boundary, so only exact integers pass); (2) ``scales`` whose
``floor(s·L)`` differs between float64 (the reference) and float32 (onnxruntime), e.g.
``1.4·5``.

* **nearest** is a gather: ``in[clamp(round(x(i)), 0, L - 1)]``, ``round`` by ``nearest_mode``
  (an integral ``x`` is itself). Where that index is ``floor(i / k)`` on both axes for integer
  factors ``k = O / L`` it is ``MPSCNNUpsamplingNearestNode``: the index is computed for the
  node's sizes and compared. By the math, with ``i = k·q + r``, ``0 <= r < k``:
  asymmetric + floor gives ``q`` for every k; asymmetric + round_prefer_floor for k <= 2 only
  (``r/k > 0.5`` rounds up); half_pixel / pytorch_half_pixel / half_pixel_symmetric (integer
  k) + round_prefer_floor / round_prefer_ceil give ``q`` for every k (``x = q + (2r + 1 - k)/(2k)``
  lies strictly within 0.5 of q); tf_half_pixel_for_nn + floor gives ``q`` (``0 < x - q < 1``);
  align_corners + round_prefer_floor / round_prefer_ceil gives ``q`` for k = 2 (``x(2q) = q -
  q/(2L - 1)``, ``x(2q + 1) = q + (L - 1 - q)/(2L - 1)``) and for larger k only for some L;
  half_pixel + floor / ceil do not (for k > 1 and L > 1). Every other nearest resize
  (non-integer factors, down-scaling, the combinations that differ) is an exact gather of the
  source (a pending data movement of :mod:`mpsnn.io.onnx.importer`).
* **linear**: ``x(i)`` is affine in ``i``. ``MPSCNNUpsamplingBilinear`` samples ``u = min(i/k,
  L - 1)`` (align_corners False) or ``u = i·(L - 1)/(k·L - 1)`` (True) with both taps clamped
  into the image, which is ONNX's ``asymmetric`` / ``align_corners`` for integer factors
  ``k = s`` (its clamp at ``L - 1`` reads the edge as ONNX's edge padding does): those map
  to ``MPSCNNUpsamplingBilinearNode``. Every other linear resize maps to
  ``MPSNNBilinearScaleNode`` (MPSImageBilinearScale, no prefilter, taps clamped into the
  image) with a fixed ``MPSScaleTransform``: its sample is ``u = (i + 0.5 - t)/σ - 0.5``,
  so ``x(i) = A·i + B`` needs ``σ = 1/A``, ``t = 0.5 - (B + 0.5)·σ`` (half_pixel: ``σ = s``,
  ``t = 0``, the same expression as ONNX's; ``A = 0``, one output pixel or one input pixel:
  ``σ = 1``, ``t = -B``). Plain bilinear down-scaling is ONNX's linear without antialias.
  ``exclude_outside=1`` does not change a linear resize (the one off-image tap is next to an
  edge tap of the same value), so it is accepted there.
* Refused before any work (``check``): mode cubic (MPS has no bicubic filter), antialias=1,
  exclude_outside=1 with nearest or cubic, tf_crop_and_resize (extrapolation outside the roi),
  unknown modes. At mapping: ``scales`` / ``sizes`` computed by the graph, a scale other
  than 1 on N or C, spatial sizes not known at load time. ``roi`` is never read (it only
  matters for tf_crop_and_resize).

**Pad** (opset 2 attributes; opset 11+ inputs ``pads``, ``constant_value``, ``axes`` (18)) ->
``MPSNNPadNode``, which pads x, y and feature channels with one edge mode: constant -> the
edge mode ``constant`` with ``fill_value`` (``zero`` for 0), reflect -> ``mirror`` (period
``2(L - 1)``, NumPy's reflect also for pads of ``L`` or more), edge -> ``clamp``. wrap (opset
19; MPS has no periodic edge mode) is an exact gather. Pads on N must be 0. Negative pads
crop first (a gather), then the positive pads apply to the cropped tensor (onnxruntime's
order; ONNX's reference has no negative pads).

**Slice** (opset 1 attributes, opset 10+ constant inputs ``starts``, ``ends``, ``axes``,
``steps``) and **Split** (opset 2 attribute ``split``, opset 13 input, opset 18
``num_outputs``; an uneven split gives the last part fewer, as the reference does) along
channels, H or W are exact gathers kept pending on their source (NumPy slicing has ONNX's
clamping rules). Along the batch only a whole-range slice is accepted (start 0, step 1, end
at least the load-time batch stand-in: an unknown batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ....core.enums import MPSImageEdgeMode
from ....core.errors import MPSValueError
from ....core.structs import MPSImageCoordinate, MTLSize
from ....graph.nodes.resampling import (
    MPSCNNUpsamplingBilinearNode,
    MPSCNNUpsamplingNearestNode,
    MPSImageTransformProvider,
    MPSNNBilinearScaleNode,
    MPSNNPadNode,
)
from ....kernels.resampling import MPSScaleTransform
from ..importer import describe as _d
from ..layout import Value, standard_axes
from .registry import ints, op, string

_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


# -- Resize / Upsample ------------------------------------------------------------------------------------

def _resize_check(a: dict[str, Any], opset: int) -> str | None:
    mode = string(a, "mode", "nearest")
    if mode == "cubic":
        return "mode='cubic' (MPS has no bicubic resampling)"
    if mode not in ("nearest", "linear"):
        return f"mode={mode!r} (supported: 'nearest', 'linear')"
    ctm = string(a, "coordinate_transformation_mode", "half_pixel")
    if ctm == "tf_crop_and_resize":
        return "coordinate_transformation_mode='tf_crop_and_resize' (it extrapolates outside the roi; MPS's resampling clamps to the image)"
    if ctm not in _COORDINATE_MODES:
        return f"coordinate_transformation_mode={ctm!r} (supported: {', '.join(repr(m) for m in _COORDINATE_MODES)})"
    nm = string(a, "nearest_mode", "round_prefer_floor")
    if nm not in _NEAREST_MODES:
        return f"nearest_mode={nm!r} (supported: {', '.join(repr(m) for m in _NEAREST_MODES)})"
    if int(a.get("antialias", 0)):
        return "antialias=1 (MPS's bilinear resampling has no anti-aliasing prefilter)"
    if int(a.get("exclude_outside", 0)) and mode != "linear":
        return f"exclude_outside=1 with mode={mode!r} (an excluded nearest tap gives 0; MPS reads the edge pixel)"
    policy = string(a, "keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        return f"keep_aspect_ratio_policy={policy!r}"
    return None


def _upsample_check(a: dict[str, Any], opset: int) -> str | None:
    mode = string(a, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        return f"mode={mode!r} (supported: 'nearest', 'linear')"
    return None


@dataclass
class _Axis:
    """One resampled axis: input length, output length, ONNX's scale and ``Of = s·L``."""

    length: int
    out: int
    scale: float

    @property
    def out_f(self) -> float:
        return self.scale * self.length

    @property
    def identity(self) -> bool:
        return self.out == self.length and math.isclose(self.scale, 1.0)

    def factor(self) -> int | None:
        """The integer factor ``k`` with ``O = k·L`` and ``s = k`` exactly (1 for an axis left
        alone), else None."""
        if self.identity:
            return 1
        if self.out % self.length or self.scale != self.out // self.length:
            return None
        return self.out // self.length


def _const_or_none(imp: Any, node: Any, k: int, what: str) -> np.ndarray | None:
    c = imp.const(node, k, what, optional=True) if len(node.input) > k else None
    if c is None or np.asarray(c).size == 0:
        return None
    return np.asarray(c).reshape(-1)


def _resize_axes(imp: Any, node: Any, a: dict[str, Any], x: Value, legacy: bool) -> list[_Axis]:
    """The (H, W) axes of a Resize / Upsample (H of length 1 for a rank-3 input)."""
    from ..importer import BATCH_SENTINEL
    rank = x.rank
    if rank not in (3, 4):
        raise MPSValueError(f"{_d(node)}: input {x.name!r} has shape {x.shape}; MPS resamples (N, C, H, W) or (N, C, L) images")
    scales: np.ndarray | None
    sizes: np.ndarray | None
    if legacy:
        # Upsample-7 and -8 give the scales as an attribute, Upsample-9 and Resize-10 as input 1
        scales = np.asarray(a["scales"] if "scales" in a else imp.const(node, 1, "scales"), np.float32).reshape(-1)
        sizes = None
    else:
        scales = _const_or_none(imp, node, 2, "scales")
        sizes = _const_or_none(imp, node, 3, "sizes")
        if (scales is None) == (sizes is None):
            raise MPSValueError(f"{_d(node)}: exactly one of the inputs scales and sizes must be given (non-empty)")
    axes = [int(v) for v in a["axes"]] if "axes" in a else list(range(rank))
    axes = [v + rank if v < 0 else v for v in axes]
    given = scales if scales is not None else sizes
    assert given is not None
    if len(given) != len(axes):
        raise MPSValueError(f"{_d(node)}: {'scales' if sizes is None else 'sizes'} has {len(given)} values for {len(axes)} axes")
    for d in range(2, rank):
        if x.shape[d] is None:
            raise MPSValueError(f"{_d(node)}: the spatial size of {x.name!r} ({x.shape}) must be known at load time")
    length = [1 if d < 2 and x.shape[d] is None else int(x.shape[d]) for d in range(rank)]
    scale = [1.0] * rank
    out = list(length)
    if sizes is not None:
        for d, v in zip(axes, sizes):
            v = int(v)
            if d == 0 and (v == BATCH_SENTINEL or (x.shape[0] is not None and v == x.shape[0])):
                continue  # the batch, unchanged
            if d < 2 and x.shape[d] is None:
                raise MPSValueError(f"{_d(node)}: sizes[{d}] = {v} for dimension {d} of unknown length; MPS resamples H and W only")
            out[d] = v
            scale[d] = v / length[d]
        policy = string(a, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            s = min(scale[d] for d in axes) if policy == "not_larger" else max(scale[d] for d in axes)
            for d in axes:
                scale[d] = s
                out[d] = int(s * length[d] + 0.5)
    else:
        assert scales is not None
        ctm = "asymmetric" if legacy else string(a, "coordinate_transformation_mode", "half_pixel")
        for d, v in zip(axes, scales):
            s = float(v)
            if not math.isfinite(s) or s <= 0:
                raise MPSValueError(f"{_d(node)}: scales[{d}] = {s}; scales must be > 0")
            scale[d] = s
            wide = int(math.floor(s * length[d]))  # the reference's float64 product
            narrow = int(np.floor(np.float32(v) * np.float32(length[d])))  # onnxruntime's float32 product
            out[d] = narrow if legacy else wide
            if d < 2 or (out[d] == length[d] and math.isclose(s, 1.0)):
                continue
            if wide != narrow and not legacy:
                raise MPSValueError(f"{_d(node)}: scales[{d}] = {s} on length {length[d]}: the output length floor(s·L) is {wide} in "
                                    f"float64 (ONNX's reference) but {narrow} in float32 (onnxruntime); give sizes instead")
            slack = 1e-6 * max(s * length[d], 1.0) if string(a, "mode", "nearest") == "linear" else 0.0
            if ctm == "align_corners" and abs(s * length[d] - round(s * length[d])) > slack:
                raise MPSValueError(f"{_d(node)}: coordinate_transformation_mode='align_corners' with scales[{d}] = {s} on length "
                                    f"{length[d]}: s·L = {s * length[d]:g} is not an integer, and ONNX's reference divides by "
                                    f"s·L - 1 where onnxruntime and PyTorch divide by the output length {wide} - 1; give sizes instead")
    for d in (0, 1):
        if out[d] != length[d] or scale[d] != 1.0:
            raise MPSValueError(f"{_d(node)}: scale {scale[d]:g} on dimension {d} ({'N' if d == 0 else 'C'}); "
                                "MPS resamples H and W only (the scale on N and C must be 1)")
    for d in range(2, rank):
        if out[d] < 1:
            raise MPSValueError(f"{_d(node)}: dimension {d} of length {length[d]} resizes to {out[d]} (scale {scale[d]:g}); an image needs >= 1 pixel")
    spatial = [_Axis(length[d], out[d], scale[d]) for d in range(2, rank)]
    return ([_Axis(1, 1, 1.0)] if rank == 3 else []) + spatial


def _coordinates(ax: _Axis, ctm: str) -> np.ndarray:
    """ONNX's source coordinate of every output index of one axis (float64, as the reference)."""
    y = np.arange(ax.out, dtype=np.float64)
    if ax.identity:
        return y
    s, n, nf = ax.scale, ax.length, ax.out_f
    if ctm == "align_corners":
        return np.zeros(ax.out) if nf == 1 else y * (n - 1) / (nf - 1)
    if ctm == "asymmetric":
        return y / s
    if ctm == "pytorch_half_pixel":
        return np.full(ax.out, -0.5) if nf == 1 else (y + 0.5) / s - 0.5
    if ctm == "half_pixel":
        return (y + 0.5) / s - 0.5
    if ctm == "half_pixel_symmetric":
        offset = n / 2 * (1 - ax.out / nf)
        return offset + (y + 0.5) / s - 0.5
    if ctm == "tf_half_pixel_for_nn":
        return (y + 0.5) / s
    raise ValueError(f"coordinate_transformation_mode {ctm!r}")


def _nearest_index(ax: _Axis, ctm: str, nearest_mode: str) -> np.ndarray:
    """ONNX's nearest source index of every output index of one axis (``legacy``: Upsample /
    Resize-10, onnxruntime's rounding)."""
    if ax.identity:
        return np.arange(ax.out, dtype=np.int64)
    x = _coordinates(ax, ctm)
    f = np.floor(x)
    r = x - f
    if nearest_mode == "legacy":
        idx = f if ax.scale >= 1 else np.ceil(x)
    elif nearest_mode == "round_prefer_floor":
        idx = np.where(r <= 0.5, f, f + 1)
    elif nearest_mode == "round_prefer_ceil":
        idx = np.where(r < 0.5, f, f + 1)
    elif nearest_mode == "floor":
        idx = f
    else:  # ceil
        idx = np.where(r == 0, f, f + 1)
    return np.clip(idx, 0, ax.length - 1).astype(np.int64)


def _bilinear_transform(ax: _Axis, ctm: str) -> tuple[float, float]:
    """``(scale, translate)`` of MPSScaleTransform along one axis that samples ONNX's
    coordinate ``x(i) = A·i + B`` (module docstring)."""
    if ax.identity:
        return 1.0, 0.0
    s, n, nf = ax.scale, ax.length, ax.out_f
    if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and nf != 1):
        return s, 0.0
    if ctm == "pytorch_half_pixel":
        return 1.0, 0.5  # one output pixel at -0.5
    if ctm == "asymmetric":
        return s, 0.5 - 0.5 * s
    if ctm == "tf_half_pixel_for_nn":
        return s, -0.5 * s
    if ctm == "half_pixel_symmetric":
        offset = n / 2 * (1 - ax.out / nf)
        return s, -offset * s
    if ctm == "align_corners":
        if nf == 1 or n == 1:
            return 1.0, 0.0  # every sample reads x = 0 (one output pixel) or the only pixel
        sigma = (nf - 1) / (n - 1)
        return sigma, 0.5 - 0.5 * sigma
    raise ValueError(f"coordinate_transformation_mode {ctm!r}")


class _FixedTransform(MPSImageTransformProvider):
    """The same MPSScaleTransform for every image."""

    def __init__(self, transform: MPSScaleTransform) -> None:
        self.transform = transform

    def transform_for_source_image(self, image: Any, handle: Any) -> MPSScaleTransform:
        return self.transform


@op("Resize", check=_resize_check)
def resize(imp: Any, node: Any, a: dict[str, Any]) -> None:
    _resample(imp, node, a, legacy=imp.opset < 11)


@op("Upsample", check=_upsample_check)
def upsample(imp: Any, node: Any, a: dict[str, Any]) -> None:
    _resample(imp, node, a, legacy=True)


def _resample(imp: Any, node: Any, a: dict[str, Any], legacy: bool) -> None:
    x = imp.inp(node, 0)
    why = (_upsample_check if legacy else _resize_check)(a, imp.opset)
    if why:  # the check ran already at load; kept for direct calls
        raise MPSValueError(f"{_d(node)}: {why}")
    mode = string(a, "mode", "nearest")
    ctm = "asymmetric" if legacy else string(a, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = "legacy" if legacy else string(a, "nearest_mode", "round_prefer_floor")
    ah, aw = _resize_axes(imp, node, a, x, legacy)
    shape = tuple(x.shape[:2]) + ((ah.out, aw.out) if x.rank == 4 else (aw.out,))
    if mode == "nearest":
        ih, iw = _nearest_index(ah, ctm, nearest_mode), _nearest_index(aw, ctm, nearest_mode)
        kh, kw = ah.out // ah.length, aw.out // aw.length
        mps = (kh >= 1 and kw >= 1 and ah.out == kh * ah.length and aw.out == kw * aw.length
               and np.array_equal(ih, np.arange(ah.out) // kh) and np.array_equal(iw, np.arange(aw.out) // kw))
        if mps and (kh, kw) != (1, 1):
            n: Any = MPSCNNUpsamplingNearestNode(imp.image(x, node), kw, kh)
            n.label = node.name or None
            imp.set_image(node, 0, n.result_image, shape, None, x.dtype)
            return
        rank = x.rank

        def gather(arr: np.ndarray, batch: int) -> np.ndarray:
            out = np.take(arr, iw, axis=rank - 1)
            return np.take(out, ih, axis=2) if rank == 4 else out

        imp.set_pending(node, x, gather, shape, f"{node.op_type} nearest ({ctm}, {nearest_mode})")
        return
    # linear
    if ah.identity and aw.identity:
        from .elementwise import _identity
        _identity(imp, node, x)
        return
    kh_, kw_ = ah.factor(), aw.factor()
    if ctm in ("asymmetric", "align_corners") and kh_ is not None and kw_ is not None:
        n = MPSCNNUpsamplingBilinearNode(imp.image(x, node), kw_, kh_, align_corners=ctm == "align_corners")
    else:
        sx, tx = _bilinear_transform(aw, ctm)
        sy, ty = _bilinear_transform(ah, ctm)
        n = MPSNNBilinearScaleNode(imp.image(x, node), _FixedTransform(MPSScaleTransform(sx, sy, tx, ty)),
                                   MTLSize(aw.out, ah.out, 1))
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, shape, None, x.dtype)


# -- Pad ---------------------------------------------------------------------------------------------------

_PAD_EDGE = {"constant": MPSImageEdgeMode.constant, "reflect": MPSImageEdgeMode.mirror, "edge": MPSImageEdgeMode.clamp}


def _pad_check(a: dict[str, Any], opset: int) -> str | None:
    mode = string(a, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return f"mode={mode!r} (supported: 'constant', 'reflect', 'edge', 'wrap')"
    return None


def _batch_dim(x: Value) -> int | None:
    """The ONNX dimension that holds the batch (None: none does)."""
    if x.pending is not None:
        src = x.pending.source
        return 0 if src.axes and "n" in src.axes and x.rank >= 2 else None
    if x.axes is not None and "n" in x.axes:
        return list(x.axes).index("n")
    return None


@op("Pad", check=_pad_check)
def pad(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    mode = string(a, "mode", "constant")
    rank = x.rank
    if imp.opset < 11:
        raw = ints(a, "pads", [])
        value = float(a.get("value", 0.0))
        axes = list(range(rank))
    else:
        raw = [int(v) for v in np.asarray(imp.const(node, 1, "pads")).reshape(-1)]
        cv = _const_or_none(imp, node, 2, "constant_value")
        value = 0.0 if cv is None else float(cv[0])
        ax = _const_or_none(imp, node, 3, "axes")
        axes = list(range(rank)) if ax is None else [int(v) + rank if int(v) < 0 else int(v) for v in ax]
    if len(raw) != 2 * len(axes):
        raise MPSValueError(f"{_d(node)}: pads has {len(raw)} values for {len(axes)} axes (needs 2 per axis)")
    begin, end = [0] * rank, [0] * rank
    for k, d in enumerate(axes):
        begin[d], end[d] = raw[k], raw[len(axes) + k]
    bd = _batch_dim(x)
    if bd is not None and (begin[bd] or end[bd]):
        raise MPSValueError(f"{_d(node)}: pads ({begin[bd]}, {end[bd]}) on dimension {bd}, the batch; MPS pads x, y and feature channels")
    for d in range(rank):
        if d != bd and (begin[d] < 0 or end[d] < 0) and x.shape[d] is None:
            raise MPSValueError(f"{_d(node)}: negative pads on dimension {d} of unknown length")
    # negative pads crop first (a gather)
    crop = [slice(max(-b, 0), (x.shape[d] - max(-e, 0)) if (e < 0) else None) for d, (b, e) in enumerate(zip(begin, end))]
    cropped_shape = tuple(s if (c.start == 0 and c.stop is None) else len(range(*c.indices(s))) for s, c in zip(x.shape, crop))
    if any(s is not None and s < 1 for s in cropped_shape):
        raise MPSValueError(f"{_d(node)}: pads {raw} crop {x.shape} to nothing")
    pb = [max(b, 0) for b in begin]
    pe = [max(e, 0) for e in end]
    out_shape = tuple(None if s is None else s + p + q for s, p, q in zip(cropped_shape, pb, pe))
    if any(b < 0 or e < 0 for b, e in zip(begin, end)):
        sl = tuple(crop)
        tmp_name = node.output[0] + ":cropped"
        _pending_value(imp, x, tmp_name, lambda arr, batch: arr[sl], cropped_shape, f"Pad crop {raw}")
        x = imp.values[tmp_name]
    if not any(pb) and not any(pe):
        from .elementwise import _identity
        _identity(imp, node, x)
        return
    if mode == "wrap":
        widths = [(p, q) for p, q in zip(pb, pe)]

        def wrap(arr: np.ndarray, batch: int) -> np.ndarray:
            return np.pad(arr, widths, mode="wrap")

        _pending_value(imp, x, node.output[0], wrap, out_shape, f"Pad wrap {raw}")
        return
    std = standard_axes(rank)
    if std is None:
        raise MPSValueError(f"{_d(node)}: input of rank {rank}; images hold tensors of rank 1 to 4")
    by_axis = {ax: (pb[d], pe[d]) for d, ax in enumerate(std)}
    (bx, ex), (by, ey), (bc, ec) = by_axis.get("w", (0, 0)), by_axis.get("h", (0, 0)), by_axis.get("c", (0, 0))
    edge = _PAD_EDGE[mode]
    if mode == "constant" and value == 0.0 and math.copysign(1.0, value) > 0:
        edge = MPSImageEdgeMode.zero  # +0 fill (a -0 fill keeps its sign through the constant mode)
    n = MPSNNPadNode(imp.image(x, node), MPSImageCoordinate(bx, by, bc), MPSImageCoordinate(ex, ey, ec), edge)
    if edge == MPSImageEdgeMode.constant:
        n.fill_value = value
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, out_shape, None, x.dtype)


# -- Slice / Split -----------------------------------------------------------------------------------------

def _pending_value(imp: Any, source: Value, name: str, fn: Callable[[np.ndarray, int], np.ndarray], shape: tuple[Any, ...], what: str) -> None:
    """``imp.values[name]`` = ``fn`` applied to ``source``, kept pending (as
    ``Importer.set_pending`` does for output 0)."""
    from ..importer import Pending
    base = source.pending if isinstance(source.pending, Pending) else Pending(source)
    p = Pending(base.source, [*base.ops, fn], [*base.what, what])
    imp.values[name] = Value(name, tuple(shape), source.dtype, pending=p)


def _whole_batch(s: slice) -> bool:
    from ..importer import BATCH_SENTINEL
    return (s.step in (None, 1)) and (s.start in (None, 0) or s.start <= -BATCH_SENTINEL) and (s.stop is None or s.stop >= BATCH_SENTINEL)


@op("Slice")
def slice_op(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    rank = x.rank
    if imp.opset < 10:
        starts, ends = ints(a, "starts", []), ints(a, "ends", [])
        axes = ints(a, "axes", range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in np.asarray(imp.const(node, 1, "starts")).reshape(-1)]
        ends = [int(v) for v in np.asarray(imp.const(node, 2, "ends")).reshape(-1)]
        ax = _const_or_none(imp, node, 3, "axes")
        st = _const_or_none(imp, node, 4, "steps")
        axes = list(range(len(starts))) if ax is None else [int(v) for v in ax]
        steps = [1] * len(starts) if st is None else [int(v) for v in st]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise MPSValueError(f"{_d(node)}: starts, ends, axes and steps must have one value per sliced axis "
                            f"({len(starts)}, {len(ends)}, {len(axes)}, {len(steps)})")
    slices: list[slice] = [slice(None)] * rank
    for b, e, d, k in zip(starts, ends, axes, steps):
        d = d + rank if d < 0 else d
        if not 0 <= d < rank:
            raise MPSValueError(f"{_d(node)}: axis {d} out of range for rank {rank}")
        if k == 0:
            raise MPSValueError(f"{_d(node)}: steps must not be 0")
        slices[d] = slice(b, e, k)
    bd = _batch_dim(x)
    shape: list[Any] = []
    for d, (sd, n) in enumerate(zip(slices, x.shape)):
        if sd == slice(None):
            shape.append(n)
        elif d == bd:
            if not _whole_batch(sd):
                raise MPSValueError(f"{_d(node)}: slice {sd.start}:{sd.stop}:{sd.step} of dimension {d}, the batch; "
                                    "MPS moves data within images (slice channels, H or W)")
            slices[d] = slice(None)
            shape.append(n)
        elif n is None:
            raise MPSValueError(f"{_d(node)}: dimension {d} of {x.name!r} is not known at load time")
        else:
            shape.append(len(range(*sd.indices(n))))
    if any(v == 0 for v in shape):
        raise MPSValueError(f"{_d(node)}: the slice of {x.shape} is empty ({tuple(shape)}); images cannot be empty")
    sl = tuple(slices)

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        return arr[sl]

    what = "Slice[" + ", ".join(f"{s.start if s.start is not None else ''}:{s.stop if s.stop is not None else ''}"
                                + (f":{s.step}" if s.step not in (None, 1) else "") for s in slices) + "]"
    imp.set_pending(node, x, fn, tuple(shape), what)


@op("Split")
def split(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    rank = x.rank
    axis = int(a.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        raise MPSValueError(f"{_d(node)}: axis {a.get('axis', 0)} out of range for rank {rank}")
    if axis == _batch_dim(x):
        raise MPSValueError(f"{_d(node)}: Split along dimension {axis}, the batch; MPS moves data within images (split channels, H or W)")
    length = x.shape[axis]
    if length is None:
        raise MPSValueError(f"{_d(node)}: dimension {axis} of {x.name!r} is not known at load time")
    if imp.opset < 13:
        parts = ints(a, "split", []) or None
    else:
        c = _const_or_none(imp, node, 1, "split")
        parts = None if c is None else [int(v) for v in c]
    count = len(node.output)
    if parts is None:
        if "num_outputs" in a:
            count = int(a["num_outputs"])
        size = -(-length // count)
        parts = [size] * count
        parts[-1] = length - size * (count - 1)
    if len(parts) != len(node.output) or sum(parts) != length or any(p < 0 for p in parts):
        raise MPSValueError(f"{_d(node)}: split {parts} does not divide length {length} into {len(node.output)} outputs")
    pos = 0
    for k, (name, size) in enumerate(zip(node.output, parts)):
        start, pos = pos, pos + size
        if not name:
            continue
        if size == 0:
            raise MPSValueError(f"{_d(node)}: output {k} ({name!r}) is empty; images cannot be empty")
        sl = tuple(slice(start, pos) if d == axis else slice(None) for d in range(rank))
        shape = tuple(size if d == axis else s for d, s in enumerate(x.shape))

        def fn(arr: np.ndarray, batch: int, sl: tuple[slice, ...] = sl) -> np.ndarray:
            return arr[sl]

        _pending_value(imp, x, name, fn, shape, f"Split axis {axis} [{start}:{pos}]")
