"""The wire format of an encrypted update: :class:`EncryptedUpdate` and its header.

Framing only: bytes in, bytes out, checked on the way in; no ciphertext is loaded here
(:mod:`fedgov.crypto.he` checks them against a context). No TenSEAL import.

Layout (all little-endian)::

    magic "FGHU" | version u8 | flags u8 (0)
    preset name: u8 length + ASCII | preset fingerprint 8 bytes | key id 8 bytes
    contributors u32 | total weight f64
    arrays u32, then per array: dtype code u8 | ndim u8 | ndim x u64 dims
    chunks u32, then per chunk: u32 length + TenSEAL-serialized vector (one ciphertext)

The per-chunk vector sizes and the layout follow from the shapes and the preset,
and are checked on the way in.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Union

import numpy as np

from .he_keys import _as_buffer as _bytes_view
from .he_presets import HEError
from .packing import DTYPES, LayerSpec

__all__ = ["EncryptedUpdate", "UpdateLike", "bytes_per_param"]

_UPD_MAGIC = b"FGHU"
_VERSION = 1

_FIXED_HEAD = struct.Struct("<4sBBB")  # magic, version, flags, length of the preset name
_IDS_WEIGHT = struct.Struct("<8s8sIdI")  # fingerprint, key id, contributors, weight, number of arrays
_U32 = struct.Struct("<I")
_MAX_NDIM = 32
_MAX_PARAMS = 1 << 40

# Every update of a round declares the same layer shapes: their header bytes are
# validated once and looked up afterwards (a third of the per-update cost at 10^3 parameters).
_SPECS_CACHE: dict[bytes, tuple[LayerSpec, ...]] = {}
_SPECS_CACHE_SIZE = 256


def _parse_specs(buf: memoryview, pos: int, n_arrays: int) -> tuple[tuple[LayerSpec, ...], int]:
    """The layer specs starting at ``pos`` and the position after them (raises on bad ones)."""
    start = end = pos
    for _ in range(n_arrays):  # find the end: each spec is code, ndim, then ndim uint64s
        end += 2 + 8 * buf[end + 1]
    key = bytes(buf[start:end])
    specs = _SPECS_CACHE.get(key)
    if specs is not None:
        return specs, end
    parsed: list[LayerSpec] = []
    total = 0
    for _ in range(n_arrays):
        code, ndim = buf[pos], buf[pos + 1]
        pos += 2
        if code not in DTYPES or ndim > _MAX_NDIM:
            raise HEError("bad array spec in update header")
        shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
        pos += 8 * ndim
        size = math.prod(shape)
        total += size
        if size > _MAX_PARAMS or total > _MAX_PARAMS:
            raise HEError("update header claims an absurd number of parameters")
        parsed.append((code, tuple(int(d) for d in shape)))
    specs = tuple(parsed)
    if len(_SPECS_CACHE) >= _SPECS_CACHE_SIZE:
        _SPECS_CACHE.clear()
    _SPECS_CACHE[key] = specs
    return specs, pos


def _as_buffer(data: Any) -> memoryview:
    if isinstance(data, EncryptedUpdate):
        data = data.to_bytes()
    return _bytes_view(data)


class EncryptedUpdate:
    """One cooperative's encrypted, weighted update, or a sum of them (an aggregate).

    Attributes: ``preset_name``, ``key_id``, ``specs`` (dtype code and shape per
    layer), ``contributors`` (updates summed), ``weight`` (their summed plaintext
    weight), ``num_clipped`` (compact only, on the encrypting side: values that
    were clipped to [-R, R]; not sent).
    """

    def __init__(self, *, preset_name: str, fingerprint: bytes, key_id: bytes, specs: list[LayerSpec],
                 contributors: int, weight: float, chunks: list[bytes] | None = None,
                 vectors: list[Any] | None = None, num_clipped: int | None = None,
                 source: memoryview | None = None, spans: list[tuple[int, int]] | None = None) -> None:
        self.preset_name = preset_name
        self.fingerprint = fingerprint
        self.key_id = key_id
        self.specs = specs
        self.contributors = contributors
        self.weight = weight
        self._chunks = chunks
        self._vectors = vectors
        # A parsed update keeps its received bytes and where each ciphertext lies in them;
        # ciphertexts are copied out one at a time, as they are loaded (see iter_chunk_bytes).
        self._source = source
        self._spans = spans
        self.num_clipped = num_clipped
        self._bytes: bytes | None = None

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, shape in self.specs]

    @property
    def dtypes(self) -> list[np.dtype]:
        return [DTYPES[code] for code, _ in self.specs]

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.specs)

    @property
    def num_chunks(self) -> int:
        if self._chunks is not None:
            return len(self._chunks)
        return len(self._spans) if self._spans is not None else len(self._vectors or [])

    def chunk_bytes(self) -> list[bytes]:
        if self._chunks is None:
            self._chunks = list(self.iter_chunk_bytes())
        return self._chunks

    def iter_chunk_bytes(self) -> Iterator[bytes]:
        """Each ciphertext's bytes in turn, without holding them all: a 10^7-parameter update is
        ~300 MB, and copying it out at once costs a quarter of the aggregation time."""
        if self._chunks is not None:
            yield from self._chunks
        elif self._spans is not None:
            assert self._source is not None
            for start, length in self._spans:
                yield bytes(self._source[start:start + length])
        else:
            for v in self._vectors or []:
                yield v.serialize()

    def _header_bytes(self) -> bytes:
        """Everything before the ciphertext count."""
        name = self.preset_name.encode("ascii")
        parts = [_FIXED_HEAD.pack(_UPD_MAGIC, _VERSION, 0, len(name)), name,
                 _IDS_WEIGHT.pack(self.fingerprint, self.key_id, self.contributors, self.weight, len(self.specs))]
        for code, shape in self.specs:
            parts.append(struct.pack(f"<BB{len(shape)}Q", code, len(shape), *shape))
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            chunks = self.chunk_bytes()
            self._bytes = b"".join([self._header_bytes(), _U32.pack(len(chunks)), *_wire_chunks(chunks)])
        return self._bytes

    def to_numpy(self) -> np.ndarray:
        """The bytes as a 1-D uint8 array, e.g. for a Flower ``ArrayRecord``."""
        return np.frombuffer(self.to_bytes(), dtype=np.uint8)

    @property
    def num_bytes(self) -> int:
        return len(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: Any) -> EncryptedUpdate:
        """Parse untrusted bytes (or a uint8 array); raises :class:`HEError` if malformed.

        Only the framing is checked here; the ciphertexts are checked against a
        context by :func:`aggregate` and :func:`decrypt_aggregate`.
        """
        if isinstance(data, EncryptedUpdate):
            return data
        buf = _as_buffer(data)
        n = len(buf)
        try:
            magic, version, _flags, nlen = _FIXED_HEAD.unpack_from(buf, 0)
            if magic != _UPD_MAGIC:
                raise HEError("not an encrypted fedgov update (bad magic)")
            if version != _VERSION:
                raise HEError(f"unsupported encrypted-update version {version}")
            pos = _FIXED_HEAD.size
            name = bytes(buf[pos:pos + nlen]).decode("ascii")
            pos += nlen
            fingerprint, key_id, contributors, weight, n_arrays = _IDS_WEIGHT.unpack_from(buf, pos)
            pos += _IDS_WEIGHT.size
            if not (contributors >= 1 and math.isfinite(weight) and weight > 0):
                raise HEError("bad contributor count or weight in update header")
            if n_arrays > (n - pos) // 2:
                raise HEError("update header claims more arrays than it has bytes")
            specs, pos = _parse_specs(buf, pos, n_arrays)
            (n_chunks,) = _U32.unpack_from(buf, pos)
            pos += 4
            if n_chunks > (n - pos) // 4:
                raise HEError("update header claims more ciphertexts than it has bytes")
            spans: list[tuple[int, int]] = []
            for _ in range(n_chunks):
                (clen,) = _U32.unpack_from(buf, pos)
                pos += 4
                if pos + clen > n:
                    raise HEError("truncated ciphertext in encrypted update")
                spans.append((pos, clen))
                pos += clen
            if pos != n:
                raise HEError(f"{n - pos} trailing bytes after encrypted update")
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            raise HEError(f"truncated or malformed encrypted update: {e}") from None
        update = cls(preset_name=name, fingerprint=fingerprint, key_id=key_id, specs=list(specs),
                     contributors=contributors, weight=weight, source=buf, spans=spans)
        if isinstance(data, bytes):
            update._bytes = data  # immutable: re-serializing would only copy it
        return update

    def __repr__(self) -> str:
        return (f"EncryptedUpdate(preset={self.preset_name!r}, params={self.num_params}, "
                f"ciphertexts={self.num_chunks}, contributors={self.contributors}, weight={self.weight:g})")


UpdateLike = Union[EncryptedUpdate, bytes, bytearray, memoryview, np.ndarray]


def _wire_chunks(chunks: Sequence[bytes]) -> list[bytes]:
    """Ciphertexts as the update's wire format lays them out: each after its uint32 length."""
    out = []
    for c in chunks:
        out += (_U32.pack(len(c)), c)
    return out


def bytes_per_param(update: EncryptedUpdate | bytes) -> float:
    """Wire bytes (header and all framing included) per model parameter."""
    upd = EncryptedUpdate.from_bytes(update)
    return upd.num_bytes / max(1, upd.num_params)
