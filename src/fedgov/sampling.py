"""Which cooperatives train in a round: a seeded draw, shared by the Flower run and the engine-free floor."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .config import cohort_size

__all__ = ["CohortSampler", "training_seed"]


class CohortSampler:
    """Seeded choice of which cooperatives train in a round (independent of node ids)."""

    def __init__(self, *, seed: int, fraction: float) -> None:
        self.seed = seed
        self.fraction = fraction

    def sample(self, server_round: int, cooperative_ids: Iterable[int]) -> list[int]:
        ids = sorted(cooperative_ids)
        size = cohort_size(self.fraction, len(ids))
        if size >= len(ids):
            return ids
        rng = np.random.default_rng([self.seed, server_round])
        return sorted(int(i) for i in rng.choice(ids, size=size, replace=False))


def training_seed(seed: int, server_round: int, cooperative: int) -> int:
    """The seed of one cooperative's local training in one round (batch order, DP-SGD's sampling)."""
    return seed * 1_000_003 + server_round * 1_009 + cooperative
