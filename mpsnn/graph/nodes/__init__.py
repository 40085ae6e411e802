"""Graph node classes, one module per family (mirroring :mod:`mpsnn.kernels`)."""
from __future__ import annotations

from . import (
    arithmetic,
    base,
    concatenation,
    convolution,
    dropout,
    loss,
    loss_extra,
    neuron,
    normalization,
    pooling,
    reduction,
    resampling,
    softmax,
)
from .arithmetic import *  # noqa: F403
from .base import *  # noqa: F403
from .concatenation import *  # noqa: F403
from .convolution import *  # noqa: F403
from .dropout import *  # noqa: F403
from .loss import *  # noqa: F403
from .loss_extra import *  # noqa: F403
from .neuron import *  # noqa: F403
from .normalization import *  # noqa: F403
from .pooling import *  # noqa: F403
from .reduction import *  # noqa: F403
from .resampling import *  # noqa: F403
from .softmax import *  # noqa: F403

__all__: list[str] = []
__all__ += arithmetic.__all__
__all__ += base.__all__
__all__ += concatenation.__all__
__all__ += convolution.__all__
__all__ += dropout.__all__
__all__ += loss.__all__
__all__ += loss_extra.__all__
__all__ += neuron.__all__
__all__ += normalization.__all__
__all__ += pooling.__all__
__all__ += reduction.__all__
__all__ += resampling.__all__
__all__ += softmax.__all__
