"""NumPy arrays out of Flower's ``Array`` records, without ``np.load`` for every array of every message.

A Flower ``Array`` of ``stype`` ``numpy.ndarray`` holds the ``.npy`` file of the array. Its
``numpy()`` parses that file's header with ``np.load`` each time (about 0.1 ms per array,
a large share of a small model's round at thousands of members). Every message of a
round carries the same few headers, so :func:`to_numpy` parses each distinct header once
and reads the data with ``np.frombuffer``. Anything that is not a plain, C-ordered,
numeric ``.npy`` of exactly the declared size goes through ``Array.numpy()`` as before, so
a malformed array fails as it would there.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_numpy", "record_to_numpy"]

_NUMPY_STYPE = "numpy.ndarray"
_MAGIC = b"\x93NUMPY"
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}  # header -> (dtype, shape, size)


def _parse(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """dtype, shape and byte size a ``.npy`` header declares; None where the fast path does not apply."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except (ValueError, TypeError, SyntaxError):
        return None
    if fortran_order or dtype.hasobject or stream.tell() != len(header):
        return None
    return dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _header_length(data: bytes) -> int | None:
    if len(data) < 10 or data[:6] != _MAGIC:
        return None
    major = data[6]
    if major == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if major in (2, 3) and len(data) >= 12:
        return 12 + int.from_bytes(data[8:12], "little")
    return None


def to_numpy(array: Any) -> np.ndarray:
    """The array's values (read-only: a view of the message's bytes; copy before writing)."""
    data = array.data
    length = _header_length(data) if array.stype == _NUMPY_STYPE and isinstance(data, bytes) else None
    if length is not None:
        header = data[:length]
        parsed = _HEADERS.get(header, False)
        if parsed is False:
            parsed = _parse(header)
            if len(_HEADERS) > 4096:  # a peer sending endless new headers cannot grow this without bound
                _HEADERS.clear()
            _HEADERS[header] = parsed
        if parsed is not None and len(data) - length == parsed[2]:
            dtype, shape, _ = parsed
            return np.frombuffer(data, dtype=dtype, offset=length).reshape(shape)
    return array.numpy()


def record_to_numpy(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every array of an ``ArrayRecord`` by name, in order (read-only views)."""
    return {name: to_numpy(array) for name, array in record.items()}
