"""Apple enums with their raw values and Swift case names.

Every enum keeps Apple's raw values (they are part of the API: serialised models and
Objective-C code use them) and the Swift spelling of each case. Where Swift and the C name
differ in a way ported code may use, both names are provided as aliases.
"""
from __future__ import annotations

import enum


class MPSImageFeatureChannelFormat(enum.IntEnum):
    """Storage type of one feature channel of an MPSImage (images.md §1.1).

    ``bfloat16`` is an mpsnn extension occupying Apple's reserved slot 5 (the header
    hints that slot is Apple's private bfloat16 format); ``count`` stays 6.
    """

    none = 0
    unorm8 = 1
    unorm16 = 2
    float16 = 3
    float32 = 4
    bfloat16 = 5
    count = 6


class MPSDataLayout(enum.IntEnum):
    """Order of a host buffer used by ``read_bytes``/``write_bytes`` (images.md §1.3)."""

    HeightxWidthxFeatureChannels = 0
    FeatureChannelsxHeightxWidth = 1
    # Swift's lower-camel spellings
    heightxWidthxFeatureChannels = 0
    featureChannelsxHeightxWidth = 1


class MPSImageEdgeMode(enum.IntEnum):
    """What a kernel reads outside the source image (images.md §11)."""

    zero = 0
    clamp = 1
    mirror = 2
    mirrorWithEdge = 3
    constant = 4


class MPSKernelOptions(enum.IntFlag):
    """Option bits of every MPSKernel (kernel-base.md §1). Only ``allowReducedPrecision``
    could change numerics; mpsnn always computes in float32 or better, so none does."""

    none = 0
    skipAPIValidation = 1
    allowReducedPrecision = 2
    disableInternalTiling = 4
    insertDebugGroups = 8
    verbose = 16


class MPSPurgeableState(enum.IntEnum):
    """Purgeability of a resource (images.md §1.6); values equal Metal's ``MTLPurgeableState``."""

    allocationDeferred = 0
    keepCurrent = 1
    nonVolatile = 2
    volatile = 3
    empty = 4


class MPSStateResourceType(enum.IntEnum):
    """Kind of resource at an index of an ``MPSState`` (images.md §9.1)."""

    none = 0
    buffer = 1
    texture = 2


class MTLCommandBufferStatus(enum.IntEnum):
    """Life cycle of an ``MTLCommandBuffer``: notEnqueued -> committed -> completed (or error)."""

    notEnqueued = 0
    enqueued = 1
    committed = 2
    scheduled = 3
    completed = 4
    error = 5


class MPSDataType(enum.IntEnum):
    """Element types used by data sources (images.md §1.2)."""

    invalid = 0
    float32 = 0x10000020
    float16 = 0x10000010
    bFloat16 = 0x90000010
    complexFloat32 = 0x11000040
    complexFloat16 = 0x11000020
    int8 = 0x20000008
    int16 = 0x20000010
    int32 = 0x20000020
    int64 = 0x20000040
    uInt8 = 0x08
    uInt16 = 0x10
    uInt32 = 0x20
    uInt64 = 0x40
    unorm1 = 0x40000001
    unorm8 = 0x40000008
    bool = 0x80000008
    # flag bits
    floatBit = 0x10000000
    signedBit = 0x20000000
    normalizedBit = 0x40000000
    alternateEncodingBit = 0x80000000
    complexBit = 0x01000000


class MPSCNNNeuronType(enum.IntEnum):
    """Activation function of a neuron (neurons.md §2). Raw values are Apple's."""

    none = 0
    reLU = 1
    linear = 2
    sigmoid = 3
    hardSigmoid = 4
    tanH = 5
    absolute = 6
    softPlus = 7
    softSign = 8
    ELU = 9
    pReLU = 10
    reLUN = 11
    power = 12
    exponential = 13
    logarithm = 14
    geLU = 15
    count = 16


class MPSNNPaddingMethod(enum.IntFlag):
    """Bit layout of a padding policy (kernel-base.md §6.1).

    Several names share the value 0 (``alignCentered``, ``addRemainderToTopLeft``,
    ``sizeValidOnly``): they are fields of one word, read through the masks.
    """

    alignCentered = 0
    alignTopLeft = 1
    alignBottomRight = 2
    align_reserved = 3
    alignMask = 3
    addRemainderToTopLeft = 0
    addRemainderToTopRight = 4
    addRemainderToBottomLeft = 8
    addRemainderToBottomRight = 12
    addRemainderToMask = 12
    sizeValidOnly = 0
    sizeSame = 16
    sizeFull = 32
    size_reserved = 48
    customWhitelistForNodeFusion = 0x2000
    customAllowForNodeFusion = 0x2000
    custom = 0x4000
    sizeMask = 0x7F0
    excludeEdges = 0x8000

    def __call__(self) -> "MPSNNPaddingMethod":
        """A value is its own getter, so ``policy.padding_method`` and Swift's
        ``policy.padding_method()`` both give the method."""
        return self


class MPSNNConvolutionAccumulatorPrecisionOption(enum.IntFlag):
    """Accumulator precision of convolutions (convolution.md §8). mpsnn maps ``float`` to
    IEEE float32 accumulation (TF32 off for float32 images on CUDA) and ``half`` to "reduced
    precision allowed" (TF32 on for float32 images on CUDA; float16/bfloat16 images always
    accumulate in float32 through cuDNN)."""

    half = 0
    float = 1


class MPSCNNConvolutionGradientOption(enum.IntFlag):
    """What ``MPSCNNConvolutionGradient`` computes (convolution.md §11.1)."""

    gradientWithData = 1
    gradientWithWeightsAndBias = 2
    all = 3


class MPSCNNWeightsQuantizationType(enum.IntEnum):
    """Dequantisation of UInt8 convolution weights (convolution.md §5.2)."""

    none = 0
    linear = 1
    lookupTable = 2


class MPSCNNConvolutionWeightsLayout(enum.IntEnum):
    """Weight layouts a data source can declare; only ``[O][H][W][I]`` exists."""

    OHWI = 0


class MPSCNNConvolutionFlags(enum.IntEnum):
    """Flags of the deprecated float-array initialisers (unused)."""

    none = 0


class MPSCNNBinaryConvolutionType(enum.IntEnum):
    """Binary convolution products (convolution.md §15.1)."""

    binaryWeights = 0
    XNOR = 1
    AND = 2


class MPSCNNBinaryConvolutionFlags(enum.IntFlag):
    """``useBetaScaling`` enables the per-pixel XNOR-Net factor β (convolution.md §15.2)."""

    none = 0
    useBetaScaling = 1


class MPSNNTrainingStyle(enum.IntEnum):
    """Where a graph runs a trainable node's weight update (convolution.md §6)."""

    updateDeviceNone = 0
    updateDeviceCPU = 1
    updateDeviceGPU = 2
