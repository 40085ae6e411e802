"""Neuron nodes (spec/graph.md §14 "Neurons"): MPSCNNNeuronNode and its typed subclasses,
MPSCNNNeuronGradientNode.

``MPSCNNNeuronNode(source, descriptor)`` (Apple's factory ``nodeWithSource:descriptor:``)
returns the typed subclass matching the descriptor's type. The typed nodes take ``a``, ``b``,
``c`` as keywords; parameters left out take the neuron kernels' recommended values (ReLU a=0;
Linear a=1, b=0; HardSigmoid 0.2, 0.5; TanH 1, 1; SoftPlus 1, 1; ELU a=1; ReLUN 1, 6; Power
1, 0, 1; Exponential / Logarithm 1, 0, -1) — the graph header does not state them (open
point, spec §15). The gradient node runs the one generic MPSCNNNeuronGradient.
"""
from __future__ import annotations

from typing import Any

from ...core.device import Device
from ...core.enums import MPSCNNNeuronType as T
from ...core.errors import MPSTypeError, value_error
from ...kernels.neuron import RECOMMENDED_PARAMETERS, MPSCNNNeuron, MPSCNNNeuronGradient, MPSNNNeuronDescriptor, _slopes_array
from .base import GradientNode, MPSNNFilterNode, MPSNNImageNode, MPSNNStateNode, UnaryFilterNode


class MPSCNNNeuronGradientNode(GradientNode):
    """``MPSCNNNeuronGradientNode(source_gradient, source_image, gradient_state, descriptor)``:
    dL/dx = dL/dy * f'(x) with the forward neuron's descriptor (read-only ``descriptor``)."""

    _kernel_name = "MPSCNNNeuronGradient"

    def __init__(self, source_gradient: MPSNNImageNode, source_image: MPSNNImageNode, gradient_state: MPSNNStateNode | None,
                 descriptor: MPSNNNeuronDescriptor, forward: MPSNNFilterNode | None = None) -> None:
        if not isinstance(descriptor, MPSNNNeuronDescriptor):
            raise MPSTypeError(f"MPSCNNNeuronGradientNode: `descriptor` must be an MPSNNNeuronDescriptor, but got {type(descriptor).__name__}")
        super().__init__(source_gradient, source_image, gradient_state, forward)
        self._descriptor = descriptor.copy()

    @property
    def descriptor(self) -> MPSNNNeuronDescriptor:
        return self._descriptor

    @classmethod
    def _from_forward(cls, forward: MPSNNFilterNode, gradient_image: MPSNNImageNode) -> "MPSCNNNeuronGradientNode":
        return cls(gradient_image, forward._source_images[0], forward.result_state, forward._descriptor, forward=forward)  # type: ignore[attr-defined]

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNNeuronGradient(device, neuron_descriptor=self._descriptor)


class MPSCNNNeuronNode(UnaryFilterNode):
    """``MPSCNNNeuronNode``: a neuron applied element-wise. ``MPSCNNNeuronNode(source,
    descriptor)`` returns the typed subclass for ``descriptor.neuron_type``; read-only ``a``,
    ``b``, ``c``."""

    _neuron_type: T | None = None
    _params = ""
    _gradient_class = MPSCNNNeuronGradientNode
    _kernel_name = "MPSCNNNeuron"

    def __new__(cls, source: MPSNNImageNode | None = None, descriptor: MPSNNNeuronDescriptor | None = None, **kwargs: Any) -> "MPSCNNNeuronNode":
        if cls is MPSCNNNeuronNode:
            if not isinstance(descriptor, MPSNNNeuronDescriptor):
                raise MPSTypeError(f"MPSCNNNeuronNode: `descriptor` must be an MPSNNNeuronDescriptor, but got {type(descriptor).__name__}")
            sub = _BY_TYPE.get(descriptor.neuron_type)
            if sub is None:
                raise value_error("MPSCNNNeuronNode", "descriptor.neuron_type", descriptor.neuron_type.name, "be a neuron type with a node class (not none)")
            return super().__new__(sub)
        return super().__new__(cls)

    def __init__(self, source: MPSNNImageNode, descriptor: MPSNNNeuronDescriptor | None = None, **kwargs: Any) -> None:
        name = type(self).__name__
        if descriptor is None:
            if self._neuron_type is None:
                raise MPSTypeError("MPSCNNNeuronNode: `descriptor` is required")
            unknown = set(kwargs) - set(self._params)
            if unknown:
                raise MPSTypeError(f"{name}: unexpected argument(s) {sorted(unknown)}; this node takes {list(self._params) or 'no parameters'}")
            values = {"a": 0.0, "b": 0.0, "c": 0.0}
            for k, d in zip("abc", RECOMMENDED_PARAMETERS[self._neuron_type]):
                if k in self._params:
                    values[k] = kwargs.get(k, d)
            descriptor = MPSNNNeuronDescriptor(self._neuron_type, **values)
        else:
            if kwargs:
                raise MPSTypeError(f"{name}: give either `descriptor` or the parameters, not both")
            if not isinstance(descriptor, MPSNNNeuronDescriptor):
                raise MPSTypeError(f"{name}: `descriptor` must be an MPSNNNeuronDescriptor, but got {type(descriptor).__name__}")
            if self._neuron_type is not None and descriptor.neuron_type != self._neuron_type:
                raise value_error(name, "descriptor.neuron_type", descriptor.neuron_type.name, f"be {self._neuron_type.name}")
        super().__init__(source)
        self._descriptor = descriptor.copy()

    @classmethod
    def node_with_source(cls, source: MPSNNImageNode, descriptor: MPSNNNeuronDescriptor | None = None, **kwargs: Any) -> "MPSCNNNeuronNode":
        return cls(source, descriptor, **kwargs)

    a = property(lambda self: self._descriptor.a)
    b = property(lambda self: self._descriptor.b)
    c = property(lambda self: self._descriptor.c)

    @property
    def descriptor(self) -> MPSNNNeuronDescriptor:
        return self._descriptor

    def _build_kernel(self, device: Device) -> Any:
        return MPSCNNNeuron(device, neuron_descriptor=self._descriptor)


def _typed(name: str, ntype: T, params: str) -> type:
    return type(name, (MPSCNNNeuronNode,), {"_neuron_type": ntype, "_params": params, "__module__": __name__,
                                            "__doc__": f"``{name}(source{''.join(', ' + p + '=...' for p in params)})``: see MPSCNNNeuronNode."})


MPSCNNNeuronAbsoluteNode = _typed("MPSCNNNeuronAbsoluteNode", T.absolute, "")
MPSCNNNeuronELUNode = _typed("MPSCNNNeuronELUNode", T.ELU, "a")
MPSCNNNeuronReLUNNode = _typed("MPSCNNNeuronReLUNNode", T.reLUN, "ab")
MPSCNNNeuronLinearNode = _typed("MPSCNNNeuronLinearNode", T.linear, "ab")
MPSCNNNeuronReLUNode = _typed("MPSCNNNeuronReLUNode", T.reLU, "a")
MPSCNNNeuronSigmoidNode = _typed("MPSCNNNeuronSigmoidNode", T.sigmoid, "")
MPSCNNNeuronHardSigmoidNode = _typed("MPSCNNNeuronHardSigmoidNode", T.hardSigmoid, "ab")
MPSCNNNeuronSoftPlusNode = _typed("MPSCNNNeuronSoftPlusNode", T.softPlus, "ab")
MPSCNNNeuronSoftSignNode = _typed("MPSCNNNeuronSoftSignNode", T.softSign, "")
MPSCNNNeuronTanHNode = _typed("MPSCNNNeuronTanHNode", T.tanH, "ab")
MPSCNNNeuronPowerNode = _typed("MPSCNNNeuronPowerNode", T.power, "abc")
MPSCNNNeuronExponentialNode = _typed("MPSCNNNeuronExponentialNode", T.exponential, "abc")
MPSCNNNeuronLogarithmNode = _typed("MPSCNNNeuronLogarithmNode", T.logarithm, "abc")
MPSCNNNeuronGeLUNode = _typed("MPSCNNNeuronGeLUNode", T.geLU, "")


class MPSCNNNeuronPReLUNode(MPSCNNNeuronNode):
    """``MPSCNNNeuronPReLUNode(source, a_data)``: PReLU with one float32 slope per channel
    (bytes, NumPy or torch); ``(source)`` alone is unavailable."""

    _neuron_type = T.pReLU

    def __init__(self, source: MPSNNImageNode, a_data: Any = None, descriptor: MPSNNNeuronDescriptor | None = None) -> None:
        if isinstance(a_data, MPSNNNeuronDescriptor):  # reached through MPSCNNNeuronNode(source, descriptor)
            descriptor, a_data = a_data, None
        if descriptor is None:
            if a_data is None:
                raise MPSTypeError("MPSCNNNeuronPReLUNode: `a_data` (one slope per channel) is required")
            descriptor = MPSNNNeuronDescriptor(T.pReLU, data=_slopes_array("MPSCNNNeuronPReLUNode", a_data).copy())
        super().__init__(source, descriptor)


_BY_TYPE: dict[T, type] = {c._neuron_type: c for c in (  # type: ignore[attr-defined, misc]
    MPSCNNNeuronAbsoluteNode, MPSCNNNeuronELUNode, MPSCNNNeuronReLUNNode, MPSCNNNeuronLinearNode, MPSCNNNeuronReLUNode,
    MPSCNNNeuronSigmoidNode, MPSCNNNeuronHardSigmoidNode, MPSCNNNeuronSoftPlusNode, MPSCNNNeuronSoftSignNode,
    MPSCNNNeuronTanHNode, MPSCNNNeuronPowerNode, MPSCNNNeuronExponentialNode, MPSCNNNeuronLogarithmNode,
    MPSCNNNeuronGeLUNode, MPSCNNNeuronPReLUNode)}

__all__ = ["MPSCNNNeuronNode", "MPSCNNNeuronGradientNode", "MPSCNNNeuronPReLUNode", *[c.__name__ for c in _BY_TYPE.values() if c is not MPSCNNNeuronPReLUNode]]
