"""The MPSNNGraph planner (mpsnn/graph/plan.py, spec/graph.md §9, §11) on random DAGs.

Device-free part: random DAGs of unary (neuron) and binary (arithmetic) nodes go straight to
:func:`mpsnn.graph.plan.make_plan` (no kernels are built). Checked against an independent
reading of the documented rules: the execution order is the depth-first post-order from the
results (sources in order), filtered to the required filters, hence topological; every source
image appears once, in first-read order; read counts are the numbers of distinct steps reading
an image; results and exported images are ``keep_result``; pruning keeps exactly the ancestors
of the needed results and of the exported images / states; the intermediate-image order is
the documented one; every image the plan computes and keeps is handed out; a forced cycle
raises MPSValueError naming a filter on the cycle.

Memory-planner part (CPU, real MPSTemporaryImage objects): random graphs are run with each
filter's encode wrapped to record the storage of its result and the free blocks of the command
buffer's temporary pool. No image that is still to be read (or kept) has its storage free in the
pool after a step; no two images alive at the same time share storage (an image whose last
reader has not run yet, or is the step being encoded, is never aliased by a newer result);
results and exported images share storage with no other result; every temporary image is fully
consumed (read_count 0) after the encode; the values equal a float64 NumPy evaluation of the
same DAG. A chain checks that the pool is really reused.

Decisions (inferred): a filter reading the same image twice counts as one read (as one kernel
encode consumes a temporary image once); an exported first result that is needed may arrive both
as the result and in ``intermediate_images`` (plan.py documents it there); the memory check
reads the command buffer's pool (``MTLCommandBuffer._pool``) and each step's result pointer
right after the step's encode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpsnn as m
from mpsnn import MPSImageFeatureChannelFormat as F
from mpsnn.graph.nodes.arithmetic import MPSNNAdditionNode, MPSNNMultiplicationNode, MPSNNSubtractionNode
from mpsnn.graph.nodes.base import MPSNNFilterNode, MPSNNImageNode
from mpsnn.graph.nodes.neuron import (
    MPSCNNNeuronAbsoluteNode,
    MPSCNNNeuronLinearNode,
    MPSCNNNeuronReLUNode,
    MPSCNNNeuronSigmoidNode,
    MPSCNNNeuronTanHNode,
)
from mpsnn.graph.plan import make_plan

UNARY = {
    "relu": (lambda s: MPSCNNNeuronReLUNode(s), lambda a: np.maximum(a, 0)),
    "sigmoid": (lambda s: MPSCNNNeuronSigmoidNode(s), lambda a: 1 / (1 + np.exp(-a))),
    "linear": (lambda s: MPSCNNNeuronLinearNode(s, a=0.5, b=0.25), lambda a: 0.5 * a + 0.25),
    "tanh": (lambda s: MPSCNNNeuronTanHNode(s), lambda a: np.tanh(a)),
    "abs": (lambda s: MPSCNNNeuronAbsoluteNode(s), lambda a: np.abs(a)),
}
BINARY = {
    "add": (lambda s, t: MPSNNAdditionNode(s, t), lambda a, b: a + b),
    "sub": (lambda s, t: MPSNNSubtractionNode(s, t), lambda a, b: a - b),
    "mul": (lambda s, t: MPSNNMultiplicationNode(s, t), lambda a, b: a * b),
}


@dataclass
class Spec:
    n_inputs: int
    nodes: list[tuple[str, list[int], bool, bool]]     # kind, source indices, export image, export state
    results: list[int]                                  # node indices
    needed: list[bool]


@st.composite
def specs(draw: Any, max_nodes: int = 12, mostly_needed: bool = False, min_nodes: int = 1) -> Spec:
    n_inputs = draw(st.integers(1, 3))
    n = draw(st.integers(min_nodes, max_nodes))
    nodes = []
    for i in range(n):
        avail = n_inputs + i
        pick = st.integers(0, avail - 1)
        if draw(st.integers(0, 2)) == 0:
            kind = draw(st.sampled_from(sorted(BINARY)))
            srcs = [draw(st.one_of(pick, st.just(avail - 1))), draw(pick)]
        else:
            kind = draw(st.sampled_from(sorted(UNARY)))
            srcs = [draw(st.one_of(pick, st.just(avail - 1)))]     # often the newest image: deep graphs
        nodes.append((kind, srcs, draw(st.integers(0, 4)) == 0, draw(st.integers(0, 9)) == 0))
    results = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=min(3, n), unique=True))
    flag = st.sampled_from([True, True, True, False]) if mostly_needed else st.booleans()
    needed = draw(st.lists(flag, min_size=len(results), max_size=len(results)))
    return Spec(n_inputs, nodes, results, needed)


class Built:
    def __init__(self, spec: Spec, exports: bool = True) -> None:
        self.spec = spec
        self.inputs = [MPSNNImageNode(f"in{i}") for i in range(spec.n_inputs)]
        images = list(self.inputs)
        self.filters: list[MPSNNFilterNode] = []
        for i, (kind, srcs, exp_img, exp_state) in enumerate(spec.nodes):
            args = [images[k] for k in srcs]
            f = UNARY[kind][0](*args) if kind in UNARY else BINARY[kind][0](*args)
            f.label = f"n{i}"
            f.result_image.handle = f"r{i}"
            if exports:
                f.result_image.export_from_graph = exp_img
                if exp_state and f.result_state is not None:
                    f.result_state.export_from_graph = True
            self.filters.append(f)
            images.append(f.result_image)
        self.result_filters = [self.filters[k] for k in spec.results]
        self.results = [f.result_image for f in self.result_filters]
        self.needed = list(spec.needed)


def ref_post_order(roots: list[MPSNNFilterNode]) -> list[MPSNNFilterNode]:
    order: list[MPSNNFilterNode] = []
    done: set[int] = set()

    def visit(node: MPSNNFilterNode) -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for img in node.source_images:
            if img.producer is not None:
                visit(img.producer)
        order.append(node)

    for r in roots:
        visit(r)
    return order


def ancestors(nodes: list[MPSNNFilterNode]) -> set[int]:
    return {id(n) for n in ref_post_order(nodes)}


def exports_something(f: MPSNNFilterNode) -> bool:
    return f.result_image.export_from_graph or any(s.export_from_graph for s in f.result_states or [])


# ----------------------------------------------------------------------------------------------
# device-free planner properties
# ----------------------------------------------------------------------------------------------
@settings(max_examples=250, deadline=None)
@given(specs())
def test_plan_properties(spec: Spec) -> None:
    b = Built(spec)
    plan = make_plan(b.results, b.needed)
    steps = plan.steps
    nodes = [s.node for s in steps]
    pos = {id(n): k for k, n in enumerate(nodes)}

    # indices, no duplicates
    assert [s.index for s in steps] == list(range(len(steps)))
    assert len(pos) == len(nodes)

    # pruning: exactly the ancestors of the needed results and of the exporting filters
    everything = ref_post_order(b.result_filters)
    roots = [f for f, need in zip(b.result_filters, b.needed) if need] + [f for f in everything if exports_something(f)]
    required = ancestors(roots) if roots else set()
    assert set(pos) == required
    # execution order: the documented depth-first post-order, filtered
    assert nodes == [f for f in everything if id(f) in required]
    # ... which is topological
    for s in steps:
        for img in s.node.source_images:
            if img.producer is not None:
                assert id(img.producer) in pos and pos[id(img.producer)] < s.index

    # source images: graph inputs read by a step, each once, in first-read order
    first_read: list[MPSNNImageNode] = []
    for n in nodes:
        for img in n.source_images:
            if img.producer is None and all(img is not x for x in first_read):
                first_read.append(img)
    assert [id(x) for x in plan.source_images] == [id(x) for x in first_read]
    assert len({id(x) for x in plan.source_images}) == len(plan.source_images)
    for img, reads in zip(plan.source_images, plan.source_image_reads):
        assert reads == sum(1 for n in nodes if any(s is img for s in n.source_images))
    assert plan.source_states == [] and plan.source_state_reads == []

    # read counts and readers of every result
    last = plan.last_reader()
    for s in steps:
        readers = [t.index for t in steps if any(x is s.node.result_image for x in t.node.source_images)]
        assert s.readers == readers
        assert s.result_reads == len(readers)
        if readers:
            assert last[id(s.node.result_image)] == readers[-1]
        assert all(r > s.index for r in readers)
        keep = any(s.node.result_image is r for r in b.results) or s.node.result_image.export_from_graph
        assert s.keep_result == keep
        assert s.want_states == any(x.export_from_graph for x in s.node.result_states or [])

    # outputs
    assert plan.results == b.results and plan.results_needed == b.needed
    # the documented order (plan.py), where unambiguous (no exported result that is not needed)
    if not any(r.export_from_graph and not need for r, need in zip(b.results, b.needed)):
        inter = [n.result_image for n in nodes
                 if n.result_image.export_from_graph and all(n.result_image is not r for r in b.results)]
        inter += [r for r, need in zip(b.results[1:], b.needed[1:]) if need]
        if b.results[0].export_from_graph and b.needed[0]:
            inter.append(b.results[0])
        assert [x.handle for x in plan.intermediate_images] == [x.handle for x in inter]
    assert plan.result_states == [x for n in nodes for x in n.result_states or [] if x.export_from_graph]


@settings(max_examples=150, deadline=None)
@given(specs())
def test_plan_delivers_every_exported_image(spec: Spec) -> None:
    """Every image the plan keeps is handed out: the first result when it is needed, the
    exported images and the needed extra results through intermediate_images (each once there;
    an exported first result may come both ways, as documented). An exported image is never
    computed only to be dropped."""
    b = Built(spec)
    plan = make_plan(b.results, b.needed)
    inter = [id(x) for x in plan.intermediate_images]
    assert len(set(inter)) == len(inter)
    delivered = inter + ([id(b.results[0])] if b.needed[0] else [])
    kept = [s.node.result_image for s in plan.steps if s.keep_result]
    assert {id(x) for x in kept} >= set(delivered)
    wanted = {id(x) for x in kept if x.export_from_graph or any(x is r for r, need in zip(b.results, b.needed) if need)}
    assert wanted == set(delivered), "an exported image is computed but not delivered"


@settings(max_examples=150, deadline=None)
@given(specs(), st.data())
def test_forced_cycle_is_refused(spec: Spec, data: Any) -> None:
    b = Built(spec, exports=False)
    everything = ref_post_order(b.result_filters)
    a = data.draw(st.sampled_from(everything))
    # descendants of a (a included): filters with a among their ancestors
    desc = [f for f in b.filters if id(a) in ancestors([f])]
    target = data.draw(st.sampled_from(desc))
    on_cycle = {f.label for f in desc if id(f) in ancestors([target])}
    k = data.draw(st.integers(0, len(a.source_images) - 1))
    srcs = list(a.source_images)
    srcs[k] = target.result_image
    a._source_images = srcs
    with pytest.raises(m.MPSValueError, match="cycle") as ei:
        make_plan(b.results, b.needed)
    msg = str(ei.value)
    named = [lab for lab in (f.label for f in b.filters) if f"'{lab}'" in msg]
    assert named and set(named) <= on_cycle, (msg, on_cycle)


def test_plan_of_shared_input_and_double_read():
    x = MPSNNImageNode("x")
    dbl = MPSNNAdditionNode(x, x)
    r = MPSCNNNeuronReLUNode(dbl.result_image)
    both = MPSNNMultiplicationNode(r.result_image, r.result_image)
    plan = make_plan([both.result_image], [True])
    assert [s.node for s in plan.steps] == [dbl, r, both]
    assert plan.source_image_reads == [1]
    assert [s.result_reads for s in plan.steps] == [1, 1, 0]
    assert [s.keep_result for s in plan.steps] == [False, False, True]


# ----------------------------------------------------------------------------------------------
# memory planner on the CPU with real temporary images
# ----------------------------------------------------------------------------------------------
CPU = m.Device("cpu")
SHAPE = (1, 2, 3, 3)
# hypothesis' failure report imports a deprecated helper; keep a failing example readable
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def evaluate(b: Built, xs: list[np.ndarray]) -> list[np.ndarray]:
    vals: list[np.ndarray] = [x.astype(np.float64) for x in xs]
    for kind, srcs, _e, _s in b.spec.nodes:
        args = [vals[k] for k in srcs]
        vals.append(UNARY[kind][1](*args) if kind in UNARY else BINARY[kind][1](*args))
    return vals[b.spec.n_inputs:]


def pool_pointers(cb: m.MTLCommandBuffer) -> set[int]:
    """Data pointers of the storage blocks waiting in the command buffer's temporary pool."""
    return {t.data_ptr() for blocks in cb._pool.values() for t in blocks}


@dataclass
class Run:
    graph: m.MPSNNGraph
    record: list[tuple[int, Any, int]]      # (step index, result image, storage pointer), in encode order
    problems: list[str]                     # live storage found free in the pool after a step
    out: Any
    inter: list
    cb: m.MTLCommandBuffer


def run_recorded(b: Built, xs: list[np.ndarray]) -> Run:
    """Encode the graph of ``b`` on the CPU; after each step, record the step's result storage
    and check that no image still to be read (or kept) has its storage free in the pool."""
    graph = m.MPSNNGraph(CPU, result_images=b.results, results_are_needed=b.needed)
    graph.format = F.float32
    steps = graph.plan.steps
    record: list[tuple[int, Any, int]] = []
    problems: list[str] = []
    for step in steps:
        orig = step.node._encode

        def wrapped(ctx, kernel, images, states, _orig=orig, _j=step.index):
            img, out_states = _orig(ctx, kernel, images, states)
            record.append((_j, img, img.tensor.data_ptr()))
            free = pool_pointers(ctx.command_buffer)
            for i, _img, p in record:
                s = steps[i]
                live = s.keep_result or (bool(s.readers) and max(s.readers) > _j) or i == _j
                if live and p in free:
                    problems.append(f"after t{_j}: the storage of t{i} (readers {s.readers}) is free in the pool")
            return img, out_states

        step.node._encode = wrapped  # type: ignore[method-assign]
    by_handle = {x.handle: m.MPSImage.from_numpy(a, CPU) for x, a in zip(b.inputs, xs)}
    cb = CPU.make_command_queue().make_command_buffer()
    inter: list = []
    out = graph.encode(cb, [by_handle[h] for h in graph.source_image_handles], None, inter)
    return Run(graph, record, problems, out, inter, cb)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(max_nodes=10, mostly_needed=True, min_nodes=3), st.integers(0, 2**16))
def test_memory_planner_never_aliases_live_images(spec: Spec, seed: int) -> None:
    b = Built(spec)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, SHAPE).astype(np.float32) for _ in range(spec.n_inputs)]
    r = run_recorded(b, xs)
    steps = r.graph.plan.steps
    assert [x[0] for x in r.record] == [s.index for s in steps]
    assert r.problems == []
    ptr = {i: p for i, _img, p in r.record}
    img_of = {i: img for i, img, _p in r.record}
    for s in steps:
        i = s.index
        if s.keep_result:
            assert not img_of[i].is_temporary
            # results and exported images never share storage with another result
            assert all(ptr[j] != ptr[i] for j in ptr if j != i), f"kept t{i} aliased"
        else:
            assert img_of[i].is_temporary
            end = max(s.readers) if s.readers else i
            for j in range(i + 1, end + 1):
                assert ptr[j] != ptr[i], f"t{j} reuses the storage of t{i}, still read by t{end}"
            # fully consumed by its readers
            assert img_of[i].read_count == 0
    r.cb.commit()
    r.cb.wait_until_completed()
    refs = evaluate(b, xs)
    idx = {id(f.result_image): k for k, f in enumerate(b.filters)}
    if b.needed[0]:
        np.testing.assert_allclose(r.out.to_numpy(), refs[idx[id(b.results[0])]], rtol=1e-4, atol=1e-5)
    else:
        assert r.out is None
    assert len(r.inter) == len(r.graph.plan.intermediate_images)
    for node, img in zip(r.graph.plan.intermediate_images, r.inter):
        np.testing.assert_allclose(img.to_numpy(), refs[idx[id(node)]], rtol=1e-4, atol=1e-5)


def test_memory_planner_reuses_storage_in_a_chain():
    """The pool is exercised: in a chain, the result of step 0 is free once step 1 has read
    it, and step 2 takes its storage; an exported image stays out of the pool."""
    spec = Spec(1, [("relu", [0], False, False)] + [("linear", [k + 1], False, False) for k in range(3)], [3], [True])
    xs = [np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)]
    r = run_recorded(Built(spec), xs)
    ptr = [p for _i, _img, p in r.record]
    assert ptr[0] != ptr[1] and ptr[2] == ptr[0] and r.problems == []
    r.cb.commit()
    r.cb.wait_until_completed()
    np.testing.assert_allclose(r.out.to_numpy(), evaluate(Built(spec), xs)[-1], rtol=1e-6)
    spec.nodes[0] = ("relu", [0], True, False)
    r = run_recorded(Built(spec), xs)
    ptr = [p for _i, _img, p in r.record]
    assert ptr[0] not in ptr[1:] and r.problems == []
    r.cb.commit()
    r.cb.wait_until_completed()
    np.testing.assert_allclose(r.inter[0].to_numpy(), np.maximum(xs[0], 0), rtol=1e-6)


def test_memory_planner_two_readers_with_work_between():
    """t0 is read by t1 and t3; t2 allocates between the two reads and must not take t0's storage."""
    spec = Spec(1, [("relu", [0], False, False), ("sigmoid", [1], False, False), ("tanh", [2], False, False),
                    ("add", [1, 3], False, False)], [3], [True])
    xs = [np.random.default_rng(1).uniform(-1, 1, SHAPE).astype(np.float32)]
    b = Built(spec)
    r = run_recorded(b, xs)
    assert [s.readers for s in r.graph.plan.steps] == [[1, 3], [2], [3], []]
    ptr = [p for _i, _img, p in r.record]
    assert r.problems == [] and ptr[2] != ptr[0] and ptr[1] != ptr[0]
    r.cb.commit()
    r.cb.wait_until_completed()
    np.testing.assert_allclose(r.out.to_numpy(), evaluate(b, xs)[-1], rtol=1e-6)
