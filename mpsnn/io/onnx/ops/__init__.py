"""Operator mappers, one module per family; importing this package fills the registry."""
from . import composite, convolution, elementwise, pooling, resize, shape  # noqa: F401 - register their mappers
from .registry import CHECKS, FOLDABLE_ONLY, MAPPERS

__all__ = ["CHECKS", "FOLDABLE_ONLY", "MAPPERS"]
