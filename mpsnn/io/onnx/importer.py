"""The ONNX -> MPSNNGraph importer: walks the ONNX graph once, folds what is constant, and
maps every other node to MPS graph nodes through the mappers of :mod:`.ops`.

Order of work in :func:`import_model` (nothing runs on a device before step 4):

1. opset check (7 to the newest the installed ``onnx`` knows), initializers become constants
   (the mappers compute every result's shape themselves);
2. every node's operator and attributes are checked (:func:`unsupported`): any unsupported
   operator raises one :class:`~mpsnn.MPSError` listing each op type with its node names;
3. nodes run in order: a node whose inputs are all constants is **folded** with ONNX's own
   reference evaluator (Shape arithmetic, Constant, ConstantOfShape, Cast, ...); a node that
   only moves data (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, DepthToSpace,
   SpaceToDepth, Identity) is kept **pending** on its source (:class:`Pending`) and becomes a
   data movement only where a consumer needs one (Flatten/Reshape before Gemm/MatMul folds
   into the fully connected weights; a reshape that keeps the NHWC order is free); every
   other node is mapped by its mapper;
4. the MPSNNGraph is built over the image outputs (the kernels read their weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...core.errors import MPSError, MPSTypeError, MPSValueError
from ...graph.nodes.base import MPSHandle, MPSNNImageNode
from .layout import IMAGE_AXES, Value, nhwc_to_onnx, onnx_to_nhwc, standard_axes
from .nodes import ConstantImageNode, RelayoutNode

#: a dimension value standing for the batch while Shape arithmetic is folded (the batch of
#: an image tensor is not known at load time); a folded shape holding it at dimension 0 of
#: a Reshape target means "the batch"
BATCH_SENTINEL = 2_147_483_629

#: the oldest opset imported: 7, where the operators took their present numpy broadcasting and
#: lost the legacy ``consumed_inputs`` / ``is_test`` attributes (the issue asks for 9; the ONNX
#: model zoo's classic CNNs are opset 7 and 8, and every mapper reads their attribute forms)
MIN_OPSET = 7


class ONNXTensorHandle(MPSHandle):
    """The handle of a graph source image: the ONNX input it comes from."""

    def __init__(self, name: str) -> None:
        self.name = name

    def label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"ONNXTensorHandle({self.name!r})"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MPSError("mpsnn.io.onnx: the `onnx` package is not installed; install the extra: pip install 'mpsnn[onnx]'") from exc
    return onnx


# -- pending data movements ---------------------------------------------------------------------------

LayoutOp = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class Pending:
    """Data-movement operators kept on their source image value: ``ops`` apply in order to the
    source as an ONNX-ordered array (``op(array, batch)``), ``what`` names them."""

    source: Value
    ops: list[LayoutOp] = field(default_factory=list)
    what: list[str] = field(default_factory=list)
    #: while ``ops`` are Transposes only: result dimension k is source dimension perm[k]
    perm: tuple[int, ...] | None = None


def _probe(source: Value, batch: int) -> np.ndarray:
    """The source's element indices as an ONNX-ordered array (batch ``batch`` on axis n)."""
    dims = source.image_dims()
    # only a source that stores a dimension in axis n has a batch; a rank-1 (C,) tensor is one
    # image whatever the probing batch (else nhwc_to_onnx finds n > 1 holding no dimension)
    has_n = "n" in (source.axes or ())
    sizes = [batch if a == "n" and has_n else int(dims[a]) for a in IMAGE_AXES]
    idx = np.arange(int(np.prod(sizes)), dtype=np.int64).reshape(sizes)
    shape = [batch if a == "n" else s for s, a in zip(source.shape, source.axes or ())]
    return nhwc_to_onnx(idx, source.axes or (), shape)


class Importer:
    """State of one import (see the module docstring). Mappers use the helpers below."""

    def __init__(self, model: Any, device: Any) -> None:
        onnx = _onnx()
        self.onnx = onnx
        self.model = model
        self.device = device
        self.graph = model.graph
        self.opset = 1
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise MPSValueError(f"mpsnn.io.onnx.load: the model's opset (={self.opset}) must be in [{MIN_OPSET}, {newest}] "
                                f"(onnx {onnx.__version__} knows opsets up to {newest})")
        self.values: dict[str, Value] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.done: set[int] = set()
        self.outputs = [o.name for o in self.graph.output]
        self.inputs: list[Value] = []
        self.anchor: MPSNNImageNode | None = None

    # -- tensor types -------------------------------------------------------------------------------
    def np_dtype(self, elem_type: int) -> np.dtype:
        from onnx import helper
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))

    def _type_of(self, vi: Any) -> tuple[tuple[Any, ...], np.dtype] | None:
        t = vi.type
        if not t.HasField("tensor_type"):
            return None
        tt = t.tensor_type
        dims: tuple[Any, ...] = ()
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
        return dims, self.np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)

    # -- values ---------------------------------------------------------------------------------------
    def inp(self, node: Any, k: int) -> Value | None:
        """Input ``k`` of ``node`` (None when absent or given as the empty name)."""
        if k >= len(node.input) or not node.input[k]:
            return None
        v = self.values.get(node.input[k])
        if v is None:
            raise MPSValueError(f"{describe(node)}: input {k} ({node.input[k]!r}) is not produced by any earlier node")
        return v

    def const(self, node: Any, k: int, what: str, optional: bool = False) -> np.ndarray | None:
        """Input ``k`` as a constant array (MPSError naming the node when it is computed)."""
        v = self.inp(node, k)
        if v is None:
            if optional:
                return None
            raise MPSValueError(f"{describe(node)}: input {k} ({what}) is required")
        if v.const is None:
            raise MPSValueError(f"{describe(node)}: input {k} ({what}, {v.name!r}) must be a constant (an initializer or "
                                f"folded at load time), but it is computed by the graph")
        return v.const

    def set_const(self, name: str, array: np.ndarray) -> None:
        self.values[name] = Value(name, tuple(np.shape(array)), np.asarray(array).dtype, const=np.asarray(array))

    def set_image(self, node: Any, k: int, image: MPSNNImageNode, shape: Sequence[Any], axes: Sequence[Any] | None = None,
                  dtype: np.dtype | None = None) -> Value:
        """Output ``k`` of ONNX node ``node`` is ``image`` (standard axes unless given)."""
        name = node.output[k]
        ax = tuple(axes) if axes is not None else standard_axes(len(shape))
        if ax is None:
            raise MPSValueError(f"{describe(node)}: its result {name!r} has rank {len(shape)}; images hold tensors of rank 1 to 4")
        if any(d == 0 for d in shape):
            raise MPSValueError(f"{describe(node)}: its result {name!r} has shape {tuple(shape)}; an image cannot hold an empty tensor")
        if image.producer is not None and image.producer.label is None:
            image.producer.label = node.name or f"{node.op_type}:{name}"
        v = Value(name, tuple(shape), dtype if dtype is not None else np.dtype(np.float32), node=image, axes=ax)
        self.values[name] = v
        return v

    def set_pending(self, node: Any, source: Value, op: LayoutOp, shape: Sequence[Any], what: str,
                    perm: Sequence[int] | None = None) -> None:
        """Output 0 of ``node`` is ``op`` applied to ``source`` (kept until a consumer needs it).
        ``perm``: ``op`` is this Transpose (the pending chain then remembers which source
        dimension each result dimension is, while it holds transposes only)."""
        base = source.pending if isinstance(source.pending, Pending) else Pending(source, perm=tuple(range(source.rank)))
        total = None if perm is None or base.perm is None else tuple(base.perm[k] for k in perm)
        p = Pending(base.source, [*base.ops, op], [*base.what, what], total)
        v = Value(node.output[0], tuple(shape), source.dtype, pending=p)
        self.values[node.output[0]] = v

    # -- images -------------------------------------------------------------------------------------
    def image_any_axes(self, value: Value, node: Any) -> tuple[MPSNNImageNode, tuple[Any, ...] | None]:
        """(image node, its axes) for operators indifferent to the axes (element-wise, the
        reductions): an image as it is held, anything else (a constant, pending movements) in
        the standard axes (axes None)."""
        if value.node is not None and value.pending is None:
            return value.node, value.axes
        return self.image(value, node), None

    def image(self, value: Value, node: Any, anchor: MPSNNImageNode | None = None) -> MPSNNImageNode:
        """The image node holding ``value`` in its standard axes (relayout / constant made here
        when needed)."""
        if value.pending is not None:
            value = self.materialize(value, node)
        if value.const is not None:
            ax = standard_axes(value.rank)
            if ax is None:
                raise MPSValueError(f"{describe(node)}: constant {value.name!r} of rank {value.rank} has no image layout")
            return self.constant_image(onnx_to_nhwc(value.const.astype(np.float32), ax), anchor, node)
        assert value.node is not None
        if not value.is_standard():
            value = self.relayout(value, node)
        return value.node

    def constant_image(self, nhwc: np.ndarray, anchor: MPSNNImageNode | None, node: Any) -> MPSNNImageNode:
        a = anchor if anchor is not None else self.anchor
        if a is None:
            raise MPSValueError(f"{describe(node)}: a constant operand needs an image of the graph to go with, and there is none")
        c = ConstantImageNode(a, nhwc)
        c.label = f"constant for {node.name or node.op_type}"
        return c.result_image

    def relayout(self, value: Value, node: Any) -> Value:
        """``value`` moved to its standard axes (a RelayoutNode)."""
        std = standard_axes(value.rank)
        if std is None:
            raise MPSValueError(f"{describe(node)}: input {value.name!r} of rank {value.rank} has no image layout")
        p = Pending(value)
        return self._emit_pending(p, value.name + ":standard", value.shape, node)

    def materialize(self, value: Value, node: Any) -> Value:
        p: Pending = value.pending
        out = self._emit_pending(p, value.name, value.shape, node)
        self.values[value.name] = out
        return out

    def image_in_axes(self, value: Value, node: Any, axes: Sequence[Any]) -> MPSNNImageNode:
        """The image node holding ``value`` with the given axes (one per ONNX dimension), for
        operators that need a particular dimension on the channels (MatMul and
        LayerNormalization over the last dimension). Free when the value is already held so,
        or when its pending movements keep the NHWC order (a Transpose (0, 2, 3, 1) of an
        (N, C, H, W) image is that image with axes n, h, w, c); else one gather."""
        axes = tuple(axes)
        if value.const is not None:
            return self.constant_image(onnx_to_nhwc(value.const.astype(np.float32), axes), None, node)
        if value.pending is None and value.axes == axes:
            assert value.node is not None
            return value.node
        p = value.pending if value.pending is not None else Pending(value)
        out = self._emit_pending(p, value.name + ":axes", value.shape, node, axes)
        assert out.node is not None
        return out.node

    def _emit_pending(self, p: Pending, name: str, shape: Sequence[Any], node: Any, axes: Sequence[Any] | None = None) -> Value:
        src = p.source
        ax = standard_axes(len(shape)) if axes is None else tuple(axes)
        if ax is None:
            raise MPSValueError(f"{describe(node)}: {'/'.join(p.what) or 'relayout'} gives {name!r} rank {len(shape)}; "
                                "only tensors of rank 1 to 4 can be images")
        declared = src.shape[0] if src.axes and src.axes[0] == "n" else None

        def index(batch: int) -> np.ndarray:
            arr = _probe(src, batch)
            for op in p.ops:
                arr = op(arr, batch)
            return onnx_to_nhwc(arr, ax)

        b0 = declared if isinstance(declared, int) else 2
        try:
            idx0 = index(b0)
        except (ValueError, MPSError) as exc:
            raise MPSValueError(f"{describe(node)}: cannot move {src.name!r} ({'/'.join(p.what) or 'relayout'}): {exc}") from exc
        what = "/".join(p.what) or "relayout"
        src_img = src.node
        assert src_img is not None
        sdims = src.image_dims()
        whole = int(np.prod([b0 if a == "n" else int(sdims[a]) for a in IMAGE_AXES]))
        same_order = idx0.size == whole and np.array_equal(idx0.reshape(-1), np.arange(idx0.size))
        if same_order and idx0.shape[0] == b0 and "n" in (src.axes or ()) and (src.axes or ())[0] == "n" and ax and ax[0] == "n":
            n, h, w, c = idx0.shape
            if (h, w, c) == (sdims["h"], sdims["w"], sdims["c"]):
                return Value(name, tuple(shape), src.dtype, node=src_img, axes=ax)
            from ...graph.nodes.resampling import MPSNNReshapeNode
            reshaped = MPSNNReshapeNode(src_img, w, h, c)
            reshaped.label = f"{node.name or node.op_type}: {what}"
            return Value(name, tuple(shape), src.dtype, node=reshaped.result_image, axes=ax)
        cache: dict[int, Any] = {b0: idx0}

        def fn(t: Any) -> Any:
            import torch
            n = t.shape[0] if "n" in (src.axes or ()) else b0
            idx = cache.get(n)
            if idx is None:
                try:
                    idx = cache[n] = index(n)
                except (ValueError, MPSError) as exc:
                    raise MPSValueError(f"{describe(node)}: {what} does not apply to a batch of {n}: {exc}") from exc
            key = ("t", t.device)
            tidx = cache.get(key)  # type: ignore[call-overload]
            if tidx is None or tidx.shape != idx.shape:
                tidx = cache[key] = torch.as_tensor(idx, device=t.device)  # type: ignore[index]
            return t.reshape(-1)[tidx.reshape(-1)].reshape(idx.shape)

        r = RelayoutNode(src_img, fn, f"{node.name or node.op_type}: {what}")
        return Value(name, tuple(shape), src.dtype, node=r.result_image, axes=ax)

    # -- the walk -----------------------------------------------------------------------------------
    def run(self) -> None:
        onnx = self.onnx
        g = self.graph
        for init in g.initializer:
            self.set_const(init.name, onnx.numpy_helper.to_array(init))
        for sp in getattr(g, "sparse_initializer", []):
            raise MPSValueError(f"mpsnn.io.onnx.load: sparse initializer {sp.values.name!r} is not supported")
        for vi in g.input:
            if vi.name in self.values:
                continue  # an initializer listed as input (IR < 4): a constant
            ty = self._type_of(vi)
            if ty is None:
                raise MPSTypeError(f"mpsnn.io.onnx.load: input {vi.name!r} is not a tensor")
            shape, dt = ty
            ax = standard_axes(len(shape))
            if ax is None:
                raise MPSValueError(f"mpsnn.io.onnx.load: input {vi.name!r} has rank {len(shape)}; image inputs have rank 1 to 4")
            img = MPSNNImageNode(ONNXTensorHandle(vi.name))
            v = Value(vi.name, shape, dt, node=img, axes=ax)
            self.values[vi.name] = v
            self.inputs.append(v)
            if self.anchor is None:
                self.anchor = img
        # `done` and the fusions key nodes by id(): protobuf (upb) hands out one wrapper object
        # per node only while a reference to it lives, and a freed wrapper's id is reused by a
        # later node's (a Constant folded early then made a later Constant count as done); this
        # list keeps every wrapper alive, so each node keeps one id for the whole import
        self.nodes = list(g.node)
        self.producers = {name: node for node in self.nodes for name in node.output if name}
        # Constant nodes have no inputs: fold them first, so a fusion that looks ahead (a Clip's
        # bounds read while its Conv is mapped) finds them even when the exporter wrote them
        # after the node that looks
        for node in self.nodes:
            if node.op_type == "Constant" and not node.input:
                self.fold(node)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        problems = unsupported(self.model, self.opset)
        if problems:
            raise MPSValueError("mpsnn.io.onnx.load: the model uses what mpsnn does not support: " + "; ".join(problems))
        from .ops import FOLDABLE_ONLY, MAPPERS
        for node in self.nodes:
            if id(node) in self.done:
                continue
            ins = [self.values.get(n) for n in node.input if n]
            for n in node.input:
                if n and n not in self.values:
                    raise MPSValueError(f"{describe(node)}: input {n!r} is not produced by any earlier node")
            if node.op_type in FOLDABLE_ONLY or all(v is not None and v.const is not None for v in ins):
                self.fold(node)
                continue
            try:
                MAPPERS[node.op_type](self, node, attributes(node))
            except MPSError:
                raise
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise MPSValueError(f"{describe(node)}: {exc}") from exc
            self.done.add(id(node))

    def fold(self, node: Any) -> None:
        """Evaluate ``node`` on constants with ONNX's reference evaluator."""
        from onnx.reference import ReferenceEvaluator
        if node.op_type == "Shape":
            self._fold_shape(node)
            return
        ins = [self.values[n].const if n else None for n in node.input]
        if node.op_type == "CastLike" and len(ins) > 1 and ins[0] is not None and ins[1] is None:
            # CastLike reads only the element type of its second input (function bodies such as
            # Elu-18's cast a constant "like" the computed X): fold with an empty array of that type
            ins[1] = np.zeros((0,), self.values[node.input[1]].dtype)
        if any(a is None for a, n in zip(ins, node.input) if n):
            raise MPSValueError(f"{describe(node)}: {node.op_type} needs constant inputs here (it is folded at load time), "
                                "but an input is computed by the graph")
        try:
            # a one-node model with the model's opset imports: the evaluator picks the operator
            # version of that opset (given a bare NodeProto it takes the newest one, whose
            # Unsqueeze / Squeeze / Reduce* read axes from an input, not an attribute)
            from onnx import helper
            feeds = {n: a for n, a in zip(node.input, ins) if n}
            graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(n, 0, None) for n in feeds],
                                      [helper.make_tensor_value_info(n, 0, None) for n in node.output if n])
            model = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            outs = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - the evaluator's own error types
            raise MPSValueError(f"{describe(node)}: folding {node.op_type} at load time failed: {exc}") from exc
        for name, arr in zip(node.output, outs):
            if name:
                self.set_const(name, np.asarray(arr))
        self.done.add(id(node))

    def _fold_shape(self, node: Any) -> None:
        v = self.values[node.input[0]]
        shape = [BATCH_SENTINEL if (d is None and k == 0) else d for k, d in enumerate(v.shape)]
        if any(d is None for d in shape):
            raise MPSValueError(f"{describe(node)}: the shape of {v.name!r} ({v.shape}) is not known at load time")
        arr = np.array(shape, dtype=np.int64)
        a = attributes(node)
        start, end = a.get("start", 0), a.get("end", None)
        arr = arr[start:end]
        self.set_const(node.output[0], arr)
        self.done.add(id(node))

    # -- helpers for mappers --------------------------------------------------------------------------
    def only_consumer(self, name: str, op_types: Sequence[str]) -> Any:
        """The single consumer of ``name`` when it has one of ``op_types`` and ``name`` is not a
        graph output, else None (fusion candidates)."""
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or name in self.outputs or cons[0].op_type not in op_types:
            return None
        return cons[0]


def describe(node: Any) -> str:
    return f"ONNX node {node.name!r} ({node.op_type})" if node.name else f"ONNX {node.op_type} node (-> {list(node.output)})"


def attributes(node: Any) -> dict[str, Any]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unsupported(model: Any, opset: int) -> list[str]:
    """Every unsupported operator (with its node names) and every unsupported attribute value,
    before any work is done."""
    from .ops import CHECKS, FOLDABLE_ONLY, MAPPERS
    by_type: dict[str, list[str]] = {}
    details: list[str] = []
    for k, node in enumerate(model.graph.node):
        label = node.name or f"#{k}"
        if node.domain not in ("", "ai.onnx") or (node.op_type not in MAPPERS and node.op_type not in FOLDABLE_ONLY):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            by_type.setdefault(key, []).append(label)
            continue
        check = CHECKS.get(node.op_type)
        if check is not None:
            why = check(attributes(node), opset)
            if why:
                details.append(f"{node.op_type} node {label!r}: {why}")
    out = [f"unsupported op type {t} (nodes {', '.join(repr(n) for n in names)})" for t, names in sorted(by_type.items())]
    return out + details
