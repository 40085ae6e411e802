"""The device-free part of building an MPSNNGraph (spec/graph.md §9, §11): which filters run,
in which order, which images and states are graph inputs and outputs, and how many times each
intermediate image is read (its temporary image's ``read_count``).

Orders (deterministic, documented in :class:`~mpsnn.MPSNNGraph`):

* **execution order**: a depth-first post-order from the result image nodes (in the order
  given), visiting a filter's source images in order, then its source states;
* **source images / states**: in the order the execution order first reads them;
* **intermediate images**: exported images (``export_from_graph``) in execution order, then
  the extra results of a multi-result graph in the order given (those needed or exported),
  then the first result when it is itself exported (also when it is not needed: an exported
  image is always delivered);
* **result states**: exported state nodes in execution order.

Pruning: a filter runs when it produces a needed result or an exported image or state, or when
it updates trainable parameters (a gradient node of a trainable layer whose ``training_style``
is not ``updateDeviceNone``), and every filter those depend on runs too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..core.errors import MPSTypeError, MPSValueError
from .nodes.base import MPSNNFilterNode, MPSNNImageNode, MPSNNStateNode


@dataclass
class PlannedStep:
    """One filter of the execution order and what the graph knows about it before encoding."""

    node: MPSNNFilterNode
    index: int
    #: how many later steps read the result image (each step reads an image once)
    result_reads: int = 0
    #: the step's result states are read by a later step or exported
    want_states: bool = False
    #: the result stays valid after the graph (a result or exported image): not temporary
    keep_result: bool = False
    #: nothing reads the result: no later step, no needed result, no export (the filter runs
    #: for its side effects only, e.g. the first convolution's gradient updating weights)
    result_unused: bool = False
    #: the result image is one of the graph's results
    is_result: bool = False
    #: indices of the steps that read the result image
    readers: list[int] = field(default_factory=list)


@dataclass
class ResidualFusion:
    """A residual tail the graph may run as one fused convolution (mpsnn graph fusion):
    convolution ``conv`` (no fused neuron) -> addition ``add`` with ``other`` -> ReLU ``relu``,
    where the convolution's and the addition's results have no other reader and are neither
    results nor exported. The fused convolution runs at the addition's place (``other`` is
    ready there) and produces the ReLU's result. ``fold``: the step making ``other`` when it
    is a convolution (no fused neuron) read only by the addition: its bias then moves into
    the fused convolution's bias (one bias pass less). Whether the kernels allow it (no fused
    neuron, default arithmetic, a plain ReLU, equal shapes) is checked per encode."""

    conv: "PlannedStep"
    add: "PlannedStep"
    relu: "PlannedStep"
    other: MPSNNImageNode
    fold: "PlannedStep | None"


def _private(step: PlannedStep) -> bool:
    """The step's result has exactly one reader, and is no result, export or state source."""
    return step.result_reads == 1 and not step.keep_result and not step.want_states


def find_residual_fusions(steps: list[PlannedStep]) -> list[ResidualFusion]:
    """Every conv -> add -> ReLU tail of the plan (see :class:`ResidualFusion`)."""
    from .nodes.arithmetic import MPSNNAdditionNode
    from .nodes.convolution import MPSCNNConvolutionNode
    from .nodes.neuron import MPSCNNNeuronReLUNode

    by_result = {id(st.node._result_image): st for st in steps}
    out: list[ResidualFusion] = []
    for a in steps:
        srcs = a.node._source_images
        if type(a.node) is not MPSNNAdditionNode or len(srcs) != 2 or srcs[0] is srcs[1] or not _private(a):
            continue
        r = steps[a.readers[0]]
        if type(r.node) is not MPSCNNNeuronReLUNode or r.want_states or a.node._source_states or r.node._source_states:
            continue
        for k in (0, 1):
            c = by_result.get(id(srcs[k]))
            if c is None or type(c.node) is not MPSCNNConvolutionNode or not _private(c) or c.node._source_states:
                continue
            d = by_result.get(id(srcs[1 - k]))
            fold = d if d is not None and type(d.node) is MPSCNNConvolutionNode and _private(d) and not d.node._source_states else None
            out.append(ResidualFusion(c, a, r, srcs[1 - k], fold))
            break
    return out


@dataclass
class NormReluFusion:
    """A batch normalization followed by a ReLU in a training graph, which the graph may run
    as the batch-norm kernels with the ReLU fused (mpsnn graph fusion): forward ``norm`` ->
    ``relu``, backward ``relu_gradient`` -> ``norm_gradient``, where the normalization's result
    is read only by the ReLU and its gradient, and the ReLU gradient's result only by the
    normalization's gradient. The normalization then writes the ReLU's result, the gradient
    kernels read the ReLU gradient's incoming gradient (and recompute the pre-activation from
    the normalization's source), and the two ReLU steps do not run. Whether the kernels allow
    it (no fused neuron of their own, a plain ReLU with default geometry) is checked per
    encode."""

    norm: "PlannedStep"
    relu: "PlannedStep"
    relu_gradient: "PlannedStep"
    norm_gradient: "PlannedStep"


def find_norm_relu_fusions(steps: list[PlannedStep]) -> list[NormReluFusion]:
    """Every batch-norm -> ReLU pair of a training plan (see :class:`NormReluFusion`)."""
    from .nodes.neuron import MPSCNNNeuronGradientNode, MPSCNNNeuronReLUNode
    from .nodes.normalization import MPSCNNBatchNormalizationGradientNode, MPSCNNBatchNormalizationNode

    out: list[NormReluFusion] = []
    for b in steps:
        if type(b.node) is not MPSCNNBatchNormalizationNode or b.result_reads != 2 or b.keep_result:
            continue
        readers = [steps[i] for i in b.readers]
        relu = [r for r in readers if type(r.node) is MPSCNNNeuronReLUNode]
        rg = [r for r in readers if type(r.node) is MPSCNNNeuronGradientNode and r.node.forward_node is (relu[0].node if relu else None)]
        if len(relu) != 1 or len(rg) != 1 or rg[0].node._source_images[1] is not b.node._result_image or not _private(rg[0]):
            continue
        bg = steps[rg[0].readers[0]]
        if (type(bg.node) is not MPSCNNBatchNormalizationGradientNode or bg.node.forward_node is not b.node
                or bg.node._source_images[0] is not rg[0].node._result_image or rg[0].node._source_images[0] is b.node._result_image):
            continue
        out.append(NormReluFusion(b, relu[0], rg[0], bg))
    return out


@dataclass
class SharedGradient:
    """The two gradient filters of one addition in a training graph (mpsnn graph fusion):
    with unit scales, no bias and no broadcasting both compute the same image (the incoming
    gradient where the forward did not clamp), so ``second`` takes ``first``'s result (the
    image gets both filters' readers) instead of computing it again. Checked per encode."""

    first: "PlannedStep"
    second: "PlannedStep"


def find_shared_gradients(steps: list[PlannedStep]) -> list[SharedGradient]:
    """Every pair of addition gradients of one forward addition, reading one incoming gradient
    and one state, neither result kept (see :class:`SharedGradient`)."""
    from .nodes.arithmetic import MPSNNAdditionGradientNode

    groups: dict[tuple[int, int, int], list[PlannedStep]] = {}
    for st in steps:
        n = st.node
        if type(n) is MPSNNAdditionGradientNode and n.forward_node is not None and not st.keep_result and len(n._source_states) == 1:
            groups.setdefault((id(n.forward_node), id(n._source_images[0]), id(n._source_states[0])), []).append(st)
    return [SharedGradient(g[0], g[1]) for g in groups.values()
            if len(g) == 2 and g[0].node.is_secondary_source_filter != g[1].node.is_secondary_source_filter]  # type: ignore[attr-defined]


@dataclass
class AddReluFusion:
    """A residual addition followed by a ReLU (slope 0) in a training graph (mpsnn graph
    fusion): the addition also applies the ReLU and folds its derivative into the gradient
    state's mask, so the ReLU and its gradient filter do not run and the addition's gradient
    pair (``gradients``, shared) reads the ReLU gradient's incoming gradient. The addition's
    result is read only by the ReLU and its gradient, the ReLU gradient's only by the pair."""

    add: "PlannedStep"
    relu: "PlannedStep"
    relu_gradient: "PlannedStep"
    gradients: SharedGradient


def find_add_relu_fusions(steps: list[PlannedStep], shared: list[SharedGradient]) -> list[AddReluFusion]:
    """Every addition -> ReLU pair of a training plan (see :class:`AddReluFusion`)."""
    from .nodes.arithmetic import MPSNNAdditionNode
    from .nodes.neuron import MPSCNNNeuronGradientNode, MPSCNNNeuronReLUNode

    by_forward = {id(sg.first.node.forward_node): sg for sg in shared}  # type: ignore[attr-defined]
    out: list[AddReluFusion] = []
    for a in steps:
        sg = by_forward.get(id(a.node))
        if type(a.node) is not MPSNNAdditionNode or sg is None or a.result_reads != 2 or a.keep_result:
            continue
        readers = [steps[i] for i in a.readers]
        relu = [r for r in readers if type(r.node) is MPSCNNNeuronReLUNode and r.node.a == 0.0]  # type: ignore[attr-defined]
        rg = [r for r in readers if type(r.node) is MPSCNNNeuronGradientNode and relu and r.node.forward_node is relu[0].node]
        if len(relu) != 1 or len(rg) != 1 or rg[0].node._source_images[1] is not a.node._result_image or rg[0].keep_result:
            continue
        g = rg[0].node._result_image
        if sorted(rg[0].readers) != sorted([sg.first.index, sg.second.index]) or any(st.node._source_images[0] is not g for st in (sg.first, sg.second)):
            continue
        out.append(AddReluFusion(a, relu[0], rg[0], sg))
    return out


@dataclass
class GraphPlan:
    steps: list[PlannedStep]
    source_images: list[MPSNNImageNode]
    source_states: list[MPSNNStateNode]
    #: how many steps read source image i / source state i
    source_image_reads: list[int]
    source_state_reads: list[int]
    results: list[MPSNNImageNode]
    results_needed: list[bool]
    intermediate_images: list[MPSNNImageNode]
    result_states: list[MPSNNStateNode]
    #: id(image node) -> index of the last step reading it, computed once by make_plan
    _last_reader: dict[int, int] = field(default_factory=dict)
    #: conv -> add -> ReLU tails the graph may fuse (:func:`find_residual_fusions`)
    fusions: list[ResidualFusion] = field(default_factory=list)
    #: batch-norm -> ReLU pairs of a training graph the graph may fuse (:func:`find_norm_relu_fusions`)
    norm_relu: list[NormReluFusion] = field(default_factory=list)
    #: addition gradient pairs computing one image (:func:`find_shared_gradients`)
    shared_gradients: list[SharedGradient] = field(default_factory=list)
    #: addition -> ReLU pairs of a training graph the graph may fuse (:func:`find_add_relu_fusions`)
    add_relu: list[AddReluFusion] = field(default_factory=list)

    def last_reader(self) -> dict[int, int]:
        """id(image node) -> index of the last step reading it (lifetime end)."""
        return self._last_reader


def _inputs(node: MPSNNFilterNode) -> list[MPSNNFilterNode]:
    out = []
    for img in node._source_images:
        if img._producer is not None:
            out.append(img._producer)
    for st in node._source_states:
        if st._producer is not None:
            out.append(st._producer)
    return out


def _post_order(roots: Sequence[MPSNNFilterNode]) -> list[MPSNNFilterNode]:
    """Depth-first post-order (iterative); raises on a cycle, naming a filter on it."""
    order: list[MPSNNFilterNode] = []
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    for root in roots:
        if state.get(id(root)) == 2:
            continue
        stack: list[tuple[MPSNNFilterNode, int]] = [(root, 0)]
        state[id(root)] = 1
        while stack:
            node, k = stack[-1]
            ins = _inputs(node)
            if k < len(ins):
                stack[-1] = (node, k + 1)
                nxt = ins[k]
                s = state.get(id(nxt))
                if s == 1:
                    raise MPSValueError(f"MPSNNGraph: the node graph has a cycle through {nxt._describe()} "
                                        "(a filter may not depend on its own result)")
                if s is None:
                    state[id(nxt)] = 1
                    stack.append((nxt, 0))
            else:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
    return order


def make_plan(results: Sequence[MPSNNImageNode], results_needed: Sequence[bool]) -> GraphPlan:
    """Build the execution plan for ``results`` (device-free; see the module docstring)."""
    if not results:
        raise MPSValueError("MPSNNGraph: `result_images` must hold at least one MPSNNImageNode")
    for k, r in enumerate(results):
        if not isinstance(r, MPSNNImageNode):
            raise MPSTypeError(f"MPSNNGraph: `result_images[{k}]` must be an MPSNNImageNode, but got {type(r).__name__}")
        if r._producer is None:
            raise MPSValueError(f"MPSNNGraph: `result_images[{k}]` ({r._describe()}) is not the result of a filter node; "
                                "a graph needs at least one filter between its sources and each result")
    if len(results_needed) != len(results):
        raise MPSValueError(f"MPSNNGraph: `results_are_needed` has {len(results_needed)} flags, expected one per result ({len(results)})")
    everything = _post_order([r._producer for r in results])  # type: ignore[misc]

    # pruning: required roots, then their dependencies
    required: set[int] = set()
    roots: list[MPSNNFilterNode] = []
    for r, need in zip(results, results_needed):
        if need:
            roots.append(r._producer)  # type: ignore[arg-type]
    for node in everything:
        exports = node._result_image.export_from_graph or any(s.export_from_graph for s in node._result_states or [])
        if exports or node._is_trainable_update():
            roots.append(node)
    for node in _post_order(roots) if roots else []:
        required.add(id(node))
    order = [n for n in everything if id(n) in required]

    steps = [PlannedStep(n, i) for i, n in enumerate(order)]
    by_result: dict[int, PlannedStep] = {id(s.node._result_image): s for s in steps}
    by_state: dict[int, PlannedStep] = {}
    for s in steps:
        for sn in s.node._result_states or []:
            by_state[id(sn)] = s
    source_images: list[MPSNNImageNode] = []
    source_states: list[MPSNNStateNode] = []
    img_reads: dict[int, int] = {}
    state_reads: dict[int, int] = {}
    for s in steps:
        seen: set[int] = set()
        for img in s.node._source_images:
            if id(img) in seen:
                continue
            seen.add(id(img))
            prod = by_result.get(id(img))
            if prod is None:
                if img._producer is not None:  # pragma: no cover - dependencies are always required
                    raise MPSValueError(f"MPSNNGraph: {img._describe()} is read by {s.node._describe()} but its producer is not scheduled")
                if id(img) not in img_reads:
                    source_images.append(img)
                img_reads[id(img)] = img_reads.get(id(img), 0) + 1
            else:
                prod.result_reads += 1
                prod.readers.append(s.index)
        for st in s.node._source_states:
            prod = by_state.get(id(st))
            if prod is None:
                if id(st) not in state_reads:
                    source_states.append(st)
                state_reads[id(st)] = state_reads.get(id(st), 0) + 1
            else:
                prod.want_states = True
    last: dict[int, int] = {}
    for s in steps:
        if any(sn.export_from_graph for sn in s.node._result_states or []):
            s.want_states = True
        img = s.node._result_image
        s.is_result = any(img is r for r in results)
        if img.export_from_graph or s.is_result:
            s.keep_result = True
        s.result_unused = (s.result_reads == 0 and not img.export_from_graph
                           and not any(img is r and need for r, need in zip(results, results_needed)))
        for src in s.node._source_images:
            last[id(src)] = s.index

    intermediates: list[MPSNNImageNode] = []
    for s in steps:
        img = s.node._result_image
        if img.export_from_graph and img is not results[0] and not any(img is r for r in results[1:]):
            intermediates.append(img)
    for r, need in zip(results[1:], results_needed[1:]):
        if (need or r.export_from_graph) and id(r) in by_result:
            intermediates.append(r)
    if results[0].export_from_graph and id(results[0]) in by_result:
        intermediates.append(results[0])
    result_states = [sn for s in steps for sn in s.node._result_states or [] if sn.export_from_graph]
    fusions = find_residual_fusions(steps)
    for f in fusions:
        # a fused convolution runs at its addition's place: its sources live until then
        for src in f.conv.node._source_images:
            last[id(src)] = max(last.get(id(src), -1), f.add.index)
    norm_relu = find_norm_relu_fusions(steps)
    for nf in norm_relu:
        # the normalization's gradient reads the ReLU gradient's incoming gradient instead
        dy = nf.relu_gradient.node._source_images[0]
        last[id(dy)] = max(last.get(id(dy), -1), nf.norm_gradient.index)
    shared = find_shared_gradients(steps)
    add_relu = find_add_relu_fusions(steps, shared)
    for af in add_relu:
        # the addition's gradient pair reads the ReLU gradient's incoming gradient instead
        dy = af.relu_gradient.node._source_images[0]
        last[id(dy)] = max(last.get(id(dy), -1), af.gradients.first.index, af.gradients.second.index)
    return GraphPlan(steps, source_images, source_states,
                     [img_reads[id(i)] for i in source_images], [state_reads[id(s)] for s in source_states],
                     list(results), list(results_needed), intermediates, result_states, last, fusions, norm_relu, shared, add_relu)
