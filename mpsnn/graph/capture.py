"""Whole encodes of an :class:`~mpsnn.MPSNNGraph` recorded once as a CUDA graph and replayed
(mpsnn extension, switched on by ``graph.use_cuda_graph = True``; CUDA only).

A graph encode launches dozens of kernels, each after some Python work; for a small network
the host is slower than the device. A CUDA graph replays all of them from one host call.

How an encode runs when ``use_cuda_graph`` is on (spec is silent; mpsnn's decisions):

* **Signature.** Every encode computes a key: per source the batch length, per-entry image
  counts, sizes and formats; per source state the shapes of a
  :class:`~mpsnn.MPSCNNLossLabels`' images, or the identity of any other state object; which
  outputs are asked for. Changing the graph's format or reloading its weights
  (:meth:`~mpsnn.MPSNNGraph.reload_from_data_sources`) drops every capture instead.
* **First encode of a key: eager**, exactly as without the switch. It also warms up
  everything a capture may not do (Triton compilation, cuBLAS/cuDNN handles, optimizer
  tables).
* **Second encode of a key: captured, then replayed.** The graph makes static copies of the
  stacked source images and of the loss labels (one image per entry, as the caller's), records
  the whole encode (forward, gradients, data-source updates with their optimizers, whose
  deferred multi-tensor launches are flushed inside the capture) on a side stream, then
  replays it. Capturing synchronises the host with the device once (``torch.cuda.graph``).
* **Later encodes of a key: replayed.** The caller's source tensors and labels are copied
  into the static ones (one multi-tensor launch, plus a concatenation for a batch of separate
  images), the CUDA graph is replayed on the command buffer's stream, and the loss images are
  copied back into the caller's labels (one launch). No host synchronisation. The caller's
  objects are validated and bound to the capture once; while the same objects come again
  (refilled in place, the usual training loop), the binding is reused and a replay costs
  little Python.
* **Results are the capture's images.** Every replay of a key returns the same result,
  intermediate and state objects, overwritten by the next replay: copy what must outlive
  the next encode (as with any CUDA-graph runner).
* **Host-side values are those of the capture.** Python code in the nodes, data sources and
  optimizers does not run at a replay: a learning rate changed on the host, an optimizer's
  host ``time_step`` (Adam's device step count does advance) or a data source's Python
  counters stay as captured. A data source must update its weights in place (the same
  tensors), as :class:`~mpsnn.models.digits.DigitsDataSource` does; reloading weights from
  the data sources drops every capture.
* **Refused** (:class:`~mpsnn.MPSValueError`, at the encode that would capture): dropout
  nodes (their mask is drawn from a host seed per encode, which a replay would repeat) and trainable nodes with ``training_style`` ``updateDeviceCPU`` (a
  completion handler on the host). Other source states than loss labels must be passed as
  the same objects for a replay (another object is another key, a new capture).
* At most :data:`MAX_CAPTURES` keys are kept per graph (least recently used dropped); the CPU
  ignores the switch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Hashable

import torch

from ..core.device import MTLCommandBuffer, flush_deferred
from ..core.enums import MPSNNTrainingStyle
from ..core.errors import MPSError, MPSStateError, MPSValueError
from ..images.image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from ..kernels.loss_labels import MPSCNNLossLabels

if TYPE_CHECKING:
    from .graph import MPSNNGraph

#: captured keys kept per graph (least recently used dropped first)
MAX_CAPTURES = 4


class _Captured:
    """One recorded encode: the CUDA graph, its static inputs and what it returns."""

    __slots__ = ("cuda_graph", "sources", "labels", "result", "intermediate", "states", "command_buffer")

    def __init__(self) -> None:
        self.cuda_graph: Any = None
        self.sources: list[MPSImage] = []                  # one stacked static image per source handle
        self.labels: list[list[Any]] = []                  # per source state handle: the static entries
        self.result: list[MPSImage] | None = None
        self.intermediate: list[Any] | None = None
        self.states: list[Any] | None = None
        self.command_buffer: MTLCommandBuffer | None = None  # keeps the capture's temporary storage


def _labels_tensors(lab: MPSCNNLossLabels) -> list[torch.Tensor]:
    w = lab.weights_image()
    return [lab.labels_image().tensor] + ([] if w is None else [w.tensor])


def signature(batches: list[list[MPSImage]], states: list[list[Any]] | None, want_intermediate: bool, want_states: bool) -> Hashable:
    src = tuple(tuple((img.number_of_images, img.height, img.width, img.feature_channels, int(img.feature_channel_format))
                      for img in b) for b in batches)
    sts: list[Any] = []
    for b in states or []:
        row: list[Any] = []
        for s in b:
            if isinstance(s, MPSCNNLossLabels):
                row.append(("labels", tuple(tuple(t.shape) for t in _labels_tensors(s)), tuple(s.loss_image().tensor.shape)))
            elif getattr(s, "is_temporary", False):
                raise MPSValueError(f"MPSNNGraph: `use_cuda_graph`: source state {s!r} must not be temporary (a replay reuses "
                                    f"the states it captured; only MPSCNNLossLabels are copied in)")
            else:
                row.append(("object", id(s)))
        sts.append(tuple(row))
    return (src, tuple(sts), want_intermediate, want_states)


def check_capturable(graph: "MPSNNGraph") -> None:
    """Refuse the nodes a replay would run wrongly (see the module docstring)."""
    from .nodes.dropout import MPSCNNDropoutGradientNode, MPSCNNDropoutNode
    for st in graph.plan.steps:
        node = st.node
        if isinstance(node, (MPSCNNDropoutNode, MPSCNNDropoutGradientNode)):
            raise MPSValueError(f"MPSNNGraph: `use_cuda_graph` cannot capture node {node._describe()}: its dropout mask "
                                f"(keep_probability {node.keep_probability}) is drawn from a host seed per encode, which a replay "
                                f"would repeat; encode this graph with use_cuda_graph False")
        if getattr(node, "_training_style", None) == MPSNNTrainingStyle.updateDeviceCPU:
            raise MPSValueError(f"MPSNNGraph: `use_cuda_graph` cannot capture node {node._describe()}: its training_style "
                                f"updateDeviceCPU updates weights in a host completion handler; use updateDeviceGPU or "
                                f"use_cuda_graph False")


class _Binding:
    """The copies that bind one caller's objects to a capture's static inputs, worked out once
    and reused while the caller passes the same objects (the Python cost of a replay is then a
    tuple of ids and three launches)."""

    __slots__ = ("ids", "objects", "key", "cap", "cats", "dst", "src", "loss_dst", "loss_src", "reads")

    def __init__(self, graph: "MPSNNGraph", ids: tuple[Any, ...], key: Hashable, cap: _Captured, batches: list[list[MPSImage]],
                 states: list[list[Any]] | None) -> None:
        self.ids, self.key, self.cap = ids, key, cap
        self.objects = (batches, states)              # keeps the objects behind ``ids`` alive
        self.cats: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []
        for static, b in zip(cap.sources, batches):
            got = _source_tensors(b)
            if isinstance(got, list):
                self.cats.append((got, static.tensor))
            elif got.data_ptr() != static.tensor.data_ptr():
                self.dst.append(static.tensor)
                self.src.append(got)
        self.loss_dst: list[torch.Tensor] = []
        self.loss_src: list[torch.Tensor] = []
        for statics, row in zip(cap.labels, states or []):
            for s_static, s in zip(statics, row):
                if isinstance(s, MPSCNNLossLabels) and s is not s_static:
                    self.dst += _labels_tensors(s_static)
                    self.src += _labels_tensors(s)
                    self.loss_dst.append(s.loss_image().tensor)
                    self.loss_src.append(s_static.loss_image().tensor)
        # what an eager encode does to the caller's temporary sources: their read counts drop
        plan = graph.plan
        self.reads: list[tuple[Any, int]] = [(img, plan.source_image_reads[i]) for i, b in enumerate(batches) for img in b
                                             if isinstance(img, MPSTemporaryImage)]
        self.reads += [(s, plan.source_state_reads[j]) for j, row in enumerate(states or []) for s in row
                       if isinstance(s, MPSCNNLossLabels) and s.is_temporary]

    def load(self) -> None:
        """Copy the caller's sources and labels into the static ones (current stream)."""
        for parts, static in self.cats:
            torch.cat(parts, out=static)
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)

    def store(self) -> None:
        """Copy the losses of the replay into the caller's labels."""
        if self.loss_dst:
            torch._foreach_copy_(self.loss_dst, self.loss_src)

    def consume(self) -> None:
        for obj, n in self.reads:
            for _ in range(n):
                obj.consume_read()


def _ids(batches: list[list[MPSImage]], states: list[list[Any]] | None, want_intermediate: bool, want_states: bool) -> tuple[Any, ...]:
    return (tuple(tuple(map(id, b)) for b in batches), tuple(tuple(map(id, b)) for b in states or []), want_intermediate, want_states)


def _source_tensors(batch: list[MPSImage]) -> torch.Tensor | list[torch.Tensor]:
    from .graph import _whole_parent
    if len(batch) == 1:
        return batch[0].tensor
    whole = _whole_parent(batch)
    return whole.tensor if whole is not None else [img.tensor for img in batch]


def _static_labels(graph: "MPSNNGraph", s: Any) -> Any:
    if not isinstance(s, MPSCNNLossLabels):
        return s
    def image(t: torch.Tensor) -> MPSImage:
        fmt = s.labels_image().feature_channel_format
        return MPSImage(graph.device, MPSImageDescriptor._trusted(fmt, t.shape[2], t.shape[1], t.shape[3], 1))
    w = s.weights_image()
    return MPSCNNLossLabels(graph.device, loss_image_size=s.loss_image_size, labels_image=image(s.labels_image().tensor),
                            weights_image=None if w is None else image(w.tensor))


def _capture(graph: "MPSNNGraph", cb: MTLCommandBuffer, batches: list[list[MPSImage]], states: list[list[Any]] | None,
             want_intermediate: bool, want_states: bool) -> _Captured:
    check_capturable(graph)
    cap = _Captured()
    counts = [img.number_of_images for img in batches[0]] if batches else [1]
    for b in batches:
        first = b[0]
        cap.sources.append(MPSImage(graph.device, MPSImageDescriptor._trusted(first.feature_channel_format, first.width, first.height,
                                                                                first.feature_channels, sum(counts))))
    cap.labels = [[_static_labels(graph, s) for s in b] for b in states or []]
    # allocate the static storage now: an image allocates (and zero-fills) on first use, and a
    # fill recorded in the capture would wipe the inputs copied in before every replay
    allocated = [img.tensor for img in cap.sources]
    for b in cap.labels:
        for s in b:
            if isinstance(s, MPSCNNLossLabels):
                allocated += _labels_tensors(s) + [s.loss_image().tensor]
    del allocated
    flush_deferred()                    # other command buffers' queued work must not land in the capture
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(graph.device.torch_device)
    inter: list[Any] | None = [] if want_intermediate else None
    dstates: list[Any] | None = [] if want_states else None
    try:
        with torch.cuda.graph(g, stream=side):
            icb = graph.device.make_command_queue().make_command_buffer()
            result = graph._run_steps(icb, cap.sources, counts, cap.labels or None, inter, dstates)
            icb.flush_deferred()
    except MPSError:
        raise
    except RuntimeError as e:
        raise MPSStateError(f"MPSNNGraph: `use_cuda_graph`: capturing the encode failed ({e}); encode this graph with "
                              f"use_cuda_graph False") from e
    if icb._completed_handlers:
        raise MPSValueError("MPSNNGraph: `use_cuda_graph` cannot capture this encode: a node added a completion handler "
                            "(host work a replay would skip); encode this graph with use_cuda_graph False")
    cap.cuda_graph, cap.command_buffer = g, icb
    cap.result, cap.intermediate, cap.states = result, inter, dstates
    return cap


def captured_encode(graph: "MPSNNGraph", cb: MTLCommandBuffer, batches: list[list[MPSImage]], states: list[list[Any]] | None,
                    intermediate_images: list[Any] | None, destination_states: list[Any] | None) -> tuple[bool, list[MPSImage] | None]:
    """Run ``graph``'s encode through its captures: ``(False, None)`` when this encode must
    run eagerly (the first of its key), else ``(True, result)``. The caller's objects are
    validated and keyed once; while the same objects come again, their binding is reused."""
    want_i, want_s = intermediate_images is not None, destination_states is not None
    ids = _ids(batches, states, want_i, want_s)
    bound: _Binding | None = graph._binding
    if bound is not None and bound.ids == ids:       # the graph drops its binding with its captures
        key = bound.key
    else:
        bound = None
        graph._stack_sources(cb, batches, check_only=True)
        key = signature(batches, states, want_i, want_s)
    table: OrderedDict[Hashable, _Captured | None] = graph._captures
    if key not in table:
        table[key] = None
        while len(table) > MAX_CAPTURES:
            table.popitem(last=False)
        return False, None
    table.move_to_end(key)
    cap = table[key]
    if cap is None:
        cap = table[key] = _capture(graph, cb, batches, states, want_i, want_s)
    if bound is None or bound.cap is not cap:
        bound = graph._binding = _Binding(graph, ids, key, cap, batches, states)
    with cb.encoding("MPSNNGraph"):
        bound.load()
        cap.cuda_graph.replay()
        bound.store()
    bound.consume()
    graph._encode_count += 1
    if intermediate_images is not None:
        intermediate_images.extend(cap.intermediate or [])
    if destination_states is not None:
        destination_states.extend(cap.states or [])
    return True, None if cap.result is None else list(cap.result)


__all__ = ["MAX_CAPTURES", "captured_encode", "check_capturable", "signature"]
