"""Secure aggregation: homomorphic encryption with TenSEAL (``fedgov.crypto.he``).

fedgov imports TenSEAL only inside this package, and only when an HE name is
first used: ``from fedgov.crypto import encrypt_update`` imports TenSEAL,
``import fedgov.crypto`` alone (or a sibling module) does not. Presets and
their measured costs: docs/he_presets.md.
"""

from typing import Any

_HE_NAMES = (
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
    "check_security",
    "check_update",
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
)

__all__ = list(_HE_NAMES)


def __getattr__(name: str) -> Any:
    if name in _HE_NAMES:
        from . import he

        return getattr(he, name)
    raise AttributeError(f"module 'fedgov.crypto' has no attribute {name!r}")
