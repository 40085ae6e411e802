"""The table of operator mappers: ``MAPPERS[op_type](importer, node, attributes)`` adds the MPS
nodes for one ONNX node; ``CHECKS[op_type](attributes, opset)`` returns why an attribute value
is unsupported (None when it is), before any work is done; ``FOLDABLE_ONLY`` lists operators
supported only on constants (folded at load time)."""
from __future__ import annotations

from typing import Any, Callable

Mapper = Callable[[Any, Any, dict[str, Any]], None]
Check = Callable[[dict[str, Any], int], "str | None"]

MAPPERS: dict[str, Mapper] = {}
CHECKS: dict[str, Check] = {}

#: operators folded at load time only (their inputs must be constants; Shape reads the
#: load-time shape of its input)
FOLDABLE_ONLY = {
    "Shape", "Size", "Constant", "ConstantOfShape", "Cast", "CastLike", "Gather", "Range", "Expand", "Equal", "Where",
    "Floor", "Ceil", "ReduceProd", "Not", "Less", "Greater", "Mod", "Tile", "NonZero", "Min", "Max",
}


def op(*names: str, check: Check | None = None) -> Callable[[Mapper], Mapper]:
    """Register a mapper (and its attribute check) for ``names``."""

    def deco(fn: Mapper) -> Mapper:
        for n in names:
            MAPPERS[n] = fn
            if check is not None:
                CHECKS[n] = check
        return fn

    return deco


def ints(a: dict[str, Any], name: str, default: Any) -> list[int]:
    v = a.get(name)
    return list(default) if v is None else [int(x) for x in v]


def string(a: dict[str, Any], name: str, default: str) -> str:
    v = a.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)
