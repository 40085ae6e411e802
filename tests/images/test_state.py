"""MPSState, MPSStateResourceList, temporary states, MPSStateBatch helpers, MPSNNGradientState.

Spec: images.md §9-10; kernel-base.md §2.10 and §7 (MPSImageSizeEncodingState).
"""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import mpsnn
from mpsnn import (
    MPSImage,
    MPSImageDescriptor,
    MPSState,
    MPSStateError,
    MPSStateResourceList,
    MPSStateResourceType,
    MPSStateTextureInfo,
    MTLTextureDescriptor,
)
from mpsnn import MPSImageFeatureChannelFormat as F

TEX = MTLTextureDescriptor(pixel_format=125, width=5, height=3, array_length=2, texture_type=3, usage=1)


def image(device, w=5, h=3, c=4, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MPSImage.from_torch(torch.randn(n, h, w, c, generator=g).to(device.torch_device))


def relu_descriptor():
    return mpsnn.MPSNNNeuronDescriptor.cnn_neuron_descriptor(mpsnn.MPSCNNNeuronType.reLU)


def test_buffer_state_is_lazy(device):
    s = MPSState(device, buffer_size=64)
    assert not s.is_temporary and s.read_count == 0 and s.label is None and s.device == device
    assert s.resource_count == 1
    assert s.resource_type_at_index(0) == MPSStateResourceType.buffer
    assert s.buffer_size_at_index(0) == 64
    assert s.texture_info_at_index(0) == MPSStateTextureInfo() == MPSStateTextureInfo(0, 0, 0, 0, 0, 0, 0)
    assert s.resource_size() == 64
    assert s.resource_at_index(0, allocate_memory=False) is None  # none of the above allocated
    r = s.resource_at_index(0)
    assert isinstance(r, torch.Tensor) and r.numel() * r.element_size() == 64 and r.device == device.torch_device
    assert torch.count_nonzero(r).item() == 0
    assert s.resource_at_index(0, allocate_memory=False) is r
    assert s.resource is r


def test_texture_state(device):
    s = MPSState(device, texture_descriptor=TEX)
    assert s.resource_type_at_index(0) == MPSStateResourceType.texture
    assert s.buffer_size_at_index(0) == 0
    info = s.texture_info_at_index(0)
    assert (info.width, info.height, info.depth, info.array_length, info.pixel_format, info.texture_type, info.usage) == (5, 3, 1, 2, 125, 3, 1)
    assert s.resource_size() == 2 * 3 * 5 * 16  # rgba32Float
    assert s.resource_at_index(0, allocate_memory=False) is None
    t = s.resource_at_index(0)
    assert isinstance(t, torch.Tensor) and t.device == device.torch_device
    assert s.resource_at_index(0, False) is t


def test_texture_2d_descriptor_helper():
    d = MTLTextureDescriptor.texture_2d_descriptor(55, 7, 4)
    assert (d.pixel_format, d.width, d.height, d.depth, d.array_length, d.texture_type) == (55, 7, 4, 1, 1, 2)


def test_resource_list_state(device):
    rl = MPSStateResourceList.resource_list_with_buffer_sizes(16, 32, 0, 99)  # 0 terminates
    rl.append_texture(TEX)
    s = MPSState(device, resource_list=rl)
    assert s.resource_count == 3
    assert [s.resource_type_at_index(i) for i in range(3)] == [MPSStateResourceType.buffer, MPSStateResourceType.buffer, MPSStateResourceType.texture]
    assert [s.buffer_size_at_index(i) for i in range(3)] == [16, 32, 0]
    assert s.texture_info_at_index(2).width == 5 and s.texture_info_at_index(0).width == 0
    assert s.resource_size() == 16 + 32 + 480
    assert all(s.resource_at_index(i, allocate_memory=False) is None for i in range(3))
    s.resource_at_index(1)  # allocating one leaves the others alone
    assert s.resource_at_index(0, False) is None and s.resource_at_index(1, False) is not None and s.resource_at_index(2, False) is None
    # out-of-range indices
    assert s.resource_type_at_index(3) == MPSStateResourceType.none
    for fn in (s.buffer_size_at_index, s.texture_info_at_index, s.resource_at_index):
        with pytest.raises(mpsnn.MPSValueError, match="`index`"):
            fn(3)
    with pytest.raises(mpsnn.MPSValueError, match="`index`"):
        s.resource_at_index(-1, False)


def test_resource_list_builders():
    rl = MPSStateResourceList.resource_list_with_texture_descriptors(TEX, None, TEX)
    assert len(rl.entries) == 1
    empty = MPSStateResourceList.resource_list()
    assert empty.entries == []
    empty.append_buffer(8)
    assert empty.entries == [8]
    with pytest.raises(mpsnn.MPSValueError, match="MPSStateResourceList: `size`"):
        empty.append_buffer(0)
    with pytest.raises(mpsnn.MPSTypeError, match="MPSStateResourceList: `descriptor`"):
        empty.append_texture(16)


def test_wrapped_resources(device):
    buf = torch.arange(10, dtype=torch.float32, device=device.torch_device)
    s = MPSState(resource=buf)
    assert s.device == device and s.resource_count == 1 and not s.is_temporary
    assert s.resource_at_index(0, allocate_memory=False) is buf
    assert s.resource_type_at_index(0) == MPSStateResourceType.buffer and s.buffer_size_at_index(0) == 40
    a = torch.zeros(8, dtype=torch.uint8, device=device.torch_device)
    b = torch.ones(6, dtype=torch.float16, device=device.torch_device)
    s2 = MPSState(resources=[a, b])
    assert s2.resource_count == 2
    assert s2.resource_at_index(0, False) is a and s2.resource_at_index(1, False) is b
    assert [s2.buffer_size_at_index(i) for i in range(2)] == [8, 12]
    assert s2.resource_size() == 20
    with pytest.raises(mpsnn.MPSTypeError, match="MPSState: `device`"):
        MPSState()
    with pytest.raises(mpsnn.MPSTypeError, match="`resources`"):
        MPSState(device, resources=[b"abc"])
    with pytest.raises(mpsnn.MPSValueError, match="`buffer_size`"):
        MPSState(device, buffer_size=-1)


def test_non_temporary_read_count_is_free(device):
    s = MPSState(device, buffer_size=4)
    s.read_count = 3
    s.read_count = 0
    s.read_count = 2  # not frozen at 0: only temporary states are
    assert s.read_count == 2
    assert s.resource_at_index(0) is not None
    with pytest.raises(mpsnn.MPSValueError, match="`read_count`"):
        s.read_count = -1


def test_hook_default_returns_suggested_descriptor(device):
    s = MPSState(device, buffer_size=4)
    d = MPSImageDescriptor(channel_format=F.float32, width=3, height=3)
    k = mpsnn.MPSCNNNeuronReLU(device)
    k.offset = mpsnn.MPSOffset(1, 2, 0)
    assert s.destination_image_descriptor_for_source_images([image(device)], None, k, d) is d
    assert k.offset == mpsnn.MPSOffset(1, 2, 0)


# --------------------------------------------------------------------------------------------
# temporary states
# --------------------------------------------------------------------------------------------
def test_temporary_state_read_count(cb):
    s = MPSState.temporary_state_with_command_buffer(cb, buffer_size=32)
    assert s.is_temporary and s.read_count == 1 and s.command_buffer is cb and s.device == cb.device
    assert s.resource_at_index(0, allocate_memory=False) is None
    r = s.resource_at_index(0)
    assert r is not None
    s.read_count = 2
    s.consume_read()
    assert s.read_count == 1 and s.resource_at_index(0, False) is r
    s.label = "tmp-state"
    s.read_count = 0  # releases
    with pytest.raises(MPSStateError, match="tmp-state.*`read_count`"):
        s.read_count = 1
    with pytest.raises(MPSStateError, match="tmp-state"):
        s.resource_at_index(0)
    with pytest.raises(MPSStateError, match="tmp-state"):
        s.consume_read()
    assert s.buffer_size_at_index(0) == 32  # describing the resource is still fine


def test_temporary_state_without_resource_is_temporary(cb):
    # CONFLICT in images.md §9.1: the factory's result is treated as temporary
    s = MPSState.temporary_state_with_command_buffer(cb)
    assert s.is_temporary and s.resource_count == 0 and s.resource_size() == 0 and s.resource is None
    s2 = MPSState.temporary_state_with_command_buffer(cb, texture_descriptor=TEX)
    assert s2.resource_type_at_index(0) == MPSStateResourceType.texture
    s3 = MPSState.temporary_state_with_command_buffer(cb, resource_list=MPSStateResourceList.resource_list_with_buffer_sizes(4, 8))
    assert s3.resource_count == 2
    with pytest.raises(mpsnn.MPSTypeError, match="`command_buffer`"):
        MPSState.temporary_state_with_command_buffer("not a cb", buffer_size=4)


def test_gradient_kernel_consumes_temporary_state(cb):
    device = cb.device
    x = image(device, seed=1)
    fwd = mpsnn.MPSCNNNeuronReLU(device, a=0.0)
    _y, state = fwd.encode(cb, x, destination_state_is_temporary=True)
    assert isinstance(state, mpsnn.MPSNNGradientState) and state.is_temporary and state.read_count == 1
    assert state.command_buffer is cb
    grad = mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=relu_descriptor())
    dy = image(device, seed=2)
    dx = grad.encode(cb, dy, x, state)
    assert state.read_count == 0
    expect = dy.tensor.float().cpu() * (x.tensor.float().cpu() >= 0)
    assert torch.equal(dx.tensor.float().cpu(), expect)
    state.label = "used-up"
    with pytest.raises(MPSStateError, match="used-up"):
        grad.encode(cb, dy, x, state)


def test_temporary_state_bound_to_its_command_buffer(queue):
    cb1, cb2 = queue.make_command_buffer(), queue.make_command_buffer()
    device = cb1.device
    x = image(device)
    state = mpsnn.MPSCNNNeuronReLU(device).temporary_result_state(cb1, x)
    assert state.is_temporary and state.command_buffer is cb1
    grad = mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=relu_descriptor())
    with pytest.raises(MPSStateError, match="another command buffer"):
        grad.encode(cb2, image(device, seed=3), x, state)
    assert state.read_count == 1


def test_encode_batch_consumes_shared_state_once(cb):
    device = cb.device
    xs = [image(device, seed=i) for i in range(3)]
    state = mpsnn.MPSCNNNeuronReLU(device).temporary_result_state(cb, xs[0])
    state.read_count = 2
    grad = mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=relu_descriptor())
    grad.encode_batch(cb, [image(device, seed=10 + i) for i in range(3)], xs, [state, state, state])
    assert state.read_count == 1


# --------------------------------------------------------------------------------------------
# MPSStateBatch helpers
# --------------------------------------------------------------------------------------------
def test_state_batch_increment(cb):
    a = MPSState.temporary_state_with_command_buffer(cb, buffer_size=8)
    b = MPSState.temporary_state_with_command_buffer(cb, buffer_size=8)
    perm = MPSState(cb.device, buffer_size=8)
    assert mpsnn.MPSStateBatchIncrementReadCount([a, a, b, perm, a], 2) == 3
    assert (a.read_count, b.read_count, perm.read_count) == (3, 3, 0)
    assert mpsnn.MPSStateBatchIncrementReadCount([a, b, b], -3) == 2
    assert a.read_count == 0 and b.read_count == 0
    assert a.resource_count == 1
    with pytest.raises(MPSStateError):
        a.resource_at_index(0)
    # states at 0 are skipped
    assert mpsnn.MPSStateBatchIncrementReadCount([a], 1) == 1 and a.read_count == 0
    assert mpsnn.MPSStateBatchIncrementReadCount(None, 1) == 0
    assert mpsnn.MPSStateBatchIncrementReadCount([], 1) == 0


class _CountingState(MPSState):
    calls: ClassVar[list] = []

    def synchronize_on_command_buffer(self, command_buffer):
        _CountingState.calls.append((self, command_buffer))


def test_state_batch_synchronize_and_size(cb):
    _CountingState.calls = []
    a = _CountingState(cb.device, buffer_size=10)
    b = _CountingState(cb.device, texture_descriptor=TEX)
    batch = [a, b, a, b, b]
    mpsnn.MPSStateBatchSynchronize(batch, cb)
    assert [c[0] for c in _CountingState.calls] == [a, b] and all(c[1] is cb for c in _CountingState.calls)
    assert mpsnn.MPSStateBatchResourceSize(batch) == 10 + 480
    assert mpsnn.MPSStateBatchResourceSize(None) == 0
    assert a.resource_at_index(0, False) is None and b.resource_at_index(0, False) is None


# --------------------------------------------------------------------------------------------
# MPSNNGradientState (images.md §10, kernel-base.md §7)
# --------------------------------------------------------------------------------------------
def test_gradient_state_holds_source_size(device):
    x = image(device, w=7, h=4, c=5, n=2)
    k = mpsnn.MPSCNNNeuronReLU(device)
    s = k.result_state(x)
    assert isinstance(s, mpsnn.MPSNNGradientState)
    assert isinstance(s, mpsnn.MPSImageSizeEncodingState) and isinstance(s, MPSState)
    assert (s.source_width, s.source_height) == (7, 4)
    assert not s.is_temporary
    assert k.result_state_for_source_image(x).source_width == 7
    states = k.result_state_batch([image(device, w=3, h=2), image(device, w=3, h=2)])
    assert len(states) == 2 and states[0] is not states[1]
    assert all((st.source_width, st.source_height) == (3, 2) for st in states)


def test_gradient_state_from_encode(cb):
    x = image(cb.device, w=6, h=2, c=3)
    y, s = mpsnn.MPSCNNNeuronReLU(cb.device).encode(cb, x, destination_state_is_temporary=False)
    assert isinstance(s, mpsnn.MPSNNGradientState) and not s.is_temporary
    assert (s.source_width, s.source_height) == (6, 2)
    assert y.shape == (1, 2, 6, 3)


def test_gradient_state_sizes_the_gradient_result(device):
    """The state's hook makes the gradient's result the forward source's size (§2.9 step 3)."""
    x = image(device, w=5, h=3, c=4)
    s = mpsnn.MPSCNNNeuronReLU(device).result_state(x)
    grad = mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=relu_descriptor())
    dy = image(device, w=6, h=4, c=4, seed=5)  # a size the padding rule alone would keep
    d = grad.destination_image_descriptor([dy, x], [s])
    assert (d.width, d.height, d.feature_channels) == (5, 3, 4)
    assert (grad.destination_image_descriptor([dy, x], None).width, grad.destination_image_descriptor([dy, x], None).height) == (6, 4)


def test_binary_gradient_state_class():
    assert issubclass(mpsnn.MPSNNBinaryGradientState, mpsnn.MPSNNGradientState)
    assert issubclass(mpsnn.MPSNNGradientState, mpsnn.MPSImageSizeEncodingState)
    with pytest.raises(TypeError):
        mpsnn.MPSImageSizeEncodingState()  # a protocol
