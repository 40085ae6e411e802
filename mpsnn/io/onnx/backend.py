"""An ONNX backend (``onnx.backend.base.Backend``) over :func:`mpsnn.io.onnx.load`.

What it is for: running ONNX's own backend conformance suite (``onnx.backend.test.BackendTest``,
the node tests of every operator) against the importer, as ``tests/io/test_onnx_backend.py``
and ``scripts/onnx_backend_report.py`` do; and running a model in one call the way other ONNX
backends are used::

    import onnx
    from mpsnn.io.onnx import backend

    rep = backend.prepare(onnx.load("model.onnx"), "CPU")
    (y,) = rep.run([x])            # NumPy arrays in, NumPy arrays out, in ONNX order

Devices: ONNX's ``"CPU"`` is mpsnn's ``"cpu"``, ``"CUDA"`` (``"CUDA:1"``) is ``"cuda"``
(``"cuda:1"``); :func:`supports_device` reports whether torch can use CUDA here.

Decisions:

* **Parameters given as graph inputs.** MPS kernels take their weights when the graph is
  built, so mpsnn needs convolution weights, a Reshape's shape, a Clip's bounds, a Pow's
  exponent, reduction axes, ... as constants (initializers or folded at load time). ONNX's
  node tests feed every operand as a graph input. A graph input that nodes read at
  *parameter* positions only (any input but the data input(s), see :data:`DATA_INPUTS`) is
  therefore bound as an initializer with the value given to :meth:`MPSBackendRep.run`, and
  the model is imported then (one import per distinct set of parameter values; the newest
  few are cached). A model whose graph inputs are all data is imported once, in
  :func:`prepare`, so unsupported operators are reported there. A graph input read as data
  is never bound, even where another node needs it as a constant: binding it would let
  ONNX's reference evaluator fold the whole graph, which tests nothing of mpsnn.
* **Constant outputs.** When every output is folded at load time (a model of Shape /
  Constant / ConstantOfShape only), the folded values are returned and no graph is built.
* Outputs are computed in float32 (the default graph format) and cast back to each output's
  ONNX element type (:meth:`mpsnn.io.onnx.ONNXGraph.arrays_from_images`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ...core.enums import MPSImageFeatureChannelFormat
from ...core.errors import value_error

try:  # the base classes; mpsnn.io.onnx needs the onnx package anyway
    from onnx.backend.base import Backend, BackendRep, Device, DeviceType
except ImportError as _exc:  # pragma: no cover - depends on the environment
    from ...core.errors import MPSError
    raise MPSError("mpsnn.io.onnx.backend: the `onnx` package is not installed; install the extra: pip install 'mpsnn[onnx]'") from _exc

#: input positions that hold *data* (images) per operator; every other position of a mapped
#: operator is a parameter that must be a load-time constant. Mapped operators not listed read
#: data at position 0 only; "*" means every position. Every input of an operator that mpsnn
#: folds only on constants (``FOLDABLE_ONLY``: Less, Where, Max, Cast, ...) is data too, so a
#: graph that computes with them on a graph input fails to import instead of being folded
#: whole by ONNX's reference evaluator (which would test nothing of mpsnn); ConstantOfShape's
#: input is a shape, a parameter.
DATA_INPUTS: dict[str, Any] = {
    "Add": "*", "Sub": "*", "Mul": "*", "Div": "*", "Sum": "*", "Concat": "*",
    "ConstantOfShape": (),
}


#: imports kept per prepared model with parameter inputs (one per distinct parameter values)
_CACHED_IMPORTS = 8


def _data_positions(op_type: str) -> Any:
    from .ops import FOLDABLE_ONLY
    if op_type in DATA_INPUTS:
        return DATA_INPUTS[op_type]
    if op_type in FOLDABLE_ONLY:
        return "*"
    return (0,)


def parameter_inputs(model: Any) -> list[str]:
    """The graph inputs (not initializers) that nodes read at parameter positions only, in
    graph-input order. A graph input that some node reads as data stays an image input even
    where another node needs it as a constant: that model then fails to import, as it would
    with the data given at run time (binding it would fold the whole graph with ONNX's
    reference evaluator and test nothing of mpsnn)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [vi.name for vi in graph.input if vi.name not in inits]
    param: set[str] = set()
    data: set[str] = set()
    for node in graph.node:
        pos = _data_positions(node.op_type)
        for k, name in enumerate(node.input):
            if name in inputs:
                (data if pos == "*" or k in pos else param).add(name)
    return [n for n in inputs if n in param and n not in data]


def mps_device(device: str) -> str:
    """An ONNX device string ("CPU", "CUDA", "CUDA:1") as an mpsnn / torch device string."""
    try:
        d = Device(str(device))
    except (AttributeError, ValueError):
        raise value_error("mpsnn.io.onnx.backend", "device", device, "be 'CPU', 'CUDA' or 'CUDA:<index>'") from None
    if d.type == DeviceType.CPU:
        return "cpu"
    return "cuda" if ":" not in str(device) else f"cuda:{d.device_id}"


class MPSBackendRep(BackendRep):
    """A prepared model: :meth:`run` takes the inputs (a list in the model's graph-input order,
    or a dict by name) and returns the outputs as a tuple in ONNX output order."""

    def __init__(self, model: Any, device: str, fmt: MPSImageFeatureChannelFormat = MPSImageFeatureChannelFormat.float32) -> None:
        self.model = model
        self.device = device
        self.format = fmt
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [vi.name for vi in model.graph.input if vi.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self.bound = parameter_inputs(model)
        self._cache: dict[bytes, tuple[Any, Any]] = {}
        if not self.bound:
            self._cache[b""] = self._build(model)

    def _build(self, model: Any) -> tuple[Any, Any]:
        """(ONNXGraph or None, constant outputs): None when every output is folded."""
        from . import ONNXGraph, import_model
        imp, imported = import_model(model, self.device)
        consts = imported.constant_outputs()
        if len(consts) == len(imported.outputs):
            return None, consts
        return ONNXGraph(imp.device, imported, self.format, imp.opset), consts

    def _for(self, feeds: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
        if not self.bound:
            return self._cache[b""]
        key = b"".join(name.encode() + b"\0" + str(feeds[name].dtype).encode() + repr(feeds[name].shape).encode()
                       + np.ascontiguousarray(feeds[name]).tobytes() for name in self.bound)
        hit = self._cache.get(key)
        if hit is None:
            from onnx import numpy_helper
            m = type(self.model)()
            m.CopyFrom(self.model)
            for name in self.bound:  # the graph input stays listed (allowed: an initializer overrides it)
                m.graph.initializer.append(numpy_helper.from_array(np.asarray(feeds[name]), name))
            if len(self._cache) >= _CACHED_IMPORTS:  # keep the newest few (dicts keep insertion order)
                del self._cache[next(iter(self._cache))]
            hit = self._cache[key] = self._build(m)
        return hit

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, Mapping):
            feeds = {k: np.asarray(v) for k, v in inputs.items()}
        else:
            seq = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(seq) > len(self.input_names):
                raise value_error("MPSBackendRep.run", "inputs", f"{len(seq)} arrays", f"give at most one array per graph input {self.input_names}")
            feeds = {n: np.asarray(a) for n, a in zip(self.input_names, seq)}
        missing = [n for n in self.bound if n not in feeds]
        if missing:
            raise value_error("MPSBackendRep.run", "inputs", sorted(feeds), f"include the parameter inputs {self.bound}", f"missing {missing}")
        graph, consts = self._for(feeds)
        if graph is None:
            return tuple(np.asarray(consts[n]) for n in self.output_names)
        used = graph.input_names  # graph inputs the graph does not read are ignored
        absent = [n for n in used if n not in feeds]
        if absent:
            raise value_error("MPSBackendRep.run", "inputs", sorted(feeds), f"include every input the graph reads {used}", f"missing {absent}")
        out = graph.predict({n: feeds[n] for n in used})
        return tuple(out[n] for n in self.output_names)


class MPSBackend(Backend):
    """mpsnn as an ONNX backend (module docstring)."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> MPSBackendRep:
        """Check ``model`` and import it (now when it has no parameters given as graph inputs,
        else at the first :meth:`MPSBackendRep.run`). ``kwargs``: ``format`` (the graph format,
        default float32); others (the test runner's tolerances) are ignored."""
        from . import _format, read_model
        fmt = _format(kwargs.get("format"))
        return MPSBackendRep(read_model(model), mps_device(device), fmt)

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: Any, inputs: Any, device: str = "CPU", outputs_info: Any = None, **kwargs: Any) -> Any:
        """Not supported: a single node has no types or shapes for its inputs, which the
        importer needs (use :func:`run_model` on a one-node model)."""
        raise NotImplementedError("mpsnn.io.onnx.backend: run_node is not supported; wrap the node in a model and use run_model")

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            d = Device(str(device))
        except (AttributeError, ValueError):
            return False
        if d.type == DeviceType.CPU:
            return True
        import torch
        return bool(torch.cuda.is_available()) and d.device_id < torch.cuda.device_count()


prepare = MPSBackend.prepare
run_model = MPSBackend.run_model
run_node = MPSBackend.run_node
supports_device = MPSBackend.supports_device

__all__ = ["DATA_INPUTS", "MPSBackend", "MPSBackendRep", "mps_device", "parameter_inputs", "prepare", "run_model", "run_node", "supports_device"]
