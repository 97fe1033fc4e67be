"""The rules between config keys: combinations that cannot run (a robust strategy under secure
aggregation, central DP with weights it was not calibrated for, SecAgg+ with a cohort it cannot
mask, ...), each refused in one line that names the key and says why; and the small rules other
modules share (cohort size, compute tiers, what SecAgg+ needs of a cohort).
"""

from __future__ import annotations

from typing import Any

from .config_schema import ConfigError

# The checks take the config by its shape (a fedgov.config.Config, or its SecureConfig section):
# fedgov.config calls them, so they cannot import it.
Config = SecureConfig = Any

__all__ = ["ROBUST_STRATEGIES", "check_config", "cohort_size", "parse_tiers", "secagg_cohort_problem"]


def check_config(cfg: Config, where: str) -> None:
    data = cfg.data
    if data.dataset == "csv" and not data.path:
        raise ConfigError(f"{where}: data.path: required when data.dataset = 'csv'")
    if data.partition == "natural" and data.dataset not in ("csv", "synthetic"):
        raise ConfigError(f"{where}: data.partition: 'natural' needs a dataset with cooperatives "
                          f"of its own ('csv' with data.cooperative_column, or 'synthetic')")
    if data.partition == "natural" and data.dataset == "csv" and not data.cooperative_column:
        raise ConfigError(f"{where}: data.cooperative_column: required for data.partition = 'natural'")
    if cfg.heterogeneity.stragglers > 0 and cfg.privacy.dp == "sample":
        raise ConfigError(f"{where}: heterogeneity.stragglers: not with privacy.dp = 'sample' (DP-SGD's accountant "
                          f"counts every member's full local epochs)")
    if data.synthetic_reference and (data.dataset != "synthetic" or data.partition != "natural"):
        raise ConfigError(f"{where}: data.synthetic_reference: needs data.dataset = 'synthetic' and "
                          f"data.partition = 'natural' (each reference device is one cooperative)")
    if data.num_cooperatives < 2 and data.partition != "natural":
        raise ConfigError(f"{where}: data.num_cooperatives: a federation needs at least 2 cooperatives")
    privacy, secure = cfg.privacy, cfg.secure
    if privacy.dp != "off" and privacy.target_epsilon == 0 and privacy.noise_multiplier == 0:
        raise ConfigError(f"{where}: privacy.target_epsilon: privacy.dp = {privacy.dp!r} needs "
                          f"privacy.target_epsilon or privacy.noise_multiplier")
    if privacy.dp == "sample" and cfg.strategy.name in ("fedprox", "qfedavg"):
        raise ConfigError(f"{where}: strategy.name: {cfg.strategy.name!r} adds a term DP-SGD cannot clip per "
                          f"example (FedProx's proximal term, q-FedAvg's exact training loss); use fedavg")
    if secure.aggregation != "off" and cfg.strategy.name in ROBUST_STRATEGIES:
        raise ConfigError(
            f"{where}: strategy.name: {cfg.strategy.name!r} cannot run with secure.aggregation = "
            f"{secure.aggregation!r}: a robust strategy must see every cooperative's update to discard "
            f"outliers, and secure aggregation exists so that the aggregator sees only their sum "
            f"(privacy and robustness trade off; use fedavg, fedprox or qfedavg)")
    if secure.aggregation != "off" and cfg.strategy.name == "qfedavg":
        raise ConfigError(f"{where}: strategy.name: 'qfedavg' reweights each update by its own loss, "
                          f"which the aggregator cannot do on hidden updates; use fedavg or fedprox")
    if secure.aggregation != "off" and privacy.dp == "user":
        raise ConfigError(f"{where}: privacy.dp: 'user' clips and noises individual updates at the aggregator, "
                          f"which secure.aggregation = {secure.aggregation!r} hides; use privacy.dp = 'sample'")
    if secure.aggregation == "he":
        from .crypto import PRESETS

        if secure.preset not in PRESETS:
            raise ConfigError(f"{where}: secure.preset: {secure.preset!r} is not one of {', '.join(PRESETS)}")
    if secure.aggregation == "secagg+":
        _check_secagg(cfg, where)
    _check_governance(cfg, where)
    _check_participation(cfg, where)
    _check_sybils(cfg, where)
    if cfg.model.name == "cnn" and data.dataset != "digits":
        raise ConfigError(f"{where}: model.name: 'cnn' needs image data (data.dataset = 'digits')")


def _check_governance(cfg: Config, where: str) -> None:
    gov, secure = cfg.governance, cfg.secure
    if gov.board_threshold > gov.board_size:
        raise ConfigError(f"{where}: governance.board_threshold: {gov.board_threshold} shares cannot be collected "
                          f"from a board of {gov.board_size} (governance.board_size)")
    if gov.clip_update_norm > 0 and secure.aggregation != "off":
        raise ConfigError(f"{where}: governance.clip_update_norm: the aggregator cannot clip updates that "
                          f"secure.aggregation = {secure.aggregation!r} hides from it")
    if gov.weighting != "samples" and secure.aggregation == "secagg+":
        raise ConfigError(f"{where}: governance.weighting: SecAgg+ weights by data size inside the mask; "
                          f"only 'samples' is available with secure.aggregation = 'secagg+'")
    if gov.registrar_catch > 0 and not gov.registrar.strip():
        raise ConfigError(f"{where}: governance.registrar: name the party that verifies identities "
                          f"(governance.registrar_catch = {gov.registrar_catch:g} needs one)")
    if gov.registrar_fee > 0 and not gov.registrar.strip():
        raise ConfigError(f"{where}: governance.registrar: name the party that charges for identities "
                          f"(governance.registrar_fee = {gov.registrar_fee:g} needs one)")
    if gov.registrar_fee > 0 and cfg.privacy.dp == "user":
        raise ConfigError(f"{where}: governance.registrar_fee: central DP (privacy.dp = 'user') weights every "
                          f"update equally, so merged identities cannot be weighted as one member")
    if gov.registrar_catch > 0 and cfg.privacy.dp == "user":
        raise ConfigError(f"{where}: governance.registrar_catch: central DP (privacy.dp = 'user') weights every "
                          f"update equally, so merged identities cannot be weighted as one member")
    if gov.weighting in ("sqrt", "capped", "stake") and cfg.privacy.dp == "user":
        raise ConfigError(f"{where}: governance.weighting: central DP (privacy.dp = 'user') is calibrated to an "
                          f"unweighted mean; use 'equal' (or 'samples', which it turns into 'equal')")
    # attack.cooperatives is checked against the federation's size once the data is known (fedgov.preflight).
    if cfg.heterogeneity.compute == "tiers":
        try:
            parse_tiers(cfg.heterogeneity.tiers)
        except ValueError:
            raise ConfigError(f"{where}: heterogeneity.tiers: {cfg.heterogeneity.tiers!r} is not a comma-separated "
                              f"list of positive speeds") from None


def _check_sybils(cfg: Config, where: str) -> None:
    if cfg.data.sybil_actor >= 0 and cfg.data.partition != "natural" and cfg.data.sybil_actor >= cfg.data.num_cooperatives:
        raise ConfigError(f"{where}: data.sybil_actor: {cfg.data.sybil_actor} is not a cooperative "
                          f"(ids are 0..{cfg.data.num_cooperatives - 1})")
    if cfg.governance.similarity_defense and cfg.privacy.dp == "user":
        raise ConfigError(f"{where}: governance.similarity_defense: central DP (privacy.dp = 'user') is calibrated "
                          f"to an unweighted mean; the defense would change the weights it assumes")
    if cfg.governance.similarity_defense and cfg.secure.aggregation != "off":
        raise ConfigError(f"{where}: governance.similarity_defense: compares plaintext updates, which "
                          f"secure.aggregation = {cfg.secure.aggregation!r} hides from the aggregator")


def _check_participation(cfg: Config, where: str) -> None:
    """A cohort whose size changes from round to round is what two mechanisms cannot take."""
    if cfg.participation.model == "always":
        return
    if cfg.secure.aggregation == "secagg+":
        raise ConfigError(f"{where}: participation.model: SecAgg+ needs a cohort of a size known in advance; "
                          f"use 'always' with secure.aggregation = 'secagg+'")
    if cfg.privacy.dp == "user":
        raise ConfigError(f"{where}: participation.model: central DP (privacy.dp = 'user') is calibrated to a "
                          f"fixed cohort size; use 'always' or privacy.dp = 'sample'")


def _check_secagg(cfg: Config, where: str) -> None:
    """What Flower's SecAggPlusWorkflow needs (it rejects or silently halts otherwise)."""
    secure = cfg.secure
    if cfg.heterogeneity.stragglers > 0:
        raise ConfigError(f"{where}: heterogeneity.stragglers: not with SecAgg+, whose rounds sample their own "
                          f"cohort (set it to 0, or secure.aggregation = 'he')")
    if secure.secagg_num_shares < 3:
        raise ConfigError(f"{where}: secure.secagg_num_shares: Flower's SecAgg+ needs at least 3 shares")
    if not 2 <= secure.secagg_threshold < secure.secagg_num_shares:
        raise ConfigError(f"{where}: secure.secagg_threshold: must be at least 2 and below "
                          f"secure.secagg_num_shares ({secure.secagg_num_shares})")
    if cfg.data.partition != "natural":  # a natural partition's size is known only from the data
        cohort = cfg.strategy.cohort_size(cfg.data.num_cooperatives)
        problem = secagg_cohort_problem(secure, cohort)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def parse_tiers(text: str) -> list[float]:
    """``"1.0,0.3,0.1"`` -> the tier speeds; ValueError unless all are positive numbers."""
    speeds = [float(t) for t in text.split(",")]
    if min(speeds) <= 0:
        raise ValueError(f"{text!r}: speeds must be positive")
    return speeds


def cohort_size(fraction: float, population: int, count: int = 0) -> int:
    """How many cooperatives are sampled each round: the one rule every part of fedgov uses.

    ``count`` (strategy.clients_per_round), when set, wins over ``fraction``.
    """
    if count > 0:
        return max(1, min(count, population))
    return max(1, round(fraction * population))


def secagg_cohort_problem(secure: SecureConfig, cohort: int) -> str | None:
    """Why SecAgg+ cannot run with cohorts of ``cohort`` cooperatives (None if it can)."""
    if cohort < 2:
        return f"strategy.fraction_train: SecAgg+ needs at least 2 cooperatives per round, this samples {cohort}"
    if secure.secagg_threshold > cohort:
        return (f"secure.secagg_threshold: {secure.secagg_threshold} shares cannot be collected from a cohort "
                f"of {cohort} cooperatives")
    if cohort * secure.secagg_quantization_range >= 2**32:
        return (f"secure.secagg_quantization_range: {cohort} cooperatives x {secure.secagg_quantization_range} "
                f"levels overflow SecAgg+'s modulus 2**32")
    return None


# Strategies that must see every individual update; secure aggregation hides them.
ROBUST_STRATEGIES = frozenset({"median", "trimmed_mean", "krum", "multikrum", "bulyan"})
