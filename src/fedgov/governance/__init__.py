"""Governance of a federation: who counts how much, and who may de-anonymise whom.

``weighting`` turns cooperatives' claimed sizes into aggregation weights under a policy
(FedAvg, equal, sqrt, capped) and measures how concentrated they are; ``escrow`` seals
the HE secret key so that only a threshold of an oversight board can open it. Neither
imports Flower. pycryptodome is imported only when an escrow name is first used.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "WEIGHTING_POLICIES": "weighting",
    "INFLUENCE_KEYS": "weighting",
    "policy_weights": "weighting",
    "influence": "weighting",
    "mean_influence": "weighting",
    "EscrowError": "escrow",
    "BoardShare": "escrow",
    "seal": "escrow",
    "write_escrow": "escrow",
    "write_shares": "escrow",
    "read_share": "escrow",
    "open_escrow": "escrow",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
