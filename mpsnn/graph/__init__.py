"""MPSNNGraph and its nodes (spec/graph.md): nodes -> plan (order, pruning, read counts) ->
training (gradient graph) -> graph (kernels, encode)."""
from __future__ import annotations

from . import nodes
from .graph import MPSNNGraph
from .nodes import *  # noqa: F403

__all__ = ["MPSNNGraph"]
__all__ += nodes.__all__
