"""Kernel base classes: MPSKernel and MPSCNNKernel (two-input bases in ``binary_kernel.py``).

The destination -> source coordinate rule (kernel-base.md §2.2), for each destination pixel
``(x, y)`` in the effective clip rectangle ``R`` and image slot ``m``::

    i = x - clip_rect.origin.x ;  j = y - clip_rect.origin.y
    n_src = offset.z + m ;        n_dst = clip_rect.origin.z + m
    cx = offset.x + i*stride_x ;  cy = offset.y + j*stride_y      # window centre
    left = cx - (kWd >> 1) ;      top = cy - (kHd >> 1)           # kWd = (kW-1)*dX + 1
    tap (p, q) reads source (left + p*dX, top + q*dY)

Reads outside the source follow ``edge_mode``. ``R`` is ``clip_rect`` intersected with the
destination; only ``R`` and the channels ``[destination_feature_channel_offset,
destination_feature_channel_offset + N)`` are written. Source channels used are
``[source_feature_channel_offset, source_feature_channel_offset + Nin)`` with ``Nin =
min(source_feature_channel_max_count, source.feature_channels - source_feature_channel_offset)``.

Subclasses set the window (``_kernel_width`` ...), say how many channels they produce
(:meth:`MPSCNNKernel.output_feature_channels`) and implement ``_encode_region`` with the
numerics (through ``mpsnn.backends``). Encoding never synchronises the host with the GPU.
"""
from __future__ import annotations

import copy as _copy
from typing import Any, Sequence

from ..images.image import MPSImage, MPSImageAllocator, MPSImageDescriptor, MPSTemporaryImage
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .device import Device, MTLCommandBuffer, as_device
from .enums import MPSImageEdgeMode, MPSKernelOptions, MPSNNPaddingMethod
from .errors import MPSDeviceError, MPSStateError, MPSTypeError, MPSValueError, value_error
from .padding import MPSNNDefaultPadding, MPSNNPadding, apply_padding_method, as_padding, method_of
from .structs import MPSOffset, MPSRectNoClip, MTLRegion

ULONG_MAX = (1 << 64) - 1
_DEFAULT_PADDING = int(MPSNNPaddingMethod.alignCentered | MPSNNPaddingMethod.addRemainderToTopLeft | MPSNNPaddingMethod.sizeSame)


class InputGeometry:
    """Where one input of an encode is read: images, channels and the source coordinate of
    the window centre of the first destination pixel written. One is made per encode, so it
    is a plain slotted record (cheaper to build than a frozen dataclass)."""

    __slots__ = ("n0", "c0", "channels", "cx0", "cy0", "stride_x", "stride_y", "kernel_width", "kernel_height",
                 "dilation_x", "dilation_y", "edge_mode", "bounds")

    def __init__(self, n0: int, c0: int, channels: int, cx0: int, cy0: int, stride_x: int, stride_y: int,
                 kernel_width: int, kernel_height: int, dilation_x: int, dilation_y: int, edge_mode: MPSImageEdgeMode,
                 bounds: tuple[int, int, int, int] | None = None) -> None:
        self.n0, self.c0, self.channels, self.cx0, self.cy0 = n0, c0, channels, cx0, cy0
        self.stride_x, self.stride_y, self.kernel_width, self.kernel_height = stride_x, stride_y, kernel_width, kernel_height
        self.dilation_x, self.dilation_y, self.edge_mode, self.bounds = dilation_x, dilation_y, edge_mode, bounds

    @property
    def window_left(self) -> int:
        return self.cx0 - (((self.kernel_width - 1) * self.dilation_x + 1) >> 1)

    @property
    def window_top(self) -> int:
        return self.cy0 - (((self.kernel_height - 1) * self.dilation_y + 1) >> 1)

    def __repr__(self) -> str:
        return "InputGeometry(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


class Region:
    """The part of the destination an encode writes (a plain slotted record)."""

    __slots__ = ("n0", "count", "x0", "y0", "width", "height", "c0", "channels")

    def __init__(self, n0: int, count: int, x0: int, y0: int, width: int, height: int, c0: int, channels: int) -> None:
        self.n0, self.count, self.x0, self.y0 = n0, count, x0, y0
        self.width, self.height, self.c0, self.channels = width, height, c0, channels

    def index(self) -> tuple[slice, slice, slice, slice]:
        return (slice(self.n0, self.n0 + self.count), slice(self.y0, self.y0 + self.height),
                slice(self.x0, self.x0 + self.width), slice(self.c0, self.c0 + self.channels))

    def covers(self, image: MPSImage) -> bool:
        return (self.n0 == 0 and self.count == image.number_of_images and self.x0 == 0 and self.y0 == 0
                and self.width == image.width and self.height == image.height and self.c0 == 0
                and self.channels == image.feature_channels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Region) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Region(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def _check_multiple_of_4(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 4:
        raise value_error(owner, name, value, "be a non-negative multiple of 4")
    return value


def _root(image: MPSImage) -> MPSImage:
    while image.parent is not None:
        image = image.parent
    return image


def _typed_property(attr: str, name: str, cls: type) -> property:
    """A read-write property that accepts only instances of ``cls``."""
    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        if not isinstance(value, cls):
            raise MPSTypeError(f"{self._name()}: `{name}` must be an {cls.__name__}, but got {type(value).__name__}")
        setattr(self, attr, value)
    return property(get, set_)


def _channel_offset_property(attr: str, name: str) -> property:
    """A feature-channel offset: a non-negative multiple of 4."""
    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        setattr(self, attr, _check_multiple_of_4(self._name(), name, value))
    return property(get, set_)


def _positive_property(attr: str, name: str, axis: int | None = None) -> property:
    """An integer >= 1 (channel max counts, strides); ``axis`` indexes a [x, y] list."""
    def get(self):  # type: ignore[no-untyped-def]
        v = getattr(self, attr)
        return v if axis is None else v[axis]

    def set_(self, value):  # type: ignore[no-untyped-def]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise value_error(self._name(), name, value, "be an integer >= 1")
        if axis is None:
            setattr(self, attr, value)
        else:
            getattr(self, attr)[axis] = value
    return property(get, set_)


def _edge_mode_property(attr: str, name: str) -> property:
    def get(self):  # type: ignore[no-untyped-def]
        return getattr(self, attr)

    def set_(self, value):  # type: ignore[no-untyped-def]
        try:
            setattr(self, attr, MPSImageEdgeMode(value))
        except ValueError:
            raise value_error(self._name(), name, value, "be an MPSImageEdgeMode") from None
    return property(get, set_)


class MPSKernel:
    """``MPSKernel``: root of every operation object.

    Args:
        device: the device the kernel runs on (positional, first).

    Properties: ``device`` (read-only), ``options`` (:class:`MPSKernelOptions`), ``label``.
    ``copy(device=None)`` makes an independent copy, optionally for another device.
    """

    def __init__(self, device: Device | str) -> None:
        self._device = as_device(device, type(self).__name__)
        self.options = MPSKernelOptions.none
        self.label: str | None = None

    @property
    def device(self) -> Device:
        return self._device

    def copy(self, device: Device | str | None = None) -> "MPSKernel":
        """``copyWithZone:device:``: an independent copy, on ``device`` when given."""
        new = _copy.copy(self)
        new.__dict__ = {k: _copy.copy(v) for k, v in self.__dict__.items()}
        if device is not None:
            new._device = as_device(device, type(self).__name__)
            new._moved_to_device()
        return new

    def _moved_to_device(self) -> None:
        """Hook for subclasses that keep device tensors (weights, slopes)."""

    def _name(self) -> str:
        return type(self).__name__ + (f" {self.label!r}" if self.label else "")

    # -- shared validation ---------------------------------------------------------------
    def _check_command_buffer(self, command_buffer: Any) -> MTLCommandBuffer:
        if not isinstance(command_buffer, MTLCommandBuffer):
            raise MPSTypeError(f"{self._name()}: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
        if command_buffer.device != self.device:
            raise MPSDeviceError(f"{self._name()}: `command_buffer` must be on the kernel's device {self.device}, but it is on {command_buffer.device}")
        command_buffer.check_encodable(self._name())
        return command_buffer

    def _check_image(self, name: str, image: Any, command_buffer: MTLCommandBuffer) -> MPSImage:
        if not isinstance(image, MPSImage):
            raise MPSTypeError(f"{self._name()}: `{name}` must be an MPSImage, but got {type(image).__name__}")
        if image.device != self.device:
            raise MPSDeviceError(f"{self._name()}: `{name}` must be on the kernel's device {self.device}, but it is on {image.device}")
        if isinstance(image, MPSTemporaryImage):
            if image.read_count == 0:
                raise MPSStateError(f"{self._name()}: `{name}` {image._name()} was used after its `read_count` reached 0")
            if image.command_buffer is not command_buffer:
                raise MPSStateError(f"{self._name()}: `{name}` {image._name()} is a temporary image of another command buffer")
        return image

    def _check_state(self, name: str, state: Any, command_buffer: MTLCommandBuffer, cls: type[MPSState] = MPSState) -> Any:
        if not isinstance(state, cls):
            raise MPSTypeError(f"{self._name()}: `{name}` must be an {cls.__name__}, but got {type(state).__name__}")
        if state.device != self.device:
            raise MPSDeviceError(f"{self._name()}: `{name}` must be on the kernel's device {self.device}, but it is on {state.device}")
        state.check_usable(self._name(), command_buffer)
        return state

    def _finish_descriptor(self, desc: MPSImageDescriptor, method: int, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        """Steps 2-4 of the destination-descriptor pipeline (kernel-base.md §2.9): the
        subclass hook, each source state's hook, then a custom padding policy's hook."""
        desc = self._customize_descriptor(desc, source_images, source_states)
        for st in source_states or []:
            desc = st.destination_image_descriptor_for_source_images(source_images, source_states, self, desc)
        if method & int(MPSNNPaddingMethod.custom):
            desc = self._padding.destination_image_descriptor_for_source_images(source_images, source_states, self, desc)  # type: ignore[attr-defined]
        return desc

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        """Subclass hook (step 2 of the pipeline); the default keeps the descriptor."""
        return desc

    def _check_no_alias(self, dest: MPSImage, *sources: MPSImage) -> None:
        root = _root(dest)
        for s in sources:
            if _root(s) is root:
                raise MPSValueError(f"{self._name()}: `destination_image` must not alias a source image, but both use the storage of {root._name()}")

    def __repr__(self) -> str:
        return f"<{self._name()} on {self.device}>"


def _consume(objs: Sequence[Any]) -> None:
    """Decrement once per unique temporary image/state read by an encode."""
    seen: set[int] = set()
    for obj in objs:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, MPSTemporaryImage) or (isinstance(obj, MPSState) and obj.is_temporary):
            obj.consume_read()


def _clip_region(owner: str, clip: MTLRegion, dest: MPSImage, images_available: int) -> tuple[int, int, int, int, int, int]:
    """Effective clip: (n0, count, x0, y0, width, height); count/size may be 0."""
    if clip.origin.x < 0 or clip.origin.y < 0 or clip.origin.z < 0:
        raise value_error(owner, "clip_rect.origin", clip.origin, "be non-negative")
    x0, y0, z0 = clip.origin.x, clip.origin.y, clip.origin.z
    x1 = min(x0 + clip.size.width, dest.width)
    y1 = min(y0 + clip.size.height, dest.height)
    if clip.size.depth >= ULONG_MAX:
        count = min(dest.number_of_images - z0, images_available)
    else:
        count = clip.size.depth
        if z0 + count > dest.number_of_images:
            raise value_error(owner, "clip_rect", clip, f"address destination images inside [0, {dest.number_of_images})",
                              f"origin.z + size.depth = {z0 + count}")
        if count > images_available:
            raise value_error(owner, "clip_rect.size.depth", count, f"be <= the {images_available} source images available from offset.z")
    return z0, max(0, count), x0, y0, max(0, x1 - x0), max(0, y1 - y0)


class MPSCNNKernel(MPSKernel):
    """``MPSCNNKernel``: base of every single-input CNN kernel.

    Properties (snake_case of Apple's): ``offset`` (:class:`MPSOffset`, default 0),
    ``clip_rect`` (default :data:`MPSRectNoClip`), ``destination_feature_channel_offset``,
    ``source_feature_channel_offset`` (multiples of 4, default 0),
    ``source_feature_channel_max_count`` (default ULONG_MAX), ``edge_mode`` (default zero),
    read-only ``kernel_width``, ``kernel_height``, ``stride_in_pixels_x/_y``,
    ``dilation_rate_x/_y``, ``is_backwards``, ``is_state_modified``; ``padding`` (default
    ``alignCentered | addRemainderToTopLeft | sizeSame``), ``destination_image_allocator``
    (default :attr:`MPSTemporaryImage.default_allocator`).

    Encode forms:

    * ``encode(cb, source_image, destination_image)`` writes into ``destination_image``
      (uses ``offset`` as set, ignores ``padding``).
    * ``encode(cb, source_image)`` returns a new image sized by ``padding`` (sets ``offset``).
    * ``encode(cb, source_image, destination_state=s, destination_image=d)`` also fills a
      result state; ``encode(cb, source_image, destination_state_is_temporary=flag)`` returns
      ``(image, state)``.
    * ``encode_batch(cb, source_images[, destination_images])`` for lists of images, with the
      same state options (``destination_states``).
    """

    _kernel_width = 1
    _kernel_height = 1
    _stride_x = 1
    _stride_y = 1
    _dilation_x = 1
    _dilation_y = 1
    _is_backwards = False
    _is_state_modified = False
    _default_padding = _DEFAULT_PADDING
    #: class of the state ``result_state`` makes (None: the kernel produces no state)
    _result_state_class: type | None = MPSNNGradientState

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self._offset = MPSOffset(0, 0, 0)
        self._clip_rect = MPSRectNoClip
        self._dst_c_off = 0
        self._src_c_off = 0
        self._src_c_max = ULONG_MAX
        self._edge_mode = MPSImageEdgeMode.zero
        self._padding: MPSNNPadding = MPSNNDefaultPadding.padding_with_method(self._default_padding)
        self._allocator: MPSImageAllocator = MPSTemporaryImage.default_allocator

    # -- properties ------------------------------------------------------------------------------
    offset = _typed_property("_offset", "offset", MPSOffset)
    clip_rect = _typed_property("_clip_rect", "clip_rect", MTLRegion)
    destination_feature_channel_offset = _channel_offset_property("_dst_c_off", "destination_feature_channel_offset")
    source_feature_channel_offset = _channel_offset_property("_src_c_off", "source_feature_channel_offset")
    source_feature_channel_max_count = _positive_property("_src_c_max", "source_feature_channel_max_count")
    edge_mode = _edge_mode_property("_edge_mode", "edge_mode")

    @property
    def padding(self) -> MPSNNPadding:
        return self._padding

    @padding.setter
    def padding(self, value: MPSNNPadding | int) -> None:
        self._padding = as_padding(value, self._name())

    @property
    def destination_image_allocator(self) -> MPSImageAllocator:
        return self._allocator

    @destination_image_allocator.setter
    def destination_image_allocator(self, value: MPSImageAllocator) -> None:
        if not isinstance(value, MPSImageAllocator):
            raise MPSTypeError(f"{self._name()}: `destination_image_allocator` must be an MPSImageAllocator, but got {type(value).__name__}")
        self._allocator = value

    kernel_width = property(lambda self: self._kernel_width)
    kernel_height = property(lambda self: self._kernel_height)
    stride_in_pixels_x = property(lambda self: self._stride_x)
    stride_in_pixels_y = property(lambda self: self._stride_y)
    dilation_rate_x = property(lambda self: self._dilation_x)
    dilation_rate_y = property(lambda self: self._dilation_y)
    is_backwards = property(lambda self: self._is_backwards)
    is_state_modified = property(lambda self: self._is_state_modified)

    def is_result_state_reused_across_batch(self) -> bool:
        return False

    def append_batch_barrier(self) -> bool:
        return False

    def encoding_storage_size(self, source_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> int:
        """Extra temporary memory an encode needs beyond its images: mpsnn reports 0."""
        return 0

    # -- channel and size rules -------------------------------------------------------------------
    def source_channels_used(self, source: MPSImage) -> int:
        """``Nin`` for ``source`` (kernel-base.md §2.4); raises if none are left."""
        avail = source.feature_channels - self._src_c_off
        if avail <= 0:
            raise value_error(self._name(), "source_feature_channel_offset", self._src_c_off,
                              f"be < the source's feature_channels={source.feature_channels}")
        return min(self._src_c_max, avail)

    def _result_feature_channels(self, source_channels: int) -> int:
        """Channels this kernel writes for ``source_channels`` input channels (default: the same)."""
        return source_channels

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """``destinationImageDescriptor(sourceImages:sourceStates:)``: the result descriptor.

        Runs the pipeline of kernel-base.md §2.9 and **sets ``offset``** (x, y) as a side effect:
        padding method -> subclass hook -> each source state's hook -> custom padding hook.
        """
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        if not source_images:
            raise value_error(self._name(), "source_images", source_images, "hold at least one image")
        src = source_images[0]
        method = method_of(self._padding)
        r = apply_padding_method(method, src.width, src.height, self._kernel_width, self._kernel_height,
                                 self._stride_x, self._stride_y, self._dilation_x, self._dilation_y, self._is_backwards)
        if r.width < 1 or r.height < 1:
            raise value_error(self._name(), "source image", f"{src.width}x{src.height}",
                              f"be large enough for the {self._kernel_width}x{self._kernel_height} window under {self._padding.label}",
                              f"a {r.width}x{r.height} result")
        self._apply_padding_offsets(r)
        desc = MPSImageDescriptor._trusted(src.feature_channel_format, r.width, r.height,
                                           self._result_feature_channels(self.source_channels_used(src)), src.number_of_images)
        return self._finish_descriptor(desc, method, source_images, source_states)

    def _apply_padding_offsets(self, r: Any) -> None:
        self._offset = MPSOffset(r.offset_x, r.offset_y, self._offset.z)

    # -- result states ----------------------------------------------------------------------------------
    def _geometry(self, source: MPSImage, dest: MPSImage | None) -> ForwardGeometry:
        return ForwardGeometry(
            kernel_class=type(self).__name__, offset=self._offset, clip_rect=self._clip_rect,
            kernel_width=self._kernel_width, kernel_height=self._kernel_height,
            stride_in_pixels_x=self._stride_x, stride_in_pixels_y=self._stride_y,
            dilation_rate_x=self._dilation_x, dilation_rate_y=self._dilation_y, edge_mode=self._edge_mode,
            source_feature_channel_offset=self._src_c_off, source_feature_channel_max_count=self._src_c_max,
            destination_feature_channel_offset=self._dst_c_off, source_width=source.width, source_height=source.height,
            source_feature_channels=source.feature_channels, source_number_of_images=source.number_of_images,
            destination_width=dest.width if dest is not None else 0, destination_height=dest.height if dest is not None else 0)

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        if self._result_state_class is None:
            return None
        return self._result_state_class(self._geometry(source, dest), self.device, command_buffer)

    def result_state(self, source_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> MPSState | None:
        """``resultStateForSourceImage:sourceStates:destinationImage:``: a non-temporary state
        for the encode to fill (None for kernels without one)."""
        return self._make_state(source_image, destination_image, None)

    def temporary_result_state(self, command_buffer: MTLCommandBuffer, source_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> MPSState | None:
        """The same, temporary on ``command_buffer``."""
        return self._make_state(source_image, destination_image, self._check_command_buffer(command_buffer))

    def result_state_batch(self, source_image: Sequence[MPSImage], source_states: Sequence[Sequence[MPSState]] | None = None, destination_image: Sequence[MPSImage] | None = None) -> list[MPSState] | None:
        return self._state_batch(None, source_image, destination_image)

    def temporary_result_state_batch(self, command_buffer: MTLCommandBuffer, source_image: Sequence[MPSImage], source_states: Sequence[Sequence[MPSState]] | None = None, destination_image: Sequence[MPSImage] | None = None) -> list[MPSState] | None:
        return self._state_batch(self._check_command_buffer(command_buffer), source_image, destination_image)

    def _state_batch(self, cb: MTLCommandBuffer | None, sources: Sequence[MPSImage], dests: Sequence[MPSImage] | None) -> list[MPSState] | None:
        if self._result_state_class is None:
            return None
        if self.is_result_state_reused_across_batch():
            one = self._make_state(sources[0], dests[0] if dests else None, cb)
            return [one] * len(sources)  # type: ignore[list-item]
        return [self._make_state(s, dests[k] if dests else None, cb) for k, s in enumerate(sources)]  # type: ignore[misc]

    # aliases with Apple's Objective-C spellings
    result_state_for_source_image = result_state
    temporary_result_state_for_command_buffer = temporary_result_state
    result_state_batch_for_source_image = result_state_batch
    temporary_result_state_batch_for_command_buffer = temporary_result_state_batch

    # -- encode ---------------------------------------------------------------------------------------
    def encode(
        self,
        command_buffer: MTLCommandBuffer,
        source_image: MPSImage,
        destination_image: MPSImage | None = None,
        *,
        destination_state: MPSState | None = None,
        destination_state_is_temporary: bool | None = None,
    ) -> Any:
        """Encode the kernel; see the class docstring for the forms and what each returns."""
        cb = self._check_command_buffer(command_buffer)
        src = self._check_image("source_image", source_image, cb)
        if destination_image is not None:
            if destination_state_is_temporary is not None:
                raise MPSValueError(f"{self._name()}: `destination_state_is_temporary` goes with the forms that return the result, not with `destination_image`")
            self._encode_checked(cb, src, destination_image, destination_state)
            _consume([src])
            return None
        if destination_state is not None:
            raise MPSValueError(f"{self._name()}: `destination_state` needs `destination_image`; use `destination_state_is_temporary` to get a new state")
        desc = self.destination_image_descriptor([src], None)
        dest = self._allocator.image_for_command_buffer(cb, desc, self)
        state = None
        if destination_state_is_temporary is not None:
            state = self._make_state(src, dest, cb if destination_state_is_temporary else None)
        self._encode_checked(cb, src, dest, state)
        _consume([src])
        return (dest, state) if destination_state_is_temporary is not None else dest

    def encode_batch(
        self,
        command_buffer: MTLCommandBuffer,
        source_images: Sequence[MPSImage],
        destination_images: Sequence[MPSImage] | None = None,
        *,
        destination_states: Sequence[MPSState] | None = None,
        destination_state_is_temporary: bool | None = None,
    ) -> Any:
        """Batch form: ``source_images[k] -> destination_images[k]``; returns the new batch (and
        states) when ``destination_images`` is omitted. Read counts drop once per unique image."""
        cb = self._check_command_buffer(command_buffer)
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        if destination_images is not None:
            if len(destination_images) != len(srcs):
                raise value_error(self._name(), "destination_images", f"{len(destination_images)} images", f"match the {len(srcs)} source images")
            if destination_states is not None and len(destination_states) != len(srcs):
                raise value_error(self._name(), "destination_states", f"{len(destination_states)} states", f"match the {len(srcs)} source images")
            for k, (s, d) in enumerate(zip(srcs, destination_images)):
                for other in srcs:
                    self._check_no_alias(d, other)
                self._encode_checked(cb, s, d, destination_states[k] if destination_states else None)
            _consume(srcs)
            return None
        if not srcs:
            return ([], []) if destination_state_is_temporary is not None else []
        for k, s in enumerate(srcs):
            if s.number_of_images != 1:
                raise value_error(self._name(), f"source_images[{k}].number_of_images", s.number_of_images, "be 1 in the batch forms that return images")
        desc = self.destination_image_descriptor([srcs[0]], None)
        dests = self._allocator.image_batch_for_command_buffer(cb, desc, self, len(srcs))
        states = None
        if destination_state_is_temporary is not None:
            states = self._state_batch(cb if destination_state_is_temporary else None, srcs, dests)
        for k, (s, d) in enumerate(zip(srcs, dests)):
            self._encode_checked(cb, s, d, states[k] if states else None)
        _consume(srcs)
        return (dests, states) if destination_state_is_temporary is not None else dests

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        self._check_no_alias(dest, src)
        nin = self.source_channels_used(src)
        nout = self._result_feature_channels(nin)
        if self._dst_c_off + nout > dest.feature_channels:
            raise value_error(self._name(), "destination_image.feature_channels", dest.feature_channels,
                              f"be >= destination_feature_channel_offset + {nout} output channels = {self._dst_c_off + nout}")
        if self._offset.z < 0 or self._offset.z >= src.number_of_images:
            raise value_error(self._name(), "offset.z", self._offset.z, f"address a source image in [0, {src.number_of_images})")
        n0, count, x0, y0, w, h = _clip_region(self._name(), self._clip_rect, dest, src.number_of_images - self._offset.z)
        if state is not None:
            state = self._check_state("destination_state", state, cb)
            if isinstance(state, MPSNNGradientState):
                state.geometry = self._geometry(src, dest)
        region = Region(n0, count, x0, y0, w, h, self._dst_c_off, nout)
        inp = InputGeometry(
            n0=self._offset.z, c0=self._src_c_off, channels=nin,
            cx0=self._offset.x + (x0 - self._clip_rect.origin.x) * self._stride_x,
            cy0=self._offset.y + (y0 - self._clip_rect.origin.y) * self._stride_y,
            stride_x=self._stride_x, stride_y=self._stride_y, kernel_width=self._kernel_width, kernel_height=self._kernel_height,
            dilation_x=self._dilation_x, dilation_y=self._dilation_y, edge_mode=self._edge_mode)
        if count == 0 or w == 0 or h == 0:
            return
        with cb.encoding(self._name()):
            self._encode_region(cb, src, inp, dest, region, state)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _encode_region")
