"""Reductions: the MPSNNReduce* kernels over rows, columns and feature channels
(spec/reduce-reshape-slice-concat.md §2-3).

Classes: the unary base :class:`MPSNNReduceUnary` and its 14 subclasses
(``MPSNNReduce{Row,Column,FeatureChannels}{Min,Max,Mean,Sum}``,
``MPSNNReduceFeatureChannelsArgument{Min,Max}``); the binary base
:class:`MPSNNReduceBinary` with :class:`MPSNNReduceFeatureChannelsAndWeightsMean`,
:class:`MPSNNReduceFeatureChannelsAndWeightsSum` and :class:`MPSNNLocalCorrelation`.

Math. ``R = clip_rect_source ∩ source`` (columns ``[x0, x0+w)``, rows ``[y0, y0+h)``,
images ``[z0, z0+d)``); channels ``c`` are the ``Nin`` channels read from
``source_feature_channel_offset`` (kernel-base.md §2.4, padding slots never exist here);
``(ox, oy, oz) = clip_rect.origin``::

    Row*     out[oz+m][oy + (y-y0)][ox][c]      = op_{x in R} X[z0+m][y][x][c]     (C x h x 1)
    Column*  out[oz+m][oy][ox + (x-x0)][c]      = op_{y in R} X[z0+m][y][x][c]     (C x 1 x w)
    FeatureChannels*  out[oz+m][oy+(y-y0)][ox+(x-x0)][dc] = op_c X[z0+m][y][x][c]   (1 x h x w)

``op``: min, max, mean (1/count · Σ), sum (``FeatureChannelsSum``: ``weight · Σ``), argmin /
argmax (the channel index, counted from the first channel read, stored as a float; ties go to
the lowest index). ``dc = destination_feature_channel_offset``.

Binary (primary ``P`` in ``primary_source_clip_rect``, secondary ``Q`` in
``secondary_source_clip_rect``; the two regions must have the same width and height and pixel
``(i, j)`` of one pairs with pixel ``(i, j)`` of the other, same channel ``c``)::

    AndWeightsMean  out = (1/C) Σ_c P[c]·Q[c]
    AndWeightsSum   out = Σ_c P[c]·Q[c]        (do_weighted_sum_by_non_zero_weights: / K,
                                                K = #{c : Q[c] != 0}, 0 where K = 0)
    LocalCorrelation  O[f(m,n)] = Σ_z P[z][y][x] · Q[z][y + N[n]][x + M[m]]

Decisions where the spec is silent (all "(inferred)" there): the output shapes and
placement above; arg ties -> lowest index; NaN propagates through min/max and counts as the
extreme for arg-reductions; ``offset`` (``primary_offset``/``secondary_offset``) is ignored,
``clip_rect_source`` replaces it, including ``origin.z``/``size.depth`` for the images read;
the written block is additionally clipped by ``clip_rect.size`` and the destination bounds
(Apple's clip rule); an empty source region is an error; the auto-sized forms make a result
of exactly the block size (``padding`` is not used); the binary kernels require equal channel
counts (set a ``*_source_feature_channel_max_count`` to pair fewer) and refuse a
``clip_rect`` narrower than 2 or lower than 1 (the header's documented constraint, checked
on the property as set, so that ``MPSRectNoClip`` never trips it). Local correlation:
``f(m, n) = n·(2·window_in_x + 1) + m`` (the header's typo corrected), ``Q`` reads 0 outside
its image. No reduction has a gradient kernel. Arithmetic is float32 (float64 for float64
tensors); results are rounded once to the destination format (arg indices are exact up to
2048 channels in float16 and 256 in bfloat16).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..backends import reduce as backend
from ..core.binary_kernel import MPSCNNBinaryKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import ULONG_MAX, MPSCNNKernel, Region, _typed_property
from ..core.structs import MPSRectNoClip, MTLRegion
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import MPSState
from .results import write_result

__all__ = [
    "MPSNNLocalCorrelation",
    "MPSNNReduceBinary",
    "MPSNNReduceColumnMax",
    "MPSNNReduceColumnMean",
    "MPSNNReduceColumnMin",
    "MPSNNReduceColumnSum",
    "MPSNNReduceFeatureChannelsAndWeightsMean",
    "MPSNNReduceFeatureChannelsAndWeightsSum",
    "MPSNNReduceFeatureChannelsArgumentMax",
    "MPSNNReduceFeatureChannelsArgumentMin",
    "MPSNNReduceFeatureChannelsMax",
    "MPSNNReduceFeatureChannelsMean",
    "MPSNNReduceFeatureChannelsMin",
    "MPSNNReduceFeatureChannelsSum",
    "MPSNNReduceRowMax",
    "MPSNNReduceRowMean",
    "MPSNNReduceRowMin",
    "MPSNNReduceRowSum",
    "MPSNNReduceUnary",
    "reduction_result_size",
    "source_region",
]


# -- pure shape rules -------------------------------------------------------------------------------

def source_region(owner: str, name: str, clip: MTLRegion, width: int, height: int, images: int) -> tuple[int, int, int, int, int, int]:
    """``clip ∩ image`` as ``(z0, count, x0, y0, w, h)``; raises when the origin is negative
    or the intersection is empty."""
    o, s = clip.origin, clip.size
    if o.x < 0 or o.y < 0 or o.z < 0:
        raise value_error(owner, f"{name}.origin", o, "be non-negative")
    w = min(o.x + s.width, width) - o.x
    h = min(o.y + s.height, height) - o.y
    d = min(o.z + s.depth, images) - o.z
    if w <= 0 or h <= 0 or d <= 0:
        raise value_error(owner, name, clip, f"overlap the {images}x{height}x{width} (images x height x width) source",
                          f"an empty region ({max(d, 0)} images, {max(h, 0)}x{max(w, 0)} pixels)")
    return o.z, d, o.x, o.y, w, h


def reduction_result_size(axis: str, width: int, height: int, channels: int) -> tuple[int, int, int]:
    """``(width, height, channels)`` of the result of reducing a ``width x height x channels``
    region along ``axis`` (``"row"``, ``"column"`` or ``"featureChannels"``)."""
    if axis == "row":
        return 1, height, channels
    if axis == "column":
        return width, 1, channels
    if axis == "featureChannels":
        return width, height, 1
    raise ValueError(f"unknown reduction axis {axis!r}")


def _destination_block(owner: str, clip: MTLRegion, dest: MPSImage, block_w: int, block_h: int, count: int) -> tuple[int, int, int, int, int, int]:
    """Where a ``block_w x block_h`` result of ``count`` images lands, clipped by
    ``clip.size`` and the destination: ``(oz, cnt, ox, oy, w, h)`` (sizes may be <= 0)."""
    o, s = clip.origin, clip.size
    if o.x < 0 or o.y < 0 or o.z < 0:
        raise value_error(owner, "clip_rect.origin", o, "be non-negative")
    if o.z >= dest.number_of_images:
        raise value_error(owner, "clip_rect.origin.z", o.z, f"address a destination image in [0, {dest.number_of_images})")
    cnt = min(count, s.depth, dest.number_of_images - o.z)
    return o.z, cnt, o.x, o.y, min(block_w, s.width, dest.width - o.x), min(block_h, s.height, dest.height - o.y)


def _as_float(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise value_error(owner, name, value, "be a real number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise value_error(owner, name, value, "be a real number") from None


# -- unary reductions -------------------------------------------------------------------------------

class MPSNNReduceUnary(MPSCNNKernel):
    """``MPSNNReduceUnary``: base of the one-input reductions (use a subclass).

    Args:
        device: the device (positional, first).

    Properties: ``clip_rect_source`` (:class:`MTLRegion`, default :data:`MPSRectNoClip`): the
    source region reduced (``origin.z``/``size.depth`` select images), intersected with the
    source; it replaces ``offset``, which is ignored. ``clip_rect.origin`` places the result;
    ``source_feature_channel_offset`` / ``source_feature_channel_max_count`` select the
    channels read; ``destination_feature_channel_offset`` the first channel written. The
    other :class:`MPSCNNKernel` properties are inherited (``edge_mode`` has no effect: a
    reduction never reads outside the image).

    Encode forms (inherited): ``encode(cb, source_image, destination_image)``;
    ``encode(cb, source_image)`` returns a new image of exactly the result size (see
    :func:`reduction_result_size`; ``padding`` unused, ``offset`` untouched);
    ``encode_batch(cb, source_images[, destination_images])``. No result state (reductions
    have no gradient kernel): the state forms give ``None`` states.
    """

    _axis = ""
    _op = ""
    _result_state_class = None

    def __init__(self, device: Device | str) -> None:
        if type(self) is MPSNNReduceUnary:
            raise MPSTypeError("MPSNNReduceUnary: initialising the base class is unavailable; use a subclass such as MPSNNReduceRowMax")
        super().__init__(device)
        self._clip_rect_source = MPSRectNoClip

    clip_rect_source = _typed_property("_clip_rect_source", "clip_rect_source", MTLRegion)

    def _result_feature_channels(self, source_channels: int) -> int:
        return reduction_result_size(self._axis, 1, 1, source_channels)[2]

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """The result descriptor: the reduction of ``clip_rect_source ∩ source`` (offset is
        not changed: reductions ignore it)."""
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        _, d, _, _, w, h = source_region(self._name(), "clip_rect_source", self._clip_rect_source, src.width, src.height, src.number_of_images)
        rw, rh, rc = reduction_result_size(self._axis, w, h, self.source_channels_used(src))
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, rw, rh, rc, d)
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        self._check_no_alias(dest, src)
        nin = self.source_channels_used(src)
        nout = self._result_feature_channels(nin)
        if self._dst_c_off + nout > dest.feature_channels:
            raise value_error(self._name(), "destination_image.feature_channels", dest.feature_channels,
                              f"be >= destination_feature_channel_offset + {nout} output channels = {self._dst_c_off + nout}")
        z0, d, x0, y0, w, h = source_region(self._name(), "clip_rect_source", self._clip_rect_source, src.width, src.height, src.number_of_images)
        bw, bh, _ = reduction_result_size(self._axis, w, h, nin)
        oz, cnt, ox, oy, ww, hh = _destination_block(self._name(), self._clip_rect, dest, bw, bh, d)
        if cnt <= 0 or ww <= 0 or hh <= 0:
            return
        # only the source rows / columns whose results are written
        sw = ww if self._axis != "row" else w
        sh = hh if self._axis != "column" else h
        x = src.tensor[z0:z0 + cnt, y0:y0 + sh, x0:x0 + sw, self._src_c_off:self._src_c_off + nin]
        with cb.encoding(self._name()):
            y = self._reduce(x)
            write_result(dest, Region(oz, cnt, ox, oy, ww, hh, self._dst_c_off, nout), y)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._axis == "row":
            return backend.reduce_rows(x, self._op)
        if self._axis == "column":
            return backend.reduce_columns(x, self._op)
        return backend.reduce_feature_channels(x, self._op)


def _unary_doc(name: str, what: str) -> str:
    return (f"``{name}``: {what}\n\n    ``{name}(device)``; properties and encode forms of "
            ":class:`MPSNNReduceUnary` (see the module docstring for the formula and placement).")


class MPSNNReduceRowMin(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceRowMin", "per row, the minimum over x (result C x h x 1).")
    _axis, _op = "row", "min"


class MPSNNReduceRowMax(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceRowMax", "per row, the maximum over x (result C x h x 1).")
    _axis, _op = "row", "max"


class MPSNNReduceRowMean(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceRowMean", "per row, the mean over x, (1/w)·Σ_x (result C x h x 1).")
    _axis, _op = "row", "mean"


class MPSNNReduceRowSum(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceRowSum", "per row, the sum over x (result C x h x 1).")
    _axis, _op = "row", "sum"


class MPSNNReduceColumnMin(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceColumnMin", "per column, the minimum over y (result C x 1 x w).")
    _axis, _op = "column", "min"


class MPSNNReduceColumnMax(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceColumnMax", "per column, the maximum over y (result C x 1 x w).")
    _axis, _op = "column", "max"


class MPSNNReduceColumnMean(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceColumnMean", "per column, the mean over y, (1/h)·Σ_y (result C x 1 x w).")
    _axis, _op = "column", "mean"


class MPSNNReduceColumnSum(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceColumnSum", "per column, the sum over y (result C x 1 x w).")
    _axis, _op = "column", "sum"


class MPSNNReduceFeatureChannelsMin(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceFeatureChannelsMin", "per pixel, the minimum over the channels read (result 1 x h x w).")
    _axis, _op = "featureChannels", "min"


class MPSNNReduceFeatureChannelsMax(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceFeatureChannelsMax", "per pixel, the maximum over the channels read (result 1 x h x w).")
    _axis, _op = "featureChannels", "max"


class MPSNNReduceFeatureChannelsMean(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceFeatureChannelsMean", "per pixel, (1/C)·Σ_c over the C channels read (result 1 x h x w).")
    _axis, _op = "featureChannels", "mean"


class MPSNNReduceFeatureChannelsArgumentMin(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceFeatureChannelsArgumentMin",
                         "per pixel, the index (from the first channel read, as a float) of the minimum; ties -> lowest index.")
    _axis, _op = "featureChannels", "argmin"


class MPSNNReduceFeatureChannelsArgumentMax(MPSNNReduceUnary):
    __doc__ = _unary_doc("MPSNNReduceFeatureChannelsArgumentMax",
                         "per pixel, the index (from the first channel read, as a float) of the maximum; ties -> lowest index.")
    _axis, _op = "featureChannels", "argmax"


class MPSNNReduceFeatureChannelsSum(MPSNNReduceUnary):
    """``MPSNNReduceFeatureChannelsSum``: per pixel, ``weight · Σ_c X[c]`` over the channels
    read (result 1 x h x w).

    ``MPSNNReduceFeatureChannelsSum(device)``; property ``weight`` (float, read-write, default
    1.0): every channel value is multiplied by it before summing (a weighted sum, or a mean
    with ``weight = 1/C``). Other properties and encode forms: :class:`MPSNNReduceUnary`.
    """

    _axis, _op = "featureChannels", "sum"

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self._weight = 1.0

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = _as_float(self._name(), "weight", value)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return backend.reduce_feature_channels(x, "sum", self._weight)


# -- binary reductions ------------------------------------------------------------------------------

class MPSNNReduceBinary(MPSCNNBinaryKernel):
    """``MPSNNReduceBinary``: base of the two-input reductions (use a subclass).

    Properties: ``primary_source_clip_rect`` / ``secondary_source_clip_rect``
    (:class:`MTLRegion`, default :data:`MPSRectNoClip`): the regions read, intersected with
    each image; they replace ``primary_offset`` / ``secondary_offset`` (ignored). The two
    regions must have the same width and height; images pair in order from each region's
    ``origin.z``. ``clip_rect.origin`` places the result; ``clip_rect.size`` must be at least
    2 wide and 1 high (documented constraint). Channel windows through the inherited
    ``*_source_feature_channel_offset`` / ``*_max_count``; the two channel counts must match.

    Encode forms (inherited from :class:`MPSCNNBinaryKernel`): ``encode(cb, primary_image,
    secondary_image[, destination_image])`` and ``encode_batch(...)``; the result-returning
    forms make an image of exactly the result size. No result state.
    """

    _result_state_class = None

    def __init__(self, device: Device | str) -> None:
        if type(self) is MPSNNReduceBinary:
            raise MPSTypeError("MPSNNReduceBinary: initialising the base class is unavailable; use a subclass such as MPSNNReduceFeatureChannelsAndWeightsSum")
        super().__init__(device)
        self._p_clip = MPSRectNoClip
        self._s_clip = MPSRectNoClip

    primary_source_clip_rect = _typed_property("_p_clip", "primary_source_clip_rect", MTLRegion)
    secondary_source_clip_rect = _typed_property("_s_clip", "secondary_source_clip_rect", MTLRegion)

    def _channels_pair(self, np_: int, ns: int) -> None:
        if np_ != ns:
            raise value_error(self._name(), "secondary_image", f"{ns} channels used",
                              f"match the {np_} channels used of the primary image (set secondary_source_feature_channel_max_count to pair fewer)")

    def _regions(self, prim: MPSImage, sec: MPSImage) -> tuple[tuple[int, int, int, int, int, int], tuple[int, int, int, int, int, int]]:
        rp = source_region(self._name(), "primary_source_clip_rect", self._p_clip, prim.width, prim.height, prim.number_of_images)
        rs = source_region(self._name(), "secondary_source_clip_rect", self._s_clip, sec.width, sec.height, sec.number_of_images)
        if (rp[4], rp[5]) != (rs[4], rs[5]):
            raise value_error(self._name(), "secondary_source_clip_rect", self._s_clip,
                              f"give a region of the primary region's size {rp[4]}x{rp[5]} (width x height)", f"{rs[4]}x{rs[5]}")
        return rp, rs

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """Result descriptor: ``w x h`` of the primary region, the kernel's channel count and
        one image per paired image; ``primary_offset`` is not changed."""
        if len(source_images) != 2:
            raise value_error(self._name(), "source_images", f"{len(source_images)} images", "hold [primary, secondary]")
        prim, sec = source_images
        rp, rs = self._regions(prim, sec)
        nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                            self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
        desc = MPSImageDescriptor._trusted(prim.feature_channel_format, rp[4], rp[5], nout, min(rp[1], rs[1]))
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        self._check_no_alias(dest, prim, sec)
        c = self._clip_rect
        if c.size.width < 2 or c.size.height < 1:
            raise value_error(self._name(), "clip_rect.size", c.size, "be at least 2 wide and 1 high (documented constraint of MPSNNReduceBinary)")
        np_ = self._channels_used(prim, self._p_c_off, self._p_c_max, "primary")
        ns = self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary")
        nout = self._result_feature_channels(np_, ns)
        if self._dst_c_off + nout > dest.feature_channels:
            raise value_error(self._name(), "destination_image.feature_channels", dest.feature_channels,
                              f"be >= destination_feature_channel_offset + {nout} output channels = {self._dst_c_off + nout}")
        (pz, pd, px, py, w, h), (sz, sd, sx, sy, _, _) = self._regions(prim, sec)
        oz, cnt, ox, oy, ww, hh = _destination_block(self._name(), c, dest, w, h, min(pd, sd))
        if cnt <= 0 or ww <= 0 or hh <= 0:
            return
        p = prim.tensor[pz:pz + cnt, py:py + hh, px:px + ww, self._p_c_off:self._p_c_off + np_]
        with cb.encoding(self._name()):
            y = self._reduce_pair(p, sec.tensor[sz:sz + cnt, :, :, self._s_c_off:self._s_c_off + ns], sx, sy)
            write_result(dest, Region(oz, cnt, ox, oy, ww, hh, self._dst_c_off, nout), y)

    def _reduce_pair(self, p: torch.Tensor, sec: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
        """``p``: the primary block; ``sec``: the whole secondary images whose pixel ``(sx, sy)``
        pairs with ``p[:, 0, 0]``."""
        h, w = p.shape[1], p.shape[2]
        return self._reduce_aligned(p, sec[:, sy:sy + h, sx:sx + w, :])

    def _reduce_aligned(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MPSNNReduceFeatureChannelsAndWeightsMean(MPSNNReduceBinary):
    """``MPSNNReduceFeatureChannelsAndWeightsMean``: per pixel, ``(1/C)·Σ_c P[c]·Q[c]`` of the
    data (primary) and weights (secondary) images (result 1 x h x w).

    ``MPSNNReduceFeatureChannelsAndWeightsMean(device)``; properties and encode forms of
    :class:`MPSNNReduceBinary`.
    """

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        self._channels_pair(primary_channels, secondary_channels)
        return 1

    def _reduce_aligned(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return backend.reduce_feature_channels_and_weights(p, q, "mean")


class MPSNNReduceFeatureChannelsAndWeightsSum(MPSNNReduceBinary):
    """``MPSNNReduceFeatureChannelsAndWeightsSum``: per pixel, ``Σ_c P[c]·Q[c]`` (result 1 x h x w).

    Args:
        device: the device (positional, first).
        do_weighted_sum_by_non_zero_weights: read-only afterwards (default False). When True
            the sum is divided by ``K``, the number of channels with ``Q[c] != 0``; the
            result is 0 where ``K = 0`` (inferred).

    Properties and encode forms of :class:`MPSNNReduceBinary`.
    """

    def __init__(self, device: Device | str, do_weighted_sum_by_non_zero_weights: bool = False) -> None:
        super().__init__(device)
        if not isinstance(do_weighted_sum_by_non_zero_weights, bool):
            raise MPSTypeError(f"{self._name()}: `do_weighted_sum_by_non_zero_weights` must be a bool, but got {type(do_weighted_sum_by_non_zero_weights).__name__}")
        self._nonzero = do_weighted_sum_by_non_zero_weights

    @property
    def do_weighted_sum_by_non_zero_weights(self) -> bool:
        return self._nonzero

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        self._channels_pair(primary_channels, secondary_channels)
        return 1

    def _reduce_aligned(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return backend.reduce_feature_channels_and_weights(p, q, "nonzero" if self._nonzero else "sum")


def _non_negative(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value >= ULONG_MAX:
        raise value_error(owner, name, value, f"be an integer >= {minimum}")
    return value


class MPSNNLocalCorrelation(MPSNNReduceBinary):
    """``MPSNNLocalCorrelation``: correlation of the primary image ``A`` with shifted copies of
    the secondary image ``B`` (optical-flow style cost volume).

    Args:
        device: the device (positional, first).
        window_in_x, window_in_y: search radius in shifts (default 0, read-write).
        stride_in_x, stride_in_y: pixels per shift (default 1, must be > 0, read-write).

    Result: ``(2·window_in_x + 1)·(2·window_in_y + 1)`` channels, the primary region's size::

        M[m] = (m − window_in_x)·stride_in_x,  N[n] = (n − window_in_y)·stride_in_y
        O[n·(2·window_in_x + 1) + m][y][x] = Σ_z A[z][y][x] · B[z][y + N[n]][x + M[m]]

    ``B`` reads 0 outside its image (inferred); the header's channel-index typo
    (``2·window_in_y + 1``) is corrected to ``2·window_in_x + 1`` (x-shift fastest). Other
    properties and encode forms of :class:`MPSNNReduceBinary`.
    """

    def __init__(self, device: Device | str, window_in_x: int = 0, window_in_y: int = 0, stride_in_x: int = 1, stride_in_y: int = 1) -> None:
        super().__init__(device)
        self.window_in_x, self.window_in_y = window_in_x, window_in_y
        self.stride_in_x, self.stride_in_y = stride_in_x, stride_in_y

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("window_in_x", "window_in_y"):
            value = _non_negative(self._name(), name, value, 0)
        elif name in ("stride_in_x", "stride_in_y"):
            value = _non_negative(self._name(), name, value, 1)
        object.__setattr__(self, name, value)

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        self._channels_pair(primary_channels, secondary_channels)
        return (2 * self.window_in_x + 1) * (2 * self.window_in_y + 1)

    def _reduce_pair(self, p: torch.Tensor, sec: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
        return backend.local_correlation(p, sec, sx, sy, self.window_in_x, self.window_in_y, self.stride_in_x, self.stride_in_y)
