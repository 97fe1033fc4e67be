"""Check slots: what lets a key holder tell the whole sum of the claimed updates from anything else.

The aggregator can relabel, add, scale and slot-wise mask ciphertexts (and, with the
custodian's public key, encrypt vectors of its own). A key holder that decrypted whatever
it was sent would hand it any linear combination it likes, one update alone included. So
every ciphertext carries ``K`` check values after its data slots:

    check_j = <r_j, data> + o_{k,j}

``r_j`` is a secret random vector of the round (the same for every cooperative) and
``o_{k,j}`` a secret random offset of cooperative ``k``, round and ciphertext, both derived
from the check key that cooperatives and the key holder hold and the aggregator does not.
The sum over a set ``S`` of cooperatives then satisfies ``C = <r, X> + sum_{k in S} o_k``,
and the key holder, given ``S``, recomputes both sides before it releases anything.

Why only the full sum passes (docs/he_check_slots.md has the argument): any other linear
combination leaves a term ``<r, (M - I) x_k>`` or a mismatch of offsets, both of which are
random (r and o unknown to the aggregator), so it passes with probability about
``(2 tau / spread) ** K``: below 2^-100 for the CKKS presets, ``t ** -K`` exactly under BFV.
CKKS is approximate, so an update whose values are all within the tolerance of zero (as
small as the scheme's own noise) could be left out unnoticed: a sum without it is the
same sum to that precision.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np

from .he_presets import HEError, HEPreset

__all__ = ["CHECK_KEY_BYTES", "CheckKey", "check_slots", "check_values", "verify_checks"]

CHECK_KEY_BYTES = 32
# Relative scale of r (CKKS): |<r, x>| stays near the RMS of x, far inside the value bound.
_R_SCALE = 0.25
# CKKS tolerance on one check of a sum, per contributor (sqrt growth): far above the ~1e-7
# noise of a fresh ciphertext at scale 2^37, far below any update worth hiding.
_CKKS_TOLERANCE = 2e-6


def check_slots(preset: HEPreset) -> int:
    """Check values per ciphertext (``HEPreset.check_values``)."""
    return preset.check_values


@dataclass(frozen=True)
class CheckKey:
    """The check secret: held by the cooperatives and the key holder, never by the aggregator."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != CHECK_KEY_BYTES:
            raise HEError(f"a check key is {CHECK_KEY_BYTES} bytes, got {len(self.secret)}")

    def _rng(self, *label: object) -> np.random.Generator:
        digest = hmac.new(self.secret, repr(label).encode(), hashlib.sha256).digest()
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))

    def projections(self, preset: HEPreset, server_round: int, length: int) -> np.ndarray:
        """``r``: (K, length), the same for every cooperative of the round."""
        rng = self._rng("r", server_round, length)
        k = check_slots(preset)
        if preset.scheme == "bfv":
            return rng.integers(0, preset.plain_modulus, size=(k, length), dtype=np.int64)
        signs = rng.integers(0, 2, size=(k, length), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
        return signs * (_R_SCALE / np.sqrt(length))

    def offsets(self, preset: HEPreset, server_round: int, cooperative: int, chunk: int) -> np.ndarray:
        """``o``: K offsets of one cooperative's ciphertext ``chunk`` in ``server_round``."""
        rng = self._rng("o", server_round, int(cooperative), int(chunk))
        k = check_slots(preset)
        if preset.scheme == "bfv":
            return rng.integers(0, preset.plain_modulus, size=k, dtype=np.int64)
        # CKKS error grows with magnitude: offsets of order 1 keep the check as precise as the data.
        half = min(preset.ckks_value_bound / 2, 1.0)
        return rng.uniform(-half, half, size=k)


def _mod_dot(r: np.ndarray, x: np.ndarray, t: int) -> list[int]:
    """(r @ x) mod t exactly, for int64 r in [0, t) and any int64 x, t < 2^57: 19-bit limbs keep every
    partial dot product of up to 2^24 terms inside int64."""
    x = np.mod(np.asarray(x, dtype=np.int64), t)
    mask, bits = (1 << 19) - 1, 19
    r_limbs = [(r >> (bits * i)) & mask for i in range(3)]
    x_limbs = [(x >> (bits * i)) & mask for i in range(3)]
    out = [0] * r.shape[0]
    for i, ri in enumerate(r_limbs):
        for j, xj in enumerate(x_limbs):
            partial = ri @ xj  # < 2^38 per term
            for row in range(r.shape[0]):
                out[row] += int(partial[row]) << (bits * (i + j))
    return [v % t for v in out]


def check_values(key: CheckKey, preset: HEPreset, data: np.ndarray, *, server_round: int, cooperative: int,
                 chunk: int) -> np.ndarray:
    """The K values a cooperative appends to ``data`` (one ciphertext's slot values)."""
    r = key.projections(preset, server_round, len(data))
    o = key.offsets(preset, server_round, cooperative, chunk)
    if preset.scheme == "bfv":
        t = preset.plain_modulus
        c = [(d + int(off)) % t for d, off in zip(_mod_dot(r, data, t), o)]
        return np.array([v if v <= t // 2 else v - t for v in c], dtype=np.int64)  # centred, as BFV decrypts
    checks = r @ np.asarray(data, dtype=np.float64) + o
    if np.max(np.abs(checks)) > preset.ckks_value_bound:
        raise HEError(f"preset {preset.name!r}: a check value reaches {np.max(np.abs(checks)):.4g}, above "
                      f"{preset.ckks_value_bound:.4g}; the update is too large for the preset's headroom")
    return checks


def verify_checks(key: CheckKey, preset: HEPreset, data: np.ndarray, checks: np.ndarray, *, server_round: int,
                  contributors: list[int], chunk: int) -> None:
    """Raise HEError unless ``data``/``checks`` decrypt the full sum of ``contributors``' ciphertexts ``chunk``."""
    r = key.projections(preset, server_round, len(data))
    offsets = [key.offsets(preset, server_round, c, chunk) for c in contributors]
    if preset.scheme == "bfv":  # exact: Python ints, reduced mod t
        expected_offset = np.array([sum(int(o[j]) for o in offsets) % preset.plain_modulus
                                    for j in range(check_slots(preset))], dtype=object)
    else:
        expected_offset = np.sum(offsets, axis=0)
    if preset.scheme == "bfv":
        t = preset.plain_modulus
        want = [(d + int(off)) % t for d, off in zip(_mod_dot(r, data, t), expected_offset.tolist())]
        if want != [int(v) % t for v in checks]:
            raise HEError(f"ciphertext {chunk}: not the sum of the claimed contributors' updates")
        return
    want = r @ np.asarray(data, dtype=np.float64) + expected_offset
    tolerance = _CKKS_TOLERANCE * np.sqrt(len(contributors))
    worst = float(np.max(np.abs(want - np.asarray(checks, dtype=np.float64))))
    if not worst <= tolerance:
        raise HEError(f"ciphertext {chunk}: not the sum of the claimed contributors' updates "
                      f"(check off by {worst:.3g}, tolerance {tolerance:.3g})")
