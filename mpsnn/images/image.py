"""MPSImageDescriptor, MPSImage, MPSTemporaryImage, allocators and image-batch helpers.

Storage
-------
An ``MPSImage`` of ``number_of_images`` images, ``height`` x ``width`` pixels and
``feature_channels`` channels is one NHWC torch tensor ``[N, H, W, C]`` on its device
(``image.tensor``; zero-copy in and out with :meth:`MPSImage.from_torch` /
:meth:`MPSImage.to_torch`). float32, float16 and bfloat16 images store that dtype; unorm8 and
unorm16 images store float32 values quantised to ``k/255`` / ``k/65535`` (every kernel
write clamps to [0, 1] and rounds). Metal's slice padding (4 channels per slice) is not
materialised, but ``pixel_size`` and ``resource_size()`` report the padded sizes Apple's
storage model gives (images.md §2).

Storage is allocated lazily: on first use by a kernel, a byte transfer, or ``.tensor`` /
``.texture``. ``resource_size()`` never allocates. Regular images start zero-filled.

Temporary images
----------------
``MPSTemporaryImage(command_buffer, image_descriptor=desc)`` draws its storage from the
command buffer's pool on first use. ``read_count`` starts at 1; every kernel encode that
reads the image decrements it once; at 0 the storage goes back to the pool and any later
use raises :class:`~mpsnn.MPSStateError` naming the image. Setting ``read_count = 0``
releases it at once; changing it after it reached 0 is an error. The host cannot read or
write a temporary image.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.device import Device, MTLCommandBuffer, as_device, default_device
from ..core.enums import MPSDataLayout, MPSImageFeatureChannelFormat, MPSPurgeableState
from ..core.errors import MPSStateError, MPSTypeError, value_error
from ..core.structs import MPSImageReadWriteParams, MTLOrigin, MTLRegion, MTLSize
from . import formats as fm
from .formats import MTLPixelFormat, MTLTextureType, MTLTextureUsage

NSIntegerMin = -(1 << 63)


@dataclass(frozen=True)
class NSRange:
    """Foundation's ``NSRange``; wherever one is taken, a ``range`` or a ``(location, length)``
    pair works too."""

    location: int = 0
    length: int = 0


def _as_range(owner: str, name: str, r: Any) -> tuple[int, int]:
    if isinstance(r, NSRange):
        return r.location, r.length
    if isinstance(r, range):
        if r.step != 1:
            raise value_error(owner, name, r, "have step 1")
        return r.start, len(r)
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return int(r[0]), int(r[1])
    raise MPSTypeError(f"{owner}: `{name}` must be an NSRange, a range or a (location, length) pair, but got {type(r).__name__}")


class MPSImageDescriptor:
    """``MPSImageDescriptor``: the size and format of an image to make.

    Args (all keyword, Apple's defaults):
        channel_format: :class:`MPSImageFeatureChannelFormat` (default ``none``; an image
            made from it gets float32).
        width, height: pixels (default 1).
        feature_channels: channels per pixel (default 1).
        number_of_images: images stacked in one MPSImage (default 1).
        usage: ``MTLTextureUsage`` bits (default shaderRead | shaderWrite).
        storage_mode, cpu_cache_mode: accepted for fidelity; no numeric effect.

    ``pixel_format`` is read-only, derived from the format and channel count.
    """

    def __init__(
        self,
        channel_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.none,
        width: int = 1,
        height: int = 1,
        feature_channels: int = 1,
        number_of_images: int = 1,
        usage: int = int(MTLTextureUsage.shaderRead | MTLTextureUsage.shaderWrite),
        storage_mode: int = 0,
        cpu_cache_mode: int = 0,
    ) -> None:
        self.channel_format = channel_format
        self.width = width
        self.height = height
        self.feature_channels = feature_channels
        self.number_of_images = number_of_images
        self.usage = usage
        self.storage_mode = storage_mode
        self.cpu_cache_mode = cpu_cache_mode

    # validate on assignment so that errors point at the caller
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("width", "height", "feature_channels", "number_of_images"):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
                raise value_error("MPSImageDescriptor", name, value, "be an integer >= 1")
            value = int(value)
        elif name == "channel_format":
            try:
                value = MPSImageFeatureChannelFormat(value)
            except ValueError:
                raise value_error("MPSImageDescriptor", name, value, "be an MPSImageFeatureChannelFormat") from None
            if value == MPSImageFeatureChannelFormat.count:
                raise value_error("MPSImageDescriptor", name, value, "be a storage format, not the `count` sentinel")
        object.__setattr__(self, name, value)

    @classmethod
    def _trusted(cls, channel_format: MPSImageFeatureChannelFormat, width: int, height: int, feature_channels: int,
                 number_of_images: int) -> "MPSImageDescriptor":
        """A descriptor from values mpsnn computed itself (already valid): skips the per-field
        validation of the public constructor, which costs host time on every auto encode."""
        d = cls.__new__(cls)
        d.__dict__.update(channel_format=channel_format, width=width, height=height, feature_channels=feature_channels,
                          number_of_images=number_of_images, usage=3, storage_mode=0, cpu_cache_mode=0)
        return d

    @classmethod
    def image_descriptor(cls, channel_format: MPSImageFeatureChannelFormat, width: int, height: int, feature_channels: int, number_of_images: int = 1, usage: int = 3) -> "MPSImageDescriptor":
        """``imageDescriptorWithChannelFormat:width:height:featureChannels:[numberOfImages:usage:]``."""
        return cls(channel_format=channel_format, width=width, height=height, feature_channels=feature_channels, number_of_images=number_of_images, usage=usage)

    @property
    def pixel_format(self) -> MTLPixelFormat:
        return fm.pixel_format(self.channel_format, self.feature_channels)

    def copy(self) -> "MPSImageDescriptor":
        return MPSImageDescriptor(self.channel_format, self.width, self.height, self.feature_channels, self.number_of_images, self.usage, self.storage_mode, self.cpu_cache_mode)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MPSImageDescriptor):
            return NotImplemented
        return self._key() == other._key()

    def _key(self) -> tuple:
        return (self.channel_format, self.width, self.height, self.feature_channels, self.number_of_images)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"MPSImageDescriptor(channel_format={self.channel_format.name}, width={self.width}, height={self.height}, "
                f"feature_channels={self.feature_channels}, number_of_images={self.number_of_images})")


class MPSImageAllocator(abc.ABC):
    """Protocol ``MPSImageAllocator``: how "encode returns an image" methods make results."""

    @abc.abstractmethod
    def image_for_command_buffer(self, command_buffer: MTLCommandBuffer, image_descriptor: MPSImageDescriptor, kernel: Any) -> "MPSImage":
        """Make one image matching ``image_descriptor`` for ``kernel`` to write."""

    def image_batch_for_command_buffer(self, command_buffer: MTLCommandBuffer, image_descriptor: MPSImageDescriptor, kernel: Any, count: int) -> list["MPSImage"]:
        """Make ``count`` images; the default calls :meth:`image_for_command_buffer` ``count`` times."""
        return [self.image_for_command_buffer(command_buffer, image_descriptor, kernel) for _ in range(count)]


class _DefaultImageAllocator(MPSImageAllocator):
    def image_for_command_buffer(self, command_buffer, image_descriptor, kernel):
        return MPSImage(command_buffer.device, image_descriptor=image_descriptor)

    def __repr__(self) -> str:
        return "MPSImage.default_allocator"


class _TemporaryImageAllocator(MPSImageAllocator):
    def image_for_command_buffer(self, command_buffer, image_descriptor, kernel):
        return MPSTemporaryImage(command_buffer, image_descriptor=image_descriptor)

    def __repr__(self) -> str:
        return "MPSTemporaryImage.default_allocator"


class MPSImage:
    """``MPSImage``: a batch of multi-channel images on a device, stored NHWC.

    Args:
        device: the device (positional, first).
        image_descriptor: an :class:`MPSImageDescriptor`.

    Shape: ``image.tensor`` is ``[number_of_images, height, width, feature_channels]``.

    Example::

        desc = MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32,
                                  width=28, height=28, feature_channels=1)
        img = MPSImage(device, image_descriptor=desc)
        img.write_bytes(np.zeros((28, 28, 1), np.float32), MPSDataLayout.HeightxWidthxFeatureChannels)
    """

    default_allocator: MPSImageAllocator = _DefaultImageAllocator()

    def __init__(self, device: Device | str, image_descriptor: MPSImageDescriptor) -> None:
        if not isinstance(image_descriptor, MPSImageDescriptor):
            raise MPSTypeError(f"{type(self).__name__}: `image_descriptor` must be an MPSImageDescriptor, but got {type(image_descriptor).__name__}")
        self._init_common(as_device(device, type(self).__name__), image_descriptor)

    def _init_common(self, device: Device, desc: MPSImageDescriptor, storage: torch.Tensor | None = None, parent: "MPSImage | None" = None, view: tuple[int, int, int, int] | None = None, wrapped: bool = False) -> None:
        self.device = device
        self.width = desc.width
        self.height = desc.height
        self.feature_channels = desc.feature_channels
        self.number_of_images = desc.number_of_images
        self.feature_channel_format = fm.resolve_format(desc.channel_format)
        self.usage = desc.usage
        self.label: str | None = None
        self.parent = parent
        self._view = view  # (n0, n1, c0, c1) into the parent's tensor
        self._storage = storage
        self._wrapped = wrapped

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_torch(cls, tensor: torch.Tensor, device: Device | str | None = None, feature_channel_format: MPSImageFeatureChannelFormat | None = None) -> "MPSImage":
        """Wrap an NHWC (or HWC) torch tensor without copying (``initWithTexture:``).

        The tensor's dtype gives the format (float32, float16, bfloat16). A non-contiguous
        tensor is wrapped as it is. Writes through either object are seen by both.
        """
        if not isinstance(tensor, torch.Tensor):
            raise MPSTypeError(f"MPSImage: `tensor` must be a torch.Tensor, but got {type(tensor).__name__}")
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 4:
            raise value_error("MPSImage", "tensor", tuple(tensor.shape), "have shape [N, H, W, C] or [H, W, C]")
        fmt = fm.format_for_dtype(tensor.dtype)
        if fmt is None:
            raise value_error("MPSImage", "tensor.dtype", tensor.dtype, "be float32, float16 or bfloat16")
        if feature_channel_format is not None and MPSImageFeatureChannelFormat(feature_channel_format) != fmt:
            raise value_error("MPSImage", "feature_channel_format", feature_channel_format, f"match the tensor dtype {tensor.dtype}")
        dev = Device(tensor.device) if device is None else as_device(device, "MPSImage")
        if dev.torch_device != tensor.device:
            raise value_error("MPSImage", "device", dev, f"be the tensor's device {tensor.device}")
        n, h, w, c = tensor.shape
        desc = MPSImageDescriptor(channel_format=fmt, width=w, height=h, feature_channels=c, number_of_images=n)
        img = cls.__new__(cls)
        img._init_common(dev, desc, storage=tensor, wrapped=True)
        return img

    @classmethod
    def from_numpy(cls, array: np.ndarray, device: Device | str | None = None, feature_channel_format: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.float32, copy: bool = True) -> "MPSImage":
        """Copy an NHWC (or HWC) array of real values into a new image of the given format,
        on ``device`` (default: :func:`mpsnn.default_device`).

        ``copy=False`` wraps the array without copying (writes through either are seen by
        both); that needs the CPU device and a C-contiguous float32 or float16 array whose
        dtype is the format's storage type, else :class:`~mpsnn.MPSError` is raised."""
        if not copy:
            arr = np.asarray(array)
            dev = as_device(device, "MPSImage") if device is not None else Device("cpu")
            fmt = MPSImageFeatureChannelFormat(feature_channel_format)
            wants = {MPSImageFeatureChannelFormat.float32: np.float32, MPSImageFeatureChannelFormat.float16: np.float16}.get(fmt)
            if dev.is_cuda or wants is None or arr.dtype != wants or not arr.flags.c_contiguous or not arr.flags.writeable:
                raise value_error("MPSImage", "copy", False, "be used only for a writable C-contiguous float32/float16 array of the format's dtype on the CPU",
                                  f"{arr.dtype} array ({'contiguous' if arr.flags.c_contiguous else 'strided'}) for {fmt.name} on {dev}")
            return cls.from_torch(torch.from_numpy(arr), dev)
        arr = np.asarray(array)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise value_error("MPSImage", "array", arr.shape, "have shape [N, H, W, C] or [H, W, C]")
        dev = as_device(device, "MPSImage") if device is not None else default_device()
        n, h, w, c = arr.shape
        img = cls(dev, MPSImageDescriptor(channel_format=feature_channel_format, width=w, height=h, feature_channels=c, number_of_images=n))
        img.store(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(dev.torch_device))
        return img

    # -- properties ---------------------------------------------------------------------
    @property
    def precision(self) -> int:
        return fm.PRECISION.get(self.feature_channel_format, 0)

    @property
    def pixel_format(self) -> MTLPixelFormat:
        return fm.pixel_format(self.feature_channel_format, self.feature_channels)

    @property
    def texture_type(self) -> MTLTextureType:
        if self.number_of_images == 1 and self.feature_channels <= 4:
            return MTLTextureType.type2D
        return MTLTextureType.type2DArray

    @property
    def pixel_size(self) -> int:
        return fm.components(self.feature_channels) * fm.ELEMENT_SIZE[self.feature_channel_format]

    @property
    def slices_per_image(self) -> int:
        return fm.slices_per_image(self.feature_channels)

    @property
    def is_temporary(self) -> bool:
        return False

    @property
    def dtype(self) -> torch.dtype:
        return fm.STORAGE_DTYPE[self.feature_channel_format]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.number_of_images, self.height, self.width, self.feature_channels)

    def descriptor(self) -> MPSImageDescriptor:
        return MPSImageDescriptor(self.feature_channel_format, self.width, self.height, self.feature_channels, self.number_of_images, self.usage)

    def resource_size(self) -> int:
        """Bytes of backing store, with Apple's slice padding; 0 for wrapped images and views.
        Never allocates."""
        if self.parent is not None or self._wrapped:
            return 0
        return self.number_of_images * self.slices_per_image * self.height * self.width * self.pixel_size

    @property
    def is_allocated(self) -> bool:
        if self.parent is not None:
            return self.parent.is_allocated
        return self._storage is not None

    def set_purgeable_state(self, state: MPSPurgeableState) -> MPSPurgeableState:
        if not self.is_allocated:
            return MPSPurgeableState.allocationDeferred
        return MPSPurgeableState.nonVolatile

    def synchronize_on_command_buffer(self, command_buffer: MTLCommandBuffer) -> None:
        """No-op: host reads copy from device memory after the stream's work."""

    # -- storage ----------------------------------------------------------------------------
    def _name(self) -> str:
        return f"{type(self).__name__}{' ' + repr(self.label) if self.label else ''} ({self.number_of_images}x{self.height}x{self.width}x{self.feature_channels} {self.feature_channel_format.name})"

    def _allocate(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device.torch_device)

    @property
    def tensor(self) -> torch.Tensor:
        """The NHWC tensor holding the image (allocates on first access)."""
        self._check_alive("tensor")
        if self.parent is not None:
            n0, n1, c0, c1 = self._view  # type: ignore[misc]
            return self.parent._raw_tensor()[n0:n1, :, :, c0:c1]
        if self._storage is None:
            self._storage = self._allocate()
        return self._storage

    def _raw_tensor(self) -> torch.Tensor:
        # parent access for views: a view keeps its parent's storage alive
        if self.parent is not None:
            n0, n1, c0, c1 = self._view  # type: ignore[misc]
            return self.parent._raw_tensor()[n0:n1, :, :, c0:c1]
        if self._storage is None:
            self._storage = self._allocate()
        return self._storage

    @property
    def texture(self) -> torch.Tensor:
        """Apple's ``texture``: here the backing tensor (forces allocation)."""
        return self.tensor

    def _check_alive(self, what: str) -> None:
        pass

    def to_torch(self) -> torch.Tensor:
        """The NHWC tensor (zero-copy; unorm images give their real values in [0,1])."""
        return self.tensor

    def to_numpy(self, copy: bool = True) -> np.ndarray:
        """A float32 NHWC copy on the host (synchronises with the device).

        ``copy=False`` returns a view of the image's storage instead, possible for float32
        images on the CPU (else :class:`~mpsnn.MPSError`)."""
        self._check_host_access("to_numpy")
        if not copy:
            if self.device.is_cuda or self.dtype != torch.float32 or self.feature_channel_format != MPSImageFeatureChannelFormat.float32:
                raise value_error(type(self).__name__, "copy", False, "be used only for float32 images on the CPU",
                                  f"a {self.feature_channel_format.name} image on {self.device}")
            return self.tensor.detach().numpy()
        self._host_sync()
        # copy=True: on the CPU .float().cpu() would alias the image's own storage
        return self.tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()

    def store(self, values: torch.Tensor, index: tuple = ()) -> None:
        """Write real ``values`` into ``tensor[index]``, converting to the storage format
        (rounding to float16/bfloat16, clamping and rounding for unorm)."""
        view = self.tensor[index] if index else self.tensor
        if self.feature_channel_format in fm.UNORM_MAX:
            values = fm.quantize_unorm(values, self.feature_channel_format)
        view.copy_(values)

    # -- views ------------------------------------------------------------------------------
    def _make_view(self, n0: int, n1: int, c0: int, c1: int) -> "MPSImage":
        desc = MPSImageDescriptor(self.feature_channel_format, self.width, self.height, c1 - c0, n1 - n0, self.usage)
        child = MPSImage.__new__(MPSImage)
        child._init_common(self.device, desc, parent=self, view=(n0, n1, c0, c1))
        return child

    def batch_representation(self, sub_range: Any = None) -> list["MPSImage"]:
        """One single-image MPSImage per image (or per image of ``sub_range``), aliasing this
        image's storage."""
        return self.batch_representation_with_sub_range((0, self.number_of_images) if sub_range is None else sub_range)

    def batch_representation_with_sub_range(self, sub_range: Any) -> list["MPSImage"]:
        loc, length = _as_range(type(self).__name__, "sub_range", sub_range)
        if loc < 0 or length < 0 or loc + length > self.number_of_images:
            raise value_error(type(self).__name__, "sub_range", (loc, length), f"lie within the {self.number_of_images} images")
        return [self._make_view(n, n + 1, 0, self.feature_channels) for n in range(loc, loc + length)]

    def sub_image_with_feature_channel_range(self, feature_channel_range: Any) -> "MPSImage":
        """An image aliasing channels ``[location, location+length)``; both multiples of 4;
        an over-long length is shortened to fit."""
        loc, length = _as_range(type(self).__name__, "feature_channel_range", feature_channel_range)
        if loc % 4 or length % 4 or length <= 0:
            raise value_error(type(self).__name__, "feature_channel_range", (loc, length), "have location and length that are positive multiples of 4")
        if loc >= self.feature_channels:
            raise value_error(type(self).__name__, "feature_channel_range.location", loc, f"be < feature_channels={self.feature_channels}")
        end = min(loc + length, self.feature_channels)
        return self._make_view(0, self.number_of_images, loc, end)

    #: Swift's ``subImage(withFeatureChannelRange:)``
    sub_image = sub_image_with_feature_channel_range

    # -- byte I/O ---------------------------------------------------------------------------
    def _check_host_access(self, what: str) -> None:
        pass

    def _host_sync(self) -> None:
        """Wait for all work queued on the image's device, whatever stream a command buffer
        used, so that a host transfer sees (and does not race with) encoded kernels."""
        if self.device.is_cuda:
            torch.cuda.synchronize(self.device.torch_device)

    def _transfer_plan(self, what: str, data_layout: Any, image_index: int, region: MTLRegion | None, feature_channel_info: MPSImageReadWriteParams | None, bytes_per_column: int | None, bytes_per_row: int | None, bytes_per_image: int | None):
        owner = type(self).__name__
        try:
            layout = MPSDataLayout(data_layout)
        except ValueError:
            raise value_error(owner, "data_layout", data_layout, "be an MPSDataLayout") from None
        if region is None:
            region = MTLRegion(MTLOrigin(0, 0, 0), MTLSize(self.width, self.height, 1))
        rx, ry = region.origin.x, region.origin.y
        rw, rh, rd = region.size.width, region.size.height, region.size.depth
        if region.origin.z != 0:
            raise value_error(owner, "region.origin.z", region.origin.z, "be 0 (images are chosen by `image_index`)")
        if rw < 1 or rh < 1 or rd < 1 or rx < 0 or ry < 0 or rx + rw > self.width or ry + rh > self.height:
            raise value_error(owner, "region", region, f"lie inside the {self.width}x{self.height} image with a non-empty size")
        if not 0 <= image_index or image_index + rd > self.number_of_images:
            raise value_error(owner, "image_index", image_index, f"address images inside [0, {self.number_of_images}) for a region of depth {rd}")
        if feature_channel_info is None:
            c0, k = 0, self.feature_channels
        else:
            c0 = feature_channel_info.feature_channel_offset
            k = feature_channel_info.number_of_feature_channels_to_read_write
            if c0 % 4:
                raise value_error(owner, "feature_channel_info.feature_channel_offset", c0, "be a multiple of 4")
            if k <= 0 or (c0 != 0 and k % 4):
                raise value_error(owner, "feature_channel_info.number_of_feature_channels_to_read_write", k, "be > 0, and a multiple of 4 unless feature_channel_offset is 0")
            if c0 + k > self.feature_channels:
                raise value_error(owner, "feature_channel_info", (c0, k), f"stay within feature_channels={self.feature_channels}")
        host = fm.HOST_DTYPE[self.feature_channel_format]
        e = host.itemsize
        bpc = bytes_per_column if bytes_per_column is not None else (k * e if layout == MPSDataLayout.HeightxWidthxFeatureChannels else e)
        bpr = bytes_per_row if bytes_per_row is not None else rw * bpc
        if layout == MPSDataLayout.HeightxWidthxFeatureChannels:
            bpi = bytes_per_image if bytes_per_image is not None else rh * bpr
            shape = (rd, rh, rw, k)
            strides = (bpi, bpr, bpc, e)
            min_bpc, min_bpr = k * e, (rw - 1) * bpc + k * e
        else:
            bpi = bytes_per_image if bytes_per_image is not None else k * rh * bpr
            shape = (rd, k, rh, rw)
            strides = (bpi, rh * bpr, bpr, bpc)
            min_bpc, min_bpr = e, (rw - 1) * bpc + e
        if bpc < min_bpc or bpr < min_bpr:
            raise value_error(owner, "bytes_per_row/bytes_per_column", (bpr, bpc), f"be at least ({min_bpr}, {min_bpc}) for this region")
        need = sum((s - 1) * st for s, st in zip(shape, strides)) + e
        return layout, (rx, ry, rw, rh, rd), (c0, k), host, shape, strides, need

    def read_bytes(
        self,
        data_layout: MPSDataLayout = MPSDataLayout.HeightxWidthxFeatureChannels,
        image_index: int = 0,
        *,
        region: MTLRegion | None = None,
        feature_channel_info: MPSImageReadWriteParams | None = None,
        bytes_per_row: int | None = None,
        bytes_per_image: int | None = None,
        bytes_per_column: int | None = None,
        out: Any = None,
    ) -> np.ndarray:
        """``readBytes``: copy image data to the host (synchronises with the device).

        Returns raw elements of the image's format (uint8 for unorm8, uint16 for unorm16,
        float16, float32; float32 values for bfloat16). Without byte strides the result is
        shaped ``[H, W, K]`` (HWC) or ``[K, H, W]`` (CHW), with a leading image axis when
        ``region.size.depth > 1``. With ``bytes_per_row``/``bytes_per_image``/
        ``bytes_per_column`` or ``out`` the data is laid out byte-exactly in a buffer (``out``,
        or a new 1-D uint8 array) by the addressing rule of images.md §5.3, and that buffer
        is returned.
        """
        self._check_host_access("read_bytes")
        layout, (rx, ry, rw, rh, rd), (c0, k), host, shape, strides, need = self._transfer_plan("read_bytes", data_layout, image_index, region, feature_channel_info, bytes_per_column, bytes_per_row, bytes_per_image)
        self._host_sync()
        block = self.tensor[image_index:image_index + rd, ry:ry + rh, rx:rx + rw, c0:c0 + k].detach().float().cpu()
        vals = self._to_host(block, host)
        if layout == MPSDataLayout.FeatureChannelsxHeightxWidth:
            vals = vals.transpose(0, 3, 1, 2)
        raw_mode = out is not None or bytes_per_row is not None or bytes_per_image is not None or bytes_per_column is not None
        if not raw_mode:
            arr = np.ascontiguousarray(vals)
            return arr if rd > 1 else arr[0]
        buf = np.zeros(need, np.uint8) if out is None else _byte_view(out, writable=True)
        if buf.nbytes < need:
            raise value_error(type(self).__name__, "out", f"{buf.nbytes} bytes", f"hold at least {need} bytes")
        target = np.ndarray(shape=shape, dtype=host, buffer=buf, offset=0, strides=strides)
        target[...] = vals
        return out if out is not None else buf

    def write_bytes(
        self,
        data: Any,
        data_layout: MPSDataLayout = MPSDataLayout.HeightxWidthxFeatureChannels,
        image_index: int = 0,
        *,
        region: MTLRegion | None = None,
        feature_channel_info: MPSImageReadWriteParams | None = None,
        bytes_per_row: int | None = None,
        bytes_per_image: int | None = None,
        bytes_per_column: int | None = None,
    ) -> None:
        """``writeBytes``: copy host data into the image.

        ``data`` holds raw elements of the image's format (see :meth:`read_bytes`): an array
        of the region's shape, or a buffer (bytes, 1-D array) addressed by the byte strides.
        Unorm images take their raw integers (uint8/uint16); float arrays are refused for
        them (use :meth:`from_numpy` for real values).
        """
        self._check_host_access("write_bytes")
        owner = type(self).__name__
        layout, (rx, ry, rw, rh, rd), (c0, k), host, shape, strides, need = self._transfer_plan("write_bytes", data_layout, image_index, region, feature_channel_info, bytes_per_column, bytes_per_row, bytes_per_image)
        raw_mode = bytes_per_row is not None or bytes_per_image is not None or bytes_per_column is not None or isinstance(data, (bytes, bytearray, memoryview))
        if not raw_mode:
            arr = np.asarray(data)
            if arr.ndim == 1 and arr.size == math.prod(shape):
                arr = arr.reshape(shape)
            elif arr.ndim == 1 and arr.dtype == np.uint8 and host != np.uint8 and arr.nbytes >= need:
                raw_mode = True
            if not raw_mode:
                if arr.shape == shape[1:] and rd == 1:
                    arr = arr[None]
                if arr.shape != shape:
                    expected = shape[1:] if rd == 1 else shape
                    raise value_error(owner, "data", arr.shape, f"have shape {expected} for this region and layout")
                if self.feature_channel_format in fm.UNORM_MAX and arr.dtype.kind == "f":
                    raise value_error(owner, "data.dtype", arr.dtype, f"be {host} raw unorm values for a {self.feature_channel_format.name} image")
                vals = arr.astype(host, copy=False)
        if raw_mode:
            buf = _byte_view(data, writable=False)
            if buf.nbytes < need:
                raise value_error(owner, "data", f"{buf.nbytes} bytes", f"hold at least {need} bytes for this region and layout")
            vals = np.ndarray(shape=shape, dtype=host, buffer=buf, offset=0, strides=strides)
        if layout == MPSDataLayout.FeatureChannelsxHeightxWidth:
            vals = vals.transpose(0, 2, 3, 1)
        self._host_sync()
        real = torch.from_numpy(np.ascontiguousarray(vals).astype(np.float32))
        if self.feature_channel_format in fm.UNORM_MAX:
            real = real / fm.UNORM_MAX[self.feature_channel_format]
        self.store(real.to(self.device.torch_device), (slice(image_index, image_index + rd), slice(ry, ry + rh), slice(rx, rx + rw), slice(c0, c0 + k)))

    def _to_host(self, block: torch.Tensor, host: np.dtype) -> np.ndarray:
        arr = block.numpy()
        if self.feature_channel_format in fm.UNORM_MAX:
            return np.rint(arr * fm.UNORM_MAX[self.feature_channel_format]).astype(host)
        return arr.astype(host)

    def __repr__(self) -> str:
        return f"<{self._name()} on {self.device}>"


def _byte_view(data: Any, writable: bool) -> np.ndarray:
    """A flat uint8 view of a host buffer (a copy only for read-only, non-contiguous input)."""
    if isinstance(data, np.ndarray):
        if data.flags.c_contiguous:
            return data.reshape(-1).view(np.uint8)
        if writable:
            raise value_error("MPSImage", "out", "a non-contiguous array", "be C-contiguous")
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, (bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, bytes):
        if writable:
            raise MPSTypeError("MPSImage: `out` must be writable (a bytearray or NumPy array), but got bytes")
        return np.frombuffer(data, dtype=np.uint8)
    raise MPSTypeError(f"MPSImage: `data` must be a NumPy array or a bytes-like buffer, but got {type(data).__name__}")


class MPSTemporaryImage(MPSImage):
    """``MPSTemporaryImage``: a GPU-only image that lives on one command buffer.

    Args:
        command_buffer: the command buffer it belongs to (positional, first).
        image_descriptor: its size and format.

    ``read_count`` (default 1): each kernel encode that reads the image decrements it; at 0
    the storage returns to the command buffer's pool and the image can no longer be used.
    Views made by ``batch_representation*`` / ``sub_image_with_feature_channel_range`` are
    temporary too; each holds one read count on this image (incremented when the view is
    made) and gives it back when its own read count reaches 0 (inferred from images.md §4.3).
    """

    default_allocator: MPSImageAllocator = _TemporaryImageAllocator()

    def __init__(self, command_buffer: MTLCommandBuffer, image_descriptor: MPSImageDescriptor) -> None:
        if not isinstance(command_buffer, MTLCommandBuffer):
            raise MPSTypeError(f"MPSTemporaryImage: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
        command_buffer.check_encodable("MPSTemporaryImage")
        super().__init__(command_buffer.device, image_descriptor)
        self.command_buffer = command_buffer
        self._read_count = 1
        self._flat: torch.Tensor | None = None

    @classmethod
    def temporary_image_with_command_buffer(cls, command_buffer: MTLCommandBuffer, image_descriptor: MPSImageDescriptor) -> "MPSTemporaryImage":
        return cls(command_buffer, image_descriptor)

    temporary_image = temporary_image_with_command_buffer

    @classmethod
    def prefetch_storage_with_command_buffer(cls, command_buffer: MTLCommandBuffer, image_descriptor_list: Sequence[MPSImageDescriptor]) -> None:
        """Performance hint only (no semantic effect)."""

    @property
    def is_temporary(self) -> bool:
        return True

    @property
    def read_count(self) -> int:
        return self._read_count

    @read_count.setter
    def read_count(self, value: int) -> None:
        if isinstance(value, bool) or int(value) < 0:
            raise value_error("MPSTemporaryImage", "read_count", value, "be an integer >= 0")
        if self._read_count == 0:
            raise MPSStateError(f"MPSTemporaryImage: `read_count` of {self._name()} cannot change once it has reached 0 (its storage was released)")
        self._read_count = int(value)
        if self._read_count == 0:
            self._release()

    def _allocate(self) -> torch.Tensor:
        self._flat = self.command_buffer._take_storage(math.prod(self.shape), self.dtype)
        return self._flat.view(self.shape)

    def _release(self) -> None:
        if self.parent is not None:
            self._storage = None
            parent = self.parent
            if isinstance(parent, MPSTemporaryImage) and parent._read_count > 0:
                parent.consume_read()
            return
        if self._flat is not None:
            self.command_buffer._return_storage(self._flat)
        self._flat = None
        self._storage = None

    def consume_read(self) -> None:
        """Called once by every kernel encode that reads this image."""
        if self._read_count == 0:
            raise MPSStateError(f"MPSTemporaryImage: {self._name()} was read after its `read_count` reached 0")
        self._read_count -= 1
        if self._read_count == 0:
            self._release()

    def _check_alive(self, what: str) -> None:
        if self._read_count == 0:
            raise MPSStateError(f"MPSTemporaryImage: {self._name()} was used (`{what}`) after its `read_count` reached 0; its storage was recycled")
        # a view whose parent was released (parent.read_count set to 0 by hand) must not
        # silently re-allocate the parent's storage from the pool
        if isinstance(self.parent, MPSTemporaryImage):
            self.parent._check_alive(what)

    def _check_host_access(self, what: str) -> None:
        raise MPSStateError(f"MPSTemporaryImage: `{what}` is not allowed on {self._name()}: temporary images are GPU-only")

    def resource_size(self) -> int:
        if self.parent is not None:
            return 0
        return MPSImage.resource_size(self)

    def _make_view(self, n0: int, n1: int, c0: int, c1: int) -> "MPSImage":
        self._check_alive("view")
        desc = MPSImageDescriptor(self.feature_channel_format, self.width, self.height, c1 - c0, n1 - n0, self.usage)
        child = MPSTemporaryImage.__new__(MPSTemporaryImage)
        child._init_common(self.device, desc, parent=self, view=(n0, n1, c0, c1))
        child.command_buffer = self.command_buffer
        child._read_count = 1
        child._flat = None
        self._read_count += 1
        return child


def _unique_images(batch: Sequence[MPSImage] | None) -> list[tuple[int, MPSImage]]:
    seen: dict[int, tuple[int, MPSImage]] = {}
    for i, img in enumerate(batch or []):
        seen.setdefault(id(img), (i, img))
    return list(seen.values())


def MPSImageBatchIncrementReadCount(batch: Sequence[MPSImage], amount: int) -> int:
    """Add ``amount`` (may be negative) to the read count of each unique temporary image
    whose read count is not already 0; returns the number of distinct images."""
    unique = _unique_images(batch)
    for _, img in unique:
        if isinstance(img, MPSTemporaryImage) and img.read_count > 0:
            img.read_count = max(0, img.read_count + amount)
    return len(unique)


def MPSImageBatchSynchronize(batch: Sequence[MPSImage], command_buffer: MTLCommandBuffer) -> None:
    """Call ``synchronize_on_command_buffer`` once per unique image."""
    for _, img in _unique_images(batch):
        img.synchronize_on_command_buffer(command_buffer)


def MPSImageBatchResourceSize(batch: Sequence[MPSImage]) -> int:
    """Sum of ``resource_size()`` over the unique images of ``batch``."""
    return sum(img.resource_size() for _, img in _unique_images(batch))


def MPSImageBatchIterate(batch: Sequence[MPSImage], iterator_block: Callable[[MPSImage, int], int]) -> int:
    """Call ``iterator_block(image, index)`` once per unique image in order of first
    appearance (``index`` = its first position); stop early when the block returns a value
    greater than ``NSIntegerMin``. Returns the last value returned (``NSIntegerMin`` for an
    empty batch)."""
    result = NSIntegerMin
    for i, img in _unique_images(batch):
        result = iterator_block(img, i)
        if result > NSIntegerMin:
            break
    return result
