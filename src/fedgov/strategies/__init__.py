"""Aggregation strategies: Flower's own, chosen by name, and fedgov's wrappers around them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import strategy as flwr_strategy

from ..config import ROBUST_STRATEGIES, Config
from .recorder import CohortSampler, RoundRecorder

__all__ = ["STRATEGIES", "ROBUST_STRATEGIES", "build_strategy", "RoundRecorder", "CohortSampler"]

# fedgov samples the cohort itself (seeded) and hands the inner strategy only the
# sampled nodes, so every Flower strategy is told to take all the nodes it is shown.
_TAKE_ALL = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                 min_evaluate_nodes=1, min_available_nodes=1)

STRATEGIES: dict[str, Callable[[Config], flwr_strategy.Strategy]] = {
    "fedavg": lambda cfg: flwr_strategy.FedAvg(**_TAKE_ALL),
    "fedprox": lambda cfg: flwr_strategy.FedProx(proximal_mu=cfg.strategy.proximal_mu, **_TAKE_ALL),
    "median": lambda cfg: flwr_strategy.FedMedian(**_TAKE_ALL),
    "trimmed_mean": lambda cfg: flwr_strategy.FedTrimmedAvg(beta=cfg.strategy.trim_beta, **_TAKE_ALL),
    "krum": lambda cfg: flwr_strategy.Krum(num_malicious_nodes=cfg.strategy.num_malicious, **_TAKE_ALL),
    "multikrum": lambda cfg: flwr_strategy.MultiKrum(
        num_malicious_nodes=cfg.strategy.num_malicious,
        num_nodes_to_select=max(1, _cohort_size(cfg) - cfg.strategy.num_malicious), **_TAKE_ALL),
    "bulyan": lambda cfg: flwr_strategy.Bulyan(num_malicious_nodes=cfg.strategy.num_malicious, **_TAKE_ALL),
    "qfedavg": lambda cfg: flwr_strategy.QFedAvg(client_learning_rate=cfg.train.lr,
                                                 q=cfg.strategy.qfedavg_q, **_TAKE_ALL),
}



def _cohort_size(cfg: Config) -> int:
    return max(1, round(cfg.strategy.fraction_train * cfg.data.num_cooperatives))


def build_strategy(cfg: Config) -> flwr_strategy.Strategy:
    """The Flower strategy named by ``strategy.name``, configured from the run config."""
    return STRATEGIES[cfg.strategy.name](cfg)
