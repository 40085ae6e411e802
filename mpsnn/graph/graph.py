"""MPSNNGraph: an executable form of a node graph (spec/graph.md §9-11).

Execution model (mpsnn):

* Building a graph makes the plan (:mod:`mpsnn.graph.plan`: order, pruning, inputs, outputs,
  read counts) and one kernel per filter node, reading weights from data sources once.
* An encode runs every planned filter once **over the whole batch**: the images of a batch
  (one per batch entry, ``encode_batch``) are stacked into one multi-image MPSImage per source
  (copied unless there is one entry), every kernel encodes that stacked image, and the result
  is handed back as one image per entry (views of the stacked result). Batch statistics
  (batch normalization in training) and ``reduce_across_batch`` losses therefore see the whole
  batch. Loss labels stay one state per entry.
* Intermediate images are :class:`~mpsnn.MPSTemporaryImage` objects whose ``read_count`` is the
  number of filters that read them, so their storage returns to the command buffer's pool
  after the last reader and is reused by later filters. Results, exported images and images
  of nodes with a user ``image_allocator`` are not pooled.
* Formats: an intermediate image takes its node's ``format``, else the graph's ``format``
  (default float16); results too (the graph's ``destination_image_allocator`` makes them).
* Encoding never synchronises the host with the device.

Decisions (``(inferred)``):

* A temporary source image's read count drops by :meth:`read_count_for_source_image_at_index`
  (the number of filters reading it), as the newer API documents (CONFLICT §15).
* All batches of one encode must have the same length and every entry of one batch index must
  hold the same number of images; sources of one handle must agree in size and format.
* ``destination_states`` receives the state nodes marked ``export_from_graph``.
* Errors raised by a kernel while the graph encodes it are re-raised as the same
  :class:`~mpsnn.MPSError` class with the node named: ``MPSNNGraph: node <node>: <message>``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from ..backends.arithmetic import FLT_MAX as _FLT_MAX
from ..core.device import Device, MTLCommandBuffer, as_device
from ..core.enums import MPSCNNNeuronType as _NT
from ..core.enums import MPSImageFeatureChannelFormat
from ..core.errors import MPSError, MPSTypeError, MPSValueError, value_error
from ..core.structs import MPSOffset, MPSRectNoClip
from ..images.image import MPSImage, MPSImageAllocator, MPSImageDescriptor, MPSTemporaryImage
from .capture import captured_encode
from .nodes.base import MPSNNFilterNode, MPSNNImageNode, handle_label
from .plan import GraphPlan, PlannedStep, make_plan

_F = MPSImageFeatureChannelFormat



def _relu_kernel(k: Any, any_slope: bool = False) -> bool:
    """A ReLU neuron kernel (slope 0 unless ``any_slope``) with its default geometry: no offset
    or clip rectangle, no channel offsets (what a fused ReLU reproduces)."""
    return (k.neuron_type == _NT.reLU and (any_slope or k.a == 0.0) and k._offset == MPSOffset() and k._clip_rect == MPSRectNoClip
            and k._dst_c_off == 0 and k._src_c_off == 0)


def _pixelwise(k: Any) -> bool:
    """A binary arithmetic kernel that reads both operands at the destination's pixels and
    channels: unit strides, no offsets, clip rectangle or channel offsets."""
    return (list(k._p_stride) == [1, 1] and list(k._s_stride) == [1, 1] and k._p_c_stride == 1 and k._s_c_stride == 1
            and k._p_offset == MPSOffset() and k._s_offset == MPSOffset() and k._clip_rect == MPSRectNoClip
            and k._dst_c_off == 0 and k._p_c_off == 0 and k._s_c_off == 0)


def _conv_epilogue(z: Any, bias: Any, relu: bool) -> Any:
    from ..kernels.convolution import _Epilogue
    return _Epilogue(z, bias, relu)


class _NodeAllocator(MPSImageAllocator):
    """Makes one step's result image in the format the graph decided, pooled or not."""

    __slots__ = ("fmt", "temporary", "read_count", "user")

    def __init__(self, fmt: MPSImageFeatureChannelFormat, temporary: bool, read_count: int, user: MPSImageAllocator | None) -> None:
        self.fmt, self.temporary, self.read_count, self.user = fmt, temporary, read_count, user

    def image_for_command_buffer(self, command_buffer: MTLCommandBuffer, image_descriptor: MPSImageDescriptor, kernel: Any) -> MPSImage:
        d = MPSImageDescriptor._trusted(self.fmt, image_descriptor.width, image_descriptor.height,
                                        image_descriptor.feature_channels, image_descriptor.number_of_images)
        if self.user is not None:
            img = self.user.image_for_command_buffer(command_buffer, d, kernel)
        elif self.temporary:
            img = MPSTemporaryImage(command_buffer, d)
            if self.read_count > 1:
                img.read_count = self.read_count
        else:
            img = MPSImage(command_buffer.device, d)
        return img


class _EncodeContext:
    """What a node's ``_encode`` gets besides its kernel and inputs."""

    __slots__ = ("graph", "command_buffer", "allocator", "want_states", "step", "encode_index", "kernels", "updates")

    def __init__(self, graph: "MPSNNGraph", cb: MTLCommandBuffer, allocator: _NodeAllocator, step: PlannedStep,
                 encode_index: int, kernels: dict[int, Any], updates: list[Callable[[], Any]] | None = None) -> None:
        self.graph, self.command_buffer, self.allocator, self.step = graph, cb, allocator, step
        self.want_states = step.want_states
        self.encode_index = encode_index
        self.kernels = kernels
        self.updates = updates

    def update(self, fn: Callable[[], Callable[[], None] | None]) -> None:
        """Run a trainable node's GPU update: ``fn()`` encodes the data source's update and
        returns the reload of the graph's kernels (or None). The graph runs every node's ``fn``
        after the step's last filter, in the nodes' order, then every reload (mpsnn): the
        optimizers' encodes of one step queue up as one multi-tensor launch. No filter of the
        step reads another node's updated weights, so the values are those of updating at
        once (a data source shared by two nodes is updated from the weights the step used)."""
        if self.updates is None:
            reload = fn()
            if reload is not None:
                reload()
        else:
            self.updates.append(fn)

    def kernel_of(self, node: MPSNNFilterNode) -> Any:
        """The kernel this graph built for ``node`` (e.g. a gradient node's forward)."""
        return self.kernels.get(id(node))

    def single_state(self, node: MPSNNFilterNode, state: Any) -> Any:
        """A state the node reads as one object (a one-entry batch of states is unwrapped)."""
        if isinstance(state, list):
            if len(state) != 1:
                raise MPSValueError(f"MPSNNGraph: node {node._describe()} reads one state for the whole batch, "
                                    f"but got a batch of {len(state)} states")
            return state[0]
        return state


def _wrap(node: MPSNNFilterNode, err: MPSError) -> MPSError:
    msg = str(err)
    if msg.startswith("MPSNNGraph:"):
        return err
    try:
        new = type(err)(f"MPSNNGraph: node {node._describe()}: {msg}")
    except Exception:  # pragma: no cover - every MPSError subclass takes one message
        return err
    return new


def _whole_parent(batch: list[MPSImage]) -> MPSImage | None:
    """The non-temporary image whose consecutive views (all channels) make up ``batch``, if any."""
    parent = batch[0].parent
    if parent is None or isinstance(parent, MPSTemporaryImage) or parent.parent is not None:
        return None
    n0 = 0
    for img in batch:
        view = img._view
        if img.parent is not parent or view is None or view[0] != n0 or view[2] != 0 or view[3] != parent.feature_channels:
            return None
        n0 = view[1]
    return parent if n0 == parent.number_of_images else None


class MPSNNGraph:
    """``MPSNNGraph``: an optimised, executable form of the node graph behind one or more result
    image nodes.

    Args:
        device: the device (positional, first).
        result_image: the result image node (``initWithDevice:resultImage:resultImageIsNeeded:``).
        result_image_is_needed: False when only side effects matter (training graphs): the
            result is not returned and filters that only serve it are pruned.
        result_images / results_are_needed: the multi-result form (one flag per result; None:
            all needed). The first result is returned by ``encode``; the others arrive through
            ``intermediate_images``.

    Read-only: ``source_image_handles``, ``source_state_handles``, ``intermediate_image_handles``,
    ``result_state_handles``, ``result_handle``, ``result_image_is_needed``. Read-write:
    ``format`` (default float16), ``destination_image_allocator`` (default
    :attr:`MPSImage.default_allocator`), ``output_state_is_temporary`` (default False).

    Encode forms: ``encode(cb, source_images[, source_states, intermediate_images,
    destination_states])``, ``encode_batch(cb, source_images, source_states[, ...])`` (lists of
    batches), ``execute_async(source_images, completion_handler)``, and the Python convenience
    :meth:`run`. Orders of the handle lists: :mod:`mpsnn.graph.plan`.

    Example::

        x = MPSNNImageNode(None)
        conv = MPSCNNConvolutionNode(x, weights=data_source)
        relu = MPSCNNNeuronReLUNode(conv.result_image)
        graph = MPSNNGraph(device, relu.result_image, result_image_is_needed=True)
        y = graph.encode(cb, [image])
    """

    def __init__(self, device: Device | str, result_image: MPSNNImageNode | None = None, result_image_is_needed: bool = True, *,
                 result_images: Sequence[MPSNNImageNode] | None = None, results_are_needed: Sequence[bool] | None = None) -> None:
        self._device = as_device(device, "MPSNNGraph")
        if (result_image is None) == (result_images is None):
            raise MPSValueError("MPSNNGraph: give exactly one of `result_image` and `result_images`")
        if result_image is not None:
            results, needed = [result_image], [bool(result_image_is_needed)]
        else:
            results = list(result_images)  # type: ignore[arg-type]
            needed = [True] * len(results) if results_are_needed is None else [bool(x) for x in results_are_needed]
        self._plan: GraphPlan = make_plan(results, needed)
        self._format = _F.float16
        self._allocator: MPSImageAllocator = MPSImage.default_allocator
        self.output_state_is_temporary = False
        self._encode_count = 0
        self._lock = threading.Lock()
        self._kernels: dict[int, Any] = {}
        self._use_cuda_graph = False
        self._captures: OrderedDict[Any, Any] = OrderedDict()   # signature -> capture (see graph/capture.py)
        self._binding: Any = None                    # the last caller objects bound to a capture
        for st in self._plan.steps:
            try:
                self._kernels[id(st.node)] = st.node._build_kernel(self._device)
            except MPSError as e:
                raise _wrap(st.node, e) from e

    @classmethod
    def graph_with_device(cls, device: Device | str, result_image: MPSNNImageNode | None = None, result_image_is_needed: bool = True, **kw: Any) -> "MPSNNGraph":
        return cls(device, result_image, result_image_is_needed, **kw)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def device(self) -> Device:
        return self._device

    @property
    def format(self) -> MPSImageFeatureChannelFormat:
        return self._format

    @format.setter
    def format(self, value: Any) -> None:
        try:
            fmt = _F(value)
        except (ValueError, TypeError):
            raise value_error("MPSNNGraph", "format", value, "be an MPSImageFeatureChannelFormat") from None
        if fmt not in (_F.float16, _F.float32, _F.bfloat16):
            raise value_error("MPSNNGraph", "format", fmt.name, "be float16, float32 or bfloat16 (the storage formats kernels write)")
        self._format = fmt
        self._drop_captures()

    @property
    def use_cuda_graph(self) -> bool:
        """mpsnn extension (default False): record each encode once as a CUDA graph and replay
        it on later encodes of the same shapes (CUDA only; the CPU ignores it). Results of a
        replayed encode are the capture's images, overwritten by the next encode. The rules,
        and what is refused: :mod:`mpsnn.graph.capture`."""
        return self._use_cuda_graph

    @use_cuda_graph.setter
    def use_cuda_graph(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise value_error("MPSNNGraph", "use_cuda_graph", value, "be a bool")
        self._use_cuda_graph = value
        if not value:
            self._drop_captures()

    def _drop_captures(self) -> None:
        """Forget every CUDA-graph capture and the binding to the last caller's objects (the
        format or the weights they were recorded with changed, or capturing was switched off)."""
        self._captures.clear()
        self._binding = None

    @property
    def destination_image_allocator(self) -> MPSImageAllocator:
        return self._allocator

    @destination_image_allocator.setter
    def destination_image_allocator(self, value: MPSImageAllocator) -> None:
        if not isinstance(value, MPSImageAllocator):
            raise MPSTypeError(f"MPSNNGraph: `destination_image_allocator` must be an MPSImageAllocator, but got {type(value).__name__}")
        self._allocator = value

    @property
    def source_image_handles(self) -> list[Any]:
        return [n.handle for n in self._plan.source_images]

    @property
    def source_state_handles(self) -> list[Any] | None:
        return [n.handle for n in self._plan.source_states] or None

    @property
    def intermediate_image_handles(self) -> list[Any] | None:
        return [n.handle for n in self._plan.intermediate_images] or None

    @property
    def result_state_handles(self) -> list[Any] | None:
        return [n.handle for n in self._plan.result_states] or None

    @property
    def result_handle(self) -> Any:
        return self._plan.results[0].handle

    @property
    def result_image_is_needed(self) -> bool:
        return self._plan.results_needed[0]

    @property
    def plan(self) -> GraphPlan:
        """The execution plan (mpsnn extension; read-only use)."""
        return self._plan

    def read_count_for_source_image_at_index(self, index: int) -> int:
        """How much an encode decrements the read count of temporary source image ``index``."""
        return self._plan.source_image_reads[self._index("index", index, len(self._plan.source_images))]

    def read_count_for_source_state_at_index(self, index: int) -> int:
        """How much an encode decrements the read count of temporary source state ``index``."""
        return self._plan.source_state_reads[self._index("index", index, len(self._plan.source_states))]

    @staticmethod
    def _index(name: str, index: Any, n: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise value_error("MPSNNGraph", name, index, f"be in [0, {n})")
        return index

    def reload_from_data_sources(self) -> None:
        """Re-read the parameters of every node of this graph that has a data source. No work
        of this graph may be in flight. Drops the graph's CUDA-graph captures."""
        self._drop_captures()
        for st in self._plan.steps:
            try:
                st.node._reload(self._kernels[id(st.node)])
            except MPSError as e:
                raise _wrap(st.node, e) from e

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], source_states: Sequence[Any] | None = None,
               intermediate_images: list[Any] | None = None, destination_states: list[Any] | None = None) -> MPSImage | None:
        """``encodeToCommandBuffer:sourceImages:[sourceStates:intermediateImages:destinationStates:]``.

        ``source_images[i]`` goes with ``source_image_handles[i]`` and ``source_states[j]`` with
        ``source_state_handles[j]``. Exported images / extra results are appended to
        ``intermediate_images`` and exported states to ``destination_states`` when those lists
        are given. Returns the result image (None when it is not needed)."""
        imgs = self._check_list("source_images", source_images)
        batches = [[img] for img in imgs]
        sts = None if source_states is None else [[s] for s in self._check_list("source_states", source_states)]
        inter: list[Any] | None = [] if intermediate_images is not None else None
        dstates: list[Any] | None = [] if destination_states is not None else None
        out = self._encode_batches(command_buffer, batches, sts, inter, dstates)
        if intermediate_images is not None:
            intermediate_images.extend(x[0] for x in inter)  # type: ignore[union-attr]
        if destination_states is not None:
            destination_states.extend(dstates)  # type: ignore[arg-type]
        return None if out is None else out[0]

    encode_to_command_buffer = encode

    def encode_batch(self, command_buffer: MTLCommandBuffer, source_images: Sequence[Sequence[MPSImage]], source_states: Sequence[Sequence[Any]] | None = None,
                     intermediate_images: list[Any] | None = None, destination_states: list[Any] | None = None) -> list[MPSImage] | None:
        """``encodeBatchToCommandBuffer:sourceImages:sourceStates:[intermediateImages:destinationStates:]``:
        ``source_images[i]`` is the batch (a list, one image per entry) for source handle ``i``;
        returns the result batch. Exported images arrive as batches."""
        batches = [list(self._check_list(f"source_images[{i}]", b)) for i, b in enumerate(self._check_list("source_images", source_images))]
        sts = None if source_states is None else [list(self._check_list(f"source_states[{j}]", b)) for j, b in enumerate(self._check_list("source_states", source_states))]
        return self._encode_batches(command_buffer, batches, sts, intermediate_images, destination_states)

    encode_batch_to_command_buffer = encode_batch

    def execute_async(self, source_images: Sequence[MPSImage], completion_handler: Callable[[MPSImage | None, Exception | None], Any]) -> MPSImage | None:
        """``executeAsyncWithSourceImages:completionHandler:``: encode on an internal command
        buffer, commit, and return the result; ``completion_handler(result, error)`` runs when
        the work completes (or at once with the error when encoding fails)."""
        imgs = self._check_list("source_images", source_images)
        if not imgs:
            raise value_error("MPSNNGraph", "source_images", imgs, "hold at least one image")
        cb = imgs[0].device.make_command_queue().make_command_buffer() if isinstance(imgs[0], MPSImage) else self._device.make_command_queue().make_command_buffer()
        try:
            result = self.encode(cb, imgs)
        except MPSError as e:
            completion_handler(None, e)
            return None
        cb.add_completed_handler(lambda _cb: completion_handler(result, _cb.error if isinstance(_cb.error, Exception) else None))
        cb.commit()
        return result

    execute_async_with_source_images = execute_async

    def run(self, source_images: Sequence[MPSImage] | MPSImage, source_states: Sequence[Any] | None = None) -> MPSImage | None:
        """Python convenience: encode on a new command buffer, commit and wait; returns the result."""
        imgs = [source_images] if isinstance(source_images, MPSImage) else list(source_images)
        cb = self._device.make_command_queue().make_command_buffer()
        out = self.encode(cb, imgs, source_states)
        cb.commit()
        cb.wait_until_completed()
        return out

    @staticmethod
    def _check_list(name: str, value: Any) -> list[Any]:
        if value is None or isinstance(value, (MPSImage, str, bytes)) or not hasattr(value, "__len__"):
            raise MPSTypeError(f"MPSNNGraph: `{name}` must be a list, but got {type(value).__name__}")
        return list(value)

    def _stack_sources(self, cb: MTLCommandBuffer, batches: list[list[MPSImage]], check_only: bool = False) -> tuple[list[MPSImage], list[int]]:
        """One image per source handle holding the whole batch, and the per-entry image counts
        (``check_only``: validate the batches, stack nothing)."""
        plan = self._plan
        if len(batches) != len(plan.source_images):
            raise value_error("MPSNNGraph", "source_images", f"{len(batches)} sources",
                              f"match the graph's {len(plan.source_images)} source image handles {[handle_label(h) for h in self.source_image_handles]}")
        if not batches:
            return [], [1]
        n = len(batches[0])
        for i, b in enumerate(batches):
            if len(b) != n:
                raise value_error("MPSNNGraph", f"source_images[{i}]", f"a batch of {len(b)}", f"have the batch length of source_images[0] ({n})")
            for k, img in enumerate(b):
                if not isinstance(img, MPSImage):
                    raise MPSTypeError(f"MPSNNGraph: `source_images[{i}][{k}]` must be an MPSImage, but got {type(img).__name__}")
        if n == 0:
            raise value_error("MPSNNGraph", "source_images", "empty batches", "hold at least one image per source")
        counts = [img.number_of_images for img in batches[0]]
        stacked: list[MPSImage] = []
        for i, b in enumerate(batches):
            if [img.number_of_images for img in b] != counts:
                raise value_error("MPSNNGraph", f"source_images[{i}]", [img.number_of_images for img in b],
                                  f"hold as many images per entry as source_images[0] ({counts})")
            reads = plan.source_image_reads[i]
            if n == 1:
                stacked.append(b[0])
                continue
            first = b[0]
            whole = _whole_parent(b)
            if whole is not None:  # the entries are consecutive views covering one image: no copy
                stacked.append(whole)
                continue
            for k, img in enumerate(b):
                if (img.width, img.height, img.feature_channels, img.feature_channel_format) != (first.width, first.height, first.feature_channels, first.feature_channel_format):
                    raise value_error("MPSNNGraph", f"source_images[{i}][{k}]",
                                      f"{img.width}x{img.height}x{img.feature_channels} {img.feature_channel_format.name}",
                                      f"match entry 0 ({first.width}x{first.height}x{first.feature_channels} {first.feature_channel_format.name})")
                if img.device != self._device:
                    raise value_error("MPSNNGraph", f"source_images[{i}][{k}].device", img.device, f"be the graph's device {self._device}")
            if check_only:
                continue
            desc = MPSImageDescriptor._trusted(first.feature_channel_format, first.width, first.height, first.feature_channels, sum(counts))
            big = MPSTemporaryImage(cb, desc)
            big.read_count = max(1, reads)
            with cb.encoding("MPSNNGraph"):
                torch.cat([img.tensor for img in b], out=big.tensor)
            for img in b:
                if isinstance(img, MPSTemporaryImage):
                    for _ in range(reads):
                        img.consume_read()
            stacked.append(big)
        return stacked, counts

    def _split(self, image: MPSImage, counts: list[int]) -> list[MPSImage]:
        if len(counts) == 1:
            return [image]
        out, n0 = [], 0
        for c in counts:
            out.append(image._make_view(n0, n0 + c, 0, image.feature_channels))
            n0 += c
        return out

    def _encode_batches(self, command_buffer: MTLCommandBuffer, batches: list[list[MPSImage]], source_states: list[list[Any]] | None,
                        intermediate_images: list[Any] | None, destination_states: list[Any] | None) -> list[MPSImage] | None:
        if not isinstance(command_buffer, MTLCommandBuffer):
            raise MPSTypeError(f"MPSNNGraph: `command_buffer` must be an MTLCommandBuffer, but got {type(command_buffer).__name__}")
        cb = command_buffer
        cb.check_encodable("MPSNNGraph")
        plan = self._plan
        nstates = len(plan.source_states)
        given = 0 if source_states is None else len(source_states)
        if given != nstates:
            raise value_error("MPSNNGraph", "source_states", f"{given} states" if source_states is not None else None,
                              f"match the graph's {nstates} source state handles {[handle_label(h) for h in (self.source_state_handles or [])]}")
        entries = len(batches[0]) if batches else 1
        for j, b in enumerate(source_states or []):
            if len(b) != entries:
                raise value_error("MPSNNGraph", f"source_states[{j}]", f"a batch of {len(b)}", f"have the batch length of the source images ({entries})")
        if self._use_cuda_graph and cb.stream is not None:
            done, result = captured_encode(self, cb, batches, source_states, intermediate_images, destination_states)
            if done:
                return result
        stacked, counts = self._stack_sources(cb, batches)
        return self._run_steps(cb, stacked, counts, source_states, intermediate_images, destination_states)

    def _run_steps(self, cb: MTLCommandBuffer, stacked: list[Any], counts: list[int], source_states: list[list[Any]] | None,
                   intermediate_images: list[Any] | None, destination_states: list[Any] | None) -> list[MPSImage] | None:
        """Encode every planned filter on ``cb`` over the stacked sources (one image per
        source handle, or a batch of consecutive views of one); results split by ``counts``.
        Residual tails (``plan.fusions``) whose kernels allow it run as one fused convolution
        at the addition's place (:meth:`_fusable`)."""
        plan = self._plan
        with self._lock:
            index = self._encode_count
            self._encode_count += 1
        values: dict[int, MPSImage] = {id(n): img for n, img in zip(plan.source_images, stacked)}
        svalues: dict[int, Any] = {id(n): list(b) for n, b in zip(plan.source_states, source_states or [])}
        last = plan.last_reader()
        kept: dict[int, MPSImage] = {}
        updates: list[Callable[[], Any]] = []

        def run(step: PlannedStep, out: PlannedStep | None = None, epilogue: Any = None, sources: list[MPSImage] | None = None,
                neuron: Any = None, extra_reads: int = 0) -> MPSImage:
            """Encode ``step``'s filter; its result is ``out``'s result image (``out``'s format,
            read count and allocator: a fused tail's last step), default ``step``; ``sources``
            replace the filter's source images; ``neuron`` is fused into its kernels."""
            node = step.node
            out = out or step
            rnode = out.node._result_image
            temporary = not out.keep_result and rnode.image_allocator is MPSTemporaryImage.default_allocator
            user = None
            if out.is_result:
                user = self._allocator if self._allocator is not MPSImage.default_allocator else None
            elif rnode.image_allocator is not MPSTemporaryImage.default_allocator:
                user = rnode.image_allocator
            alloc = _NodeAllocator(rnode.format or self._format, temporary and user is None, out.result_reads + extra_reads, user)
            ctx = _EncodeContext(self, cb, alloc, step, index, self._kernels, updates)
            images = sources if sources is not None else [values[id(n)] for n in node._source_images]
            states = [svalues[id(s)] for s in node._source_states]
            kernel = self._kernels[id(node)]
            if epilogue is not None:
                kernel._epilogue = epilogue
            fused_neuron = [k for k in kernel if hasattr(k, "_set_fused_neuron")] if neuron is not None else []
            for k in fused_neuron:
                k._set_fused_neuron(neuron)
            try:
                img, out_states = node._encode(ctx, kernel, images, states)
            except MPSError as e:
                raise _wrap(node, e) from e
            finally:
                if epilogue is not None:
                    kernel._epilogue = None
                for k in fused_neuron:
                    k._set_fused_neuron(None)
            if isinstance(img, MPSTemporaryImage) and out.result_reads == 0 and not out.keep_result:
                img.read_count = 0
            values[id(rnode)] = img
            if out.keep_result:
                kept[id(rnode)] = img
            for sn, st in zip(node._result_states or [], out_states):
                svalues[id(sn)] = st
            return img

        roles: dict[int, tuple[str, Any]] = {}
        fusable: dict[int, Any] = {}
        for f in plan.fusions:
            roles[f.conv.index], roles[f.add.index], roles[f.relu.index] = ("tail_conv", f), ("tail_add", f), ("tail_relu", f)
            if f.fold is not None:
                roles[f.fold.index] = ("tail_fold", f)
        for nf in plan.norm_relu:
            for what, st in (("norm", nf.norm), ("norm_relu", nf.relu), ("norm_relu_gradient", nf.relu_gradient), ("norm_gradient", nf.norm_gradient)):
                roles[st.index] = (what, nf)
        for sg in plan.shared_gradients:
            roles[sg.first.index], roles[sg.second.index] = ("first", sg), ("second", sg)
        add_relu: dict[int, Any] = {}                    # id(shared pair) -> its add+ReLU fusion, when fused this encode
        for af in plan.add_relu:
            roles[af.add.index], roles[af.relu.index], roles[af.relu_gradient.index] = ("add_relu", af), ("fused", af), ("fused", af)
        fused: set[int] = set()
        for step in plan.steps:
            role = roles.get(step.index)
            if role is None:
                run(step)
            elif role[0] == "add_relu":
                af = role[1]
                ok = fusable[id(af)] = self._add_relu_ok(af, values)
                if ok:
                    fusable[id(af.gradients)] = True
                    add_relu[id(af.gradients)] = af
                    kernel = self._kernels[id(step.node)]
                    kernel._fused_relu = True
                    try:
                        run(step, out=af.relu)
                    finally:
                        kernel._fused_relu = False
                else:
                    run(step)
            elif role[0] == "fused":
                if not fusable.get(id(role[1])):
                    run(step)
            elif role[0] in ("first", "second"):
                what, sg = role
                pair_fusion = add_relu.get(id(sg))
                if what == "first":
                    share = fusable[id(sg)] if pair_fusion is not None else self._shareable(sg, values)
                    fusable[id(sg)] = share
                    sources = None
                    if pair_fusion is not None:      # the pair reads what the ReLU gradient would have read
                        sources = [values[id(pair_fusion.relu_gradient.node._source_images[0])], values[id(step.node._source_images[1])]]
                    img = run(step, extra_reads=sg.second.result_reads if share else 0, sources=sources)
                    if share:
                        values[id(sg.second.node._result_image)] = img
                elif fusable.get(id(sg)):
                    # the second filter's reads, done by the first one's image (the incoming
                    # gradient of a fused ReLU was read once, by the first)
                    from ..core.kernel import _consume
                    srcs = step.node._source_images[1:] if pair_fusion is not None else step.node._source_images
                    _consume([values[id(n)] for n in srcs] + [svalues[id(n)] for n in step.node._source_states])
                else:
                    run(step)
            elif role[0] in ("norm", "norm_relu", "norm_relu_gradient", "norm_gradient"):
                what, nf = role
                desc = fusable.get(id(nf))
                if desc is None:
                    desc = fusable[id(nf)] = self._norm_relu_neuron(nf)
                if not desc:
                    run(step)
                elif what == "norm":
                    run(step, out=nf.relu, neuron=desc)
                elif what == "norm_gradient":
                    run(step, sources=[values[id(nf.relu_gradient.node._source_images[0])], values[id(step.node._source_images[1])]],
                        neuron=desc)
                # else: a fused ReLU step, nothing to run
            else:
                what, f = role
                tail_ok = fusable.get(id(f))
                if tail_ok is None:
                    tail_ok = fusable[id(f)] = self._fusable(f)
                if what == "tail_conv":
                    if not tail_ok:
                        run(step)                  # else deferred to the addition
                elif what == "tail_fold":
                    run(step, epilogue=_conv_epilogue(None, None, False) if tail_ok else None)
                elif what == "tail_add":
                    if tail_ok and self._fuse(f, cb, values, run):
                        fused.add(id(f))
                    else:
                        if tail_ok:                # the shapes ruled it out: run the parts after all
                            run(f.conv)
                            if f.fold is not None:
                                self._restore_fold_bias(f, values)
                        run(step)
                elif id(f) not in fused:
                    run(step)
                if what == "tail_add":
                    for n in f.conv.node._source_images:
                        if last.get(id(n)) == step.index and id(n) not in kept:
                            values.pop(id(n), None)
            # forget images whose last reader ran (their storage is back in the pool)
            for n in step.node._source_images:
                if last.get(id(n)) == step.index and id(n) not in kept:
                    values.pop(id(n), None)
        # the trainable nodes' updates (_EncodeContext.update): every optimizer encode, then every reload
        reloads = [fn() for fn in updates]
        for reload in reloads:
            if reload is not None:
                reload()
        if intermediate_images is not None:
            for n in plan.intermediate_images:
                intermediate_images.append(self._split(kept[id(n)], counts))
        if destination_states is not None:
            for sn in plan.result_states:
                destination_states.append(svalues.get(id(sn)))
        if not plan.results_needed[0]:
            return None
        return self._split(kept[id(plan.results[0])], counts)

    # -- fusion ----------------------------------------------------------------------------------------
    def _fusable(self, f: Any) -> bool:
        """Whether this encode may fuse the residual tail ``f`` (:class:`~mpsnn.graph.plan.ResidualFusion`):
        the fused-convolution switch is on, the convolutions have no fused neuron (the folded
        one has a bias), the addition has Apple's defaults (scales 1, bias 0, no clamp,
        strides 1, no offsets) and the ReLU is plain (a = 0) with default geometry."""
        from ..kernels import convolution as kc
        k = self._kernels
        conv, add, relu = k[id(f.conv.node)], k[id(f.add.node)], k[id(f.relu.node)]
        if not kc.FUSED_CUDNN_RELU or conv.fused_neuron_descriptor is not None:
            return False
        if f.fold is not None:
            d = k[id(f.fold.node)]
            if d.fused_neuron_descriptor is not None or (d._b32 is None and d._descriptor.batch_normalization_parameters is None):
                return False
        plain_add = (add._p_scale == 1.0 and add._s_scale == 1.0 and add._bias == 0.0 and add._min == -_FLT_MAX and add._max == _FLT_MAX
                     and _pixelwise(add))
        return bool(plain_add and _relu_kernel(relu))

    def _add_relu_ok(self, af: Any, values: dict[int, MPSImage]) -> bool:
        """Whether this encode may run the addition -> ReLU pair ``af``
        (:class:`~mpsnn.graph.plan.AddReluFusion`) fused: the ReLU kernel has its default
        geometry, and the addition's gradient pair may share one image (:meth:`_shareable`,
        judged on the forward operands, which have the incoming gradient's shape)."""
        if not _relu_kernel(self._kernels[id(af.relu.node)]):
            return False
        a, b = (values[id(n)] for n in af.add.node._source_images)
        return a.shape == b.shape and self._shareable(af.gradients, values, a.shape)

    def _shareable(self, sg: Any, values: dict[int, MPSImage], shape: Any = None) -> bool:
        """Whether the second addition gradient of ``sg`` (:class:`~mpsnn.graph.plan.SharedGradient`)
        may take the first one's image this encode: both filters have unit primary scale, no
        bias and unit secondary strides, the forward addition read both operands at the
        destination's pixels (no offsets, strides or channel offsets), and both operands
        have the incoming gradient's shape."""
        fwd = self._kernels.get(id(sg.first.node.forward_node))
        if fwd is None or not _pixelwise(fwd):
            return False
        for st in (sg.first, sg.second):
            n = st.node
            if not (n.primary_scale == 1.0 and n.bias == 0.0 and (n.secondary_stride_in_pixels_x, n.secondary_stride_in_pixels_y,
                                                                    n.secondary_stride_in_feature_channels) == (1, 1, 1)):
                return False
        if shape is None:
            shape = values[id(sg.first.node._source_images[0])].shape
        return all(values[id(st.node._source_images[1])].shape == shape for st in (sg.first, sg.second))

    def _norm_relu_neuron(self, f: Any) -> Any:
        """The ReLU's descriptor when this encode may fuse the batch-norm -> ReLU pair ``f``
        (:class:`~mpsnn.graph.plan.NormReluFusion`), else False: the batch-norm kernels have no
        fused neuron of their own, the ReLU kernels have their default geometry."""
        from ..kernels.neuron import MPSNNNeuronDescriptor
        k = self._kernels
        bn, relu, grads = k[id(f.norm.node)], k[id(f.relu.node)], k[id(f.norm_gradient.node)]
        if any(getattr(kk, "fused_neuron_descriptor", None) is not None for kk in (*bn, *grads)):
            return False
        if not _relu_kernel(relu, any_slope=True):
            return False
        return MPSNNNeuronDescriptor.cnn_neuron_descriptor(_NT.reLU, relu.a)

    def _fuse(self, f: Any, cb: MTLCommandBuffer, values: dict[int, MPSImage], run: Callable[..., Any]) -> bool:
        """Run the tail ``f`` as ``relu(conv(x) + bias + other)`` (one cuDNN call on CUDA); False
        (nothing encoded) when the convolution's result would not have ``other``'s shape."""
        from ..core.kernel import _consume
        conv = self._kernels[id(f.conv.node)]
        other = values[id(f.other)]
        src = values[id(f.conv.node._source_images[0])]
        f.conv.node._apply_padding(conv)
        d = conv.destination_image_descriptor([src])
        if (d.number_of_images, d.height, d.width, d.feature_channels) != other.shape or src.dtype != other.dtype:
            return False
        dtype = src.dtype if src.dtype != torch.float64 else torch.float32
        bias = conv._compute_weights(dtype, fold=True)[1]
        if f.fold is not None:
            extra = self._kernels[id(f.fold.node)]._compute_weights(dtype, fold=True)[1]
            bias = extra if bias is None else bias + extra
        run(f.conv, out=f.relu, epilogue=_conv_epilogue(other.tensor, bias, True))
        _consume([other])                                  # the addition's read of it
        return True

    def _restore_fold_bias(self, f: Any, values: dict[int, MPSImage]) -> None:
        """The folded convolution ran without its bias but the tail could not fuse: add it."""
        other = values[id(f.other)]
        b = self._kernels[id(f.fold.node)]._compute_weights(other.dtype if other.dtype != torch.float64 else torch.float32, fold=True)[1]
        other.tensor.add_(b.to(other.dtype))

    # -- description -----------------------------------------------------------------------------------
    @property
    def debug_description(self) -> str:
        """A readable dump of the compiled graph: inputs, filters in execution order with their
        kernels, inputs and read counts, outputs."""
        p = self._plan
        names: dict[int, str] = {}
        for k, n in enumerate(p.source_images):
            names[id(n)] = f"src{k}({handle_label(n.handle) or '-'})"
        lines = [f"MPSNNGraph on {self._device}: {len(p.steps)} filters, format {self._format.name}"]
        lines.append("  source images: " + (", ".join(names[id(n)] for n in p.source_images) or "none"))
        if p.source_states:
            lines.append("  source states: " + ", ".join(n._describe() for n in p.source_states))
        for st in p.steps:
            node = st.node
            names[id(node._result_image)] = f"t{st.index}"
            ins = ", ".join(names.get(id(n), n._describe()) for n in node._source_images)
            kind = "kept" if st.keep_result else f"temporary, read {st.result_reads}x"
            kern = type(self._kernels[id(node)]).__name__ if not isinstance(self._kernels[id(node)], tuple) else "+".join(type(k).__name__ for k in self._kernels[id(node)])
            extra = " +states" if st.want_states else ""
            lines.append(f"  t{st.index} = {node._describe()} [{kern}]({ins}) -> {kind}{extra}")
        lines.append("  results: " + ", ".join(f"{names[id(r)]}{'' if need else ' (not needed)'}" for r, need in zip(p.results, p.results_needed)))
        if p.intermediate_images:
            lines.append("  intermediate images: " + ", ".join(names[id(n)] for n in p.intermediate_images))
        if p.result_states:
            lines.append("  result states: " + ", ".join(n._describe() for n in p.result_states))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<MPSNNGraph {len(self._plan.steps)} filters on {self._device}>"


__all__ = ["MPSNNGraph"]
