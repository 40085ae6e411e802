"""mpsnn: Apple's Metal Performance Shaders neural-network API on NVIDIA GPUs and CPUs.

Every public Apple name is re-exported here explicitly; see ``docs/architecture.md``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .core.device import Device, MTLCommandBuffer, MTLCommandQueue, MTLCreateSystemDefaultDevice, default_device
from .core.enums import (
    MPSCNNNeuronType,
    MPSDataLayout,
    MPSDataType,
    MPSImageEdgeMode,
    MPSImageFeatureChannelFormat,
    MPSKernelOptions,
    MPSNNPaddingMethod,
    MPSPurgeableState,
    MPSStateResourceType,
    MTLCommandBufferStatus,
)
from .core.errors import MPSDeviceError, MPSError, MPSStateError, MPSTypeError, MPSValueError
from .core.kernel import MPSCNNBinaryKernel, MPSCNNGradientKernel, MPSCNNKernel, MPSKernel
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

#: Apple spells these as type aliases of arrays: in Python they are lists.
MPSImageBatch = list
MPSStateBatch = list

__all__ = [name for name in dir() if name.startswith(("MPS", "MTL", "NS")) or name in ("Device", "default_device")]
