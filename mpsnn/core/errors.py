"""Error types raised by mpsnn.

Every bad input raises a subclass of :class:`MPSError`. Messages follow one format::

    <ClassName>: `<python_name>` (=<value>) must <rule>, but got <actual>

so that a user can see which kernel, which argument, what it received and what it needed.
"""
from __future__ import annotations

from typing import Any


class MPSError(Exception):
    """Base class of every error mpsnn raises for bad input or misuse."""


class MPSValueError(MPSError, ValueError):
    """An argument has a value outside what the API accepts."""


class MPSTypeError(MPSError, TypeError):
    """An argument has the wrong type."""


class MPSStateError(MPSError, RuntimeError):
    """An object is used in a state where the operation is not allowed
    (an exhausted temporary image, a committed command buffer, ...)."""


class MPSDeviceError(MPSError, RuntimeError):
    """Objects from different devices were mixed, or a device is unavailable."""


def _owner_name(owner: Any) -> str:
    if isinstance(owner, str):
        return owner
    if isinstance(owner, type):
        return owner.__name__
    return type(owner).__name__


def value_error(owner: Any, name: str, value: Any, rule: str, actual: str | None = None) -> MPSValueError:
    """Build an :class:`MPSValueError` in the project's message format."""
    msg = f"{_owner_name(owner)}: `{name}` (={value!r}) must {rule}"
    if actual is not None:
        msg += f", but got {actual}"
    return MPSValueError(msg)
