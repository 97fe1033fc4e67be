"""Differential privacy: Opacus DP-SGD inside each cooperative, central DP, and run-long accounting.

The modules: ``accounting`` (PrivacyLedger, RoundSpend, epsilons, Opacus's RDP accountant),
``dp_sgd`` (Opacus DP-SGD for one round), ``central`` (Flower's fixed-clipping wrappers),
``resume`` (the ledger across a crash). Import them by name: this package's ``__init__``
holds only constants, so that a simulated client that does not use DP never imports Opacus
(seconds in every client).
"""

__all__ = ["OS_NOISE", "SEEDED_NOISE", "UNIT_WEIGHT_KEY"]

# Metric every cooperative reports as 1, so that a strategy weighting by it takes the plain mean.
UNIT_WEIGHT_KEY = "unit-weight"

# Where DP-SGD's noise and Poisson sampling come from, as summary.json, the audit log and the
# summary table state it: the operating system's randomness (the default), or the run's seed.
OS_NOISE = "os-random"
SEEDED_NOISE = ("seeded from the config (privacy.seeded_noise): the DP guarantee holds only against "
                "parties that do not hold the config")
