"""Compute sovereignty: cooperatives with unequal compute, and a round deadline.

Time here is *simulated*: a cooperative's local training takes
``steps * heterogeneity.step_seconds / speed`` seconds, whatever the machine running
the simulation. That keeps results deterministic (a seed fixes who misses which
round) and lets one laptop stand in for a federation of data centres and clinics.
A cooperative that cannot finish before ``heterogeneity.deadline`` does not train and
misses the round, as it would if the aggregator closed the round on time (the deadline mod,
``fedgov.behaviours``).
"""

from __future__ import annotations

import math

import numpy as np

from .config import HeterogeneityConfig, parse_tiers

__all__ = ["compute_speeds", "local_steps", "misses_deadline", "parse_tiers", "simulated_seconds"]


def compute_speeds(cfg: HeterogeneityConfig, num_cooperatives: int, *, seed: int) -> np.ndarray:
    """Relative compute speed of each cooperative (1.0 = the reference machine)."""
    if cfg.compute == "off":
        return np.ones(num_cooperatives)
    rng = np.random.default_rng([seed, 0xC0417])
    if cfg.compute == "lognormal":
        return np.exp(rng.normal(0.0, cfg.sigma, size=num_cooperatives))
    tiers = parse_tiers(cfg.tiers)
    order = rng.permutation(num_cooperatives)
    speeds = np.empty(num_cooperatives)
    for position, coop in enumerate(order):  # deal cooperatives to tiers, so tiers are (nearly) equal in size
        speeds[coop] = tiers[position % len(tiers)]
    return speeds


def local_steps(*, num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round of local training."""
    return math.ceil(num_examples / batch_size) * epochs


def simulated_seconds(*, steps: int, speed: float, step_seconds: float) -> float:
    return steps * step_seconds / speed


def misses_deadline(cfg: HeterogeneityConfig, *, steps: int, speed: float) -> float | None:
    """The simulated seconds needed when they exceed the deadline, else None."""
    if cfg.deadline <= 0:
        return None
    needed = simulated_seconds(steps=steps, speed=speed, step_seconds=cfg.step_seconds)
    return needed if needed > cfg.deadline else None
