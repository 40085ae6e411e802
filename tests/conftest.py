"""Shared fixtures: the devices to test on (CUDA params skip cleanly without a GPU)."""
from __future__ import annotations

import pytest
import torch

import mpsnn

CUDA = torch.cuda.is_available()
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> mpsnn.Device:
    return mpsnn.Device(request.param)


@pytest.fixture
def queue(device):
    return device.make_command_queue()


@pytest.fixture
def cb(queue):
    return queue.make_command_buffer()
