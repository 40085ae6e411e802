"""Filter nodes the importer adds where MPS has no kernel for a data movement (mpsnn).

* :class:`ConstantImageNode`: an image made from a tensor folded at load time (an ONNX
  initializer or Constant that an element-wise operator reads), repeated over the batch.
* :class:`RelayoutNode`: a pure data movement of the NHWC tensor (a permutation and/or a
  reshape, a channel gather): ONNX Transpose / Reshape / Flatten / DepthToSpace /
  SpaceToDepth where they are not free, channel shuffles, the compaction after a
  concatenation of channel counts that are not multiples of 4, a copy.

They run in every graph format, copy exactly (a copy rounds once to the result's format)
and have no gradient nodes (an imported graph is an inference graph).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ...core.device import Device
from ...core.errors import value_error
from ...graph.nodes.base import MPSNNFilterNode, MPSNNImageNode
from ...images.image import MPSImageDescriptor, MPSTemporaryImage

if TYPE_CHECKING:  # pragma: no cover
    from ...graph.graph import _EncodeContext
    from ...images.image import MPSImage


def _consume(images: list["MPSImage"]) -> None:
    seen: set[int] = set()
    for img in images:
        if id(img) not in seen and isinstance(img, MPSTemporaryImage):
            img.consume_read()
        seen.add(id(img))


class _Stored:
    """A node's "kernel": the device and the data it needs there."""

    def __init__(self, device: Device, data: Any = None) -> None:
        self.device, self.data = device, data

    def __repr__(self) -> str:
        return f"<data movement on {self.device}>"


class ConstantImageNode(MPSNNFilterNode):
    """An image holding ``array`` (NHWC, float32), made on every encode.

    ``anchor`` is an image node of the graph that the constant is used with; it is read only
    for its image count: a constant with one image is repeated to the anchor's image count
    (arithmetic kernels never broadcast the batch), one with N images needs N images there.
    """

    _has_gradient = False
    _kernel_name = "constant"

    def __init__(self, anchor: MPSNNImageNode, array: np.ndarray) -> None:
        super().__init__([anchor])
        arr = np.array(array, dtype=np.float32, order="C", copy=True)  # owned and writable (torch.from_numpy)
        if arr.ndim != 4:
            raise value_error("ConstantImageNode", "array.ndim", arr.ndim, "be 4 (NHWC)")
        self._array = arr

    @property
    def array(self) -> np.ndarray:
        return self._array

    def _build_kernel(self, device: Device) -> Any:
        return _Stored(device, torch.from_numpy(self._array).to(device.torch_device))

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        anchor = images[0]
        t: torch.Tensor = kernel.data
        n = anchor.number_of_images
        if t.shape[0] not in (1, n):
            raise value_error(self._describe(), "constant.number_of_images", t.shape[0],
                              f"be 1 or the image count of the image it is used with ({n})")
        desc = MPSImageDescriptor._trusted(anchor.feature_channel_format, t.shape[2], t.shape[1], t.shape[3], n)
        cb = ctx.command_buffer
        dest = ctx.allocator.image_for_command_buffer(cb, desc, None)
        with cb.encoding("ConstantImageNode"):
            dest.store(t.expand(n, -1, -1, -1))
        _consume(images)
        return dest, []


class RelayoutNode(MPSNNFilterNode):
    """``fn(tensor) -> tensor`` applied to the NHWC tensor of the source image; the result is a
    new NHWC image of the shape ``fn`` returns. ``what`` names the movement in messages."""

    _has_gradient = False
    _kernel_name = "relayout"

    def __init__(self, source: MPSNNImageNode, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> None:
        super().__init__([source])
        self._fn = fn
        self._what = what
        self.label = what

    def _build_kernel(self, device: Device) -> Any:
        return _Stored(device)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        src = images[0]
        cb = ctx.command_buffer
        with cb.encoding("RelayoutNode"):
            out = self._fn(src.tensor)
            if out.dim() != 4:
                raise value_error(self._describe(), "result", tuple(out.shape), "be an NHWC tensor")
            n, h, w, c = out.shape
            desc = MPSImageDescriptor._trusted(src.feature_channel_format, w, h, c, n)
            dest = ctx.allocator.image_for_command_buffer(cb, desc, None)
            dest.store(out)
        _consume(images)
        return dest, []


def channel_gather(indices: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """A relayout function picking the channels ``indices`` (in that order)."""
    idx_cpu = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    cache: dict[Any, torch.Tensor] = {}

    def fn(t: torch.Tensor) -> torch.Tensor:
        idx = cache.get(t.device)
        if idx is None:
            idx = cache[t.device] = idx_cpu.to(t.device)
        return t.index_select(3, idx)

    return fn


__all__ = ["ConstantImageNode", "RelayoutNode", "channel_gather"]
