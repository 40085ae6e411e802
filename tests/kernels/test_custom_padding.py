"""Custom MPSNNPadding policies (kernel-base.md §2.9 step 4, §6.5), written the two ways a port
may spell ``paddingMethod``: as a property or as a method (Swift's ``paddingMethod()``)."""
from __future__ import annotations

import numpy as np
import pytest

import mpsnn
from mpsnn import MPSImageFeatureChannelFormat as F
from mpsnn import MPSNNPaddingMethod as PM


class Window3x3Stride2(mpsnn.MPSCNNKernel):
    """A windowed kernel shape (3x3, stride 2) to size results with; no numerics needed."""

    _kernel_width = 3
    _kernel_height = 3
    _stride_x = 2
    _stride_y = 2


class HalfPrecisionValidOnly(mpsnn.MPSNNPadding):
    """Custom policy, method spelled as in Swift: valid-only sizing, float16 results."""

    def __init__(self) -> None:
        self.calls = 0

    def padding_method(self):  # a method, not a property
        return PM.custom | PM.sizeValidOnly

    def destination_image_descriptor_for_source_images(self, source_images, source_states, kernel, suggested_descriptor):
        self.calls += 1
        desc = suggested_descriptor.copy()
        desc.channel_format = F.float16
        return desc


class FullPolicyProperty(mpsnn.MPSNNPadding):
    @property
    def padding_method(self):
        return PM.sizeFull | PM.alignCentered


def _source(w: int, h: int) -> mpsnn.MPSImage:
    return mpsnn.MPSImage.from_numpy(np.zeros((1, h, w, 3), np.float32), "cpu")


def test_custom_policy_spelled_as_method_runs_its_hook_last():
    k = Window3x3Stride2("cpu")
    policy = HalfPrecisionValidOnly()
    k.padding = policy
    desc = k.destination_image_descriptor([_source(7, 10)])
    assert policy.calls == 1
    assert (desc.width, desc.height) == (3, 4), "valid-only: ceil((7-2)/2)=3, ceil((10-2)/2)=4"
    assert (k.offset.x, k.offset.y) == (1, 1)
    assert desc.channel_format == F.float16, "the custom hook's edit wins"
    assert "custom" in policy.label


def test_policy_spelled_as_property():
    k = Window3x3Stride2("cpu")
    k.padding = FullPolicyProperty()
    desc = k.destination_image_descriptor([_source(7, 7)])
    assert (desc.width, desc.height, k.offset.x, k.offset.y) == (5, 5, -1, -1), "kernel-base.md §6.3 row 'Full'"


def test_default_padding_method_is_readable_both_ways():
    p = mpsnn.MPSNNDefaultPadding.padding_with_method(PM.sizeSame | PM.addRemainderToBottomRight)
    assert p.padding_method == p.padding_method() == 0x1C


def test_policy_with_a_bad_method_value_raises():
    class Bad(mpsnn.MPSNNPadding):
        @property
        def padding_method(self):
            return "same"

    k = Window3x3Stride2("cpu")
    k.padding = Bad()
    with pytest.raises(mpsnn.MPSError, match=r"Bad: `padding_method`"):
        k.destination_image_descriptor([_source(7, 7)])
