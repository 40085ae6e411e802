"""Pooling nodes (spec/graph.md §14 "Pooling"): MPSCNNPoolingNode (abstract), Average, L2Norm,
Max, DilatedMax, and their gradient nodes.

Forms: ``Node(source, filter_size)`` (window and stride = ``filter_size``), ``Node(source,
filter_size, stride)``, ``Node(source, kernel_width=..., kernel_height=...,
stride_in_pixels_x=..., stride_in_pixels_y=...)``. The kernels a pooling node runs use edge
mode ``clamp`` (the node default of the spec: average pooling divides by the pixels inside the
image); a padding policy's custom hook may change it.
"""
from __future__ import annotations

from typing import Any

from ...core.device import Device
from ...core.enums import MPSImageEdgeMode
from ...core.errors import MPSTypeError
from ...kernels.pooling import (
    MPSCNNDilatedPoolingMax,
    MPSCNNDilatedPoolingMaxGradient,
    MPSCNNPoolingAverage,
    MPSCNNPoolingAverageGradient,
    MPSCNNPoolingL2Norm,
    MPSCNNPoolingL2NormGradient,
    MPSCNNPoolingMax,
    MPSCNNPoolingMaxGradient,
)
from .base import GradientNode, MPSNNFilterNode, MPSNNImageNode, MPSNNStateNode, UnaryFilterNode


def _size(owner: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MPSTypeError(f"{owner}: `{name}` (={v!r}) must be a positive integer")
    return v


def _clamp_then_pad(node: MPSNNFilterNode, kernel: Any) -> None:
    """Before each encode: edge mode clamp (the pooling nodes' default), then the padding
    policy, whose custom hook may change the edge mode again."""
    kernel.edge_mode = MPSImageEdgeMode.clamp
    kernel.padding = node.padding_policy


class MPSCNNPoolingGradientNode(GradientNode):
    """``MPSCNNPoolingGradientNode(source_gradient, source_image, gradient_state, kernel_width,
    kernel_height, stride_in_pixels_x, stride_in_pixels_y, padding_policy=None)``: abstract;
    read-only ``kernel_width``, ``kernel_height``, ``stride_in_pixels_x/_y``."""

    _kernel_class: type | None = None

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 kernel_width: int, kernel_height: int, stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1,
                 padding_policy: Any = None, forward: MPSNNFilterNode | None = None) -> None:
        if self._kernel_class is None:
            raise MPSTypeError("MPSCNNPoolingGradientNode: abstract; use the Max, Average, L2Norm or DilatedMax gradient node")
        owner = type(self).__name__
        self._kw, self._kh = _size(owner, "kernel_width", kernel_width), _size(owner, "kernel_height", kernel_height)
        self._sx, self._sy = _size(owner, "stride_in_pixels_x", stride_in_pixels_x), _size(owner, "stride_in_pixels_y", stride_in_pixels_y)
        super().__init__(source_gradient, source_image, gradient_state, forward, padding_policy)

    kernel_width = property(lambda self: self._kw)
    kernel_height = property(lambda self: self._kh)
    stride_in_pixels_x = property(lambda self: self._sx)
    stride_in_pixels_y = property(lambda self: self._sy)

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        return cls(gradient_image, forward._source_images[0], forward.result_state, f._kw, f._kh, f._sx, f._sy, forward=forward)

    def _build_kernel(self, device: Device) -> Any:
        kernel = self._kernel_class(device, self._kw, self._kh, self._sx, self._sy)  # type: ignore[misc]
        if isinstance(kernel, MPSCNNPoolingMax):
            kernel._keep_winners = True  # the CPU gradient reuses the forward's winners (MPSCNNPoolingMax)
        return kernel


class MPSCNNPoolingMaxGradientNode(MPSCNNPoolingGradientNode):
    """``MPSCNNPoolingMaxGradientNode``: MPSCNNPoolingMaxGradient."""

    _kernel_class = MPSCNNPoolingMaxGradient


class MPSCNNPoolingAverageGradientNode(MPSCNNPoolingGradientNode):
    """``MPSCNNPoolingAverageGradientNode``: MPSCNNPoolingAverageGradient."""

    _kernel_class = MPSCNNPoolingAverageGradient


class MPSCNNPoolingL2NormGradientNode(MPSCNNPoolingGradientNode):
    """``MPSCNNPoolingL2NormGradientNode``: MPSCNNPoolingL2NormGradient."""

    _kernel_class = MPSCNNPoolingL2NormGradient


class MPSCNNDilatedPoolingMaxGradientNode(MPSCNNPoolingGradientNode):
    """``MPSCNNDilatedPoolingMaxGradientNode(sg, si, gs, kernel_width, kernel_height,
    stride_in_pixels_x, stride_in_pixels_y, dilation_rate_x, dilation_rate_y)``."""

    _kernel_class = MPSCNNDilatedPoolingMaxGradient

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 kernel_width: int, kernel_height: int, stride_in_pixels_x: int = 1, stride_in_pixels_y: int = 1,
                 dilation_rate_x: int = 1, dilation_rate_y: int = 1, forward: MPSNNFilterNode | None = None) -> None:
        owner = type(self).__name__
        self._dx, self._dy = _size(owner, "dilation_rate_x", dilation_rate_x), _size(owner, "dilation_rate_y", dilation_rate_y)
        super().__init__(source_gradient, source_image, gradient_state, kernel_width, kernel_height, stride_in_pixels_x, stride_in_pixels_y, forward=forward)

    dilation_rate_x = property(lambda self: self._dx)
    dilation_rate_y = property(lambda self: self._dy)

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        return cls(gradient_image, forward._source_images[0], forward.result_state, f._kw, f._kh, f._sx, f._sy, f._dx, f._dy, forward=forward)

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNDilatedPoolingMaxGradient(device, self._kw, self._kh, self._dx, self._dy, self._sx, self._sy)


class MPSCNNPoolingNode(UnaryFilterNode):
    """``MPSCNNPoolingNode``: abstract base of the pooling nodes (see the module docstring for
    the forms); read-only ``kernel_width``, ``kernel_height``, ``stride_in_pixels_x/_y``."""

    _kernel_class: type | None = None

    def __init__(self, source: MPSNNImageNode, filter_size: int | None = None, stride: int | None = None, *,
                 kernel_width: int | None = None, kernel_height: int | None = None,
                 stride_in_pixels_x: int | None = None, stride_in_pixels_y: int | None = None, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        if self._kernel_class is None:
            raise MPSTypeError("MPSCNNPoolingNode: abstract; use MPSCNNPoolingMaxNode, MPSCNNPoolingAverageNode or MPSCNNPoolingL2NormNode")
        if filter_size is not None:
            if any(v is not None for v in (kernel_width, kernel_height, stride_in_pixels_x, stride_in_pixels_y)):
                raise MPSTypeError(f"{owner}: give `filter_size` [and `stride`] or the kernel_width/... form, not both")
            fs = _size(owner, "filter_size", filter_size)
            st = fs if stride is None else _size(owner, "stride", stride)
            kernel_width = kernel_height = fs
            stride_in_pixels_x = stride_in_pixels_y = st
        elif kernel_width is None or kernel_height is None:
            raise MPSTypeError(f"{owner}: `filter_size` or `kernel_width` and `kernel_height` are required")
        self._kw, self._kh = _size(owner, "kernel_width", kernel_width), _size(owner, "kernel_height", kernel_height)
        self._sx = _size(owner, "stride_in_pixels_x", stride_in_pixels_x if stride_in_pixels_x is not None else 1)
        self._sy = _size(owner, "stride_in_pixels_y", stride_in_pixels_y if stride_in_pixels_y is not None else 1)
        super().__init__(source, padding_policy)

    kernel_width = property(lambda self: self._kw)
    kernel_height = property(lambda self: self._kh)
    stride_in_pixels_x = property(lambda self: self._sx)
    stride_in_pixels_y = property(lambda self: self._sy)

    def _build_kernel(self, device: Device) -> Any:
        kernel = self._kernel_class(device, self._kw, self._kh, self._sx, self._sy)  # type: ignore[misc]
        if isinstance(kernel, MPSCNNPoolingMax):
            kernel._keep_winners = True  # the CPU gradient reuses the forward's winners (MPSCNNPoolingMax)
        return kernel

    def _apply_padding(self, kernel: Any) -> None:
        _clamp_then_pad(self, kernel)


class MPSCNNPoolingMaxNode(MPSCNNPoolingNode):
    """``MPSCNNPoolingMaxNode``: MPSCNNPoolingMax."""

    _kernel_class = MPSCNNPoolingMax
    _gradient_class = MPSCNNPoolingMaxGradientNode


class MPSCNNPoolingAverageNode(MPSCNNPoolingNode):
    """``MPSCNNPoolingAverageNode``: MPSCNNPoolingAverage."""

    _kernel_class = MPSCNNPoolingAverage
    _gradient_class = MPSCNNPoolingAverageGradientNode


class MPSCNNPoolingL2NormNode(MPSCNNPoolingNode):
    """``MPSCNNPoolingL2NormNode``: MPSCNNPoolingL2Norm."""

    _kernel_class = MPSCNNPoolingL2Norm
    _gradient_class = MPSCNNPoolingL2NormGradientNode


class MPSCNNDilatedPoolingMaxNode(UnaryFilterNode):
    """``MPSCNNDilatedPoolingMaxNode``: MPSCNNDilatedPoolingMax. Forms: ``(source,
    filter_size)`` (window, strides and dilation rates all = ``filter_size``); ``(source,
    filter_size, stride, dilation_rate)`` (the header's "dilation = stride" is a typo; the
    dilation rate is used, inferred); ``(source, kernel_width=..., kernel_height=...,
    stride_in_pixels_x=..., stride_in_pixels_y=..., dilation_rate_x=..., dilation_rate_y=...)``."""

    _gradient_class = MPSCNNDilatedPoolingMaxGradientNode

    def __init__(self, source: MPSNNImageNode, filter_size: int | None = None, stride: int | None = None, dilation_rate: int | None = None, *,
                 kernel_width: int | None = None, kernel_height: int | None = None, stride_in_pixels_x: int | None = None,
                 stride_in_pixels_y: int | None = None, dilation_rate_x: int | None = None, dilation_rate_y: int | None = None,
                 padding_policy: Any = None) -> None:
        owner = type(self).__name__
        if filter_size is not None:
            fs = _size(owner, "filter_size", filter_size)
            st = fs if stride is None else _size(owner, "stride", stride)
            dr = (fs if stride is None else 1) if dilation_rate is None else _size(owner, "dilation_rate", dilation_rate)
            kernel_width = kernel_height = fs
            stride_in_pixels_x = stride_in_pixels_y = st
            dilation_rate_x = dilation_rate_y = dr
        elif kernel_width is None or kernel_height is None:
            raise MPSTypeError(f"{owner}: `filter_size` or `kernel_width` and `kernel_height` are required")
        self._kw, self._kh = _size(owner, "kernel_width", kernel_width), _size(owner, "kernel_height", kernel_height)
        self._sx = _size(owner, "stride_in_pixels_x", stride_in_pixels_x or 1)
        self._sy = _size(owner, "stride_in_pixels_y", stride_in_pixels_y or 1)
        self._dx = _size(owner, "dilation_rate_x", dilation_rate_x or 1)
        self._dy = _size(owner, "dilation_rate_y", dilation_rate_y or 1)
        super().__init__(source, padding_policy)

    kernel_width = property(lambda self: self._kw)
    kernel_height = property(lambda self: self._kh)
    stride_in_pixels_x = property(lambda self: self._sx)
    stride_in_pixels_y = property(lambda self: self._sy)
    dilation_rate_x = property(lambda self: self._dx)
    dilation_rate_y = property(lambda self: self._dy)

    def _build_kernel(self, device: Device) -> Any:
        kernel = MPSCNNDilatedPoolingMax(device, self._kw, self._kh, self._dx, self._dy, self._sx, self._sy)
        kernel._keep_winners = True  # the CPU gradient reuses the forward's winners (MPSCNNPoolingMax)
        return kernel

    def _apply_padding(self, kernel: Any) -> None:
        _clamp_then_pad(self, kernel)


__all__ = [
    "MPSCNNDilatedPoolingMaxGradientNode",
    "MPSCNNDilatedPoolingMaxNode",
    "MPSCNNPoolingAverageGradientNode",
    "MPSCNNPoolingAverageNode",
    "MPSCNNPoolingGradientNode",
    "MPSCNNPoolingL2NormGradientNode",
    "MPSCNNPoolingL2NormNode",
    "MPSCNNPoolingMaxGradientNode",
    "MPSCNNPoolingMaxNode",
    "MPSCNNPoolingNode",
]
