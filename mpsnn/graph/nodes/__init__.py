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

__all__ = [n for m in (arithmetic, base, concatenation, convolution, dropout, loss, loss_extra, neuron, normalization, pooling,
                       reduction, resampling, softmax) for n in m.__all__]
