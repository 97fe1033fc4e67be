"""Who takes part in a round: who shows up, the seeded training cohort, and the evaluation schedule.

Shared by the Flower run (``fedgov.strategies``, ``fedgov.crypto.secagg``) and the engine-free floor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .config import Config, ParticipationConfig, cohort_size

__all__ = ["CohortSampler", "cohort_sampler", "evaluates_cooperatives", "evaluation_interval", "show_up_probabilities",
           "training_seed"]


class CohortSampler:
    """Seeded choice of which cooperatives train in a round (independent of node ids).

    With ``show_up`` (member -> probability), each member first decides on its own whether
    to show up this round (``participation.model``); the server then samples
    ``strategy.fraction_train`` of those present. A round nobody shows up for is held with
    the member most likely to, so that every round has a cohort. ``last_present`` is who
    showed up in the round sampled last. ``count`` fixes the cohort's size instead of
    ``fraction``; ``size_weights`` draws it in proportion to size. ``stragglers`` picks who
    of a cohort runs out of time (FedProx's systems heterogeneity).
    """

    def __init__(self, *, seed: int, fraction: float, show_up: Mapping[int, float] | None = None, count: int = 0,
                 size_weights: Mapping[int, float] | None = None, stragglers: float = 0.0,
                 local_epochs: int = 1, straggler_work: str = "drop") -> None:
        self.seed = seed
        self.fraction = fraction
        self.count = count
        self.show_up = dict(show_up) if show_up is not None else None
        self.size_weights = dict(size_weights) if size_weights is not None else None
        self.straggler_share = stragglers
        self.local_epochs = local_epochs
        self.straggler_work = straggler_work
        self.last_present: list[int] | None = None

    def sample(self, server_round: int, cooperative_ids: Iterable[int]) -> list[int]:
        ids = sorted(cooperative_ids)
        if self.show_up is not None:
            draws = np.random.default_rng([self.seed, server_round, 0x5E0]).random(len(ids))
            present = [c for c, u in zip(ids, draws) if u < self.show_up.get(c, 1.0)]
            ids = present or [max(ids, key=lambda c: (self.show_up.get(c, 1.0), -c))]
            self.last_present = ids
        size = cohort_size(self.fraction, len(ids), self.count)
        if size >= len(ids):
            return ids
        rng = np.random.default_rng([self.seed, server_round])
        p = None
        if self.size_weights is not None:  # in proportion to size (q-FFL's sampling 2), without replacement
            w = np.array([float(self.size_weights.get(c, 0.0)) for c in ids])
            if np.count_nonzero(w) >= size:
                p = w / w.sum()
        return sorted(int(i) for i in rng.choice(ids, size=size, replace=False, p=p))

    def stragglers(self, server_round: int, cohort: Sequence[int]) -> dict[int, int]:
        """The round's stragglers and the local epochs each manages (FedProx, section 5.2).

        round(m (1 - share)) of the cohort, chosen at random, finish their epochs; each of the
        others runs a uniform 1..local_epochs - 1 (as the reference's randint(1, E)). Seeded by
        round, so every method at one seed meets the same stragglers. At least one member
        finishes: where the reference would drop the whole cohort (and fail), a round still
        has someone to aggregate.
        """
        if self.straggler_share <= 0 or not cohort:
            return {}
        rng = np.random.default_rng([self.seed, server_round, 0x57A6])
        finishers = max(1, round(len(cohort) * (1 - self.straggler_share)))
        finishing = set(int(c) for c in rng.choice(list(cohort), size=finishers, replace=False))
        late = [int(c) for c in cohort if int(c) not in finishing]
        return {c: int(rng.integers(1, max(self.local_epochs, 2))) for c in late}


def show_up_probabilities(participation: ParticipationConfig, sizes: Mapping[int, float]) -> dict[int, float] | None:
    """Each member's probability of showing up in a round (None: ``always``, everyone is there).

    ``turnout``: the same for all. ``size``: proportional to size ** ``size_exponent``, capped at
    1, with the factor chosen (by bisection) so that the mean probability is ``turnout``.
    """
    if participation.model == "always":
        return None
    ids = sorted(sizes)
    if participation.model == "turnout" or participation.size_exponent == 0:
        return {c: participation.turnout for c in ids}
    raw = np.array([float(sizes[c]) for c in ids])
    mean = raw.mean()
    relative = (raw / mean) ** participation.size_exponent if mean > 0 else np.ones_like(raw)
    target = participation.turnout
    if np.count_nonzero(relative) < target * len(ids):  # too few non-empty members to reach the turnout
        return {c: (1.0 if r > 0 else 0.0) for c, r in zip(ids, relative)}
    low, high = 0.0, 1.0
    while np.minimum(1.0, high * relative).mean() < target:
        high *= 2.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if np.minimum(1.0, mid * relative).mean() < target else (low, mid)
    return {c: float(min(1.0, high * r)) for c, r in zip(ids, relative)}


def cohort_sampler(cfg: Config, sizes: Mapping[int, float]) -> CohortSampler:
    """The run's sampler: ``strategy.fraction_train`` (or ``clients_per_round``) of the members ``participation``
    brings to a round, uniformly or by size (``strategy.sampling``), and the round's stragglers."""
    return CohortSampler(seed=cfg.seed, fraction=cfg.strategy.fraction_train,
                         show_up=show_up_probabilities(cfg.participation, sizes), count=cfg.strategy.clients_per_round,
                         size_weights=sizes if cfg.strategy.sampling == "size" else None,
                         stragglers=cfg.heterogeneity.stragglers, local_epochs=cfg.train.local_epochs,
                         straggler_work=cfg.heterogeneity.straggler_work)


AUTO_EVALUATE_UP_TO = 100  # cooperatives: train.evaluate_every = 0 evaluates every round up to here
AUTO_EVALUATE_EVERY = 10  # ... and every this many rounds beyond


def evaluation_interval(every: int, cooperatives: int) -> int:
    """``train.evaluate_every`` resolved: 0 means every round for small federations, every 5 for large ones."""
    if every > 0:
        return every
    return 1 if cooperatives <= AUTO_EVALUATE_UP_TO else AUTO_EVALUATE_EVERY


def evaluates_cooperatives(server_round: int, *, every: int, last_round: int) -> bool:
    """Whether the cooperatives evaluate the global model on their local test splits after this round.

    Every ``every`` rounds (``train.evaluate_every``, resolved by ``evaluation_interval``) and
    always after the last, so that a run's final fairness figures are measured however
    sparse the schedule.
    """
    return every <= 1 or server_round % every == 0 or server_round >= last_round


def training_seed(seed: int, server_round: int, cooperative: int) -> int:
    """The seed of one cooperative's local training in one round (batch order, DP-SGD's sampling)."""
    return seed * 1_000_003 + server_round * 1_009 + cooperative
