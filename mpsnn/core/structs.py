"""Small value types: MPSOffset, MTLOrigin/MTLSize/MTLRegion, MPSImageCoordinate, ...

Frozen dataclasses with Apple's field names in snake_case (images.md §1.4-1.5).
"""
from __future__ import annotations

from dataclasses import dataclass

_UINT_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class MPSOffset:
    """Signed pixel offset; ``z`` is an image index in a multi-image MPSImage."""

    x: int = 0
    y: int = 0
    z: int = 0


@dataclass(frozen=True)
class MTLOrigin:
    """Metal origin (unsigned pixel / image coordinates)."""

    x: int = 0
    y: int = 0
    z: int = 0


@dataclass(frozen=True)
class MTLSize:
    """Metal size; ``depth`` counts images for MPS regions. Defaults to 1 in every dimension (a one-pixel region)."""

    width: int = 1
    height: int = 1
    depth: int = 1


@dataclass(frozen=True)
class MTLRegion:
    """Metal region: ``origin`` and ``size``. ``z``/``depth`` address images."""

    origin: MTLOrigin = MTLOrigin()
    size: MTLSize = MTLSize()

    @staticmethod
    def make_2d(x: int, y: int, width: int, height: int) -> "MTLRegion":
        return MTLRegion(MTLOrigin(x, y, 0), MTLSize(width, height, 1))

    @staticmethod
    def make_3d(x: int, y: int, z: int, width: int, height: int, depth: int) -> "MTLRegion":
        return MTLRegion(MTLOrigin(x, y, z), MTLSize(width, height, depth))


#: "No clipping": origin 0 and the largest unsigned size; intersected with the
#: destination bounds this is the whole destination (images.md §1.5).
MPSRectNoClip = MTLRegion(MTLOrigin(0, 0, 0), MTLSize(_UINT_MAX, _UINT_MAX, _UINT_MAX))


def MTLRegionMake2D(x: int, y: int, width: int, height: int) -> MTLRegion:
    """Metal's ``MTLRegionMake2D``: origin ``(x, y, 0)``, size ``(width, height, 1)``."""
    return MTLRegion.make_2d(x, y, width, height)


def MTLRegionMake3D(x: int, y: int, z: int, width: int, height: int, depth: int) -> MTLRegion:
    """Metal's ``MTLRegionMake3D``: origin ``(x, y, z)``, size ``(width, height, depth)``."""
    return MTLRegion.make_3d(x, y, z, width, height, depth)


@dataclass(frozen=True)
class MPSOrigin:
    """Floating-point origin (``MPSOrigin``)."""

    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


@dataclass(frozen=True)
class MPSSize:
    """Floating-point size (``MPSSize``)."""

    width: float = 1.0
    height: float = 1.0
    depth: float = 1.0


@dataclass(frozen=True)
class MPSRegion:
    """Floating-point region (``MPSRegion``)."""

    origin: MPSOrigin = MPSOrigin()
    size: MPSSize = MPSSize()


@dataclass(frozen=True)
class MPSImageCoordinate:
    """A pixel and channel position (``MPSImageCoordinate``)."""

    x: int = 0
    y: int = 0
    channel: int = 0


@dataclass(frozen=True)
class MPSImageRegion:
    """A region of pixels and channels (``MPSImageRegion``: offset and size in {pixels, pixels, channels})."""

    offset: MPSImageCoordinate = MPSImageCoordinate()
    size: MPSImageCoordinate = MPSImageCoordinate()


@dataclass(frozen=True)
class MPSImageReadWriteParams:
    """Channel window of a byte transfer (images.md §1.4)."""

    feature_channel_offset: int = 0
    number_of_feature_channels_to_read_write: int = 0


@dataclass(frozen=True)
class MPSStateTextureInfo:
    """What ``MPSState.texture_info_at_index`` reports (zeros for non-textures)."""

    width: int = 0
    height: int = 0
    depth: int = 0
    array_length: int = 0
    pixel_format: int = 0
    texture_type: int = 0
    usage: int = 0
