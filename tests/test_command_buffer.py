"""Devices, command queues and command buffers (API.md "Devices and command buffers")."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import mpsnn
from mpsnn import Device, MPSError, MPSStateError, MTLCommandBuffer, MTLCommandQueue
from mpsnn import MTLCommandBufferStatus as S

CUDA = torch.cuda.is_available()


def _poll(predicate, timeout=5.0):
    """Completion handlers may run on a background thread (CUDA): wait a little for them."""
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.005)
    return predicate()


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------
def test_cpu_device_parsing_and_equality():
    a = Device("cpu")
    assert a == Device(torch.device("cpu")) == Device(a) == Device()
    assert hash(a) == hash(Device("cpu"))
    assert a.type == "cpu" and not a.is_cuda and a.name == "cpu"
    assert a.torch_device == torch.device("cpu")
    assert a != "cpu" and "cpu" in repr(a)
    assert len({a, Device("cpu")}) == 1


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "meta", "", "cpu:x"])
def test_bad_device_names(bad):
    with pytest.raises(MPSError) as ei:
        Device(bad)
    assert "Device" in str(ei.value) and "`name`" in str(ei.value)
    assert isinstance(ei.value, (ValueError, RuntimeError))


@pytest.mark.skipif(CUDA, reason="CUDA is usable here")
def test_cuda_without_gpu_raises():
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(mpsnn.MPSDeviceError, match="CUDA"):
            Device(name)
    assert isinstance(mpsnn.MPSDeviceError("x"), MPSError)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_device_parsing():
    a = Device("cuda")
    assert a == Device("cuda:0") == Device(torch.device("cuda", 0))
    assert a.is_cuda and a.type == "cuda" and a.torch_device == torch.device("cuda", 0)
    assert a != Device("cpu")
    assert isinstance(a.name, str) and a.name
    with pytest.raises(mpsnn.MPSDeviceError):
        Device(f"cuda:{torch.cuda.device_count()}")


def test_default_device():
    want = Device("cuda:0") if CUDA else Device("cpu")
    assert mpsnn.default_device() == want
    assert mpsnn.MTLCreateSystemDefaultDevice() == want


def test_device_arguments_are_validated():
    with pytest.raises(MPSError, match="`device`"):
        mpsnn.MPSCNNNeuronReLU(1.5)
    with pytest.raises(MPSError, match="`device`"):
        MTLCommandQueue(object())
    assert mpsnn.MPSCNNNeuronReLU("cpu").device == Device("cpu")


# --------------------------------------------------------------------------------------------
# queues and buffers
# --------------------------------------------------------------------------------------------
def test_queue_and_buffer_creation(device):
    q = device.make_command_queue()
    assert isinstance(q, MTLCommandQueue) and q.device == device
    cb = q.make_command_buffer()
    assert isinstance(cb, MTLCommandBuffer)
    assert cb.device == device and cb.command_queue is q
    assert cb.status == S.notEnqueued and cb.error is None and cb.label is None
    cb2 = q.command_buffer()
    assert isinstance(cb2, MTLCommandBuffer) and cb2 is not cb
    q2 = MTLCommandQueue(device)
    assert q2.device == device
    assert MTLCommandQueue(str(device.torch_device)).device == device


def test_status_transitions(cb):
    assert cb.status == S.notEnqueued
    cb.enqueue()
    assert cb.status == S.enqueued
    cb.enqueue()  # harmless
    assert cb.status == S.enqueued
    cb.commit()
    assert cb.status in (S.committed, S.scheduled, S.completed)
    cb.wait_until_completed()
    assert cb.status == S.completed
    cb.wait_until_completed()  # waiting again is fine
    assert cb.status == S.completed and cb.error is None


def test_commit_without_enqueue(cb):
    cb.commit()
    cb.wait_until_completed()
    assert cb.status == S.completed


def test_commit_twice_raises(cb):
    cb.commit()
    with pytest.raises(MPSStateError, match="MTLCommandBuffer: `commit`"):
        cb.commit()
    cb.wait_until_completed()
    with pytest.raises(MPSStateError, match="`commit`"):
        cb.commit()


def test_wait_before_commit_raises(cb):
    with pytest.raises(MPSStateError, match="`wait_until_completed`"):
        cb.wait_until_completed()
    with pytest.raises(MPSStateError, match="`wait_until_scheduled`"):
        cb.wait_until_scheduled()
    cb.enqueue()
    with pytest.raises(MPSStateError, match="`wait_until_completed`"):
        cb.wait_until_completed()
    assert cb.status == S.enqueued


def test_completed_handler_runs_once_after_completion(cb):
    calls = []

    def handler(buf):
        calls.append((buf, buf.status, threading.current_thread().name))

    cb.add_completed_handler(handler)
    assert calls == []  # nothing before commit
    cb.commit()
    cb.wait_until_completed()
    assert _poll(lambda: len(calls) >= 1)
    time.sleep(0.02)
    cb.wait_until_completed()
    _ = cb.status
    assert len(calls) == 1
    buf, status_seen, _thread = calls[0]
    assert buf is cb and status_seen == S.completed
    assert cb.status == S.completed and cb.error is None


def test_several_handlers_run_in_order(cb):
    order = []
    for i in range(3):
        cb.add_completed_handler(lambda buf, i=i: order.append(i))
    cb.commit()
    cb.wait_until_completed()
    assert _poll(lambda: len(order) == 3)
    assert order == [0, 1, 2]


def test_handlers_after_commit_raise(cb):
    cb.commit()
    with pytest.raises(MPSStateError, match="`add_completed_handler`"):
        cb.add_completed_handler(lambda buf: None)
    with pytest.raises(MPSStateError, match="`add_scheduled_handler`"):
        cb.add_scheduled_handler(lambda buf: None)
    cb.wait_until_completed()


def test_scheduled_handler_runs_at_commit(cb):
    seen = []
    cb.add_scheduled_handler(lambda buf: seen.append(buf))
    assert seen == []
    cb.commit()
    assert seen == [cb]
    cb.wait_until_completed()
    assert seen == [cb]


def test_failing_handler_sets_error(cb):
    boom = RuntimeError("handler failed")
    later = []

    def bad(buf):
        raise boom

    cb.add_completed_handler(bad)
    cb.add_completed_handler(lambda buf: later.append(1))  # the others still run
    cb.commit()
    cb.wait_until_completed()
    assert _poll(lambda: cb.status == S.error)
    assert cb.error is boom
    assert later == [1]


def test_encoding_on_committed_buffer_raises(cb):
    device = cb.device
    desc = mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.float32, width=2, height=2, feature_channels=1)
    src = mpsnn.MPSImage(device, image_descriptor=desc)
    dst = mpsnn.MPSImage(device, image_descriptor=desc)
    k = mpsnn.MPSCNNNeuronReLU(device, a=0.0)
    k.encode(cb, src, dst)
    cb.commit()
    for call in (lambda: k.encode(cb, src, dst), lambda: k.encode(cb, src), lambda: k.encode_batch(cb, [src], [dst]),
                 lambda: mpsnn.MPSTemporaryImage(cb, image_descriptor=desc)):
        with pytest.raises(MPSStateError, match="`command_buffer` must not be committed"):
            call()
    with pytest.raises(MPSStateError):
        k.temporary_result_state(cb, src)
    cb.wait_until_completed()
    with pytest.raises(MPSStateError):
        k.encode(cb, src, dst)


def test_work_runs_in_encode_order_and_is_visible_after_wait(cb):
    device = cb.device
    x = mpsnn.MPSImage.from_torch(torch.linspace(-2, 2, 16, device=device.torch_device).reshape(1, 4, 4, 1))
    y = mpsnn.MPSImage(device, image_descriptor=mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.float32, width=4, height=4))
    z = mpsnn.MPSImage(device, image_descriptor=mpsnn.MPSImageDescriptor(channel_format=mpsnn.MPSImageFeatureChannelFormat.float32, width=4, height=4))
    mpsnn.MPSCNNNeuronLinear(device, a=-1.0, b=0.5).encode(cb, x, y)   # y = 0.5 - x
    mpsnn.MPSCNNNeuronReLU(device, a=0.0).encode(cb, y, z)            # z = relu(y)
    cb.commit()
    cb.wait_until_completed()
    ref = torch.clamp(0.5 - torch.linspace(-2, 2, 16).reshape(1, 4, 4, 1), min=0)
    assert torch.allclose(z.to_torch().cpu(), ref, atol=1e-6, rtol=0)


def test_kernel_rejects_other_device_buffer_and_non_buffers(device):
    k = mpsnn.MPSCNNNeuronReLU(device)
    desc = mpsnn.MPSImageDescriptor(width=2, height=2)
    img = mpsnn.MPSImage(device, image_descriptor=desc)
    with pytest.raises(mpsnn.MPSTypeError, match="`command_buffer`"):
        k.encode("cb", img, mpsnn.MPSImage(device, image_descriptor=desc))
    if device.is_cuda:
        cpu_cb = Device("cpu").make_command_queue().make_command_buffer()
        with pytest.raises(mpsnn.MPSDeviceError, match="`command_buffer`"):
            k.encode(cpu_cb, img, mpsnn.MPSImage(device, image_descriptor=desc))


def test_status_enum_values():
    assert [int(S.notEnqueued), int(S.enqueued), int(S.committed), int(S.scheduled), int(S.completed), int(S.error)] == [0, 1, 2, 3, 4, 5]
