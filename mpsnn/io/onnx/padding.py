"""ONNX padding as an :class:`~mpsnn.MPSNNPadding` policy with the ``custom`` bit.

ONNX places a window by explicit begin/end pads (or ``auto_pad``); MPS centres it with
``offset``. For a window of dilated extent ``E = (k - 1)·d + 1`` the first tap of result
pixel ``i`` is ``i·s - pad_begin`` in ONNX and ``offset + i·s - (E >> 1)`` in MPS
(kernel-base.md §2.2), so the policy sets ``offset = (E >> 1) - pad_begin`` per axis and the
result size by ONNX's rule (below) in its custom hook, which the kernel calls last when it
sizes its result. No rounding, no approximation: the taps read are exactly ONNX's.

Result size per axis, ``L`` the input length:

* explicit pads: ``floor((L + pb + pe - E) / s) + 1`` (``ceil`` with ``ceil_mode``; a last
  window that would start in the end padding is dropped, as the operator text says: "sliding
  windows that start in the right padded region are ignored" (PyTorch drops at most one);
* ``SAME_UPPER`` / ``SAME_LOWER``: ``ceil(L / s)``, total pad ``max((out - 1)·s + E - L, 0)``,
  the odd pixel at the end (UPPER) or the beginning (LOWER);
* ``VALID``: pads 0.

Transposed convolutions (:class:`ONNXTransposePadding`) use the reverse rule
``(L - 1)·s + output_padding + E - pb - pe`` (or ``output_shape``), ``offset = 0`` and a
``kernel_offset`` of ``(E >> 1) - (E - 1) + pb`` (see :mod:`mpsnn.kernels.convolution_transpose`).

``edge_mode`` (optional) is set on the kernel by the hook too: pooling reads it
(``clamp``: max pooling ignores the pads, average pooling divides by the taps inside the
image; ``zero``: L2 pooling reads the pads as 0).
"""
from __future__ import annotations

from typing import Any, Sequence

from ...core.enums import MPSImageEdgeMode
from ...core.enums import MPSNNPaddingMethod as PM
from ...core.errors import value_error
from ...core.padding import MPSNNPadding
from ...core.structs import MPSOffset

_METHOD = PM.custom | PM.sizeSame | PM.alignCentered


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def axis_pads(owner: str, length: int, kernel: int, stride: int, dilation: int, auto_pad: str,
              pads: tuple[int, int], ceil_mode: bool, trim: int = 0) -> tuple[int, int, int]:
    """(pad_begin, pad_end, result length) of one axis by ONNX's rule. ``trim``: end pixels of
    ``length`` that are ONNX's end padding already made explicit (a ceil-mode window may not
    start in them)."""
    extent = (kernel - 1) * dilation + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = _ceil_div(length, stride)
        total = max((out - 1) * stride + extent - length, 0)
        small = total // 2
        pb, pe = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        return pb, pe, out
    pb, pe = (0, 0) if auto_pad == "VALID" else pads
    span = length + pb + pe - extent
    if span < 0:
        raise value_error(owner, "input size", length, f"cover the window of extent {extent} with pads ({pb}, {pe})")
    out = (_ceil_div(span, stride) if ceil_mode else span // stride) + 1
    while ceil_mode and out > 1 and (out - 1) * stride >= length - trim + pb:
        out -= 1  # a window may not start in the end padding
    return pb, pe, out


class ONNXPadding(MPSNNPadding):
    """The padding of an ONNX Conv / pooling node (module docstring).

    Args:
        owner: the ONNX node's description (for messages).
        kernel: (kernel_height, kernel_width); strides, dilations likewise (H, W).
        pads: ((top, bottom), (left, right)); ``auto_pad``: ONNX's attribute.
        ceil_mode: ONNX's pooling attribute.
        edge_mode: set on the kernel when not None.
        trim: (H, W) end pixels of the source that are explicit end padding (see :func:`axis_pads`).
    """

    def __init__(self, owner: str, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 pads: Sequence[tuple[int, int]], auto_pad: str = "NOTSET", ceil_mode: bool = False,
                 edge_mode: MPSImageEdgeMode | None = None, trim: Sequence[int] = (0, 0)) -> None:
        self._trim = tuple(trim)
        self._owner = owner
        self._k, self._s, self._d = tuple(kernel), tuple(strides), tuple(dilations)
        self._pads = tuple(tuple(p) for p in pads)
        self._auto = auto_pad
        self._ceil = bool(ceil_mode)
        self._edge = edge_mode

    @property
    def padding_method(self) -> PM:
        return _METHOD

    @property
    def label(self) -> str:
        return f"ONNX padding (pads {self._pads}, auto_pad {self._auto}, ceil_mode {int(self._ceil)})"

    def result_size(self, height: int, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """((pad_top, pad_bottom, out_h), (pad_left, pad_right, out_w))."""
        return (axis_pads(self._owner, height, self._k[0], self._s[0], self._d[0], self._auto, self._pads[0], self._ceil, self._trim[0]),  # type: ignore[arg-type]
                axis_pads(self._owner, width, self._k[1], self._s[1], self._d[1], self._auto, self._pads[1], self._ceil, self._trim[1]))  # type: ignore[arg-type]

    def result_shape(self, shape: tuple[Any, ...], channels: Any) -> tuple[Any, ...]:
        """The ONNX result shape of a (N, C, H, W) or (N, C, L) input ``shape`` with ``channels``
        result channels (None where the input size is not known at load time)."""
        rank = len(shape)
        h = shape[2] if rank == 4 else 1
        w = shape[-1]
        if h is None or w is None:
            return (shape[0], channels) + (None,) * (rank - 2)
        (_, _, oh), (_, _, ow) = self.result_size(h, w)
        return (shape[0], channels) + ((oh, ow) if rank == 4 else (ow,))

    def destination_image_descriptor_for_source_images(self, source_images: Any, source_states: Any, kernel: Any, suggested_descriptor: Any) -> Any:
        src = source_images[0]
        (pt, _, oh), (pl, _, ow) = self.result_size(src.height, src.width)
        ey = (self._k[0] - 1) * self._d[0] + 1
        ex = (self._k[1] - 1) * self._d[1] + 1
        kernel.offset = MPSOffset((ex >> 1) - pl, (ey >> 1) - pt, kernel.offset.z)
        if self._edge is not None:
            kernel.edge_mode = self._edge
        suggested_descriptor.width, suggested_descriptor.height = ow, oh
        return suggested_descriptor


class ONNXTransposePadding(MPSNNPadding):
    """The padding of an ONNX ConvTranspose node (module docstring). ``output_shape`` (H, W)
    overrides the size; the pads are then derived as the ONNX operator text specifies: the odd
    pad at the end for ``SAME_UPPER``, at the beginning otherwise."""

    def __init__(self, owner: str, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 pads: Sequence[tuple[int, int]], output_padding: Sequence[int], output_shape: Sequence[int] | None,
                 auto_pad: str = "NOTSET") -> None:
        self._owner = owner
        self._k, self._s, self._d = tuple(kernel), tuple(strides), tuple(dilations)
        self._pads = tuple(tuple(p) for p in pads)
        self._op = tuple(output_padding)
        self._shape = None if output_shape is None else tuple(output_shape)
        self._auto = auto_pad

    @property
    def padding_method(self) -> PM:
        return _METHOD

    def axis(self, a: int, length: int) -> tuple[int, int]:
        """(pad_begin, result length) of axis ``a`` (0: height, 1: width)."""
        extent = (self._k[a] - 1) * self._d[a] + 1
        full = (length - 1) * self._s[a] + self._op[a] + extent
        if self._shape is not None or self._auto in ("SAME_UPPER", "SAME_LOWER"):
            out = self._shape[a] if self._shape is not None else length * self._s[a]
            total = full - out
            if total < 0:
                # an explicit output_shape larger than the full result (auto_pad NOTSET): ONNX's
                # reference (pads 0) and onnxruntime read the excess as an implicit
                # output_padding at the end, less than the stride; the extra pixels get the bias
                # only. With SAME_* they disagree (the reference shifts by total // 2,
                # onnxruntime clamps the size), so that stays refused.
                if self._auto in ("SAME_UPPER", "SAME_LOWER") or -total >= self._s[a]:
                    raise value_error(self._owner, "output_shape", self._shape if self._shape is not None else f"{self._auto} -> {out}",
                                      f"be at most {full} along axis {a}, or less than {full + self._s[a]} with auto_pad NOTSET")
                return 0, out
            pb = total // 2 if self._auto == "SAME_UPPER" else total - total // 2
            return pb, out
        pb, pe = self._pads[a]
        out = full - pb - pe
        if out < 1:
            raise value_error(self._owner, "pads", self._pads, f"leave a result of at least 1 pixel along axis {a}", f"{out}")
        return pb, out

    def destination_image_descriptor_for_source_images(self, source_images: Any, source_states: Any, kernel: Any, suggested_descriptor: Any) -> Any:
        src = source_images[0]
        pt, oh = self.axis(0, src.height)
        pl, ow = self.axis(1, src.width)
        ey = (self._k[0] - 1) * self._d[0] + 1
        ex = (self._k[1] - 1) * self._d[1] + 1
        kernel.offset = MPSOffset(0, 0, kernel.offset.z)
        kernel.kernel_offset_x = (ex >> 1) - (ex - 1) + pl
        kernel.kernel_offset_y = (ey >> 1) - (ey - 1) + pt
        suggested_descriptor.width, suggested_descriptor.height = ow, oh
        return suggested_descriptor


__all__ = ["ONNXPadding", "ONNXTransposePadding", "axis_pads"]
