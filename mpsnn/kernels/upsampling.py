"""Upsampling: MPSCNNUpsampling, MPSCNNUpsamplingNearest, MPSCNNUpsamplingBilinear and their
gradients MPSCNNUpsamplingGradient, MPSCNNUpsamplingNearestGradient,
MPSCNNUpsamplingBilinearGradient (spec/upsampling-resampling.md §2-5).

Math, per axis (x shown; y alike), integer factors ``sX, sY >= 1``, source width ``W``:

* Nearest: ``out[y][x] = in[floor(y / sY)][floor(x / sX)]``.
* Bilinear, ``align_corners = False`` (default): ``u = min(i / sX, W - 1)``;
  ``align_corners = True``: ``u = i * (W - 1) / (sX*W - 1)`` (0 when ``sX*W == 1``), so the
  corner pixels of input and output coincide. ``i0 = floor(u)``, ``i1 = min(i0 + 1, W - 1)``,
  ``t = u - i0``; ``out = (1-t)(1-v) in[j0][i0] + t(1-v) in[j0][i1] + (1-t)v in[j1][i0] +
  t v in[j1][i1]`` (computed in float32, rounded once on store).
* Gradients (adjoints): nearest sums each ``sX x sY`` block of the incoming gradient;
  bilinear hands every incoming value to the (up to four) source pixels its forward sample
  read, with the forward weights, and sums.

Geometry (kernel-base.md §2.2-2.5 applied to the upsampled grid; inferred). Let ``U`` be the
virtual upsampled source, ``sX*W x sY*H``. ``offset`` is in *source* pixels, as for every
MPSCNNKernel: destination pixel ``(x, y)`` of the clip region reads ``U`` at
``(offset.x*sX + x - clip_rect.origin.x, offset.y*sY + y - clip_rect.origin.y)`` (the
backwards-filter rule of kernel-base.md §4: offset times stride on the upsampled image), i.e.
at source coordinate ``offset.x + (x - clip_rect.origin.x)/sX``. ``offset.z``,
``clip_rect.origin.z`` / ``size.depth``, channel offsets and ``source_feature_channel_max_count``
follow the base class. Reads outside ``U``: nearest follows ``edge_mode`` (zero or clamp);
bilinear never leaves the image (spec §4: every tap is clamped to the edge), so ``edge_mode``
does not change bilinear results.

The auto-sized encode forms make a ``sX*W x sY*H`` result with the source's channels used
(spec §2) and set ``offset`` to (0, 0, offset.z); the padding policy's size bits are not used
(only a ``custom`` policy's hook runs, kernel-base.md §2.9 step 4).

Gradient decisions (inferred): the gradient state made by the forward encode records the
forward factors and ``align_corners``. The spec reads the bilinear gradient as the adjoint of
the ``align_corners = False`` mapping because the gradient class has no such property; mpsnn
uses that reading when no gradient state is given, and with a state it computes the adjoint of
the forward that made the state (a state from an ``align_corners = True`` forward would
otherwise give a silently wrong gradient). Incoming-gradient values for reads the forward made
outside ``U`` (only possible with offsets / clip rectangles reaching past it) are dropped, as
the convolution gradient drops off-image taps (convolution.md §11.3).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from ..backends import upsampling as up
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.padding import method_of
from ..core.regions import read_window
from ..core.structs import MPSOffset
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .results import direct_out, result_dtype, write_result

__all__ = [
    "MPSCNNUpsampling",
    "MPSCNNUpsamplingBilinear",
    "MPSCNNUpsamplingBilinearGradient",
    "MPSCNNUpsamplingGradient",
    "MPSCNNUpsamplingNearest",
    "MPSCNNUpsamplingNearestGradient",
]


# -- shape rules (ints in, ints out) ---------------------------------------------------------------


def upsampled_size(width: int, height: int, scale_factor_x: int, scale_factor_y: int) -> tuple[int, int]:
    """Result size of the auto-sized forms: ``(sX*W, sY*H)`` (spec §2)."""
    return scale_factor_x * width, scale_factor_y * height


# -- validation ------------------------------------------------------------------------------------------


def integer_scale_factor(owner: str, name: str, value: Any) -> int:
    """An integer >= 1 given as an int or an integral real (Apple's type is double)."""
    if value is None:
        raise MPSTypeError(f"{owner}: `{name}` is required (initWithDevice: alone is unavailable)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise value_error(owner, name, value, "be an integer >= 1")
    f = float(value)
    if not math.isfinite(f) or f < 1 or f != math.floor(f):
        raise value_error(owner, name, value, "be an integer >= 1")
    return int(f)



class _UpsamplingGradientState(MPSNNGradientState):
    """The ``MPSNNGradientState`` an upsampling forward hands its gradient: besides the forward
    geometry it records ``method`` ("nearest" / "bilinear"), ``scale_factor_x``,
    ``scale_factor_y`` (float) and ``align_corners``."""

    method: str | None = None
    scale_factor_x: float = 1.0
    scale_factor_y: float = 1.0
    align_corners: bool = False


def _record(state: Any, kernel: "MPSCNNUpsampling") -> None:
    state.method = kernel._method
    state.scale_factor_x = kernel.scale_factor_x
    state.scale_factor_y = kernel.scale_factor_y
    state.align_corners = kernel.align_corners


# -- forward --------------------------------------------------------------------------------------------


class MPSCNNUpsampling(MPSCNNKernel):
    """``MPSCNNUpsampling``: base of the integer-factor upsampling kernels (use a subclass).

    Read-only properties: ``scale_factor_x``, ``scale_factor_y`` (float, integral values
    >= 1; default 1), ``align_corners`` (False; meaningful for bilinear only). Every
    :class:`~mpsnn.MPSCNNKernel` property applies (see the module docstring for how ``offset``,
    ``clip_rect`` and ``edge_mode`` map onto the upsampled grid).

    Shape: ``[N, H, W, C]`` -> ``[N, sY*H, sX*W, Nin]`` in the auto-sized forms.

    Encode forms (from :class:`~mpsnn.MPSCNNKernel`): ``encode(cb, source_image,
    destination_image)``, ``encode(cb, source_image)`` -> image, ``encode(cb, source_image,
    destination_state_is_temporary=flag)`` -> ``(image, gradient_state)``,
    ``encode(cb, source_image, destination_image, destination_state=state)`` and the
    ``encode_batch`` forms. The state (``result_state(...)``) feeds the gradient kernel.
    """

    _method: str | None = None

    def __init__(self, device: Device | str, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None,
                 align_corners: bool = False) -> None:
        if self._method is None:
            raise MPSTypeError(f"{type(self).__name__}: use MPSCNNUpsamplingNearest or MPSCNNUpsamplingBilinear (the base class cannot be created)")
        MPSCNNKernel.__init__(self, device)
        owner = type(self).__name__
        self._sx = integer_scale_factor(owner, "integer_scale_factor_x", integer_scale_factor_x)
        self._sy = integer_scale_factor(owner, "integer_scale_factor_y", integer_scale_factor_y)
        if not isinstance(align_corners, bool):
            raise MPSTypeError(f"{owner}: `align_corners` must be a bool, but got {type(align_corners).__name__}")
        self._align = align_corners

    _result_state_class = _UpsamplingGradientState

    scale_factor_x = property(lambda self: float(self._sx), doc="Horizontal factor (double in Apple's API).")
    scale_factor_y = property(lambda self: float(self._sy), doc="Vertical factor.")
    align_corners = property(lambda self: self._align, doc="Corner-aligned bilinear sampling (False for nearest).")

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """The ``sX*W x sY*H`` result descriptor; sets ``offset`` to ``(0, 0, offset.z)``."""
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        self._offset = MPSOffset(0, 0, self._offset.z)
        w, h = upsampled_size(src.width, src.height, self._sx, self._sy)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, w, h, self.source_channels_used(src), src.number_of_images)
        return self._finish_descriptor(desc, method_of(self._padding), source_images, source_states)

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        state = super()._make_state(source, dest, command_buffer)
        _record(state, self)
        return state

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        if state is not None:
            _record(state, self)
        super()._encode_checked(cb, src, dest, state)

    def _upsample(self, x: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        edge = self._edge_mode if self._method == "nearest" else MPSImageEdgeMode.clamp
        if edge not in (MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp):
            raise value_error(self._name(), "edge_mode", edge.name, "be zero or clamp for CNN kernels")
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels]
        clip = self._clip_rect.origin
        left = self._offset.x * self._sx + region.x0 - clip.x
        top = self._offset.y * self._sy + region.y0 - clip.y
        uw, uh = x.shape[2] * self._sx, x.shape[1] * self._sy
        out = direct_out(dest, region) if (left, top, region.width, region.height) == (0, 0, uw, uh) else None
        u = self._upsample(x, result_dtype(dest), out)
        write_result(dest, region, read_window(u, left, top, region.width, region.height, edge))


class MPSCNNUpsamplingNearest(MPSCNNUpsampling):
    """``MPSCNNUpsamplingNearest``: replicate every source pixel into an ``sX x sY`` block.

    Args:
        device: the device (positional, first).
        integer_scale_factor_x, integer_scale_factor_y: integers >= 1 (required;
            ``initWithDevice:integerScaleFactorX:integerScaleFactorY:``).

    ``out[y][x] = in[floor(y / sY)][floor(x / sX)]``; values are copied exactly (no
    arithmetic). Off-grid reads (offsets / clip rectangles past the upsampled grid) follow
    ``edge_mode``. See :class:`MPSCNNUpsampling` for properties and encode forms.

    Example::

        up = MPSCNNUpsamplingNearest(device, integer_scale_factor_x=2, integer_scale_factor_y=2)
        y = up.encode(command_buffer, x)      # 2W x 2H
    """

    _method = "nearest"

    def __init__(self, device: Device | str, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None) -> None:
        super().__init__(device, integer_scale_factor_x, integer_scale_factor_y, False)

    def _upsample(self, x: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        return up.upsample_nearest_nhwc(x, self._sx, self._sy, out_dtype, out)


class MPSCNNUpsamplingBilinear(MPSCNNUpsampling):
    """``MPSCNNUpsamplingBilinear``: bilinear interpolation by integer factors.

    Args:
        device: the device (positional, first).
        integer_scale_factor_x, integer_scale_factor_y: integers >= 1 (required).
        align_corners: default False (``initWithDevice:integerScaleFactorX:integerScaleFactorY:``);
            True aligns the centres of the corner pixels (``...:alignCorners:``).

    Sampling (module docstring): ``u = min(i/sX, W-1)`` without aligned corners (INFERRED in
    the spec: Core ML's legacy DEFAULT mode / TensorFlow's legacy ``align_corners=False``, no
    half-pixel shift), ``u = i*(W-1)/(sX*W-1)`` with them. Neighbours are clamped to the
    image, so ``edge_mode`` has no effect. Arithmetic is float32, rounded once on store.
    """

    _method = "bilinear"

    def __init__(self, device: Device | str, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None,
                 align_corners: bool = False) -> None:
        super().__init__(device, integer_scale_factor_x, integer_scale_factor_y, align_corners)

    def _upsample(self, x: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        return up.upsample_bilinear_nhwc(x, self._sx, self._sy, self._align, out_dtype, out)


# -- gradients -------------------------------------------------------------------------------------------


class MPSCNNUpsamplingGradient(MPSCNNGradientKernel):
    """``MPSCNNUpsamplingGradient``: base of the upsampling gradients (use a subclass).

    Read-only ``scale_factor_x``, ``scale_factor_y`` (float; the factors of the forward pass,
    documented by Apple as the *downsampling* factors of the gradient pass). No
    ``align_corners`` property (see the module docstring for how the bilinear gradient
    chooses its mapping).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    gradient_states[, destination_gradients])``. ``source_gradient`` is dL/d(forward output),
    ``source_image`` the forward *input* (it gives the result size), ``gradient_state`` the
    state of the forward encode. The result is dL/d(forward input): the forward source's size;
    in the auto-sized forms its channels outside the forward channel window are 0; with an
    explicit ``destination_gradient`` (which must have the forward source's size) only the
    channel window and this kernel's ``clip_rect`` are written.

    The gradient state must come from an upsampling forward of the same kind (nearest /
    bilinear) and the same factors, and ``source_image`` must have the forward source's size,
    else :class:`~mpsnn.MPSError`. With ``gradient_state=None`` the forward is taken to be the
    plain one (no offset, no clip, ``align_corners = False``): ``source_gradient`` must then
    be exactly ``sX*W x sY*H``, and the channel windows are this kernel's own
    ``primary_/secondary_source_feature_channel_offset`` and ``destination_feature_channel_offset``.
    """

    _method: str | None = None

    def __init__(self, device: Device | str, integer_scale_factor_x: Any = None, integer_scale_factor_y: Any = None) -> None:
        if self._method is None:
            raise MPSTypeError(f"{type(self).__name__}: use MPSCNNUpsamplingNearestGradient or MPSCNNUpsamplingBilinearGradient (the base class cannot be created)")
        MPSCNNGradientKernel.__init__(self, device)
        owner = type(self).__name__
        self._sx = integer_scale_factor(owner, "integer_scale_factor_x", integer_scale_factor_x)
        self._sy = integer_scale_factor(owner, "integer_scale_factor_y", integer_scale_factor_y)

    scale_factor_x = property(lambda self: float(self._sx), doc="Horizontal factor of the forward pass.")
    scale_factor_y = property(lambda self: float(self._sy), doc="Vertical factor of the forward pass.")

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image")
        return primary_channels

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        # the forward source (secondary) gives the result size (spec §5)
        desc = desc.copy()
        desc.width, desc.height = source_images[1].width, source_images[1].height
        return desc

    def _take_gradient_states(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> bool:
        found = super()._take_gradient_states(source_images, source_states)
        if found:
            st = self._gradient_state
            assert st is not None
            method = getattr(st, "method", None)
            if method is None:
                raise MPSTypeError(f"{self._name()}: `gradient_state` must come from an MPSCNNUpsampling forward encode, "
                                   f"but it was made by {st.geometry.kernel_class}")
            if method != self._method:
                raise value_error(self._name(), "gradient_state", f"a state of {st.geometry.kernel_class}",
                                  f"come from an MPSCNNUpsampling{self._method.capitalize()} forward encode")  # type: ignore[union-attr]
            for axis, mine, theirs in (("x", self._sx, st.scale_factor_x), ("y", self._sy, st.scale_factor_y)):  # type: ignore[attr-defined]
                if float(mine) != float(theirs):
                    raise value_error(self._name(), f"scale_factor_{axis}", float(mine),
                                      f"equal the forward pass's scale_factor_{axis}={float(theirs)} recorded in gradient_state")
            g = st.geometry
            sec = source_images[1] if len(source_images) > 1 else None
            if sec is not None and (sec.width, sec.height) != (g.source_width, g.source_height):
                raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}",
                                  f"have the forward source's size {g.source_width}x{g.source_height}")
        return found

    def _forward_align_corners(self) -> bool:
        """The forward's ``align_corners`` from the gradient state (False without one)."""
        return bool(getattr(self._gradient_state, "align_corners", False))

    def _check_incoming(self, prim: MPSImage, sec: MPSImage, f: ForwardGeometry | None) -> None:
        if f is None:
            want = upsampled_size(sec.width, sec.height, self._sx, self._sy)
            if (prim.width, prim.height) != want:
                raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}",
                                  f"be scale_factor x source_image = {want[0]}x{want[1]} when no gradient_state is given")
            return
        c = f.clip_rect
        dw = f.destination_width or prim.width
        dh = f.destination_height or prim.height
        x1 = min(c.origin.x + c.size.width, dw)
        y1 = min(c.origin.y + c.size.height, dh)
        if prim.width < x1 or prim.height < y1:
            raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}",
                              f"cover the region the forward pass wrote (up to x={x1}, y={y1})")

    def _adjoint(self, g: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        f = self._forward
        if (dest.width, dest.height) != (sec.width, sec.height):
            raise value_error(self._name(), "destination_gradient", f"{dest.width}x{dest.height}",
                              f"have the forward source's size {sec.width}x{sec.height}")
        self._check_incoming(prim, sec, f)
        uw, uh = upsampled_size(sec.width, sec.height, self._sx, self._sy)
        if f is not None:
            # U position q was read by forward destination pixel q - offset*s + clip origin
            left = f.clip_rect.origin.x - f.offset.x * self._sx
            top = f.clip_rect.origin.y - f.offset.y * self._sy
        else:
            left = top = 0
        g = prim.tensor[pg.n0:pg.n0 + region.count, :, :, pg.c0:pg.c0 + pg.channels]
        gu = read_window(g, left, top, uw, uh, MPSImageEdgeMode.zero, 1, 1, pg.bounds)
        whole = (region.x0, region.y0, region.width, region.height) == (0, 0, sec.width, sec.height)
        dx = self._adjoint(gu, result_dtype(dest), direct_out(dest, region) if whole else None)
        write_result(dest, region, dx[:, region.y0:region.y0 + region.height, region.x0:region.x0 + region.width, :])


class MPSCNNUpsamplingNearestGradient(MPSCNNUpsamplingGradient):
    """``MPSCNNUpsamplingNearestGradient``: ``dIn[y][x] = sum of g over the sX x sY block
    [sY*y, sY*y + sY) x [sX*x, sX*x + sX)`` (the spec's documented example has a typo, "a2 a3"
    for "a3 a4"; the block sum is the intended rule).

    ``MPSCNNUpsamplingNearestGradient(device, integer_scale_factor_x=sX,
    integer_scale_factor_y=sY)``; see :class:`MPSCNNUpsamplingGradient` for encoding.
    Accumulation is float32, rounded once on store.
    """

    _method = "nearest"

    def _adjoint(self, g: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        return up.upsample_nearest_gradient_nhwc(g, self._sx, self._sy, out_dtype, out)


class MPSCNNUpsamplingBilinearGradient(MPSCNNUpsamplingGradient):
    """``MPSCNNUpsamplingBilinearGradient``: the adjoint of bilinear upsampling: every incoming
    value is handed to the (up to four) source pixels its forward sample read, with the
    forward weights, and the contributions are summed (float32, fixed order: deterministic).

    ``MPSCNNUpsamplingBilinearGradient(device, integer_scale_factor_x=sX,
    integer_scale_factor_y=sY)``. Mapping: the forward's ``align_corners`` recorded in the
    gradient state; ``align_corners = False`` without a state (the spec's reading, INFERRED:
    the class has no ``alignCorners`` property). See :class:`MPSCNNUpsamplingGradient`.
    """

    _method = "bilinear"

    def _adjoint(self, g: torch.Tensor, out_dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
        return up.upsample_bilinear_gradient_nhwc(g, self._sx, self._sy, self._forward_align_corners(), out_dtype, out)

