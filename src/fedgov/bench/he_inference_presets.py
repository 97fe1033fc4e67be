"""CKKS parameter presets for encrypted inference (``fedgov.bench.he_inference``), each checked
to be 128-bit secure and to leave its primes room for the scale and the logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..crypto import HEError, check_parameters, preset_from_json

__all__ = ["DEFAULT_INFERENCE_PRESET", "INFERENCE_PRESETS", "InferencePreset", "check_inference_preset",
           "get_inference_preset"]


@dataclass(frozen=True)
class InferencePreset:
    """CKKS parameters for inference.

    ``coeff_mod_bit_sizes``: the first prime holds the result (its bits above the
    scale bound the logit), the middle ones are consumed one per rescale (the
    multiplicative depth), the last is SEAL's special prime for key switching.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    precision: float  # stated max abs error of a logit vs float64 (see description)
    description: str = ""

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescales available: the data primes after the first."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def total_coeff_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def value_bound(self) -> float:
        """|logit| (and every slot of the result) must stay below this."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InferencePreset:
        preset = preset_from_json(cls, text, "inference preset")
        check_inference_preset(preset)
        return preset


def check_inference_preset(p: InferencePreset) -> None:
    """Raise :class:`HEError` unless ``p`` is 128-bit secure and its primes fit its scale."""
    def bad(msg: str) -> HEError:
        return HEError(f"inference preset {p.name!r}: {msg}")

    check_parameters("inference preset", p.name, p.poly_modulus_degree, p.coeff_mod_bit_sizes)
    sizes = p.coeff_mod_bit_sizes
    if len(sizes) < 3:
        raise bad("needs at least three primes: result, one rescale, special")
    if not 20 <= p.scale_bits < sizes[0]:
        raise bad("scale_bits must be at least 20 and below the first prime's size")
    if any(b != p.scale_bits for b in sizes[1:-1]):
        raise bad("the middle primes must have scale_bits bits, so that each rescale restores the scale")
    if sizes[-1] < max(sizes[:-1]):
        raise bad("the special (last) prime must be at least as large as every other prime")
    if not (math.isfinite(p.precision) and p.precision > 0):
        raise bad("precision must be positive")


INFERENCE_PRESETS: dict[str, InferencePreset] = {}


def _register(p: InferencePreset) -> InferencePreset:
    check_inference_preset(p)
    INFERENCE_PRESETS[p.name] = p
    return p


_register(InferencePreset(
    name="inference",
    poly_modulus_degree=8192,
    coeff_mod_bit_sizes=(60, 40, 40, 60),
    scale_bits=40,
    precision=1e-4,
    description=(
        "CKKS, N=8192, primes [60, 40, 40, 60] (200 of 218 bits allowed: 128-bit secure), scale 2^40. "
        "Depth 2: a linear layer, then a square activation with the second linear layer folded into it "
        "(no level is left for a separate output layer). 4096 slots: a batch carries up to 4096 samples. "
        "Results live modulo the 60-bit prime: |logit| must stay below 2^19. Measured max abs logit error "
        "on the breast-cancer models (raw features, |logit| up to ~30): <= 2e-6 (logistic regression), "
        "<= 7e-6 (MLP; rotations add key-switching noise); stated bound 1e-4. "
        "A request is ~330 KB (one fresh ciphertext), a response ~131 KB (one ciphertext at the last level)."
    ),
))

DEFAULT_INFERENCE_PRESET = "inference"


def get_inference_preset(preset: str | InferencePreset = DEFAULT_INFERENCE_PRESET) -> InferencePreset:
    if isinstance(preset, InferencePreset):
        check_inference_preset(preset)
        return preset
    try:
        return INFERENCE_PRESETS[preset]
    except (KeyError, TypeError):
        raise HEError(f"unknown inference preset {preset!r}; choose one of {sorted(INFERENCE_PRESETS)}") from None
