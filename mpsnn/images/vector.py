"""MPSVector / MPSMatrix and their descriptors: float32 buffers the optimizers update
(spec/optimizers.md §9).

Apple classes here: ``MPSVectorDescriptor``, ``MPSVector``, ``MPSMatrixDescriptor``,
``MPSMatrix``. A Metal buffer is a flat torch tensor (or a NumPy array, wrapped without a
copy through ``torch.from_numpy``); the vector or matrix is a strided view of it.

Decisions where Apple's documentation is silent or mpsnn narrows it (all ``(inferred)``):

* Only ``MPSDataType.float32`` is supported (the optimizers' operand type); any other data
  type raises :class:`~mpsnn.MPSValueError`.
* ``vector_bytes_for_length`` / ``row_bytes_for_columns`` return the tight size
  (``count * 4``); Apple may round up for alignment, mpsnn needs no padding.
* ``vector_bytes`` / ``row_bytes`` / ``matrix_bytes`` / ``offset`` are byte counts and must be
  multiples of 4; strides must not make vectors (rows, matrices) overlap.
* Wrapped buffers must be contiguous float32 tensors or writable C-contiguous float32 NumPy
  arrays, large enough for ``offset`` plus the last element.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.device import Device, as_device
from ..core.enums import MPSDataType
from ..core.errors import MPSTypeError, value_error

__all__ = ["MPSMatrix", "MPSMatrixDescriptor", "MPSVector", "MPSVectorDescriptor"]

_F32 = 4  # bytes per float32


def _data_type(owner: str, value: Any) -> MPSDataType:
    try:
        dt = MPSDataType(value)
    except (ValueError, TypeError):
        raise value_error(owner, "data_type", value, "be an MPSDataType") from None
    if dt != MPSDataType.float32:
        raise value_error(owner, "data_type", dt, "be MPSDataType.float32 (the only element type mpsnn vectors and matrices support)")
    return dt


def _count(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise value_error(owner, name, value, f"be an integer >= {minimum}")
    return int(value)


def _bytes(owner: str, name: str, value: Any, minimum: int) -> int:
    v = _count(owner, name, value, 0)
    if v % _F32:
        raise value_error(owner, name, value, "be a multiple of 4 bytes (float32 elements)")
    if v < minimum:
        raise value_error(owner, name, value, f"be at least {minimum} bytes")
    return v


class MPSVectorDescriptor:
    """``MPSVectorDescriptor``: the shape of the vectors in a buffer.

    Args (all read-write properties):
        length: elements per vector (>= 1).
        vectors: number of vectors (default 1).
        vector_bytes: byte stride between vectors (default ``length * 4``).
        data_type: ``MPSDataType.float32`` (only).

    Factories: ``vector_descriptor_with_length(length, data_type)`` and
    ``vector_descriptor_with_length(length, vectors, vector_bytes, data_type)``;
    ``vector_bytes_for_length(length, data_type)``.
    """

    def __init__(self, length: int = 1, vectors: int = 1, vector_bytes: int | None = None,
                 data_type: MPSDataType = MPSDataType.float32) -> None:
        owner = "MPSVectorDescriptor"
        self._length = _count(owner, "length", length)
        self._vectors = _count(owner, "vectors", vectors)
        self._data_type = _data_type(owner, data_type)
        self._vector_bytes = _bytes(owner, "vector_bytes", self._length * _F32 if vector_bytes is None else vector_bytes,
                                    self._length * _F32)

    @classmethod
    def vector_descriptor_with_length(cls, length: int, *args: Any, **kwargs: Any) -> "MPSVectorDescriptor":
        """``vectorDescriptorWithLength:dataType:`` (2 arguments) or
        ``vectorDescriptorWithLength:vectors:vectorBytes:dataType:`` (4 arguments)."""
        if len(args) == 1:
            kwargs["data_type"] = args[0]
        elif len(args) == 3:
            kwargs.update(vectors=args[0], vector_bytes=args[1], data_type=args[2])
        elif args:
            raise MPSTypeError(f"MPSVectorDescriptor: `vector_descriptor_with_length` takes (length, data_type) or "
                               f"(length, vectors, vector_bytes, data_type), but got {1 + len(args)} positional arguments")
        return cls(length, **kwargs)

    @staticmethod
    def vector_bytes_for_length(length: int, data_type: MPSDataType = MPSDataType.float32) -> int:
        """``vectorBytesForLength:dataType:``: the tight stride ``length * 4``."""
        _data_type("MPSVectorDescriptor", data_type)
        return _count("MPSVectorDescriptor", "length", length) * _F32

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        v = _count("MPSVectorDescriptor", "length", value)
        if v * _F32 > self._vector_bytes:
            self._vector_bytes = v * _F32
        self._length = v

    @property
    def vectors(self) -> int:
        return self._vectors

    @vectors.setter
    def vectors(self, value: int) -> None:
        self._vectors = _count("MPSVectorDescriptor", "vectors", value)

    @property
    def vector_bytes(self) -> int:
        return self._vector_bytes

    @vector_bytes.setter
    def vector_bytes(self, value: int) -> None:
        self._vector_bytes = _bytes("MPSVectorDescriptor", "vector_bytes", value, self._length * _F32)

    @property
    def data_type(self) -> MPSDataType:
        return self._data_type

    @data_type.setter
    def data_type(self, value: MPSDataType) -> None:
        self._data_type = _data_type("MPSVectorDescriptor", value)

    def __repr__(self) -> str:
        return (f"MPSVectorDescriptor(length={self._length}, vectors={self._vectors}, vector_bytes={self._vector_bytes}, "
                f"data_type={self._data_type.name})")


class MPSMatrixDescriptor:
    """``MPSMatrixDescriptor``: the shape of the (row-major) matrices in a buffer.

    Args (all read-write properties):
        rows, columns: matrix size (>= 1).
        matrices: number of matrices (default 1).
        row_bytes: byte stride between rows (default ``columns * 4``).
        matrix_bytes: byte stride between matrices (default ``rows * row_bytes``).
        data_type: ``MPSDataType.float32`` (only).

    Factories: ``matrix_descriptor_with_rows(rows, columns, row_bytes, data_type)``,
    ``matrix_descriptor_with_rows(rows, columns, matrices, row_bytes, matrix_bytes, data_type)``,
    ``matrix_descriptor_with_dimensions(rows, columns, row_bytes, data_type)`` (deprecated
    name); ``row_bytes_for_columns(columns, data_type)``.
    """

    def __init__(self, rows: int = 1, columns: int = 1, matrices: int = 1, row_bytes: int | None = None,
                 matrix_bytes: int | None = None, data_type: MPSDataType = MPSDataType.float32) -> None:
        owner = "MPSMatrixDescriptor"
        self._rows = _count(owner, "rows", rows)
        self._columns = _count(owner, "columns", columns)
        self._matrices = _count(owner, "matrices", matrices)
        self._data_type = _data_type(owner, data_type)
        self._row_bytes = _bytes(owner, "row_bytes", self._columns * _F32 if row_bytes is None else row_bytes, self._columns * _F32)
        self._matrix_bytes = _bytes(owner, "matrix_bytes", self._rows * self._row_bytes if matrix_bytes is None else matrix_bytes,
                                    self._rows * self._row_bytes)

    @classmethod
    def matrix_descriptor_with_rows(cls, rows: int, columns: int, *args: Any, **kwargs: Any) -> "MPSMatrixDescriptor":
        """``matrixDescriptorWithRows:columns:rowBytes:dataType:`` (4 arguments) or
        ``matrixDescriptorWithRows:columns:matrices:rowBytes:matrixBytes:dataType:`` (6)."""
        if len(args) == 2:
            kwargs.update(row_bytes=args[0], data_type=args[1])
        elif len(args) == 4:
            kwargs.update(matrices=args[0], row_bytes=args[1], matrix_bytes=args[2], data_type=args[3])
        elif args:
            raise MPSTypeError(f"MPSMatrixDescriptor: `matrix_descriptor_with_rows` takes 4 or 6 arguments, but got {2 + len(args)}")
        return cls(rows, columns, **kwargs)

    @classmethod
    def matrix_descriptor_with_dimensions(cls, rows: int, columns: int, row_bytes: int,
                                          data_type: MPSDataType = MPSDataType.float32) -> "MPSMatrixDescriptor":
        """Deprecated ``matrixDescriptorWithDimensions:columns:rowBytes:dataType:``."""
        return cls(rows, columns, row_bytes=row_bytes, data_type=data_type)

    @staticmethod
    def row_bytes_for_columns(columns: int, data_type: MPSDataType = MPSDataType.float32) -> int:
        """``rowBytesForColumns:dataType:``: the tight stride ``columns * 4``."""
        _data_type("MPSMatrixDescriptor", data_type)
        return _count("MPSMatrixDescriptor", "columns", columns) * _F32

    #: Swift's ``rowBytes(forColumns:dataType:)``
    row_bytes_from_columns = row_bytes_for_columns

    def _set(self, name: str, value: Any) -> None:
        owner = "MPSMatrixDescriptor"
        if name in ("rows", "columns", "matrices"):
            setattr(self, "_" + name, _count(owner, name, value))
            self._row_bytes = max(self._row_bytes, self._columns * _F32)
            self._matrix_bytes = max(self._matrix_bytes, self._rows * self._row_bytes)
        elif name == "row_bytes":
            self._row_bytes = _bytes(owner, name, value, self._columns * _F32)
            self._matrix_bytes = max(self._matrix_bytes, self._rows * self._row_bytes)
        elif name == "matrix_bytes":
            self._matrix_bytes = _bytes(owner, name, value, self._rows * self._row_bytes)
        else:
            self._data_type = _data_type(owner, value)

    rows = property(lambda self: self._rows, lambda self, v: self._set("rows", v))
    columns = property(lambda self: self._columns, lambda self, v: self._set("columns", v))
    matrices = property(lambda self: self._matrices, lambda self, v: self._set("matrices", v))
    row_bytes = property(lambda self: self._row_bytes, lambda self, v: self._set("row_bytes", v))
    matrix_bytes = property(lambda self: self._matrix_bytes, lambda self, v: self._set("matrix_bytes", v))
    data_type = property(lambda self: self._data_type, lambda self, v: self._set("data_type", v))

    def __repr__(self) -> str:
        return (f"MPSMatrixDescriptor(rows={self._rows}, columns={self._columns}, matrices={self._matrices}, "
                f"row_bytes={self._row_bytes}, matrix_bytes={self._matrix_bytes}, data_type={self._data_type.name})")


def _as_buffer(owner: str, value: Any) -> torch.Tensor:
    """A wrapped buffer: the flat float32 tensor that shares memory with ``value``."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.float32:
            raise MPSTypeError(f"{owner}: `buffer` must hold float32 values, but the NumPy array has dtype {value.dtype}")
        if not value.flags.c_contiguous or not value.flags.writeable:
            raise value_error(owner, "buffer", f"array{value.shape}", "be a writable C-contiguous NumPy array (it is updated in place)")
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise MPSTypeError(f"{owner}: `buffer` must be a torch tensor or a NumPy array of float32, but got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise MPSTypeError(f"{owner}: `buffer` must hold float32 values, but the tensor has dtype {value.dtype}")
    if not value.is_contiguous():
        raise value_error(owner, "buffer", f"tensor{tuple(value.shape)}", "be contiguous (a buffer is flat memory)")
    return value


class _Buffered:
    """Shared parts of MPSVector and MPSMatrix: a buffer tensor and a byte offset."""

    _owner = ""
    _data: torch.Tensor
    _device: Device
    _offset: int

    def _setup(self, device_or_buffer: Any, offset: int, device: Any, buffer: Any) -> torch.Tensor | None:
        if device_or_buffer is not None and (device is not None or buffer is not None):
            raise MPSTypeError(f"{self._owner}: give a device or a buffer once (positionally or by keyword), not both")
        first = device_or_buffer if device_or_buffer is not None else (device if device is not None else buffer)
        if first is None:
            raise MPSTypeError(f"{self._owner}: `device` or `buffer` is required")
        if isinstance(first, (Device, str, torch.device)):
            self._device = as_device(first, self._owner)
            if offset:
                raise value_error(self._owner, "offset", offset, "be 0 when the storage is allocated from a device")
            self._offset = 0
            return None
        buf = _as_buffer(self._owner, first)
        self._device = Device(buf.device)
        self._offset = _bytes(self._owner, "offset", offset, 0)
        return buf

    def _view(self, sizes: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
        flat = self._data.reshape(-1)
        return flat.as_strided(sizes, strides, flat.storage_offset() + self._offset // _F32)

    def _check_room(self, needed_floats: int) -> None:
        have = self._data.numel()
        if self._offset // _F32 + needed_floats > have:
            raise value_error(self._owner, "buffer", f"{have} floats", f"hold offset {self._offset} bytes + {needed_floats} floats of elements")

    @property
    def device(self) -> Device:
        return self._device

    @property
    def data(self) -> torch.Tensor:
        """The buffer (``data``: the MTLBuffer), a torch tensor sharing memory with what was wrapped."""
        return self._data

    @property
    def offset(self) -> int:
        """Byte offset of the first element in the buffer."""
        return self._offset

    @property
    def data_type(self) -> MPSDataType:
        return MPSDataType.float32

    def resource_size(self) -> int:
        """Bytes of the buffer."""
        return int(self._data.numel()) * _F32

    def synchronize_on_command_buffer(self, command_buffer: Any) -> None:
        """``synchronizeOnCommandBuffer:``: nothing to do (device memory is coherent)."""

    def to_numpy(self) -> np.ndarray:
        """mpsnn: the elements as a float32 NumPy array (a copy; synchronises)."""
        return self.tensor.detach().cpu().numpy().copy()  # type: ignore[attr-defined, no-any-return]


class MPSVector(_Buffered):
    """``MPSVector``: ``vectors`` float32 vectors of ``length`` elements in a buffer.

    Init forms (the first argument positional, as Apple's first label):
        ``MPSVector(device, descriptor=desc)``: allocates a zero-filled buffer on ``device``.
        ``MPSVector(buffer, descriptor=desc, offset=0)``: wraps a float32 tensor or NumPy
        array (``initWithBuffer:descriptor:`` / ``initWithBuffer:offset:descriptor:``), no copy.
        ``MPSVector(tensor)`` (mpsnn): wraps a 1-D ``[length]`` or 2-D ``[vectors, length]``
        contiguous tensor/array with the descriptor it implies.

    Properties: ``device``, ``length``, ``vectors``, ``data_type``, ``vector_bytes``,
    ``offset``, ``data`` (the buffer tensor), ``tensor`` (mpsnn: a view of the elements,
    ``[length]`` when ``vectors == 1`` else ``[vectors, length]``); ``resource_size()``,
    ``synchronize_on_command_buffer(cb)``, ``to_numpy()``.
    """

    _owner = "MPSVector"

    def __init__(self, device_or_buffer: Any = None, descriptor: MPSVectorDescriptor | None = None, offset: int = 0, *,
                 device: Any = None, buffer: Any = None) -> None:
        buf = self._setup(device_or_buffer, offset, device, buffer)
        if descriptor is None:
            if buf is None or buf.dim() not in (1, 2):
                raise MPSTypeError("MPSVector: `descriptor` (an MPSVectorDescriptor) is required unless a 1-D or 2-D buffer is wrapped")
            n, length = (1, buf.shape[0]) if buf.dim() == 1 else (buf.shape[0], buf.shape[1])
            descriptor = MPSVectorDescriptor(length=int(length), vectors=int(n))
        if not isinstance(descriptor, MPSVectorDescriptor):
            raise MPSTypeError(f"MPSVector: `descriptor` must be an MPSVectorDescriptor, but got {type(descriptor).__name__}")
        self._length, self._vectors, self._vector_bytes = descriptor.length, descriptor.vectors, descriptor.vector_bytes
        needed = (self._vectors - 1) * (self._vector_bytes // _F32) + self._length
        self._data = buf if buf is not None else torch.zeros(needed, dtype=torch.float32, device=self._device.torch_device)
        self._check_room(needed)

    length = property(lambda self: self._length)
    vectors = property(lambda self: self._vectors)
    vector_bytes = property(lambda self: self._vector_bytes)

    @property
    def tensor(self) -> torch.Tensor:
        if self._vectors == 1:
            return self._view((self._length,), (1,))
        return self._view((self._vectors, self._length), (self._vector_bytes // _F32, 1))

    def __repr__(self) -> str:
        return f"MPSVector(length={self._length}, vectors={self._vectors}, device={self._device})"


class MPSMatrix(_Buffered):
    """``MPSMatrix``: ``matrices`` row-major float32 ``rows x columns`` matrices in a buffer.

    Init forms: ``MPSMatrix(device, descriptor=desc)`` (allocates zeros),
    ``MPSMatrix(buffer, descriptor=desc, offset=0)`` (``initWithBuffer:descriptor:`` /
    ``initWithBuffer:offset:descriptor:``; wraps without a copy), ``MPSMatrix(tensor)``
    (mpsnn: a contiguous 2-D ``[rows, columns]`` or 3-D ``[matrices, rows, columns]``
    tensor/array).

    Properties: ``device``, ``rows``, ``columns``, ``matrices``, ``data_type``, ``row_bytes``,
    ``matrix_bytes``, ``offset``, ``data`` (the buffer), ``tensor`` (mpsnn: a view
    ``[rows, columns]`` when ``matrices == 1`` else ``[matrices, rows, columns]``);
    ``resource_size()``, ``synchronize_on_command_buffer(cb)``, ``to_numpy()``.
    """

    _owner = "MPSMatrix"

    def __init__(self, device_or_buffer: Any = None, descriptor: MPSMatrixDescriptor | None = None, offset: int = 0, *,
                 device: Any = None, buffer: Any = None) -> None:
        buf = self._setup(device_or_buffer, offset, device, buffer)
        if descriptor is None:
            if buf is None or buf.dim() not in (2, 3):
                raise MPSTypeError("MPSMatrix: `descriptor` (an MPSMatrixDescriptor) is required unless a 2-D or 3-D buffer is wrapped")
            shape = (1, *buf.shape) if buf.dim() == 2 else tuple(buf.shape)
            descriptor = MPSMatrixDescriptor(rows=int(shape[1]), columns=int(shape[2]), matrices=int(shape[0]))
        if not isinstance(descriptor, MPSMatrixDescriptor):
            raise MPSTypeError(f"MPSMatrix: `descriptor` must be an MPSMatrixDescriptor, but got {type(descriptor).__name__}")
        d = descriptor
        self._rows, self._columns, self._matrices = d.rows, d.columns, d.matrices
        self._row_bytes, self._matrix_bytes = d.row_bytes, d.matrix_bytes
        needed = (self._matrices - 1) * (self._matrix_bytes // _F32) + (self._rows - 1) * (self._row_bytes // _F32) + self._columns
        self._data = buf if buf is not None else torch.zeros(needed, dtype=torch.float32, device=self._device.torch_device)
        self._check_room(needed)

    rows = property(lambda self: self._rows)
    columns = property(lambda self: self._columns)
    matrices = property(lambda self: self._matrices)
    row_bytes = property(lambda self: self._row_bytes)
    matrix_bytes = property(lambda self: self._matrix_bytes)

    @property
    def tensor(self) -> torch.Tensor:
        rs, ms = self._row_bytes // _F32, self._matrix_bytes // _F32
        if self._matrices == 1:
            return self._view((self._rows, self._columns), (rs, 1))
        return self._view((self._matrices, self._rows, self._columns), (ms, rs, 1))

    def __repr__(self) -> str:
        return f"MPSMatrix(rows={self._rows}, columns={self._columns}, matrices={self._matrices}, device={self._device})"

