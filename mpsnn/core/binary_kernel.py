"""Two-input kernel bases: MPSCNNBinaryKernel and MPSCNNGradientKernel.

The coordinate rule of :mod:`mpsnn.core.kernel` applies to each input independently, with
its own offset, stride, window, dilation, channel window and edge mode; ``i, j`` are common
(both measured from ``clip_rect.origin``). Gradient kernels take the primary input to be the
incoming gradient and the secondary input the forward source (kernel-base.md §3-4).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..images.image import MPSImage, MPSImageAllocator, MPSImageDescriptor, MPSTemporaryImage
from ..images.state import ForwardGeometry, MPSNNBinaryGradientState, MPSNNGradientState, MPSState
from .device import Device, MTLCommandBuffer
from .enums import MPSImageEdgeMode
from .errors import MPSTypeError, MPSValueError, value_error
from .kernel import (
    _DEFAULT_PADDING,
    ULONG_MAX,
    InputGeometry,
    MPSCNNKernel,
    MPSKernel,
    Region,
    _channel_offset_property,
    _clip_region,
    _consume,
    _edge_mode_property,
    _positive_property,
    _typed_property,
)
from .padding import MPSNNDefaultPadding, MPSNNPadding, apply_padding_method, method_of
from .structs import MPSOffset, MPSRectNoClip


class MPSCNNBinaryKernel(MPSKernel):
    """``MPSCNNBinaryKernel``: base of kernels with a primary and a secondary source image.

    Per-input properties: ``primary_offset`` / ``secondary_offset``,
    ``primary_source_feature_channel_offset`` / ``secondary_...``,
    ``primary_source_feature_channel_max_count`` / ``secondary_...``, ``primary_edge_mode`` /
    ``secondary_edge_mode``, settable ``primary_stride_in_pixels_x/_y`` and
    ``secondary_stride_in_pixels_x/_y`` (default 1), read-only kernel sizes and dilation
    rates. Shared: ``clip_rect``, ``destination_feature_channel_offset``, ``padding``,
    ``destination_image_allocator``, ``is_backwards``, ``is_state_modified``.
    The coordinate rule of :class:`MPSCNNKernel` applies to each input independently; the
    destination size in the auto forms comes from the primary image.
    """

    _primary_kernel = (1, 1)
    _secondary_kernel = (1, 1)
    _primary_dilation = (1, 1)
    _secondary_dilation = (1, 1)
    _is_backwards = False
    _is_state_modified = False
    _result_state_class: type | None = None

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self._p_offset = MPSOffset()
        self._s_offset = MPSOffset()
        self._clip_rect = MPSRectNoClip
        self._dst_c_off = 0
        self._p_c_off = 0
        self._s_c_off = 0
        self._p_c_max = ULONG_MAX
        self._s_c_max = ULONG_MAX
        self._p_edge = MPSImageEdgeMode.zero
        self._s_edge = MPSImageEdgeMode.zero
        self._p_stride = [1, 1]
        self._s_stride = [1, 1]
        self._padding: MPSNNPadding = MPSNNDefaultPadding.padding_with_method(_DEFAULT_PADDING)
        self._allocator: MPSImageAllocator = MPSTemporaryImage.default_allocator

    primary_offset = _typed_property("_p_offset", "primary_offset", MPSOffset)
    secondary_offset = _typed_property("_s_offset", "secondary_offset", MPSOffset)
    destination_feature_channel_offset = _channel_offset_property("_dst_c_off", "destination_feature_channel_offset")
    primary_source_feature_channel_offset = _channel_offset_property("_p_c_off", "primary_source_feature_channel_offset")
    secondary_source_feature_channel_offset = _channel_offset_property("_s_c_off", "secondary_source_feature_channel_offset")
    primary_source_feature_channel_max_count = _positive_property("_p_c_max", "primary_source_feature_channel_max_count")
    secondary_source_feature_channel_max_count = _positive_property("_s_c_max", "secondary_source_feature_channel_max_count")
    primary_edge_mode = _edge_mode_property("_p_edge", "primary_edge_mode")
    secondary_edge_mode = _edge_mode_property("_s_edge", "secondary_edge_mode")
    primary_stride_in_pixels_x = _positive_property("_p_stride", "primary_stride_in_pixels_x", 0)
    primary_stride_in_pixels_y = _positive_property("_p_stride", "primary_stride_in_pixels_y", 1)
    secondary_stride_in_pixels_x = _positive_property("_s_stride", "secondary_stride_in_pixels_x", 0)
    secondary_stride_in_pixels_y = _positive_property("_s_stride", "secondary_stride_in_pixels_y", 1)

    primary_kernel_width = property(lambda self: self._primary_kernel[0])
    primary_kernel_height = property(lambda self: self._primary_kernel[1])
    secondary_kernel_width = property(lambda self: self._secondary_kernel[0])
    secondary_kernel_height = property(lambda self: self._secondary_kernel[1])
    primary_dilation_rate_x = property(lambda self: self._primary_dilation[0])
    primary_dilation_rate_y = property(lambda self: self._primary_dilation[1])
    secondary_dilation_rate_x = property(lambda self: self._secondary_dilation[0])
    secondary_dilation_rate_y = property(lambda self: self._secondary_dilation[1])
    is_backwards = property(lambda self: self._is_backwards)
    is_state_modified = property(lambda self: self._is_state_modified)
    clip_rect = MPSCNNKernel.clip_rect
    padding = MPSCNNKernel.padding
    destination_image_allocator = MPSCNNKernel.destination_image_allocator
    is_result_state_reused_across_batch = MPSCNNKernel.is_result_state_reused_across_batch
    append_batch_barrier = MPSCNNKernel.append_batch_barrier

    def encoding_storage_size(self, primary_image: MPSImage, secondary_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> int:
        return 0

    # -- size rules -------------------------------------------------------------------------------------
    def _channels_used(self, image: MPSImage, c_off: int, c_max: int, which: str) -> int:
        avail = image.feature_channels - c_off
        if avail <= 0:
            raise value_error(self._name(), f"{which}_source_feature_channel_offset", c_off,
                              f"be < the {which} image's feature_channels={image.feature_channels}")
        return min(c_max, avail)

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        """Channels written (default: the primary's channels used)."""
        return primary_channels

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """Result descriptor from the primary image (``source_images = [primary, secondary]``);
        sets ``primary_offset`` (and, for gradients, properties from the gradient state)."""
        if len(source_images) != 2:
            raise value_error(self._name(), "source_images", f"{len(source_images)} images", "hold [primary, secondary]")
        prim, sec = source_images
        method = method_of(self._padding)
        r = apply_padding_method(method, prim.width, prim.height, self._primary_kernel[0], self._primary_kernel[1],
                                 self._p_stride[0], self._p_stride[1], self._primary_dilation[0], self._primary_dilation[1], self._is_backwards)
        if r.width < 1 or r.height < 1:
            raise value_error(self._name(), "primary image", f"{prim.width}x{prim.height}", "be large enough for the kernel window", f"a {r.width}x{r.height} result")
        self._p_offset = MPSOffset(r.offset_x, r.offset_y, self._p_offset.z)
        nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                            self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
        desc = MPSImageDescriptor._trusted(prim.feature_channel_format, r.width, r.height, nout, prim.number_of_images)
        return self._finish_descriptor(desc, method, source_images, source_states)

    def _apply_source_states(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState]) -> None:
        """Let the source states set the kernel properties they carry, for the forms with an
        explicit destination (the descriptor pipeline does it for the others)."""
        self.destination_image_descriptor(source_images, source_states)

    def _input_geometry(self, which: str, image: MPSImage, region_x0: int, region_y0: int, channels: int) -> InputGeometry:
        if which == "primary":
            off, c0, stride, k, d, edge = self._p_offset, self._p_c_off, self._p_stride, self._primary_kernel, self._primary_dilation, self._p_edge
        else:
            off, c0, stride, k, d, edge = self._s_offset, self._s_c_off, self._s_stride, self._secondary_kernel, self._secondary_dilation, self._s_edge
        return InputGeometry(
            n0=off.z, c0=c0, channels=channels,
            cx0=off.x + (region_x0 - self._clip_rect.origin.x) * stride[0],
            cy0=off.y + (region_y0 - self._clip_rect.origin.y) * stride[1],
            stride_x=stride[0], stride_y=stride[1], kernel_width=k[0], kernel_height=k[1],
            dilation_x=d[0], dilation_y=d[1], edge_mode=edge, bounds=self._input_bounds(which, image))

    def _input_bounds(self, which: str, image: MPSImage) -> tuple[int, int, int, int] | None:
        return None

    # -- result states --------------------------------------------------------------------------------
    def _make_state(self, primary: MPSImage, secondary: MPSImage, dest: MPSImage | None, cb: MTLCommandBuffer | None) -> MPSState | None:
        if self._result_state_class is None:
            return None
        return self._result_state_class(self._binary_geometry(primary, dest, "primary"), self._binary_geometry(secondary, dest, "secondary"), self.device, cb)

    def _binary_geometry(self, image: MPSImage, dest: MPSImage | None, which: str) -> ForwardGeometry:
        p = which == "primary"
        return ForwardGeometry(
            kernel_class=type(self).__name__, offset=self._p_offset if p else self._s_offset, clip_rect=self._clip_rect,
            kernel_width=(self._primary_kernel if p else self._secondary_kernel)[0],
            kernel_height=(self._primary_kernel if p else self._secondary_kernel)[1],
            stride_in_pixels_x=(self._p_stride if p else self._s_stride)[0], stride_in_pixels_y=(self._p_stride if p else self._s_stride)[1],
            dilation_rate_x=(self._primary_dilation if p else self._secondary_dilation)[0],
            dilation_rate_y=(self._primary_dilation if p else self._secondary_dilation)[1],
            edge_mode=self._p_edge if p else self._s_edge,
            source_feature_channel_offset=self._p_c_off if p else self._s_c_off,
            source_feature_channel_max_count=self._p_c_max if p else self._s_c_max,
            destination_feature_channel_offset=self._dst_c_off, source_width=image.width, source_height=image.height,
            source_feature_channels=image.feature_channels, source_number_of_images=image.number_of_images,
            destination_width=dest.width if dest is not None else 0, destination_height=dest.height if dest is not None else 0)

    def result_state(self, primary_image: MPSImage, secondary_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> MPSState | None:
        """``resultStateForPrimaryImage:secondaryImage:sourceStates:destinationImage:``."""
        return self._make_state(primary_image, secondary_image, destination_image, None)

    def temporary_result_state(self, command_buffer: MTLCommandBuffer, primary_image: MPSImage, secondary_image: MPSImage, source_states: Sequence[MPSState] | None = None, destination_image: MPSImage | None = None) -> MPSState | None:
        return self._make_state(primary_image, secondary_image, destination_image, self._check_command_buffer(command_buffer))

    def result_state_batch(self, primary_images: Sequence[MPSImage], secondary_images: Sequence[MPSImage],
                           source_states: Sequence[Sequence[MPSState]] | None = None,
                           destination_images: Sequence[MPSImage] | None = None) -> list[MPSState | None]:
        """``resultStateBatchForPrimaryImage:secondaryImage:sourceStates:destinationImage:``: one state per pair."""
        return [self._make_state(p, s, destination_images[k] if destination_images else None, None)
                for k, (p, s) in enumerate(zip(primary_images, secondary_images))]

    def temporary_result_state_batch(self, command_buffer: MTLCommandBuffer, primary_images: Sequence[MPSImage],
                                     secondary_images: Sequence[MPSImage], source_states: Sequence[Sequence[MPSState]] | None = None,
                                     destination_images: Sequence[MPSImage] | None = None) -> list[MPSState | None]:
        cb = self._check_command_buffer(command_buffer)
        return [self._make_state(p, s, destination_images[k] if destination_images else None, cb)
                for k, (p, s) in enumerate(zip(primary_images, secondary_images))]

    result_state_for_primary_image = result_state
    temporary_result_state_for_command_buffer = temporary_result_state
    result_state_batch_for_primary_image = result_state_batch
    temporary_result_state_batch_for_command_buffer = temporary_result_state_batch

    # -- encode ------------------------------------------------------------------------------------------
    def encode(
        self,
        command_buffer: MTLCommandBuffer,
        primary_image: MPSImage,
        secondary_image: MPSImage,
        destination_image: MPSImage | None = None,
        *,
        destination_state: MPSState | None = None,
        destination_state_is_temporary: bool | None = None,
    ) -> Any:
        """Encode with two sources; the forms mirror :meth:`MPSCNNKernel.encode`."""
        return self._encode_binary(command_buffer, primary_image, secondary_image, destination_image, None,
                                   destination_state, destination_state_is_temporary)

    def encode_batch(
        self,
        command_buffer: MTLCommandBuffer,
        primary_images: Sequence[MPSImage],
        secondary_images: Sequence[MPSImage],
        destination_images: Sequence[MPSImage] | None = None,
        *,
        destination_states: Sequence[MPSState] | None = None,
        destination_state_is_temporary: bool | None = None,
    ) -> Any:
        return self._encode_binary_batch(command_buffer, primary_images, secondary_images, destination_images, None,
                                         destination_states, destination_state_is_temporary)

    def _encode_binary(self, command_buffer, primary, secondary, destination, source_states, destination_state, destination_state_is_temporary):  # type: ignore[no-untyped-def]
        cb = self._check_command_buffer(command_buffer)
        prim = self._check_image(self._input_names[0], primary, cb)
        sec = self._check_image(self._input_names[1], secondary, cb)
        states = [self._check_state(f"{self._state_name}", s, cb) for s in (source_states or [])]
        if destination is not None:
            if destination_state_is_temporary is not None:
                raise MPSValueError(f"{self._name()}: `destination_state_is_temporary` goes with the forms that return the result")
            if states:
                # the explicit form still takes the geometry the states carry
                self._apply_source_states([prim, sec], states)
            self._encode_checked(cb, prim, sec, destination, destination_state)
            _consume([prim, sec, *states])
            return None
        if destination_state is not None:
            raise MPSValueError(f"{self._name()}: `destination_state` needs a destination image; use `destination_state_is_temporary` to get a new state")
        desc = self.destination_image_descriptor([prim, sec], states)
        dest = self._allocator.image_for_command_buffer(cb, desc, self)
        self._prepare_new_destination(cb, prim, sec, dest)
        state = None
        if destination_state_is_temporary is not None:
            state = self._make_state(prim, sec, dest, cb if destination_state_is_temporary else None)
        self._encode_checked(cb, prim, sec, dest, state)
        _consume([prim, sec, *states])
        return (dest, state) if destination_state_is_temporary is not None else dest

    def _encode_binary_batch(self, command_buffer, primaries, secondaries, destinations, source_states, destination_states, destination_state_is_temporary):  # type: ignore[no-untyped-def]
        cb = self._check_command_buffer(command_buffer)
        n = len(primaries)
        if len(secondaries) != n:
            raise value_error(self._name(), self._input_names[1] + "s", f"{len(secondaries)} images", f"match the {n} {self._input_names[0]}s")
        if source_states is not None and len(source_states) != n:
            raise value_error(self._name(), self._state_name + "s", f"{len(source_states)} states", f"match the {n} images")
        prims = [self._check_image(f"{self._input_names[0]}s[{k}]", p, cb) for k, p in enumerate(primaries)]
        secs = [self._check_image(f"{self._input_names[1]}s[{k}]", s, cb) for k, s in enumerate(secondaries)]
        sts = [self._check_state(f"{self._state_name}s[{k}]", s, cb) for k, s in enumerate(source_states or [])]
        if destinations is not None:
            if len(destinations) != n:
                raise value_error(self._name(), "destination_images", f"{len(destinations)} images", f"match the {n} sources")
            for k in range(n):
                if sts:
                    self._apply_source_states([prims[k], secs[k]], [sts[k]])
                for other in prims + secs:
                    self._check_no_alias(destinations[k], other)
                self._encode_checked(cb, prims[k], secs[k], destinations[k], destination_states[k] if destination_states else None)
            _consume(prims + secs + sts)
            return None
        dests, states = [], []
        for k in range(n):
            if prims[k].number_of_images != 1:
                raise value_error(self._name(), f"{self._input_names[0]}s[{k}].number_of_images", prims[k].number_of_images, "be 1 in the batch forms that return images")
            desc = self.destination_image_descriptor([prims[k], secs[k]], [sts[k]] if sts else None)
            d = self._allocator.image_for_command_buffer(cb, desc, self)
            self._prepare_new_destination(cb, prims[k], secs[k], d)
            st = None
            if destination_state_is_temporary is not None:
                st = self._make_state(prims[k], secs[k], d, cb if destination_state_is_temporary else None)
                states.append(st)
            self._encode_checked(cb, prims[k], secs[k], d, st)
            dests.append(d)
        _consume(prims + secs + sts)
        return (dests, states) if destination_state_is_temporary is not None else dests

    _input_names = ("primary_image", "secondary_image")
    _state_name = "source_state"

    def _prepare_new_destination(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: MPSImage) -> None:
        """Hook run on a result the kernel allocated itself, before the encode writes it."""

    def _encode_checked(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: Any, state: MPSState | None) -> None:
        dest = self._check_image("destination_image", dest, cb)
        self._check_no_alias(dest, prim, sec)
        np_ = self._channels_used(prim, self._p_c_off, self._p_c_max, "primary")
        ns = self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary")
        nout = self._result_feature_channels(np_, ns)
        if self._dst_c_off + nout > dest.feature_channels:
            raise value_error(self._name(), "destination_image.feature_channels", dest.feature_channels,
                              f"be >= destination_feature_channel_offset + {nout} output channels = {self._dst_c_off + nout}")
        for which, img, off in (("primary", prim, self._p_offset), ("secondary", sec, self._s_offset)):
            if off.z < 0 or off.z >= img.number_of_images:
                raise value_error(self._name(), f"{which}_offset.z", off.z, f"address a {which} image in [0, {img.number_of_images})")
        avail = min(prim.number_of_images - self._p_offset.z, sec.number_of_images - self._s_offset.z)
        n0, count, x0, y0, w, h = _clip_region(self._name(), self._clip_rect, dest, avail)
        if state is not None:
            state = self._check_state("destination_state", state, cb)
            if isinstance(state, MPSNNBinaryGradientState):
                state.geometry = self._binary_geometry(prim, dest, "primary")
                state.secondary_geometry = self._binary_geometry(sec, dest, "secondary")
        region = Region(n0, count, x0, y0, w, h, self._dst_c_off, nout)
        pg = self._input_geometry("primary", prim, x0, y0, np_)
        sg = self._input_geometry("secondary", sec, x0, y0, ns)
        if count == 0 or w == 0 or h == 0:
            return
        with cb.encoding(self._name()):
            self._encode_region(cb, prim, pg, sec, sg, dest, region, state)

    def _encode_region(self, cb: MTLCommandBuffer, prim: MPSImage, pg: InputGeometry, sec: MPSImage, sg: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _encode_region")


class MPSCNNGradientKernel(MPSCNNBinaryKernel):
    """``MPSCNNGradientKernel``: base of gradient (training) kernels.

    Primary input = the incoming gradient (dL/d forward output); secondary = the forward
    source image. The result is dL/d forward source.

    ``kernel_offset_x`` / ``kernel_offset_y`` (default 0): offset applied after the incoming
    gradient is upsampled by zero insertion; the effective offset on the upsampled gradient is
    ``primary_offset * primary_stride + kernel_offset``.

    Encode forms: ``encode(cb, source_gradient, source_image, gradient_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    gradient_states[, destination_gradients])``. The gradient state (made by the forward
    encode) supplies the forward kernel's geometry; with it, the result is the size of the
    forward source and result pixel ``p`` reads the incoming gradient at
    ``p - forward.offset + forward.clip_rect.origin``, the gradient being 0 where the forward
    pass wrote nothing. With ``gradient_state=None`` the kernel's own ``primary_offset``,
    ``secondary_offset``, channel offsets and edge modes are used as set. Result image ``n`` pairs with incoming-gradient image ``n``: a forward
    encode that moved images (``offset.z``, ``clip_rect.origin.z`` or a partial
    ``clip_rect.size.depth``) is refused with :class:`~mpsnn.MPSValueError`.
    """

    _input_names = ("source_gradient", "source_image")
    _state_name = "gradient_state"
    _gradient_state_class: type = MPSNNGradientState

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)
        self.kernel_offset_x = 0
        self.kernel_offset_y = 0
        self._forward: ForwardGeometry | None = None
        #: the gradient state of the encode in progress (set by the descriptor pipeline)
        self._gradient_state: MPSNNGradientState | None = None

    #: why the batch forms need gradient states (None: they are optional)
    _gradient_states_required: str | None = None

    def _check_gradient_state(self, name: str, state: MPSState | None) -> None:
        """Refuse a gradient state this kernel cannot use; every encode form calls it first,
        for each state. The base accepts any state, and none."""

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        """Take the forward kernel's geometry from its gradient state (unit-stride, windowless
        forward kernels; windowed kernels override)."""
        self._forward = g
        self._p_offset = MPSOffset(g.clip_rect.origin.x - g.offset.x, g.clip_rect.origin.y - g.offset.y, 0)
        self._s_offset = MPSOffset(0, 0, 0)
        self._p_edge = MPSImageEdgeMode.zero
        self._p_c_off = g.destination_feature_channel_offset
        self._s_c_off = g.source_feature_channel_offset
        self._dst_c_off = g.source_feature_channel_offset
        # both inputs use exactly the forward pass's Nin channels (the incoming gradient may
        # be wider than destination_feature_channel_offset + Nin, e.g. after a concatenation)
        nin = max(1, min(g.source_feature_channel_max_count, g.source_feature_channels - g.source_feature_channel_offset))
        self._p_c_max = nin
        self._s_c_max = nin

    def _prepare_new_destination(self, cb: MTLCommandBuffer, prim: MPSImage, sec: MPSImage, dest: MPSImage) -> None:
        """A gradient result the kernel allocated is zero wherever the encode does not write
        (channels outside the forward pass's channel window): the true gradient there is 0,
        and a pooled temporary would otherwise expose stale data."""
        nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                            self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
        if self._dst_c_off != 0 or nout != dest.feature_channels:
            with cb.encoding(self._name()):
                dest.tensor.zero_()

    def _input_bounds(self, which: str, image: MPSImage) -> tuple[int, int, int, int] | None:
        g = self._forward
        if which != "primary" or g is None:
            return None
        c = g.clip_rect
        x1 = min(c.origin.x + c.size.width, g.destination_width or image.width, image.width)
        y1 = min(c.origin.y + c.size.height, g.destination_height or image.height, image.height)
        return (c.origin.x, x1, c.origin.y, y1)

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        # Take the forward geometry *before* the base class checks channel counts: those
        # checks depend on the channel windows the gradient state carries.
        self._take_gradient_states(source_images, source_states)
        return super().destination_image_descriptor(source_images, source_states)

    def _take_gradient_states(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> bool:
        """Adopt the forward geometry of the gradient states; True when one was found."""
        found = False
        for st in source_states or []:
            if isinstance(st, MPSNNGradientState):
                self._gradient_state = st
                self.apply_forward_geometry(st.geometry)
                self._check_forward_batch(st.geometry, source_images)
                found = True
        return found

    def _apply_source_states(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState]) -> None:
        # a gradient state carries everything the explicit form needs: skip the descriptors
        if not self._take_gradient_states(source_images, source_states):
            super()._apply_source_states(source_images, source_states)

    def _check_forward_batch(self, g: ForwardGeometry, source_images: Sequence[MPSImage]) -> None:
        """Gradient kernels map result image n to incoming-gradient image n: refuse a forward
        pass that moved images with ``offset.z`` / ``clip_rect`` (a silently wrong result)."""
        n = g.source_number_of_images
        counts = [img.number_of_images for img in source_images]
        if g.offset.z != 0 or g.clip_rect.origin.z != 0 or g.clip_rect.size.depth < n or any(c != n for c in counts):
            raise value_error(
                self._name(), "gradient_state",
                f"forward offset.z={g.offset.z}, clip_rect.origin.z={g.clip_rect.origin.z}, clip_rect.size.depth={g.clip_rect.size.depth}",
                f"come from a forward encode that mapped every image n of its {n}-image source to image n "
                "(batch addressing through offset.z / clip_rect is not supported by gradient kernels)",
                f"{self._input_names[0]}/{self._input_names[1]} with {counts} images")

    def encode(  # type: ignore[override]
        self,
        command_buffer: MTLCommandBuffer,
        source_gradient: MPSImage,
        source_image: MPSImage,
        gradient_state: MPSState | None,
        destination_gradient: MPSImage | None = None,
    ) -> MPSImage | None:
        """``encode(commandBuffer:sourceGradient:sourceImage:gradientState:[destinationGradient:])``."""
        self._check_gradient_state("gradient_state", gradient_state)
        self._forward, self._gradient_state = None, None
        states = [gradient_state] if gradient_state is not None else None
        return self._encode_binary(command_buffer, source_gradient, source_image, destination_gradient, states, None, None)

    def encode_batch(  # type: ignore[override]
        self,
        command_buffer: MTLCommandBuffer,
        source_gradients: Sequence[MPSImage],
        source_images: Sequence[MPSImage],
        gradient_states: Sequence[MPSState] | None,
        destination_gradients: Sequence[MPSImage] | None = None,
    ) -> list[MPSImage] | None:
        if gradient_states is None and self._gradient_states_required is not None:
            raise MPSTypeError(f"{self._name()}: `gradient_states` are required ({self._gradient_states_required})")
        for k, st in enumerate(gradient_states or []):
            self._check_gradient_state(f"gradient_states[{k}]", st)
        self._forward, self._gradient_state = None, None
        states = list(gradient_states) if gradient_states is not None else None
        return self._encode_binary_batch(command_buffer, source_gradients, source_images, destination_gradients, states, None, None)
