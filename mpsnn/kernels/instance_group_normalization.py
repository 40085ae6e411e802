"""Instance and group normalization: MPSCNNInstanceNormalization, MPSCNNGroupNormalization,
their data sources, gradients and gradient states (spec/normalization.md §4-5).

Math, for each image ``n`` and group ``g`` (instance normalization: one group per channel),
over the ``m = (C/G)·h·w`` values of the group in the region read (numerics in
:mod:`mpsnn.backends.instance_group_normalization`)::

    mu   = (1/m) Σ x                 var = (1/m) Σ (x − mu)²   (biased, inferred)
    y    = (x − mu) · gamma[k] / sqrt(var + epsilon) + beta[k]            (k = channel)
    gradient, xhat = (x − mu)/sqrt(var + epsilon), h = gamma[k]·dy:
    dbeta[k]  = Σ_{y,x} dy     dgamma[k] = Σ_{y,x} dy·xhat                (per image, into the state)
    dx = (h − mean_g(h) − xhat · mean_g(h·xhat)) / sqrt(var + epsilon)    (exact derivative)

Group ``g`` holds the consecutive channels ``[g·C/G, (g+1)·C/G)``; ``G = 1`` is layer
normalization over (C, H, W), ``G = C`` instance normalization.

Decisions (``(inferred)`` where the spec is silent):

* Statistics and arithmetic are float32 whatever the image format (float64 images: float64);
  the result is rounded once on store.
* The statistics cover the pixels the encode reads: the source window of the region written
  (``offset``, ``clip_rect``), normally the whole image (normalization.md §1, inferred).
  Off-image reads (only with a non-zero ``offset`` or a clip larger than the source) follow
  ``edge_mode`` and count in the statistics.
* Channels: the kernel reads exactly ``C = number_of_feature_channels()`` source channels from
  ``source_feature_channel_offset`` (the source must supply them, as a convolution's input)
  and writes ``C`` channels from ``destination_feature_channel_offset``.
* ``epsilon`` is copied from the data source at init (``FLT_MIN`` when it does not implement
  ``epsilon()``) and is a read-write float32 property, ``>= 0`` and finite (inferred).
* gamma/beta: the data source's ``beta()`` may return None (= 0, as batch norm allows;
  inferred). Data source arrays are read once (``load()`` first when present; a False refuses
  the kernel; ``purge()`` after). The kernel never changes its gamma/beta tensors in place,
  so a gradient state keeps the values its forward encode used.
* Gradient states are per encode (per image of a batch): they record gamma, beta and the
  forward statistics; the gradient kernel writes ``gradient_for_gamma`` / ``gradient_for_beta``
  (float32, ``C`` values) as the sum over the images of its encode, overwriting earlier
  values (inferred: Apple gives one state per image). Until then they read 0.
* The gradient kernels require the forward encode's gradient state (it holds gamma and the
  statistics); their result has the forward source's size; pixels the forward pass did not
  read get 0; with edge mode clamp the gradients of off-image reads go to the edge pixels
  they replicated (the exact adjoint). The incoming gradient is read in the forward
  destination's coordinates (the forward region, channels from the forward
  ``destination_feature_channel_offset``).
* ``number_of_groups`` is read from the group data source at init and by
  ``reload_gamma_and_beta_from_data_source`` (inferred: the protocol makes it read-write).
  ``G`` must divide ``C``.
* ``initWithCoder:`` / NSSecureCoding are not provided (no coder in mpsnn).
"""
from __future__ import annotations

import abc
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.instance_group_normalization import group_normalization_gradient_nhwc, group_normalization_nhwc, window_adjoint
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageEdgeMode
from ..core.errors import MPSStateError, MPSTypeError, MPSValueError, value_error
from ..core.host_arrays import float32_array
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..images.image import MPSImage
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from .batch_normalization import FLT_MIN, MPSCNNNormalizationGammaAndBetaState
from .results import write_result

__all__ = [
    "FLT_MIN",
    "GroupNormalizationDataSource",
    "InstanceNormalizationDataSource",
    "MPSCNNGroupNormalization",
    "MPSCNNGroupNormalizationDataSource",
    "MPSCNNGroupNormalizationGradient",
    "MPSCNNGroupNormalizationGradientState",
    "MPSCNNInstanceNormalization",
    "MPSCNNInstanceNormalizationDataSource",
    "MPSCNNInstanceNormalizationGradient",
    "MPSCNNInstanceNormalizationGradientState",
]

# -- validation ------------------------------------------------------------------------------------


def check_epsilon(owner: str, value: Any) -> float:
    """``epsilon`` as float32: a finite real number >= 0 (inferred rule)."""
    if isinstance(value, bool):
        raise value_error(owner, "epsilon", value, "be a finite real number >= 0")
    try:
        v = float(np.float32(float(value)))
    except (TypeError, ValueError):
        raise value_error(owner, "epsilon", value, "be a finite real number >= 0") from None
    if not math.isfinite(v) or v < 0:
        raise value_error(owner, "epsilon", value, "be a finite real number >= 0")
    return v


def check_groups(owner: str, groups: Any, channels: int) -> int:
    """``number_of_groups``: an integer >= 1 that divides the channel count."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or int(groups) < 1:
        raise value_error(owner, "data_source.number_of_groups", groups, "be an integer >= 1")
    if channels % int(groups):
        raise value_error(owner, "data_source.number_of_groups", groups,
                          f"divide number_of_feature_channels={channels} (each group holds C/G consecutive channels)")
    return int(groups)


def _channel_count(owner: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, "data_source.number_of_feature_channels()", value, "be an integer >= 1")
    return int(value)


def _vector(owner: str, name: str, value: Any, count: int, default: float | None = None) -> np.ndarray:
    if value is None:
        if default is None:
            raise value_error(owner, name, None, f"hold {count} float32 values")
        return np.full(count, default, np.float32)
    arr = float32_array(owner, name, value)
    if arr.size != count:
        raise value_error(owner, name, f"{arr.size} values", f"hold number_of_feature_channels={count} values")
    return arr


def _device_vector(owner: str, name: str, value: Any, count: int, device: torch.device) -> torch.Tensor:
    """A state buffer (tensor) as a float32 ``[count]`` tensor on ``device`` (no host copy)."""
    if not isinstance(value, torch.Tensor):
        return torch.from_numpy(_vector(owner, name, value, count)).to(device)
    if value.numel() != count:
        raise value_error(owner, name, f"{value.numel()} values", f"hold number_of_feature_channels={count} values")
    return value.detach().reshape(-1).to(device=device, dtype=torch.float32).clone()


# -- data-source protocols ------------------------------------------------------------------------------


class MPSCNNInstanceNormalizationDataSource(abc.ABC):
    """Protocol ``MPSCNNInstanceNormalizationDataSource``: supplies an instance normalization's
    scale and bias.

    Required: ``gamma()`` and ``beta()`` (``C`` float32 values each: NumPy array, torch tensor,
    bytes or sequence; ``beta()`` may return None for 0), ``number_of_feature_channels()``
    (``C``), ``label()`` (str or None; copied to the kernel's label).

    Optional (defaults in brackets): ``epsilon()`` [``FLT_MIN``]; ``load()`` [True] and
    ``purge()`` [no-op], called around every read of the arrays;
    ``update_gamma_and_beta_with_command_buffer(command_buffer,
    instance_normalization_state_batch)`` [None] — GPU-side training update from a list of
    :class:`MPSCNNInstanceNormalizationGradientState` (one per image): accumulate their
    gradients, update, decrement the read count of temporary states, and return an
    ``MPSCNNNormalizationGammaAndBetaState`` with the new values (None: no update) for
    :meth:`MPSCNNInstanceNormalization.reload_gamma_and_beta_with_command_buffer`;
    ``update_gamma_and_beta_with_instance_normalization_state_batch(batch)`` [False] — the CPU
    form, True when the data source now holds new values (then call
    ``reload_gamma_and_beta_from_data_source``); ``copy(device=None)`` [self].
    """

    @abc.abstractmethod
    def gamma(self) -> Any: ...

    @abc.abstractmethod
    def beta(self) -> Any: ...

    @abc.abstractmethod
    def number_of_feature_channels(self) -> int: ...

    @abc.abstractmethod
    def label(self) -> str | None: ...

    def epsilon(self) -> float:
        return FLT_MIN

    def load(self) -> bool:
        return True

    def purge(self) -> None:
        return None

    def update_gamma_and_beta_with_command_buffer(self, command_buffer: MTLCommandBuffer,
                                                  instance_normalization_state_batch: Sequence["MPSCNNInstanceNormalizationGradientState"]) -> Any:
        return None

    def update_gamma_and_beta_with_instance_normalization_state_batch(
            self, instance_normalization_state_batch: Sequence["MPSCNNInstanceNormalizationGradientState"]) -> bool:
        return False

    def copy(self, device: Device | None = None) -> "MPSCNNInstanceNormalizationDataSource":
        return self


class MPSCNNGroupNormalizationDataSource(abc.ABC):
    """Protocol ``MPSCNNGroupNormalizationDataSource``: supplies a group normalization's scale,
    bias and number of groups.

    Required: ``gamma()``, ``beta()`` (``C`` values each; ``beta()`` may return None for 0),
    ``number_of_feature_channels()``, ``label()``, and the **read-write** property
    ``number_of_groups`` (``G``, must divide ``C``).

    Optional: ``epsilon()`` [``FLT_MIN``];
    ``update_gamma_and_beta_with_command_buffer(command_buffer, group_normalization_state_batch)``
    [None] and ``update_gamma_and_beta_with_group_normalization_state_batch(batch)`` [False]
    (as in :class:`MPSCNNInstanceNormalizationDataSource`, with
    :class:`MPSCNNGroupNormalizationGradientState` s); ``copy(device=None)`` [self]. The
    protocol has no ``load``/``purge`` (a subclass may still define them; they are called).
    """

    @abc.abstractmethod
    def gamma(self) -> Any: ...

    @abc.abstractmethod
    def beta(self) -> Any: ...

    @abc.abstractmethod
    def number_of_feature_channels(self) -> int: ...

    @abc.abstractmethod
    def label(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def number_of_groups(self) -> int: ...

    @number_of_groups.setter
    @abc.abstractmethod
    def number_of_groups(self, value: int) -> None: ...

    def epsilon(self) -> float:
        return FLT_MIN

    def update_gamma_and_beta_with_command_buffer(self, command_buffer: MTLCommandBuffer,
                                                  group_normalization_state_batch: Sequence["MPSCNNGroupNormalizationGradientState"]) -> Any:
        return None

    def update_gamma_and_beta_with_group_normalization_state_batch(
            self, group_normalization_state_batch: Sequence["MPSCNNGroupNormalizationGradientState"]) -> bool:
        return False

    def copy(self, device: Device | None = None) -> "MPSCNNGroupNormalizationDataSource":
        return self


class _ReadyMadeSource:
    """gamma/beta storage and the plain-SGD update of the ready-made data sources."""

    _owner = ""
    _state_cls: type

    def _init_source(self, gamma: Any, beta: Any, epsilon: float, label: str | None, learning_rate: float | None) -> None:
        g = float32_array(self._owner, "gamma", gamma)
        if g.size < 1:
            raise value_error(self._owner, "gamma", "0 values", "hold one value per feature channel (at least 1)")
        self._gamma: np.ndarray | torch.Tensor = g
        self._beta: np.ndarray | torch.Tensor = _vector(self._owner, "beta", beta, g.size, default=0.0)
        self._channels = int(g.size)
        self._epsilon = check_epsilon(self._owner, epsilon)
        self._label = label
        if learning_rate is not None:
            lr = float(learning_rate)
            if not math.isfinite(lr):
                raise value_error(self._owner, "learning_rate", learning_rate, "be a finite real number or None")
            learning_rate = lr
        self.learning_rate = learning_rate
        self.load_count = 0
        self.purge_count = 0

    def gamma(self) -> np.ndarray:
        return float32_array(self._owner, "gamma", self._gamma)

    def beta(self) -> np.ndarray:
        return float32_array(self._owner, "beta", self._beta)

    def number_of_feature_channels(self) -> int:
        return self._channels

    def label(self) -> str | None:
        return self._label

    def epsilon(self) -> float:
        return self._epsilon

    def load(self) -> bool:
        self.load_count += 1
        return True

    def purge(self) -> None:
        self.purge_count += 1

    def set_gamma_and_beta(self, gamma: Any, beta: Any = None) -> None:
        """Replace the values (then call ``reload_gamma_and_beta_from_data_source`` on the kernels)."""
        self._gamma = _vector(self._owner, "gamma", gamma, self._channels)
        self._beta = _vector(self._owner, "beta", beta, self._channels, default=0.0)

    def _summed_gradients(self, name: str, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[int, Any] = {}
        for k, st in enumerate(batch):
            if not isinstance(st, self._state_cls):
                raise MPSTypeError(f"{self._owner}: `{name}[{k}]` must be an {self._state_cls.__name__}, but got {type(st).__name__}")
            seen.setdefault(id(st), st)
        if not seen:
            raise value_error(self._owner, name, "[]", "hold at least one gradient state")
        states = list(seen.values())
        dg = states[0].gradient_for_gamma.clone()
        db = states[0].gradient_for_beta.clone()
        for st in states[1:]:
            dg += st.gradient_for_gamma.to(dg.device)
            db += st.gradient_for_beta.to(db.device)
        for st in states:
            if st.is_temporary:
                st.consume_read()
        return dg, db

    def _gpu_update(self, command_buffer: MTLCommandBuffer, name: str, batch: Sequence[Any]) -> Any:
        if self.learning_rate is None:
            return None
        with command_buffer.encoding(self._owner):
            dg, db = self._summed_gradients(name, batch)
            g = torch.as_tensor(self._gamma, dtype=torch.float32).to(dg.device) - self.learning_rate * dg
            b = torch.as_tensor(self._beta, dtype=torch.float32).to(db.device) - self.learning_rate * db
        self._gamma, self._beta = g, b
        return MPSCNNNormalizationGammaAndBetaState(gamma=g, beta=b)

    def _cpu_update(self, name: str, batch: Sequence[Any]) -> bool:
        if self.learning_rate is None:
            return False
        dg, db = self._summed_gradients(name, batch)
        self._gamma = self.gamma() - self.learning_rate * dg.cpu().numpy()
        self._beta = self.beta() - self.learning_rate * db.cpu().numpy()
        return True


class InstanceNormalizationDataSource(_ReadyMadeSource, MPSCNNInstanceNormalizationDataSource):
    """A ready-made :class:`MPSCNNInstanceNormalizationDataSource` over arrays or tensors (mpsnn).

    Args:
        gamma: ``C`` scale values (array, tensor, bytes or sequence); ``C`` is its length.
        beta: ``C`` bias values, or None for 0.
        epsilon: the stability term (default ``FLT_MIN``, the protocol's default).
        label: the layer's label.
        learning_rate: None (default): the update hooks do nothing (return None / False).
            A float: both hooks apply plain SGD, ``gamma -= learning_rate · Σ gradient_for_gamma``
            (and beta) with the sum over the unique states of the batch; the GPU hook returns a
            gamma/beta state for ``reload_gamma_and_beta_with_command_buffer`` and keeps the new
            values as its own, the CPU hook stores them (then reload from the data source).

    ``set_gamma_and_beta(gamma, beta)`` replaces the values; ``load_count`` / ``purge_count``
    count the calls.
    """

    _owner = "InstanceNormalizationDataSource"

    def __init__(self, gamma: Any, beta: Any = None, *, epsilon: float = FLT_MIN, label: str | None = None,
                 learning_rate: float | None = None) -> None:
        self._state_cls = MPSCNNInstanceNormalizationGradientState
        self._init_source(gamma, beta, epsilon, label, learning_rate)

    def update_gamma_and_beta_with_command_buffer(self, command_buffer, instance_normalization_state_batch):  # type: ignore[no-untyped-def]
        return self._gpu_update(command_buffer, "instance_normalization_state_batch", instance_normalization_state_batch)

    def update_gamma_and_beta_with_instance_normalization_state_batch(self, instance_normalization_state_batch):  # type: ignore[no-untyped-def]
        return self._cpu_update("instance_normalization_state_batch", instance_normalization_state_batch)

    def copy(self, device: Device | None = None) -> "InstanceNormalizationDataSource":
        return InstanceNormalizationDataSource(self.gamma(), self.beta(), epsilon=self._epsilon, label=self._label,
                                               learning_rate=self.learning_rate)


class GroupNormalizationDataSource(_ReadyMadeSource, MPSCNNGroupNormalizationDataSource):
    """A ready-made :class:`MPSCNNGroupNormalizationDataSource` over arrays or tensors (mpsnn).

    Args:
        gamma, beta, epsilon, label, learning_rate: as :class:`InstanceNormalizationDataSource`.
        number_of_groups: ``G`` (default 1, layer normalization); read-write, must divide ``C``.
    """

    _owner = "GroupNormalizationDataSource"

    def __init__(self, gamma: Any, beta: Any = None, number_of_groups: int = 1, *, epsilon: float = FLT_MIN,
                 label: str | None = None, learning_rate: float | None = None) -> None:
        self._state_cls = MPSCNNGroupNormalizationGradientState
        self._init_source(gamma, beta, epsilon, label, learning_rate)
        self.number_of_groups = number_of_groups

    @property
    def number_of_groups(self) -> int:
        return self._groups

    @number_of_groups.setter
    def number_of_groups(self, value: int) -> None:
        self._groups = check_groups(self._owner, value, self._channels)

    def update_gamma_and_beta_with_command_buffer(self, command_buffer, group_normalization_state_batch):  # type: ignore[no-untyped-def]
        return self._gpu_update(command_buffer, "group_normalization_state_batch", group_normalization_state_batch)

    def update_gamma_and_beta_with_group_normalization_state_batch(self, group_normalization_state_batch):  # type: ignore[no-untyped-def]
        return self._cpu_update("group_normalization_state_batch", group_normalization_state_batch)

    def copy(self, device: Device | None = None) -> "GroupNormalizationDataSource":
        return GroupNormalizationDataSource(self.gamma(), self.beta(), self._groups, epsilon=self._epsilon, label=self._label,
                                            learning_rate=self.learning_rate)


# -- gradient states ----------------------------------------------------------------------------------------


class _NormalizationGradientState(MPSNNGradientState):
    """What a forward instance/group normalization hands its gradient kernel."""

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None, kernel: Any) -> None:
        super().__init__(geometry, device, command_buffer)
        self._kernel = kernel
        self._channels: int = kernel._channels
        self._groups: int = kernel._groups
        self._gamma: torch.Tensor | None = kernel._gamma
        self._beta: torch.Tensor | None = kernel._beta
        self._mean: torch.Tensor | None = None     # [N, G] forward statistics, set by the forward encode
        self._rstd: torch.Tensor | None = None
        self._dgamma: torch.Tensor | None = None
        self._dbeta: torch.Tensor | None = None
        self._released = False

    def _release(self) -> None:
        super()._release()
        self._gamma = self._beta = self._mean = self._rstd = self._dgamma = self._dbeta = None
        self._released = True

    def _live(self) -> None:
        if self._released:
            raise MPSStateError(f"{self._name()}: its storage was released (a temporary state whose `read_count` reached 0)")

    @property
    def gamma(self) -> torch.Tensor:
        """float32 ``[C]``: the scale the forward encode used (the kernel's at creation before it)."""
        self._live()
        assert self._gamma is not None
        return self._gamma

    @property
    def beta(self) -> torch.Tensor:
        """float32 ``[C]``: the bias the forward encode used."""
        self._live()
        assert self._beta is not None
        return self._beta

    def _gradient(self, which: str) -> torch.Tensor:
        self._live()
        t = self._dgamma if which == "gamma" else self._dbeta
        if t is None:
            t = torch.zeros(self._channels, dtype=torch.float32, device=self.device.torch_device)
            if which == "gamma":
                self._dgamma = t
            else:
                self._dbeta = t
        return t

    @property
    def gradient_for_gamma(self) -> torch.Tensor:
        """float32 ``[C]``: dL/dgamma summed over the images of the gradient encode (0 before it)."""
        return self._gradient("gamma")

    @property
    def gradient_for_beta(self) -> torch.Tensor:
        """float32 ``[C]``: dL/dbeta summed over the images of the gradient encode (0 before it)."""
        return self._gradient("beta")

    def _statistics(self, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._live()
        if self._mean is None or self._rstd is None:
            raise MPSStateError(f"{owner}: {self._name()} holds no statistics yet: encode the forward "
                                f"{type(self._kernel).__name__} with it first (`destination_state=`)")
        return self._mean, self._rstd

    def resource_size(self) -> int:
        n = self.geometry.source_number_of_images
        return 4 * (4 * self._channels + 2 * n * self._groups)


class MPSCNNInstanceNormalizationGradientState(_NormalizationGradientState):
    """``MPSCNNInstanceNormalizationGradientState``: what :class:`MPSCNNInstanceNormalization`
    hands :class:`MPSCNNInstanceNormalizationGradient`.

    Made by the forward kernel's ``result_state`` / ``temporary_result_state`` (and batch forms)
    or an encode returning a state; the forward encode fills it. Read-only properties:
    ``instance_normalization`` (the creator), ``gamma``, ``beta`` (float32 ``[C]`` tensors: the
    values the forward encode used), ``gradient_for_gamma``, ``gradient_for_beta`` (float32
    ``[C]`` tensors written by the gradient encode: sums over its images; 0 before it). Reading
    any of them after a temporary state was released raises :class:`~mpsnn.MPSStateError`.
    """

    @property
    def instance_normalization(self) -> "MPSCNNInstanceNormalization":
        return self._kernel


class MPSCNNGroupNormalizationGradientState(_NormalizationGradientState):
    """``MPSCNNGroupNormalizationGradientState``: what :class:`MPSCNNGroupNormalization` hands
    :class:`MPSCNNGroupNormalizationGradient`. Read-only properties: ``group_normalization``
    (the creator), ``gamma``, ``beta``, ``gradient_for_gamma``, ``gradient_for_beta``
    (as :class:`MPSCNNInstanceNormalizationGradientState`)."""

    @property
    def group_normalization(self) -> "MPSCNNGroupNormalization":
        return self._kernel


# -- forward kernels ---------------------------------------------------------------------------------------------



class _NormalizationForward(MPSCNNKernel):
    _protocol: type = abc.ABC
    _state_cls: type = _NormalizationGradientState
    _channels: int
    _groups: int
    _gamma: torch.Tensor
    _beta: torch.Tensor

    def __init__(self, device: Device | str, data_source: Any) -> None:
        super().__init__(device)
        if not isinstance(data_source, self._protocol):
            raise MPSTypeError(f"{type(self).__name__}: `data_source` must be an {self._protocol.__name__}, but got {type(data_source).__name__}")
        ds: Any = data_source
        self._data_source = ds
        self._load(ds, check_channels=False)
        self._epsilon = check_epsilon(type(self).__name__, ds.epsilon())
        lbl = ds.label()
        if lbl is not None:
            self.label = lbl

    def _read_groups(self, ds: Any, channels: int) -> int:
        return channels

    def _load(self, ds: Any, check_channels: bool) -> None:
        """Read C, gamma, beta and G from ``ds``, bracketed by ``load()`` / ``purge()``; with
        ``check_channels`` C must stay the kernel's."""
        owner = type(self).__name__
        load = getattr(ds, "load", None)
        if load is not None and not load():
            raise MPSValueError(f"{owner}: `data_source.load()` returned False: the data source could not provide its data")
        try:
            c = _channel_count(owner, ds.number_of_feature_channels())
            gamma = _vector(owner, "data_source.gamma()", ds.gamma(), c)
            beta = _vector(owner, "data_source.beta()", ds.beta(), c, default=0.0)
            g = self._read_groups(ds, c)
            if check_channels and c != self._channels:
                raise value_error(owner, "data_source.number_of_feature_channels()", c, f"stay {self._channels} (the kernel's channel count)")
        finally:
            purge = getattr(ds, "purge", None)
            if purge is not None:
                purge()
        dev = self.device.torch_device
        self._channels, self._groups = c, g
        self._gamma = torch.from_numpy(gamma).to(dev)
        self._beta = torch.from_numpy(beta).to(dev)

    def copy(self, device: Device | str | None = None) -> "_NormalizationForward":
        """``copyWithZone:device:``: an independent kernel sharing the data source (not copied)."""
        new = super().copy(device)
        new._data_source = self._data_source  # type: ignore[attr-defined]
        return new  # type: ignore[return-value]

    def _moved_to_device(self) -> None:
        dev = self.device.torch_device
        self._gamma, self._beta = self._gamma.to(dev), self._beta.to(dev)

    # -- Apple's properties and reload methods ------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = check_epsilon(self._name(), value)

    @property
    def data_source(self) -> Any:
        return self._data_source

    def reload_gamma_and_beta_from_data_source(self) -> None:
        """``reloadGammaAndBetaFromDataSource``: re-read gamma and beta (group normalization:
        and ``number_of_groups``) from the data source; ``C`` must not change."""
        self._load(self._data_source, check_channels=True)

    def reload_gamma_and_beta_with_command_buffer(self, command_buffer: MTLCommandBuffer, gamma_and_beta_state: Any) -> None:
        """``reloadGammaAndBetaWithCommandBuffer:gammaAndBetaState:``: take gamma and beta
        (float32 ``[C]`` tensors, the state's ``gamma`` / ``beta``) as part of
        ``command_buffer`` (a device-side copy); decrements a temporary state's read count."""
        cb = self._check_command_buffer(command_buffer)
        owner = self._name()
        if not isinstance(gamma_and_beta_state, MPSState) or not hasattr(gamma_and_beta_state, "gamma") or not hasattr(gamma_and_beta_state, "beta"):
            raise MPSTypeError(f"{owner}: `gamma_and_beta_state` must be an MPSCNNNormalizationGammaAndBetaState, "
                               f"but got {type(gamma_and_beta_state).__name__}")
        gamma_and_beta_state.check_usable(owner, cb)
        dev = self.device.torch_device
        with cb.encoding(owner):
            gamma = _device_vector(owner, "gamma_and_beta_state.gamma", gamma_and_beta_state.gamma, self._channels, dev)
            beta = (torch.zeros_like(gamma) if gamma_and_beta_state.beta is None
                    else _device_vector(owner, "gamma_and_beta_state.beta", gamma_and_beta_state.beta, self._channels, dev))
        self._gamma, self._beta = gamma, beta
        if gamma_and_beta_state.is_temporary:
            gamma_and_beta_state.consume_read()

    #: Swift's ``reloadGammaAndBeta(with:gammaAndBetaState:)``
    reload_gamma_and_beta = reload_gamma_and_beta_with_command_buffer

    # -- sizes and states -----------------------------------------------------------------------------
    def source_channels_used(self, source: MPSImage) -> int:
        n = super().source_channels_used(source)
        if n < self._channels:
            raise value_error(self._name(), "source_image.feature_channels", source.feature_channels,
                              f"supply number_of_feature_channels={self._channels} channels from "
                              f"source_feature_channel_offset={self._src_c_off}", f"{n} channels")
        return self._channels

    def _result_feature_channels(self, source_channels: int) -> int:
        return self._channels

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        return self._state_cls(self._geometry(source, dest), self.device, command_buffer, self)

    # -- encode ------------------------------------------------------------------------------------------------
    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        if state is not None and not isinstance(state, self._state_cls):
            raise MPSTypeError(f"{self._name()}: `destination_state` must be an {self._state_cls.__name__}, but got {type(state).__name__}")
        super()._encode_checked(cb, src, dest, state)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode, inp.stride_x, inp.stride_y)
        y, mean, rstd = group_normalization_nhwc(x, self._gamma, self._beta, self._groups, self._epsilon)
        write_result(dest, region, y)
        if isinstance(state, _NormalizationGradientState):
            state._gamma, state._beta = self._gamma, self._beta
            state._channels, state._groups = self._channels, self._groups
            state._mean, state._rstd = mean, rstd
            state._dgamma = state._dbeta = None


class MPSCNNInstanceNormalization(_NormalizationForward):
    """``MPSCNNInstanceNormalization``: normalizes each feature channel of each image over its
    pixels, then scales and shifts: ``y = (x − mu)·gamma[k]/sqrt(var + epsilon) + beta[k]``.

    Args:
        device: the device (positional, first).
        data_source: an :class:`MPSCNNInstanceNormalizationDataSource` (e.g.
            :class:`InstanceNormalizationDataSource`); required (``initWithDevice:dataSource:``;
            ``initWithDevice:`` is unavailable).

    Properties: ``epsilon`` (read-write float32, default the data source's ``epsilon()`` or
    ``FLT_MIN``), ``data_source`` (read-only), plus those of :class:`~mpsnn.MPSCNNKernel`.
    Shape: the source must supply ``C = number_of_feature_channels()`` channels from
    ``source_feature_channel_offset``; the result has ``C`` channels and the region's size.
    Math and conventions: module docstring (statistics over the pixels read, float32).

    Methods: ``reload_data_source(data_source)`` (adopt a new data source and read its gamma,
    beta; ``C`` may change), ``reload_gamma_and_beta_from_data_source()``,
    ``reload_gamma_and_beta_with_command_buffer(command_buffer, gamma_and_beta_state)``.

    Encode forms (inherited): ``encode(cb, source_image[, destination_image])``,
    ``encode(cb, source_image, destination_image, destination_state=state)``,
    ``encode(cb, source_image, destination_state_is_temporary=flag) -> (image, state)``,
    ``encode_batch`` with the same options; ``result_state`` / ``temporary_result_state`` (and
    batch forms) make :class:`MPSCNNInstanceNormalizationGradientState` s (one per image).

    Example::

        ds = InstanceNormalizationDataSource(gamma=np.ones(8), beta=np.zeros(8))
        y = MPSCNNInstanceNormalization(device, data_source=ds).encode(command_buffer, x)
    """

    _protocol = MPSCNNInstanceNormalizationDataSource
    _state_cls = MPSCNNInstanceNormalizationGradientState

    def __init__(self, device: Device | str, data_source: MPSCNNInstanceNormalizationDataSource | None = None) -> None:
        super().__init__(device, data_source)

    def reload_data_source(self, data_source: MPSCNNInstanceNormalizationDataSource) -> None:
        """``reloadDataSource:``: adopt ``data_source`` and read gamma and beta from it
        (``epsilon`` keeps its current value; inferred)."""
        if not isinstance(data_source, MPSCNNInstanceNormalizationDataSource):
            raise MPSTypeError(f"{self._name()}: `data_source` must be an MPSCNNInstanceNormalizationDataSource, "
                               f"but got {type(data_source).__name__}")
        self._load(data_source, check_channels=False)
        self._data_source = data_source


class MPSCNNGroupNormalization(_NormalizationForward):
    """``MPSCNNGroupNormalization``: normalizes each group of ``C/G`` consecutive channels of
    each image over all its pixels and channels, then scales and shifts per channel.

    Args:
        device: the device (positional, first).
        data_source: an :class:`MPSCNNGroupNormalizationDataSource` (e.g.
            :class:`GroupNormalizationDataSource`); required (``initWithDevice:dataSource:``).

    Properties: ``epsilon`` (read-write, default from the data source or ``FLT_MIN``),
    ``data_source`` (read-only), ``number_of_groups`` (read-only Python extension: the ``G``
    read from the data source), plus those of :class:`~mpsnn.MPSCNNKernel`. ``G`` must divide
    ``C`` (:class:`~mpsnn.MPSValueError` otherwise). Shapes as
    :class:`MPSCNNInstanceNormalization`.

    Methods: ``reload_gamma_and_beta_from_data_source()`` (also re-reads
    ``number_of_groups``), ``reload_gamma_and_beta_with_command_buffer(command_buffer,
    gamma_and_beta_state)``. No ``reload_data_source`` (as in Apple's API).

    Encode forms as :class:`MPSCNNInstanceNormalization`; states are
    :class:`MPSCNNGroupNormalizationGradientState` s.
    """

    _protocol = MPSCNNGroupNormalizationDataSource
    _state_cls = MPSCNNGroupNormalizationGradientState

    def __init__(self, device: Device | str, data_source: MPSCNNGroupNormalizationDataSource | None = None) -> None:
        super().__init__(device, data_source)

    def _read_groups(self, ds: Any, channels: int) -> int:
        return check_groups(type(self).__name__, ds.number_of_groups, channels)

    @property
    def number_of_groups(self) -> int:
        return self._groups


# -- gradient kernels ----------------------------------------------------------------------------------------------


class _NormalizationGradient(MPSCNNGradientKernel):
    _state_cls: type = _NormalizationGradientState

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)

    _gradient_states_required = "the forward states hold gamma and the statistics; entry k uses gradient_states[k]"

    def _check_gradient_state(self, name: str, state: Any) -> None:
        if not isinstance(state, self._state_cls):
            raise MPSTypeError(f"{self._name()}: `{name}` must be the {self._state_cls.__name__} of the forward encode "
                               f"(it holds gamma and the statistics), but got {type(state).__name__}")

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        super().apply_forward_geometry(g)
        st = self._gradient_state
        if isinstance(st, _NormalizationGradientState):
            self._p_c_max = self._s_c_max = st._channels

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        st = self._gradient_state
        c = st._channels if isinstance(st, _NormalizationGradientState) else primary_channels
        for which, n in (("source_gradient", primary_channels), ("source_image", secondary_channels)):
            if n < c:
                raise value_error(self._name(), which, f"{n} channels used", f"supply the forward pass's {c} channels")
        return c

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        st = self._gradient_state
        g = self._forward
        assert isinstance(st, _NormalizationGradientState) and g is not None  # checked in encode / encode_batch
        mean, rstd = st._statistics(self._name())
        c, groups = st._channels, st._groups
        count = region.count
        # the forward region R (destination coordinates) and its source window
        fx0, fy0 = g.clip_rect.origin.x, g.clip_rect.origin.y
        fx1 = min(fx0 + g.clip_rect.size.width, g.destination_width)
        fy1 = min(fy0 + g.clip_rect.size.height, g.destination_height)
        fw, fh = fx1 - fx0, fy1 - fy0
        if prim.width < fx1 or prim.height < fy1:
            raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}",
                              f"cover the forward destination region up to ({fx1}, {fy1})")
        if (sec.width, sec.height) != (g.source_width, g.source_height):
            raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}",
                              f"be the forward source, of size {g.source_width}x{g.source_height}")
        if mean.shape[0] < pg.n0 + count:
            raise value_error(self._name(), "gradient_state", f"statistics of {mean.shape[0]} images",
                              f"cover the {pg.n0 + count} images of this encode")
        dy = prim.tensor[pg.n0:pg.n0 + count, fy0:fy1, fx0:fx1, pg.c0:pg.c0 + c]
        x = read_window(sec.tensor[sg.n0:sg.n0 + count, :, :, sg.c0:sg.c0 + c], g.offset.x, g.offset.y, fw, fh, g.edge_mode)
        gamma = st.gamma
        dxw, dgamma, dbeta = group_normalization_gradient_nhwc(dy, x, gamma, groups, mean[pg.n0:pg.n0 + count], rstd[pg.n0:pg.n0 + count])
        st._dgamma = dgamma.sum(dim=0).to(torch.float32)
        st._dbeta = dbeta.sum(dim=0).to(torch.float32)
        full = window_adjoint(dxw, g.source_height, g.source_width, g.offset.x, g.offset.y, g.edge_mode == MPSImageEdgeMode.clamp)
        pad_w = max(0, region.x0 + region.width - g.source_width)
        pad_h = max(0, region.y0 + region.height - g.source_height)
        if pad_w or pad_h:
            full = F.pad(full, (0, 0, 0, pad_w, 0, pad_h))
        write_result(dest, region, full[:, region.y0:region.y0 + region.height, region.x0:region.x0 + region.width, :])


class MPSCNNInstanceNormalizationGradient(_NormalizationGradient):
    """``MPSCNNInstanceNormalizationGradient``: dL/dx, dL/dgamma and dL/dbeta of
    :class:`MPSCNNInstanceNormalization` (exact derivatives; module docstring).

    Args:
        device: the device (positional, first). No other parameters (``initWithDevice:``).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[, destination_gradient])``
    and ``encode_batch(cb, source_gradients, source_images, gradient_states[,
    destination_gradients])``: ``source_gradient`` = dL/dy (the forward destination's
    coordinates), ``source_image`` = the forward source x, ``gradient_state`` = the forward
    encode's :class:`MPSCNNInstanceNormalizationGradientState` (required). The result is dL/dx
    with the forward source's size (channels from the forward
    ``source_feature_channel_offset``; 0 where the forward pass read nothing);
    ``gradient_for_gamma`` / ``gradient_for_beta`` of the state receive the sums over the
    encode's images. Properties: those of :class:`~mpsnn.MPSCNNGradientKernel`.
    """

    _state_cls = MPSCNNInstanceNormalizationGradientState


class MPSCNNGroupNormalizationGradient(_NormalizationGradient):
    """``MPSCNNGroupNormalizationGradient``: dL/dx, dL/dgamma and dL/dbeta of
    :class:`MPSCNNGroupNormalization`; ``dx = (h − mean_g(h) − xhat·mean_g(h·xhat))/sigma`` with
    ``h = gamma·dy`` and group means over the ``(C/G)·H·W`` elements of the group.

    Args:
        device: the device (positional, first) (``initWithDevice:``).

    Encode forms as :class:`MPSCNNInstanceNormalizationGradient`, with the forward encode's
    :class:`MPSCNNGroupNormalizationGradientState` (required).
    """

    _state_cls = MPSCNNGroupNormalizationGradientState
