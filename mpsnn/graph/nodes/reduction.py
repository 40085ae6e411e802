"""Graph nodes: reduction family (spec/graph.md §14). Being filled in."""
from __future__ import annotations

__all__: list[str] = []
