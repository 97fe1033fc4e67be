"""Homomorphic encryption of whole model updates with TenSEAL (CKKS and BFV).

This is the only place in fedgov that imports TenSEAL. It works on numpy arrays
and bytes; the Flower apps carry the bytes (``EncryptedUpdate.to_numpy()``, a
``uint8`` array) and call these functions.

Roles and keys
--------------
``generate_keys(preset, mode=...)`` makes a :class:`SecretKeys` (the TenSEAL
context with the secret key). Its :meth:`SecretKeys.public_context` is a
:class:`PublicContext`: no secret key, ``is_private()`` is False.

* ``mode="clients"``: one cooperative (or, in simulation, the launcher) generates
  the keys and every cooperative holds the same :class:`SecretKeys`; they
  encrypt symmetrically with it (cheaper) and decrypt the aggregate themselves.
  The aggregator gets the :class:`PublicContext`, which here holds no key at
  all: it can add ciphertexts, and neither encrypt nor decrypt.
* ``mode="custodian"``: a separate oversight key holder generates the keys and
  keeps :class:`SecretKeys`; cooperatives and aggregator get the
  :class:`PublicContext` (with the public key), cooperatives encrypt with it
  (public-key encryption) and only the custodian decrypts, and only aggregates.

In both modes the aggregator only ever holds a :class:`PublicContext`, and
:func:`decrypt_aggregate` needs :class:`SecretKeys`.

Weights (who applies them, what can be checked)
-----------------------------------------------
Each cooperative multiplies its own update by its own FedAvg weight before
encrypting (``encrypt_update(..., weight=w_k)``), and the weight travels in
plaintext in the update's header. The aggregator adds the ciphertexts and the
plaintext weights (:func:`aggregate`); the decrypting party divides the
decrypted sum by the summed weight. Use fractional weights
``w_k = n_k / n_total`` (``n_total`` = the round's total from the discovery
query, or all cooperatives' examples): every preset accepts them, and
``compact`` requires ``0 < w_k <= 1`` with weights summing to at most 1 per
aggregate (that is what its overflow bound assumes). The aggregator cannot
verify a weight: ``n_k`` is self-reported and the update is hidden, so a
cooperative that overstates its size (or scales its update by more than its
stated weight) gets more influence and nobody can tell from the ciphertexts.
It can only check that weights are positive and, for ``compact``, that they sum
to at most 1 and that at most ``max_clients`` updates are summed.

Precision
---------
CKKS is approximate: encryption adds noise of about 2e-8 (symmetric) to 1.5e-7
(public key) at the standard preset's scale 2^37, and
TenSEAL draws its randomness from the OS, so decrypted aggregates are not
bit-identical between runs (keys cannot be derived from a seed either). BFV
(``compact``) is exact on integers: its only error is the quantization, which
is deterministic (round to nearest).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import struct
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import tenseal as ts
from tenseal import sealapi

from .packing import DTYPES, LayerSpec, chunk_ranges, flatten, pack_digits, unflatten, unpack_digits

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "SECURITY_128_MAX_COEFF_BITS",
    "EncryptedUpdate",
    "HEError",
    "HEPreset",
    "PublicContext",
    "SecretKeys",
    "aggregate",
    "bytes_per_param",
    "check_parameters",
    "check_update",
    "check_security",
    "decrypt_aggregate",
    "default_workers",
    "encrypt_update",
    "generate_keys",
    "get_preset",
    "load_or_generate_keys",
    "max_abs_error",
    "plaintext_fedavg",
    "shutdown_workers",
    "tenseal_direct_sum",
]


class HEError(ValueError):
    """Bad HE input: unknown preset, malformed or mismatched bytes, wrong key, overflow risk."""


# HomomorphicEncryption.org security standard (Albrecht et al. 2018), table for
# 128-bit classical security with a ternary secret: the largest total
# coefficient modulus (sum of coeff_mod_bit_sizes, special prime included) for
# each polynomial modulus degree N. SEAL enforces the same table.
SECURITY_128_MAX_COEFF_BITS: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}


@dataclass(frozen=True)
class HEPreset:
    """A named set of HE parameters and how an update is laid out in ciphertexts.

    ``coeff_mod_bit_sizes``: SEAL primes; the LAST one is the special prime used
    only for key switching (never needed here), so a fresh ciphertext lives
    modulo the others and its size is set by them.
    """

    name: str
    scheme: str  # "ckks" or "bfv"
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int | None = None  # CKKS: global scale 2**scale_bits
    plain_modulus: int | None = None  # BFV: prime t = 1 (mod 2N)
    packing: str = "dense"  # "dense" across layers, or "per-layer" (one run of ciphertexts per layer)
    values_per_slot: int = 1  # BFV: signed digits per plaintext slot; CKKS: 2 = real and imaginary part
    field_bits: int | None = None  # BFV: digit base 2**field_bits
    clip_range: float | None = None  # BFV: values are clipped to [-R, R] before quantization
    max_clients: int = 10_000  # most updates one aggregate may sum
    encryption: str = "auto"  # "auto": symmetric where the encrypting party holds the secret key; or "asymmetric"
    seeded: bool = False  # CKKS, 2 values per slot, symmetric encryption: send the random half as its seed
    precision: float = 1e-6  # stated max abs error vs plaintext FedAvg (10 clients, weights summing to 1)
    max_bytes_per_param: float = math.inf  # stated bound on wire bytes per parameter (1e5-parameter update)
    description: str = ""

    # -- derived -----------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Plaintext slots per ciphertext (CKKS: N/2 complex slots; BFV: N)."""
        return self.poly_modulus_degree // 2 if self.scheme == "ckks" else self.poly_modulus_degree

    @property
    def complex_packed(self) -> bool:
        """CKKS with two values per complex slot, encoded through ``tenseal.sealapi``."""
        return self.scheme == "ckks" and self.values_per_slot == 2

    @property
    def values_per_ciphertext(self) -> int:
        return self.slots * self.values_per_slot

    @property
    def total_coeff_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def data_coeff_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def security_bound_bits(self) -> int | None:
        return SECURITY_128_MAX_COEFF_BITS.get(self.poly_modulus_degree)

    @property
    def digit_base(self) -> int:
        return 1 << (self.field_bits or 0)

    @property
    def field_bound(self) -> int:
        """BFV: the largest |sum over clients| one digit may hold (base/2 - 1)."""
        return self.digit_base // 2 - 1

    @property
    def quant_step(self) -> float:
        """BFV: quantization step of the weighted, clipped values.

        Chosen so that ``max_clients`` updates with weights summing to at most 1
        can never overflow a digit: sum |round(w x / step)| <= R/step + K/2 <= field_bound.
        """
        if self.scheme != "bfv" or self.clip_range is None:
            return 0.0
        return self.clip_range / (self.field_bound - self.max_clients / 2)

    @property
    def ckks_value_bound(self) -> float:
        """CKKS: each client's |w x| must stay below this so the sum of max_clients fits the modulus.

        An encoded coefficient is at most scale * max |slot|, and a complex slot
        carrying two values of size B has modulus up to sqrt(2) B.
        """
        if self.scheme != "ckks" or self.scale_bits is None:
            return math.inf
        bound = 2.0 ** (self.data_coeff_bits - self.scale_bits - 1) / self.max_clients
        return bound / math.sqrt(2.0) if self.complex_packed else bound

    def fingerprint(self) -> bytes:
        """8 bytes identifying every parameter that changes the ciphertexts or their decoding."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            fields = {k: v for k, v in dataclasses.asdict(self).items()
                      if k not in ("description", "precision", "max_bytes_per_param")}
            fp = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()[:8]
            self.__dict__["_fingerprint"] = fp  # frozen: cache without __setattr__
        return fp

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HEPreset:
        preset = preset_from_json(cls, text, "HE preset")
        _validate_preset(preset)
        return preset


def preset_from_json(cls: Any, text: str, kind: str) -> Any:
    """A preset dataclass from its ``to_json`` text (untrusted: it travels with keys); not yet validated."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        raw["coeff_mod_bit_sizes"] = tuple(int(b) for b in raw["coeff_mod_bit_sizes"])
        return cls(**raw)
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise HEError(f"malformed {kind} description: {e}") from None


def check_parameters(kind: str, name: Any, poly_modulus_degree: Any, coeff_mod_bit_sizes: Sequence[Any]) -> None:
    """The checks every TenSEAL parameter set needs: a sane name, integer sizes, and 128-bit security."""
    def bad(msg: str) -> HEError:
        return HEError(f"{kind} {name!r}: {msg}")

    if not (isinstance(name, str) and 0 < len(name) <= 64 and name.isascii()):
        raise bad("the name must be 1-64 ASCII characters")
    if not isinstance(poly_modulus_degree, int) or not all(isinstance(b, int) for b in coeff_mod_bit_sizes):
        raise bad("poly_modulus_degree and coeff_mod_bit_sizes must be integers")
    bound = SECURITY_128_MAX_COEFF_BITS.get(poly_modulus_degree)
    if bound is None:
        raise bad(f"poly_modulus_degree {poly_modulus_degree} is not in the security table "
                  f"{sorted(SECURITY_128_MAX_COEFF_BITS)}")
    total = sum(coeff_mod_bit_sizes)
    if total > bound:
        raise bad(f"coefficient modulus of {total} bits exceeds the 128-bit bound of {bound} bits "
                  f"for N={poly_modulus_degree}")


def check_security(preset: HEPreset) -> None:
    """Raise :class:`HEError` unless ``preset`` is within the 128-bit security table."""
    check_parameters("HE preset", preset.name, preset.poly_modulus_degree, preset.coeff_mod_bit_sizes)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:  # deterministic for n < 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _validate_preset(p: HEPreset) -> None:
    def bad(msg: str) -> HEError:
        return HEError(f"HE preset {p.name!r}: {msg}")

    check_security(p)
    if p.scheme not in ("ckks", "bfv"):
        raise bad(f"scheme must be 'ckks' or 'bfv', not {p.scheme!r}")
    if p.packing not in ("dense", "per-layer"):
        raise bad(f"packing must be 'dense' or 'per-layer', not {p.packing!r}")
    if p.encryption not in ("auto", "asymmetric"):
        raise bad(f"encryption must be 'auto' or 'asymmetric', not {p.encryption!r}")
    if len(p.coeff_mod_bit_sizes) < 2:
        raise bad("coeff_mod_bit_sizes needs at least two primes (the last is the special prime)")
    if not 1 <= p.max_clients <= 1_000_000:
        raise bad("max_clients must be in [1, 1e6]")
    if p.scheme == "ckks":
        if p.scale_bits is None or not 20 <= p.scale_bits < p.coeff_mod_bit_sizes[0]:
            raise bad("CKKS needs scale_bits below the first prime's size")
        if p.values_per_slot not in (1, 2):
            raise bad("CKKS packs 1 value per slot, or 2 (the real and imaginary parts of the complex slot)")
        if p.seeded and p.values_per_slot != 2:
            raise bad("seeded ciphertexts need values_per_slot = 2 (they are made through tenseal.sealapi)")
    else:
        if p.seeded:
            raise bad("seeded ciphertexts are implemented for CKKS only")
        t, n2 = p.plain_modulus, 2 * p.poly_modulus_degree
        if not isinstance(t, int) or t % n2 != 1 or not _is_prime(t):
            raise bad("BFV batching needs a prime plain_modulus = 1 (mod 2N)")
        if p.clip_range is None or not p.clip_range > 0 or p.field_bits is None:
            raise bad("BFV needs clip_range > 0 and field_bits")
        if not 1 <= p.values_per_slot <= 4:
            raise bad("values_per_slot must be 1..4")
        if p.field_bound <= p.max_clients:
            raise bad("field_bits too small for max_clients")
        base, k = p.digit_base, p.values_per_slot
        # |slot| <= L (1 + B + ... + B^(k-1)) must stay below t/2 (no wrap modulo t)
        if 2 * p.field_bound * (base**k - 1) // (base - 1) >= t:
            raise bad("plain_modulus too small for values_per_slot digits of field_bits each")
        # Fresh noise plus the growth of summing max_clients updates needs headroom
        # above t (measured: 1000 sums decrypt wrongly with 15 bits, correctly with 19).
        if t.bit_length() + 16 > p.data_coeff_bits:
            raise bad("the data primes must exceed plain_modulus by at least 16 bits (noise budget)")


PRESETS: dict[str, HEPreset] = {}


def _register(p: HEPreset) -> HEPreset:
    _validate_preset(p)
    PRESETS[p.name] = p
    return p


_register(HEPreset(
    name="standard",
    scheme="ckks",
    poly_modulus_degree=4096,
    coeff_mod_bit_sizes=(51, 40),
    scale_bits=37,
    packing="dense",
    values_per_slot=2,
    seeded=True,
    max_clients=1000,
    precision=1e-6,
    max_bytes_per_param=16.0,
    description=(
        "CKKS, N=4096, primes [51, 40] (91 of 109 bits allowed: 128-bit secure), scale 2^37, "
        "dense packing with two parameters per complex slot (real and imaginary part): 4096 parameters "
        "per ciphertext, every slot used across layers. Ciphertexts live modulo the 51-bit prime, which "
        "SEAL's zstd shrinks a little: 29.3 B per slot, 14.7 B/param for full ciphertexts. With symmetric "
        "encryption (key_holder = clients) the uniformly random half of each ciphertext is sent as its "
        "seed (SEAL's seeded form): 7.4 B/param, and the aggregator draws it again while loading. Measured "
        "max abs error vs plaintext FedAvg ~1e-8 with symmetric, ~1.5e-7 with public-key encryption "
        "(stated bound 1e-6). Each client's |w x| must stay below 2^13/(sqrt(2) max_clients) = 5.79."
    ),
))

_register(HEPreset(
    name="flare",
    scheme="ckks",
    poly_modulus_degree=8192,
    coeff_mod_bit_sizes=(60, 40, 40),
    scale_bits=40,
    packing="per-layer",
    encryption="asymmetric",
    max_clients=10_000,
    precision=1e-6,
    max_bytes_per_param=math.inf,  # >= 57.4: per-layer padding makes it model dependent
    description=(
        "Reference row only: NVIDIA FLARE's TenSEAL defaults (CKKS, N=8192, primes [60, 40, 40], "
        "scale 2^40, public-key encryption, one ckks_vector per layer so each layer starts a new "
        "ciphertext). 57.4 B/param for full ciphertexts, more with many small layers."
    ),
))

_register(HEPreset(
    name="compact",
    scheme="bfv",
    poly_modulus_degree=4096,
    coeff_mod_bit_sizes=(40, 40, 29),
    plain_modulus=144114913197801473,  # smallest prime = 1 mod 8192 above 2 (2^18-1)(2^38+2^19+1): 57 bits
    values_per_slot=3,
    field_bits=19,
    clip_range=8.0,
    max_clients=1000,
    precision=1.6e-4,
    max_bytes_per_param=12.0,
    description=(
        "Quantized updates, BFV, N=4096, primes [40, 40, 29] (109 of 109 bits allowed: 128-bit secure), "
        "plain modulus t ~ 2^57. Each value x is clipped to [-8, 8] (R = 8, as "
        "secure.secagg_clip_range), and w x is rounded to a multiple of step = R/(2^18 - 1 - 500) ~ 3.06e-5 "
        "(a ~19-bit grid); three such integers are packed per slot as base-2^19 digits, so 12288 "
        "parameters share one ciphertext (the default 8,970-parameter model fits in one); SEAL's zstd then "
        "shrinks the 40-bit coefficients: 10.5 B/param for the default model, ~7.7 when ciphertexts are "
        "full. Weights must be fractions summing to <= 1 per aggregate; at most 1000 updates per aggregate. "
        "Error <= K step / (2 W) for K clients with total weight W: 1.53e-4 for 10 clients and W = 1 "
        "(stated bound 1.6e-4)."
    ),
))

DEFAULT_PRESET = "standard"


def get_preset(name: str | HEPreset) -> HEPreset:
    """The preset called ``name`` (``secure.preset`` in the config)."""
    if isinstance(name, HEPreset):
        _validate_preset(name)
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise HEError(f"secure.preset: unknown HE preset {name!r}; known presets: "
                      f"{', '.join(sorted(PRESETS))} (see docs/he_presets.md)") from None


# ---------------------------------------------------------------------------------
# Contexts and keys
# ---------------------------------------------------------------------------------

_MODES = ("clients", "custodian")
_CTX_MAGIC = b"FGHK"
_UPD_MAGIC = b"FGHU"
_VERSION = 1


def _tenseal_context(preset: HEPreset, symmetric: bool) -> ts.Context:
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    if preset.scheme == "ckks":
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1)
        ctx.global_scale = 2.0 ** preset.scale_bits
    else:
        ctx = ts.context(ts.SCHEME_TYPE.BFV, preset.poly_modulus_degree, plain_modulus=preset.plain_modulus,
                         coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes), encryption_type=enc, n_threads=1)
    return ctx


def _is_symmetric(ctx: ts.Context) -> bool:
    try:
        ctx.has_public_key()
    except ValueError:  # "has_public_key is not supported for symmetric encryption"
        return True
    return False


def _ctx_bytes(ctx: ts.Context, *, secret: bool) -> bytes:
    sym = _is_symmetric(ctx)
    return ctx.serialize(save_public_key=not sym, save_secret_key=secret,
                         save_galois_keys=False, save_relin_keys=False)


def _load_tenseal_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data, n_threads=1)
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on malformed input
        raise HEError(f"malformed TenSEAL context: {e}") from None


class _Context:
    """Shared parts of :class:`PublicContext` and :class:`SecretKeys`."""

    _KIND = -1

    def __init__(self, *, preset: HEPreset, mode: str, key_id: bytes, tenseal_context: ts.Context,
                 raw: bytes | None = None) -> None:
        if mode not in _MODES:
            raise HEError(f"secure.key_holder must be one of {_MODES}, not {mode!r}")
        self.preset = preset
        self.mode = mode
        self.key_id = key_id
        self._ctx = tenseal_context
        self._raw = raw  # TenSEAL bytes, kept for worker processes and to_bytes()
        self._symmetric = _is_symmetric(tenseal_context)

    @property
    def tenseal_context(self) -> ts.Context:
        """The underlying TenSEAL context (for benchmarks; keep TenSEAL inside fedgov.crypto)."""
        return self._ctx

    def is_private(self) -> bool:
        return bool(self._ctx.is_private())

    @property
    def can_encrypt(self) -> bool:
        return self.is_private() or not self._symmetric

    def _tenseal_bytes(self) -> bytes:
        if self._raw is None:
            self._raw = _ctx_bytes(self._ctx, secret=self.is_private())
        return self._raw

    def _encryption_bytes(self) -> bytes:
        """What a worker process needs to encrypt: the public context, or the secret one if symmetric."""
        return self._tenseal_bytes()

    def to_bytes(self) -> bytes:
        pj = self.preset.to_json().encode()
        head = struct.pack("<4sBBB8sI", _CTX_MAGIC, _VERSION, self._KIND, _MODES.index(self.mode),
                           self.key_id, len(pj))
        tb = self._tenseal_bytes()
        return head + pj + struct.pack("<Q", len(tb)) + tb

    serialize = to_bytes

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.to_bytes(), dtype=np.uint8)

    @staticmethod
    def _parse(data: Any, kind: int) -> tuple[HEPreset, str, bytes, ts.Context, bytes]:
        buf = _as_buffer(data)
        try:
            magic, version, k, mode_i, key_id, plen = struct.unpack_from("<4sBBB8sI", buf, 0)
            pos = struct.calcsize("<4sBBB8sI")
            if magic != _CTX_MAGIC:
                raise HEError("not an HE context/keys blob (bad magic)")
            if version != _VERSION:
                raise HEError(f"unsupported HE context version {version}")
            if k != kind:
                want = "SecretKeys" if kind == 1 else "PublicContext"
                raise HEError(f"expected {want} bytes, got {'SecretKeys' if k == 1 else 'PublicContext'}")
            if mode_i >= len(_MODES):
                raise HEError("bad key-holder mode")
            if pos + plen > len(buf):
                raise HEError("truncated HE context")
            preset = HEPreset.from_json(bytes(buf[pos:pos + plen]).decode("utf-8", "strict"))
            pos += plen
            (tlen,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
            if pos + tlen != len(buf):
                raise HEError("truncated or oversized HE context")
            raw = bytes(buf[pos:pos + tlen])
        except (struct.error, UnicodeDecodeError) as e:
            raise HEError(f"malformed HE context bytes: {e}") from None
        return preset, _MODES[mode_i], key_id, _load_tenseal_context(raw), raw

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset.name!r}, mode={self.mode!r}, "
                f"key_id={self.key_id.hex()}, private={self.is_private()})")


class PublicContext(_Context):
    """What the aggregator (and, in custodian mode, the cooperatives) hold: no secret key.

    In ``clients`` mode it holds no key at all (adds only); in ``custodian``
    mode it holds the public key, so cooperatives can encrypt with it.
    """

    _KIND = 0

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if self._ctx.is_private():
            raise HEError("a PublicContext must not hold a secret key")

    @classmethod
    def from_bytes(cls, data: Any) -> PublicContext:
        preset, mode, key_id, ctx, raw = cls._parse(data, cls._KIND)
        return cls(preset=preset, mode=mode, key_id=key_id, tenseal_context=ctx, raw=raw)


class SecretKeys(_Context):
    """The secret context: whoever holds it can decrypt. Never send it to the aggregator."""

    _KIND = 1

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        if not self._ctx.is_private():
            raise HEError("SecretKeys bytes hold no secret key")
        self._public: PublicContext | None = None
        self._enc_raw: bytes | None = None

    @classmethod
    def from_bytes(cls, data: Any) -> SecretKeys:
        preset, mode, key_id, ctx, raw = cls._parse(data, cls._KIND)
        return cls(preset=preset, mode=mode, key_id=key_id, tenseal_context=ctx, raw=raw)

    def public_context(self) -> PublicContext:
        """The context to hand to the aggregator (and, in custodian mode, to the cooperatives)."""
        if self._public is None:
            if self._symmetric:  # no public key exists: a keyless context with the same parameters
                raw = self._ctx.serialize(save_public_key=False, save_secret_key=False,
                                          save_galois_keys=False, save_relin_keys=False)
            else:
                pub = self._ctx.copy()
                pub.make_context_public()
                raw = pub.serialize(save_public_key=True, save_secret_key=False,
                                    save_galois_keys=False, save_relin_keys=False)
            self._public = PublicContext(preset=self.preset, mode=self.mode, key_id=self.key_id,
                                         tenseal_context=_load_tenseal_context(raw), raw=raw)
        return self._public

    def _encryption_bytes(self) -> bytes:
        if self._symmetric:
            return self._tenseal_bytes()
        if self._enc_raw is None:  # workers only need the public key
            self._enc_raw = self.public_context()._tenseal_bytes()
        return self._enc_raw


def generate_keys(preset: str | HEPreset = DEFAULT_PRESET, *, mode: str = "clients") -> SecretKeys:
    """Fresh keys for ``preset``.

    ``mode="clients"``: the cooperatives share these keys (symmetric encryption
    unless the preset says ``encryption="asymmetric"``). ``mode="custodian"``:
    only the custodian keeps them; everyone else gets :meth:`SecretKeys.public_context`.
    Keys come from the OS's randomness (TenSEAL exposes no seed); in simulation,
    generate them once and share the bytes (see :func:`load_or_generate_keys`).
    """
    p = get_preset(preset)
    if mode not in _MODES:
        raise HEError(f"secure.key_holder must be one of {_MODES}, not {mode!r}")
    symmetric = mode == "clients" and p.encryption == "auto"
    ctx = _tenseal_context(p, symmetric)
    return SecretKeys(preset=p, mode=mode, key_id=os.urandom(8), tenseal_context=ctx)


def load_or_generate_keys(path: str | Path, *, preset: str | HEPreset = DEFAULT_PRESET,
                          mode: str = "clients") -> SecretKeys:
    """Keys stored at ``path``, generated there first if missing (race-free across processes).

    For simulations, where the cooperatives of one run share a machine: the
    first client to get here writes the keys (file mode 0600), the others read
    them. Keep ``path`` out of the aggregator's reach in a real deployment.
    """
    path = Path(path)
    if not path.exists():
        keys = generate_keys(preset, mode=mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(keys.to_bytes())
        try:
            os.link(tmp, path)  # atomic; fails if another process won the race
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    keys = SecretKeys.from_bytes(path.read_bytes())
    want = get_preset(preset)
    if keys.preset.fingerprint() != want.fingerprint() or keys.mode != mode:
        raise HEError(f"{path}: holds keys for preset {keys.preset.name!r} in mode {keys.mode!r}, "
                      f"not {want.name!r} in mode {mode!r}")
    return keys


# ---------------------------------------------------------------------------------
# Encrypted updates: wire format
# ---------------------------------------------------------------------------------
#
#   magic "FGHU" | version u8 | flags u8 (0)
#   preset name: u8 length + ASCII | preset fingerprint 8 bytes | key id 8 bytes
#   contributors u32 | total weight f64
#   arrays u32, then per array: dtype code u8 | ndim u8 | ndim x u64 dims
#   chunks u32, then per chunk: u32 length + TenSEAL-serialized vector (one ciphertext)
#
# All little-endian. The per-chunk vector sizes and the layout follow from the
# shapes and the preset, and are checked on the way in.

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
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise HEError(f"expected a 1-D uint8 array of HE bytes, got {data.dtype} {data.shape}")
        data = np.ascontiguousarray(data)
    try:
        mv = memoryview(data)
    except TypeError:
        raise HEError(f"expected bytes, got {type(data).__name__}") from None
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


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


# ---------------------------------------------------------------------------------
# TenSEAL vectors: fast paths and checks
# ---------------------------------------------------------------------------------

_CPP = getattr(ts, "_ts_cpp", None)


def _vector_class(preset: HEPreset) -> Any:
    if _CPP is not None:
        return _CPP.CKKSVector if preset.scheme == "ckks" else _CPP.BFVVector
    return None


class _SealFiles:
    """``tenseal.sealapi`` saves and loads a ciphertext only through a file path, so
    ciphertexts go through a private directory on tmpfs (/dev/shm) where there is one:
    ~0.1 ms to save a seeded 30 KB ``standard`` ciphertext (SEAL's zstd included), ~0.17 ms
    a full 60 KB one, ~0.3 ms to save and ~0.2 ms to load a 131 KB encrypted-inference one."""

    _dir: str | None = None
    _pid: int | None = None
    _lock = threading.Lock()
    _count = itertools.count()

    @staticmethod
    def _cleanup(path: str, pid: int) -> None:
        if os.getpid() == pid:  # not from a forked child that inherited the handler
            shutil.rmtree(path, ignore_errors=True)

    @classmethod
    def _directory(cls) -> str:
        with cls._lock:
            pid = os.getpid()
            if cls._dir is None or cls._pid != pid or not os.path.isdir(cls._dir):
                base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
                cls._dir, cls._pid = tempfile.mkdtemp(prefix="fedgov-he-", dir=base), pid
                atexit.register(cls._cleanup, cls._dir, pid)
            return cls._dir

    @classmethod
    def _path(cls) -> str:
        directory = cls._directory()
        return os.path.join(directory, f"{threading.get_ident()}-{next(cls._count)}.ct")

    @classmethod
    def scratch(cls, name: str) -> str:
        """A named file in the private directory, kept (and reused) until the process exits."""
        return os.path.join(cls._directory(), name)

    @classmethod
    def dump(cls, ct: Any) -> bytes:
        path = cls._path()
        try:
            ct.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @classmethod
    def load(cls, seal_context: Any, data: bytes) -> Any:
        path = cls._path()
        try:
            with open(path, "wb") as f:
                f.write(data)
            ct = sealapi.Ciphertext()
            ct.load(seal_context, path)  # SEAL checks the ciphertext against the parameters
            return ct
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class _ComplexCodec:
    """CKKS with two values per complex slot (``values_per_slot = 2``).

    TenSEAL's ``CKKSVector`` encodes reals only, leaving every imaginary part
    empty; encoding x[2i] + j x[2i+1] instead halves the ciphertexts, so the
    time and bytes per parameter. Sums stay exact per part (addition is
    linear over the complex numbers). The ciphertext is wrapped in TenSEAL's own
    vector framing, so the aggregator adds it with ``CKKSVector`` like any other.
    """

    def __init__(self, ctx: ts.Context) -> None:
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
        vals = np.ascontiguousarray(values, dtype=np.float64)
        if vals.size % 2:
            vals = np.append(vals, 0.0)
        plain = sealapi.Plaintext()
        self.encoder.encode(vals.view(np.complex128).tolist(), self.scale, plain)
        if preset.seeded and self.symmetric:
            # SEAL's seeded form: the uniformly random polynomial goes as the seed it was drawn
            # from; loading the ciphertext (the aggregator's TenSEAL does) draws it again.
            seal_bytes = _SealFiles.dump(self._encrypt(plain))
        else:
            ct = sealapi.Ciphertext()
            self._encrypt(plain, ct)
            seal_bytes = _SealFiles.dump(ct)
        prefix, suffix = _framing(preset, vals.size // 2)
        return b"".join((prefix, _varint(len(seal_bytes)), seal_bytes, suffix))

    def decrypt(self, vec: Any, count: int) -> np.ndarray:
        """The first ``count`` values held by a loaded ``CKKSVector``."""
        assert self.decryptor is not None
        (ct,) = vec.ciphertext()
        plain = sealapi.Plaintext()
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


def _layout(preset: HEPreset, specs: Sequence[LayerSpec]) -> tuple[list[tuple[int, int]], list[int]]:
    """Value ranges of each chunk and the number of slots each chunk's vector holds."""
    # Every update of a round has the same shapes: the server computes this once, not per update.
    key = (preset.fingerprint(), tuple(specs))
    layout = _LAYOUTS.get(key)
    if layout is None:
        ranges = chunk_ranges(specs, preset.values_per_ciphertext, per_layer=preset.packing == "per-layer")
        k = preset.values_per_slot
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = (ranges, [-(-(b - a) // k) for a, b in ranges])
    return layout


def _check_update(upd: EncryptedUpdate, context: _Context, what: str) -> list[int]:
    p = context.preset
    if upd.fingerprint != p.fingerprint():
        raise HEError(f"{what}: encrypted with preset {upd.preset_name!r}, but the context is for {p.name!r} "
                      f"(or its parameters differ)")
    if upd.key_id != context.key_id:
        raise HEError(f"{what}: encrypted under different keys (key id {upd.key_id.hex()}, "
                      f"context has {context.key_id.hex()})")
    if upd.num_params > upd.num_chunks * p.values_per_ciphertext:  # before building a layout for it
        raise HEError(f"{what}: {upd.num_chunks} ciphertexts cannot hold {upd.num_params} parameters")
    _, sizes = _layout(p, upd.specs)
    if upd.num_chunks != len(sizes):
        raise HEError(f"{what}: {upd.num_chunks} ciphertexts where the shapes need {len(sizes)}")
    return sizes


def check_update(update: EncryptedUpdate, *, context: PublicContext | SecretKeys,
                 shapes: Sequence[Sequence[int]] | None = None, what: str = "update") -> list[int]:
    """Header checks of one update (preset, keys, layout, shapes); raises :class:`HEError`.

    Cheap: no ciphertext is loaded (``aggregate`` still validates each ciphertext's bytes).
    Returns the number of slots of each ciphertext.
    """
    sizes = _check_update(update, context, what)
    if shapes is not None and [tuple(s) for s in shapes] != update.shapes:
        raise HEError(f"{what} has layer shapes {update.shapes}, expected {[tuple(s) for s in shapes]}")
    return sizes


def _load_vector(cls: Any, ctx: ts.Context, data: bytes, size: int, preset: HEPreset, what: str) -> Any:
    _check_vector_bytes(data, size, preset)
    try:
        if cls is not None:
            return cls(ctx.data, data)
        f = ts.ckks_vector_from if preset.scheme == "ckks" else ts.bfv_vector_from
        return f(ctx, data).data
    except Exception as e:
        raise HEError(f"{what}: malformed ciphertext: {e}") from None


# ---------------------------------------------------------------------------------
# Worker processes for encryption (TenSEAL holds the GIL, so threads do not help)
# ---------------------------------------------------------------------------------

_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_POOL_BROKEN = False  # set when worker processes cannot run here (e.g. a __main__ read from stdin)
_WORKER_CONTEXTS: dict[bytes, ts.Context] = {}
_SCRATCH_LOCK = threading.Lock()


def default_workers() -> int:
    """Processes used to encrypt: ``FEDGOV_HE_WORKERS`` if set, else the CPUs this process may use."""
    env = os.environ.get("FEDGOV_HE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise HEError(f"FEDGOV_HE_WORKERS must be an integer, not {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _get_pool(n: int) -> ProcessPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False, cancel_futures=True)
            # spawn: safe in processes that already run threads (Ray actors, torch)
            _POOL = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
            _POOL_SIZE = n
        return _POOL


def shutdown_workers() -> None:
    """Stop the encryption worker processes (they are also stopped at exit)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL, _POOL_SIZE = None, 0


atexit.register(shutdown_workers)


def _worker_encrypt(token: bytes, ctx_bytes: bytes, preset_json: str, in_path: str, dtype: str,
                    lengths: list[int], out_path: str) -> None:
    """Encrypt the blocks stored one after another in ``in_path``; write them to ``out_path``
    as they go on the wire (each ciphertext after its uint32 length).

    Blocks and ciphertexts travel through files on tmpfs rather than the pool's pipe: a
    10^7-parameter update is ~200 MB each way, and piping it through a parent busy encrypting
    its own share (TenSEAL holds the GIL) slowed the worker's share down.
    """
    ctx = _WORKER_CONTEXTS.get(token)
    if ctx is None:
        if len(_WORKER_CONTEXTS) >= 4:
            _WORKER_CONTEXTS.clear()
        ctx = _WORKER_CONTEXTS[token] = ts.context_from(ctx_bytes, n_threads=1)
    preset = HEPreset.from_json(preset_json)
    values = np.fromfile(in_path, dtype=np.dtype(dtype))
    bounds = np.cumsum([0, *lengths]).tolist()
    with _overwrite(out_path) as f:
        for i in range(len(lengths)):
            chunk = _encrypt_one(ctx, preset, values[bounds[i]:bounds[i + 1]])
            f.write(_U32.pack(len(chunk)))
            f.write(chunk)
        f.truncate()


def _overwrite(path: str) -> Any:
    """Open ``path`` for writing from the start without truncating it first: a tmpfs file
    keeps its pages, so rewriting it each round skips allocating ~100 MB of fresh memory."""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b")


def _wire_chunks(chunks: Sequence[bytes]) -> list[bytes]:
    """Ciphertexts as the update's wire format lays them out: each after its uint32 length."""
    out = []
    for c in chunks:
        out += (_U32.pack(len(c)), c)
    return out


def _encrypt_blocks(context: _Context, blocks: list[np.ndarray], workers: int) -> list[bytes]:
    """Encrypt ``blocks`` (one ciphertext each), over ``workers`` processes counting this one.

    Returns the chunk section of the update's wire format (without the count), in pieces.
    """
    local = context.tenseal_context, context.preset
    if workers <= 1 or len(blocks) < 2 * workers or _POOL_BROKEN:
        return _wire_chunks([_encrypt_one(*local, b) for b in blocks])
    ctx_bytes = context._encryption_bytes()
    token = context.key_id + hashlib.sha256(ctx_bytes).digest()[:8]
    pj = context.preset.to_json()
    per = -(-len(blocks) // workers)
    groups = [blocks[i:i + per] for i in range(0, len(blocks), per)]
    with _SCRATCH_LOCK:  # one update at a time uses the scratch files
        jobs = []
        try:  # workers - 1 processes take all groups but the first ...
            pool = _get_pool(workers - 1)
            for i, group in enumerate(groups[1:]):
                in_path, out_path = _SealFiles.scratch(f"in-{i}"), _SealFiles.scratch(f"out-{i}")
                with _overwrite(in_path) as f:  # block by block: no copy of the whole share
                    f.writelines(np.ascontiguousarray(b).data.cast("B") for b in group)
                    f.truncate()
                jobs.append((pool.submit(_worker_encrypt, token, ctx_bytes, pj, in_path, group[0].dtype.str,
                                         [len(b) for b in group], out_path), out_path))
        except Exception as e:
            return _pool_failed(e, local, blocks)
        out = _wire_chunks([_encrypt_one(*local, b) for b in groups[0]])  # ... this process encrypts meanwhile
        try:
            for future, out_path in jobs:
                future.result()
                with open(out_path, "rb") as f:
                    out.append(f.read())
            return out
        except Exception as e:  # a worker died, or could not start (e.g. a __main__ read from stdin)
            return _pool_failed(e, local, blocks)


def _pool_failed(e: Exception, local: tuple[ts.Context, HEPreset], blocks: list[np.ndarray]) -> list[bytes]:
    global _POOL_BROKEN
    if isinstance(e, HEError):
        raise e
    _POOL_BROKEN = True
    shutdown_workers()
    warnings.warn(f"fedgov.crypto: encryption worker processes failed ({type(e).__name__}: {e}); "
                  f"encrypting in this process from now on", RuntimeWarning, stacklevel=4)
    return _wire_chunks([_encrypt_one(*local, b) for b in blocks])


# ---------------------------------------------------------------------------------
# The operations
# ---------------------------------------------------------------------------------

def encrypt_update(arrays: Sequence[np.ndarray], *, context: SecretKeys | PublicContext, weight: float,
                   workers: int | None = None) -> EncryptedUpdate:
    """Weight, pack densely and encrypt one cooperative's update.

    ``weight``: this cooperative's FedAvg weight, applied here (w x) before
    encryption; best ``n_k / n_total`` (``compact`` requires ``0 < weight <= 1``).
    ``context``: the shared :class:`SecretKeys` (mode ``clients``) or the
    custodian's :class:`PublicContext` (mode ``custodian``).
    ``workers``: processes to encrypt with (default :func:`default_workers`;
    pass 1 where several clients already share the machine, as in simulation).
    """
    if not isinstance(context, (SecretKeys, PublicContext)):
        raise HEError("context must be SecretKeys or PublicContext")
    if not context.can_encrypt:
        raise HEError("this PublicContext holds no public key (key_holder = 'clients'): "
                      "cooperatives encrypt with the shared SecretKeys")
    p = context.preset
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise HEError(f"weight must be a number, not {weight!r}") from None
    if not (math.isfinite(weight) and weight > 0):
        raise HEError(f"weight must be positive and finite, got {weight}")
    try:
        flat, specs = flatten(arrays, dtype=None)  # widened below, in one pass with the weighting
    except TypeError as e:
        raise HEError(str(e)) from None
    if flat.size == 0:
        raise HEError("nothing to encrypt: the update has no parameters")
    lo, hi = float(flat.min()), float(flat.max())  # NaN and inf propagate: two passes, no temporary array
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HEError("the update holds NaN or infinite values")
    num_clipped: int | None = None
    if p.scheme == "ckks":
        peak = max(hi, -lo) * weight
        if peak > p.ckks_value_bound:
            raise HEError(f"preset {p.name!r}: |weight x value| reaches {peak:.4g}, above {p.ckks_value_bound:.4g} "
                          f"(the modulus headroom shared by max_clients = {p.max_clients} updates); use "
                          f"fractional weights n_k / n_total")
        values = np.multiply(flat, weight, dtype=np.float64)
    else:
        if weight > 1.0:
            raise HEError(f"preset {p.name!r} needs a fractional weight 0 < w <= 1 (n_k / n_total), got {weight}")
        R = p.clip_range
        flat = flat.astype(np.float64, copy=False)  # quantize in float64, whatever the arrays were
        num_clipped = int(np.count_nonzero(np.abs(flat) > R))
        q = np.rint(np.clip(flat, -R, R) * (weight / p.quant_step)).astype(np.int64)
        values = q
    ranges, _ = _layout(p, specs)
    if p.scheme == "bfv":
        blocks = [pack_digits(values[a:b], p.digit_base, p.values_per_slot) for a, b in ranges]
    else:
        blocks = [values[a:b] for a, b in ranges]
    wire_chunks = _encrypt_blocks(context, blocks, default_workers() if workers is None else int(workers))
    head = EncryptedUpdate(preset_name=p.name, fingerprint=p.fingerprint(), key_id=context.key_id, specs=specs,
                           contributors=1, weight=weight, chunks=[])._header_bytes()
    # One join builds the message (a 10^7-parameter update is ~150 MB): parsing it back only indexes it.
    update = EncryptedUpdate.from_bytes(b"".join([head, _U32.pack(len(blocks)), *wire_chunks]))
    update.num_clipped = num_clipped
    return update


UpdateLike = Union[EncryptedUpdate, bytes, bytearray, memoryview, np.ndarray]


def aggregate(updates: Sequence[UpdateLike], *, context: PublicContext | SecretKeys) -> EncryptedUpdate:
    """Sum encrypted updates (and their plaintext weights) without decrypting anything.

    Every update is checked against the first and against ``context`` (same
    preset, same keys, same shapes); malformed bytes raise :class:`HEError`.
    Each ciphertext is deserialized once and added in place.
    """
    if not isinstance(context, (SecretKeys, PublicContext)):
        raise HEError("context must be a PublicContext (or SecretKeys)")
    if len(updates) == 0:
        raise HEError("nothing to aggregate")
    p = context.preset
    cls = _vector_class(p)
    ctx = context.tenseal_context
    acc: list[Any] | None = None
    first: EncryptedUpdate | None = None
    contributors, weight = 0, 0.0
    for i, item in enumerate(updates):
        upd = EncryptedUpdate.from_bytes(item)
        what = f"update {i}"
        sizes = _check_update(upd, context, what)
        if first is None:
            first = upd
        elif upd.specs != first.specs:
            raise HEError(f"{what}: layer shapes differ from update 0")
        contributors += upd.contributors
        weight += upd.weight
        if contributors > p.max_clients:
            raise HEError(f"preset {p.name!r} sums at most {p.max_clients} updates per aggregate")
        chunks = upd.iter_chunk_bytes()
        if acc is None:
            acc = [_load_vector(cls, ctx, c, s, p, what) for c, s in zip(chunks, sizes)]
            continue
        for j, (c, s) in enumerate(zip(chunks, sizes)):
            v = _load_vector(cls, ctx, c, s, p, what)
            try:
                acc[j].add_(v)
            except Exception as e:
                raise HEError(f"{what}: ciphertext {j} cannot be added: {e}") from None
    if p.scheme == "bfv" and weight > 1.0 + 1e-9:
        raise HEError(f"preset {p.name!r}: weights sum to {weight:.6g} > 1, so the quantized sum may overflow")
    assert first is not None and acc is not None
    return EncryptedUpdate(preset_name=p.name, fingerprint=p.fingerprint(), key_id=context.key_id,
                           specs=first.specs, contributors=contributors, weight=weight, vectors=acc)


def tenseal_direct_sum(chunks_per_update: Sequence[Sequence[bytes]], *, context: PublicContext | SecretKeys
                       ) -> list[bytes]:
    """The same sum done directly with TenSEAL's public API, no fedgov checks: a benchmark baseline.

    ``chunks_per_update``: each update's serialized ciphertexts
    (``EncryptedUpdate.chunk_bytes()``). Returns the summed ciphertexts, serialized.
    """
    p, ctx = context.preset, context.tenseal_context
    load = ts.ckks_vector_from if p.scheme == "ckks" else ts.bfv_vector_from
    acc = [load(ctx, c) for c in chunks_per_update[0]]
    for chunks in chunks_per_update[1:]:
        for j, c in enumerate(chunks):
            acc[j] += load(ctx, c)
    return [v.serialize() for v in acc]


def decrypt_aggregate(aggregate: UpdateLike, *, keys: SecretKeys, total_weight: float | None = None,
                      shapes: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Decrypt a sum of weighted updates and divide by the total weight: the FedAvg arrays.

    ``total_weight``: the plaintext sum of the weights (default: the one the
    aggregate carries). ``shapes``: if given, the layer shapes are checked.
    """
    if not isinstance(keys, SecretKeys):
        raise HEError("decrypting needs SecretKeys; a PublicContext cannot decrypt")
    upd = EncryptedUpdate.from_bytes(aggregate)
    p = keys.preset
    sizes = check_update(upd, context=keys, shapes=shapes, what="aggregate")
    W = upd.weight if total_weight is None else float(total_weight)
    if not (math.isfinite(W) and W > 0):
        raise HEError(f"total_weight must be positive, got {W}")
    if upd.contributors > p.max_clients or (p.scheme == "bfv" and upd.weight > 1.0 + 1e-9):
        raise HEError(f"preset {p.name!r}: {upd.contributors} updates of total weight {upd.weight:.6g} "
                      f"(at most {p.max_clients} updates{', weights summing to <= 1' if p.scheme == 'bfv' else ''}): "
                      f"the sum may have overflowed")
    cls = _vector_class(p)
    ctx = keys.tenseal_context
    ranges, _ = _layout(p, upd.specs)
    pieces: list[np.ndarray] = []  # grown chunk by chunk: memory follows the real ciphertexts, not the header
    for j, ((a, b), s, chunk) in enumerate(zip(ranges, sizes, upd.iter_chunk_bytes())):
        vec = _load_vector(cls, ctx, chunk, s, p, "aggregate")
        try:
            if p.complex_packed:
                pieces.append(_complex_codec(ctx).decrypt(vec, b - a))
                continue
            plain = vec.decrypt()
        except Exception as e:
            raise HEError(f"cannot decrypt ciphertext {j}: {e}") from None
        if p.scheme == "ckks":
            pieces.append(np.asarray(plain, dtype=np.float64))
        else:
            pieces.append(unpack_digits(np.asarray(plain, dtype=np.int64), p.digit_base, p.values_per_slot, b - a)
                          .astype(np.float64))
    flat = np.concatenate(pieces)
    if p.scheme == "bfv":
        flat *= p.quant_step
    flat /= W
    return unflatten(flat, upd.specs)


# ---------------------------------------------------------------------------------
# Reference and measurement helpers
# ---------------------------------------------------------------------------------

def plaintext_fedavg(arrays_per_client: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """sum_k w_k x_k / sum_k w_k per layer, in float64: the reference HE must match."""
    if len(arrays_per_client) != len(weights) or len(weights) == 0:
        raise ValueError("need one weight per client, and at least one client")
    total = float(sum(weights))
    out = [np.zeros(np.shape(a), dtype=np.float64) for a in arrays_per_client[0]]
    for arrays, w in zip(arrays_per_client, weights):
        for o, a in zip(out, arrays):
            o += float(w) * np.asarray(a, dtype=np.float64)
    return [o / total for o in out]


def max_abs_error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest |a - b| over all layers (0 for empty updates)."""
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
                for x, y in zip(a, b, strict=True)), default=0.0)


def bytes_per_param(update: EncryptedUpdate | bytes) -> float:
    """Wire bytes (header and all framing included) per model parameter."""
    upd = EncryptedUpdate.from_bytes(update)
    return upd.num_bytes / max(1, upd.num_params)
