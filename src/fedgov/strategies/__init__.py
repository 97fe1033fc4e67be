"""Aggregation strategies: Flower's own, chosen by name, and fedgov's wrappers around them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import strategy as flwr_strategy

from ..config import ROBUST_STRATEGIES, Config
from ..governance.electorate import Electorate
from .governance import WEIGHT_KEY, GovernedAggregation
from .recorder import CohortSampler, RoundRecorder

__all__ = ["STRATEGIES", "ROBUST_STRATEGIES", "build_strategy", "cohort_size", "RoundRecorder", "CohortSampler",
           "GovernedAggregation", "WEIGHT_KEY", "govern"]

# fedgov samples the cohort itself (seeded) and hands the inner strategy only the
# sampled nodes, so every Flower strategy is told to take all the nodes it is shown.
_TAKE_ALL = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                 min_evaluate_nodes=1, min_available_nodes=1)


def _common(cfg: Config) -> dict:
    if cfg.privacy.dp == "user":  # central DP's noise is calibrated to an unweighted mean
        from ..privacy.central import UNIT_WEIGHT_KEY

        return {**_TAKE_ALL, "weighted_by_key": UNIT_WEIGHT_KEY}
    # GovernedAggregation writes the governance policy's weight into every accepted reply.
    return {**_TAKE_ALL, "weighted_by_key": WEIGHT_KEY}


STRATEGIES: dict[str, Callable[[Config], flwr_strategy.Strategy]] = {
    "fedavg": lambda cfg: flwr_strategy.FedAvg(**_common(cfg)),
    "fedprox": lambda cfg: flwr_strategy.FedProx(proximal_mu=cfg.strategy.proximal_mu, **_common(cfg)),
    "median": lambda cfg: flwr_strategy.FedMedian(**_common(cfg)),
    "trimmed_mean": lambda cfg: flwr_strategy.FedTrimmedAvg(beta=cfg.strategy.trim_beta, **_common(cfg)),
    "krum": lambda cfg: flwr_strategy.Krum(num_malicious_nodes=cfg.strategy.num_malicious, **_common(cfg)),
    "multikrum": lambda cfg: flwr_strategy.MultiKrum(
        num_malicious_nodes=cfg.strategy.num_malicious,
        num_nodes_to_select=max(1, cohort_size(cfg) - cfg.strategy.num_malicious), **_common(cfg)),
    "bulyan": lambda cfg: flwr_strategy.Bulyan(num_malicious_nodes=cfg.strategy.num_malicious, **_common(cfg)),
    "qfedavg": lambda cfg: flwr_strategy.QFedAvg(client_learning_rate=cfg.train.lr,
                                                 q=cfg.strategy.qfedavg_q, **_common(cfg)),
}


def cohort_size(cfg: Config) -> int:
    """How many cooperatives train each round (the CohortSampler's rule)."""
    return cfg.strategy.cohort_size(cfg.data.num_cooperatives)


def build_strategy(cfg: Config) -> flwr_strategy.Strategy:
    """The Flower strategy named by ``strategy.name`` (fedgov.mechanisms wrap it: DP, governance, HE)."""
    return STRATEGIES[cfg.strategy.name](cfg)


def govern(strategy: flwr_strategy.Strategy, cfg: Config, *, node_to_cooperative: dict[int, int],
           archive: object | None = None, electorate: Electorate | None = None) -> GovernedAggregation:
    """Wrap a plaintext strategy in the governance policy: validation, weights, clipping, digests.

    Without an ``electorate`` (no stakes, no registrar) every identity is a member weighted by
    ``governance.weighting``.
    """
    g = cfg.governance
    return GovernedAggregation(strategy, electorate=electorate or Electorate(g.weighting, cap=g.cap),
                               max_update_norm=g.max_update_norm,
                               clip_update_norm=g.clip_update_norm, node_to_cooperative=node_to_cooperative,
                               archive=archive, set_weights=cfg.privacy.dp != "user",
                               similarity_defense=g.similarity_defense)
