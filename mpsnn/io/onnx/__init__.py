"""ONNX import: :func:`load` turns an ``.onnx`` model into an :class:`~mpsnn.MPSNNGraph`.

Example::

    import numpy as np
    from mpsnn.io import onnx as mo

    graph = mo.load("resnet18.onnx")                 # an ONNXGraph (an MPSNNGraph)
    print(graph.source_image_handles)                # [ONNXTensorHandle('input')]
    out = graph.predict({"input": np.random.rand(2, 3, 224, 224).astype(np.float32)})
    print(out["output"].shape)                       # (2, 1000)

The graph's source handles are :class:`ONNXTensorHandle` objects named after the ONNX
inputs; ``encode`` / ``run`` take MPS images as for any graph, :meth:`ONNXGraph.predict` takes
and returns NumPy arrays in the ONNX shapes. How tensors map to images, what is folded, and
every operator's mapping: :mod:`mpsnn.io.onnx.layout`, :mod:`mpsnn.io.onnx.importer` and the
modules of :mod:`mpsnn.io.onnx.ops`; the list with the conformance counts is ``docs/onnx.md``.

Decisions: the default graph format of an imported model is float32 (ONNX models are float32;
give ``format`` for float16 / bfloat16); the batch (dimension 0) of image inputs may differ
from the one the model declares.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from ...core.device import Device, as_device, default_device
from ...core.enums import MPSImageFeatureChannelFormat
from ...core.errors import MPSError, MPSTypeError, MPSValueError, value_error
from ...graph.graph import MPSNNGraph
from ...images.image import MPSImage
from .importer import Importer, ONNXTensorHandle, _onnx
from .layout import Value, nhwc_to_onnx, onnx_to_nhwc
from .nodes import RelayoutNode

_F = MPSImageFeatureChannelFormat


def _format(value: Any) -> MPSImageFeatureChannelFormat:
    if value is None:
        return _F.float32
    if isinstance(value, str):
        try:
            return _F.__members__[value]
        except KeyError:
            raise value_error("mpsnn.io.onnx.load", "format", value, "be 'float32', 'float16' or 'bfloat16'") from None
    try:
        return _F(value)
    except (ValueError, TypeError):
        raise value_error("mpsnn.io.onnx.load", "format", value, "be an MPSImageFeatureChannelFormat") from None


def read_model(path_or_model: Any) -> Any:
    """A ModelProto from a path, bytes or a ModelProto (checked with ``onnx.checker``)."""
    onnx = _onnx()
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    elif isinstance(path_or_model, (str, os.PathLike)):
        if not os.path.exists(path_or_model):
            raise value_error("mpsnn.io.onnx.load", "path_or_model", str(path_or_model), "name an existing .onnx file")
        try:
            model = onnx.load(os.fspath(path_or_model))
        except Exception as exc:  # noqa: BLE001 - protobuf's errors
            raise MPSValueError(f"mpsnn.io.onnx.load: `path_or_model` (={str(path_or_model)!r}) is not an ONNX model: {exc}") from exc
    elif isinstance(path_or_model, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(path_or_model))
        except Exception as exc:  # noqa: BLE001
            raise MPSValueError(f"mpsnn.io.onnx.load: `path_or_model` bytes are not an ONNX model: {exc}") from exc
    else:
        raise MPSTypeError(f"mpsnn.io.onnx.load: `path_or_model` must be a path, bytes or an onnx.ModelProto, but got {type(path_or_model).__name__}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - the checker's own error type
        raise MPSValueError(f"mpsnn.io.onnx.load: the model is not valid ONNX: {exc}") from exc
    return model


def _with_batch(array: np.ndarray, batch: int | None) -> np.ndarray:
    """A folded output that holds the load-time stand-in of a symbolic batch (a Shape of an
    input returned as an output) gets the batch of this run."""
    from .importer import BATCH_SENTINEL
    if batch is None or array.dtype.kind not in "iu" or not np.any(array == BATCH_SENTINEL):
        return array
    return np.where(array == BATCH_SENTINEL, batch, array).astype(array.dtype)


class ImportedModel:
    """What an import produced: the graph inputs, and per ONNX output either an image (with its
    axes, ONNX shape and element type) or a constant folded at load time."""

    def __init__(self, imp: Importer) -> None:
        self.inputs: list[Value] = list(imp.inputs)
        self.outputs: list[tuple[str, Value]] = []
        self.result_nodes: list[Any] = []
        for name in imp.outputs:
            v = imp.values.get(name)
            if v is None:
                raise MPSValueError(f"mpsnn.io.onnx.load: output {name!r} is not produced by any node")
            fake = _OutputNode(name)
            if v.pending is not None:
                v = imp.materialize(v, fake)
            if v.const is None and v.node is not None and v.node.producer is None:
                r = RelayoutNode(v.node, lambda t: t, f"output {name}: copy of the input")
                v = Value(name, v.shape, v.dtype, node=r.result_image, axes=v.axes)
            if v.const is None and all(v.node is not n for n in self.result_nodes):
                self.result_nodes.append(v.node)
            self.outputs.append((name, v))

    def constant_outputs(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(v.const) for name, v in self.outputs if v.const is not None}


class _OutputNode:
    def __init__(self, name: str) -> None:
        self.name, self.op_type, self.output, self.input = f"output {name}", "Output", [name], [name]


def import_model(path_or_model: Any, device: Any = None) -> tuple[Importer, ImportedModel]:
    """Read, check and import a model without building the graph (mpsnn)."""
    model = read_model(path_or_model)
    dev = default_device() if device is None else as_device(device, "mpsnn.io.onnx.load")
    imp = Importer(model, dev)
    imp.run()
    return imp, ImportedModel(imp)


class ONNXGraph(MPSNNGraph):
    """An :class:`~mpsnn.MPSNNGraph` made by :func:`load`, plus the ONNX names and layouts.

    Read-only: ``input_names`` (the ONNX inputs the graph reads, ONNX order),
    ``output_names`` (every ONNX output), ``opset``. :meth:`predict` runs NumPy arrays."""

    def __init__(self, device: Device, imported: ImportedModel, fmt: MPSImageFeatureChannelFormat, opset: int) -> None:
        if not imported.result_nodes:
            raise MPSValueError("mpsnn.io.onnx.load: every output of the model is a constant folded at load time "
                                f"({[n for n, _ in imported.outputs]}); there is no image computation to build a graph from")
        super().__init__(device, result_images=imported.result_nodes)
        self.format = fmt
        self._imported = imported
        self._opset = opset
        self._queue = device.make_command_queue()
        by_name = {v.name: v for v in imported.inputs}
        handles = [h for h in self.source_image_handles]
        self._source_values = [by_name[h.name] for h in handles]

    @property
    def input_names(self) -> list[str]:
        used = {v.name for v in self._source_values}
        return [v.name for v in self._imported.inputs if v.name in used]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self._imported.outputs]

    @property
    def opset(self) -> int:
        return self._opset

    def images_from_arrays(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[MPSImage]:
        """One image per source handle from ONNX-shaped arrays (a dict by input name, or a list
        in :attr:`input_names` order)."""
        names = self.input_names
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            seq = list(inputs)
            if len(seq) != len(names):
                raise value_error("ONNXGraph.predict", "inputs", f"{len(seq)} arrays", f"give one array per input {names}")
            feeds = dict(zip(names, seq))
        missing = [n for n in names if n not in feeds]
        if missing:
            raise value_error("ONNXGraph.predict", "inputs", sorted(feeds), f"include every input the graph reads {names}", f"missing {missing}")
        known = {v.name for v in self._imported.inputs}
        extra = [n for n in feeds if n not in known]
        if extra:
            raise value_error("ONNXGraph.predict", "inputs", sorted(feeds), f"name only the model's inputs {sorted(known)}", f"unknown {extra}")
        images = []
        for v in self._source_values:
            arr = np.asarray(feeds[v.name])
            if arr.dtype.kind not in "fiub":
                raise value_error("ONNXGraph.predict", f"inputs[{v.name!r}].dtype", arr.dtype, "be a real number type")
            if arr.ndim != v.rank or any(d is not None and k > 0 and d != s for k, (d, s) in enumerate(zip(v.shape, arr.shape))):
                raise value_error("ONNXGraph.predict", f"inputs[{v.name!r}].shape", arr.shape,
                                  f"match the model's {tuple('N' if d is None else d for d in v.shape)} (any batch)")
            nhwc = onnx_to_nhwc(arr.astype(np.float32), v.axes or ())
            images.append(MPSImage.from_numpy(nhwc, self.device, self.format))
        return images

    def arrays_from_images(self, results: Sequence[MPSImage]) -> dict[str, np.ndarray]:
        """ONNX-shaped arrays of every output from the graph's result images (read on the host;
        the command buffer must have completed)."""
        out: dict[str, np.ndarray] = {}
        by_node = {id(n): img for n, img in zip(self._imported.result_nodes, results)}
        batch = results[0].number_of_images if results else None
        for name, v in self._imported.outputs:
            if v.const is not None:
                out[name] = _with_batch(np.asarray(v.const), batch)
                continue
            arr = nhwc_to_onnx(by_node[id(v.node)].to_numpy(), v.axes or (), v.shape)
            if v.dtype.kind in "iub":
                arr = np.rint(arr)
            out[name] = arr.astype(v.dtype if v.dtype.kind in "fiub" else np.float32)
        return out

    def predict(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        """Run the graph on NumPy arrays (ONNX shapes) and return every output by name."""
        images = self.images_from_arrays(inputs)
        cb = self._queue.make_command_buffer()
        extra: list[Any] = []
        first = self.encode(cb, images, intermediate_images=extra)
        assert first is not None  # every result of an imported graph is needed
        cb.commit()
        cb.wait_until_completed()
        if cb.error is not None:
            raise MPSError(f"ONNXGraph.predict: the command buffer failed: {cb.error}")
        return self.arrays_from_images([first, *extra])


def load(path_or_model: Any, device: Any = None, format: Any = None) -> ONNXGraph:
    """Load an ONNX model (a path, bytes or an ``onnx.ModelProto``) into an :class:`ONNXGraph`
    on ``device`` (default :func:`mpsnn.default_device`) with graph format ``format`` (default
    float32). Unsupported operators or attribute values raise one
    :class:`~mpsnn.MPSError` listing each with its node names, before any work is done."""
    fmt = _format(format)
    imp, imported = import_model(path_or_model, device)
    return ONNXGraph(imp.device, imported, fmt, imp.opset)


__all__ = ["ImportedModel", "ONNXGraph", "ONNXTensorHandle", "import_model", "load", "read_model"]
