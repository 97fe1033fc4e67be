"""Dense packing of a model update into ciphertext-sized chunks (numpy only, no TenSEAL).

A model update is a list of arrays (one per layer). For encryption it is
flattened into ONE float64 vector, layer after layer in C order, and cut into
chunks of ``values_per_ciphertext`` values, so every slot of every ciphertext
is used across layer boundaries; only the last chunk is partly filled. The
layer specs (dtype and shape of each array) travel in plaintext in the update's
header and are what turns the flat vector back into the layer arrays.

``per_layer`` packing (the NVIDIA FLARE reference) instead starts a new chunk at
each layer, as one ``ckks_vector`` per layer does.

For BFV, ``values_per_slot`` signed integers are packed into one plaintext slot
as digits of base ``B``: ``slot = d0 + d1*B + ... `` with every digit (and every
sum of digits over the clients) kept in ``[-B/2, B/2)``; slots are summed
homomorphically and the digits are recovered by balanced division.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "LayerSpec",
    "chunk_ranges",
    "flatten",
    "pack_digits",
    "unflatten",
    "unpack_digits",
]

# dtype code on the wire -> numpy dtype. Integer arrays are averaged as floats
# and rounded back to their integer dtype on the way out.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float16),
    2: np.dtype(np.float32),
    3: np.dtype(np.float64),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
}
_CODES = {dt: code for code, dt in DTYPES.items()}

LayerSpec = tuple[int, tuple[int, ...]]  # (dtype code, shape)


def _size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def flatten(arrays: Sequence[np.ndarray], dtype: Any = np.float64) -> tuple[np.ndarray, list[LayerSpec]]:
    """All arrays as one vector (C order, layer after layer) and their specs.

    ``dtype``: of the vector (default float64); None keeps the arrays' common dtype.
    """
    if isinstance(arrays, np.ndarray):
        raise TypeError("expected a list of arrays (one per layer), got a single ndarray")
    specs: list[LayerSpec] = []
    parts: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        code = _CODES.get(a.dtype.newbyteorder("="))
        if code is None:
            raise TypeError(f"array {i}: dtype {a.dtype} is not supported "
                            f"(use one of {', '.join(str(d) for d in DTYPES.values())})")
        specs.append((code, tuple(int(d) for d in a.shape)))
        parts.append(a.reshape(-1))
    if not parts:
        return np.zeros(0), specs
    flat = np.concatenate(parts)
    return (flat if dtype is None else flat.astype(dtype, copy=False)), specs


def unflatten(flat: np.ndarray, specs: Sequence[LayerSpec]) -> list[np.ndarray]:
    """Inverse of :func:`flatten`: layer arrays with their original shapes and dtypes."""
    out: list[np.ndarray] = []
    pos = 0
    for code, shape in specs:
        n = _size(shape)
        part = flat[pos:pos + n].reshape(shape)
        dtype = DTYPES[code]
        if dtype.kind == "i":
            part = np.rint(part)
        out.append(part.astype(dtype))
        pos += n
    if pos != flat.size:
        raise ValueError(f"{flat.size} values for layers holding {pos}")
    return out


def chunk_ranges(specs: Sequence[LayerSpec], per_chunk: int, per_layer: bool = False) -> list[tuple[int, int]]:
    """``(start, stop)`` of each ciphertext's values in the flat vector.

    Dense: ``[0, per_chunk), [per_chunk, 2 per_chunk), ...`` over the whole
    update. Per layer: each layer starts a new chunk.
    """
    if per_chunk <= 0:
        raise ValueError("per_chunk must be positive")
    sizes = [_size(shape) for _, shape in specs]
    ranges: list[tuple[int, int]] = []
    if per_layer:
        pos = 0
        for n in sizes:
            ranges.extend((pos + s, pos + min(s + per_chunk, n)) for s in range(0, n, per_chunk))
            pos += n
    else:
        total = sum(sizes)
        ranges = [(s, min(s + per_chunk, total)) for s in range(0, total, per_chunk)]
    return ranges


def pack_digits(values: np.ndarray, base: int, per_slot: int) -> np.ndarray:
    """Signed int64 ``values`` -> int64 slots holding ``per_slot`` base-``base`` digits each.

    ``values[per_slot*j + i]`` is digit ``i`` of slot ``j`` (zero padded).
    """
    values = np.asarray(values, dtype=np.int64)
    if per_slot == 1:
        return values
    pad = (-values.size) % per_slot
    if pad:
        values = np.concatenate([values, np.zeros(pad, dtype=np.int64)])
    digits = values.reshape(-1, per_slot)
    slots = digits[:, per_slot - 1].copy()
    for i in range(per_slot - 2, -1, -1):  # Horner: never exceeds the final magnitude
        slots *= base
        slots += digits[:, i]
    return slots


def unpack_digits(slots: np.ndarray, base: int, per_slot: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_digits` for (sums of) packed slots: the first ``count`` digits."""
    s = np.asarray(slots, dtype=np.int64)
    if per_slot == 1:
        return s[:count].copy()
    half = base // 2
    digits = np.empty((s.size, per_slot), dtype=np.int64)
    for i in range(per_slot):
        d = np.mod(s + half, base) - half  # balanced digit in [-base/2, base/2)
        digits[:, i] = d
        s = (s - d) // base  # exact division
    return digits.reshape(-1)[:count]
