"""Differential privacy: Opacus DP-SGD inside each cooperative, central DP, and run-long accounting.

Opacus is imported only in this package, and only when a mechanism is used
(importing it costs seconds in every simulated client).
"""

from importlib import import_module
from typing import Any

__all__ = [
    "BudgetExhausted",
    "PrivacyLedger",
    "PrivateTrainResult",
    "RoundSpend",
    "UNIT_WEIGHT_KEY",
    "default_delta",
    "epsilon_of",
    "noise_for_target",
    "train_private",
    "user_level_epsilon",
]

# Metric every cooperative reports as 1, so that a strategy weighting by it takes the plain mean.
UNIT_WEIGHT_KEY = "unit-weight"

_LAZY = {
    "BudgetExhausted": "dp_sgd", "PrivateTrainResult": "dp_sgd", "train_private": "dp_sgd",
    "PrivacyLedger": "accounting", "RoundSpend": "accounting", "default_delta": "accounting",
    "epsilon_of": "accounting", "noise_for_target": "accounting", "user_level_epsilon": "accounting",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
