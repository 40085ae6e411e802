"""MPSTemporaryImage: read counts, storage pool reuse, command-buffer binding, derived views.

Spec: images.md §4.3, §6; kernel-base.md §2.8 (each encode decrements every temporary source
once, once per unique object in batches; destinations are unchanged).
A ReLU (a = 0) is the kernel used to read images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSImage, MPSImageDescriptor, MPSStateError, MPSTemporaryImage
from mpsnn import MPSImageFeatureChannelFormat as F

HWC = mpsnn.MPSDataLayout.HeightxWidthxFeatureChannels


def desc(w=3, h=2, c=4, n=1, fmt=F.float32):
    return MPSImageDescriptor(channel_format=fmt, width=w, height=h, feature_channels=c, number_of_images=n)


def relu(device):
    return mpsnn.MPSCNNNeuronReLU(device, a=0.0)


def plain(device, w=3, h=2, c=4, n=1, fill=None):
    img = MPSImage(device, image_descriptor=desc(w, h, c, n))
    if fill is not None:
        img.tensor.copy_(fill)
    return img


def signed_values(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def filled_temp(cb, d=None, seed=0):
    """A temporary image whose contents were written by a kernel (so its storage exists)."""
    d = d or desc()
    t = MPSTemporaryImage(cb, image_descriptor=d)
    src = plain(cb.device, d.width, d.height, d.feature_channels, d.number_of_images,
                fill=signed_values((d.number_of_images, d.height, d.width, d.feature_channels), seed).to(cb.device.torch_device))
    relu(cb.device).encode(cb, src, t)
    return t, src


def test_initial_state(cb):
    t = MPSTemporaryImage(cb, image_descriptor=desc())
    assert t.read_count == 1 and t.is_temporary and t.command_buffer is cb and t.device == cb.device
    assert not t.is_allocated and t.parent is None
    assert t.resource_size() == 2 * 3 * 16 and not t.is_allocated
    assert isinstance(t, MPSImage)
    t2 = MPSTemporaryImage.temporary_image_with_command_buffer(cb, desc())
    assert isinstance(t2, MPSTemporaryImage) and t2.read_count == 1
    MPSTemporaryImage.prefetch_storage_with_command_buffer(cb, [desc(), desc(5, 5)])
    assert cb.pooled_storage_count() == 0


def test_writes_do_not_change_read_count_and_read_decrements(cb):
    t, src = filled_temp(cb)
    assert t.read_count == 1 and t.is_allocated
    dst = plain(cb.device)
    relu(cb.device).encode(cb, t, dst)
    assert t.read_count == 0
    expect = torch.clamp(src.tensor.float().cpu(), min=0)
    assert torch.equal(dst.tensor.float().cpu(), expect)


def test_manual_read_count_allows_several_reads(cb):
    t, src = filled_temp(cb)
    t.read_count = 3
    expect = torch.clamp(src.tensor.float().cpu(), min=0)
    k = relu(cb.device)
    for remaining in (2, 1, 0):
        dst = plain(cb.device)
        k.encode(cb, t, dst)
        assert t.read_count == remaining
        assert torch.equal(dst.tensor.float().cpu(), expect)
    assert cb.pooled_storage_count() == 1 and not t.is_allocated


def test_set_to_zero_releases_and_then_frozen(cb):
    t, _ = filled_temp(cb)
    assert cb.pooled_storage_count() == 0
    t.read_count = 0
    assert cb.pooled_storage_count() == 1 and not t.is_allocated
    for v in (1, 5):
        with pytest.raises(MPSStateError, match="MPSTemporaryImage.*`read_count`"):
            t.read_count = v
    assert t.read_count == 0
    assert cb.pooled_storage_count() == 1


def test_pool_keeps_a_bounded_number_of_blocks_per_size(cb):
    """Released storage is pooled up to POOL_BLOCKS_PER_SIZE blocks of one size; the rest goes
    back to torch's allocator (adopted kernel results would otherwise pile up)."""
    cap = cb.POOL_BLOCKS_PER_SIZE
    temps = [MPSTemporaryImage(cb, image_descriptor=desc()) for _ in range(cap + 3)]
    for t in temps:
        t.tensor.zero_()
    for t in temps:
        t.read_count = 0
    assert cb.pooled_storage_count() == cap
    again = MPSTemporaryImage(cb, image_descriptor=desc())
    again.tensor.zero_()
    assert cb.pooled_storage_count() == cap - 1, "a new image of that size takes a pooled block"


@pytest.mark.parametrize("bad", [-1, True])
def test_read_count_rejects_bad_values(cb, bad):
    t = MPSTemporaryImage(cb, image_descriptor=desc())
    with pytest.raises(mpsnn.MPSValueError, match="`read_count`"):
        t.read_count = bad
    assert t.read_count == 1


def test_any_use_after_zero_raises_naming_label(cb):
    t, _ = filled_temp(cb)
    t.label = "scratch-17"
    relu(cb.device).encode(cb, t, plain(cb.device))
    assert t.read_count == 0
    k = relu(cb.device)
    with pytest.raises(MPSStateError, match="scratch-17"):
        k.encode(cb, t, plain(cb.device))          # read
    with pytest.raises(MPSStateError, match="scratch-17"):
        k.encode(cb, plain(cb.device), t)          # write
    with pytest.raises(MPSStateError, match="scratch-17"):
        k.encode(cb, t)                            # read, auto destination
    with pytest.raises(MPSStateError, match="scratch-17"):
        t.tensor  # noqa: B018
    with pytest.raises(MPSStateError, match="scratch-17"):
        t.batch_representation()
    with pytest.raises(MPSStateError, match="scratch-17"):
        t.sub_image_with_feature_channel_range((0, 4))
    with pytest.raises(MPSStateError, match="scratch-17"):
        k.encode_batch(cb, [t], [plain(cb.device)])
    assert cb.pooled_storage_count() == 1


def test_host_access_is_refused(cb):
    t = MPSTemporaryImage(cb, image_descriptor=desc())
    t.label = "gpu-only"
    with pytest.raises(MPSStateError, match="MPSTemporaryImage.*`read_bytes`.*gpu-only"):
        t.read_bytes(HWC)
    with pytest.raises(MPSStateError, match="`write_bytes`"):
        t.write_bytes(np.zeros((2, 3, 4), np.float32), HWC)
    with pytest.raises(MPSStateError, match="`to_numpy`"):
        t.to_numpy()
    assert t.read_count == 1 and not t.is_allocated


def test_pool_reuses_storage_on_same_command_buffer(cb):
    t1, _ = filled_temp(cb)
    ptr = t1.tensor.data_ptr()
    relu(cb.device).encode(cb, t1, plain(cb.device))
    assert cb.pooled_storage_count() == 1
    # a different size does not take it
    other = MPSTemporaryImage(cb, image_descriptor=desc(5, 5))
    relu(cb.device).encode(cb, plain(cb.device, 5, 5), other)
    assert cb.pooled_storage_count() == 1 and other.tensor.data_ptr() != ptr
    # the same size does; creation alone does not allocate
    t2 = MPSTemporaryImage(cb, image_descriptor=desc())
    assert cb.pooled_storage_count() == 1
    src = plain(cb.device, fill=torch.full((1, 2, 3, 4), 2.5, device=cb.device.torch_device))
    relu(cb.device).encode(cb, src, t2)
    assert cb.pooled_storage_count() == 0
    assert t2.tensor.data_ptr() == ptr
    assert torch.all(t2.tensor == 2.5)


def test_pool_not_shared_between_command_buffers(queue):
    cb1, cb2 = queue.make_command_buffer(), queue.make_command_buffer()
    t1, _ = filled_temp(cb1)
    t1.read_count = 0
    assert cb1.pooled_storage_count() == 1 and cb2.pooled_storage_count() == 0
    t2 = MPSTemporaryImage(cb2, image_descriptor=desc())
    relu(cb2.device).encode(cb2, plain(cb2.device), t2)
    assert cb1.pooled_storage_count() == 1  # cb2 made fresh storage instead of taking cb1's


def test_other_command_buffer_is_refused(queue):
    cb1, cb2 = queue.make_command_buffer(), queue.make_command_buffer()
    t, _ = filled_temp(cb1)
    t.label = "bound-to-cb1"
    k = relu(cb1.device)
    with pytest.raises(MPSStateError, match="bound-to-cb1.*another command buffer"):
        k.encode(cb2, t, plain(cb1.device))
    with pytest.raises(MPSStateError, match="another command buffer"):
        k.encode(cb2, plain(cb1.device), t)
    with pytest.raises(MPSStateError, match="another command buffer"):
        k.encode_batch(cb2, [t], [plain(cb1.device)])
    assert t.read_count == 1  # failed encodes consume nothing


def test_encode_batch_decrements_once_per_unique_object(cb):
    t, src = filled_temp(cb)
    u, _ = filled_temp(cb, seed=1)
    t.read_count = 2
    u.read_count = 2
    k = relu(cb.device)
    dsts = [plain(cb.device) for _ in range(4)]
    k.encode_batch(cb, [t, t, u, t], dsts)
    assert t.read_count == 1 and u.read_count == 1
    expect = torch.clamp(src.tensor.float().cpu(), min=0)
    for i in (0, 1, 3):
        assert torch.equal(dsts[i].tensor.float().cpu(), expect)
    out = k.encode_batch(cb, [t, t, u])
    assert len(out) == 3 and all(isinstance(o, MPSTemporaryImage) for o in out)
    assert t.read_count == 0 and u.read_count == 0
    assert all(o.read_count == 1 for o in out)  # results are temporaries with the initial count
    assert cb.pooled_storage_count() == 2


def test_auto_encode_result_is_temporary_on_cb(cb):
    src = plain(cb.device, fill=signed_values((1, 2, 3, 4), 4).to(cb.device.torch_device))
    out = relu(cb.device).encode(cb, src)
    assert isinstance(out, MPSTemporaryImage) and out.command_buffer is cb and out.read_count == 1
    dst = plain(cb.device)
    relu(cb.device).encode(cb, out, dst)
    assert out.read_count == 0
    assert torch.equal(dst.tensor.float().cpu(), torch.clamp(src.tensor.float().cpu(), min=0))


# --------------------------------------------------------------------------------------------
# derived views (images.md §4.3)
# --------------------------------------------------------------------------------------------
def test_batch_views_hold_parent_counts(cb):
    t, src = filled_temp(cb, desc(n=3), seed=7)
    views = t.batch_representation()
    assert t.read_count == 4
    assert all(isinstance(v, MPSTemporaryImage) and v.read_count == 1 and v.parent is t and v.command_buffer is cb for v in views)
    assert all(v.resource_size() == 0 for v in views)
    k = relu(cb.device)
    expect = torch.clamp(src.tensor.float().cpu(), min=0)
    for i, v in enumerate(views):
        dst = plain(cb.device)
        k.encode(cb, v, dst)
        assert v.read_count == 0
        assert t.read_count == 3 - i
        assert torch.equal(dst.tensor.float().cpu(), expect[i:i + 1])
    assert cb.pooled_storage_count() == 0  # the parent still holds its own count
    k.encode(cb, t, plain(cb.device, n=3))
    assert t.read_count == 0 and cb.pooled_storage_count() == 1


def test_sub_image_view_of_temporary(cb):
    t, src = filled_temp(cb, desc(c=8), seed=3)
    sub = t.sub_image_with_feature_channel_range((4, 4))
    assert t.read_count == 2 and sub.read_count == 1 and sub.feature_channels == 4
    dst = plain(cb.device, c=4)
    relu(cb.device).encode(cb, sub, dst)
    assert sub.read_count == 0 and t.read_count == 1
    assert torch.equal(dst.tensor.float().cpu(), torch.clamp(src.tensor.float().cpu()[..., 4:8], min=0))


def test_view_writes_reach_parent(cb):
    t = MPSTemporaryImage(cb, image_descriptor=desc(n=2))
    views = t.batch_representation_with_sub_range((1, 1))
    assert t.read_count == 2
    fill = torch.full((1, 2, 3, 4), 1.25, device=cb.device.torch_device)
    relu(cb.device).encode(cb, plain(cb.device, fill=fill), views[0])
    assert views[0].read_count == 1 and t.read_count == 2  # a write changes no count
    assert torch.all(t.tensor[1] == 1.25)


def test_view_manually_zeroed_gives_back_and_may_release_parent(cb):
    t, _ = filled_temp(cb, desc(c=8))
    a = t.sub_image_with_feature_channel_range((0, 4))
    b = t.sub_image_with_feature_channel_range((4, 4))
    assert t.read_count == 3
    b.read_count = 0
    assert t.read_count == 2 and cb.pooled_storage_count() == 0
    a.read_count = 4      # a view's own count is its own business
    assert t.read_count == 2
    relu(cb.device).encode(cb, t, plain(cb.device, c=8))
    assert t.read_count == 1
    mpsnn.MPSImageBatchIncrementReadCount([a], -4)
    assert a.read_count == 0 and t.read_count == 0
    assert cb.pooled_storage_count() == 1


def test_view_of_released_parent_cannot_be_used(cb):
    t, _ = filled_temp(cb, desc(c=8))
    t.label = "parent-img"
    sub = t.sub_image_with_feature_channel_range((4, 4))
    t.read_count = 0     # releases the storage although a view still holds a count
    assert cb.pooled_storage_count() == 1
    with pytest.raises(MPSStateError, match="parent-img"):
        relu(cb.device).encode(cb, sub, plain(cb.device))
    assert cb.pooled_storage_count() == 1 and not t.is_allocated


def test_no_temporaries_on_committed_buffer(cb):
    cb.commit()
    with pytest.raises(MPSStateError, match="MPSTemporaryImage: `command_buffer`"):
        MPSTemporaryImage(cb, image_descriptor=desc())
    with pytest.raises(mpsnn.MPSTypeError, match="`command_buffer`"):
        MPSTemporaryImage("cb", image_descriptor=desc())


def test_pool_cleared_on_completion(cb):
    t, _ = filled_temp(cb)
    t.read_count = 0
    assert cb.pooled_storage_count() == 1
    cb.commit()
    cb.wait_until_completed()
    assert cb.pooled_storage_count() == 0


def test_default_allocator_makes_temporaries(cb):
    img = MPSTemporaryImage.default_allocator.image_for_command_buffer(cb, desc(), None)
    assert isinstance(img, MPSTemporaryImage) and img.command_buffer is cb
    batch = MPSTemporaryImage.default_allocator.image_batch_for_command_buffer(cb, desc(), None, 3)
    assert len(batch) == 3 and len({id(b) for b in batch}) == 3
    reg = MPSImage.default_allocator.image_for_command_buffer(cb, desc(), None)
    assert type(reg) is MPSImage and not reg.is_allocated
