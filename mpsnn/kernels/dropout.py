"""Dropout: MPSCNNDropout, MPSCNNDropoutGradient, MPSCNNDropoutGradientState (spec/dropout.md).

Math, for every element of the block an encode writes (``count`` images x ``h`` rows x ``w``
columns x ``Nin`` channels, in the destination's region ``R``)::

    forward    out = m * in / keep_probability
    gradient   dIn = m * g  / keep_probability          (the same m, inferred: d out / d in)

with ``m`` in {0, 1}, ``P(m = 1) = keep_probability``.

The mask (spec: "deterministic for a given seed", generator unspecified; this is mpsnn's
contract, so tests and users can rebuild it)::

    shape = (count, h if sy else 1, w if sx else 1, Nin if sz else 1)   # (sx, sy, sz) = mask_stride_in_pixels
    g = torch.Generator(device); g.manual_seed(seed_k)
    m = torch.rand(shape, generator=g, device=device, dtype=torch.float32) < keep_probability
    m is broadcast (expanded) to (count, h, w, Nin)

* ``seed_k = seed`` for ``encode``; entry ``k`` of ``encode_batch`` uses
  ``seed_k = (seed + k * 0x9E3779B97F4A7C15) mod 2**64`` (independent masks per entry;
  ``k = 0`` is ``seed``). Every encode reseeds: encoding the same kernel twice on the same
  source gives the same mask. For a fresh mask make a kernel with another seed (``seed`` is
  read-only, as in Apple's API).
* The images of one multi-image ``MPSImage`` get independent masks (rows of one draw;
  inferred, dropout.md §1). There is no batch component in the stride.
* ``mask_stride_in_pixels`` = ``MTLSize(width=sx, height=sy, depth=sz)``, each 0 or 1; ``z``
  (``depth``) is the feature-channel axis (inferred, dropout.md §1): ``(1, 1, 0)`` gives one
  decision per pixel shared by its channels, ``(0, 0, 1)`` one decision per channel shared by
  all pixels of an image, ``(0, 0, 0)`` one decision per image.
* CPU and CUDA generators differ: the same seed gives the same mask on the same kind of
  device only (the spec only asks for the distribution).
* A dropped element is ``0 * in`` (IEEE): a dropped NaN/inf gives NaN, as the formula reads.
* Off-image reads (non-zero ``offset``) follow ``edge_mode`` as for every ``MPSCNNKernel``.

``MPSCNNDropoutGradientState.mask_data`` layout (inferred, dropout.md §2): ``bytes`` of uint8,
1 = kept, 0 = dropped, one per element of the written block (broadcast axes expanded), in
``[count][Nin][h][w]`` order (image, channel, row, column), element ``(n, c, y, x)`` belonging
to destination pixel ``(clip_rect.origin.x + x, clip_rect.origin.y + y)`` of image
``clip_rect.origin.z + n``, channel ``destination_feature_channel_offset + c``.

The gradient reads the mask where it reads the incoming gradient (the forward destination's
coordinates), so ``secondary_offset`` has no numeric effect (spec: "secondaryOffset is used to
offset into the mask data"; with a gradient state mpsnn sets it to 0 and aligns the mask with
the incoming gradient, which is equivalent). The forward source (``source_image``) is only
validated, never read.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..backends.dropout import derived_seed, dropout_apply, dropout_mask
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSStateError, MPSTypeError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..core.structs import MTLSize
from ..images.image import MPSImage
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .results import write_result

__all__ = ["MPSCNNDropout", "MPSCNNDropoutGradient", "MPSCNNDropoutGradientState"]

_U64 = 1 << 64


# -- validation ---------------------------------------------------------------------------------


def check_keep_probability(owner: str, value: Any) -> float:
    """``keep_probability`` as float32 (Apple's ``float``), strictly inside (0, 1)."""
    if isinstance(value, bool):
        raise value_error(owner, "keep_probability", value, "be a real number in (0, 1)")
    try:
        v = float(np.float32(float(value)))
    except (TypeError, ValueError):
        raise value_error(owner, "keep_probability", value, "be a real number in (0, 1)") from None
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise value_error(owner, "keep_probability", value, "lie in (0.0, 1.0), both ends exclusive")
    return v


def check_seed(owner: str, value: Any) -> int:
    """``seed`` as an NSUInteger: an integer in [0, 2**64)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
        raise value_error(owner, "seed", value, "be an integer in [0, 2**64) (NSUInteger)")
    return value


def check_mask_stride(owner: str, value: Any) -> MTLSize:
    """``mask_stride_in_pixels``: an ``MTLSize`` (or ``(x, y, z)``) with every component 0 or 1."""
    if isinstance(value, MTLSize):
        comps = (value.width, value.height, value.depth)
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        comps = tuple(value)
    else:
        raise MPSTypeError(f"{owner}: `mask_stride_in_pixels` must be an MTLSize (or an (x, y, z) triple), but got {type(value).__name__}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c not in (0, 1) for c in comps):
        raise value_error(owner, "mask_stride_in_pixels", value, "have every component 0 (broadcast) or 1 (independent)")
    return MTLSize(*comps)


class _DropoutParameters:
    """Shared by the forward and gradient kernels: the three read-only parameters."""

    _keep: float
    _seed: int
    _stride: MTLSize

    def _set_parameters(self, keep_probability: Any, seed: Any, mask_stride_in_pixels: Any) -> None:
        owner = type(self).__name__
        missing = [n for n, v in (("keep_probability", keep_probability), ("seed", seed),
                                  ("mask_stride_in_pixels", mask_stride_in_pixels)) if v is None]
        if missing:
            raise MPSTypeError(f"{owner}: {', '.join(f'`{m}`' for m in missing)} required "
                               "(initWithDevice:keepProbability:seed:maskStrideInPixels: is the only init; "
                               "the kernel has no defaults)")
        self._keep = check_keep_probability(owner, keep_probability)
        self._seed = check_seed(owner, seed)
        self._stride = check_mask_stride(owner, mask_stride_in_pixels)

    @property
    def keep_probability(self) -> float:
        """Probability of keeping an element (float32, in (0, 1); read-only)."""
        return self._keep

    @property
    def seed(self) -> int:
        """Seed of the mask generator (read-only)."""
        return self._seed

    @property
    def mask_stride_in_pixels(self) -> MTLSize:
        """``MTLSize(x, y, z)``, each 0 (broadcast) or 1 (independent); z = channels (read-only)."""
        return self._stride



# -- the state -----------------------------------------------------------------------------------------


class MPSCNNDropoutGradientState(MPSNNGradientState):
    """``MPSCNNDropoutGradientState``: the mask a forward :class:`MPSCNNDropout` encode drew,
    for :class:`MPSCNNDropoutGradient`.

    Made by the forward kernel's ``result_state`` / ``temporary_result_state`` (and batch
    forms) or by an encode that returns a state; the forward encode fills it.

    Properties:
        mask_data: ``bytes``, uint8 1 (kept) / 0 (dropped) per element in
            ``[images][channels][rows][columns]`` order over the block the forward encode
            wrote (module docstring). Debugging only: reading it copies the mask to the host
            (synchronising with the device). Raises :class:`~mpsnn.MPSStateError` before the
            forward encode or after a temporary state was released.
        keep_probability, seed, mask_stride_in_pixels: the parameters of the forward kernel
            that drew the mask (Python extension).
        mask_seed: the seed the mask was drawn with (``seed``, or an ``encode_batch`` entry's
            derived seed; Python extension).
        mask: the mask as an NHWC uint8 tensor on the device, broadcast axes expanded
            (a view; Python extension).
    """

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None = None,
                 keep_probability: float = 0.5, seed: int = 0, mask_stride_in_pixels: MTLSize = MTLSize(1, 1, 1)) -> None:
        super().__init__(geometry, device, command_buffer)
        self.keep_probability = keep_probability
        self.seed = seed
        self.mask_stride_in_pixels = mask_stride_in_pixels
        self.mask_seed = seed                          # the seed the mask was drawn with (per batch entry)
        self._mask: torch.Tensor | None = None         # compact uint8 mask, broadcast axes of size 1
        self._block: tuple[int, int, int, int] = (0, 0, 0, 0)  # (count, h, w, Nin) of the written block

    def _set_mask(self, mask: torch.Tensor, block: tuple[int, int, int, int]) -> None:
        self._mask = mask
        self._block = block

    def _release(self) -> None:
        super()._release()
        self._mask = None

    def _mask_tensor(self, owner: str) -> torch.Tensor:
        if self.is_temporary and self.read_count == 0:
            raise MPSStateError(f"{owner}: {self._name()} was released (its `read_count` reached 0)")
        if self._mask is None:
            raise MPSStateError(f"{owner}: {self._name()} holds no mask yet: encode the forward MPSCNNDropout with it first")
        return self._mask.expand(*self._block)

    @property
    def mask(self) -> torch.Tensor:
        return self._mask_tensor(self._name())

    @property
    def mask_data(self) -> bytes:
        m = self._mask_tensor(self._name())
        return m.permute(0, 3, 1, 2).contiguous().cpu().numpy().tobytes()

    def resource_size(self) -> int:
        return int(self._mask.numel()) if self._mask is not None else 0


# -- kernels -------------------------------------------------------------------------------------------


class MPSCNNDropout(_DropoutParameters, MPSCNNKernel):
    """``MPSCNNDropout``: keeps each element with probability ``keep_probability`` and scales it
    by ``1 / keep_probability``; drops (zeroes) the rest.

    Args:
        device: the device (positional, first).
        keep_probability: float in (0, 1), both ends exclusive (stored as float32).
        seed: NSUInteger seed of the mask generator, in [0, 2**64).
        mask_stride_in_pixels: ``MTLSize(x, y, z)`` (or an ``(x, y, z)`` triple), each component
            0 (the decision is shared along that axis) or 1 (independent); z = feature channels.

    All three are required and read-only (``initWithDevice:keepProbability:seed:
    maskStrideInPixels:``; ``initWithDevice:`` is unavailable). The exact mask recipe, the
    per-entry seeds of ``encode_batch`` and the ``mask_data`` layout are in the module docstring.

    Properties: the three above plus those of :class:`~mpsnn.MPSCNNKernel`. Shape: output =
    the region written, ``Nin`` channels. Encode forms as :class:`~mpsnn.MPSCNNKernel`; the
    state-producing forms (``destination_state=`` / ``destination_state_is_temporary=``,
    ``result_state``, ``temporary_result_state`` and their batch forms) give an
    :class:`MPSCNNDropoutGradientState` holding the mask.

    Example::

        drop = MPSCNNDropout(device, keep_probability=0.8, seed=7, mask_stride_in_pixels=MTLSize(1, 1, 1))
        y, state = drop.encode(command_buffer, x, destination_state_is_temporary=True)
    """

    _result_state_class = MPSCNNDropoutGradientState

    def __init__(self, device: Device | str, keep_probability: float | None = None, seed: int | None = None,
                 mask_stride_in_pixels: MTLSize | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        self._set_parameters(keep_probability, seed, mask_stride_in_pixels)
        self._batch_entry: int | None = None   # index of the encode_batch entry being encoded

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        return MPSCNNDropoutGradientState(self._geometry(source, dest), self.device, command_buffer,
                                          self._keep, self._seed, self._stride)

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage],  # type: ignore[override]
                     destination_images: Sequence[MPSImage] | None = None, *, destination_states: Sequence[MPSState] | None = None,
                     destination_state_is_temporary: bool | None = None) -> Any:
        """Batch form; entry ``k`` draws its mask with seed ``(seed + k * 0x9E3779B97F4A7C15) mod 2**64``."""
        self._batch_entry = 0
        try:
            return super().encode_batch(command_buffer, source_images, destination_images,
                                        destination_states=destination_states, destination_state_is_temporary=destination_state_is_temporary)
        finally:
            self._batch_entry = None

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        if state is not None and not isinstance(state, MPSCNNDropoutGradientState):
            raise MPSTypeError(f"{self._name()}: `destination_state` must be an MPSCNNDropoutGradientState, but got {type(state).__name__}")
        entry = self._batch_entry
        self._seed_now = self._seed if entry is None else derived_seed(self._seed, entry)
        if entry is not None:
            self._batch_entry = entry + 1
        super()._encode_checked(cb, src, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode, inp.stride_x, inp.stride_y)
        sx, sy, sz = self._stride.width, self._stride.height, self._stride.depth
        shape = (region.count, region.height if sy else 1, region.width if sx else 1, inp.channels if sz else 1)
        mask = dropout_mask(shape, self._keep, self._seed_now, dest.device.torch_device)
        write_result(dest, region, dropout_apply(x, mask, self._keep))
        if isinstance(state, MPSCNNDropoutGradientState):
            state.keep_probability, state.seed, state.mask_stride_in_pixels = self._keep, self._seed, self._stride
            state.mask_seed = self._seed_now
            state._set_mask(mask.to(torch.uint8), (region.count, region.height, region.width, inp.channels))


class MPSCNNDropoutGradient(_DropoutParameters, MPSCNNGradientKernel):
    """``MPSCNNDropoutGradient``: ``dIn = m * g / keep_probability`` with the forward pass's mask.

    Args:
        device: the device (positional, first).
        keep_probability, seed, mask_stride_in_pixels: required, read-only, and must equal the
            forward :class:`MPSCNNDropout`'s (checked against the gradient state).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[, destination_gradient])``
    and ``encode_batch(cb, source_gradients, source_images, gradient_states[,
    destination_gradients])``: ``source_gradient`` = ``g``, ``source_image`` = the forward
    source (validated, not read), ``gradient_state`` = the forward encode's
    :class:`MPSCNNDropoutGradientState` (required: it holds the mask). The result has the
    forward source's size; result pixel ``p`` reads ``g`` and the mask at ``p - forward.offset
    + forward.clip_rect.origin`` and is 0 where the forward pass wrote nothing.
    """

    _gradient_state_class = MPSCNNDropoutGradientState

    def __init__(self, device: Device | str, keep_probability: float | None = None, seed: int | None = None,
                 mask_stride_in_pixels: MTLSize | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        self._set_parameters(keep_probability, seed, mask_stride_in_pixels)

    _gradient_states_required = "the forward MPSCNNDropoutGradientStates hold the masks"

    def _check_gradient_state(self, name: str, state: Any) -> None:
        if not isinstance(state, MPSCNNDropoutGradientState):
            raise MPSTypeError(f"{self._name()}: `{name}` must be the MPSCNNDropoutGradientState of the forward MPSCNNDropout "
                               f"(it holds the mask), but got {type(state).__name__}")
        if (state.keep_probability, state.seed, state.mask_stride_in_pixels) != (self._keep, self._seed, self._stride):
            raise value_error(self._name(), name,
                              f"keep_probability={state.keep_probability}, seed={state.seed}, mask_stride_in_pixels={state.mask_stride_in_pixels}",
                              f"come from a forward MPSCNNDropout with this kernel's keep_probability={self._keep}, "
                              f"seed={self._seed}, mask_stride_in_pixels={self._stride}")

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image")
        return primary_channels

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        st = self._gradient_state
        assert isinstance(st, MPSCNNDropoutGradientState)  # checked in encode / encode_batch
        mask = st._mask_tensor(self._name())
        g = self._forward
        assert g is not None
        if mask.shape[0] < region.count or mask.shape[3] != pg.channels:
            raise value_error(self._name(), "gradient_state", f"a mask of {tuple(mask.shape)} (images, rows, columns, channels)",
                              f"cover the {region.count} images and {pg.channels} channels of this encode")
        dy = read_window(prim.tensor[pg.n0:pg.n0 + region.count, :, :, pg.c0:pg.c0 + pg.channels],
                         pg.window_left, pg.window_top, region.width, region.height, pg.edge_mode, pg.stride_x, pg.stride_y, pg.bounds)
        # the mask covers the forward destination's block R, whose origin is clip_rect.origin
        m = read_window(mask[:region.count], pg.window_left - g.clip_rect.origin.x, pg.window_top - g.clip_rect.origin.y,
                        region.width, region.height, pg.edge_mode, pg.stride_x, pg.stride_y)
        write_result(dest, region, dropout_apply(dy, m, self._keep))
