"""Reshape, slice, pad and concatenation: MPSNNReshape (+ gradient), MPSNNSlice, MPSNNPad
(+ gradient) (spec/reduce-reshape-slice-concat.md §5-8).

Math, per image ``n`` (channels = the ``Nin`` channels read from
``source_feature_channel_offset``)::

    Reshape   flat = (y·W + x)·Nin + c  ->  (y', x', c') = (flat div (W'·C'), (flat div C') mod W', flat mod C')
    Slice     dst[oy + j][ox + i][dc + c] = src[offset.y + j][offset.x + i][sc + c]
    Pad       dst[oy + j][ox + i][dc + k] = src[E_y(offset.y + j)][E_x(offset.x + i)][sc + E_c(k − before.channel)]

``E`` maps an index relative to the active source range of extent ``n`` (the image along x
and y, the ``A`` channels read along c) by the edge mode: zero -> 0, constant -> the fill
value, clamp -> ``clamp(i, 0, n−1)``, mirror -> period ``2(n−1)`` without repeating the edge,
mirrorWithEdge -> period ``2n`` repeating it (:func:`edge_index`). Gradients are the adjoints:
reshape gradient = the inverse reshape; pad gradient = each source position receives the sum
of the incoming gradient of every destination position that read it.

Concatenation is not a kernel: each producer writes into one shared image with
``destination_feature_channel_offset = O_i``, ``O_0 = 0``, ``O_{i+1} = O_i + ceil(C_i/4)·4``
(:func:`concatenation_offsets`); its gradient is a channel slice (:class:`MPSNNSlice` with
``source_feature_channel_offset = O_i``).

Decisions where the spec is silent (marked inferred there):

* Reshape order is NHWC (channel fastest), ``W·H·Nin = W'·H'·C'`` per image; reshape works on
  whole images: ``offset`` x/y must be 0 and ``clip_rect`` must cover the destination
  (``offset.z`` / ``clip_rect.origin.z`` / ``size.depth`` address images as usual). With an
  explicit destination ``C'`` follows from the element count (``W·H·Nin / (W'·H')``), so a
  reshape can write into a concatenation at ``destination_feature_channel_offset``.
* Slice: ``Cs = min(destination channels − destination_feature_channel_offset,
  source_feature_channel_max_count, source channels − source_feature_channel_offset)``;
  ``source_feature_channel_offset`` may be any non-negative value (not only multiples of 4);
  off-image reads follow ``edge_mode`` (zero or clamp). The auto-sized forms make a result
  of ``clip_rect.origin + slice size`` pixels, the slice size being ``clip_rect.size`` when
  set, else the source size minus ``offset``; ``offset`` is kept.
* Pad: with an explicit destination the spatial padding comes from ``offset`` and
  ``clip_rect``; the auto-sized forms set ``offset = (−before.x, −before.y)`` and size the
  result ``W + before.x + after.x`` by ``H + before.y + after.y`` by ``before.channel + A +
  after.channel`` (``clip_rect`` is used as set, default the whole result). A fill-value
  array shorter than the channels written is refused (Apple: undefined). The same edge mode
  applies to all three axes. Arithmetic is a copy (values keep their bits, then one rounding
  to the destination format); the gradient accumulates in float32.
* Gradient kernels need the forward pass's gradient state for Pad; Reshape's works without
  one (then the kernel's own channel windows are used). Their results have the forward
  source's full size; channels the forward pass did not read get 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..backends import reshape as backend
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import MPSTypeError, MPSValueError, value_error
from ..core.host_arrays import float32_array
from ..core.kernel import ULONG_MAX, InputGeometry, MPSCNNKernel, Region, _clip_region
from ..core.regions import read_window
from ..core.structs import MPSImageCoordinate, MPSOffset
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .results import write_result

__all__ = [
    "MPSNNPad",
    "MPSNNPadGradient",
    "MPSNNReshape",
    "MPSNNReshapeGradient",
    "MPSNNSlice",
    "concatenation_feature_channels",
    "concatenation_offsets",
    "edge_index",
    "pad_result_size",
    "reshape_feature_channels",
]

E = MPSImageEdgeMode


# -- pure shape rules ---------------------------------------------------------------------------------

def edge_index(i: int, n: int, mode: MPSImageEdgeMode) -> int:
    """Index into an active range of extent ``n`` for relative index ``i`` under ``mode``;
    -1 means "not read" (zero / constant: the fill value)."""
    if 0 <= i < n:
        return i
    if mode in (E.zero, E.constant) or n <= 0:
        return -1
    if mode == E.clamp:
        return min(max(i, 0), n - 1)
    if mode == E.mirror:
        if n == 1:
            return 0
        p = 2 * (n - 1)
        t = abs(i) % p
        return t if t < n else p - t
    if mode == E.mirrorWithEdge:
        t = i % (2 * n)
        return t if t < n else 2 * n - 1 - t
    raise ValueError(f"unknown edge mode {mode!r}")


def reshape_feature_channels(owner: str, width: int, height: int, channels: int, new_width: int, new_height: int) -> int:
    """``C'`` such that ``width·height·channels = new_width·new_height·C'``; raises if none."""
    total = width * height * channels
    if new_width < 1 or new_height < 1 or total % (new_width * new_height):
        raise value_error(owner, "destination size", f"{new_width}x{new_height}",
                          f"divide the {total} values per image ({width}x{height}x{channels}, W x H x C)")
    return total // (new_width * new_height)


def pad_result_size(width: int, height: int, channels_read: int, before: MPSImageCoordinate, after: MPSImageCoordinate) -> tuple[int, int, int]:
    """``(W', H', C')`` of an auto-sized :class:`MPSNNPad` result."""
    return (width + before.x + after.x, height + before.y + after.y, before.channel + channels_read + after.channel)


def concatenation_offsets(channels: Sequence[int]) -> list[int]:
    """``O_i`` of a concatenation of inputs with ``channels[i]`` channels: each input starts
    on a multiple of 4 (``O_{i+1} = O_i + ceil(C_i/4)·4``)."""
    out, o = [], 0
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise value_error("MPSNNConcatenation", "channels", c, "be integers >= 1")
        out.append(o)
        o += -(-c // 4) * 4
    return out


def concatenation_feature_channels(channels: Sequence[int]) -> int:
    """Channels of a concatenation result: ``Σ ceil(C_i/4)·4`` (the last input padded too)."""
    offs = concatenation_offsets(channels)
    return offs[-1] + -(-channels[-1] // 4) * 4 if offs else 0


def _any_channel_offset_property(attr: str, name: str) -> property:
    """A source channel offset that may be any non-negative integer (slice and pad)."""
    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise value_error(self._name(), name, value, "be a non-negative integer")
        setattr(self, attr, value)
    return property(get, set_)


def _write_copy(dest: MPSImage, region: Region, values: torch.Tensor, source: torch.Tensor) -> None:
    """:func:`write_result`, but never adopting a view of the source image as the result's
    storage (a reshape, slice or pad without padding can return one)."""
    if values.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        values = values.clone(memory_format=torch.contiguous_format)
    write_result(dest, region, values)


def _dest_channels_check(kernel: Any, dest: MPSImage, nout: int) -> None:
    if kernel._dst_c_off + nout > dest.feature_channels:
        raise value_error(kernel._name(), "destination_image.feature_channels", dest.feature_channels,
                          f"be >= destination_feature_channel_offset + {nout} output channels = {kernel._dst_c_off + nout}")


# -- reshape --------------------------------------------------------------------------------------

class MPSNNReshape(MPSCNNKernel):
    """``MPSNNReshape``: copies each source image into a new width x height x channels shape.

    Args:
        device: the device (positional, first).

    Order: NHWC flatten (``flat = (y·W + x)·Nin + c``) refilled in the same order (inferred,
    see the module docstring); ``W·H·Nin`` must equal ``W'·H'·C'``.

    Encode forms:

    * ``encode(cb, source_image, reshaped_width=W', reshaped_height=H',
      reshaped_feature_channels=C')`` returns the reshaped image (Apple's
      ``encode(commandBuffer:sourceImage:reshapedWidth:reshapedHeight:reshapedFeatureChannels:)``);
      add ``destination_state_is_temporary=flag`` to get ``(image, state)`` for
      :class:`MPSNNReshapeGradient`.
    * ``encode_batch(cb, source_images, reshaped_width=..., ...)`` (+ the state variant).
    * ``encode(cb, source_image, destination_image[, destination_state=s])`` reshapes into
      ``destination_image``'s width and height (``C'`` from the element count).
    * Without reshaped sizes the auto forms keep the source's shape (a copy).

    Properties: those of :class:`MPSCNNKernel`; ``offset`` x/y must stay 0 and ``clip_rect``
    must cover the destination (reshape works on whole images). The result state is an
    :class:`MPSNNGradientState`.
    """

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self._target: tuple[int, int, int] | None = None

    def _check_target(self, w: Any, h: Any, c: Any) -> tuple[int, int, int] | None:
        given = [v is not None for v in (w, h, c)]
        if not any(given):
            return None
        if not all(given):
            raise MPSValueError(f"{self._name()}: `reshaped_width`, `reshaped_height` and `reshaped_feature_channels` go together, but got {w}, {h}, {c}")
        for name, v in (("reshaped_width", w), ("reshaped_height", h), ("reshaped_feature_channels", c)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise value_error(self._name(), name, v, "be an integer >= 1")
        return (w, h, c)

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None, *,
                                     reshaped_width: int | None = None, reshaped_height: int | None = None,
                                     reshaped_feature_channels: int | None = None) -> MPSImageDescriptor:
        """The result descriptor for the given reshaped size (default: the encode in progress's,
        else the source's own shape). ``offset`` is not changed."""
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        nin = self.source_channels_used(src)
        target = self._check_target(reshaped_width, reshaped_height, reshaped_feature_channels) or self._target or (src.width, src.height, nin)
        self._check_count(src.width, src.height, nin, *target)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, target[0], target[1], target[2], src.number_of_images)
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _check_count(self, w: int, h: int, c: int, w2: int, h2: int, c2: int) -> None:
        if w * h * c != w2 * h2 * c2:
            raise value_error(self._name(), "reshaped size", f"{w2}x{h2}x{c2}",
                              f"hold the source's {w}x{h}x{c} = {w * h * c} values per image (W x H x C)", f"{w2 * h2 * c2} values")

    def encode(self, command_buffer: MTLCommandBuffer, source_image: MPSImage, destination_image: MPSImage | None = None, *,  # type: ignore[override]
               reshaped_width: int | None = None, reshaped_height: int | None = None, reshaped_feature_channels: int | None = None,
               destination_state: MPSState | None = None, destination_state_is_temporary: bool | None = None) -> Any:
        """See the class docstring for the forms."""
        target = self._check_target(reshaped_width, reshaped_height, reshaped_feature_channels)
        self._target = target
        try:
            return super().encode(command_buffer, source_image, destination_image, destination_state=destination_state,
                                  destination_state_is_temporary=destination_state_is_temporary)
        finally:
            self._target = None

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], destination_images: Sequence[MPSImage] | None = None, *,  # type: ignore[override]
                     reshaped_width: int | None = None, reshaped_height: int | None = None, reshaped_feature_channels: int | None = None,
                     destination_states: Sequence[MPSState] | None = None, destination_state_is_temporary: bool | None = None) -> Any:
        """Batch form: each image reshaped separately."""
        self._target = self._check_target(reshaped_width, reshaped_height, reshaped_feature_channels)
        try:
            return super().encode_batch(command_buffer, source_images, destination_images, destination_states=destination_states,
                                        destination_state_is_temporary=destination_state_is_temporary)
        finally:
            self._target = None

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        self._check_no_alias(dest, src)
        nin = self.source_channels_used(src)
        if self._offset.x != 0 or self._offset.y != 0:
            raise value_error(self._name(), "offset", self._offset, "have x = y = 0 (MPSNNReshape reshapes whole images)")
        if self._offset.z < 0 or self._offset.z >= src.number_of_images:
            raise value_error(self._name(), "offset.z", self._offset.z, f"address a source image in [0, {src.number_of_images})")
        n0, count, x0, y0, w, h = _clip_region(self._name(), self._clip_rect, dest, src.number_of_images - self._offset.z)
        if (x0, y0, w, h) != (0, 0, dest.width, dest.height):
            raise value_error(self._name(), "clip_rect", self._clip_rect, "cover the whole destination (MPSNNReshape reshapes whole images)")
        c2 = reshape_feature_channels(self._name(), src.width, src.height, nin, dest.width, dest.height)
        if self._target is not None and self._target != (dest.width, dest.height, c2):
            raise value_error(self._name(), "reshaped size", "x".join(map(str, self._target)),
                              f"match destination_image's {dest.width}x{dest.height} and the {c2} channels it implies")
        _dest_channels_check(self, dest, c2)
        if state is not None:
            state = self._check_state("destination_state", state, cb)
            if isinstance(state, MPSNNGradientState):
                state.geometry = self._geometry(src, dest)
        if count == 0:
            return
        x = src.tensor[self._offset.z:self._offset.z + count, :, :, self._src_c_off:self._src_c_off + nin]
        with cb.encoding(self._name()):
            _write_copy(dest, Region(n0, count, 0, 0, dest.width, dest.height, self._dst_c_off, c2),
                        backend.reshape_nhwc(x, dest.height, dest.width, c2), x)


class _WholeImageGradient(MPSCNNGradientKernel):
    """Gradient kernels whose result is the whole forward source (reshape, pad)."""

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        self._forward = g

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """The forward source's size and channel count (from the gradient state, else from
        ``source_image``)."""
        if len(source_images) != 2:
            raise value_error(self._name(), "source_images", f"{len(source_images)} images", "hold [source_gradient, source_image]")
        self._take_gradient_states(source_images, source_states)
        prim, sec = source_images
        desc = MPSImageDescriptor._trusted(prim.feature_channel_format, sec.width, sec.height, sec.feature_channels, prim.number_of_images)
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _prepare_new_destination(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: MPSImage) -> None:
        """Nothing: the encode writes every element of the result."""

    def _check_source_image(self, sec: MPSImage, g: ForwardGeometry) -> None:
        if (sec.width, sec.height, sec.feature_channels) != (g.source_width, g.source_height, g.source_feature_channels):
            raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}x{sec.feature_channels}",
                              f"be the forward source ({g.source_width}x{g.source_height}x{g.source_feature_channels}, W x H x C)")

    def _write(self, cb: MTLCommandBuffer, dest: Any, prim: MPSImage, sec: MPSImage, result_fn: Any) -> None:
        dest = self._check_image("destination_gradient", dest, cb)
        self._check_no_alias(dest, prim, sec)
        n = prim.number_of_images
        if (dest.width, dest.height) != (sec.width, sec.height) or dest.number_of_images != n:
            raise value_error(self._name(), "destination_gradient", f"{dest.number_of_images}x{dest.height}x{dest.width}",
                              f"be the forward source's size {n}x{sec.height}x{sec.width} (N x H x W)")
        _dest_channels_check(self, dest, sec.feature_channels)
        with cb.encoding(self._name()):
            write_result(dest, Region(0, n, 0, 0, sec.width, sec.height, self._dst_c_off, sec.feature_channels), result_fn())


class MPSNNReshapeGradient(_WholeImageGradient):
    """``MPSNNReshapeGradient``: reshapes the incoming gradient back into the forward source's
    shape (the inverse permutation of :class:`MPSNNReshape`).

    Args:
        device: the device (positional, first).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(...)``; ``source_image`` is the forward
    reshape's input. With the forward state, the incoming gradient is read at the forward
    ``destination_feature_channel_offset`` and the result channels
    ``[source_feature_channel_offset, + Nin)`` receive it, other channels 0. With
    ``gradient_state=None`` the kernel's ``primary_/secondary_source_feature_channel_offset``
    and ``..._max_count`` give the two channel windows. The result has the forward source's
    size and channel count; ``destination_feature_channel_offset`` places it in an explicit
    destination.
    """

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        super().apply_forward_geometry(g)
        nin = max(1, min(g.source_feature_channel_max_count, g.source_feature_channels - g.source_feature_channel_offset))
        self._p_c_off = g.destination_feature_channel_offset
        self._s_c_off, self._s_c_max = g.source_feature_channel_offset, nin
        self._p_c_max = reshape_feature_channels(self._name(), g.source_width, g.source_height, nin,
                                                 max(1, g.destination_width), max(1, g.destination_height))

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        g = self._forward
        if g is not None:
            self._check_source_image(sec, g)
            if (prim.width, prim.height) != (g.destination_width, g.destination_height):
                raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}",
                                  f"have the forward result's size {g.destination_width}x{g.destination_height} (W x H)")
        np_ = self._channels_used(prim, self._p_c_off, self._p_c_max, "primary")
        ns = self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary")
        if prim.width * prim.height * np_ != sec.width * sec.height * ns:
            raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}x{np_}",
                              f"hold as many values per image as source_image's {sec.width}x{sec.height}x{ns} (W x H x C)")
        if prim.number_of_images != sec.number_of_images:
            raise value_error(self._name(), "source_gradient.number_of_images", prim.number_of_images, f"match source_image's {sec.number_of_images}")

        def result() -> torch.Tensor:
            gin = prim.tensor[..., self._p_c_off:self._p_c_off + np_]
            out = gin.new_zeros((prim.number_of_images, sec.height, sec.width, sec.feature_channels))
            out[..., self._s_c_off:self._s_c_off + ns] = backend.reshape_nhwc(gin, sec.height, sec.width, ns)
            return out
        self._write(cb, dest, prim, sec, result)


# -- slice ----------------------------------------------------------------------------------------

class MPSNNSlice(MPSCNNKernel):
    """``MPSNNSlice``: extracts a block of pixels and channels (TensorFlow / MXNet slice).

    Args:
        device: the device (positional, first).

    ``dst[oy + j][ox + i][dc + c] = src[offset.y + j][offset.x + i][sc + c]`` for the pixels
    of the effective ``clip_rect`` (``clip_rect.size`` = slice size) and ``c < Cs``, ``Cs =
    min(destination channels − dc, source_feature_channel_max_count, source channels − sc)``
    (``sc = source_feature_channel_offset``, any non-negative value; ``dc =
    destination_feature_channel_offset``, a multiple of 4, default 0). Off-image reads follow
    ``edge_mode`` (zero or clamp).

    Encode forms (inherited): ``encode(cb, source_image, destination_image)``,
    ``encode(cb, source_image)`` (result of ``clip_rect.origin + slice size`` pixels; slice
    size = ``clip_rect.size`` or, for :data:`MPSRectNoClip`, the source size minus
    ``offset``; ``offset`` is kept) and ``encode_batch``. No result state.
    """

    _result_state_class = None
    source_feature_channel_offset = _any_channel_offset_property("_src_c_off", "source_feature_channel_offset")

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        c = self._clip_rect
        sw = c.size.width if c.size.width < ULONG_MAX else src.width - self._offset.x
        sh = c.size.height if c.size.height < ULONG_MAX else src.height - self._offset.y
        if sw < 1 or sh < 1:
            raise value_error(self._name(), "offset", self._offset, f"leave at least one pixel of the {src.width}x{src.height} source to slice",
                              f"a {sw}x{sh} slice")
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, c.origin.x + sw, c.origin.y + sh,
                                           self.source_channels_used(src), src.number_of_images - self._offset.z)
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        nin = self.source_channels_used(src)
        room = dest.feature_channels - self._dst_c_off
        if room < 1:
            raise value_error(self._name(), "destination_feature_channel_offset", self._dst_c_off,
                              f"be < destination_image.feature_channels={dest.feature_channels}")
        saved = self._src_c_max
        self._src_c_max = min(nin, room)  # Cs: the base class then checks and encodes exactly Cs channels
        try:
            super()._encode_checked(cb, src, dest, state)
        finally:
            self._src_c_max = saved

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        if inp.edge_mode not in (E.zero, E.clamp):
            raise value_error(self._name(), "edge_mode", inp.edge_mode.name, "be zero or clamp (mirror, mirrorWithEdge and constant are MPSNNPad's)")
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode)
        _write_copy(dest, region, x, src.tensor)


# -- pad --------------------------------------------------------------------------------------------

def _coordinate(owner: str, name: str, value: Any) -> MPSImageCoordinate:
    if not isinstance(value, MPSImageCoordinate):
        raise MPSTypeError(f"{owner}: `{name}` must be an MPSImageCoordinate, but got {type(value).__name__}")
    for f in ("x", "y", "channel"):
        v = getattr(value, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise value_error(owner, f"{name}.{f}", v, "be a non-negative integer")
    return value


class _PadGradientState(MPSNNGradientState):
    """The gradient state of :class:`MPSNNPad`: an :class:`MPSNNGradientState` that also
    records the channel padding (``padding_size_before/after.channel``) of the forward encode."""

    pad_channels = (0, 0)


class MPSNNPad(MPSCNNKernel):
    """``MPSNNPad``: copies the source into a larger destination, filling the border by the
    edge mode; the only kernel that supports ``mirror``, ``mirrorWithEdge`` and ``constant``.

    Args:
        device: the device (positional, first).
        padding_size_before, padding_size_after: :class:`MPSImageCoordinate` ``{x, y,
            channel}`` (default all 0; read-write properties).
        fill_value_array: optional float32 values (array, tensor or bytes); element ``k`` is
            the constant for the ``k``-th channel written. Must hold at least as many values
            as channels written. When given, ``fill_value`` is ignored.

    Properties: ``padding_size_before``, ``padding_size_after``, ``fill_value`` (float,
    default 0.0), ``edge_mode`` (default zero; any :class:`MPSImageEdgeMode`),
    ``source_feature_channel_offset`` (any non-negative value), and the rest of
    :class:`MPSCNNKernel`. See the module docstring for the mapping.

    Encode forms (inherited): ``encode(cb, source_image, destination_image)`` (padding from
    ``offset`` / ``clip_rect``; channel padding always from the padding sizes);
    ``encode(cb, source_image)`` (auto-sized, sets ``offset = (−before.x, −before.y)``),
    the state forms (an :class:`MPSNNGradientState` for :class:`MPSNNPadGradient`) and
    ``encode_batch``.
    """

    _result_state_class = _PadGradientState
    source_feature_channel_offset = _any_channel_offset_property("_src_c_off", "source_feature_channel_offset")

    def __init__(self, device: Device | str, padding_size_before: MPSImageCoordinate | None = None,
                 padding_size_after: MPSImageCoordinate | None = None, fill_value_array: Any = None) -> None:
        super().__init__(device)
        self.padding_size_before = padding_size_before if padding_size_before is not None else MPSImageCoordinate()
        self.padding_size_after = padding_size_after if padding_size_after is not None else MPSImageCoordinate()
        self._fill_value = 0.0
        self._fill_array: np.ndarray | None = None
        if fill_value_array is not None:
            self._fill_array = float32_array(self._name(), "fill_value_array", fill_value_array).reshape(-1).copy()
        self._moved_to_device()

    def _moved_to_device(self) -> None:
        self._fill_tensor = None if self._fill_array is None else torch.from_numpy(self._fill_array).to(self.device.torch_device)

    @property
    def padding_size_before(self) -> MPSImageCoordinate:
        return self._before

    @padding_size_before.setter
    def padding_size_before(self, value: MPSImageCoordinate) -> None:
        self._before = _coordinate(self._name(), "padding_size_before", value)

    @property
    def padding_size_after(self) -> MPSImageCoordinate:
        return self._after

    @padding_size_after.setter
    def padding_size_after(self, value: MPSImageCoordinate) -> None:
        self._after = _coordinate(self._name(), "padding_size_after", value)

    @property
    def fill_value(self) -> float:
        return self._fill_value

    @fill_value.setter
    def fill_value(self, value: float) -> None:
        if isinstance(value, bool):
            raise value_error(self._name(), "fill_value", value, "be a real number")
        try:
            self._fill_value = float(np.float32(value))
        except (TypeError, ValueError):
            raise value_error(self._name(), "fill_value", value, "be a real number") from None

    @property
    def fill_value_array(self) -> bytes | None:
        """The per-channel fill values as float32 bytes (None when not given)."""
        return None if self._fill_array is None else self._fill_array.tobytes()

    def _result_feature_channels(self, source_channels: int) -> int:
        return self._before.channel + source_channels + self._after.channel

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """Auto size ``W + before.x + after.x`` x ``H + before.y + after.y`` x ``before.channel
        + A + after.channel``; **sets** ``offset = (−before.x, −before.y, offset.z)``."""
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        w, h, c = pad_result_size(src.width, src.height, self.source_channels_used(src), self._before, self._after)
        self._offset = MPSOffset(-self._before.x, -self._before.y, self._offset.z)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, w, h, c, src.number_of_images)
        return self._finish_descriptor(desc, 0, source_images, source_states)

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        st = super()._make_state(source, dest, command_buffer)
        if isinstance(st, _PadGradientState):
            st.pad_channels = (self._before.channel, self._after.channel)
        return st

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        nout = self._result_feature_channels(self.source_channels_used(src))
        if self._fill_tensor is not None and self._edge_mode == E.constant and self._fill_tensor.numel() < nout:
            raise value_error(self._name(), "fill_value_array", f"{self._fill_tensor.numel()} values",
                              f"hold one fill value per channel written ({nout})")
        super()._encode_checked(cb, src, dest, state)
        if isinstance(state, _PadGradientState):
            state.pad_channels = (self._before.channel, self._after.channel)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        mode = inp.edge_mode
        iy = [edge_index(inp.cy0 + j, src.height, mode) for j in range(region.height)]
        ix = [edge_index(inp.cx0 + i, src.width, mode) for i in range(region.width)]
        ic = [edge_index(k - self._before.channel, inp.channels, mode) for k in range(region.channels)]
        fill: torch.Tensor | float = 0.0
        if mode == E.constant:
            fill = self._fill_tensor[:region.channels] if self._fill_tensor is not None else self._fill_value
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels]
        _write_copy(dest, region, backend.gather_padded(x, iy, ix, ic, fill), x)


class MPSNNPadGradient(_WholeImageGradient):
    """``MPSNNPadGradient``: the adjoint of :class:`MPSNNPad`'s copy.

    Args:
        device: the device (positional, first).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(...)``; ``gradient_state`` (required) is the
    state of the forward pad encode, ``source_image`` its input. Every source position
    receives the sum of the incoming gradients of the destination positions that read it
    (under the forward edge mode; zero / constant padding contributes nothing). The result
    has the forward source's size and channels; channels the forward pass did not read get
    0. No fill values are needed.
    """

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        g, st = self._forward, self._gradient_state
        if g is None or not isinstance(st, _PadGradientState) or g.kernel_class != "MPSNNPad":
            raise value_error(self._name(), "gradient_state", type(st).__name__ if st is not None else None,
                              "be the state of an MPSNNPad encode (the gradient needs the forward geometry)")
        self._check_source_image(sec, g)
        c = g.clip_rect
        x0, y0 = c.origin.x, c.origin.y
        w = min(c.origin.x + c.size.width, g.destination_width) - x0
        h = min(c.origin.y + c.size.height, g.destination_height) - y0
        before_c, after_c = st.pad_channels
        nin = max(0, min(g.source_feature_channel_max_count, g.source_feature_channels - g.source_feature_channel_offset))
        cw = before_c + nin + after_c
        c0 = g.destination_feature_channel_offset
        if prim.width < x0 + w or prim.height < y0 + h or prim.feature_channels < c0 + cw or prim.number_of_images != sec.number_of_images:
            raise value_error(self._name(), "source_gradient", f"{prim.number_of_images}x{prim.height}x{prim.width}x{prim.feature_channels}",
                              f"cover the forward result's written block ({sec.number_of_images} images, rows < {y0 + h}, columns < {x0 + w}, channels < {c0 + cw})")
        mode = g.edge_mode
        ox, oy = g.offset.x, g.offset.y
        iy = [edge_index(oy + j, g.source_height, mode) for j in range(max(h, 0))]
        ix = [edge_index(ox + i, g.source_width, mode) for i in range(max(w, 0))]
        ic = [edge_index(k - before_c, nin, mode) for k in range(cw)]
        sc = g.source_feature_channel_offset

        def result() -> torch.Tensor:
            gin = prim.tensor[:, y0:y0 + max(h, 0), x0:x0 + max(w, 0), c0:c0 + cw]
            part = backend.scatter_padded(gin, iy, ix, ic, g.source_height, g.source_width, nin)
            out = part.new_zeros((prim.number_of_images, sec.height, sec.width, sec.feature_channels))
            out[..., sc:sc + nin] = part
            return out
        self._write(cb, dest, prim, sec, result)
