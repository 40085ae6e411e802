"""Image resampling: MPSScaleTransform, MPSImageScale, MPSImageBilinearScale,
MPSImageLanczosScale (spec/upsampling-resampling.md §6).

Mapping. ``MPSScaleTransform`` ``(scale_x, scale_y, translate_x, translate_y)`` means
``dest_pos = source_pos * scale + translate`` per axis, translation in destination pixels,
``dest_pos = (0, 0)`` being the top-left corner of the destination clip rectangle. Pixel
centres are handled internally: destination index ``i`` (counted from
``clip_rect.origin.x``) samples the source at pixel-index coordinate::

    u = offset.x + (i + 0.5 - translate_x) / scale_x - 0.5          (v likewise)

(the exact expression is INFERRED in the spec). With no transform (``scale_transform`` None,
the default) the whole source is fitted into the written region ``R`` (the clip rectangle
intersected with the destination): ``scale_x = R.width / W_src``, ``scale_y = R.height /
H_src``, translation 0. ``offset.x/y`` add to the source coordinate (default 0, so the
spec's mapping is unchanged; inferred from kernel-base.md's "offset = source position of
the clip origin"); ``offset.z``, ``clip_rect`` depth, channel offsets and batches follow
kernel-base.md.

Filters:

* Bilinear: taps ``floor(u)``, ``floor(u) + 1`` (and rows alike), weights ``1 - t``, ``t``.
  No low-pass prefilter: down-scaling by more than 2x drops information (Apple's caution).
* Lanczos: ``L(x) = sinc(x) sinc(x/3)`` for ``|x| < 3`` (a = 3 lobes, INFERRED); when
  down-scaling (``f = 1/scale > 1``) the kernel is stretched, tap ``k`` weighing
  ``L((k - u)/f)``; weights normalised to sum 1 per axis (INFERRED). Separable: the 2-D
  weight of a tap is the product of its axis weights.

Samples outside the source are clamped to the edge (INFERRED): ``edge_mode`` exists (Apple's
image kernels have it) but does not change these filters. Arithmetic is float32, rounded
once on store. The kernels produce no state.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import resampling as rs
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.padding import method_of
from ..core.structs import MPSOffset
from ..images import formats as fm
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import MPSState
from .results import write_result

__all__ = ["MPSImageBilinearScale", "MPSImageLanczosScale", "MPSImageScale", "MPSScaleTransform"]


@dataclass(frozen=True)
class MPSScaleTransform:
    """``MPSScaleTransform``: ``dest = source * scale + translate`` per axis (the
    ``CGAffineTransform`` ``a = scale_x, d = scale_y, tx = translate_x, ty = translate_y``,
    ``b = c = 0``); translation in destination pixels. Fields default to 0.0 like the C
    struct's zero initialiser; a kernel accepts only finite values with ``scale > 0``."""

    scale_x: float = 0.0
    scale_y: float = 0.0
    translate_x: float = 0.0
    translate_y: float = 0.0


# -- shape rules -----------------------------------------------------------------------------------------


def fit_transform(source_width: int, source_height: int, region_width: int, region_height: int) -> MPSScaleTransform:
    """The transform used when ``scale_transform`` is None: the whole source fills the region."""
    return MPSScaleTransform(region_width / source_width, region_height / source_height, 0.0, 0.0)


def scaled_size(source_size: int, scale: float) -> int:
    """Auto-sized result extent along one axis: ``round(source_size * scale)``, at least 1."""
    return max(1, int(math.floor(source_size * scale + 0.5)))


# -- validation -------------------------------------------------------------------------------------------


def _check_transform(owner: str, value: Any) -> MPSScaleTransform | None:
    if value is None:
        return None
    if not isinstance(value, MPSScaleTransform):
        raise MPSTypeError(f"{owner}: `scale_transform` must be an MPSScaleTransform or None, but got {type(value).__name__}")
    for name in ("scale_x", "scale_y", "translate_x", "translate_y"):
        v = getattr(value, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise value_error(owner, f"scale_transform.{name}", v, "be a finite real number")
        if name.startswith("scale") and v <= 0:
            raise value_error(owner, f"scale_transform.{name}", v, "be > 0")
    # the struct is copied into the kernel (Apple copies on set)
    return MPSScaleTransform(float(value.scale_x), float(value.scale_y), float(value.translate_x), float(value.translate_y))


class MPSImageScale(MPSCNNKernel):
    """``MPSImageScale``: base of the resampling filters (Apple: an ``MPSUnaryImageKernel``).

    Args:
        device: the device (positional, first; ``initWithDevice:``).

    Properties: ``scale_transform`` (:class:`MPSScaleTransform` or None, default None = fit
    the source into the destination clip rectangle; setting copies the value); ``offset``,
    ``clip_rect``, ``edge_mode`` (no effect: samples are clamped), the channel offsets and
    the rest of :class:`~mpsnn.MPSCNNKernel`'s.

    Encode: ``encode(cb, source_image, destination_image)`` (the destination's size is the
    result size) and ``encode_batch(cb, source_images, destination_images)``. mpsnn extension:
    ``encode(cb, source_image)`` / ``encode_batch(cb, source_images)`` return a new result of
    ``round(W*scale_x) x round(H*scale_y)`` (the source's size without a transform) and set
    ``offset`` to ``(0, 0, offset.z)``. This base class has no filter: encoding it raises
    :class:`~mpsnn.MPSTypeError`; use :class:`MPSImageBilinearScale` or
    :class:`MPSImageLanczosScale`.
    """

    _method: str | None = None
    _result_state_class = None

    def __init__(self, device: Device | str) -> None:
        MPSCNNKernel.__init__(self, device)
        self._transform: MPSScaleTransform | None = None

    @property
    def scale_transform(self) -> MPSScaleTransform | None:
        return self._transform

    @scale_transform.setter
    def scale_transform(self, value: MPSScaleTransform | None) -> None:
        self._transform = _check_transform(self._name(), value)

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        t = self._transform
        w, h = (src.width, src.height) if t is None else (scaled_size(src.width, t.scale_x), scaled_size(src.height, t.scale_y))
        self._offset = MPSOffset(0, 0, self._offset.z)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, w, h, self.source_channels_used(src), src.number_of_images)
        return self._finish_descriptor(desc, method_of(self._padding), source_images, source_states)

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        if self._method is None:
            raise MPSTypeError(f"{self._name()}: MPSImageScale has no resampling filter; encode MPSImageBilinearScale or MPSImageLanczosScale")
        super()._encode_checked(cb, src, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        t = self._transform or fit_transform(src.width, src.height, region.width, region.height)
        clip = self._clip_rect.origin
        # destination index i counts from the clip origin: fold the region start into translate
        tx = t.translate_x - (region.x0 - clip.x)
        ty = t.translate_y - (region.y0 - clip.y)
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels]
        assert self._method is not None
        y = rs.image_scale_nhwc(x, region.width, region.height, t.scale_x, t.scale_y, tx, ty, self._method,
                                float(self._offset.x), float(self._offset.y))
        if y.dtype != dest.dtype and dest.feature_channel_format not in fm.UNORM_MAX:
            y = y.to(dest.dtype)
        write_result(dest, region, y)


class MPSImageBilinearScale(MPSImageScale):
    """``MPSImageBilinearScale``: resample with bilinear interpolation (module docstring for the
    mapping). ``MPSImageBilinearScale(device)``; set ``scale_transform`` for a region of
    interest. No low-pass prefilter (down-scaling by more than 2x aliases).

    Example::

        k = MPSImageBilinearScale(device)
        k.encode(command_buffer, source, destination)     # source fitted into destination
    """

    _method = "bilinear"


class MPSImageLanczosScale(MPSImageScale):
    """``MPSImageLanczosScale``: Lanczos resampling, a = 3 lobes (INFERRED), the window
    stretched by the down-scale factor so that no prefilter is needed; weights normalised
    to sum 1 (INFERRED); may ring at sharp edges. ``MPSImageLanczosScale(device)``. Tap
    tables are built once per geometry and cached per device (changing the scale costs one
    small table build, like Apple's "expensive recomputation of internal state")."""

    _method = "lanczos"

