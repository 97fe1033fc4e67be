"""The CKKS/BFV codec: values to one ciphertext's bytes, in TenSEAL's own vector framing.

* :func:`_encrypt_one`: one block of values (already weighted, and for BFV quantized
  and digit-packed) to the bytes of one TenSEAL vector; ``standard``'s two values per
  complex slot go through :class:`_ComplexCodec` (``tenseal.sealapi``).
* :func:`_framing` / :func:`_check_vector_bytes`: the protobuf bytes TenSEAL writes
  around one ciphertext, checked before TenSEAL parses untrusted bytes.
* :func:`_layout`: which values go into which ciphertext.

TenSEAL is imported by the functions that need it, not with this module.
"""

from __future__ import annotations

import functools
import struct
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .he_keys import _is_symmetric
from .he_presets import HEError, HEPreset
from .he_scratch import serialize_seal_object
from .packing import LayerSpec, chunk_ranges

if TYPE_CHECKING:
    import tenseal as ts


@functools.cache
def _tenseal_vectors() -> tuple[Any, Any] | None:
    import tenseal as ts

    cpp = getattr(ts, "_ts_cpp", None)
    return None if cpp is None else (cpp.CKKSVector, cpp.BFVVector)


def _vector_class(preset: HEPreset) -> Any:
    """TenSEAL's C++ vector class for ``preset`` (its fast path), or None to use the public API."""
    classes = _tenseal_vectors()
    if classes is None:
        return None
    return classes[0] if preset.scheme == "ckks" else classes[1]


class _ComplexCodec:
    """CKKS with two values per complex slot (``values_per_slot = 2``).

    TenSEAL's ``CKKSVector`` encodes reals only, leaving every imaginary part
    empty; encoding x[2i] + j x[2i+1] instead halves the ciphertexts, so the
    time and bytes per parameter. Sums stay exact per part (addition is
    linear over the complex numbers). The ciphertext is wrapped in TenSEAL's own
    vector framing, so the aggregator adds it with ``CKKSVector`` like any other.
    """

    def __init__(self, ctx: ts.Context) -> None:
        from tenseal import sealapi

        self._sealapi = sealapi
        seal = ctx.seal_context().data
        self.encoder = sealapi.CKKSEncoder(seal)
        self.scale = float(ctx.global_scale)
        self.symmetric = _is_symmetric(ctx)
        if self.symmetric:
            self._encrypt = sealapi.Encryptor(seal, ctx.secret_key().data).encrypt_symmetric
        else:  # public-key encryption, as TenSEAL does for an asymmetric context
            self._encrypt = sealapi.Encryptor(seal, ctx.public_key().data).encrypt
        self.decryptor = sealapi.Decryptor(seal, ctx.secret_key().data) if ctx.is_private() else None

    def encrypt(self, preset: HEPreset, values: np.ndarray) -> bytes:
        sealapi = self._sealapi
        vals = np.ascontiguousarray(values, dtype=np.float64)
        if vals.size % 2:
            vals = np.append(vals, 0.0)
        plain = sealapi.Plaintext()
        self.encoder.encode(vals.view(np.complex128).tolist(), self.scale, plain)
        if preset.seeded and self.symmetric:
            # SEAL's seeded form: the uniformly random polynomial goes as the seed it was drawn
            # from; loading the ciphertext (the aggregator's TenSEAL does) draws it again.
            seal_bytes = serialize_seal_object(self._encrypt(plain))
        else:
            ct = sealapi.Ciphertext()
            self._encrypt(plain, ct)
            seal_bytes = serialize_seal_object(ct)
        prefix, suffix = _framing(preset, vals.size // 2)
        return b"".join((prefix, _varint(len(seal_bytes)), seal_bytes, suffix))

    def decrypt(self, vec: Any, count: int) -> np.ndarray:
        """The first ``count`` values held by a loaded ``CKKSVector``."""
        assert self.decryptor is not None
        (ct,) = vec.ciphertext()
        plain = self._sealapi.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.array(self.encoder.decode_complex(plain), dtype=np.complex128).view(np.float64)[:count]


_CODECS: weakref.WeakKeyDictionary[ts.Context, _ComplexCodec] = weakref.WeakKeyDictionary()


def _complex_codec(ctx: ts.Context) -> _ComplexCodec:
    codec = _CODECS.get(ctx)
    if codec is None:
        codec = _CODECS[ctx] = _ComplexCodec(ctx)
    return codec


def _encrypt_one(ctx: ts.Context, preset: HEPreset, values: np.ndarray) -> bytes:
    if preset.complex_packed:
        return _complex_codec(ctx).encrypt(preset, values)
    cls = _vector_class(preset)
    if cls is not None:
        return cls(ctx.data, values.tolist()).serialize()
    import tenseal as ts

    if preset.scheme == "ckks":  # public API (slower: goes through PlainTensor)
        return ts.ckks_vector(ctx, values.tolist()).serialize()
    return ts.bfv_vector(ctx, values.tolist()).serialize()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise HEError("malformed ciphertext framing")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


_FRAMING_CACHE: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}


def _framing(preset: HEPreset, size: int) -> tuple[bytes, bytes]:
    """The protobuf bytes TenSEAL writes around one ciphertext of a ``size``-slot vector."""
    key = (preset.fingerprint(), size)
    f = _FRAMING_CACHE.get(key)
    if f is None:
        sz = _varint(size)
        prefix = b"\x0a" + _varint(len(sz)) + sz + b"\x12"  # field 1: sizes (packed); field 2: ciphertext
        suffix = b"\x19" + struct.pack("<d", 2.0 ** preset.scale_bits) if preset.scheme == "ckks" else b""
        f = _FRAMING_CACHE[key] = (prefix, suffix)
    return f


def _check_vector_bytes(data: bytes, size: int, preset: HEPreset) -> None:
    """Check the TenSEAL vector protobuf holds exactly ONE ciphertext for ``size`` slots.

    TenSEAL indexes ciphertexts without bounds checks when adding vectors, so a
    hostile blob with a different ciphertext count could crash the aggregator;
    this rejects it first. Only TenSEAL's own canonical framing is accepted:
    field 1 = sizes (packed), field 2 = the ciphertext, field 3 = scale (CKKS).
    """
    prefix, suffix = _framing(preset, size)
    if not data.startswith(prefix):
        raise HEError(f"ciphertext framing: expected one ciphertext of {size} slots")
    length, pos = _read_varint(data, len(prefix))
    if pos + length + len(suffix) != len(data) or not data.endswith(suffix):
        raise HEError("ciphertext framing: bad length or CKKS scale")


_LAYOUTS: dict[tuple[bytes, tuple[LayerSpec, ...]], tuple[list[tuple[int, int]], list[int]]] = {}


def data_slot_count(preset: HEPreset, num_values: int) -> int:
    """Slots the data of ``num_values`` values fills (BFV digits packed; CKKS pairs padded to whole slots)."""
    return -(-num_values // preset.values_per_slot)


def _layout(preset: HEPreset, specs: Sequence[LayerSpec]) -> tuple[list[tuple[int, int]], list[int]]:
    """Value ranges of each chunk and the number of slots each chunk's vector holds (data, then checks)."""
    # Every update of a round has the same shapes: the server computes this once, not per update.
    key = (preset.fingerprint(), tuple(specs))
    layout = _LAYOUTS.get(key)
    if layout is None:
        checks = preset.check_slot_count
        ranges = chunk_ranges(specs, preset.data_values_per_ciphertext, per_layer=preset.packing == "per-layer")
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = (ranges, [data_slot_count(preset, b - a) + checks for a, b in ranges])
    return layout


def _load_vector(cls: Any, ctx: ts.Context, data: bytes, size: int, preset: HEPreset, what: str) -> Any:
    _check_vector_bytes(data, size, preset)
    try:
        if cls is not None:
            return cls(ctx.data, data)
        import tenseal as ts

        f = ts.ckks_vector_from if preset.scheme == "ckks" else ts.bfv_vector_from
        return f(ctx, data).data
    except Exception as e:
        raise HEError(f"{what}: malformed ciphertext: {e}") from None
