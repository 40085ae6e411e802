"""MPSState and its relatives (images.md §9-10, kernel-base.md §7).

``MPSState`` holds resources (buffers and textures, each a torch tensor on the device) that a
kernel produces besides its image. Temporary states follow the same read-count rules as
temporary images: each kernel encode that reads one decrements its ``read_count``; at 0 its
resources are released and any further use raises :class:`~mpsnn.MPSStateError`.

``MPSNNGradientState`` records the forward kernel's geometry (offset, clip rect, kernel
size, strides, dilation, edge mode, channel offsets, source size) when the forward encode
ran; the matching gradient kernel reads it to size its result and to map coordinates.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..core.device import Device, MTLCommandBuffer, as_device
from ..core.enums import MPSImageEdgeMode, MPSStateResourceType
from ..core.errors import MPSStateError, MPSTypeError, value_error
from ..core.structs import MPSOffset, MPSStateTextureInfo, MTLRegion

if TYPE_CHECKING:  # pragma: no cover
    from .image import MPSImage, MPSImageDescriptor


@dataclass(frozen=True)
class MTLTextureDescriptor:
    """The parts of Metal's texture descriptor a state resource needs."""

    pixel_format: int = 125  # rgba32Float
    width: int = 1
    height: int = 1
    depth: int = 1
    array_length: int = 1
    texture_type: int = 2  # type2D
    usage: int = 3

    @staticmethod
    def texture_2d_descriptor(pixel_format: int, width: int, height: int, mipmapped: bool = False) -> "MTLTextureDescriptor":
        return MTLTextureDescriptor(pixel_format=pixel_format, width=width, height=height)


class MPSStateResourceList:
    """An ordered list of resources to create a multi-resource MPSState from."""

    def __init__(self) -> None:
        self.entries: list[int | MTLTextureDescriptor] = []

    @classmethod
    def resource_list(cls) -> "MPSStateResourceList":
        return cls()

    @classmethod
    def resource_list_with_buffer_sizes(cls, *sizes: int) -> "MPSStateResourceList":
        rl = cls()
        for s in sizes:
            if s == 0:
                break
            rl.append_buffer(s)
        return rl

    @classmethod
    def resource_list_with_texture_descriptors(cls, *descriptors: MTLTextureDescriptor) -> "MPSStateResourceList":
        rl = cls()
        for d in descriptors:
            if d is None:
                break
            rl.append_texture(d)
        return rl

    def append_texture(self, descriptor: MTLTextureDescriptor) -> None:
        if not isinstance(descriptor, MTLTextureDescriptor):
            raise MPSTypeError(f"MPSStateResourceList: `descriptor` must be an MTLTextureDescriptor, but got {type(descriptor).__name__}")
        self.entries.append(descriptor)

    def append_buffer(self, size: int) -> None:
        if int(size) <= 0:
            raise value_error("MPSStateResourceList", "size", size, "be a positive number of bytes")
        self.entries.append(int(size))


def _texture_shape(d: MTLTextureDescriptor) -> tuple[int, int, int, int]:
    return (max(1, d.array_length) * max(1, d.depth), d.height, d.width, 4)


class MPSState:
    """``MPSState``: opaque resources a kernel produces besides its image.

    Args:
        device: device of the (non-temporary) state.
        buffer_size: one buffer of this many bytes (``initWithDevice:bufferSize:``).
        texture_descriptor: one texture (``initWithDevice:textureDescriptor:``).
        resource_list: several resources (``initWithDevice:resourceList:``).
        resource / resources: wrap existing tensors (``initWithResource(s):``).

    Resources are allocated lazily (zero-filled) on first access. Use
    :meth:`temporary_state_with_command_buffer` for a temporary state.
    """

    def __init__(
        self,
        device: Device | str | None = None,
        buffer_size: int | None = None,
        texture_descriptor: MTLTextureDescriptor | None = None,
        resource_list: MPSStateResourceList | None = None,
        resource: torch.Tensor | None = None,
        resources: Sequence[torch.Tensor] | None = None,
        *,
        _command_buffer: MTLCommandBuffer | None = None,
    ) -> None:
        cls = type(self).__name__
        if _command_buffer is not None:
            self.device = _command_buffer.device
        elif device is not None:
            self.device = as_device(device, cls)
        elif resource is not None:
            self.device = Device(resource.device)
        elif resources:
            self.device = Device(resources[0].device)
        else:
            raise MPSTypeError(f"{cls}: `device` is required unless existing resources are wrapped")
        self.command_buffer = _command_buffer
        self.is_temporary = _command_buffer is not None
        self._read_count = 1 if self.is_temporary else 0
        self.label: str | None = None
        self._specs: list[int | MTLTextureDescriptor] = []
        self._resources: list[torch.Tensor | None] = []
        if buffer_size is not None:
            if int(buffer_size) < 0:
                raise value_error(cls, "buffer_size", buffer_size, "be >= 0")
            self._specs.append(int(buffer_size))
        if texture_descriptor is not None:
            self._specs.append(texture_descriptor)
        if resource_list is not None:
            self._specs.extend(resource_list.entries)
        self._resources = [None] * len(self._specs)
        for r in [resource] if resource is not None else list(resources or []):
            if not isinstance(r, torch.Tensor):
                raise MPSTypeError(f"{cls}: `resources` must be torch tensors, but got {type(r).__name__}")
            self._specs.append(r.numel() * r.element_size() if r.dim() <= 1 else MTLTextureDescriptor(width=r.shape[-2] if r.dim() > 1 else 1, height=r.shape[-3] if r.dim() > 2 else 1))
            self._resources.append(r)

    @classmethod
    def temporary_state_with_command_buffer(
        cls,
        command_buffer: MTLCommandBuffer,
        buffer_size: int | None = None,
        texture_descriptor: MTLTextureDescriptor | None = None,
        resource_list: MPSStateResourceList | None = None,
    ) -> "MPSState":
        """A temporary state valid on ``command_buffer`` until its read count reaches 0."""
        if not isinstance(command_buffer, MTLCommandBuffer):
            raise MPSTypeError(f"{cls.__name__}: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
        return cls(buffer_size=buffer_size, texture_descriptor=texture_descriptor, resource_list=resource_list, _command_buffer=command_buffer)

    temporary_state = temporary_state_with_command_buffer

    # -- read count --------------------------------------------------------------------
    @property
    def read_count(self) -> int:
        return self._read_count

    @read_count.setter
    def read_count(self, value: int) -> None:
        if int(value) < 0:
            raise value_error(self._name(), "read_count", value, "be >= 0")
        if self.is_temporary and self._read_count == 0:
            raise MPSStateError(f"{self._name()}: `read_count` cannot change once it has reached 0 (the state's storage was released)")
        self._read_count = int(value)
        if self.is_temporary and self._read_count == 0:
            self._release()

    def _name(self) -> str:
        return f"{type(self).__name__}{' ' + repr(self.label) if self.label else ''}"

    def check_usable(self, owner: str, command_buffer: MTLCommandBuffer | None = None) -> None:
        if self.is_temporary:
            if self._read_count == 0:
                raise MPSStateError(f"{owner}: temporary state {self._name()} was read after its `read_count` reached 0")
            if command_buffer is not None and command_buffer is not self.command_buffer:
                raise MPSStateError(f"{owner}: temporary state {self._name()} belongs to another command buffer")

    def consume_read(self) -> None:
        """Called once by every kernel encode that reads this state."""
        if self.is_temporary:
            if self._read_count == 0:
                raise MPSStateError(f"{self._name()}: read after its `read_count` reached 0")
            self._read_count -= 1
            if self._read_count == 0:
                self._release()

    def _release(self) -> None:
        self._resources = [None] * len(self._specs)

    # -- resources ------------------------------------------------------------------------
    @property
    def resource_count(self) -> int:
        return len(self._specs)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._specs):
            raise value_error(self._name(), "index", index, f"be in [0, {len(self._specs)})")

    def resource_at_index(self, index: int, allocate_memory: bool = True) -> torch.Tensor | None:
        self._check_index(index)
        if self.is_temporary and self._read_count == 0:
            raise MPSStateError(f"{self._name()}: resource accessed after `read_count` reached 0")
        r = self._resources[index]
        if r is None and allocate_memory:
            spec = self._specs[index]
            dev = self.device.torch_device
            if isinstance(spec, int):
                r = torch.zeros(spec, dtype=torch.uint8, device=dev)
            else:
                r = torch.zeros(_texture_shape(spec), dtype=torch.float32, device=dev)
            self._resources[index] = r
        return r

    @property
    def resource(self) -> torch.Tensor | None:
        """Deprecated in Apple's API: the first resource (allocates it)."""
        return self.resource_at_index(0) if self._specs else None

    def buffer_size_at_index(self, index: int) -> int:
        self._check_index(index)
        spec = self._specs[index]
        return spec if isinstance(spec, int) else 0

    def texture_info_at_index(self, index: int) -> MPSStateTextureInfo:
        self._check_index(index)
        spec = self._specs[index]
        if isinstance(spec, int):
            return MPSStateTextureInfo()
        return MPSStateTextureInfo(spec.width, spec.height, spec.depth, spec.array_length, spec.pixel_format, spec.texture_type, spec.usage)

    def resource_type_at_index(self, index: int) -> MPSStateResourceType:
        if not 0 <= index < len(self._specs):
            return MPSStateResourceType.none
        return MPSStateResourceType.buffer if isinstance(self._specs[index], int) else MPSStateResourceType.texture

    def resource_size(self) -> int:
        total = 0
        for spec in self._specs:
            if isinstance(spec, int):
                total += spec
            else:
                a, h, w, c = _texture_shape(spec)
                total += a * h * w * c * 4
        return total

    def synchronize_on_command_buffer(self, command_buffer: MTLCommandBuffer) -> None:
        """No-op: state resources live in device memory that the host reads by copying."""

    def destination_image_descriptor_for_source_images(
        self,
        source_images: Sequence["MPSImage"],
        source_states: Sequence["MPSState"] | None,
        kernel: Any,
        suggested_descriptor: "MPSImageDescriptor",
    ) -> "MPSImageDescriptor":
        """Hook of the destination-size pipeline (kernel-base.md §2.9 step 3). Default:
        the suggested descriptor, unchanged."""
        return suggested_descriptor

    def __repr__(self) -> str:
        kind = "temporary " if self.is_temporary else ""
        return f"<{kind}{type(self).__name__} label={self.label!r} resources={self.resource_count} read_count={self._read_count}>"


class MPSImageSizeEncodingState(abc.ABC):
    """Protocol of states that remember a source image's size (kernel-base.md §7)."""

    @property
    @abc.abstractmethod
    def source_width(self) -> int: ...

    @property
    @abc.abstractmethod
    def source_height(self) -> int: ...


@dataclass(frozen=True)
class ForwardGeometry:
    """The forward kernel's properties at the time its encode ran."""

    kernel_class: str
    offset: MPSOffset
    clip_rect: MTLRegion
    kernel_width: int
    kernel_height: int
    stride_in_pixels_x: int
    stride_in_pixels_y: int
    dilation_rate_x: int
    dilation_rate_y: int
    edge_mode: MPSImageEdgeMode
    source_feature_channel_offset: int
    source_feature_channel_max_count: int
    destination_feature_channel_offset: int
    source_width: int
    source_height: int
    source_feature_channels: int
    source_number_of_images: int
    destination_width: int
    destination_height: int


class MPSNNGradientState(MPSState, MPSImageSizeEncodingState):
    """``MPSNNGradientState``: what a unary forward kernel hands its gradient kernel.

    Made by ``kernel.result_state_for_source_image(...)`` (or its temporary form) or by an
    encode that returns a state; constructing one directly is not meaningful.

    Its destination-size hook makes the gradient kernel's result the size of the forward
    source (``source_width`` x ``source_height`` x forward source channels) and sets the
    gradient kernel's ``primary_offset`` so that result pixel ``p`` reads the incoming
    gradient at ``p - forward.offset + forward.clip_rect.origin`` (the exact adjoint of a
    unit-stride forward pass; inferred from kernel-base.md §4).
    """

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None = None, resource_list: MPSStateResourceList | None = None) -> None:
        super().__init__(device=device, resource_list=resource_list, _command_buffer=command_buffer)
        self.geometry = geometry

    @property
    def source_width(self) -> int:
        return self.geometry.source_width

    @property
    def source_height(self) -> int:
        return self.geometry.source_height

    def destination_image_descriptor_for_source_images(self, source_images, source_states, kernel, suggested_descriptor):  # type: ignore[override]
        from ..core.binary_kernel import MPSCNNGradientKernel

        if not isinstance(kernel, MPSCNNGradientKernel):
            return suggested_descriptor
        g = self.geometry
        desc = suggested_descriptor.copy()
        desc.width, desc.height = g.source_width, g.source_height
        desc.feature_channels = g.source_feature_channels
        kernel.apply_forward_geometry(g)
        return desc


class MPSNNBinaryGradientState(MPSNNGradientState):
    """``MPSNNBinaryGradientState``: the same for binary forward kernels; ``geometry`` is
    the primary input's and ``secondary_geometry`` the secondary input's."""

    def __init__(self, geometry: ForwardGeometry, secondary_geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None = None) -> None:
        super().__init__(geometry, device, command_buffer)
        self.secondary_geometry = secondary_geometry


def _unique(batch: Sequence[Any] | None) -> list[Any]:
    seen: dict[int, Any] = {}
    for obj in batch or []:
        seen.setdefault(id(obj), obj)
    return list(seen.values())


def MPSStateBatchIncrementReadCount(batch: Sequence[MPSState] | None, amount: int) -> int:
    """Add ``amount`` to the read count of each unique temporary state; returns how many
    distinct states the batch holds."""
    unique = _unique(batch)
    for s in unique:
        if s.is_temporary and s.read_count > 0:
            s.read_count = max(0, s.read_count + amount)
    return len(unique)


def MPSStateBatchSynchronize(batch: Sequence[MPSState], command_buffer: MTLCommandBuffer) -> None:
    """Call ``synchronize_on_command_buffer`` once per unique state."""
    for s in _unique(batch):
        s.synchronize_on_command_buffer(command_buffer)


def MPSStateBatchResourceSize(batch: Sequence[MPSState] | None) -> int:
    """Sum of ``resource_size()`` over the unique states of ``batch`` (0 for None)."""
    return sum(s.resource_size() for s in _unique(batch))
