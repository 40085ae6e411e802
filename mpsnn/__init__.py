"""mpsnn: Apple's Metal Performance Shaders neural-network API on NVIDIA GPUs and CPUs.

Every public Apple name is re-exported here: explicitly for the foundation, neuron and
convolution families, through each module's ``__all__`` for the others; see
``docs/architecture.md``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import graph as _graph  # noqa: E402
from . import optimizers as _optimizers
from .core import padding as padding  # the result-size rules as pure functions (dest_size, padding_offset, ...)
from .core.binary_kernel import MPSCNNBinaryKernel, MPSCNNGradientKernel
from .core.device import Device, MTLCommandBuffer, MTLCommandQueue, MTLCreateSystemDefaultDevice, default_device
from .core.enums import (
    MPSCNNBinaryConvolutionFlags,
    MPSCNNBinaryConvolutionType,
    MPSCNNConvolutionFlags,
    MPSCNNConvolutionGradientOption,
    MPSCNNConvolutionWeightsLayout,
    MPSCNNNeuronType,
    MPSCNNWeightsQuantizationType,
    MPSDataLayout,
    MPSDataType,
    MPSImageEdgeMode,
    MPSImageFeatureChannelFormat,
    MPSKernelOptions,
    MPSNNConvolutionAccumulatorPrecisionOption,
    MPSNNPaddingMethod,
    MPSNNTrainingStyle,
    MPSPurgeableState,
    MPSStateResourceType,
    MTLCommandBufferStatus,
)
from .core.errors import MPSDeviceError, MPSError, MPSStateError, MPSTypeError, MPSValueError
from .core.kernel import MPSCNNKernel, MPSKernel
from .core.padding import MPSNNDefaultPadding, MPSNNPadding
from .core.structs import (
    MPSImageCoordinate,
    MPSImageReadWriteParams,
    MPSImageRegion,
    MPSOffset,
    MPSOrigin,
    MPSRectNoClip,
    MPSRegion,
    MPSSize,
    MPSStateTextureInfo,
    MTLOrigin,
    MTLRegion,
    MTLRegionMake2D,
    MTLRegionMake3D,
    MTLSize,
)
from .graph import *  # noqa: E402,F401,F403

# The families below list their public names in their modules' ``__all__``.
from .images import vector as _vector
from .images.formats import MTLPixelFormat, MTLTextureType, MTLTextureUsage
from .images.image import (
    MPSImage,
    MPSImageAllocator,
    MPSImageBatchIncrementReadCount,
    MPSImageBatchIterate,
    MPSImageBatchResourceSize,
    MPSImageBatchSynchronize,
    MPSImageDescriptor,
    MPSTemporaryImage,
    NSIntegerMin,
    NSRange,
)
from .images.state import (
    MPSImageSizeEncodingState,
    MPSNNBinaryGradientState,
    MPSNNGradientState,
    MPSState,
    MPSStateBatchIncrementReadCount,
    MPSStateBatchResourceSize,
    MPSStateBatchSynchronize,
    MPSStateResourceList,
    MTLTextureDescriptor,
)
from .images.vector import *  # noqa: E402,F401,F403
from .kernels import arithmetic as _arithmetic
from .kernels import batch_normalization as _batch_normalization
from .kernels import dropout as _dropout
from .kernels import instance_group_normalization as _instance_group_normalization
from .kernels import local_normalization as _local_normalization
from .kernels import loss as _loss
from .kernels import pooling as _pooling
from .kernels import reduce as _reduce
from .kernels import resampling as _resampling
from .kernels import reshape as _reshape
from .kernels import softmax as _softmax
from .kernels import upsampling as _upsampling
from .kernels import yolo_loss as _yolo_loss
from .kernels.arithmetic import *  # noqa: E402,F401,F403
from .kernels.batch_normalization import *  # noqa: E402,F401,F403
from .kernels.binary_convolution import MPSCNNBinaryConvolution, MPSCNNBinaryFullyConnected
from .kernels.convolution import (
    MPSCNNConvolution,
    MPSCNNConvolutionGradient,
    MPSCNNFullyConnected,
    MPSCNNFullyConnectedGradient,
)
from .kernels.convolution_data import (
    ConvolutionDataSource,
    MPSCNNConvolutionDataSource,
    MPSCNNConvolutionDescriptor,
    MPSCNNConvolutionGradientState,
    MPSCNNConvolutionTransposeGradientState,
    MPSCNNConvolutionWeightsAndBiasesState,
    MPSCNNDepthWiseConvolutionDescriptor,
    MPSCNNSubPixelConvolutionDescriptor,
)
from .kernels.convolution_transpose import MPSCNNConvolutionTranspose, MPSCNNConvolutionTransposeGradient
from .kernels.dropout import *  # noqa: E402,F401,F403
from .kernels.instance_group_normalization import *  # noqa: E402,F401,F403
from .kernels.local_normalization import *  # noqa: E402,F401,F403
from .kernels.loss import *  # noqa: E402,F401,F403
from .kernels.neuron import (
    MPSCNNNeuron,
    MPSCNNNeuronAbsolute,
    MPSCNNNeuronELU,
    MPSCNNNeuronExponential,
    MPSCNNNeuronGradient,
    MPSCNNNeuronHardSigmoid,
    MPSCNNNeuronLinear,
    MPSCNNNeuronLogarithm,
    MPSCNNNeuronPower,
    MPSCNNNeuronPReLU,
    MPSCNNNeuronReLU,
    MPSCNNNeuronReLUN,
    MPSCNNNeuronSigmoid,
    MPSCNNNeuronSoftPlus,
    MPSCNNNeuronSoftSign,
    MPSCNNNeuronTanH,
    MPSNNNeuronDescriptor,
)
from .kernels.pooling import *  # noqa: E402,F401,F403
from .kernels.reduce import *  # noqa: E402,F401,F403
from .kernels.resampling import *  # noqa: E402,F401,F403
from .kernels.reshape import *  # noqa: E402,F401,F403
from .kernels.softmax import *  # noqa: E402,F401,F403
from .kernels.upsampling import *  # noqa: E402,F401,F403
from .kernels.yolo_loss import *  # noqa: E402,F401,F403
from .optimizers import *  # noqa: E402,F401,F403

#: Apple spells these as type aliases of arrays: in Python they are lists.
MPSImageBatch = list
MPSStateBatch = list

__all__ = [
    "ConvolutionDataSource",
    "Device",
    "MPSCNNBinaryConvolution",
    "MPSCNNBinaryConvolutionFlags",
    "MPSCNNBinaryConvolutionType",
    "MPSCNNBinaryFullyConnected",
    "MPSCNNBinaryKernel",
    "MPSCNNConvolution",
    "MPSCNNConvolutionDataSource",
    "MPSCNNConvolutionDescriptor",
    "MPSCNNConvolutionFlags",
    "MPSCNNConvolutionGradient",
    "MPSCNNConvolutionGradientOption",
    "MPSCNNConvolutionGradientState",
    "MPSCNNConvolutionTranspose",
    "MPSCNNConvolutionTransposeGradient",
    "MPSCNNConvolutionTransposeGradientState",
    "MPSCNNConvolutionWeightsAndBiasesState",
    "MPSCNNConvolutionWeightsLayout",
    "MPSCNNDepthWiseConvolutionDescriptor",
    "MPSCNNFullyConnected",
    "MPSCNNFullyConnectedGradient",
    "MPSCNNGradientKernel",
    "MPSCNNKernel",
    "MPSCNNNeuron",
    "MPSCNNNeuronAbsolute",
    "MPSCNNNeuronELU",
    "MPSCNNNeuronExponential",
    "MPSCNNNeuronGradient",
    "MPSCNNNeuronHardSigmoid",
    "MPSCNNNeuronLinear",
    "MPSCNNNeuronLogarithm",
    "MPSCNNNeuronPReLU",
    "MPSCNNNeuronPower",
    "MPSCNNNeuronReLU",
    "MPSCNNNeuronReLUN",
    "MPSCNNNeuronSigmoid",
    "MPSCNNNeuronSoftPlus",
    "MPSCNNNeuronSoftSign",
    "MPSCNNNeuronTanH",
    "MPSCNNNeuronType",
    "MPSCNNSubPixelConvolutionDescriptor",
    "MPSCNNWeightsQuantizationType",
    "MPSDataLayout",
    "MPSDataType",
    "MPSDeviceError",
    "MPSError",
    "MPSImage",
    "MPSImageAllocator",
    "MPSImageBatch",
    "MPSImageBatchIncrementReadCount",
    "MPSImageBatchIterate",
    "MPSImageBatchResourceSize",
    "MPSImageBatchSynchronize",
    "MPSImageCoordinate",
    "MPSImageDescriptor",
    "MPSImageEdgeMode",
    "MPSImageFeatureChannelFormat",
    "MPSImageReadWriteParams",
    "MPSImageRegion",
    "MPSImageSizeEncodingState",
    "MPSKernel",
    "MPSKernelOptions",
    "MPSNNBinaryGradientState",
    "MPSNNConvolutionAccumulatorPrecisionOption",
    "MPSNNDefaultPadding",
    "MPSNNGradientState",
    "MPSNNNeuronDescriptor",
    "MPSNNPadding",
    "MPSNNPaddingMethod",
    "MPSNNTrainingStyle",
    "MPSOffset",
    "MPSOrigin",
    "MPSPurgeableState",
    "MPSRectNoClip",
    "MPSRegion",
    "MPSSize",
    "MPSState",
    "MPSStateBatch",
    "MPSStateBatchIncrementReadCount",
    "MPSStateBatchResourceSize",
    "MPSStateBatchSynchronize",
    "MPSStateError",
    "MPSStateResourceList",
    "MPSStateResourceType",
    "MPSStateTextureInfo",
    "MPSTemporaryImage",
    "MPSTypeError",
    "MPSValueError",
    "MTLCommandBuffer",
    "MTLCommandBufferStatus",
    "MTLCommandQueue",
    "MTLCreateSystemDefaultDevice",
    "MTLOrigin",
    "MTLPixelFormat",
    "MTLRegion",
    "MTLRegionMake2D",
    "MTLRegionMake3D",
    "MTLSize",
    "MTLTextureDescriptor",
    "MTLTextureType",
    "MTLTextureUsage",
    "NSIntegerMin",
    "NSRange",
    "default_device",
]
__all__ += [*_arithmetic.__all__, *_batch_normalization.__all__, *_instance_group_normalization.__all__, *_local_normalization.__all__,
            *_dropout.__all__, *_pooling.__all__, *_reduce.__all__, *_resampling.__all__, *_reshape.__all__,
            *_softmax.__all__, *_upsampling.__all__, *_loss.__all__, *_yolo_loss.__all__, *_optimizers.__all__, *_vector.__all__]
__all__ += [*_graph.__all__]
