"""Convolution descriptors, the data-source protocol, weight loading and the training states.

Apple classes here: ``MPSCNNConvolutionDescriptor``, ``MPSCNNDepthWiseConvolutionDescriptor``,
``MPSCNNSubPixelConvolutionDescriptor``, ``MPSCNNConvolutionDataSource`` (protocol, an ABC),
``MPSCNNConvolutionGradientState``, ``MPSCNNConvolutionTransposeGradientState``,
``MPSCNNConvolutionWeightsAndBiasesState``; plus :class:`ConvolutionDataSource`, a ready-made
data source over arrays or tensors.

Weight layouts (convolution.md §1, §4, §14; the one place they are decided is
:func:`weight_shape`):

==============================  ============================================
kernel                          layout of ``weights()``
==============================  ============================================
convolution, grouped, transpose ``[Cout][kH][kW][Cin/groups]`` (OHWI)
depthwise                       ``[Cout][kH][kW]``
fully connected                 ``[Cout][sourceWidth][sourceHeight][Cin]``
binary                          uint32 ``[Cout][kH][kW][ceil(Cin/32)]``
==============================  ============================================

CONFLICT (convolution.md §14.1): the fully-connected order is the FC documentation's
``[O][W][H][I]``; :data:`FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT` is the one switch that flips it.

Loading (convolution.md §7.1): a kernel calls ``load()``, reads ``descriptor()``,
``data_type()``, ``weights()``, ``bias_terms()`` (and the UInt8 quantisation hooks), converts
everything to float32 once, then calls ``purge()``. A ``False`` from ``load()`` is an error.
UInt8 weights are dequantised at load (§5.2). Batch-norm parameters on the descriptor are
folded at inference as ``(acc + b)·I + J`` with ``I = gamma/sqrt(variance + eps)`` and
``J = beta − I·mean`` (§3.2); missing arrays default to mean 0, variance 1, gamma 1, beta 0.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.device import Device, MTLCommandBuffer
from ..core.enums import (
    MPSCNNConvolutionWeightsLayout,
    MPSCNNNeuronType,
    MPSCNNWeightsQuantizationType,
    MPSDataType,
)
from ..core.errors import MPSTypeError, value_error
from ..core.host_arrays import float32_array
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .neuron import MPSCNNNeuron, MPSNNNeuronDescriptor

#: The fully-connected weight order switch (convolution.md §14.1 CONFLICT): True keeps the FC
#: documentation's ``[Cout][W][H][Cin]``; False would use the convolution order ``[Cout][H][W][Cin]``.
FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT = True


def _positive(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, name, value, "be an integer >= 1")
    return int(value)


def _float_array(owner: str, name: str, value: Any, count: int | None = None) -> np.ndarray:
    """:func:`float32_array`, with an exact ``count`` when given."""
    arr = float32_array(owner, name, value)
    if count is not None and arr.size != count:
        raise value_error(owner, name, f"{arr.size} values", f"hold exactly {count} values")
    return arr


class MPSCNNConvolutionDescriptor:
    """``MPSCNNConvolutionDescriptor``: the shape of a convolution and what is fused into it.

    Args (keywords, Apple's defaults): ``kernel_width=3``, ``kernel_height=3``,
    ``input_feature_channels``, ``output_feature_channels`` (must be set, >= 1),
    ``neuron_filter`` (deprecated ``MPSCNNNeuron``). Read-write properties:
    ``stride_in_pixels_x/_y`` (1), ``groups`` (1), ``dilation_rate_x/_y`` (1),
    ``fused_neuron_descriptor`` (an ``MPSNNNeuronDescriptor``; default type ``none``),
    ``neuron`` (deprecated, default None).

    Math: ``z = conv + bias``, then inference batch norm (if set), then the fused neuron
    (convolution.md §3). When both a fused neuron descriptor (type not ``none``) and the
    deprecated ``neuron`` are set, the descriptor wins (inferred).
    """

    kernel_width: int
    kernel_height: int
    input_feature_channels: int
    output_feature_channels: int
    stride_in_pixels_x: int
    stride_in_pixels_y: int
    groups: int
    dilation_rate_x: int
    dilation_rate_y: int
    fused_neuron_descriptor: MPSNNNeuronDescriptor
    neuron: MPSCNNNeuron | None

    def __init__(self, kernel_width: int = 3, kernel_height: int = 3, input_feature_channels: int = 0,
                 output_feature_channels: int = 0, neuron_filter: MPSCNNNeuron | None = None) -> None:
        self.kernel_width = kernel_width
        self.kernel_height = kernel_height
        self._set_channels("input_feature_channels", input_feature_channels)
        self._set_channels("output_feature_channels", output_feature_channels)
        self.stride_in_pixels_x = 1
        self.stride_in_pixels_y = 1
        self.groups = 1
        self.dilation_rate_x = 1
        self.dilation_rate_y = 1
        self.fused_neuron_descriptor = MPSNNNeuronDescriptor(MPSCNNNeuronType.none)
        self.neuron = neuron_filter
        self._batch_norm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None = None

    def _set_channels(self, name: str, value: Any) -> None:
        if value == 0:  # "not set yet"
            object.__setattr__(self, name, 0)
        else:
            object.__setattr__(self, name, _positive(type(self).__name__, name, value))

    def __setattr__(self, name: str, value: Any) -> None:
        owner = type(self).__name__
        if name in ("kernel_width", "kernel_height", "stride_in_pixels_x", "stride_in_pixels_y", "groups",
                    "dilation_rate_x", "dilation_rate_y", "sub_pixel_scale_factor"):
            value = _positive(owner, name, value)
        elif name in ("input_feature_channels", "output_feature_channels"):
            value = _positive(owner, name, value)
        elif name == "fused_neuron_descriptor":
            if not isinstance(value, MPSNNNeuronDescriptor):
                raise MPSTypeError(f"{owner}: `fused_neuron_descriptor` must be an MPSNNNeuronDescriptor, but got {type(value).__name__}")
        elif name == "neuron" and value is not None and not isinstance(value, MPSCNNNeuron):
            raise MPSTypeError(f"{owner}: `neuron` must be an MPSCNNNeuron or None, but got {type(value).__name__}")
        object.__setattr__(self, name, value)

    @classmethod
    def cnn_convolution_descriptor(cls, kernel_width: int, kernel_height: int, input_feature_channels: int,
                                   output_feature_channels: int, neuron_filter: MPSCNNNeuron | None = None) -> "MPSCNNConvolutionDescriptor":
        """``cnnConvolutionDescriptorWithKernelWidth:kernelHeight:inputFeatureChannels:outputFeatureChannels:[neuronFilter:]``."""
        return cls(kernel_width, kernel_height, input_feature_channels, output_feature_channels, neuron_filter)

    # -- batch norm (inference) -----------------------------------------------------------------
    def set_batch_normalization_parameters_for_inference(self, mean: Any = None, variance: Any = None, gamma: Any = None,
                                                         beta: Any = None, epsilon: float = 0.0) -> None:
        """Fold inference batch normalization into the convolution (§3.2). Arrays hold
        ``output_feature_channels`` floats; a None array takes its identity default."""
        n = self.output_feature_channels
        if n < 1:
            raise value_error(type(self).__name__, "output_feature_channels", n, "be set before the batch-norm parameters")
        owner = type(self).__name__

        def arr(name: str, v: Any, default: float) -> np.ndarray:
            return np.full(n, default, np.float32) if v is None else _float_array(owner, name, v, n)
        self._batch_norm = (arr("mean", mean, 0.0), arr("variance", variance, 1.0), arr("gamma", gamma, 1.0),
                            arr("beta", beta, 0.0), float(np.float32(epsilon)))

    set_batch_normalization_parameters_for_inference_with_mean = set_batch_normalization_parameters_for_inference

    @property
    def batch_normalization_parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None:
        """(mean, variance, gamma, beta, epsilon) when set, else None (mpsnn accessor)."""
        return self._batch_norm

    # -- deprecated neuron setters ------------------------------------------------------------
    def set_neuron_type(self, neuron_type: MPSCNNNeuronType, parameter_a: float = 0.0, parameter_b: float = 0.0) -> None:
        """Deprecated ``setNeuronType:parameterA:parameterB:``; per-channel types (PReLU) are an error."""
        t = MPSCNNNeuronType(neuron_type)
        if t == MPSCNNNeuronType.pReLU:
            raise value_error(type(self).__name__, "neuron_type", t.name, "be a shared-parameter type (use set_neuron_to_prelu_with_parameters_a for PReLU)")
        self.fused_neuron_descriptor = MPSNNNeuronDescriptor(t, parameter_a, parameter_b)

    def neuron_type(self) -> MPSCNNNeuronType:
        return self.fused_neuron_descriptor.neuron_type

    def neuron_parameter_a(self) -> float:
        return self.fused_neuron_descriptor.a

    def neuron_parameter_b(self) -> float:
        return self.fused_neuron_descriptor.b

    def set_neuron_to_prelu_with_parameters_a(self, a: Any) -> None:
        """Deprecated ``setNeuronToPReLUWithParametersA:``: one slope per output channel."""
        slopes = _float_array(type(self).__name__, "a", a, self.output_feature_channels or None)
        self.fused_neuron_descriptor = MPSNNNeuronDescriptor(MPSCNNNeuronType.pReLU, data=slopes)

    set_neuron_to_p_re_lu_with_parameters_a = set_neuron_to_prelu_with_parameters_a

    def effective_neuron(self) -> MPSNNNeuronDescriptor | None:
        """The neuron applied last, or None (mpsnn helper)."""
        if self.fused_neuron_descriptor.neuron_type != MPSCNNNeuronType.none:
            return self.fused_neuron_descriptor
        if self.neuron is not None:
            return self.neuron.neuron_descriptor
        return None

    def copy(self) -> "MPSCNNConvolutionDescriptor":
        new = type(self).__new__(type(self))
        object.__setattr__(new, "__dict__", {k: (v.copy() if isinstance(v, MPSNNNeuronDescriptor) else v) for k, v in self.__dict__.items()})
        return new

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_width}x{self.kernel_height}, {self.input_feature_channels}->{self.output_feature_channels}, "
                f"stride=({self.stride_in_pixels_x},{self.stride_in_pixels_y}), dilation=({self.dilation_rate_x},{self.dilation_rate_y}), groups={self.groups})")


class MPSCNNDepthWiseConvolutionDescriptor(MPSCNNConvolutionDescriptor):
    """``MPSCNNDepthWiseConvolutionDescriptor``: each input channel is filtered on its own.

    ``channel_multiplier`` (read-only) = ``output_feature_channels / input_feature_channels``;
    output channel ``o`` comes from input channel ``o / M``. Weights ``[Cout][kH][kW]``;
    ``groups`` must be 1. Apple supports only M = 1; mpsnn also runs M > 1 (an extension).
    """

    @property
    def channel_multiplier(self) -> int:
        if self.input_feature_channels < 1:
            return 0
        return self.output_feature_channels // self.input_feature_channels


class MPSCNNSubPixelConvolutionDescriptor(MPSCNNConvolutionDescriptor):
    """``MPSCNNSubPixelConvolutionDescriptor``: a convolution followed by channel -> space.

    ``sub_pixel_scale_factor`` r (default 1; also a constructor keyword): the ``Cout`` results of each intermediate pixel
    fill an r x r block of ``Cout/r^2`` channels; block index ``r·(y mod r) + (x mod r)`` is the
    slow index (TensorFlow ``depth_to_space`` order, not PyTorch ``pixel_shuffle``).
    """

    sub_pixel_scale_factor: int

    def __init__(self, *args: Any, sub_pixel_scale_factor: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sub_pixel_scale_factor = sub_pixel_scale_factor


class MPSCNNConvolutionDataSource(abc.ABC):
    """Protocol ``MPSCNNConvolutionDataSource``: supplies a convolution's descriptor, weights
    and biases lazily.

    Required: ``data_type()``, ``descriptor()``, ``weights()``, ``bias_terms()`` (None for no
    bias), ``load()``, ``purge()``, ``label()``. Optional hooks return None when not
    implemented: ``ranges_for_uint8_kernel()``, ``lookup_table_for_uint8_kernel()``,
    ``weights_quantization_type()``, ``kernel_weights_data_type()``; ``weights_layout()``
    (OHWI); ``update(command_buffer, gradient_state, source_state)`` (GPU-side training
    update: return a ``MPSCNNConvolutionWeightsAndBiasesState`` with the new weights, or
    None); ``update_with_gradient_state(gradient_state, source_state)`` (CPU-side update:
    return True when the data source now holds new weights); ``copy(device=None)``.
    ``weights()`` may return a NumPy array, a torch tensor or bytes.
    """

    @abc.abstractmethod
    def data_type(self) -> MPSDataType: ...

    @abc.abstractmethod
    def descriptor(self) -> MPSCNNConvolutionDescriptor: ...

    @abc.abstractmethod
    def weights(self) -> Any: ...

    @abc.abstractmethod
    def bias_terms(self) -> Any: ...

    @abc.abstractmethod
    def load(self) -> bool: ...

    @abc.abstractmethod
    def purge(self) -> None: ...

    @abc.abstractmethod
    def label(self) -> str | None: ...

    def ranges_for_uint8_kernel(self) -> Any:
        return None

    def lookup_table_for_uint8_kernel(self) -> Any:
        return None

    def weights_quantization_type(self) -> MPSCNNWeightsQuantizationType | None:
        return None

    def weights_layout(self) -> MPSCNNConvolutionWeightsLayout:
        return MPSCNNConvolutionWeightsLayout.OHWI

    def kernel_weights_data_type(self) -> MPSDataType | None:
        return None

    def update(self, command_buffer: MTLCommandBuffer, gradient_state: "MPSCNNConvolutionGradientState",
               source_state: "MPSCNNConvolutionWeightsAndBiasesState") -> "MPSCNNConvolutionWeightsAndBiasesState | None":
        return None

    def update_with_gradient_state(self, gradient_state: "MPSCNNConvolutionGradientState",
                                   source_state: "MPSCNNConvolutionWeightsAndBiasesState") -> bool:
        return False

    def copy(self, device: Device | None = None) -> "MPSCNNConvolutionDataSource":
        return self


_DTYPE_OF = {np.dtype(np.float32): MPSDataType.float32, np.dtype(np.float16): MPSDataType.float16,
             np.dtype(np.uint8): MPSDataType.uInt8, np.dtype(np.uint32): MPSDataType.uInt32}


class ConvolutionDataSource(MPSCNNConvolutionDataSource):
    """A ready-made :class:`MPSCNNConvolutionDataSource` over arrays or tensors (mpsnn).

    Args:
        descriptor: the layer's ``MPSCNNConvolutionDescriptor``.
        weights: the weights in the kernel's layout (see the module table); float32, float16,
            uint8 (quantised; give ``ranges_for_uint8_kernel`` or
            ``lookup_table_for_uint8_kernel``) or uint32 (binary).
        bias_terms: ``Cout`` floats or None.
        label: the layer's label.

    ``update_with_gradient_state`` stores new weights when ``set_weights`` is called by a
    training loop; GPU-side updates (``update``) return None (no update) unless an
    ``optimizer_update`` callable ``(command_buffer, gradient_state, source_state) -> state``
    is given.
    """

    def __init__(self, descriptor: MPSCNNConvolutionDescriptor, weights: Any, bias_terms: Any = None, label: str | None = None,
                 ranges_for_uint8_kernel: Any = None, lookup_table_for_uint8_kernel: Any = None, optimizer_update: Any = None) -> None:
        if not isinstance(descriptor, MPSCNNConvolutionDescriptor):
            raise MPSTypeError(f"ConvolutionDataSource: `descriptor` must be an MPSCNNConvolutionDescriptor, but got {type(descriptor).__name__}")
        self._descriptor = descriptor
        self._label = label
        self._ranges = ranges_for_uint8_kernel
        self._lut = lookup_table_for_uint8_kernel
        self._optimizer_update = optimizer_update
        self.load_count = 0
        self.purge_count = 0
        self.set_weights(weights, bias_terms)

    def set_weights(self, weights: Any, bias_terms: Any = None) -> None:
        """Replace the weights and biases (then call ``reload_weights_and_biases_from_data_source``
        on the kernels that use this data source)."""
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().numpy()
        arr = np.array(weights, copy=True) if not isinstance(weights, (bytes, bytearray, memoryview)) else np.frombuffer(weights, np.float32).copy()
        if arr.dtype not in _DTYPE_OF:
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            else:
                raise value_error("ConvolutionDataSource", "weights.dtype", arr.dtype, "be float32, float16, uint8 or uint32")
        self._weights = arr
        self._bias = None if bias_terms is None else _float_array("ConvolutionDataSource", "bias_terms", bias_terms)

    def data_type(self) -> MPSDataType:
        return _DTYPE_OF[self._weights.dtype]

    def descriptor(self) -> MPSCNNConvolutionDescriptor:
        return self._descriptor

    def weights(self) -> np.ndarray:
        return self._weights

    def bias_terms(self) -> np.ndarray | None:
        return self._bias

    def load(self) -> bool:
        self.load_count += 1
        return True

    def purge(self) -> None:
        self.purge_count += 1

    def label(self) -> str | None:
        return self._label

    def ranges_for_uint8_kernel(self) -> Any:
        return self._ranges

    def lookup_table_for_uint8_kernel(self) -> Any:
        return self._lut

    def weights_quantization_type(self) -> MPSCNNWeightsQuantizationType | None:
        if self._weights.dtype != np.uint8:
            return MPSCNNWeightsQuantizationType.none
        if self._ranges is not None:
            return MPSCNNWeightsQuantizationType.linear
        if self._lut is not None:
            return MPSCNNWeightsQuantizationType.lookupTable
        return None

    def update(self, command_buffer, gradient_state, source_state):  # type: ignore[no-untyped-def]
        if self._optimizer_update is None:
            return None
        return self._optimizer_update(command_buffer, gradient_state, source_state)

    def copy(self, device: Device | None = None) -> "ConvolutionDataSource":
        return ConvolutionDataSource(self._descriptor.copy(), self._weights, self._bias, self._label, self._ranges, self._lut, self._optimizer_update)


# -- shapes ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvolutionGeometry:
    """What a convolution kernel takes from its descriptor."""

    kind: str            # "regular", "depthwise", "subpixel", "fully_connected", "transpose", "binary"
    kernel_width: int
    kernel_height: int
    input_channels: int
    output_channels: int
    stride_x: int
    stride_y: int
    dilation_x: int
    dilation_y: int
    groups: int
    channel_multiplier: int   # depthwise M, else 0
    sub_pixel: int            # r, 1 unless sub-pixel

    @property
    def torch_groups(self) -> int:
        """Groups of the equivalent torch convolution (depthwise: one per input channel)."""
        return self.input_channels if self.kind == "depthwise" else self.groups


def weight_shape(g: ConvolutionGeometry) -> tuple[int, ...]:
    """The layout of ``weights()`` for a kernel of this geometry (the module table)."""
    if g.kind == "depthwise":
        return (g.output_channels, g.kernel_height, g.kernel_width)
    if g.kind == "fully_connected":
        if FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT:
            return (g.output_channels, g.kernel_width, g.kernel_height, g.input_channels)
        return (g.output_channels, g.kernel_height, g.kernel_width, g.input_channels)
    if g.kind == "binary":
        return (g.output_channels, g.kernel_height, g.kernel_width, (g.input_channels + 31) // 32)
    return (g.output_channels, g.kernel_height, g.kernel_width, g.input_channels // g.groups)


def geometry_of(owner: str, desc: MPSCNNConvolutionDescriptor, kind: str) -> ConvolutionGeometry:
    """Validate a descriptor for a kernel kind and extract its geometry."""
    cin, cout, g = desc.input_feature_channels, desc.output_feature_channels, desc.groups
    if cin < 1 or cout < 1:
        raise value_error(owner, "descriptor.input_feature_channels/output_feature_channels", (cin, cout), "both be set (>= 1)")
    m = 0
    r = 1
    if isinstance(desc, MPSCNNDepthWiseConvolutionDescriptor):
        if kind in ("regular",):
            kind = "depthwise"
        if g != 1:
            raise value_error(owner, "descriptor.groups", g, "be 1 for a depthwise convolution")
        if cout % cin:
            raise value_error(owner, "descriptor.output_feature_channels", cout, f"be a multiple of input_feature_channels={cin} (channel multiplier)")
        m = cout // cin
    elif g > 1:
        if cin % g or cout % g:
            raise value_error(owner, "descriptor.groups", g, f"divide input_feature_channels={cin} and output_feature_channels={cout}")
        if (cin // g) % 4 or (cout // g) % 4:
            raise value_error(owner, "descriptor.groups", g, "leave a multiple of 4 input and output channels per group (convolution.md §2)",
                              f"{cin // g} input and {cout // g} output channels per group")
    if isinstance(desc, MPSCNNSubPixelConvolutionDescriptor):
        r = desc.sub_pixel_scale_factor
        if r > 1:
            if kind != "regular":
                raise value_error(owner, "descriptor.sub_pixel_scale_factor", r, f"be 1 for {kind} kernels")
            if cout % (r * r):
                raise value_error(owner, "descriptor.output_feature_channels", cout, f"be a multiple of sub_pixel_scale_factor^2 = {r * r}")
            if g > 1 and (cout // (r * r)) % 4:
                raise value_error(owner, "descriptor.output_feature_channels", cout, "give a multiple of 4 channels per sub-pixel block when groups > 1")
            kind = "subpixel"
    return ConvolutionGeometry(kind, desc.kernel_width, desc.kernel_height, cin, cout, desc.stride_in_pixels_x, desc.stride_in_pixels_y,
                               desc.dilation_rate_x, desc.dilation_rate_y, g, m, r)


# -- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadedWeights:
    """Float32 weights and biases read from a data source, the weights in the order of a
    kernel's float32 master: OHWI, depthwise ``[Cout][kH][kW][1]``, fully connected the data
    source's own layout (:func:`weight_shape`; see ``_ConvolutionWeights`` in
    ``mpsnn.kernels.convolution`` for why)."""

    weights: np.ndarray
    bias: np.ndarray | None
    label: str | None
    descriptor: MPSCNNConvolutionDescriptor


def _to_numpy(owner: str, name: str, value: Any, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype=dtype)
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        raise MPSTypeError(f"{owner}: data source `{name}()` must return an array, a tensor or bytes, but gave {type(value).__name__}") from None


_NP_OF = {MPSDataType.float32: np.float32, MPSDataType.float16: np.float16, MPSDataType.uInt8: np.uint8, MPSDataType.uInt32: np.uint32}


def _dequantize(owner: str, ds: MPSCNNConvolutionDataSource, raw: np.ndarray, cout: int) -> np.ndarray:
    qtype = ds.weights_quantization_type()
    ranges, lut = ds.ranges_for_uint8_kernel(), ds.lookup_table_for_uint8_kernel()
    if qtype is None or qtype == MPSCNNWeightsQuantizationType.none:
        qtype = MPSCNNWeightsQuantizationType.linear if ranges is not None else MPSCNNWeightsQuantizationType.lookupTable if lut is not None else None
    if qtype == MPSCNNWeightsQuantizationType.linear:
        if ranges is None:
            raise value_error(owner, "ranges_for_uint8_kernel", None, "be given for linear UInt8 quantisation")
        r = _float_array(owner, "ranges_for_uint8_kernel", ranges, 2 * cout).reshape(cout, 2)
        u = raw.reshape(cout, -1).astype(np.float32)
        lo, hi = r[:, :1], r[:, 1:]
        return (u / np.float32(255.0) * (hi - lo) + lo).astype(np.float32)
    if qtype == MPSCNNWeightsQuantizationType.lookupTable:
        if lut is None:
            raise value_error(owner, "lookup_table_for_uint8_kernel", None, "be given for lookup-table UInt8 quantisation")
        table = _float_array(owner, "lookup_table_for_uint8_kernel", lut, 256)
        return table[raw.astype(np.int64)]
    raise value_error(owner, "data_type", "uInt8", "come with ranges_for_uint8_kernel or lookup_table_for_uint8_kernel")


def load_weights(owner: str, ds: Any, kind: str) -> tuple[LoadedWeights, ConvolutionGeometry]:
    """Read and convert a data source once (load -> read -> purge)."""
    if not isinstance(ds, MPSCNNConvolutionDataSource):
        raise MPSTypeError(f"{owner}: `weights` must be an MPSCNNConvolutionDataSource, but got {type(ds).__name__}")
    if ds.load() is False:
        raise value_error(owner, "weights.load()", False, "return True (the data source could not load)")
    try:
        desc = ds.descriptor()
        if not isinstance(desc, MPSCNNConvolutionDescriptor):
            raise MPSTypeError(f"{owner}: data source `descriptor()` must return an MPSCNNConvolutionDescriptor, but gave {type(desc).__name__}")
        desc = desc.copy()
        geom = geometry_of(owner, desc, kind)
        dtype = MPSDataType(ds.data_type())
        allowed = {"binary": (MPSDataType.uInt32, MPSDataType.float32, MPSDataType.float16, MPSDataType.uInt8),
                   "transpose": (MPSDataType.float32, MPSDataType.float16)}.get(kind, (MPSDataType.float32, MPSDataType.float16, MPSDataType.uInt8))
        if dtype not in allowed:
            raise value_error(owner, "data_type()", dtype.name, f"be one of {[d.name for d in allowed]} for this kernel")
        shape = weight_shape(geom)
        raw = _to_numpy(owner, "weights", ds.weights(), np.uint32 if kind == "binary" else _NP_OF[dtype])
        if kind == "binary":
            raw = raw.view(np.uint32) if raw.dtype.itemsize == 4 else raw.astype(np.uint32)
        elif dtype == MPSDataType.uInt8:
            raw = _dequantize(owner, ds, raw.astype(np.uint8, copy=False), geom.output_channels)
        if raw.size != math.prod(shape):
            raise value_error(owner, "weights", f"{raw.size} values", f"hold {math.prod(shape)} values, the layout {list(shape)}")
        w = raw.reshape(shape) if kind == "binary" else raw.astype(np.float32).reshape(shape)
        b = ds.bias_terms()
        bias = None if b is None else _float_array(owner, "bias_terms", b, geom.output_channels)
        label = ds.label()
    finally:
        ds.purge()
    if kind == "depthwise" or geom.kind == "depthwise":
        w = w.reshape(shape + (1,))                           # [O][H][W] -> [O][H][W][1]
    return LoadedWeights(np.ascontiguousarray(w), bias, label, desc), geom


def fold_batch_norm(w: torch.Tensor, b: torch.Tensor | None, desc: MPSCNNConvolutionDescriptor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inference batch-norm folded into OHWI weights and bias (§3.2); identity without BN."""
    bn = desc.batch_normalization_parameters
    if bn is None:
        return w, b
    mean, var, gamma, beta = (torch.as_tensor(v, dtype=torch.float32, device=w.device) for v in bn[:4])
    scale = gamma / torch.sqrt(var + bn[4])
    shift = beta - scale * mean
    w2 = w * scale.view(-1, *([1] * (w.dim() - 1)))
    b2 = shift if b is None else b * scale + shift
    return w2, b2


# -- states ------------------------------------------------------------------------------------------

class MPSCNNConvolutionWeightsAndBiasesState(MPSState):
    """``MPSCNNConvolutionWeightsAndBiasesState``: float32 weights (OHWI; depthwise
    ``[Cout][kH][kW]``) and optional biases ``[Cout]`` on the device.

    Make one with ``MPSCNNConvolutionWeightsAndBiasesState(weights=..., biases=...)`` (wraps
    tensors; with ``weights_offset``/``biases_offset`` in bytes and ``cnn_convolution_descriptor``
    to take sub-ranges of larger buffers), ``MPSCNNConvolutionWeightsAndBiasesState(device=...,
    cnn_convolution_descriptor=desc)`` (allocates) or
    :meth:`temporary_cnn_convolution_weights_and_biases_state`.
    """

    def __init__(self, weights: torch.Tensor | None = None, biases: torch.Tensor | None = None, *, weights_offset: int = 0,
                 biases_offset: int = 0, cnn_convolution_descriptor: MPSCNNConvolutionDescriptor | None = None,
                 device: Device | str | None = None, _command_buffer: MTLCommandBuffer | None = None) -> None:
        owner = "MPSCNNConvolutionWeightsAndBiasesState"
        desc = cnn_convolution_descriptor
        if weights is None:
            if desc is None:
                raise MPSTypeError(f"{owner}: give `weights` (and `biases`) or `cnn_convolution_descriptor` to allocate")
            geom = geometry_of(owner, desc, "regular")
            dev = _command_buffer.device if _command_buffer is not None else Device(device or "cpu")
            weights = torch.zeros(weight_shape(geom), dtype=torch.float32, device=dev.torch_device)
            biases = torch.zeros(geom.output_channels, dtype=torch.float32, device=dev.torch_device)
        for name, t, off in (("weights", weights, weights_offset), ("biases", biases, biases_offset)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise MPSTypeError(f"{owner}: `{name}` must be a float32 torch tensor")
            if off % 4 or off < 0:
                raise value_error(owner, f"{name}_offset", off, "be a non-negative multiple of 4 bytes")
        if desc is not None and (weights_offset or biases_offset or weights.dim() == 1):
            geom = geometry_of(owner, desc, "regular")
            nw = math.prod(weight_shape(geom))
            flat = weights.reshape(-1)
            if weights_offset // 4 + nw > flat.numel():
                raise value_error(owner, "weights_offset", weights_offset, f"leave room for {nw} weights in a buffer of {flat.numel()} floats")
            weights = flat[weights_offset // 4: weights_offset // 4 + nw].view(weight_shape(geom))
            if biases is not None:
                bflat = biases.reshape(-1)
                nb = geom.output_channels
                if biases_offset // 4 + nb > bflat.numel():
                    raise value_error(owner, "biases_offset", biases_offset, f"leave room for {nb} biases in a buffer of {bflat.numel()} floats")
                biases = bflat[biases_offset // 4: biases_offset // 4 + nb]
        super().__init__(device=Device(weights.device) if _command_buffer is None else None, resources=[weights] + ([biases] if biases is not None else []),
                         _command_buffer=_command_buffer)
        self.weights = weights
        self.biases = biases
        self.weights_offset = weights_offset
        self.biases_offset = biases_offset

    @classmethod
    def temporary_cnn_convolution_weights_and_biases_state(cls, command_buffer: MTLCommandBuffer, cnn_convolution_descriptor: MPSCNNConvolutionDescriptor) -> "MPSCNNConvolutionWeightsAndBiasesState":
        return cls(cnn_convolution_descriptor=cnn_convolution_descriptor, _command_buffer=command_buffer)


class MPSCNNConvolutionGradientState(MPSNNGradientState):
    """``MPSCNNConvolutionGradientState``: what a convolution hands its gradient kernel.

    ``gradient_for_weights`` (float32 ``[Cout][kH][kW][Cin/g]``, depthwise ``[Cout][kH][kW]``)
    and ``gradient_for_biases`` (float32 ``[Cout]``) are device tensors written by the gradient
    kernel (+dLoss/dW, summed over the batch). ``gradient_for_weights_layout`` is OHWI;
    ``convolution`` is the forward kernel; ``source_width``/``source_height`` its source size.
    """

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None, convolution: Any) -> None:
        super().__init__(geometry, device, command_buffer)
        self.convolution = convolution
        self._gw: torch.Tensor | None = None
        self._gb: torch.Tensor | None = None

    gradient_for_weights_layout = MPSCNNConvolutionWeightsLayout.OHWI

    def destination_image_descriptor_for_source_images(self, source_images, source_states, kernel, suggested_descriptor):  # type: ignore[no-untyped-def]
        """Size the gradient result like the forward source, with the convolution's ``Cin`` channels."""
        desc = super().destination_image_descriptor_for_source_images(source_images, source_states, kernel, suggested_descriptor)
        channels = getattr(kernel, "source_image_feature_channels", None)
        if channels is not None and desc is not suggested_descriptor:
            desc.feature_channels = channels
        return desc

    def _weights_geometry(self) -> Any:
        """The geometry of the kernel whose weights the buffers mirror."""
        return self.convolution._geom

    def _buffers(self, overwritten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 gradient buffers, made on first use: zeros, or uninitialised when the
        caller (``overwritten``) writes every element before anything reads them."""
        if self._gw is None:
            g = self._weights_geometry()
            dev = self.device.torch_device
            make = torch.empty if overwritten else torch.zeros
            self._gw = make(weight_shape(g), dtype=torch.float32, device=dev)
            self._gb = make(g.output_channels, dtype=torch.float32, device=dev)
        assert self._gb is not None
        return self._gw, self._gb

    @property
    def gradient_for_weights(self) -> torch.Tensor:
        return self._buffers()[0]

    @property
    def gradient_for_biases(self) -> torch.Tensor:
        return self._buffers()[1]

    def resource_size(self) -> int:
        g = self.convolution._geom
        return 4 * (math.prod(weight_shape(g)) + g.output_channels)


class MPSCNNConvolutionTransposeGradientState(MPSCNNConvolutionGradientState):
    """``MPSCNNConvolutionTransposeGradientState``: the same for a transposed convolution;
    ``convolution_transpose`` is the producing kernel and ``convolution`` the forward
    convolution whose gradient state sized it (None when there was none)."""

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None, convolution_transpose: Any, convolution: Any = None) -> None:
        super().__init__(geometry, device, command_buffer, convolution_transpose)
        self.convolution_transpose = convolution_transpose
        self.convolution = convolution
        self._owner = convolution_transpose

    def _weights_geometry(self) -> Any:
        return self._owner._geom

    def resource_size(self) -> int:
        g = self._owner._geom
        return 4 * (math.prod(weight_shape(g)) + g.output_channels)
