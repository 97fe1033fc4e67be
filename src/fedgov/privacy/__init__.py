"""Differential privacy: Opacus DP-SGD inside each cooperative, central DP, and run-long accounting.

Opacus is imported only in this package, and only when a mechanism is used
(importing it costs seconds in every simulated client).
"""

from importlib import import_module
from typing import Any

__all__ = [
    "BudgetExhausted",
    "OS_NOISE",
    "PrivacyLedger",
    "PrivateTrainResult",
    "RoundSpend",
    "SEEDED_NOISE",
    "UNIT_WEIGHT_KEY",
    "default_delta",
    "epsilon_of",
    "noise_for_target",
    "train_private",
    "user_level_epsilon",
]

# Metric every cooperative reports as 1, so that a strategy weighting by it takes the plain mean.
UNIT_WEIGHT_KEY = "unit-weight"

# Where DP-SGD's noise and Poisson sampling come from, as summary.json, the audit log and the
# summary table state it: the operating system's randomness (the default), or the run's seed.
OS_NOISE = "os-random"
SEEDED_NOISE = ("seeded from the config (privacy.seeded_noise): the DP guarantee holds only against "
                "parties that do not hold the config")

_LAZY = {
    "BudgetExhausted": "dp_sgd", "PrivateTrainResult": "dp_sgd", "train_private": "dp_sgd",
    "PrivacyLedger": "accounting", "RoundSpend": "accounting", "default_delta": "accounting",
    "epsilon_of": "accounting", "noise_for_target": "accounting", "user_level_epsilon": "accounting",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
