"""MPSCNNConvolutionTranspose and MPSCNNConvolutionTransposeGradient.

Forward (convolution.md §12.2): zero-insert the source (``sX − 1`` zeros between columns,
``sY − 1`` between rows) into ``Z``, then correlate ``Z`` with the weights **as given** (no
rotation) at unit stride::

    tx = offset.x·sX + kernel_offset_x ;  ty = offset.y·sY + kernel_offset_y
    acc(o) = Σ_q Σ_p Σ_c W[o][q][p][c] · Z(n, tx + i − (kWd>>1) + p·dX, ty + j − (kHd>>1) + q·dY, G(o)·Cin_g + c)
    D[n, x, y, cd0 + o] = store(f(bn(acc(o) + b[o])))

``i, j`` are relative to ``clip_rect.origin``; ``Z`` reads 0 outside the zero-inserted image
(the edge mode does not apply: a transpose never reads off its source). Weights
``[Cout][kH][kW][Cin/g]`` with ``Cin`` the transpose's *input* channels (the descriptor's
``input_feature_channels``).

Sizes (§12.3): with the ``MPSCNNConvolutionGradientState`` of the convolution this transpose
undoes (autoencoders), the result has that convolution's source size and
``kernel_offset = −forward.offset + (1 if the dilated kernel size is even else 0)``, ``offset =
0``. Without one, the padding policy sizes the result with the reverse rule
``(src − 1)·s + 1 + style·(kWd − 1)`` and sets ``offset = 0`` and ``kernel_offset``
(kernel-base.md §6.4).

Gradient (§13.2, the exact adjoint): ``dW`` and ``db`` into the
``MPSCNNConvolutionTransposeGradientState``, ``dS`` (an ordinary strided correlation of ``E``
with the channel-transposed weights) as the result, sized like the transpose's source.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..backends import convolution as conv_backend
from ..backends import dispatch
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSNNConvolutionAccumulatorPrecisionOption
from ..core.errors import MPSTypeError
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.structs import MPSOffset
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import MPSState
from .convolution import ConvolutionGradientBase, _ConvolutionWeights, require_input_channels
from .convolution_data import (
    MPSCNNConvolutionDataSource,
    MPSCNNConvolutionGradientState,
    MPSCNNConvolutionTransposeGradientState,
)
from .results import write_result


def _is_conv_state(s: Any) -> bool:
    return isinstance(s, MPSCNNConvolutionGradientState) and not isinstance(s, MPSCNNConvolutionTransposeGradientState)


class MPSCNNConvolutionTranspose(_ConvolutionWeights, MPSCNNKernel):
    """``MPSCNNConvolutionTranspose``: a transposed ("fractionally strided") convolution that
    enlarges images by the descriptor's strides (see the module docstring for the math).

    Args:
        device: the device (positional, first).
        weights: an :class:`MPSCNNConvolutionDataSource` (float32 weights).

    Properties: ``input_feature_channels``, ``output_feature_channels``, ``groups``,
    ``data_source``, ``kernel_offset_x``/``kernel_offset_y`` (rw, default 0),
    ``accumulator_precision_option``; ``is_backwards`` is True.

    Encode: every kernel-base form, plus ``convolution_gradient_state=`` (keyword, or in the
    third position) to size the result from the paired convolution:
    ``encode(cb, source_image, convolution_gradient_state[, destination_image])``.
    """

    _kind = "transpose"
    _is_backwards = True

    def __init__(self, device: Device | str, weights: MPSCNNConvolutionDataSource | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        if weights is None:
            raise MPSTypeError(f"{type(self).__name__}: `weights` (an MPSCNNConvolutionDataSource) is required")
        self._init_weights(weights, "transpose")
        g = self._geom
        self._kernel_width, self._kernel_height = g.kernel_width, g.kernel_height
        self._stride_x, self._stride_y = g.stride_x, g.stride_y
        self._dilation_x, self._dilation_y = g.dilation_x, g.dilation_y
        self.kernel_offset_x = 0
        self.kernel_offset_y = 0
        self.accumulator_precision_option = MPSNNConvolutionAccumulatorPrecisionOption.float
        self._conv_state: MPSCNNConvolutionGradientState | None = None

    def is_result_state_reused_across_batch(self) -> bool:
        return True

    def source_channels_used(self, source: MPSImage) -> int:
        return require_input_channels(self, source, self._geom.input_channels)

    def _result_feature_channels(self, source_channels: int) -> int:
        return self._geom.output_channels

    def _apply_padding_offsets(self, r: Any) -> None:
        self._offset = MPSOffset(0, 0, self._offset.z)
        self.kernel_offset_x, self.kernel_offset_y = r.kernel_offset_x, r.kernel_offset_y

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        if source_states is None and self._conv_state is not None:
            source_states = [self._conv_state]
        return super().destination_image_descriptor(source_images, source_states)

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        for st in source_states or []:
            if _is_conv_state(st):
                f = st.geometry  # type: ignore[attr-defined]
                kwd = (self._geom.kernel_width - 1) * self._geom.dilation_x + 1
                khd = (self._geom.kernel_height - 1) * self._geom.dilation_y + 1
                self._offset = MPSOffset(0, 0, self._offset.z)
                self.kernel_offset_x = -f.offset.x + (1 if kwd % 2 == 0 else 0)
                self.kernel_offset_y = -f.offset.y + (1 if khd % 2 == 0 else 0)
                desc = desc.copy()
                desc.width, desc.height = f.source_width, f.source_height
        return desc

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        st = MPSCNNConvolutionTransposeGradientState(self._geometry(source, dest), self.device, command_buffer, self,
                                                     None if self._conv_state is None else self._conv_state.convolution)
        st.kernel_offset = (self.kernel_offset_x, self.kernel_offset_y)  # type: ignore[attr-defined]
        return st

    def encode(self, command_buffer: MTLCommandBuffer, source_image: MPSImage, destination_image: Any = None,  # type: ignore[override]
               swift_destination_image: MPSImage | None = None, *,
               convolution_gradient_state: MPSCNNConvolutionGradientState | None = None, destination_state: MPSState | None = None,
               destination_state_is_temporary: bool | None = None) -> Any:
        """Encode forms of :class:`~mpsnn.MPSCNNKernel`, optionally sized by the paired
        convolution's gradient state (``convolution_gradient_state``)."""
        if _is_conv_state(destination_image):  # Swift order: (cb, source, convolutionGradientState[, destination])
            if convolution_gradient_state is not None:
                raise MPSTypeError(f"{self._name()}: `convolution_gradient_state` was given twice")
            convolution_gradient_state, destination_image = destination_image, swift_destination_image
        elif swift_destination_image is not None:
            raise MPSTypeError(f"{self._name()}: a fourth positional argument (destination image) needs the convolution gradient state third")
        if convolution_gradient_state is not None and not _is_conv_state(convolution_gradient_state):
            raise MPSTypeError(f"{self._name()}: `convolution_gradient_state` must be an MPSCNNConvolutionGradientState, but got {type(convolution_gradient_state).__name__}")
        self._conv_state = convolution_gradient_state
        try:
            if convolution_gradient_state is not None and destination_image is not None:
                self.destination_image_descriptor([source_image], [convolution_gradient_state])
            return super().encode(command_buffer, source_image, destination_image, destination_state=destination_state,
                                  destination_state_is_temporary=destination_state_is_temporary)
        finally:
            self._conv_state = None

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], destination_images: Any = None,  # type: ignore[override]
                     swift_destination_images: Sequence[MPSImage] | None = None, *,
                     convolution_gradient_states: Sequence[MPSCNNConvolutionGradientState] | None = None,
                     destination_states: Sequence[MPSState] | None = None, destination_state_is_temporary: bool | None = None) -> Any:
        if destination_images is not None and destination_images and _is_conv_state(destination_images[0]):
            convolution_gradient_states, destination_images = destination_images, swift_destination_images
        self._conv_state = convolution_gradient_states[0] if convolution_gradient_states else None
        try:
            if self._conv_state is not None and destination_images is not None and source_images:
                self.destination_image_descriptor([source_images[0]], [self._conv_state])
            return super().encode_batch(command_buffer, source_images, destination_images, destination_states=destination_states,
                                        destination_state_is_temporary=destination_state_is_temporary)
        finally:
            self._conv_state = None

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        g = self._geom
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + g.input_channels]
        w, b = self._compute_weights(x.dtype if x.dtype != torch.float64 else torch.float32, fold=True)
        x = x.to(w.dtype) if x.dtype != w.dtype else x
        tx = self._offset.x * g.stride_x + self.kernel_offset_x + (region.x0 - self._clip_rect.origin.x)
        ty = self._offset.y * g.stride_y + self.kernel_offset_y + (region.y0 - self._clip_rect.origin.y)
        y = conv_backend.conv_transpose_nhwc(x, w, b, stride=(g.stride_x, g.stride_y), dilation=(g.dilation_x, g.dilation_y),
                                             groups=g.groups, tx=tx, ty=ty, out_w=region.width, out_h=region.height,
                                             allow_tf32=self._allow_tf32())
        p = self._neuron_params()
        if p is not None:
            y = y.contiguous()
            dispatch.neuron_forward(y, y, p)
        if isinstance(state, MPSCNNConvolutionTransposeGradientState):
            state.kernel_offset = (self.kernel_offset_x, self.kernel_offset_y)  # type: ignore[attr-defined]
        write_result(dest, region, y)


class MPSCNNConvolutionTransposeGradient(ConvolutionGradientBase):
    """``MPSCNNConvolutionTransposeGradient``: gradients of a transposed convolution with
    respect to its source (the result) and to its weights and biases (into the
    ``MPSCNNConvolutionTransposeGradientState``; summed over the batch by ``encode_batch``).

    Args:
        device: the device (positional, first).
        weights: the forward transpose's data source.

    Properties: ``gradient_option`` (default ``all``), ``source_gradient_feature_channels``
    (the transpose's output channels), ``source_image_feature_channels`` (its input
    channels), ``groups``, ``data_source``.
    """

    _kind = "transpose"
    _state_class = MPSCNNConvolutionTransposeGradientState
    _forward_name = "transpose"

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        f, st = self._checked_forward(dest, sec)
        g = self._geom
        e, fx0, fy0 = self._incoming_gradient(prim, pg, region.count, f)
        x = sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + g.input_channels]
        w, _ = self._compute_weights(x.dtype if x.dtype != torch.float64 else torch.float32, fold=False)
        x = x.to(w.dtype) if x.dtype != w.dtype else x
        e = e.to(w.dtype) if e.dtype != w.dtype else e
        kx, ky = getattr(st, "kernel_offset", (0, 0))
        tx = f.offset.x * g.stride_x + kx + (fx0 - f.clip_rect.origin.x)
        ty = f.offset.y * g.stride_y + ky + (fy0 - f.clip_rect.origin.y)
        need_data, need_w = self._needs()
        dx, dw, _ = conv_backend.conv_transpose_backward_nhwc(e, x, w, stride=(g.stride_x, g.stride_y), dilation=(g.dilation_x, g.dilation_y),
                                                               groups=g.groups, tx=tx, ty=ty, allow_tf32=self._allow_tf32(),
                                                               need_data=need_data, need_weights=need_w, need_bias=False)
        if need_w:
            assert dw is not None
            self._store_weight_gradients(st, dw, e)
        if need_data:
            assert dx is not None
            write_result(dest, region, dx)
