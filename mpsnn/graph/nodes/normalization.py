"""Normalization nodes (spec/graph.md §14 "Normalization", normalization.md §6).

Apple classes here: MPSCNNNormalizationNode (abstract), MPSCNNSpatialNormalizationNode,
MPSCNNSpatialNormalizationGradientNode, MPSCNNLocalContrastNormalizationNode,
MPSCNNLocalContrastNormalizationGradientNode, MPSCNNCrossChannelNormalizationNode,
MPSCNNCrossChannelNormalizationGradientNode, MPSCNNInstanceNormalizationNode,
MPSCNNInstanceNormalizationGradientNode, MPSCNNGroupNormalizationNode,
MPSCNNGroupNormalizationGradientNode, MPSCNNBatchNormalizationNode,
MPSCNNBatchNormalizationGradientNode.

Local normalizations (spatial, local contrast, cross channel): the node's read-write
parameters are copied into the kernel when a graph is built (changing them later does not
change a built graph, as for every node parameter). A gradient node made from its forward node
(``gradient_filter_with_source`` / ``training_graph``) copies the forward parameters at that
moment; the gradient kernels refuse a forward state made with other parameters.

Batch normalization (graph.md §11): the node runs in **inference** mode (stored statistics,
MPSCNNBatchNormalization only) unless its result state is consumed in the graph (a training
graph holds its gradient node) or exported; then it runs in **training** mode:
MPSCNNBatchNormalizationStatistics over the whole stacked batch into a fresh
MPSCNNBatchNormalizationState, then MPSCNNBatchNormalization with that state. ``flags``
``calculateStatisticsAlways`` computes batch statistics even when the state is not consumed,
``calculateStatisticsNever`` always uses the stored statistics (the gradient then treats them
as constants). The gradient node runs MPSCNNBatchNormalizationStatisticsGradient then
MPSCNNBatchNormalizationGradient over the whole batch.

Training (spec optimizers.md §11), after the gradient kernels of a trainable gradient node are
encoded, according to its ``training_style``:

* ``updateDeviceGPU`` (default): batch normalization calls
  ``data_source.update_gamma_and_beta(cb, state)`` then
  ``data_source.update_mean_and_variance(cb, state)`` (the Objective-C spellings
  ``..._with_command_buffer`` are called when a data source overrides only those); a returned
  gamma/beta (mean/variance) state is loaded into the graph's forward kernel with
  ``reload_gamma_and_beta_with_command_buffer`` (``reload_mean_and_variance_with_command_buffer``)
  on the same command buffer; None means "no update". Instance and group normalization call
  ``data_source.update_gamma_and_beta_with_command_buffer(cb, [state])`` likewise. The gradient
  kernels hold no parameters (they read gamma and the statistics from the forward state), so
  only the forward kernel reloads.
* ``updateDeviceCPU``: the ``*_with_batch_normalization_state(state)`` /
  ``update_gamma_and_beta_with_instance_normalization_state_batch([state])`` /
  ``update_gamma_and_beta_with_group_normalization_state_batch([state])`` methods run in the
  command buffer's completion handler; each one returning True makes the forward kernel reload
  the matching values from the data source.
* ``updateDeviceNone``: no update (the gradient still flows).

Decisions where the spec is silent (inferred):

* ``(src)`` forms of the local normalizations use kernel size 5 (Apple's "default 5").
* All three local-normalization forward nodes check ``alpha >= 0`` (the base node's rule, also
  for local contrast whose kernel accepts any alpha); the local-contrast gradient node accepts
  any alpha, as its kernel.
* MPSCNNCrossChannelNormalizationGradientNode also has read-write ``alpha``, ``beta``,
  ``delta`` (defaults 1, 5, 1): its kernel needs them to match the forward.
* The ``flags`` of a batch-normalization node are read at every encode (a mode, not a kernel
  parameter), so the graph always builds the statistics kernel next to the normalization
  (``debug_description`` lists both). Only the values 0, 1 and 2 are accepted.
* A data source whose class does not override any GPU update method of its protocol (the
  protocol ABC's defaults are the "not implemented" marker) is refused when a graph holding
  its gradient node with ``updateDeviceGPU`` is built (**[bin]** validation error, as for
  convolutions); a GPU method returning None means "no update".
* The graph runs each node once over the whole stacked batch, so instance/group normalization
  make ONE gradient state per encode (its ``gradient_for_gamma`` / ``gradient_for_beta`` are
  the sums over all images); the data source's "state batch" is the one-entry list
  ``[state]``. Batch normalization passes its single state.
* The training style of a trainable forward node is copied to the gradient nodes made from it
  (spec §7), by ``gradient_filter_with_source`` as well as by ``training_graph``.
* A node ``label`` overrides the data source's label on the kernels of the trainable nodes.
* Gradient nodes of trainable layers need the forward node: given as ``forward=`` or found as
  the producer of ``gradient_state`` (which must be that forward node's ``result_state``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ...core.device import Device
from ...core.enums import MPSNNTrainingStyle
from ...core.errors import MPSTypeError, MPSValueError, value_error
from ...images.image import MPSTemporaryImage
from ...images.state import MPSState
from ...kernels.batch_normalization import (
    MPSCNNBatchNormalization,
    MPSCNNBatchNormalizationDataSource,
    MPSCNNBatchNormalizationFlags,
    MPSCNNBatchNormalizationGradient,
    MPSCNNBatchNormalizationStatistics,
    MPSCNNBatchNormalizationStatisticsGradient,
)
from ...kernels.instance_group_normalization import (
    MPSCNNGroupNormalization,
    MPSCNNGroupNormalizationDataSource,
    MPSCNNGroupNormalizationGradient,
    MPSCNNInstanceNormalization,
    MPSCNNInstanceNormalizationDataSource,
    MPSCNNInstanceNormalizationGradient,
)
from ...kernels.local_normalization import (
    MPSCNNCrossChannelNormalization,
    MPSCNNCrossChannelNormalizationGradient,
    MPSCNNLocalContrastNormalization,
    MPSCNNLocalContrastNormalizationGradient,
    MPSCNNSpatialNormalization,
    MPSCNNSpatialNormalizationGradient,
)
from .base import (
    GradientNode,
    MPSNNFilterNode,
    MPSNNGradientFilterNode,
    MPSNNGradientStateNode,
    MPSNNImageNode,
    MPSNNStateNode,
    MPSNNTrainableNode,
    UnaryFilterNode,
    encode_gradient,
    encode_unary,
)

if TYPE_CHECKING:  # pragma: no cover
    from ...images.image import MPSImage
    from ..graph import _EncodeContext

#: kernel size of the ``(src)`` forms (Apple's "default 5"; inferred)
DEFAULT_KERNEL_SIZE = 5
_GPU = MPSNNTrainingStyle.updateDeviceGPU
_CPU = MPSNNTrainingStyle.updateDeviceCPU
_NONE = MPSNNTrainingStyle.updateDeviceNone


# -- validation ---------------------------------------------------------------------------------------


def _real(owner: str, name: str, value: Any, non_negative: bool = False) -> float:
    """A finite real number (``>= 0`` when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise value_error(owner, name, value, "be a real number", type(value).__name__)
    v = float(value)
    if not math.isfinite(v):
        raise value_error(owner, name, value, "be a finite real number")
    if non_negative and v < 0:
        raise value_error(owner, name, value, "be >= 0")
    return v


def _size(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise value_error(owner, name, value, "be an integer >= 1")
    return int(value)


def _param(name: str, non_negative: bool = False, doc: str = "") -> property:
    """A read-write float parameter stored as ``_<name>``."""
    attr = "_" + name

    def get(self: Any) -> float:
        return getattr(self, attr)  # type: ignore[no-any-return]

    def set_(self: Any, value: Any) -> None:
        setattr(self, attr, _real(type(self).__name__, name, value, non_negative))
    return property(get, set_, doc=doc or f"``{name}`` (read-write)")


def _size_param(name: str) -> property:
    """A read-write window size stored as ``_<name>``."""
    attr = "_" + name

    def get(self: Any) -> int:
        return getattr(self, attr)  # type: ignore[no-any-return]

    def set_(self: Any, value: Any) -> None:
        setattr(self, attr, _size(type(self).__name__, name, value))
    return property(get, set_, doc=f"``{name}`` (read-write)")


def _extra_read(obj: Any) -> None:
    """One more kernel of this node reads ``obj``: keep a temporary image/state alive for it."""
    if isinstance(obj, MPSTemporaryImage) or (isinstance(obj, MPSState) and obj.is_temporary):
        obj.read_count = obj.read_count + 1


# -- local normalizations: forward -------------------------------------------------------------------


class MPSCNNNormalizationNode(UnaryFilterNode):
    """``MPSCNNNormalizationNode``: abstract base of the spatial, local-contrast and
    cross-channel normalization nodes (instantiate a subclass).

    Read-write ``alpha`` (default 1.0, must be >= 0), ``beta`` (5.0), ``delta`` (1.0)."""

    _DEFAULTS: tuple[float, float, float] = (1.0, 5.0, 1.0)
    _alpha: float
    _beta: float
    _delta: float

    def __init__(self, source: MPSNNImageNode, padding_policy: Any = None) -> None:
        if type(self) is MPSCNNNormalizationNode:
            raise MPSTypeError("MPSCNNNormalizationNode: abstract; use MPSCNNSpatialNormalizationNode, "
                               "MPSCNNLocalContrastNormalizationNode or MPSCNNCrossChannelNormalizationNode")
        super().__init__(source, padding_policy)
        self._alpha, self._beta, self._delta = self._DEFAULTS

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, kernel_size: int | None = None) -> "MPSCNNNormalizationNode":
        """``nodeWithSource:`` / ``nodeWithSource:kernelSize:``."""
        if kernel_size is None:
            return cls(source)
        return cls(source, kernel_size)  # type: ignore[call-arg]

    alpha = _param("alpha", non_negative=True, doc="``alpha`` (read-write, >= 0)")
    beta = _param("beta")
    delta = _param("delta")


class MPSCNNSpatialNormalizationGradientNode(GradientNode):
    """``MPSCNNSpatialNormalizationGradientNode(source_gradient, source_image, gradient_state,
    kernel_size)``: MPSCNNSpatialNormalizationGradient. Read-write ``kernel_width``,
    ``kernel_height`` (both ``kernel_size``), ``alpha`` (1.0, >= 0), ``beta`` (5.0),
    ``delta`` (1.0); a node made from its forward node copies the forward values."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 kernel_size: int = DEFAULT_KERNEL_SIZE, forward: MPSNNFilterNode | None = None, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._kernel_width = self._kernel_height = _size(owner, "kernel_size", kernel_size)
        self._alpha, self._beta, self._delta = 1.0, 5.0, 1.0
        super().__init__(source_gradient, source_image, gradient_state, forward, padding_policy)

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                                  kernel_size: int = DEFAULT_KERNEL_SIZE) -> "MPSCNNSpatialNormalizationGradientNode":
        return cls(source_gradient, source_image, gradient_state, kernel_size)

    kernel_width = _size_param("kernel_width")
    kernel_height = _size_param("kernel_height")
    alpha = _param("alpha", non_negative=True)
    beta = _param("beta")
    delta = _param("delta")

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        node = cls(gradient_image, forward._source_images[0], forward.result_state, f._kernel_width, forward=forward)
        node._kernel_height = f._kernel_height
        node._alpha, node._beta, node._delta = f._alpha, f._beta, f._delta
        return node

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNSpatialNormalizationGradient(device, self._kernel_width, self._kernel_height,
                                                  alpha=self._alpha, beta=self._beta, delta=self._delta)


class MPSCNNSpatialNormalizationNode(MPSCNNNormalizationNode):
    """``MPSCNNSpatialNormalizationNode(source[, kernel_size])``: MPSCNNSpatialNormalization,
    ``Y = X / (delta + alpha/(kw·kh) · Σ_window X²)^beta``. Read-write ``kernel_width`` =
    ``kernel_height`` = ``kernel_size`` (default 5), ``alpha`` (1.0), ``beta`` (5.0), ``delta``
    (1.0). The kernel requires ``kernel_width == kernel_height`` (checked when a graph is built)."""

    _gradient_class = MPSCNNSpatialNormalizationGradientNode

    def __init__(self, source: MPSNNImageNode, kernel_size: int = DEFAULT_KERNEL_SIZE, padding_policy: Any = None) -> None:
        self._kernel_width = self._kernel_height = _size(type(self).__name__, "kernel_size", kernel_size)
        super().__init__(source, padding_policy)

    kernel_width = _size_param("kernel_width")
    kernel_height = _size_param("kernel_height")

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNSpatialNormalization(device, self._kernel_width, self._kernel_height, alpha=self._alpha, beta=self._beta, delta=self._delta)


class MPSCNNLocalContrastNormalizationGradientNode(GradientNode):
    """``MPSCNNLocalContrastNormalizationGradientNode(source_gradient, source_image,
    gradient_state, kernel_width, kernel_height)``: MPSCNNLocalContrastNormalizationGradient.
    Read-write ``alpha`` (**0.0**, the kernel default; the forward node uses 1.0), ``beta``
    (0.5), ``delta`` (1/1024), ``p0`` (1.0), ``pm`` (0.0), ``ps`` (1.0); read-only
    ``kernel_width``, ``kernel_height``. A node made from its forward node copies the forward
    values (alpha included)."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 kernel_width: int = DEFAULT_KERNEL_SIZE, kernel_height: int = DEFAULT_KERNEL_SIZE,
                 forward: MPSNNFilterNode | None = None, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        self._kernel_width = _size(owner, "kernel_width", kernel_width)
        self._kernel_height = _size(owner, "kernel_height", kernel_height)
        self._alpha, self._beta, self._delta = 0.0, 0.5, 1.0 / 1024.0
        self._p0, self._pm, self._ps = 1.0, 0.0, 1.0
        super().__init__(source_gradient, source_image, gradient_state, forward, padding_policy)

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                                  kernel_width: int = DEFAULT_KERNEL_SIZE, kernel_height: int = DEFAULT_KERNEL_SIZE
                                  ) -> "MPSCNNLocalContrastNormalizationGradientNode":
        return cls(source_gradient, source_image, gradient_state, kernel_width, kernel_height)

    kernel_width = property(lambda self: self._kernel_width, doc="``kernelWidth`` (read-only)")
    kernel_height = property(lambda self: self._kernel_height, doc="``kernelHeight`` (read-only)")
    alpha = _param("alpha")
    beta = _param("beta")
    delta = _param("delta")
    p0 = _param("p0")
    pm = _param("pm")
    ps = _param("ps")

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        node = cls(gradient_image, forward._source_images[0], forward.result_state, f._kernel_width, f._kernel_height, forward=forward)
        node._alpha, node._beta, node._delta = f._alpha, f._beta, f._delta
        node._p0, node._pm, node._ps = f._p0, f._pm, f._ps
        return node

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNLocalContrastNormalizationGradient(device, self._kernel_width, self._kernel_height, alpha=self._alpha, beta=self._beta,
                                                        delta=self._delta, p0=self._p0, pm=self._pm, ps=self._ps)


class MPSCNNLocalContrastNormalizationNode(MPSCNNNormalizationNode):
    """``MPSCNNLocalContrastNormalizationNode(source[, kernel_size])``:
    MPSCNNLocalContrastNormalization, ``Y = pm + ps·(X − p0·mean)/(delta + alpha·variance)^beta``.
    Read-write ``alpha`` (**1.0**, >= 0), ``beta`` (0.5), ``delta`` (2^−10), ``p0`` (1.0),
    ``pm`` (0.0), ``ps`` (1.0), ``kernel_width`` = ``kernel_height`` = ``kernel_size``
    (default 5; the kernel requires them equal)."""

    _DEFAULTS = (1.0, 0.5, 1.0 / 1024.0)
    _gradient_class = MPSCNNLocalContrastNormalizationGradientNode

    def __init__(self, source: MPSNNImageNode, kernel_size: int = DEFAULT_KERNEL_SIZE, padding_policy: Any = None) -> None:
        self._kernel_width = self._kernel_height = _size(type(self).__name__, "kernel_size", kernel_size)
        super().__init__(source, padding_policy)
        self._p0, self._pm, self._ps = 1.0, 0.0, 1.0

    kernel_width = _size_param("kernel_width")
    kernel_height = _size_param("kernel_height")
    p0 = _param("p0")
    pm = _param("pm")
    ps = _param("ps")

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNLocalContrastNormalization(device, self._kernel_width, self._kernel_height, alpha=self._alpha, beta=self._beta,
                                                delta=self._delta, p0=self._p0, pm=self._pm, ps=self._ps)


class MPSCNNCrossChannelNormalizationGradientNode(GradientNode):
    """``MPSCNNCrossChannelNormalizationGradientNode(source_gradient, source_image,
    gradient_state, kernel_size)``: MPSCNNCrossChannelNormalizationGradient. Read-only
    ``kernel_size``; read-write ``alpha`` (1.0, >= 0), ``beta`` (5.0), ``delta`` (1.0)
    (inferred: the kernel needs the forward values; a node made from its forward copies them)."""

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 kernel_size: int = DEFAULT_KERNEL_SIZE, forward: MPSNNFilterNode | None = None, padding_policy: Any = None) -> None:
        self._kernel_size = _size(type(self).__name__, "kernel_size", kernel_size)
        self._alpha, self._beta, self._delta = 1.0, 5.0, 1.0
        super().__init__(source_gradient, source_image, gradient_state, forward, padding_policy)

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                                  kernel_size: int = DEFAULT_KERNEL_SIZE) -> "MPSCNNCrossChannelNormalizationGradientNode":
        return cls(source_gradient, source_image, gradient_state, kernel_size)

    kernel_size = property(lambda self: self._kernel_size, doc="``kernelSize`` (read-only)")
    alpha = _param("alpha", non_negative=True)
    beta = _param("beta")
    delta = _param("delta")

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "GradientNode":
        f: Any = forward
        node = cls(gradient_image, forward._source_images[0], forward.result_state, f._kernel_size_in_feature_channels, forward=forward)
        node._alpha, node._beta, node._delta = f._alpha, f._beta, f._delta
        return node

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNCrossChannelNormalizationGradient(device, self._kernel_size, alpha=self._alpha, beta=self._beta, delta=self._delta)


class MPSCNNCrossChannelNormalizationNode(MPSCNNNormalizationNode):
    """``MPSCNNCrossChannelNormalizationNode(source[, kernel_size])``:
    MPSCNNCrossChannelNormalization, ``Y_k = X_k / (delta + alpha/N · Σ_{q∈Q(k)} X_q²)^beta``.
    Read-write ``kernel_size_in_feature_channels`` (``N``, default 5), ``alpha`` (1.0),
    ``beta`` (5.0), ``delta`` (1.0)."""

    _gradient_class = MPSCNNCrossChannelNormalizationGradientNode

    def __init__(self, source: MPSNNImageNode, kernel_size: int = DEFAULT_KERNEL_SIZE, padding_policy: Any = None) -> None:
        self._kernel_size_in_feature_channels = _size(type(self).__name__, "kernel_size", kernel_size)
        super().__init__(source, padding_policy)

    kernel_size_in_feature_channels = _size_param("kernel_size_in_feature_channels")

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNCrossChannelNormalization(device, self._kernel_size_in_feature_channels, alpha=self._alpha, beta=self._beta,
                                               delta=self._delta)


# -- trainable normalizations ------------------------------------------------------------------------------


def _overridden(data_source: Any, protocol: type, name: str) -> Callable[..., Any] | None:
    """The bound method ``name`` when the data source's class overrides the protocol's default."""
    if getattr(type(data_source), name, None) is getattr(protocol, name, None):
        return None
    return getattr(data_source, name, None)


class _DataSourceNode(MPSNNFilterNode, MPSNNTrainableNode):
    """A trainable single-input forward node over a normalization data source."""

    _protocol: type = MPSCNNInstanceNormalizationDataSource
    _kernel_class: type = MPSCNNInstanceNormalization
    _gradient_class: type = GradientNode
    _state_node_class = MPSNNGradientStateNode

    def __init__(self, source: MPSNNImageNode, data_source: Any, padding_policy: Any = None) -> None:
        if not isinstance(data_source, self._protocol):
            raise MPSTypeError(f"{type(self).__name__}: `data_source` must be an {self._protocol.__name__}, but got {type(data_source).__name__}")
        super().__init__([source], None, padding_policy)
        self._data_source = data_source
        self._init_trainable()

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, data_source: Any) -> "_DataSourceNode":
        """``nodeWithSource:dataSource:``."""
        return cls(source, data_source)

    @property
    def data_source(self) -> Any:
        """The data source (read-only; mpsnn extension)."""
        return self._data_source

    def _build_kernel(self, device: Device) -> Any:
        k = self._kernel_class(device, data_source=self._data_source)
        if self._label is not None:
            k.label = self._label
        return k

    def _reload(self, kernel: Any) -> None:
        kernel.reload_gamma_and_beta_from_data_source()

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        return encode_unary(self, ctx, kernel, images)

    def _make_gradient_nodes(self, gradient_image: MPSNNImageNode) -> list[MPSNNGradientFilterNode | None]:
        return [self._gradient_class(gradient_image, self._source_images[0], self.result_state, forward=self)]


class _DataSourceGradientNode(GradientNode, MPSNNTrainableNode):
    """A trainable gradient node whose data source is its forward node's."""

    _forward_class: type[_DataSourceNode] = _DataSourceNode
    _gpu_methods: tuple[str, ...] = ()

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 forward: MPSNNFilterNode | None = None, padding_policy: Any = None) -> None:
        owner = type(self).__name__
        if gradient_state is None:
            raise MPSTypeError(f"{owner}: `gradient_state` is required (the result_state of the forward {self._forward_class.__name__})")
        if not isinstance(gradient_state, MPSNNStateNode):
            raise MPSTypeError(f"{owner}: `gradient_state` must be an MPSNNStateNode, but got {type(gradient_state).__name__}")
        if forward is None:
            forward = gradient_state.producer
        if not isinstance(forward, self._forward_class):
            raise MPSTypeError(f"{owner}: `gradient_state` must be the result_state of an {self._forward_class.__name__}, "
                               f"but it comes from {type(forward).__name__ if forward is not None else 'no filter node'}")
        super().__init__(source_gradient, source_image, gradient_state, forward, padding_policy)
        self._init_trainable()
        self._training_style = forward.training_style

    @classmethod
    def node_with_source_gradient(cls, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode,
                                  gradient_state: MPSNNStateNode) -> "_DataSourceGradientNode":
        """``nodeWithSourceGradient:sourceImage:gradientState:``."""
        return cls(source_gradient, source_image, gradient_state)

    @property
    def data_source(self) -> Any:
        """The forward node's data source (mpsnn extension)."""
        return self._forward._data_source  # type: ignore[union-attr]

    def _is_trainable_update(self) -> bool:
        return self._training_style != _NONE

    def _check_gpu_update(self) -> None:
        if self._training_style != _GPU:
            return
        ds = self.data_source
        if not any(_overridden(ds, self._forward_class._protocol, n) for n in self._gpu_methods):
            names = " or ".join(f"`{n}`" for n in self._gpu_methods)
            raise MPSValueError(f"{self._describe()}: unable to do the GPU update pass because the data source {type(ds).__name__} "
                                f"does not implement {names} (set training_style to updateDeviceCPU or updateDeviceNone, or implement it)")

    def _forward_kernel(self, ctx: "_EncodeContext") -> Any:
        k = ctx.kernel_of(self._forward) if self._forward is not None else None
        return k[0] if isinstance(k, tuple) else k


class _GammaBetaGradientNode(_DataSourceGradientNode):
    """Instance / group normalization gradient: one kernel, then the gamma/beta update."""

    _gpu_methods = ("update_gamma_and_beta_with_command_buffer",)
    _cpu_method = ""
    _kernel_class: type = MPSCNNInstanceNormalizationGradient

    def _build_kernel(self, device: Device) -> Any:
        self._check_gpu_update()
        return self._kernel_class(device)

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        img, _ = encode_gradient(self, ctx, kernel, images, states)
        style = self._training_style
        if style == _NONE:
            return img, []
        cb = ctx.command_buffer
        state = ctx.single_state(self, states[0])
        ds = self.data_source
        fwd = self._forward_kernel(ctx)
        if style == _GPU:
            update = _overridden(ds, self._forward_class._protocol, self._gpu_methods[0])
            new = update(cb, [state]) if update is not None else None
            if new is not None and fwd is not None:
                fwd.reload_gamma_and_beta_with_command_buffer(cb, new)
        else:
            cpu_update = getattr(ds, self._cpu_method)

            def on_completed(_cb: Any) -> None:
                if cpu_update([state]) and fwd is not None:
                    fwd.reload_gamma_and_beta_from_data_source()
            cb.add_completed_handler(on_completed)
        return img, []


class MPSCNNInstanceNormalizationGradientNode(_GammaBetaGradientNode):
    """``MPSCNNInstanceNormalizationGradientNode(source_gradient, source_image,
    gradient_state)``: MPSCNNInstanceNormalizationGradient plus the gamma/beta update of the
    module docstring (``training_style``, default the forward node's)."""

    _cpu_method = "update_gamma_and_beta_with_instance_normalization_state_batch"
    _kernel_class = MPSCNNInstanceNormalizationGradient


class MPSCNNInstanceNormalizationNode(_DataSourceNode):
    """``MPSCNNInstanceNormalizationNode(source, data_source)``: MPSCNNInstanceNormalization
    with gamma/beta from an :class:`~mpsnn.MPSCNNInstanceNormalizationDataSource`.
    Read-write ``training_style`` (default ``updateDeviceGPU``, copied to its gradient node);
    read-only ``data_source`` (mpsnn extension)."""

    _protocol = MPSCNNInstanceNormalizationDataSource
    _kernel_class = MPSCNNInstanceNormalization
    _gradient_class = MPSCNNInstanceNormalizationGradientNode


class MPSCNNGroupNormalizationGradientNode(_GammaBetaGradientNode):
    """``MPSCNNGroupNormalizationGradientNode(source_gradient, source_image, gradient_state)``:
    MPSCNNGroupNormalizationGradient plus the gamma/beta update (``training_style``)."""

    _cpu_method = "update_gamma_and_beta_with_group_normalization_state_batch"
    _kernel_class = MPSCNNGroupNormalizationGradient


class MPSCNNGroupNormalizationNode(_DataSourceNode):
    """``MPSCNNGroupNormalizationNode(source, data_source)``: MPSCNNGroupNormalization with
    gamma, beta and ``number_of_groups`` from an
    :class:`~mpsnn.MPSCNNGroupNormalizationDataSource`. Read-write ``training_style``;
    read-only ``data_source`` (mpsnn extension)."""

    _protocol = MPSCNNGroupNormalizationDataSource
    _kernel_class = MPSCNNGroupNormalization
    _gradient_class = MPSCNNGroupNormalizationGradientNode


MPSCNNInstanceNormalizationGradientNode._forward_class = MPSCNNInstanceNormalizationNode
MPSCNNGroupNormalizationGradientNode._forward_class = MPSCNNGroupNormalizationNode


# -- batch normalization ------------------------------------------------------------------------------------

_BNF = MPSCNNBatchNormalizationFlags
_BN = MPSCNNBatchNormalizationDataSource


def _check_flags(owner: str, value: Any) -> MPSCNNBatchNormalizationFlags:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in (0, 1, 2):
        raise value_error(owner, "flags", value, "be an MPSCNNBatchNormalizationFlags: default / calculateStatisticsAutomatic (0), "
                                                 "calculateStatisticsAlways (1) or calculateStatisticsNever (2)")
    return _BNF(int(value))


class MPSCNNBatchNormalizationGradientNode(_DataSourceGradientNode):
    """``MPSCNNBatchNormalizationGradientNode(source_gradient, source_image, gradient_state)``:
    MPSCNNBatchNormalizationStatisticsGradient then MPSCNNBatchNormalizationGradient over the
    whole batch, then the data-source update of the module docstring (``training_style``,
    default the forward node's)."""

    _gpu_methods = ("update_gamma_and_beta", "update_gamma_and_beta_with_command_buffer",
                    "update_mean_and_variance", "update_mean_and_variance_with_command_buffer")

    def _build_kernel(self, device: Device) -> Any:
        self._check_gpu_update()
        return (MPSCNNBatchNormalizationStatisticsGradient(device), MPSCNNBatchNormalizationGradient(device))

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        statistics_gradient, gradient = kernel
        cb = ctx.command_buffer
        state = ctx.single_state(self, states[0]) if states else None
        for obj in (images[0], images[1], state):  # read by both kernels
            _extra_read(obj)
        statistics_gradient.encode(cb, images[0], images[1], state)
        img, _ = encode_gradient(self, ctx, gradient, images, states)
        style = self._training_style
        if style == _NONE:
            return img, []
        ds = self.data_source
        bn = self._forward_kernel(ctx)
        if style == _GPU:
            gb_update = _overridden(ds, _BN, "update_gamma_and_beta") or _overridden(ds, _BN, "update_gamma_and_beta_with_command_buffer")
            mv_update = _overridden(ds, _BN, "update_mean_and_variance") or _overridden(ds, _BN, "update_mean_and_variance_with_command_buffer")

            def update() -> Any:
                gamma_beta = gb_update(cb, state) if gb_update is not None else None
                mean_variance = mv_update(cb, state) if mv_update is not None else None

                def reload() -> None:
                    if bn is not None:
                        if gamma_beta is not None:
                            bn.reload_gamma_and_beta_with_command_buffer(cb, gamma_beta)
                        if mean_variance is not None:
                            bn.reload_mean_and_variance_with_command_buffer(cb, mean_variance)
                return reload
            ctx.update(update)
        else:
            def on_completed(_cb: Any) -> None:
                if ds.update_gamma_and_beta_with_batch_normalization_state(state) and bn is not None:
                    bn.reload_gamma_and_beta_from_data_source()
                if ds.update_mean_and_variance_with_batch_normalization_state(state) and bn is not None:
                    bn.reload_mean_and_variance_from_data_source()
            cb.add_completed_handler(on_completed)
        return img, []


class MPSCNNBatchNormalizationNode(_DataSourceNode):
    """``MPSCNNBatchNormalizationNode(source, data_source)``: MPSCNNBatchNormalization (plus
    MPSCNNBatchNormalizationStatistics in training mode; module docstring) over an
    :class:`~mpsnn.MPSCNNBatchNormalizationDataSource`.

    Read-write ``flags`` (:class:`~mpsnn.MPSCNNBatchNormalizationFlags`, default ``default`` =
    ``calculateStatisticsAutomatic``: batch statistics exactly when the result state is
    consumed in the graph), ``training_style`` (default ``updateDeviceGPU``, copied to the
    gradient node); read-only ``data_source`` (mpsnn extension). The graph's kernel is the pair
    ``(MPSCNNBatchNormalization, MPSCNNBatchNormalizationStatistics)``."""

    _protocol = MPSCNNBatchNormalizationDataSource
    _kernel_class = MPSCNNBatchNormalization
    _gradient_class = MPSCNNBatchNormalizationGradientNode

    def __init__(self, source: MPSNNImageNode, data_source: MPSCNNBatchNormalizationDataSource, padding_policy: Any = None) -> None:
        super().__init__(source, data_source, padding_policy)
        self._flags = _BNF.default

    @property
    def flags(self) -> MPSCNNBatchNormalizationFlags:
        return self._flags

    @flags.setter
    def flags(self, value: Any) -> None:
        self._flags = _check_flags(type(self).__name__, value)

    def _build_kernel(self, device: Device) -> Any:
        return (super()._build_kernel(device), MPSCNNBatchNormalizationStatistics(device))

    def _reload(self, kernel: Any) -> None:
        bn = kernel[0]
        bn.reload_gamma_and_beta_from_data_source()
        bn.reload_mean_and_variance_from_data_source()

    def _uses_batch_statistics(self, want_states: bool) -> bool:
        mode = int(self._flags) & int(_BNF.calculateStatisticsMask)
        if mode == _BNF.calculateStatisticsAlways:
            return True
        if mode == _BNF.calculateStatisticsNever:
            return False
        return want_states

    def _encode(self, ctx: "_EncodeContext", kernel: Any, images: list["MPSImage"], states: list[Any]) -> tuple["MPSImage", list[Any]]:
        bn, statistics = kernel
        cb = ctx.command_buffer
        src = images[0]
        bn.destination_image_allocator = ctx.allocator
        self._apply_padding(bn)
        training = self._uses_batch_statistics(ctx.want_states)
        if not training and not ctx.want_states:
            return bn.encode(cb, src), []
        state = bn.result_state(src)
        if training:
            _extra_read(src)  # read by the statistics and the normalization
            statistics.encode(cb, src, state)
        img = bn.encode(cb, src, state)
        return img, ([state] if ctx.want_states else [])


MPSCNNBatchNormalizationGradientNode._forward_class = MPSCNNBatchNormalizationNode


__all__ = [
    "MPSCNNBatchNormalizationGradientNode",
    "MPSCNNBatchNormalizationNode",
    "MPSCNNCrossChannelNormalizationGradientNode",
    "MPSCNNCrossChannelNormalizationNode",
    "MPSCNNGroupNormalizationGradientNode",
    "MPSCNNGroupNormalizationNode",
    "MPSCNNInstanceNormalizationGradientNode",
    "MPSCNNInstanceNormalizationNode",
    "MPSCNNLocalContrastNormalizationGradientNode",
    "MPSCNNLocalContrastNormalizationNode",
    "MPSCNNNormalizationNode",
    "MPSCNNSpatialNormalizationGradientNode",
    "MPSCNNSpatialNormalizationNode",
]
