"""Enum raw values, struct defaults and the public Apple names (device-free).

Tables: images.md §1, neurons.md §2, kernel-base.md §1 and §6.1; names: API.md.
"""
from __future__ import annotations

import dataclasses
import enum

import pytest

import mpsnn
from mpsnn import (
    MPSCNNNeuronType,
    MPSDataLayout,
    MPSDataType,
    MPSImageEdgeMode,
    MPSImageFeatureChannelFormat,
    MPSKernelOptions,
    MPSNNPaddingMethod,
    MPSPurgeableState,
    MPSStateResourceType,
)


def _check(enum_cls, table):
    for name, value in table.items():
        assert int(getattr(enum_cls, name)) == value, f"{enum_cls.__name__}.{name}"


def test_feature_channel_format():
    _check(MPSImageFeatureChannelFormat, {"none": 0, "unorm8": 1, "unorm16": 2, "float16": 3, "float32": 4, "count": 6})
    # mpsnn extension in Apple's reserved slot 5
    assert int(MPSImageFeatureChannelFormat.bfloat16) == 5
    assert issubclass(MPSImageFeatureChannelFormat, enum.IntEnum)


def test_data_type():
    _check(MPSDataType, {
        "invalid": 0, "float32": 0x10000020, "float16": 0x10000010, "bFloat16": 0x90000010,
        "complexFloat32": 0x11000040, "complexFloat16": 0x11000020,
        "int8": 0x20000008, "int16": 0x20000010, "int32": 0x20000020, "int64": 0x20000040,
        "uInt8": 0x08, "uInt16": 0x10, "uInt32": 0x20, "uInt64": 0x40,
        "unorm1": 0x40000001, "unorm8": 0x40000008, "bool": 0x80000008,
        "floatBit": 0x10000000, "signedBit": 0x20000000, "normalizedBit": 0x40000000,
        "alternateEncodingBit": 0x80000000, "complexBit": 0x01000000,
    })
    # the low bits are the size in bits; flags combine as documented
    assert int(MPSDataType.float16) == int(MPSDataType.floatBit) | 16
    assert int(MPSDataType.bFloat16) == int(MPSDataType.alternateEncodingBit) | int(MPSDataType.floatBit) | 16
    assert int(MPSDataType.complexFloat32) == int(MPSDataType.complexBit) | int(MPSDataType.floatBit) | 64
    assert int(MPSDataType.int32) == int(MPSDataType.signedBit) | 32
    assert int(MPSDataType.unorm8) == int(MPSDataType.normalizedBit) | 8


def test_data_layout():
    _check(MPSDataLayout, {"HeightxWidthxFeatureChannels": 0, "FeatureChannelsxHeightxWidth": 1,
                           "heightxWidthxFeatureChannels": 0, "featureChannelsxHeightxWidth": 1})


def test_purgeable_state_edge_mode_resource_type():
    _check(MPSPurgeableState, {"allocationDeferred": 0, "keepCurrent": 1, "nonVolatile": 2, "volatile": 3, "empty": 4})
    _check(MPSImageEdgeMode, {"zero": 0, "clamp": 1, "mirror": 2, "mirrorWithEdge": 3, "constant": 4})
    _check(MPSStateResourceType, {"none": 0, "buffer": 1, "texture": 2})


def test_neuron_type():
    names = ["none", "reLU", "linear", "sigmoid", "hardSigmoid", "tanH", "absolute", "softPlus", "softSign",
             "ELU", "pReLU", "reLUN", "power", "exponential", "logarithm", "geLU", "count"]
    _check(MPSCNNNeuronType, {n: i for i, n in enumerate(names)})
    assert len(MPSCNNNeuronType) == 17


def test_kernel_options():
    _check(MPSKernelOptions, {"none": 0, "skipAPIValidation": 1, "allowReducedPrecision": 2,
                              "disableInternalTiling": 4, "insertDebugGroups": 8, "verbose": 16})


def test_padding_method_fields_and_common_combinations():
    PM = MPSNNPaddingMethod
    assert issubclass(PM, enum.IntFlag)
    _check(PM, {"alignMask": 0x3, "addRemainderToMask": 0xC, "sizeMask": 0x7F0, "custom": 0x4000,
                "customAllowForNodeFusion": 0x2000, "excludeEdges": 0x8000})
    assert int(PM.alignCentered | PM.addRemainderToTopLeft | PM.sizeSame) == 0x10          # generic default
    assert int(PM.alignCentered | PM.addRemainderToBottomRight | PM.sizeSame) == 0x1C      # TF SAME
    assert int(PM.custom | PM.sizeSame | PM.alignCentered | PM.addRemainderToBottomRight) == 0x401C
    # fields do not overlap
    masks = [int(PM.alignMask), int(PM.addRemainderToMask), int(PM.sizeMask), 0x2000, 0x4000, 0x8000]
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert a & b == 0


def test_command_buffer_status():
    _check(mpsnn.MTLCommandBufferStatus, {"notEnqueued": 0, "enqueued": 1, "committed": 2, "scheduled": 3, "completed": 4, "error": 5})


# --------------------------------------------------------------------------------------------
# structs
# --------------------------------------------------------------------------------------------
def test_rect_no_clip():
    r = mpsnn.MPSRectNoClip
    assert isinstance(r, mpsnn.MTLRegion)
    assert (r.origin.x, r.origin.y, r.origin.z) == (0, 0, 0)
    umax = (1 << 64) - 1
    assert (r.size.width, r.size.height, r.size.depth) == (umax, umax, umax)
    assert mpsnn.MPSCNNNeuronReLU("cpu").clip_rect == r


def test_struct_defaults_and_fields():
    assert mpsnn.MPSOffset() == mpsnn.MPSOffset(0, 0, 0) == mpsnn.MPSOffset(x=0, y=0, z=0)
    assert mpsnn.MTLOrigin() == mpsnn.MTLOrigin(0, 0, 0)
    assert mpsnn.MPSOrigin() == mpsnn.MPSOrigin(0.0, 0.0, 0.0)
    assert mpsnn.MPSImageCoordinate() == mpsnn.MPSImageCoordinate(x=0, y=0, channel=0)
    assert mpsnn.MPSImageRegion().offset == mpsnn.MPSImageCoordinate()
    p = mpsnn.MPSImageReadWriteParams()
    assert (p.feature_channel_offset, p.number_of_feature_channels_to_read_write) == (0, 0)
    assert mpsnn.MPSStateTextureInfo() == mpsnn.MPSStateTextureInfo(0, 0, 0, 0, 0, 0, 0)
    assert mpsnn.NSRange() == mpsnn.NSRange(location=0, length=0)
    fields = {
        mpsnn.MPSOffset: ["x", "y", "z"], mpsnn.MTLOrigin: ["x", "y", "z"], mpsnn.MTLSize: ["width", "height", "depth"],
        mpsnn.MTLRegion: ["origin", "size"], mpsnn.MPSOrigin: ["x", "y", "z"], mpsnn.MPSSize: ["width", "height", "depth"],
        mpsnn.MPSRegion: ["origin", "size"], mpsnn.MPSImageCoordinate: ["x", "y", "channel"],
        mpsnn.MPSImageRegion: ["offset", "size"],
        mpsnn.MPSImageReadWriteParams: ["feature_channel_offset", "number_of_feature_channels_to_read_write"],
        mpsnn.MPSStateTextureInfo: ["width", "height", "depth", "array_length", "pixel_format", "texture_type", "usage"],
    }
    for cls, names in fields.items():
        assert [f.name for f in dataclasses.fields(cls)] == names, cls.__name__


def test_structs_are_frozen_values():
    o = mpsnn.MPSOffset(1, -2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.x = 5  # type: ignore[misc]
    assert o == mpsnn.MPSOffset(1, -2, 3) and hash(o) == hash(mpsnn.MPSOffset(1, -2, 3))
    assert o != mpsnn.MPSOffset(1, 2, 3)


def test_region_helpers():
    assert mpsnn.MTLRegionMake2D(1, 2, 3, 4) == mpsnn.MTLRegion(mpsnn.MTLOrigin(1, 2, 0), mpsnn.MTLSize(3, 4, 1))
    assert mpsnn.MTLRegionMake3D(1, 2, 3, 4, 5, 6) == mpsnn.MTLRegion(mpsnn.MTLOrigin(1, 2, 3), mpsnn.MTLSize(4, 5, 6))
    assert mpsnn.MTLRegion.make_2d(0, 0, 2, 2) == mpsnn.MTLRegionMake2D(0, 0, 2, 2)


# --------------------------------------------------------------------------------------------
# public names (API.md): every class/function of the images, kernel-base and neuron specs
# --------------------------------------------------------------------------------------------
CLASSES = [
    # images.md
    "MPSImage", "MPSImageDescriptor", "MPSTemporaryImage", "MPSImageAllocator", "MPSState", "MPSStateResourceList",
    "MPSNNGradientState", "MPSNNBinaryGradientState",
    # kernel-base.md
    "MPSKernel", "MPSCNNKernel", "MPSCNNBinaryKernel", "MPSCNNGradientKernel", "MPSNNPadding", "MPSNNDefaultPadding",
    "MPSImageSizeEncodingState",
    # neurons.md
    "MPSNNNeuronDescriptor", "MPSCNNNeuron", "MPSCNNNeuronGradient", "MPSCNNNeuronLinear", "MPSCNNNeuronReLU",
    "MPSCNNNeuronPReLU", "MPSCNNNeuronSigmoid", "MPSCNNNeuronHardSigmoid", "MPSCNNNeuronTanH", "MPSCNNNeuronAbsolute",
    "MPSCNNNeuronSoftPlus", "MPSCNNNeuronSoftSign", "MPSCNNNeuronELU", "MPSCNNNeuronReLUN", "MPSCNNNeuronPower",
    "MPSCNNNeuronExponential", "MPSCNNNeuronLogarithm",
    # API.md devices
    "MTLCommandQueue", "MTLCommandBuffer", "Device",
]
ENUMS = ["MPSImageFeatureChannelFormat", "MPSDataType", "MPSDataLayout", "MPSPurgeableState", "MPSImageEdgeMode",
         "MPSStateResourceType", "MPSKernelOptions", "MPSNNPaddingMethod", "MPSCNNNeuronType", "MTLCommandBufferStatus"]
STRUCTS = ["MPSOffset", "MPSOrigin", "MPSSize", "MPSRegion", "MPSImageCoordinate", "MPSImageRegion", "MTLRegion",
           "MTLOrigin", "MTLSize", "MPSImageReadWriteParams", "MPSStateTextureInfo"]
FUNCTIONS = ["MPSImageBatchIncrementReadCount", "MPSImageBatchSynchronize", "MPSImageBatchResourceSize",
             "MPSImageBatchIterate", "MPSStateBatchIncrementReadCount", "MPSStateBatchSynchronize",
             "MPSStateBatchResourceSize", "MTLCreateSystemDefaultDevice", "default_device", "MTLRegionMake2D", "MTLRegionMake3D"]


@pytest.mark.parametrize("name", CLASSES + STRUCTS)
def test_class_names_exported(name):
    obj = getattr(mpsnn, name)
    assert isinstance(obj, type)
    assert name in mpsnn.__all__


@pytest.mark.parametrize("name", ENUMS)
def test_enum_names_exported(name):
    obj = getattr(mpsnn, name)
    assert issubclass(obj, enum.Enum) and name in mpsnn.__all__


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions_exported(name):
    assert callable(getattr(mpsnn, name))


def test_other_exported_constants():
    assert mpsnn.MPSRectNoClip is not None and mpsnn.NSIntegerMin == -(1 << 63)
    assert mpsnn.MPSImageBatch is list and mpsnn.MPSStateBatch is list
    for err in ("MPSError", "MPSValueError", "MPSTypeError", "MPSStateError", "MPSDeviceError"):
        assert issubclass(getattr(mpsnn, err), mpsnn.MPSError)
    assert issubclass(mpsnn.MPSValueError, ValueError) and issubclass(mpsnn.MPSTypeError, TypeError)
    assert issubclass(mpsnn.MPSStateError, RuntimeError)


def test_class_hierarchy():
    assert issubclass(mpsnn.MPSTemporaryImage, mpsnn.MPSImage)
    assert issubclass(mpsnn.MPSCNNKernel, mpsnn.MPSKernel) and issubclass(mpsnn.MPSCNNBinaryKernel, mpsnn.MPSKernel)
    assert issubclass(mpsnn.MPSCNNGradientKernel, mpsnn.MPSCNNBinaryKernel)
    assert issubclass(mpsnn.MPSCNNNeuron, mpsnn.MPSCNNKernel)
    assert issubclass(mpsnn.MPSCNNNeuronGradient, mpsnn.MPSCNNGradientKernel)
    assert issubclass(mpsnn.MPSNNDefaultPadding, mpsnn.MPSNNPadding)
    for n in CLASSES:
        if n.startswith("MPSCNNNeuron") and n not in ("MPSCNNNeuron", "MPSCNNNeuronGradient"):
            assert issubclass(getattr(mpsnn, n), mpsnn.MPSCNNNeuron), n


#: snake_case of the Swift property / method names in the spec tables (API.md naming rule)
MEMBERS = {
    "MPSImage": ["device", "width", "height", "feature_channels", "number_of_images", "texture_type", "pixel_format",
                 "feature_channel_format", "precision", "usage", "pixel_size", "texture", "label", "parent",
                 "default_allocator", "resource_size", "set_purgeable_state", "synchronize_on_command_buffer",
                 "read_bytes", "write_bytes", "batch_representation", "batch_representation_with_sub_range",
                 "sub_image_with_feature_channel_range"],
    "MPSTemporaryImage": ["read_count", "default_allocator", "prefetch_storage_with_command_buffer", "temporary_image_with_command_buffer"],
    "MPSImageDescriptor": ["width", "height", "feature_channels", "number_of_images", "channel_format", "pixel_format",
                           "cpu_cache_mode", "storage_mode", "usage"],
    "MPSState": ["read_count", "is_temporary", "label", "resource_count", "resource_at_index", "buffer_size_at_index",
                 "texture_info_at_index", "resource_type_at_index", "synchronize_on_command_buffer", "resource_size",
                 "destination_image_descriptor_for_source_images", "resource", "temporary_state_with_command_buffer"],
    "MPSCNNKernel": ["offset", "clip_rect", "destination_feature_channel_offset", "source_feature_channel_offset",
                     "source_feature_channel_max_count", "edge_mode", "kernel_width", "kernel_height", "stride_in_pixels_x",
                     "stride_in_pixels_y", "dilation_rate_x", "dilation_rate_y", "is_backwards", "is_state_modified",
                     "padding", "destination_image_allocator", "encode", "encode_batch", "destination_image_descriptor",
                     "result_state_for_source_image", "temporary_result_state_for_command_buffer",
                     "is_result_state_reused_across_batch", "append_batch_barrier", "options", "label", "device", "copy"],
    "MPSNNDefaultPadding": ["padding_with_method", "padding_for_tensorflow_average_pooling",
                            "padding_for_tensorflow_average_pooling_valid_only", "padding_method", "label", "inverse",
                            "destination_image_descriptor_for_source_images"],
    "MPSCNNNeuron": ["neuron_type", "a", "b", "c", "data"],
    "MPSNNNeuronDescriptor": ["cnn_neuron_descriptor", "cnn_neuron_prelu_descriptor"],
}


@pytest.mark.parametrize("cls_name", list(MEMBERS))
def test_member_names(cls_name):
    cls = getattr(mpsnn, cls_name)
    instance_only = {"device", "width", "height", "feature_channels", "number_of_images", "feature_channel_format", "usage",
                     "label", "parent", "channel_format", "cpu_cache_mode", "storage_mode", "is_temporary", "options",
                     "neuron_type", "a", "b", "c", "data"}
    missing = [m for m in MEMBERS[cls_name] if not hasattr(cls, m) and m not in instance_only]
    assert not missing, missing
    # instance attributes, checked on a real object
    objs = {
        "MPSImage": lambda: mpsnn.MPSImage("cpu", image_descriptor=mpsnn.MPSImageDescriptor()),
        "MPSImageDescriptor": lambda: mpsnn.MPSImageDescriptor(),
        "MPSState": lambda: mpsnn.MPSState("cpu", buffer_size=4),
        "MPSCNNKernel": lambda: mpsnn.MPSCNNNeuronReLU("cpu"),
        "MPSCNNNeuron": lambda: mpsnn.MPSCNNNeuronReLU("cpu"),
    }
    if cls_name in objs:
        obj = objs[cls_name]()
        assert all(hasattr(obj, m) for m in MEMBERS[cls_name] if m in instance_only)
