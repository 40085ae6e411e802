"""Padding policies and the result-size rules (kernel-base.md §6).

Pure integer functions first (shared by kernels, graph nodes and tests), then the
``MPSNNPadding`` protocol and ``MPSNNDefaultPadding``.

All divisions are C integer divisions truncating toward zero (:func:`cdiv`), as Apple's
reference code does; Python's ``//`` rounds toward minus infinity and would differ for the
negative ``extra`` values that valid-only padding produces.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .enums import MPSImageEdgeMode
from .enums import MPSNNPaddingMethod as PM
from .errors import MPSTypeError, value_error

if TYPE_CHECKING:  # pragma: no cover
    from ..images.image import MPSImage, MPSImageDescriptor
    from ..images.state import MPSState


def cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def size_style(method: int) -> int:
    """-1 for sizeValidOnly, 0 for sizeSame, +1 for sizeFull."""
    field = int(method) & int(PM.sizeMask)
    if field == int(PM.sizeValidOnly):
        return -1
    if field == int(PM.sizeSame):
        return 0
    if field == int(PM.sizeFull):
        return 1
    raise value_error("MPSNNPaddingMethod", "size", hex(field), "be sizeValidOnly, sizeSame or sizeFull")


def dilated_window(kernel_size: int, dilation: int) -> int:
    """Extent of a dilated window: ``(k - 1) * d + 1``."""
    return (kernel_size - 1) * dilation + 1


def dest_size(src: int, stride: int, win: int, style: int) -> int:
    """Forward result size: ``ceil((src + style*(win-1)) / stride)`` (C division)."""
    n = src + style * (win - 1)
    return cdiv(n + stride - 1, stride)


def dest_size_reverse(src: int, stride: int, win: int, style: int) -> int:
    """Result size of a reverse (backwards) filter: ``(src-1)*stride + 1 + style*(win-1)``."""
    return (src - 1) * stride + 1 + style * (win - 1)


def remainder_left(method: int, axis: str) -> int:
    """``r`` of the centred formula: 1 when the odd pixel goes left (x) / top (y)."""
    rem = int(method) & int(PM.addRemainderToMask)
    if axis == "x":
        return 1 if rem in (int(PM.addRemainderToTopLeft), int(PM.addRemainderToBottomLeft)) else 0
    return 1 if rem in (int(PM.addRemainderToTopLeft), int(PM.addRemainderToTopRight)) else 0


def left_pad(extra: int, method: int, axis: str) -> int:
    """Missing pixels placed before the image, by the alignment bits."""
    align = int(method) & int(PM.alignMask)
    if align == int(PM.alignCentered):
        return cdiv(extra + remainder_left(method, axis), 2)
    if align == int(PM.alignTopLeft):
        return extra
    if align == int(PM.alignBottomRight):
        return 0
    raise value_error("MPSNNPaddingMethod", "align", align, "be alignCentered, alignTopLeft or alignBottomRight")


def padding_offset(src: int, stride: int, win: int, method: int, axis: str) -> int:
    """Forward ``offset`` along one axis (the centre convention of MPSOffset)."""
    style = size_style(method)
    dest = dest_size(src, stride, win, style)
    read = (dest - 1) * stride + win
    extra = read - src
    return (win // 2) - left_pad(extra, method, axis)


def reverse_kernel_offset(src: int, stride: int, win: int, method: int, axis: str) -> int:
    """Reverse filters work on the zero-inserted source of size ``(src-1)*stride+1`` with unit
    stride; their ``offset`` is 0 and this is their ``kernel_offset`` (inferred, §6.4)."""
    style = size_style(method)
    dest = dest_size_reverse(src, stride, win, style)
    extra = (dest - 1) + win - ((src - 1) * stride + 1)
    return (win // 2) - left_pad(extra, method, axis)


@dataclass(frozen=True)
class PaddingResult:
    """Result of applying a padding method to one source image."""

    width: int
    height: int
    offset_x: int
    offset_y: int
    kernel_offset_x: int = 0
    kernel_offset_y: int = 0


@functools.lru_cache(maxsize=4096)
def apply_padding_method(
    method: int,
    src_width: int,
    src_height: int,
    kernel_width: int = 1,
    kernel_height: int = 1,
    stride_x: int = 1,
    stride_y: int = 1,
    dilation_x: int = 1,
    dilation_y: int = 1,
    is_backwards: bool = False,
) -> PaddingResult:
    """Destination size and offsets for ``method`` (kernel-base.md §6.2, §6.4). A pure
    function of integers, memoised: every auto-sized encode asks it."""
    style = size_style(method)
    wx, wy = dilated_window(kernel_width, dilation_x), dilated_window(kernel_height, dilation_y)
    if is_backwards:
        w = dest_size_reverse(src_width, stride_x, wx, style)
        h = dest_size_reverse(src_height, stride_y, wy, style)
        return PaddingResult(w, h, 0, 0,
                             reverse_kernel_offset(src_width, stride_x, wx, method, "x"),
                             reverse_kernel_offset(src_height, stride_y, wy, method, "y"))
    w = dest_size(src_width, stride_x, wx, style)
    h = dest_size(src_height, stride_y, wy, style)
    return PaddingResult(w, h, padding_offset(src_width, stride_x, wx, method, "x"), padding_offset(src_height, stride_y, wy, method, "y"))


def inverse_padding_method(method: int) -> int:
    """Same alignment/remainder/flags; size field swapped ValidOnly <-> Full."""
    m = int(method)
    field = m & int(PM.sizeMask)
    swapped = {int(PM.sizeValidOnly): int(PM.sizeFull), int(PM.sizeFull): int(PM.sizeValidOnly)}.get(field, field)
    return (m & ~int(PM.sizeMask)) | swapped


def describe_padding_method(method: int) -> str:
    m = int(method)
    align = {0: "alignCentered", 1: "alignTopLeft", 2: "alignBottomRight", 3: "align_reserved"}[m & 3]
    rem = {0: "addRemainderToTopLeft", 4: "addRemainderToTopRight", 8: "addRemainderToBottomLeft", 12: "addRemainderToBottomRight"}[m & 12]
    size = {0: "sizeValidOnly", 16: "sizeSame", 32: "sizeFull", 48: "size_reserved"}.get(m & int(PM.sizeMask), hex(m & int(PM.sizeMask)))
    parts = [align, rem, size]
    if m & int(PM.custom):
        parts.append("custom")
    if m & int(PM.customAllowForNodeFusion):
        parts.append("customAllowForNodeFusion")
    if m & int(PM.excludeEdges):
        parts.append("excludeEdges")
    return " | ".join(parts)


def method_of(policy: "MPSNNPadding") -> int:
    """The policy's padding method as an int, whether the policy spells ``padding_method`` as
    a property or, like the Objective-C protocol, as a method."""
    value = policy.padding_method
    if callable(value) and not isinstance(value, int):
        value = value()
    if isinstance(value, bool) or not isinstance(value, int):
        raise MPSTypeError(f"{type(policy).__name__}: `padding_method` must give an MPSNNPaddingMethod, but gave {type(value).__name__}")
    return int(value)


class MPSNNPadding(abc.ABC):
    """Protocol ``MPSNNPadding``: a padding policy.

    Subclasses implement :attr:`padding_method` (a property, or a method as in Swift's
    ``paddingMethod()``: both are read); a policy with the ``custom`` bit also
    implements :meth:`destination_image_descriptor_for_source_images`, which is called last
    in the destination-size pipeline and may edit the descriptor and the kernel (it must
    leave ``kernel.offset`` correct).
    """

    @property
    @abc.abstractmethod
    def padding_method(self) -> PM:
        """The policy's :class:`MPSNNPaddingMethod`."""

    @property
    def label(self) -> str:
        return describe_padding_method(method_of(self))

    def destination_image_descriptor_for_source_images(
        self,
        source_images: Sequence["MPSImage"],
        source_states: Sequence["MPSState"] | None,
        kernel: Any,
        suggested_descriptor: "MPSImageDescriptor",
    ) -> "MPSImageDescriptor":
        return suggested_descriptor

    def inverse(self) -> "MPSNNPadding | None":
        """A policy for the corresponding gradient pass, or None (optional in the protocol)."""
        return None


class MPSNNDefaultPadding(MPSNNPadding):
    """``MPSNNDefaultPadding``: a padding policy that is just a :class:`MPSNNPaddingMethod`.

    Make one with :meth:`padding_with_method`; the two TensorFlow average-pooling policies
    come from :meth:`padding_for_tensorflow_average_pooling` and
    :meth:`padding_for_tensorflow_average_pooling_valid_only`. Their custom hook sets the
    kernel's ``edge_mode`` to ``clamp`` (which average pooling reads as "divide by the valid
    pixels"). CONFLICT resolved as the spec recommends: the SAME policy is
    ``custom | sizeSame | alignCentered | addRemainderToBottomRight`` (0x401C), the valid-only
    one ``custom | sizeValidOnly | alignCentered | addRemainderToTopLeft`` (0x4000).
    """

    _cache: dict[int, "MPSNNDefaultPadding"] = {}

    def __init__(self, method: int = int(PM.alignCentered | PM.addRemainderToTopLeft | PM.sizeSame), _tf_pooling: bool = False) -> None:
        if not isinstance(method, int):
            raise MPSTypeError(f"MPSNNDefaultPadding: `method` must be an MPSNNPaddingMethod, but got {type(method).__name__}")
        size_style(method)  # validates the size field
        if (int(method) & 3) == 3:
            raise value_error("MPSNNDefaultPadding", "method", hex(int(method)), "not use the reserved alignment value 3")
        if (int(method) & int(PM.custom)) and not _tf_pooling:
            raise value_error("MPSNNDefaultPadding", "method", hex(int(method)), "not have the `custom` bit (write an MPSNNPadding subclass for custom policies)")
        self._method = PM(int(method))
        self._tf_pooling = _tf_pooling

    @classmethod
    def padding_with_method(cls, method: int) -> "MPSNNDefaultPadding":
        key = int(method)
        if key not in cls._cache:
            cls._cache[key] = cls(method)
        return cls._cache[key]

    @classmethod
    def padding_for_tensorflow_average_pooling(cls) -> "MPSNNDefaultPadding":
        return cls(int(PM.custom | PM.sizeSame | PM.alignCentered | PM.addRemainderToBottomRight), _tf_pooling=True)

    @classmethod
    def padding_for_tensorflow_average_pooling_valid_only(cls) -> "MPSNNDefaultPadding":
        return cls(int(PM.custom | PM.sizeValidOnly | PM.alignCentered | PM.addRemainderToTopLeft), _tf_pooling=True)

    @property
    def padding_method(self) -> PM:
        return self._method

    @property
    def label(self) -> str:
        base = describe_padding_method(self._method)
        return f"TensorFlow average pooling ({base})" if self._tf_pooling else base

    def destination_image_descriptor_for_source_images(self, source_images, source_states, kernel, suggested_descriptor):
        if self._tf_pooling and hasattr(kernel, "edge_mode"):
            kernel.edge_mode = MPSImageEdgeMode.clamp
        return suggested_descriptor

    def inverse(self) -> "MPSNNDefaultPadding":
        inv = inverse_padding_method(self._method)
        if self._tf_pooling:
            return MPSNNDefaultPadding(inv, _tf_pooling=True)
        return MPSNNDefaultPadding.padding_with_method(inv)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MPSNNDefaultPadding):
            return NotImplemented
        return self._method == other._method and self._tf_pooling == other._tf_pooling

    def __hash__(self) -> int:
        return hash((int(self._method), self._tf_pooling))

    def __repr__(self) -> str:
        return f"MPSNNDefaultPadding({self.label})"


def as_padding(value: Any, owner: str) -> MPSNNPadding:
    """Accept an MPSNNPadding or a bare MPSNNPaddingMethod."""
    if isinstance(value, MPSNNPadding):
        return value
    if isinstance(value, int):
        return MPSNNDefaultPadding.padding_with_method(value)
    raise MPSTypeError(f"{owner}: `padding` must be an MPSNNPadding or an MPSNNPaddingMethod, but got {type(value).__name__}")
