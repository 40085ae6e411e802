"""Channel formats: storage dtype, element size, pixel format, quantisation (images.md §1.1, §2.1)."""
from __future__ import annotations

import enum

import numpy as np
import torch

from ..core.enums import MPSImageFeatureChannelFormat as F


class MTLPixelFormat(enum.IntEnum):
    """The Metal pixel formats an MPSImage can report (raw values are Metal's)."""

    invalid = 0
    r8Unorm = 10
    r16Unorm = 20
    r16Float = 25
    rg8Unorm = 30
    r32Float = 55
    rg16Unorm = 60
    rg16Float = 65
    rgba8Unorm = 70
    rg32Float = 105
    rgba16Unorm = 110
    rgba16Float = 115
    rgba32Float = 125


class MTLTextureType(enum.IntEnum):
    """Metal texture types; an MPSImage reports ``type2D`` or ``type2DArray`` (images.md §2)."""

    type1D = 0
    type1DArray = 1
    type2D = 2
    type2DArray = 3
    type2DMultisample = 4
    typeCube = 5
    typeCubeArray = 6
    type3D = 7


class MTLTextureUsage(enum.IntFlag):
    """Metal texture usage bits (``usage`` of descriptors and images; no numeric effect here)."""

    unknown = 0
    shaderRead = 1
    shaderWrite = 2
    renderTarget = 4
    pixelFormatView = 0x10


#: Storage dtype of each format. Unorm formats are kept as float32 holding exactly
#: quantised values k/255 or k/65535 (spec §12: "float32 plus a quantise-on-write step").
STORAGE_DTYPE = {
    F.float32: torch.float32,
    F.float16: torch.float16,
    F.bfloat16: torch.bfloat16,
    F.unorm8: torch.float32,
    F.unorm16: torch.float32,
}

#: Element type of the host buffers of read_bytes / write_bytes. bfloat16 has no NumPy
#: type: its host buffers are float32 (documented extension).
HOST_DTYPE: dict[F, np.dtype] = {
    F.float32: np.dtype(np.float32),
    F.float16: np.dtype(np.float16),
    F.bfloat16: np.dtype(np.float32),
    F.unorm8: np.dtype(np.uint8),
    F.unorm16: np.dtype(np.uint16),
}

ELEMENT_SIZE = {F.float32: 4, F.float16: 2, F.bfloat16: 2, F.unorm8: 1, F.unorm16: 2}
PRECISION = {F.float32: 24, F.float16: 11, F.bfloat16: 8, F.unorm8: 8, F.unorm16: 16}
UNORM_MAX = {F.unorm8: 255.0, F.unorm16: 65535.0}

_PIXEL_FORMATS = {
    F.unorm8: (MTLPixelFormat.r8Unorm, MTLPixelFormat.rg8Unorm, MTLPixelFormat.rgba8Unorm),
    F.unorm16: (MTLPixelFormat.r16Unorm, MTLPixelFormat.rg16Unorm, MTLPixelFormat.rgba16Unorm),
    F.float16: (MTLPixelFormat.r16Float, MTLPixelFormat.rg16Float, MTLPixelFormat.rgba16Float),
    F.float32: (MTLPixelFormat.r32Float, MTLPixelFormat.rg32Float, MTLPixelFormat.rgba32Float),
    # Apple keeps bfloat16 in 16-bit unorm textures (MPSImage.h); report those.
    F.bfloat16: (MTLPixelFormat.r16Unorm, MTLPixelFormat.rg16Unorm, MTLPixelFormat.rgba16Unorm),
}

#: The format an image gets when its descriptor says ``none`` (inferred: MPS picks one;
#: mpsnn picks float32, the format its kernels compute in).
DEFAULT_FORMAT = F.float32

_FROM_DTYPE = {torch.float32: F.float32, torch.float16: F.float16, torch.bfloat16: F.bfloat16}


def resolve_format(fmt: F) -> F:
    return DEFAULT_FORMAT if fmt == F.none else F(fmt)


def format_for_dtype(dtype: torch.dtype) -> F | None:
    return _FROM_DTYPE.get(dtype)


def components(feature_channels: int) -> int:
    """Components of the pixel format: 1, 2 or 4 (3-channel images carry one padding)."""
    return 1 if feature_channels == 1 else 2 if feature_channels == 2 else 4


def pixel_format(fmt: F, feature_channels: int) -> MTLPixelFormat:
    fmt = resolve_format(fmt)
    table = _PIXEL_FORMATS.get(fmt)
    if table is None:
        return MTLPixelFormat.invalid
    c = components(feature_channels)
    return table[0 if c == 1 else 1 if c == 2 else 2]


def slices_per_image(feature_channels: int) -> int:
    return (feature_channels + 3) // 4


def quantize_unorm(values: torch.Tensor, fmt: F) -> torch.Tensor:
    """Clamp to [0,1] and round to the nearest representable unorm value (Metal's rule)."""
    m = UNORM_MAX[fmt]
    k = torch.round(values.float().clamp(0.0, 1.0) * m)
    # divide by a device tensor, not a Python scalar: CUDA turns `t / scalar` into
    # `t * (1/scalar)`, which can miss the correctly rounded k/m by one ulp (CPU != CUDA)
    return k / k.new_full((), m)
