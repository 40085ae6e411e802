"""Softmax nodes (spec/graph.md §14): MPSCNNSoftMaxNode, MPSCNNLogSoftMaxNode and their
gradient nodes. Both gradient kernels read the forward **result** (softmax.md §4), so the
gradient node's ``source_image`` is the forward node's ``result_image``."""
from __future__ import annotations

from typing import Any

from ...core.device import Device
from ...kernels.softmax import MPSCNNLogSoftMax, MPSCNNLogSoftMaxGradient, MPSCNNSoftMax, MPSCNNSoftMaxGradient
from .base import GradientNode, MPSNNFilterNode, MPSNNImageNode, UnaryFilterNode


class MPSCNNSoftMaxGradientNode(GradientNode):
    """``MPSCNNSoftMaxGradientNode(source_gradient, source_image, gradient_state)``;
    ``source_image`` is the forward softmax's result."""

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        return cls(gradient_image, forward.result_image, forward.result_state, forward=forward)

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNSoftMaxGradient(device)


class MPSCNNLogSoftMaxGradientNode(MPSCNNSoftMaxGradientNode):
    """``MPSCNNLogSoftMaxGradientNode(source_gradient, source_image, gradient_state)``;
    ``source_image`` is the forward log-softmax's result."""

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNLogSoftMaxGradient(device)


class MPSCNNSoftMaxNode(UnaryFilterNode):
    """``MPSCNNSoftMaxNode(source)``: softmax over the feature channels of each pixel."""

    _gradient_class = MPSCNNSoftMaxGradientNode

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNSoftMax(device)


class MPSCNNLogSoftMaxNode(UnaryFilterNode):
    """``MPSCNNLogSoftMaxNode(source)``: log-softmax over the feature channels of each pixel."""

    _gradient_class = MPSCNNLogSoftMaxGradientNode

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNLogSoftMax(device)


__all__ = ["MPSCNNLogSoftMaxGradientNode", "MPSCNNLogSoftMaxNode", "MPSCNNSoftMaxGradientNode", "MPSCNNSoftMaxNode"]
