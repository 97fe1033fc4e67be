"""Secure aggregation: homomorphic encryption with TenSEAL (``fedgov.crypto.he`` and its parts).

The HE modules import TenSEAL only inside the functions that need it, so
``import fedgov.crypto`` (or a sibling module such as ``fedgov.crypto.keys``) does
not import it; the first key generation, context load or encryption does. Presets
and their measured costs: docs/he_presets.md. Benchmark references (plaintext
FedAvg, a direct TenSEAL sum) live in :mod:`fedgov.bench.he_reference`.
"""

from .he import CheckStamp, SumClaim, aggregate, check_update, decrypt_aggregate, encrypt_update
from .he_check import CheckKey
from .he_keys import PublicContext, SecretKeys, generate_keys, load_or_generate_keys
from .he_presets import (
    DEFAULT_PRESET,
    PRESETS,
    SECURITY_128_MAX_COEFF_BITS,
    HEError,
    HEPreset,
    check_parameters,
    check_security,
    get_preset,
    preset_from_json,
)
from .he_scratch import load_seal_ciphertext, serialize_seal_object
from .he_wire import EncryptedUpdate, bytes_per_param
from .he_workers import default_workers, shutdown_workers

__all__ = [
    "CheckKey",
    "CheckStamp",
    "DEFAULT_PRESET",
    "PRESETS",
    "SECURITY_128_MAX_COEFF_BITS",
    "EncryptedUpdate",
    "HEError",
    "HEPreset",
    "PublicContext",
    "SecretKeys",
    "SumClaim",
    "aggregate",
    "bytes_per_param",
    "check_parameters",
    "check_security",
    "check_update",
    "decrypt_aggregate",
    "default_workers",
    "encrypt_update",
    "generate_keys",
    "get_preset",
    "load_or_generate_keys",
    "load_seal_ciphertext",
    "preset_from_json",
    "serialize_seal_object",
    "shutdown_workers",
]
