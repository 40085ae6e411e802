"""MPSNNGraph and its nodes (spec/graph.md): nodes -> plan (order, pruning, read counts) ->
training (gradient graph) -> graph (kernels, encode)."""
from __future__ import annotations

from .graph import MPSNNGraph
from .nodes import *  # noqa: F403
from .nodes import __all__ as _nodes_all

__all__ = ["MPSNNGraph", *_nodes_all]
