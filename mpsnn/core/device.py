"""Devices, command queues and command buffers (MTLDevice / MTLCommandQueue / MTLCommandBuffer).

Execution model
---------------
* A :class:`Device` is a torch device (``cpu`` or ``cuda:N``).
* A command buffer binds, when it is made, to the device's *current* torch stream (on CUDA).
  Encoding a kernel enqueues its work on that stream immediately and returns without
  waiting: nothing on the encode path synchronises the host with the GPU, so a sequence of
  encodes can be captured in a CUDA graph (make the command buffer inside the capture).
  On the CPU, work runs synchronously during ``encode``.
* ``commit()`` records a completion event after everything encoded so far.
  ``wait_until_completed()`` waits for it on the host. Completion handlers run on a
  background thread once the GPU work is finished (CPU: right after ``commit``, on the
  calling thread, since the work is already done).
* Temporary images made on a command buffer draw their storage from a pool the command
  buffer owns; storage returned to the pool (a temporary image's read count reached 0) is
  reused by later temporary images of the same command buffer. Stream order makes the reuse
  safe. The pool is released when the command buffer completes.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator

import torch

from .enums import MTLCommandBufferStatus
from .errors import MPSDeviceError, MPSStateError, value_error


class Device:
    """An execution device: ``Device("cpu")``, ``Device("cuda")``, ``Device("cuda:1")``.

    Stands for ``MTLDevice``. Two ``Device`` objects naming the same torch device compare
    equal.

    Args:
        name: a torch device string or ``torch.device``; ``"cuda"`` means ``cuda:0``.
    """

    def __init__(self, name: str | torch.device | "Device" = "cpu") -> None:
        if isinstance(name, Device):
            dev = name.torch_device
        else:
            try:
                dev = torch.device(name)
            except (RuntimeError, TypeError) as exc:
                raise value_error("Device", "name", name, "name a torch device such as 'cpu' or 'cuda:0'") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise MPSDeviceError(f"Device: `name` (={str(name)!r}) needs CUDA, but no CUDA device is usable")
            index = 0 if dev.index is None else dev.index
            if index >= torch.cuda.device_count():
                raise MPSDeviceError(
                    f"Device: `name` (={str(name)!r}) must name one of {torch.cuda.device_count()} CUDA devices"
                )
            dev = torch.device("cuda", index)
        elif dev.type != "cpu":
            raise value_error("Device", "name", str(name), "be 'cpu' or 'cuda[:N]'", f"device type {dev.type!r}")
        self.torch_device: torch.device = dev

    @property
    def type(self) -> str:
        return self.torch_device.type

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch_device)
        return "cpu"

    def make_command_queue(self, max_command_buffer_count: int | None = None) -> "MTLCommandQueue":
        """Make a command queue on this device (``makeCommandQueue()``)."""
        return MTLCommandQueue(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Device):
            return self.torch_device == other.torch_device
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.torch_device)

    def __repr__(self) -> str:
        return f"Device({str(self.torch_device)!r})"


def as_device(device: Any, owner: str = "mpsnn") -> Device:
    """Accept a Device, a torch.device or a string; raise MPSError otherwise."""
    if isinstance(device, Device):
        return device
    if isinstance(device, (str, torch.device)):
        return Device(device)
    raise MPSDeviceError(f"{owner}: `device` must be an mpsnn.Device, a torch.device or a string, but got {type(device).__name__}")


def default_device() -> Device:
    """The CUDA device when one is usable, else the CPU."""
    return Device("cuda:0") if torch.cuda.is_available() else Device("cpu")


def MTLCreateSystemDefaultDevice() -> Device:
    """Apple's name for :func:`default_device`."""
    return default_device()


_fast_stream_getter: Any = None  # None: not checked yet; False: unusable; else the getter


def _current_stream_id(device: torch.device) -> int:
    """Id of the current CUDA stream of ``device``, without building a Stream object
    (``torch.cuda.current_stream`` costs ~10 µs of host time per call). The fast getter is
    checked against the public API on first use and dropped if they ever disagree."""
    global _fast_stream_getter
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _fast_stream_getter is None:
        getter = getattr(torch._C, "_cuda_getCurrentStream", None)
        try:
            ok = getter is not None and int(getter(index)[0]) == int(torch.cuda.current_stream(device).stream_id)
        except (TypeError, IndexError, ValueError, RuntimeError):
            ok = False
        _fast_stream_getter = getter if ok else False
    if _fast_stream_getter is not False:
        return int(_fast_stream_getter(index)[0])
    return int(torch.cuda.current_stream(device).stream_id)


class MTLCommandQueue:
    """A queue that makes command buffers (``MTLCommandQueue``)."""

    def __init__(self, device: Device) -> None:
        self.device = as_device(device, "MTLCommandQueue")
        self.label: str | None = None

    def make_command_buffer(self) -> "MTLCommandBuffer":
        """``makeCommandBuffer()``: a new command buffer bound to the current stream."""
        return MTLCommandBuffer(self)

    # Apple's other spelling
    command_buffer = make_command_buffer

    def __repr__(self) -> str:
        return f"MTLCommandQueue({self.device!r})"


#: command buffers holding deferred work (MTLCommandBuffer.defer), in the order it was queued
_DEFERRED: list["MTLCommandBuffer"] = []


def flush_deferred() -> None:
    """Launch the deferred work of every command buffer (see :meth:`MTLCommandBuffer.defer`)."""
    while _DEFERRED:
        _DEFERRED[0].flush_deferred()


class MTLCommandBuffer:
    """A command buffer (``MTLCommandBuffer``): an ordered list of encoded work.

    Properties: ``status`` (:class:`MTLCommandBufferStatus`), ``error`` (the exception a
    completion handler or the execution raised, else ``None``), ``label``, ``device``,
    ``command_queue``. Methods: ``commit()``, ``wait_until_completed()``,
    ``wait_until_scheduled()``, ``add_completed_handler(fn)``,
    ``add_scheduled_handler(fn)``, ``enqueue()``.
    """

    def __init__(self, queue: MTLCommandQueue) -> None:
        self.command_queue = queue
        self.device: Device = queue.device
        self.label: str | None = None
        self.error: BaseException | None = None
        self._status = MTLCommandBufferStatus.notEnqueued
        self._completed_handlers: list[Callable[["MTLCommandBuffer"], Any]] = []
        self._scheduled_handlers: list[Callable[["MTLCommandBuffer"], Any]] = []
        self._event: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        #: deferred items: (key, items, launch, read storages, written storages), see defer()
        self._deferred: tuple[Hashable, list[Any], Callable[[list[Any]], None], set[int], set[int]] | None = None
        self.stream: Any = torch.cuda.current_stream(self.device.torch_device) if self.device.is_cuda else None
        self._stream_id = None if self.stream is None else self.stream.stream_id

    # -- status -----------------------------------------------------------------------
    @property
    def status(self) -> MTLCommandBufferStatus:
        if self._status == MTLCommandBufferStatus.committed and self._event is not None and self._event.query():
            self._finish()
        return self._status

    def enqueue(self) -> None:
        if self._status == MTLCommandBufferStatus.notEnqueued:
            self._status = MTLCommandBufferStatus.enqueued

    # -- encoding -----------------------------------------------------------------------
    def check_encodable(self, owner: str) -> None:
        """Raise MPSStateError when work can no longer be encoded on this command buffer."""
        if self._status >= MTLCommandBufferStatus.committed:
            raise MPSStateError(
                f"{owner}: `command_buffer` must not be committed yet to encode work, but its status is {self._status.name}"
            )

    @contextmanager
    def encoding(self, owner: str) -> Iterator[None]:
        """Context in which a kernel enqueues its work (selects the command buffer's stream).
        Deferred work queued before (:meth:`defer`, on any command buffer) is launched first."""
        self.check_encodable(owner)
        if _DEFERRED:
            flush_deferred()
        with self._on_stream():
            yield

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self.stream is not None and _current_stream_id(self.device.torch_device) != self._stream_id:
            with torch.cuda.stream(self.stream):
                yield
        else:  # CPU, or the command buffer's stream is already current: nothing to switch
            yield

    # -- deferred work ------------------------------------------------------------------------
    def defer(self, owner: str, key: Hashable, item: Any, launch: Callable[[list[Any]], None],
              reads: set[int], writes: set[int]) -> None:
        """Queue ``item`` so that it is launched together with the items queued after it under
        the same ``key``: ``launch(items)`` runs, on this command buffer's stream, before any
        other work is encoded on any command buffer, at :meth:`commit`, or as soon as an item
        of another key (or of another command buffer) is queued or the new item touches
        storage a queued one writes (``reads``/``writes``: the items' storage addresses).
        Encode order is kept for every tensor: multi-tensor updates (the optimizers) use it to
        run many small encodes as one launch."""
        self.check_encodable(owner)
        group = self._deferred
        if group is not None and (group[0] != key or not writes.isdisjoint(group[3]) or not writes.isdisjoint(group[4])
                                  or not reads.isdisjoint(group[4])):
            self.flush_deferred()
            group = None
        if group is None:
            flush_deferred()                      # another command buffer's queue goes first
            group = self._deferred = (key, [], launch, set(), set())
            _DEFERRED.append(self)
        group[1].append(item)
        group[3].update(reads)
        group[4].update(writes)

    def flush_deferred(self) -> None:
        """Launch this command buffer's deferred items now (see :meth:`defer`)."""
        group = self._deferred
        if group is None:
            return
        self._deferred = None
        _DEFERRED.remove(self)
        with self._on_stream():
            group[2](group[1])

    # -- temporary storage pool ---------------------------------------------------------------
    def _take_storage(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        free = self._pool.get((numel, dtype))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, device=self.device.torch_device)

    #: storage blocks kept per (size, dtype); more are handed back to torch's caching allocator
    #: (results that kernels made themselves and images adopted would otherwise pile up here)
    POOL_BLOCKS_PER_SIZE = 4

    def _return_storage(self, flat: torch.Tensor) -> None:
        if self._status != MTLCommandBufferStatus.completed:
            free = self._pool[(flat.numel(), flat.dtype)]
            if len(free) < self.POOL_BLOCKS_PER_SIZE:
                free.append(flat)

    def pooled_storage_count(self) -> int:
        """Number of storage blocks waiting in this command buffer's temporary pool."""
        return sum(len(v) for v in self._pool.values())

    # -- commit / completion ---------------------------------------------------------------
    def commit(self) -> None:
        """Submit the buffer. Encoded work is already queued on the stream; this records the
        completion point and arranges for the completion handlers."""
        if self._status >= MTLCommandBufferStatus.committed:
            raise MPSStateError(
                f"MTLCommandBuffer: `commit` may be called once, but the status is already {self._status.name}"
            )
        self.flush_deferred()
        self._status = MTLCommandBufferStatus.committed
        for fn in self._scheduled_handlers:
            self._call(fn)
        if self.stream is not None:
            self._event = torch.cuda.Event()
            self._event.record(self.stream)
            if self._completed_handlers:
                threading.Thread(target=self._wait_and_finish, daemon=True).start()
        else:
            self._finish()

    def _wait_and_finish(self) -> None:
        try:
            self._event.synchronize()
        finally:
            self._finish()

    def _call(self, fn: Callable[["MTLCommandBuffer"], Any]) -> None:
        try:
            fn(self)
        except BaseException as exc:  # a handler's failure is reported, not lost
            self.error = exc

    def _finish(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._status = MTLCommandBufferStatus.completed
            self._pool.clear()
            handlers = list(self._completed_handlers)
            for fn in handlers:
                self._call(fn)
            if self.error is not None:
                self._status = MTLCommandBufferStatus.error
            self._done.set()

    def wait_until_completed(self) -> None:
        """Block the host until all work of this command buffer has finished."""
        if self._status < MTLCommandBufferStatus.committed:
            raise MPSStateError(
                "MTLCommandBuffer: `wait_until_completed` must follow `commit`, but the command buffer was not committed"
            )
        if self._event is not None:
            self._event.synchronize()
        self._finish()
        self._done.wait()

    def wait_until_scheduled(self) -> None:
        if self._status < MTLCommandBufferStatus.committed:
            raise MPSStateError(
                "MTLCommandBuffer: `wait_until_scheduled` must follow `commit`, but the command buffer was not committed"
            )

    def add_completed_handler(self, handler: Callable[["MTLCommandBuffer"], Any]) -> None:
        """Register ``handler(command_buffer)`` to run once the work has completed.
        Must be called before ``commit``."""
        if self._status >= MTLCommandBufferStatus.committed:
            raise MPSStateError("MTLCommandBuffer: `add_completed_handler` must be called before `commit`")
        self._completed_handlers.append(handler)

    def add_scheduled_handler(self, handler: Callable[["MTLCommandBuffer"], Any]) -> None:
        if self._status >= MTLCommandBufferStatus.committed:
            raise MPSStateError("MTLCommandBuffer: `add_scheduled_handler` must be called before `commit`")
        self._scheduled_handlers.append(handler)

    def __repr__(self) -> str:
        return f"MTLCommandBuffer({self.device!r}, status={self._status.name})"
