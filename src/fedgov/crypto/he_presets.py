"""HE presets: the named TenSEAL parameter sets and the checks every parameter set must pass.

Pure Python: importing this module imports neither TenSEAL nor numpy (``fedgov.config``
checks ``secure.preset`` against :data:`PRESETS`). Presets and their measured costs:
docs/he_presets.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "SECURITY_128_MAX_COEFF_BITS",
    "HEError",
    "HEPreset",
    "check_parameters",
    "check_security",
    "get_preset",
    "preset_from_json",
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
    def check_values(self) -> int:
        """Check values each ciphertext carries after its data (fedgov.crypto.he_check): enough that a
        forged sum passes with probability below 2^-100 (BFV is exact, CKKS needs more)."""
        return 2 if self.scheme == "bfv" else 8

    @property
    def check_slot_count(self) -> int:
        """Slots the check values take (CKKS packs two per complex slot; BFV one per slot)."""
        return self.check_values // 2 if self.complex_packed else self.check_values

    @property
    def data_values_per_ciphertext(self) -> int:
        """Values of the update one ciphertext carries: all its slots but the check slots."""
        return (self.slots - self.check_slot_count) * self.values_per_slot

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
