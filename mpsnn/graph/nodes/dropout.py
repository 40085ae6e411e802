"""Dropout nodes (spec/graph.md §14, dropout.md §5): MPSCNNDropoutNode, MPSCNNDropoutGradientNode.

Short-form defaults (inferred, dropout.md): ``keep_probability`` 0.5, ``seed`` 0,
``mask_stride_in_pixels`` {1, 1, 1}.

Masks in a graph (inferred): every encode of a graph draws a fresh mask, from the seed
``derived_seed(seed, k)`` of the graph's ``k``-th encode (``k = 0`` uses ``seed`` itself), so
training sees a new mask each step while a run stays reproducible; the gradient node reads the
mask from the forward node's state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...backends.dropout import derived_seed
from ...core.device import Device
from ...core.structs import MTLSize
from ...kernels.dropout import MPSCNNDropout, MPSCNNDropoutGradient
from .base import GradientNode, MPSNNFilterNode, MPSNNImageNode, MPSNNStateNode, UnaryFilterNode, encode_unary

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext

_ONE = MTLSize(1, 1, 1)


class MPSCNNDropoutGradientNode(GradientNode):
    """``MPSCNNDropoutGradientNode(source_gradient, source_image, gradient_state,
    keep_probability, seed, mask_stride_in_pixels)``: read-only ``keep_probability``, ``seed``,
    ``mask_stride_in_pixels`` (the forward values)."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 keep_probability: float = 0.5, seed: int = 0, mask_stride_in_pixels: MTLSize = _ONE,
                 forward: MPSNNFilterNode | None = None) -> None:
        MPSCNNDropoutGradient(Device("cpu"), keep_probability, seed, mask_stride_in_pixels)  # validates the parameters
        super().__init__(source_gradient, source_image, gradient_state, forward)
        self._keep, self._seed, self._stride = float(keep_probability), int(seed), mask_stride_in_pixels

    keep_probability = property(lambda self: self._keep)
    seed = property(lambda self: self._seed)
    mask_stride_in_pixels = property(lambda self: self._stride)

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        return cls(gradient_image, forward._source_images[0], forward.result_state, f._keep, f._seed, f._stride, forward=forward)

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNDropoutGradient(device, self._keep, self._seed, self._stride)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        kernel._seed = derived_seed(self._seed, ctx.encode_index)  # the forward node's mask of this encode
        return super()._encode(ctx, kernel, images, states)


class MPSCNNDropoutNode(UnaryFilterNode):
    """``MPSCNNDropoutNode(source[, keep_probability[, seed, mask_stride_in_pixels]])``:
    MPSCNNDropout; read-only ``keep_probability``, ``seed``, ``mask_stride_in_pixels``. See the
    module docstring for the mask drawn at each graph encode."""

    _gradient_class = MPSCNNDropoutGradientNode

    def __init__(self, source: MPSNNImageNode, keep_probability: float = 0.5, seed: int = 0,
                 mask_stride_in_pixels: MTLSize = _ONE, padding_policy: Any = None) -> None:
        MPSCNNDropout(Device("cpu"), keep_probability, seed, mask_stride_in_pixels)  # validates the parameters
        super().__init__(source, padding_policy)
        self._keep, self._seed, self._stride = float(keep_probability), int(seed), mask_stride_in_pixels

    keep_probability = property(lambda self: self._keep)
    seed = property(lambda self: self._seed)
    mask_stride_in_pixels = property(lambda self: self._stride)

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNDropout(device, self._keep, self._seed, self._stride)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        kernel._seed = derived_seed(self._seed, ctx.encode_index)
        return encode_unary(self, ctx, kernel, images)


__all__ = ["MPSCNNDropoutGradientNode", "MPSCNNDropoutNode"]
