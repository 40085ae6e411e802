"""Batch normalization: MPSCNNBatchNormalization, its data source protocol and states,
MPSCNNBatchNormalizationStatistics and the gradient kernels (spec/normalization.md §3).

Apple classes here: ``MPSCNNBatchNormalizationDataSource`` (protocol, an ABC),
``MPSCNNBatchNormalization``, ``MPSCNNBatchNormalizationState``,
``MPSCNNNormalizationMeanAndVarianceState``, ``MPSCNNNormalizationGammaAndBetaState``,
``MPSCNNBatchNormalizationStatistics``, ``MPSCNNBatchNormalizationStatisticsGradient``,
``MPSCNNBatchNormalizationGradient``, ``MPSCNNBatchNormalizationFlags``; plus
:class:`BatchNormalizationDataSource`, a ready-made data source over arrays or tensors.

Math, per channel ``k`` (C = ``number_of_feature_channels``), at every pixel of every image::

    forward     Z = (X - mean[k]) * gamma[k] / sqrt(variance[k] + epsilon) + beta[k];  Y = f(Z)
    statistics  mean[k] = ΣX / n,  variance[k] = Σ(X - mean[k])² / n   (biased; n = all pixels
                of all images seen since the state's last reset)
    gradients   sigma = sqrt(variance + eps), Xhat = (X - mean)/sigma, G = dY * f'(Z) (dY
                without a neuron); dbeta = ΣG, dgamma = ΣG*Xhat (whole batch);
                dX = gamma/sigma * (G - dbeta/n - Xhat*dgamma/n)

``f`` is the fused neuron (any :class:`~mpsnn.MPSNNNeuronDescriptor`; PReLU slope ``i`` goes
with normalised channel ``i``). Arithmetic is float32 whatever the storage format; results are
rounded once on store. Inference uses the kernel's stored mean/variance/gamma/beta, folded to
``scale = gamma/sqrt(variance + eps)``, ``shift = beta - mean*scale``.

Decisions where the spec is silent (all ``(inferred)``):

* Channels: the kernels normalise the first C channels of the source's channel window
  (``source_feature_channel_offset``); fewer than C channels available is an error. The
  result has C channels, written at ``destination_feature_channel_offset``.
* The data source's arrays must hold exactly C float32 values (``beta()`` may be None: 0);
  ``variance`` must be >= 0; ``epsilon()`` defaults to FLT_MIN and is copied at init (and by
  ``reload_data_source``). Every read of the data source is bracketed by ``load()`` /
  ``purge()``; ``load()`` returning False raises :class:`~mpsnn.MPSValueError`.
* A fresh (or reset) :class:`MPSCNNBatchNormalizationState` holds the creating kernel's
  gamma, beta, mean and variance. ``MPSCNNBatchNormalizationStatistics`` replaces mean and
  variance by the statistics of all pixels it has seen since the last reset (sub-batches merge
  exactly, Chan's pairwise update in float32). It reads whole images (every pixel of every
  image of each source) and refuses a non-default ``offset`` / ``clip_rect``.
* Statistics gradient accumulates dgamma/dbeta into the state; ``MPSCNNBatchNormalizationGradient``
  then needs that the statistics gradient saw exactly as many pixels as the statistics
  (the whole batch), else :class:`~mpsnn.MPSStateError`. When the state's statistics were
  never computed from a batch (inference statistics), they are constants and
  ``dX = gamma/sigma * G``.
* Read counts: every kernel that reads a temporary state decrements it once per encode call
  (forward with state, statistics gradient, gradient, the GPU reloads); the statistics kernel
  writes the state and does not. One state serves the whole batch
  (``is_result_state_reused_across_batch()`` is True).
* The generic ``destination_state`` encode variants are unavailable on
  :class:`MPSCNNBatchNormalization` (:class:`~mpsnn.MPSTypeError`), as in Apple's API.
"""
from __future__ import annotations

import abc
import enum
from typing import Any, Sequence

import numpy as np
import torch

from ..backends import batch_normalization as backend
from ..backends.torch_eager import NeuronParams
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer, as_device
from ..core.enums import MPSCNNNeuronType
from ..core.errors import MPSStateError, MPSTypeError, MPSValueError, value_error
from ..core.host_arrays import float32_array
from ..core.kernel import InputGeometry, MPSCNNKernel, Region, _consume
from ..core.regions import read_window
from ..core.structs import MPSOffset, MPSRectNoClip
from ..images.image import MPSImage
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .neuron import MPSNNNeuronDescriptor
from .results import direct_out, result_dtype, write_result

__all__ = [
    "BatchNormalizationDataSource",
    "MPSCNNBatchNormalization",
    "MPSCNNBatchNormalizationDataSource",
    "MPSCNNBatchNormalizationFlags",
    "MPSCNNBatchNormalizationGradient",
    "MPSCNNBatchNormalizationState",
    "MPSCNNBatchNormalizationStatistics",
    "MPSCNNBatchNormalizationStatisticsGradient",
    "MPSCNNNormalizationGammaAndBetaState",
    "MPSCNNNormalizationMeanAndVarianceState",
]

#: the smallest normal float32, the epsilon of a data source without ``epsilon()``
FLT_MIN = float(np.finfo(np.float32).tiny)


class MPSCNNBatchNormalizationFlags(enum.IntFlag):
    """``MPSCNNBatchNormalizationFlags`` (used by the graph node, normalization.md §3.8)."""

    default = 0
    calculateStatisticsAutomatic = 0
    calculateStatisticsAlways = 1
    calculateStatisticsNever = 2
    calculateStatisticsMask = 3


# -- validation helpers ---------------------------------------------------------------------------


def _channel_count(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, name, value, "be an integer >= 1")
    return int(value)


def _vector(owner: str, name: str, value: Any, count: int) -> np.ndarray:
    arr = float32_array(owner, name, value)
    if arr.size != count:
        raise value_error(owner, name, f"{arr.size} values", f"hold number_of_feature_channels = {count} float32 values")
    return arr


def _f32(owner: str, name: str, value: Any) -> float:
    try:
        return float(np.float32(value))
    except (TypeError, ValueError):
        raise value_error(owner, name, value, "be a real number") from None


def _device_vector(owner: str, name: str, value: Any, device: Device | None) -> torch.Tensor:
    """A float32 ``[C]`` tensor: a float32 tensor is used as it is (not copied), anything else
    is converted onto ``device``."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        if value.dim() != 1:
            raise value_error(owner, name, f"a tensor of shape {tuple(value.shape)}", "be one-dimensional ([C] float32)")
        return value
    arr = float32_array(owner, name, value)
    return torch.from_numpy(arr).to((device or Device("cpu")).torch_device)


# -- the data source protocol ------------------------------------------------------------------------


class MPSCNNBatchNormalizationDataSource(abc.ABC):
    """Protocol ``MPSCNNBatchNormalizationDataSource``: supplies a batch-norm layer's parameters.

    Required: ``number_of_feature_channels()`` (C), ``gamma()``, ``beta()`` (None: no bias),
    ``mean()``, ``variance()`` (each C float32 values: NumPy arrays, torch tensors or bytes),
    ``load()`` (True when the data is ready; called before every read and after every
    ``purge``), ``purge()``, ``label()``.

    Optional (defaults here): ``epsilon()`` -> :data:`FLT_MIN`;
    ``update_gamma_and_beta(command_buffer, batch_normalization_state)`` and
    ``update_mean_and_variance(command_buffer, batch_normalization_state)`` (GPU updates:
    return a :class:`MPSCNNNormalizationGammaAndBetaState` /
    :class:`MPSCNNNormalizationMeanAndVarianceState` with new values, or None = keep; must
    decrement a temporary state's ``read_count``) -> None;
    ``update_gamma_and_beta_with_batch_normalization_state(state)`` and
    ``update_mean_and_variance_with_batch_normalization_state(state)`` (CPU updates: True when
    the data source now holds new values) -> False; ``copy(device=None)`` -> self.
    """

    @abc.abstractmethod
    def number_of_feature_channels(self) -> int: ...

    @abc.abstractmethod
    def gamma(self) -> Any: ...

    @abc.abstractmethod
    def beta(self) -> Any: ...

    @abc.abstractmethod
    def mean(self) -> Any: ...

    @abc.abstractmethod
    def variance(self) -> Any: ...

    @abc.abstractmethod
    def load(self) -> bool: ...

    @abc.abstractmethod
    def purge(self) -> None: ...

    @abc.abstractmethod
    def label(self) -> str | None: ...

    def epsilon(self) -> float:
        return FLT_MIN

    def update_gamma_and_beta(self, command_buffer: MTLCommandBuffer,
                              batch_normalization_state: "MPSCNNBatchNormalizationState") -> "MPSCNNNormalizationGammaAndBetaState | None":
        return None

    def update_mean_and_variance(self, command_buffer: MTLCommandBuffer,
                                 batch_normalization_state: "MPSCNNBatchNormalizationState") -> "MPSCNNNormalizationMeanAndVarianceState | None":
        return None

    def update_gamma_and_beta_with_batch_normalization_state(self, batch_normalization_state: "MPSCNNBatchNormalizationState") -> bool:
        return False

    def update_mean_and_variance_with_batch_normalization_state(self, batch_normalization_state: "MPSCNNBatchNormalizationState") -> bool:
        return False

    # Objective-C spellings of the GPU hooks
    update_gamma_and_beta_with_command_buffer = update_gamma_and_beta
    update_mean_and_variance_with_command_buffer = update_mean_and_variance

    def copy(self, device: Device | None = None) -> "MPSCNNBatchNormalizationDataSource":
        return self


class BatchNormalizationDataSource(MPSCNNBatchNormalizationDataSource):
    """A ready-made :class:`MPSCNNBatchNormalizationDataSource` over arrays or tensors (mpsnn).

    Args:
        gamma, mean, variance: C float32 values each (arrays, tensors or bytes).
        beta: C values or None (no bias).
        epsilon: default :data:`FLT_MIN`, as a data source without ``epsilon()``.
        label: the layer's label (default None).
        momentum: when given, the mean/variance update hooks keep running statistics
            ``running = (1 - momentum)*running + momentum*batch`` (biased batch variance);
            None (default): they report no update (MPS defines no momentum).
        optimizer_update: optional callable ``(command_buffer, state) -> gamma/beta state``
            used by the GPU ``update_gamma_and_beta`` hook (e.g. an optimizer's encode).

    The number of channels is ``len(gamma)``. ``load_count`` / ``purge_count`` count calls.
    ``set_gamma_and_beta`` / ``set_mean_and_variance`` replace values (then call the kernel's
    ``reload_..._from_data_source``).
    """

    def __init__(self, gamma: Any, beta: Any, mean: Any, variance: Any, epsilon: float = FLT_MIN, label: str | None = None,
                 momentum: float | None = None, optimizer_update: Any = None) -> None:
        owner = "BatchNormalizationDataSource"
        g = float32_array(owner, "gamma", gamma)
        if g.size < 1:
            raise value_error(owner, "gamma", "0 values", "hold at least one value")
        self._c = int(g.size)
        self._gamma = g
        self._beta = None if beta is None else _vector(owner, "beta", beta, self._c)
        self._mean = _vector(owner, "mean", mean, self._c)
        self._variance = _vector(owner, "variance", variance, self._c)
        self._epsilon = _f32(owner, "epsilon", epsilon)
        self._label = label
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise value_error(owner, "momentum", momentum, "be in [0, 1] or None")
        self.momentum = momentum
        self._optimizer_update = optimizer_update
        self.load_count = 0
        self.purge_count = 0

    def set_gamma_and_beta(self, gamma: Any, beta: Any) -> None:
        self._gamma = _vector("BatchNormalizationDataSource", "gamma", gamma, self._c)
        self._beta = None if beta is None else _vector("BatchNormalizationDataSource", "beta", beta, self._c)

    def set_mean_and_variance(self, mean: Any, variance: Any) -> None:
        self._mean = _vector("BatchNormalizationDataSource", "mean", mean, self._c)
        self._variance = _vector("BatchNormalizationDataSource", "variance", variance, self._c)

    def number_of_feature_channels(self) -> int:
        return self._c

    def gamma(self) -> np.ndarray:
        return self._gamma

    def beta(self) -> np.ndarray | None:
        return self._beta

    def mean(self) -> np.ndarray:
        return self._mean

    def variance(self) -> np.ndarray:
        return self._variance

    def epsilon(self) -> float:
        return self._epsilon

    def load(self) -> bool:
        self.load_count += 1
        return True

    def purge(self) -> None:
        self.purge_count += 1

    def label(self) -> str | None:
        return self._label

    def update_gamma_and_beta(self, command_buffer, batch_normalization_state):  # type: ignore[no-untyped-def]
        if self._optimizer_update is None:
            return None
        return self._optimizer_update(command_buffer, batch_normalization_state)

    def _running(self, state: "MPSCNNBatchNormalizationState") -> tuple[torch.Tensor, torch.Tensor]:
        m = float(self.momentum)  # type: ignore[arg-type]
        dev = state.device.torch_device
        mean = torch.from_numpy(self._mean).to(dev) * (1.0 - m) + state.mean * m
        var = torch.from_numpy(self._variance).to(dev) * (1.0 - m) + state.variance * m
        return mean, var

    def update_mean_and_variance(self, command_buffer, batch_normalization_state):  # type: ignore[no-untyped-def]
        if self.momentum is None:
            return None
        with command_buffer.encoding("BatchNormalizationDataSource"):
            mean, var = self._running(batch_normalization_state)
        _consume([batch_normalization_state])
        return MPSCNNNormalizationMeanAndVarianceState(mean, var)

    def update_mean_and_variance_with_batch_normalization_state(self, batch_normalization_state):  # type: ignore[no-untyped-def]
        """CPU update (synchronises: call it after the command buffer completed)."""
        if self.momentum is None:
            return False
        mean, var = self._running(batch_normalization_state)
        self._mean, self._variance = mean.cpu().numpy().astype(np.float32), var.cpu().numpy().astype(np.float32)
        return True

    def copy(self, device: Device | None = None) -> "BatchNormalizationDataSource":
        return BatchNormalizationDataSource(self._gamma, self._beta, self._mean, self._variance, self._epsilon, self._label,
                                            self.momentum, self._optimizer_update)


# -- weight and statistics states ---------------------------------------------------------------------


class _VectorPairState(MPSState):
    _names: tuple[str, str] = ("", "")

    def __init__(self, first: Any, second: Any, *, device: Device | str | None = None,
                 _command_buffer: MTLCommandBuffer | None = None) -> None:
        owner = type(self).__name__
        dev = _command_buffer.device if _command_buffer is not None else (as_device(device, owner) if device is not None else None)
        if dev is None and isinstance(first, torch.Tensor):
            dev = Device(first.device)
        a = _device_vector(owner, self._names[0], first, dev)
        b = _device_vector(owner, self._names[1], second, dev)
        if a.shape != b.shape:
            raise value_error(owner, self._names[1], f"{b.numel()} values", f"hold as many values as `{self._names[0]}` ({a.numel()})")
        if a.device != b.device:
            raise MPSValueError(f"{owner}: `{self._names[0]}` and `{self._names[1]}` must be on one device, but got {a.device} and {b.device}")
        super().__init__(device=Device(a.device) if _command_buffer is None else None, resources=[a, b], _command_buffer=_command_buffer)
        self._a, self._b = a, b

    @classmethod
    def temporary_state_with_command_buffer(cls, command_buffer: MTLCommandBuffer, number_of_feature_channels: int | None = None,  # type: ignore[override]
                                            **_: Any) -> Any:
        """``temporaryStateWithCommandBuffer:numberOfFeatureChannels:``: zero-filled space for
        that many channels, temporary on ``command_buffer``."""
        if not isinstance(command_buffer, MTLCommandBuffer):
            raise MPSTypeError(f"{cls.__name__}: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
        c = _channel_count(cls.__name__, "number_of_feature_channels", number_of_feature_channels)
        z = torch.zeros(c, dtype=torch.float32, device=command_buffer.device.torch_device)
        return cls(z, z.clone(), _command_buffer=command_buffer)

    temporary_state = temporary_state_with_command_buffer  # type: ignore[assignment]

    def _get(self, t: torch.Tensor) -> torch.Tensor:
        if self.is_temporary and self.read_count == 0:
            raise MPSStateError(f"{self._name()}: read after its `read_count` reached 0")
        return t

    @property
    def number_of_feature_channels(self) -> int:
        return int(self._a.numel())


class MPSCNNNormalizationMeanAndVarianceState(_VectorPairState):
    """``MPSCNNNormalizationMeanAndVarianceState``: read-only ``mean`` and ``variance`` (float32
    ``[C]`` tensors on the device).

    ``MPSCNNNormalizationMeanAndVarianceState(mean, variance)`` (``initWithMean:variance:``:
    float32 tensors are used, not copied; arrays are copied onto ``device``, default CPU) or
    :meth:`temporary_state_with_command_buffer` ``(cb, number_of_feature_channels)``.
    """

    _names = ("mean", "variance")

    def __init__(self, mean: Any, variance: Any, *, device: Device | str | None = None, _command_buffer: MTLCommandBuffer | None = None) -> None:
        super().__init__(mean, variance, device=device, _command_buffer=_command_buffer)

    mean = property(lambda self: self._get(self._a))
    variance = property(lambda self: self._get(self._b))


class MPSCNNNormalizationGammaAndBetaState(_VectorPairState):
    """``MPSCNNNormalizationGammaAndBetaState``: read-only ``gamma`` and ``beta`` (float32
    ``[C]`` tensors on the device); shared by batch, instance and group normalization.

    ``MPSCNNNormalizationGammaAndBetaState(gamma, beta)`` (``initWithGamma:beta:``; tensors
    are used, not copied) or :meth:`temporary_state_with_command_buffer` ``(cb,
    number_of_feature_channels)``.
    """

    _names = ("gamma", "beta")

    def __init__(self, gamma: Any, beta: Any, *, device: Device | str | None = None, _command_buffer: MTLCommandBuffer | None = None) -> None:
        super().__init__(gamma, beta, device=device, _command_buffer=_command_buffer)

    gamma = property(lambda self: self._get(self._a))
    beta = property(lambda self: self._get(self._b))


class MPSCNNBatchNormalizationState(MPSNNGradientState):
    """``MPSCNNBatchNormalizationState``: everything batch-norm training needs.

    Made only by a kernel's ``result_state(...)`` / ``temporary_result_state(cb, ...)``
    (Apple's ``initWithResource:`` and temporary factories are unavailable).

    Read-only: ``batch_normalization`` (the creating kernel), ``gamma``, ``beta`` (current
    values), ``mean``, ``variance`` (the statistics of every pixel the statistics kernel saw
    since the last reset; before that, the kernel's stored values), ``gradient_for_gamma``,
    ``gradient_for_beta`` (None until a :class:`MPSCNNBatchNormalizationGradient` ran) — each a
    float32 ``[C]`` tensor. ``reset()`` clears the statistics and gradient accumulators.
    """

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None,
                 batch_normalization: "MPSCNNBatchNormalization") -> None:
        super().__init__(geometry, device, command_buffer)
        self._bn = batch_normalization
        self._c = batch_normalization.number_of_feature_channels
        self._gamma, self._beta = batch_normalization._gamma, batch_normalization._beta
        self._initial = (batch_normalization._mean, batch_normalization._variance)
        self.reset()

    def reset(self) -> None:
        """Reset statistics and gradient accumulators to their initial values."""
        self._stat_count = 0
        self._mean, self._variance = self._initial
        self._grad_count = 0
        self._dgamma_acc: torch.Tensor | None = None
        self._dbeta_acc: torch.Tensor | None = None
        self._dgamma: torch.Tensor | None = None
        self._dbeta: torch.Tensor | None = None

    def _live(self, t: Any) -> Any:
        if self.is_temporary and self.read_count == 0:
            raise MPSStateError(f"{self._name()}: read after its `read_count` reached 0")
        return t

    batch_normalization = property(lambda self: self._bn)
    number_of_feature_channels = property(lambda self: self._c)
    gamma = property(lambda self: self._live(self._gamma))
    beta = property(lambda self: self._live(self._beta))
    mean = property(lambda self: self._live(self._mean))
    variance = property(lambda self: self._live(self._variance))
    gradient_for_gamma = property(lambda self: self._live(self._dgamma))
    gradient_for_beta = property(lambda self: self._live(self._dbeta))

    @property
    def statistics_count(self) -> int:
        """mpsnn: the number of pixels (per channel) the current statistics cover; 0 when
        they are the kernel's stored (inference) statistics."""
        return self._stat_count

    def resource_size(self) -> int:
        return 6 * 4 * self._c


# -- shared pieces of the kernels -------------------------------------------------------------------



class _FusedNeuron:
    """The optional fused neuron of the batch-norm kernels."""

    def _set_fused_neuron(self, descriptor: Any) -> None:
        owner = type(self).__name__
        if descriptor is not None and not isinstance(descriptor, MPSNNNeuronDescriptor):
            raise MPSTypeError(f"{owner}: `fused_neuron_descriptor` must be an MPSNNNeuronDescriptor or None, but got {type(descriptor).__name__}")
        if descriptor is not None and descriptor.neuron_type == MPSCNNNeuronType.pReLU and descriptor.data is None:
            raise value_error(owner, "fused_neuron_descriptor.data", None, "hold the PReLU slopes (one float32 per channel)")
        self._neuron_desc = None if descriptor is None or descriptor.neuron_type == MPSCNNNeuronType.none else descriptor.copy()
        self._neuron_params_cache: NeuronParams | None = None

    @property
    def fused_neuron_descriptor(self) -> MPSNNNeuronDescriptor | None:
        """The fused neuron (a copy), None without one."""
        return None if self._neuron_desc is None else self._neuron_desc.copy()

    def _neuron(self, channels: int, device: Device) -> NeuronParams | None:
        nd = self._neuron_desc
        if nd is None:
            return None
        p = self._neuron_params_cache
        if p is None or (p.slopes is not None and p.slopes.device != device.torch_device):
            slopes = None
            if nd.neuron_type == MPSCNNNeuronType.pReLU:
                slopes = torch.from_numpy(nd.data.astype(np.float32)).to(device.torch_device)
            p = self._neuron_params_cache = NeuronParams(nd.neuron_type, nd.a, nd.b, nd.c, slopes)
        if p.slopes is not None:
            if p.slopes.numel() < channels:
                raise value_error(type(self).__name__, "fused_neuron_descriptor.data", f"{p.slopes.numel()} PReLU slopes",
                                  f"hold one slope per normalised channel ({channels})")
            if p.slopes.numel() > channels:
                p = NeuronParams(p.neuron_type, p.a, p.b, p.c, p.slopes[:channels])
        return p


def _check_channels(owner: str, name: str, available: int, needed: int) -> None:
    if available < needed:
        raise value_error(owner, name, f"{available} channels", f"provide number_of_feature_channels = {needed} channels")


# -- forward ----------------------------------------------------------------------------------------


class MPSCNNBatchNormalization(_FusedNeuron, MPSCNNKernel):
    """``MPSCNNBatchNormalization``: per-channel normalisation with learned scale and bias.

    Args:
        device: the device (positional, first).
        data_source: an :class:`MPSCNNBatchNormalizationDataSource` (required;
            ``initWithDevice:`` is unavailable). Read once at init (``load`` ... ``purge``).
        fused_neuron_descriptor: an :class:`~mpsnn.MPSNNNeuronDescriptor` applied to the
            normalised result, or None (default: no neuron).

    Properties: ``number_of_feature_channels`` (read-only, C), ``epsilon`` (read-write
    float32, default the data source's ``epsilon()``), ``data_source`` (read-only),
    ``fused_neuron_descriptor`` (read-only), and the :class:`~mpsnn.MPSCNNKernel` ones
    (offset, clip_rect, channel offsets, edge_mode, padding, destination_image_allocator);
    the label is the data source's ``label()``.

    Shape: the result has the source's size (1x1 window, stride 1) and C channels; the source
    must provide at least C channels after ``source_feature_channel_offset``.

    Encode forms:

    * inference (stored statistics): ``encode(cb, source_image[, destination_image])``,
      ``encode_batch(cb, source_images[, destination_images])``;
    * with a state (batch statistics in training): ``encode(cb, source_image,
      batch_normalization_state[, destination_image])`` and ``encode_batch(cb,
      source_images, batch_normalization_state[, destination_images])`` (also as keywords) —
      uses the state's gamma, beta, mean and variance and records the geometry for the
      gradients; a temporary state's ``read_count`` drops by one per call.
    * ``result_state(source_image, source_states=None, destination_image=None)`` /
      ``temporary_result_state(cb, ...)`` make an :class:`MPSCNNBatchNormalizationState`.

    Reload: ``reload_data_source(data_source)``, ``reload_gamma_and_beta_from_data_source()``,
    ``reload_mean_and_variance_from_data_source()``,
    ``reload_gamma_and_beta_with_command_buffer(cb, gamma_and_beta_state)``,
    ``reload_mean_and_variance_with_command_buffer(cb, mean_and_variance_state)``.

    Example::

        bn = MPSCNNBatchNormalization(device, data_source=BatchNormalizationDataSource(g, b, m, v, epsilon=1e-5))
        y = bn.encode(command_buffer, x)
    """

    _result_state_class = MPSCNNBatchNormalizationState

    def __init__(self, device: Device | str, data_source: MPSCNNBatchNormalizationDataSource | None = None,
                 fused_neuron_descriptor: MPSNNNeuronDescriptor | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        if data_source is None:
            raise MPSTypeError(f"{type(self).__name__}: `data_source` is required (init with a device alone is unavailable)")
        self._set_fused_neuron(fused_neuron_descriptor)
        self._c = 0
        self._load_all(data_source)

    # -- data source ------------------------------------------------------------------------------------
    def _check_source(self, data_source: Any) -> MPSCNNBatchNormalizationDataSource:
        if not isinstance(data_source, MPSCNNBatchNormalizationDataSource):
            raise MPSTypeError(f"{self._name()}: `data_source` must be an MPSCNNBatchNormalizationDataSource, but got {type(data_source).__name__}")
        return data_source

    def _read(self, data_source: MPSCNNBatchNormalizationDataSource, what: str) -> dict[str, Any]:
        """``load()``, read ``what`` ("all", "gamma_beta", "mean_variance"), ``purge()``."""
        owner = self._name()
        if not data_source.load():
            raise value_error(owner, "data_source.load()", False, "return True (the data source could not load its data)")
        try:
            c = _channel_count(owner, "data_source.number_of_feature_channels()", data_source.number_of_feature_channels())
            if what != "all" and c != self._c:
                raise value_error(owner, "data_source.number_of_feature_channels()", c, f"stay {self._c} (the kernel's channel count)")
            out: dict[str, Any] = {"c": c}
            if what in ("all", "gamma_beta"):
                out["gamma"] = _vector(owner, "data_source.gamma()", data_source.gamma(), c)
                beta = data_source.beta()
                out["beta"] = np.zeros(c, np.float32) if beta is None else _vector(owner, "data_source.beta()", beta, c)
            if what in ("all", "mean_variance"):
                out["mean"] = _vector(owner, "data_source.mean()", data_source.mean(), c)
                var = _vector(owner, "data_source.variance()", data_source.variance(), c)
                if not np.all(var >= 0):
                    raise value_error(owner, "data_source.variance()", var.tolist(), "hold values >= 0")
                out["variance"] = var
            if what == "all":
                out["epsilon"] = _f32(owner, "data_source.epsilon()", data_source.epsilon())
                out["label"] = data_source.label()
        finally:
            data_source.purge()
        return out

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, np.float32)).to(self.device.torch_device)

    def _load_all(self, data_source: Any) -> None:
        ds = self._check_source(data_source)
        d = self._read(ds, "all")
        self._data_source = ds
        self._c = d["c"]
        self._gamma, self._beta = self._tensor(d["gamma"]), self._tensor(d["beta"])
        self._mean, self._variance = self._tensor(d["mean"]), self._tensor(d["variance"])
        self._epsilon = d["epsilon"]
        self.label = d["label"]

    def reload_data_source(self, data_source: MPSCNNBatchNormalizationDataSource) -> None:
        """``reloadDataSource:``: re-read everything (channels, gamma, beta, mean, variance,
        epsilon, label) from ``data_source``, which becomes the kernel's data source."""
        self._load_all(data_source)

    reload_data_source_with_data_source = reload_data_source

    def reload_gamma_and_beta_from_data_source(self) -> None:
        """``reloadGammaAndBetaFromDataSource``: gamma and beta from the data source."""
        d = self._read(self._data_source, "gamma_beta")
        self._gamma, self._beta = self._tensor(d["gamma"]), self._tensor(d["beta"])

    def reload_mean_and_variance_from_data_source(self) -> None:
        """``reloadMeanAndVarianceFromDataSource``: mean and variance from the data source."""
        d = self._read(self._data_source, "mean_variance")
        self._mean, self._variance = self._tensor(d["mean"]), self._tensor(d["variance"])

    def _state_vectors(self, command_buffer: Any, name: str, state: Any, cls: type, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
        cb = self._check_command_buffer(command_buffer)
        st = self._check_state(name, state, cb, cls)
        if st.number_of_feature_channels < self._c:
            raise value_error(self._name(), f"{cls.__name__}.{first}", f"{st.number_of_feature_channels} values",
                              f"hold at least number_of_feature_channels = {self._c} values")
        with cb.encoding(self._name()):
            a = getattr(st, first)[:self._c].to(self.device.torch_device, torch.float32, copy=True)
            b = getattr(st, second)[:self._c].to(self.device.torch_device, torch.float32, copy=True)
        _consume([st])
        return a, b

    def reload_gamma_and_beta_with_command_buffer(self, command_buffer: MTLCommandBuffer, gamma_and_beta_state: MPSCNNNormalizationGammaAndBetaState) -> None:
        """``reloadGammaAndBetaWithCommandBuffer:gammaAndBetaState:``: copy gamma and beta from
        the state on the command buffer (the state may hold more than C values)."""
        self._gamma, self._beta = self._state_vectors(command_buffer, "gamma_and_beta_state", gamma_and_beta_state, MPSCNNNormalizationGammaAndBetaState, "gamma", "beta")

    def reload_mean_and_variance_with_command_buffer(self, command_buffer: MTLCommandBuffer, mean_and_variance_state: MPSCNNNormalizationMeanAndVarianceState) -> None:
        """``reloadMeanAndVarianceWithCommandBuffer:meanAndVarianceState:``."""
        self._mean, self._variance = self._state_vectors(command_buffer, "mean_and_variance_state", mean_and_variance_state, MPSCNNNormalizationMeanAndVarianceState, "mean", "variance")

    #: Swift spellings ``reloadGammaAndBeta(with:gammaAndBetaState:)`` / ``reloadMeanAndVariance(with:meanAndVarianceState:)``
    reload_gamma_and_beta = reload_gamma_and_beta_with_command_buffer
    reload_mean_and_variance = reload_mean_and_variance_with_command_buffer

    def _moved_to_device(self) -> None:
        dev = self.device.torch_device
        self._gamma, self._beta = self._gamma.to(dev), self._beta.to(dev)
        self._mean, self._variance = self._mean.to(dev), self._variance.to(dev)
        self._neuron_params_cache = None

    # -- properties -------------------------------------------------------------------------------------
    number_of_feature_channels = property(lambda self: self._c)
    data_source = property(lambda self: self._data_source)

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _f32(self._name(), "epsilon", value)

    def is_result_state_reused_across_batch(self) -> bool:
        return True

    def _result_feature_channels(self, source_channels: int) -> int:
        _check_channels(self._name(), "source_image", source_channels, self._c)
        return self._c

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        return MPSCNNBatchNormalizationState(self._geometry(source, dest), self.device, command_buffer, self)

    # -- encode -----------------------------------------------------------------------------------------
    def _split(self, args: tuple[Any, ...], state: Any, dest: Any, dest_name: str) -> tuple[Any, Any]:
        args = tuple(args)
        if len(args) > 2:
            raise MPSTypeError(f"{self._name()}: too many positional arguments ({2 + len(args)})")
        if args and isinstance(args[0], MPSCNNBatchNormalizationState):
            if state is not None:
                raise MPSTypeError(f"{self._name()}: `batch_normalization_state` given twice")
            state, args = args[0], args[1:]
        if args:
            if dest is not None or len(args) > 1:
                raise MPSTypeError(f"{self._name()}: `{dest_name}` given twice, or a second positional argument is not a state")
            dest = args[0]
        return state, dest

    def encode(self, command_buffer: MTLCommandBuffer, source_image: MPSImage, *args: Any,  # type: ignore[override]
               batch_normalization_state: "MPSCNNBatchNormalizationState | None" = None,
               destination_image: MPSImage | None = None, **unavailable: Any) -> MPSImage | None:
        """``encode(cb, source_image[, batch_normalization_state][, destination_image])``:
        returns the result when ``destination_image`` is omitted."""
        self._refuse(unavailable)
        state, dest = self._split(args, batch_normalization_state, destination_image, "destination_image")
        if state is None:
            return MPSCNNKernel.encode(self, command_buffer, source_image, dest)  # type: ignore[no-any-return]
        cb = self._check_command_buffer(command_buffer)
        src = self._check_image("source_image", source_image, cb)
        st = self._take_state(state, cb)
        if dest is None:
            dest = self._allocator.image_for_command_buffer(cb, self.destination_image_descriptor([src], None), self)
            self._encode_checked(cb, src, dest, st)
            _consume([src, st])
            return dest
        self._encode_checked(cb, src, dest, st)
        _consume([src, st])
        return None

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], *args: Any,  # type: ignore[override]
                     batch_normalization_state: "MPSCNNBatchNormalizationState | None" = None,
                     destination_images: Sequence[MPSImage] | None = None, **unavailable: Any) -> list[MPSImage] | None:
        """``encode_batch(cb, source_images[, batch_normalization_state][, destination_images])``:
        one state for the whole batch; returns the results when ``destination_images`` is omitted."""
        self._refuse(unavailable)
        state, dests = self._split(args, batch_normalization_state, destination_images, "destination_images")
        if state is None:
            return MPSCNNKernel.encode_batch(self, command_buffer, source_images, dests)  # type: ignore[no-any-return]
        cb = self._check_command_buffer(command_buffer)
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        st = self._take_state(state, cb)
        if dests is None:
            for k, s in enumerate(srcs):
                if s.number_of_images != 1:
                    raise value_error(self._name(), f"source_images[{k}].number_of_images", s.number_of_images, "be 1 in the batch forms that return images")
            out: list[MPSImage] = []
            if srcs:
                desc = self.destination_image_descriptor([srcs[0]], None)
                out = list(self._allocator.image_batch_for_command_buffer(cb, desc, self, len(srcs)))
            for s, d in zip(srcs, out):
                self._encode_checked(cb, s, d, st)
            _consume([*srcs, st])
            return out
        if len(dests) != len(srcs):
            raise value_error(self._name(), "destination_images", f"{len(dests)} images", f"match the {len(srcs)} source images")
        for s, d in zip(srcs, dests):
            for other in srcs:
                self._check_no_alias(d, other)
            self._encode_checked(cb, s, d, st)
        _consume([*srcs, st])
        return None

    def _refuse(self, unavailable: dict[str, Any]) -> None:
        if unavailable:
            names = sorted(unavailable)
            if set(names) <= {"destination_state", "destination_states", "destination_state_is_temporary"}:
                raise MPSTypeError(f"{self._name()}: the `destination_state` encode variants are unavailable on this class; "
                                   "make a state with result_state(...) and pass it as `batch_normalization_state`")
            raise MPSTypeError(f"{self._name()}: unexpected argument(s) {names}")

    def _take_state(self, state: Any, cb: MTLCommandBuffer) -> MPSCNNBatchNormalizationState:
        st = self._check_state("batch_normalization_state", state, cb, MPSCNNBatchNormalizationState)
        if st.number_of_feature_channels != self._c:
            raise value_error(self._name(), "batch_normalization_state", f"a state for {st.number_of_feature_channels} channels",
                              f"be made for number_of_feature_channels = {self._c}")
        return st  # type: ignore[no-any-return]

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        c = self._c
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + c],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode, inp.stride_x, inp.stride_y)
        if isinstance(state, MPSCNNBatchNormalizationState):
            gamma, beta, mean, var = state.gamma, state.beta, state.mean, state.variance
        else:
            gamma, beta, mean, var = self._gamma, self._beta, self._mean, self._variance
        scale = gamma * torch.rsqrt(var + self._epsilon)
        shift = beta - mean * scale
        y = backend.batch_norm_inference_nhwc(x, scale, shift, self._neuron(c, self.device), out_dtype=result_dtype(dest),
                                              out=direct_out(dest, region))
        write_result(dest, region, y)


# -- statistics -------------------------------------------------------------------------------------


class MPSCNNBatchNormalizationStatistics(MPSCNNKernel):
    """``MPSCNNBatchNormalizationStatistics``: batch mean and variance into a state.

    Args:
        device: the device (positional, first). No other parameters.

    Encode: ``encode_batch(cb, source_images, batch_normalization_state)`` (and, for one
    possibly multi-image source, ``encode(cb, source_image, batch_normalization_state)``).
    Per channel over every pixel of every image of every source seen since the state's last
    ``reset()`` (calls accumulate; sub-batches merge exactly): ``mean = ΣX/n``,
    ``variance = Σ(X - mean)²/n`` (biased), accumulated in float32, into the state's ``mean`` /
    ``variance``. Channels: the first C of the source's channel window
    (``source_feature_channel_offset``). ``offset`` and ``clip_rect`` must keep their defaults
    (whole images; inferred). The state is written, not read: its ``read_count`` is unchanged.
    ``is_state_modified`` is True.
    """

    _is_state_modified = True
    _result_state_class = None

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)

    def encode(self, command_buffer: MTLCommandBuffer, source_image: MPSImage,  # type: ignore[override]
               batch_normalization_state: MPSCNNBatchNormalizationState | None = None) -> None:
        """``encode(cb, source_image, batch_normalization_state)``: the statistics of all
        images of ``source_image``."""
        self.encode_batch(command_buffer, [source_image], batch_normalization_state)

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage],  # type: ignore[override]
                     batch_normalization_state: MPSCNNBatchNormalizationState | None = None) -> None:
        """``encodeBatchToCommandBuffer:sourceImages:batchNormalizationState:``."""
        cb = self._check_command_buffer(command_buffer)
        if batch_normalization_state is None:
            raise MPSTypeError(f"{self._name()}: `batch_normalization_state` is required")
        st: MPSCNNBatchNormalizationState = self._check_state("batch_normalization_state", batch_normalization_state, cb, MPSCNNBatchNormalizationState)
        if self._offset != MPSOffset(0, 0, 0) or self._clip_rect != MPSRectNoClip:
            raise value_error(self._name(), "offset/clip_rect", f"{self._offset}, {self._clip_rect}",
                              "keep their defaults (statistics are taken over whole images)")
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        c = st.number_of_feature_channels
        for k, s in enumerate(srcs):
            _check_channels(self._name(), f"source_images[{k}]", self.source_channels_used(s), c)
        with cb.encoding(self._name()):
            for s in srcs:
                x = s.tensor[..., self._src_c_off:self._src_c_off + c]
                n = x.shape[0] * x.shape[1] * x.shape[2]
                if n == 0:
                    continue
                mean, var = backend.batch_norm_statistics_nhwc(x)
                mean, var = mean.to(torch.float32), var.to(torch.float32)
                if st._stat_count == 0:
                    st._mean, st._variance = mean, var
                else:
                    st._mean, st._variance = backend.merge_statistics(st._stat_count, st._mean, st._variance, n, mean, var)
                st._stat_count += n
        _consume(srcs)


# -- gradients ------------------------------------------------------------------------------------


class _BatchNormGradientBase(_FusedNeuron, MPSCNNGradientKernel):
    def __init__(self, device: Device | str, fused_neuron_descriptor: MPSNNNeuronDescriptor | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        self._set_fused_neuron(fused_neuron_descriptor)

    def _require_state(self, state: Any) -> MPSCNNBatchNormalizationState:
        if not isinstance(state, MPSCNNBatchNormalizationState):
            raise MPSTypeError(f"{self._name()}: `batch_normalization_state` must be an MPSCNNBatchNormalizationState, "
                               f"but got {type(state).__name__}")
        return state

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        st = self._gradient_state
        c = st.number_of_feature_channels if isinstance(st, MPSCNNBatchNormalizationState) else min(primary_channels, secondary_channels)
        _check_channels(self._name(), "source_gradient", primary_channels, c)
        _check_channels(self._name(), "source_image", secondary_channels, c)
        return c

    def _read_pair(self, prim: MPSImage, pg: InputGeometry, sec: MPSImage, sg: InputGeometry, region: Region, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy = read_window(prim.tensor[pg.n0:pg.n0 + region.count, :, :, pg.c0:pg.c0 + c],
                         pg.window_left, pg.window_top, region.width, region.height, pg.edge_mode, pg.stride_x, pg.stride_y, pg.bounds)
        x = read_window(sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + c],
                        sg.window_left, sg.window_top, region.width, region.height, sg.edge_mode, sg.stride_x, sg.stride_y, sg.bounds)
        return dy, x

    def _statistics(self, st: MPSCNNBatchNormalizationState) -> tuple[torch.Tensor, torch.Tensor, float]:
        eps = st.batch_normalization.epsilon
        return st.mean, st.variance, eps


class MPSCNNBatchNormalizationStatisticsGradient(_BatchNormGradientBase):
    """``MPSCNNBatchNormalizationStatisticsGradient``: accumulates dgamma and dbeta of a batch.

    Args:
        device: the device (positional, first).
        fused_neuron_descriptor: the forward kernel's fused neuron (None: none).

    Encode: ``encode_batch(cb, source_gradients, source_images, batch_normalization_state)``
    (and ``encode(cb, source_gradient, source_image, batch_normalization_state)``) with
    ``source_gradients`` = dL/dY and ``source_images`` = the forward inputs X. Adds, per
    channel, ``ΣG`` and ``ΣG*Xhat`` (``G = dY*f'(Z)``, see the module docstring) over every
    pixel to the state's accumulators, which are complete once every image of the batch went
    through. Pixel ``p`` of X pairs with dY at ``p - forward.offset + forward.clip_rect.origin``
    (dY = 0 where the forward pass wrote nothing). Writes no image; ``is_state_modified``.
    """

    _is_state_modified = True

    def encode(self, command_buffer: MTLCommandBuffer, source_gradient: MPSImage, source_image: MPSImage,  # type: ignore[override]
               batch_normalization_state: MPSCNNBatchNormalizationState | None = None, destination_gradient: None = None) -> None:
        self.encode_batch(command_buffer, [source_gradient], [source_image], batch_normalization_state)

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_gradients: Sequence[MPSImage],  # type: ignore[override]
                     source_images: Sequence[MPSImage], batch_normalization_state: MPSCNNBatchNormalizationState | None = None,
                     destination_gradients: None = None) -> None:
        """``encodeBatchToCommandBuffer:sourceGradients:sourceImages:batchNormalizationState:``."""
        cb = self._check_command_buffer(command_buffer)
        st = self._require_state(batch_normalization_state)
        st = self._check_state("batch_normalization_state", st, cb, MPSCNNBatchNormalizationState)
        if len(source_gradients) != len(source_images):
            raise value_error(self._name(), "source_gradients", f"{len(source_gradients)} images", f"match the {len(source_images)} source_images")
        prims = [self._check_image(f"source_gradients[{k}]", p, cb) for k, p in enumerate(source_gradients)]
        secs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        c = st.number_of_feature_channels
        for prim, sec in zip(prims, secs):
            self._forward, self._gradient_state = None, None
            desc = self.destination_image_descriptor([prim, sec], [st])
            nout = self._result_feature_channels(self._channels_used(prim, self._p_c_off, self._p_c_max, "primary"),
                                                self._channels_used(sec, self._s_c_off, self._s_c_max, "secondary"))
            if (sec.width, sec.height) != (desc.width, desc.height):
                raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}",
                                  f"be the forward source, of size {desc.width}x{desc.height}")
            region = Region(0, desc.number_of_images, 0, 0, desc.width, desc.height, 0, nout)
            pg = self._input_geometry("primary", prim, 0, 0, c)
            sg = self._input_geometry("secondary", sec, 0, 0, c)
            n = region.count * region.width * region.height
            if n == 0:
                continue
            with cb.encoding(self._name()):
                dy, x = self._read_pair(prim, pg, sec, sg, region, c)
                mean, var, eps = self._statistics(st)
                _, dgamma, dbeta = backend.batch_norm_gradient_nhwc(dy, x, mean, var, st.gamma, eps, st.beta, self._neuron(c, self.device),
                                                                    need_dx=False)
                dgamma, dbeta = dgamma.to(torch.float32), dbeta.to(torch.float32)
                if st._grad_count == 0 or st._dgamma_acc is None or st._dbeta_acc is None:
                    st._dgamma_acc, st._dbeta_acc = dgamma, dbeta
                else:
                    st._dgamma_acc, st._dbeta_acc = st._dgamma_acc + dgamma, st._dbeta_acc + dbeta
            st._grad_count += n
        _consume([*prims, *secs, st])


class MPSCNNBatchNormalizationGradient(_BatchNormGradientBase):
    """``MPSCNNBatchNormalizationGradient``: dL/dX of batch normalization (training mode).

    Args:
        device: the device (positional, first).
        fused_neuron_descriptor: the forward kernel's fused neuron (None: none); the same as
            the statistics gradient's.

    Encode: ``encode(cb, source_gradient, source_image, batch_normalization_state[,
    destination_gradient])`` and ``encode_batch(cb, source_gradients, source_images,
    batch_normalization_state[, destination_gradients])`` (one state for the batch; the
    forms without a destination return the result, the size of the forward source). The state
    must have been through :class:`MPSCNNBatchNormalizationStatisticsGradient` for the whole
    batch. ``dX = gamma/sigma * (G - dbeta/n - Xhat*dgamma/n)`` with the state's batch
    statistics (``n`` = pixels they cover), or ``gamma/sigma * G`` when the state holds
    inference statistics. Afterwards the state's ``gradient_for_gamma`` /
    ``gradient_for_beta`` hold dgamma / dbeta. Properties: those of
    :class:`~mpsnn.MPSCNNGradientKernel`.
    """

    def encode(self, command_buffer: MTLCommandBuffer, source_gradient: MPSImage, source_image: MPSImage,  # type: ignore[override]
               batch_normalization_state: MPSCNNBatchNormalizationState | None = None,
               destination_gradient: MPSImage | None = None) -> MPSImage | None:
        st = self._require_state(batch_normalization_state)
        self._check_ready(st)
        return super().encode(command_buffer, source_gradient, source_image, st, destination_gradient)

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_gradients: Sequence[MPSImage],  # type: ignore[override]
                     source_images: Sequence[MPSImage], batch_normalization_state: MPSCNNBatchNormalizationState | None = None,
                     destination_gradients: Sequence[MPSImage] | None = None) -> list[MPSImage] | None:
        st = self._require_state(batch_normalization_state)
        self._check_ready(st)
        return super().encode_batch(command_buffer, source_gradients, source_images, [st] * len(source_gradients), destination_gradients)

    def _check_ready(self, st: MPSCNNBatchNormalizationState) -> None:
        if st._grad_count == 0:
            raise MPSStateError(f"{self._name()}: `batch_normalization_state` has no accumulated gradients: encode "
                                "MPSCNNBatchNormalizationStatisticsGradient over the whole batch first")
        if st._stat_count and st._grad_count != st._stat_count:
            raise MPSStateError(f"{self._name()}: `batch_normalization_state` holds gradients of {st._grad_count} pixels per channel "
                                f"but statistics of {st._stat_count}: the statistics gradient must see the whole batch the "
                                "statistics were computed over")

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        st = self._gradient_state
        assert isinstance(st, MPSCNNBatchNormalizationState)
        c = region.channels
        dy, x = self._read_pair(prim, pg, sec, sg, region, c)
        mean, var, eps = self._statistics(st)
        dgamma, dbeta = st._dgamma_acc, st._dbeta_acc
        assert dgamma is not None and dbeta is not None
        n = st._stat_count or st._grad_count
        dx, _, _ = backend.batch_norm_gradient_nhwc(dy, x, mean, var, st.gamma, eps, st.beta, self._neuron(c, self.device),
                                                    totals=(dgamma, dbeta, n), constant_statistics=st._stat_count == 0,
                                                    out_dtype=result_dtype(dest), out=direct_out(dest, region))
        assert dx is not None
        write_result(dest, region, dx)
        st._dgamma, st._dbeta = dgamma, dbeta
