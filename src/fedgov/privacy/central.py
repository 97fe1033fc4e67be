"""Cooperative-level ("user-level") DP: Flower's fixed-clipping wrappers plus Opacus accounting.

Flower clips each cooperative's update (on the server or, with its client mod, on
the client) and adds Gaussian noise of std ``z * clip / cohort`` to the average.
What Flower does not track for us is the privacy spent over the run; that is
``user_level_epsilon`` (Opacus's RDP accountant, one step per round, sampling
rate = the cohort fraction). The fixed-size cohort is accounted as Poisson
sampling at the same rate, the usual approximation of DP-FedAvg (McMahan et al. 2018);
with every cooperative in every round (fraction 1) there is no amplification to
approximate. The noise is calibrated to an unweighted mean, so under this
mechanism every cooperative gets the same weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from ..config import Config
from . import UNIT_WEIGHT_KEY
from .accounting import default_delta, noise_for_target, user_level_epsilon

__all__ = ["CentralDP", "central_dp", "UNIT_WEIGHT_KEY"]


@dataclass(frozen=True)
class CentralDP:
    noise_multiplier: float
    clipping_norm: float
    cohort_size: int
    sample_rate: float
    delta: float
    side: str

    def epsilon_after(self, rounds: int) -> float:
        return user_level_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                                  rounds=rounds, delta=self.delta)

    def wrap(self, strategy: Strategy) -> Strategy:
        wrapper = (DifferentialPrivacyServerSideFixedClipping if self.side == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        return wrapper(strategy, noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm,
                       num_sampled_clients=self.cohort_size)


def central_dp(cfg: Config, *, cohort_size: int) -> CentralDP:
    """The mechanism for ``privacy.dp = 'user'``: noise from the config or sized for the target epsilon."""
    p = cfg.privacy
    population = cfg.data.num_cooperatives
    sample_rate = min(1.0, cohort_size / population)
    delta = p.delta or default_delta(population)
    noise = p.noise_multiplier or noise_for_target(target_epsilon=p.target_epsilon, delta=delta,
                                                   sample_rate=sample_rate, steps=cfg.train.rounds)
    return CentralDP(noise_multiplier=noise, clipping_norm=p.update_clip_norm, cohort_size=cohort_size,
                     sample_rate=sample_rate, delta=delta, side=p.clipping_side)
