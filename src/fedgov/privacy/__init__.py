"""Differential privacy: Opacus DP-SGD inside each cooperative, and accounting that spans the run.

Opacus is imported only here (``fedgov.privacy.dp_sgd`` and ``fedgov.privacy.accounting``).
"""

from .accounting import (
    PrivacyLedger,
    RoundSpend,
    default_delta,
    epsilon_of,
    noise_for_target,
    user_level_epsilon,
)
from .dp_sgd import BudgetExhausted, PrivateTrainResult, train_private

__all__ = [
    "BudgetExhausted",
    "PrivacyLedger",
    "PrivateTrainResult",
    "RoundSpend",
    "default_delta",
    "epsilon_of",
    "noise_for_target",
    "train_private",
    "user_level_epsilon",
]
