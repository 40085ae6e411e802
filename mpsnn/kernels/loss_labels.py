"""Loss parameters and labels: MPSCNNLossType, MPSCNNReductionType, MPSCNNLossDescriptor,
MPSCNNLossDataDescriptor, MPSCNNLossLabels (spec/loss.md §2-6). The kernels that consume
them live in :mod:`mpsnn.kernels.loss` (which re-exports every name here).

Decisions where the spec is silent (``(inferred)``):

* Setting a descriptor parameter that the current loss type does not use (``label_smoothing``
  outside softMax/sigmoid cross-entropy, ``number_of_classes`` outside softMax
  cross-entropy, ``epsilon`` outside log, ``delta`` outside huber) stores the value and emits
  a ``UserWarning`` (Apple: a debug-layer validation failure, value stored). Out-of-range
  values raise :class:`~mpsnn.MPSValueError`: ``label_smoothing`` outside [0, 1],
  ``number_of_classes`` < 1 (both **[bin]**), ``epsilon`` < 0 or ``delta`` <= 0 or any
  non-finite real (mpsnn's own rule: the formulas are undefined there).
* A data descriptor's ``data`` may be ``bytes``-like, a float32 NumPy array or a float32
  torch tensor (read as its raw float32 values in C order); other dtypes raise
  :class:`~mpsnn.MPSTypeError`. ``bytes_per_row`` / ``bytes_per_image`` must be positive
  multiples of 4 when set; that they are large enough is checked where the data is read (the
  labels init), as is the data length (enough bytes for the strided read; with the dense
  default strides exactly ``4 W H C`` bytes, **[bin]**).
* A labels object holds ONE image (``number_of_images == 1``); labels/weights images of the
  image init form must have one image too.
"""
from __future__ import annotations

import enum
import math
import warnings
from typing import Any

import numpy as np
import torch

from ..core.device import Device, MTLCommandBuffer, as_device
from ..core.enums import MPSDataLayout, MPSImageFeatureChannelFormat
from ..core.errors import MPSTypeError, value_error
from ..core.structs import MTLSize
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import MPSState

__all__ = [
    "MPSCNNLossDataDescriptor",
    "MPSCNNLossDescriptor",
    "MPSCNNLossLabels",
    "MPSCNNLossLabelsBatch",
    "MPSCNNLossType",
    "MPSCNNReductionType",
]


class MPSCNNLossType(enum.IntEnum):
    """``MPSCNNLossType`` (spec §2): the loss function. Raw values are Apple's; ``count`` is a
    sentinel, never a valid type."""

    meanAbsoluteError = 0
    meanSquaredError = 1
    softMaxCrossEntropy = 2
    sigmoidCrossEntropy = 3
    categoricalCrossEntropy = 4
    hinge = 5
    huber = 6
    cosineDistance = 7
    log = 8
    kullbackLeiblerDivergence = 9
    count = 10


class MPSCNNReductionType(enum.IntEnum):
    """``MPSCNNReductionType`` (spec §3): how per-element losses are combined; ``count`` is a
    sentinel."""

    none = 0
    sum = 1
    mean = 2
    sumByNonZeroWeights = 3
    count = 4


def loss_type_value(owner: str, name: str, value: Any) -> MPSCNNLossType:
    try:
        v = MPSCNNLossType(value)
    except ValueError:
        raise value_error(owner, name, value, "be an MPSCNNLossType") from None
    if v == MPSCNNLossType.count:
        raise value_error(owner, name, "count", "be a loss type, not the `count` sentinel")
    return v


def reduction_type_value(owner: str, name: str, value: Any) -> MPSCNNReductionType:
    try:
        v = MPSCNNReductionType(value)
    except ValueError:
        raise value_error(owner, name, value, "be an MPSCNNReductionType") from None
    if v == MPSCNNReductionType.count:
        raise value_error(owner, name, "count", "be a reduction type, not the `count` sentinel")
    return v


def real_value(owner: str, name: str, value: Any) -> float:
    """A finite float32 value."""
    if isinstance(value, bool):
        raise value_error(owner, name, value, "be a real number")
    try:
        v = float(np.float32(value))
    except (TypeError, ValueError):
        raise value_error(owner, name, value, "be a real number") from None
    if not math.isfinite(v):
        raise value_error(owner, name, value, "be finite")
    return v


def check_label_smoothing(owner: str, value: Any) -> float:
    v = real_value(owner, "label_smoothing", value)
    if not 0.0 <= v <= 1.0:
        raise value_error(owner, "label_smoothing", value, "lie in [0, 1]")
    return v


def check_epsilon(owner: str, value: Any) -> float:
    v = real_value(owner, "epsilon", value)
    if v < 0:
        raise value_error(owner, "epsilon", value, "be >= 0")
    return v


def check_delta(owner: str, value: Any) -> float:
    v = real_value(owner, "delta", value)
    if v <= 0:
        raise value_error(owner, "delta", value, "be > 0")
    return v


def check_number_of_classes(owner: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, "number_of_classes", value, "be an integer > 0")
    return int(value)


_T = MPSCNNLossType
#: parameter -> the loss types that use it (spec §4)
_USED_BY = {
    "label_smoothing": (_T.softMaxCrossEntropy, _T.sigmoidCrossEntropy),
    "number_of_classes": (_T.softMaxCrossEntropy,),
    "epsilon": (_T.log,),
    "delta": (_T.huber,),
}


class MPSCNNLossDescriptor:
    """``MPSCNNLossDescriptor``: the parameters of a loss (spec §4).

    Make one with ``MPSCNNLossDescriptor(loss_type, reduction_type)`` or the factory
    :meth:`cnn_loss_descriptor` (``cnnLossDescriptorWithType:reductionType:``).

    Properties (all read-write, validated on assignment):

    * ``loss_type`` (:class:`MPSCNNLossType`, not ``count``), ``reduction_type``
      (:class:`MPSCNNReductionType`, not ``count``) -- invalid values raise
      :class:`~mpsnn.MPSValueError` (Apple's factory returns nil).
    * ``reduce_across_batch`` (bool, default False).
    * ``weight`` (float32, default 1.0): multiplies every element of loss and gradient.
    * ``label_smoothing`` (default 0.0, in [0, 1]; softMax/sigmoid cross-entropy).
    * ``number_of_classes`` (default 1, > 0; softMax cross-entropy label smoothing).
    * ``epsilon`` (default 1e-7, >= 0; log loss), ``delta`` (default 1.0, > 0; huber).

    Setting a parameter the current ``loss_type`` does not use stores it and warns
    (``UserWarning``; the module docstring records this choice). ``copy()`` is a deep value
    copy (NSCopying). Descriptors compare equal when every field is equal.
    """

    def __init__(self, loss_type: MPSCNNLossType, reduction_type: MPSCNNReductionType) -> None:
        self._loss_type = loss_type_value("MPSCNNLossDescriptor", "loss_type", loss_type)
        self._reduction_type = reduction_type_value("MPSCNNLossDescriptor", "reduction_type", reduction_type)
        self._reduce_across_batch = False
        self._weight = 1.0
        self._label_smoothing = 0.0
        self._number_of_classes = 1
        self._epsilon = float(np.float32(1e-7))
        self._delta = 1.0

    @classmethod
    def cnn_loss_descriptor(cls, loss_type: MPSCNNLossType, reduction_type: MPSCNNReductionType) -> "MPSCNNLossDescriptor":
        """``cnnLossDescriptorWithType:reductionType:``."""
        return cls(loss_type, reduction_type)

    cnn_loss_descriptor_with_type = cnn_loss_descriptor

    def _warn_unused(self, name: str) -> None:
        if self._loss_type not in _USED_BY[name]:
            uses = ", ".join(t.name for t in _USED_BY[name])
            warnings.warn(f"MPSCNNLossDescriptor: `{name}` is used only by {uses}, but loss_type is "
                          f"{self._loss_type.name}; the value is stored and has no effect", UserWarning, stacklevel=3)

    @property
    def loss_type(self) -> MPSCNNLossType:
        return self._loss_type

    @loss_type.setter
    def loss_type(self, value: MPSCNNLossType) -> None:
        self._loss_type = loss_type_value("MPSCNNLossDescriptor", "loss_type", value)

    @property
    def reduction_type(self) -> MPSCNNReductionType:
        return self._reduction_type

    @reduction_type.setter
    def reduction_type(self, value: MPSCNNReductionType) -> None:
        self._reduction_type = reduction_type_value("MPSCNNLossDescriptor", "reduction_type", value)

    @property
    def reduce_across_batch(self) -> bool:
        return self._reduce_across_batch

    @reduce_across_batch.setter
    def reduce_across_batch(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise value_error("MPSCNNLossDescriptor", "reduce_across_batch", value, "be a bool")
        self._reduce_across_batch = bool(value)

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = real_value("MPSCNNLossDescriptor", "weight", value)

    @property
    def label_smoothing(self) -> float:
        return self._label_smoothing

    @label_smoothing.setter
    def label_smoothing(self, value: float) -> None:
        self._label_smoothing = check_label_smoothing("MPSCNNLossDescriptor", value)
        self._warn_unused("label_smoothing")

    @property
    def number_of_classes(self) -> int:
        return self._number_of_classes

    @number_of_classes.setter
    def number_of_classes(self, value: int) -> None:
        self._number_of_classes = check_number_of_classes("MPSCNNLossDescriptor", value)
        self._warn_unused("number_of_classes")

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = check_epsilon("MPSCNNLossDescriptor", value)
        self._warn_unused("epsilon")

    @property
    def delta(self) -> float:
        return self._delta

    @delta.setter
    def delta(self, value: float) -> None:
        self._delta = check_delta("MPSCNNLossDescriptor", value)
        self._warn_unused("delta")

    _FIELDS = ("loss_type", "reduction_type", "reduce_across_batch", "weight", "label_smoothing", "number_of_classes", "epsilon", "delta")

    def copy(self) -> "MPSCNNLossDescriptor":
        """``copyWithZone:``: an independent copy with every field."""
        new = MPSCNNLossDescriptor.__new__(MPSCNNLossDescriptor)
        new.__dict__.update(self.__dict__)
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MPSCNNLossDescriptor):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "MPSCNNLossDescriptor(" + ", ".join(
            f"{f}={getattr(self, f).name if isinstance(getattr(self, f), enum.Enum) else getattr(self, f)!r}" for f in self._FIELDS) + ")"


def _float32_bytes(owner: str, data: Any) -> np.ndarray:
    """The raw bytes of ``data`` (a private uint8 copy)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8).copy()
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.float32:
            raise MPSTypeError(f"{owner}: `data` must hold float32 values, but got a torch tensor of {data.dtype}")
        return data.detach().to("cpu").contiguous().numpy().reshape(-1).view(np.uint8).copy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.float32:
            raise MPSTypeError(f"{owner}: `data` must hold float32 values, but got a NumPy array of {data.dtype}")
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).copy()
    raise MPSTypeError(f"{owner}: `data` must be bytes, a float32 NumPy array or a float32 torch tensor, but got {type(data).__name__}")


def _positive_multiple_of_4(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0 or int(value) % 4:
        raise value_error(owner, name, value, "be a positive multiple of 4 bytes")
    return int(value)


class MPSCNNLossDataDescriptor:
    """``MPSCNNLossDataDescriptor``: a float32 host buffer of labels or weights (spec §5).

    Make one with ``MPSCNNLossDataDescriptor(data, layout, size)`` or the factory
    :meth:`cnn_loss_data_descriptor` (``cnnLossDataDescriptorWithData:layout:size:``).

    Args:
        data: ``bytes``/``bytearray``/``memoryview`` read as native float32, or a float32
            NumPy array / torch tensor (its values in C order). Copied.
        layout: :class:`~mpsnn.MPSDataLayout`: ``HeightxWidthxFeatureChannels`` (channel
            fastest) or ``FeatureChannelsxHeightxWidth`` (planar, width fastest); anything
            else raises :class:`~mpsnn.MPSValueError`.
        size: :class:`~mpsnn.MTLSize` ``(width, height, depth = feature channels)``.

    Properties: ``layout``, ``size`` (read-only); ``bytes_per_row`` (default ``4 W C`` for
    HWC, ``4 W`` for CHW), ``bytes_per_image`` (default ``H * bytes_per_row``; for CHW the
    stride of one channel plane) -- read-write, for non-dense data. ``data`` (read-only) is
    the byte buffer. ``copy()`` makes an independent copy.
    """

    def __init__(self, data: Any, layout: MPSDataLayout, size: MTLSize) -> None:
        owner = "MPSCNNLossDataDescriptor"
        try:
            self._layout = MPSDataLayout(layout)
        except ValueError:
            raise value_error(owner, "layout", layout, "be MPSDataLayout.HeightxWidthxFeatureChannels or FeatureChannelsxHeightxWidth") from None
        if not isinstance(size, MTLSize):
            raise MPSTypeError(f"{owner}: `size` must be an MTLSize (width, height, depth = feature channels), but got {type(size).__name__}")
        for f in ("width", "height", "depth"):
            v = getattr(size, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise value_error(owner, f"size.{f}", v, "be an integer >= 1")
        self._size = size
        self._data = _float32_bytes(owner, data)
        w, c = size.width, size.depth
        self._bytes_per_row = 4 * w * c if self._layout == MPSDataLayout.HeightxWidthxFeatureChannels else 4 * w
        self._bytes_per_image = size.height * self._bytes_per_row

    @classmethod
    def cnn_loss_data_descriptor(cls, data: Any, layout: MPSDataLayout, size: MTLSize) -> "MPSCNNLossDataDescriptor":
        """``cnnLossDataDescriptorWithData:layout:size:``."""
        return cls(data, layout, size)

    cnn_loss_data_descriptor_with_data = cnn_loss_data_descriptor

    layout = property(lambda self: self._layout)
    size = property(lambda self: self._size)
    data = property(lambda self: self._data.tobytes())

    @property
    def bytes_per_row(self) -> int:
        return self._bytes_per_row

    @bytes_per_row.setter
    def bytes_per_row(self, value: int) -> None:
        self._bytes_per_row = _positive_multiple_of_4("MPSCNNLossDataDescriptor", "bytes_per_row", value)

    @property
    def bytes_per_image(self) -> int:
        return self._bytes_per_image

    @bytes_per_image.setter
    def bytes_per_image(self, value: int) -> None:
        self._bytes_per_image = _positive_multiple_of_4("MPSCNNLossDataDescriptor", "bytes_per_image", value)

    def copy(self) -> "MPSCNNLossDataDescriptor":
        new = MPSCNNLossDataDescriptor.__new__(MPSCNNLossDataDescriptor)
        new.__dict__.update(self.__dict__)
        new._data = self._data.copy()
        return new

    def _dense(self) -> bool:
        w, h, c = self._size.width, self._size.height, self._size.depth
        row = 4 * w * c if self._layout == MPSDataLayout.HeightxWidthxFeatureChannels else 4 * w
        return self._bytes_per_row == row and (self._layout == MPSDataLayout.HeightxWidthxFeatureChannels or self._bytes_per_image == h * row)

    def values_hwc(self, owner: str, name: str) -> np.ndarray:
        """The values as a ``[H, W, C]`` float32 array, read with the strides (validated)."""
        w, h, c = self._size.width, self._size.height, self._size.depth
        hwc = self._layout == MPSDataLayout.HeightxWidthxFeatureChannels
        bpr, bpi = self._bytes_per_row, self._bytes_per_image
        if bpr < (4 * w * c if hwc else 4 * w):
            raise value_error(owner, f"{name}.bytes_per_row", bpr, f"be >= {4 * w * c if hwc else 4 * w} (one row of {w} pixels)")
        if not hwc and bpi < h * bpr:
            raise value_error(owner, f"{name}.bytes_per_image", bpi, f"be >= height * bytes_per_row = {h * bpr}")
        n = self._data.size
        need = (h - 1) * bpr + 4 * w * c if hwc else (c - 1) * bpi + (h - 1) * bpr + 4 * w
        if n == 0 or n % 4:
            raise value_error(owner, f"{name}.data", f"{n} bytes", "be a non-empty whole number of float32 values")
        if n < need:
            raise value_error(owner, f"{name}.data", f"{n} bytes", f"hold the {w}x{h}x{c} values at the descriptor's strides ({need} bytes)")
        if self._dense() and n > 4 * w * h * c:
            raise value_error(owner, f"{name}.data", f"{n} bytes", f"be at most 4*width*height*featureChannels = {4 * w * h * c} bytes for dense data")
        flat = self._data.view(np.float32)
        if hwc:
            arr = np.lib.stride_tricks.as_strided(flat, shape=(h, w, c), strides=(bpr, 4 * c, 4))
        else:
            arr = np.lib.stride_tricks.as_strided(flat, shape=(c, h, w), strides=(bpi, bpr, 4)).transpose(1, 2, 0)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def __repr__(self) -> str:
        return (f"MPSCNNLossDataDescriptor(layout={self._layout.name}, size={self._size}, bytes_per_row={self._bytes_per_row}, "
                f"bytes_per_image={self._bytes_per_image}, {self._data.size} bytes)")


def _size_value(owner: str, size: Any) -> MTLSize:
    if not isinstance(size, MTLSize):
        raise MPSTypeError(f"{owner}: `loss_image_size` must be an MTLSize (width, height, depth = feature channels), but got {type(size).__name__}")
    for f in ("width", "height", "depth"):
        v = getattr(size, f)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise value_error(owner, f"loss_image_size.{f}", v, "be an integer > 0")
    return size


def _float32_image(device: Device, values: np.ndarray | None, w: int, h: int, c: int) -> MPSImage:
    img = MPSImage(device, MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32, width=w, height=h, feature_channels=c))
    if values is not None:
        img.store(torch.from_numpy(values).to(device.torch_device).unsqueeze(0))
    return img


class MPSCNNLossLabels(MPSState):
    """``MPSCNNLossLabels``: the labels, optional per-element weights and the loss output of
    ONE batch image (spec §6); an :class:`~mpsnn.MPSState`.

    Init forms (``device`` first and positional; the rest by keyword, or positionally in
    Apple's order):

    1. ``MPSCNNLossLabels(device, labels_descriptor=d)`` -- loss image ``{1,1,1}`` (the
       reduced scalar), no weights (``initWithDevice:labelsDescriptor:``).
    2. ``MPSCNNLossLabels(device, loss_image_size=s, labels_descriptor=d,
       weights_descriptor=wd)`` -- labels (and weights) are **copied** at init
       (``initWithDevice:lossImageSize:labelsDescriptor:weightsDescriptor:``).
    3. ``MPSCNNLossLabels(device, loss_image_size=s, labels_image=l, weights_image=w)`` --
       the images are **retained**, not copied (``...labelsImage:weightsImage:``).

    Extension: ``command_buffer=cb`` makes a temporary state (``read_count`` 1); every loss
    encode that reads it decrements ``read_count`` (**[bin]**).

    Rules (:class:`~mpsnn.MPSValueError` otherwise; Apple's init returns nil):
    ``loss_image_size`` components > 0; labels width/height/channels >= the loss image's;
    weights exactly the labels' size; data descriptor rules of
    :class:`MPSCNNLossDataDescriptor`; images of form 3 on ``device`` with one image each.
    At encode, ``loss_image_size`` must be ``{1,1,1}`` (the reduced loss) or the size of the
    source image's channels used (per-element losses ``w_e l_e``).

    Accessors: ``loss_image()`` (float32, ``loss_image_size``; zeros before the first
    encode), ``labels_image()``, ``weights_image()`` (None when no weights were given).
    ``MPSCNNLossLabelsBatch`` is a ``list`` of these, one per batch image.
    """

    def __init__(
        self,
        device: Device | str,
        loss_image_size: MTLSize | None = None,
        labels_descriptor: MPSCNNLossDataDescriptor | None = None,
        weights_descriptor: MPSCNNLossDataDescriptor | None = None,
        labels_image: MPSImage | None = None,
        weights_image: MPSImage | None = None,
        *,
        command_buffer: MTLCommandBuffer | None = None,
    ) -> None:
        owner = "MPSCNNLossLabels"
        dev = as_device(device, owner)
        if command_buffer is not None:
            if not isinstance(command_buffer, MTLCommandBuffer):
                raise MPSTypeError(f"{owner}: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
            if command_buffer.device != dev:
                raise value_error(owner, "command_buffer", command_buffer.device, f"be on `device` {dev}")
        super().__init__(device=dev, _command_buffer=command_buffer)
        # positional forms: (device, labels_descriptor) and (device, size, labels_image, weights_image)
        if isinstance(loss_image_size, MPSCNNLossDataDescriptor) and labels_descriptor is None:
            loss_image_size, labels_descriptor = None, loss_image_size
        if isinstance(labels_descriptor, MPSImage) and labels_image is None:
            labels_descriptor, labels_image = None, labels_descriptor
        if isinstance(weights_descriptor, MPSImage) and weights_image is None:
            weights_descriptor, weights_image = None, weights_descriptor
        size = _size_value(owner, loss_image_size if loss_image_size is not None else MTLSize(1, 1, 1))
        self._loss_size = size
        if (labels_descriptor is None) == (labels_image is None):
            raise MPSTypeError(f"{owner}: give exactly one of `labels_descriptor` and `labels_image`, but got "
                               f"{'both' if labels_descriptor is not None else 'neither'}")
        if labels_image is not None and weights_descriptor is not None or labels_descriptor is not None and weights_image is not None:
            raise MPSTypeError(f"{owner}: weights must come the way the labels do (`weights_descriptor` with `labels_descriptor`, `weights_image` with `labels_image`)")
        self._weights: MPSImage | None
        if labels_descriptor is not None:
            if not isinstance(labels_descriptor, MPSCNNLossDataDescriptor):
                raise MPSTypeError(f"{owner}: `labels_descriptor` must be an MPSCNNLossDataDescriptor, but got {type(labels_descriptor).__name__}")
            ls = labels_descriptor.size
            self._check_covers("labels_descriptor.size", (ls.width, ls.height, ls.depth))
            labels = labels_descriptor.values_hwc(owner, "labels_descriptor")
            weights = None
            if weights_descriptor is not None:
                if not isinstance(weights_descriptor, MPSCNNLossDataDescriptor):
                    raise MPSTypeError(f"{owner}: `weights_descriptor` must be an MPSCNNLossDataDescriptor, but got {type(weights_descriptor).__name__}")
                ws = weights_descriptor.size
                if (ws.width, ws.height, ws.depth) != (ls.width, ls.height, ls.depth):
                    raise value_error(owner, "weights_descriptor.size", ws, f"equal the labels size {ls}")
                weights = weights_descriptor.values_hwc(owner, "weights_descriptor")
            self._labels = _float32_image(dev, labels, ls.width, ls.height, ls.depth)
            self._weights = None if weights is None else _float32_image(dev, weights, ls.width, ls.height, ls.depth)
        else:
            self._labels = self._check_image("labels_image", labels_image, dev)
            self._check_covers("labels_image", (self._labels.width, self._labels.height, self._labels.feature_channels))
            self._weights = None
            if weights_image is not None:
                wimg = self._check_image("weights_image", weights_image, dev)
                if (wimg.width, wimg.height, wimg.feature_channels) != (self._labels.width, self._labels.height, self._labels.feature_channels):
                    raise value_error(owner, "weights_image", f"{wimg.width}x{wimg.height}x{wimg.feature_channels}",
                                      f"have the labels image's size {self._labels.width}x{self._labels.height}x{self._labels.feature_channels}")
                self._weights = wimg
        self._loss = _float32_image(dev, None, size.width, size.height, size.depth)

    def _check_covers(self, name: str, whc: tuple[int, int, int]) -> None:
        s = self._loss_size
        if whc[0] < s.width or whc[1] < s.height or whc[2] < s.depth:
            raise value_error("MPSCNNLossLabels", name, f"{whc[0]}x{whc[1]}x{whc[2]}",
                              f"be at least the loss image size {s.width}x{s.height}x{s.depth} in width, height and channels")

    @staticmethod
    def _check_image(name: str, image: Any, dev: Device) -> MPSImage:
        if not isinstance(image, MPSImage):
            raise MPSTypeError(f"MPSCNNLossLabels: `{name}` must be an MPSImage, but got {type(image).__name__}")
        if image.device != dev:
            raise value_error("MPSCNNLossLabels", name, str(image.device), f"be on the labels' device {dev}")
        if image.number_of_images != 1:
            raise value_error("MPSCNNLossLabels", f"{name}.number_of_images", image.number_of_images, "be 1 (one labels object per batch image)")
        return image

    @property
    def loss_image_size(self) -> MTLSize:
        """The loss image's size (Python convenience)."""
        return self._loss_size

    def loss_image(self) -> MPSImage:
        """``lossImage``: float32 image of ``loss_image_size`` written by the last loss encode."""
        return self._loss

    def labels_image(self) -> MPSImage:
        """``labelsImage``: the labels (a float32 copy, or the retained image of form 3)."""
        return self._labels

    def weights_image(self) -> MPSImage | None:
        """``weightsImage``: the per-element weights, or None when none were given."""
        return self._weights

    def __repr__(self) -> str:
        s = self._loss_size
        kind = "temporary " if self.is_temporary else ""
        return (f"<{kind}MPSCNNLossLabels labels={self._labels.width}x{self._labels.height}x{self._labels.feature_channels} "
                f"weights={'yes' if self._weights is not None else 'no'} loss={s.width}x{s.height}x{s.depth} read_count={self.read_count}>")


#: ``MPSCNNLossLabelsBatch``: a list of :class:`MPSCNNLossLabels`, one per batch image.
MPSCNNLossLabelsBatch = list
