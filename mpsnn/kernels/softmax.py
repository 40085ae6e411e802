"""Softmax kernels over feature channels: MPSCNNSoftMax, MPSCNNLogSoftMax and their gradients
(spec/softmax.md).

Math, at every pixel (x, y) of every image, over the ``N`` channels processed (the source's
channel window ``[source_feature_channel_offset, + Nin)``; channels never mix pixels)::

    softmax       y_k = exp(x_k - m) / sum_j exp(x_j - m),        m = max_j x_j
    log-softmax   y_k = x_k - m - ln sum_j exp(x_j - m)
    gradients     dx_k = s_k * (g_k - sum_j g_j * s_j)             (s = softmax result)
                  dx_k = g_k - exp(l_k) * sum_j g_j                (l = log-softmax result)

Conventions (``(inferred)`` where the spec is silent):

* Max subtraction makes both forwards overflow-safe (mathematically exact; spec §7).
* Arithmetic is float32 whatever the storage format; results are rounded once on store
  (unorm destinations clamp and round as everywhere).
* Window: 1x1, stride 1. The generic coordinate rule applies (kernel-base.md §2.2): a pixel
  whose source lies off the image (only possible with a non-zero ``offset``) reads the
  ``edge_mode`` value, i.e. all zeros under ``zero`` (giving the uniform ``1/N``, or
  ``-ln N`` for log-softmax) and the nearest edge pixel under ``clamp`` (inferred; the spec's
  "results do not depend on edgeMode" holds for every in-image read).
* The gradient kernels' secondary source is the forward **result** (softmax.md §4-5), not the
  forward source as in most gradient kernels. With a gradient state, the result pixel ``p``
  reads both the incoming gradient and the forward result at ``p - forward.offset +
  forward.clip_rect.origin``, channels ``[forward.destination_feature_channel_offset, + Nin)``,
  and is 0 where the forward pass wrote nothing (inferred from the kernel contract; the same
  mapping as :class:`~mpsnn.MPSCNNGradientKernel` uses for the incoming gradient).
* NaN in: NaN out for that pixel; a pixel of all ``-inf`` gives NaN (IEEE).
"""
from __future__ import annotations

from typing import Sequence

from ..backends.softmax import softmax_gradient_nhwc, softmax_nhwc
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..images.image import MPSImage
from ..images.state import ForwardGeometry, MPSState
from .results import direct_out, result_dtype, write_result

__all__ = ["MPSCNNLogSoftMax", "MPSCNNLogSoftMaxGradient", "MPSCNNSoftMax", "MPSCNNSoftMaxGradient"]



class _SoftMaxForward(MPSCNNKernel):
    _log = False

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode, inp.stride_x, inp.stride_y)
        write_result(dest, region, softmax_nhwc(x, self._log, out_dtype=result_dtype(dest), out=direct_out(dest, region)))


class MPSCNNSoftMax(_SoftMaxForward):
    """``MPSCNNSoftMax``: softmax over the feature channels of each pixel.

    Args:
        device: the device (positional, first). No other parameters (``initWithDevice:``).

    Properties: those of :class:`~mpsnn.MPSCNNKernel` (offset, clip_rect, channel offsets
    and max count, edge_mode, padding, destination_image_allocator); none of its own.
    Shape: the result has the size of the region written and ``Nin`` channels.
    Math: ``y_k = exp(x_k - m) / sum_j exp(x_j - m)``, ``m = max_j x_j`` (module docstring).

    Encode forms (inherited): ``encode(cb, source_image[, destination_image])``,
    ``encode(cb, source_image, destination_image, destination_state=state)``,
    ``encode(cb, source_image, destination_state_is_temporary=flag) -> (image, state)``,
    ``encode_batch(cb, source_images[, destination_images])`` with the same state options.
    The state (an :class:`~mpsnn.MPSNNGradientState`) feeds :class:`MPSCNNSoftMaxGradient`.

    Example::

        probs = MPSCNNSoftMax(device).encode(command_buffer, logits)
    """


class MPSCNNLogSoftMax(_SoftMaxForward):
    """``MPSCNNLogSoftMax``: natural log of the softmax over the feature channels of each pixel.

    Args:
        device: the device (positional, first). No other parameters.

    Math: ``y_k = x_k - m - ln sum_j exp(x_j - m)``, ``m = max_j x_j``. Properties, shapes
    and encode forms as :class:`MPSCNNSoftMax`; the state feeds
    :class:`MPSCNNLogSoftMaxGradient`.
    """

    _log = True


class _SoftMaxGradient(MPSCNNGradientKernel):
    _log = False
    _input_names = ("source_gradient", "source_image")

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        """The secondary source is the forward *result*: it is read where the incoming gradient
        is (same offset, the forward destination's channel window, zero outside)."""
        super().apply_forward_geometry(g)
        self._s_offset = self._p_offset
        self._s_c_off = g.destination_feature_channel_offset
        self._s_edge = MPSImageEdgeMode.zero

    def _input_bounds(self, which: str, image: MPSImage) -> tuple[int, int, int, int] | None:
        # with a gradient state both inputs live in the forward destination's coordinates
        return super()._input_bounds("primary", image)

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image (the forward result)")
        return primary_channels

    def _check_forward_result(self, sec: MPSImage) -> None:
        g = self._forward
        if g is None or not g.destination_width:
            return
        if (sec.width, sec.height) != (g.destination_width, g.destination_height):
            raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}",
                              f"be the forward result, of the forward destination's size {g.destination_width}x{g.destination_height}")

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        self._check_forward_result(sec)
        dy = read_window(prim.tensor[pg.n0:pg.n0 + region.count, :, :, pg.c0:pg.c0 + pg.channels],
                         pg.window_left, pg.window_top, region.width, region.height, pg.edge_mode, pg.stride_x, pg.stride_y, pg.bounds)
        y = read_window(sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + sg.channels],
                        sg.window_left, sg.window_top, region.width, region.height, sg.edge_mode, sg.stride_x, sg.stride_y, sg.bounds)
        write_result(dest, region, softmax_gradient_nhwc(dy, y, self._log, out_dtype=result_dtype(dest), out=direct_out(dest, region)))

    def encode(  # type: ignore[override]
        self,
        command_buffer: MTLCommandBuffer,
        source_gradient: MPSImage,
        source_image: MPSImage,
        gradient_state: MPSState | None,
        destination_gradient: MPSImage | None = None,
    ) -> MPSImage | None:
        """``encode(commandBuffer:sourceGradient:sourceImage:gradientState:[destinationGradient:])``;
        ``source_image`` is the forward **result**."""
        return super().encode(command_buffer, source_gradient, source_image, gradient_state, destination_gradient)

    def encode_batch(  # type: ignore[override]
        self,
        command_buffer: MTLCommandBuffer,
        source_gradients: Sequence[MPSImage],
        source_images: Sequence[MPSImage],
        gradient_states: Sequence[MPSState] | None,
        destination_gradients: Sequence[MPSImage] | None = None,
    ) -> list[MPSImage] | None:
        """Batch form; ``source_images[k]`` is the forward result of entry ``k``."""
        return super().encode_batch(command_buffer, source_gradients, source_images, gradient_states, destination_gradients)


class MPSCNNSoftMaxGradient(_SoftMaxGradient):
    """``MPSCNNSoftMaxGradient``: backward pass of :class:`MPSCNNSoftMax`.

    Args:
        device: the device (positional, first). No other parameters.

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[, destination_gradient])``
    and ``encode_batch(cb, source_gradients, source_images, gradient_states[,
    destination_gradients])`` where ``source_gradient`` is ``g = dL/dy`` and ``source_image``
    is the forward **result** ``s`` (softmax.md §4; not the forward source). ``gradient_state``
    is the forward encode's state (or None: the kernel's own primary/secondary properties are
    used as set).

    Math: ``dL/dx_k = s_k * (g_k - sum_j g_j * s_j)`` per pixel. Shape: with a state the result
    has the forward source's size (the incoming gradient's, in the plain case), 0 at pixels the
    forward pass did not write; ``source_image`` must then have the forward destination's size.
    Properties: those of :class:`~mpsnn.MPSCNNGradientKernel`.
    """


class MPSCNNLogSoftMaxGradient(_SoftMaxGradient):
    """``MPSCNNLogSoftMaxGradient``: backward pass of :class:`MPSCNNLogSoftMax`.

    Args:
        device: the device (positional, first). No other parameters.

    Encode forms as :class:`MPSCNNSoftMaxGradient`; ``source_image`` is the forward
    **result** ``l`` (the log-probabilities). Math: ``dL/dx_k = g_k - exp(l_k) * sum_j g_j``.
    """

    _log = True
