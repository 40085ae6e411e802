"""Optimizers (spec/optimizers.md): MPSNNOptimizerDescriptor, MPSNNRegularizationType, the
abstract MPSNNOptimizer and MPSNNOptimizerStochasticGradientDescent, MPSNNOptimizerRMSProp,
MPSNNOptimizerAdam. The numerics are in ``mpsnn.backends.optimizers``."""
from __future__ import annotations

from .adam import MPSNNOptimizerAdam
from .base import MPSNNOptimizer
from .descriptor import MPSNNOptimizerDescriptor, MPSNNRegularizationType
from .rmsprop import MPSNNOptimizerRMSProp
from .sgd import MPSNNOptimizerStochasticGradientDescent

__all__: list[str] = [
    "MPSNNOptimizer",
    "MPSNNOptimizerAdam",
    "MPSNNOptimizerDescriptor",
    "MPSNNOptimizerRMSProp",
    "MPSNNOptimizerStochasticGradientDescent",
    "MPSNNRegularizationType",
]
