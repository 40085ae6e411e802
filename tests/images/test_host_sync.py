"""Host transfers wait for work a command buffer queued on any stream of the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_read_bytes_sees_work_queued_on_a_side_stream():
    dev = mpsnn.Device("cuda")
    x = mpsnn.MPSImage.from_numpy(-np.ones((1, 64, 64, 4), np.float32), dev)
    y = mpsnn.MPSImage.from_numpy(np.zeros((1, 64, 64, 4), np.float32), dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        cb = dev.make_command_queue().make_command_buffer()  # binds to the side stream
        torch.cuda._sleep(300_000_000)  # keep the side stream busy well past the host read
    mpsnn.MPSCNNNeuronAbsolute(dev).encode(cb, x, y)
    cb.commit()
    out = y.read_bytes(mpsnn.MPSDataLayout.HeightxWidthxFeatureChannels, 0)
    np.testing.assert_array_equal(out, np.ones((64, 64, 4), np.float32))


def test_write_bytes_does_not_race_with_a_pending_read():
    dev = mpsnn.Device("cuda")
    x = mpsnn.MPSImage.from_numpy(-np.ones((1, 64, 64, 4), np.float32), dev)
    y = mpsnn.MPSImage.from_numpy(np.zeros((1, 64, 64, 4), np.float32), dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        cb = dev.make_command_queue().make_command_buffer()
        torch.cuda._sleep(300_000_000)
    mpsnn.MPSCNNNeuronAbsolute(dev).encode(cb, x, y)  # reads x after the sleep
    cb.commit()
    x.write_bytes(np.full((64, 64, 4), 7.0, np.float32), mpsnn.MPSDataLayout.HeightxWidthxFeatureChannels, 0)
    cb.wait_until_completed()
    np.testing.assert_array_equal(y.to_numpy(), np.ones((1, 64, 64, 4), np.float32))
