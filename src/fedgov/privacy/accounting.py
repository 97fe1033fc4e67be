"""Privacy accounting with Opacus's RDP accountant, over the whole run, not one round."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = ["RoundSpend", "PrivacyLedger", "default_delta", "epsilon_of", "noise_for_target",
           "user_level_epsilon"]


def default_delta(n: int) -> float:
    """Below 1/n, as DP for n records requires: 1/(10 n)."""
    return 1.0 / (10 * max(n, 1))


@dataclass(frozen=True)
class RoundSpend:
    """One round of a Gaussian mechanism: noise multiplier, sampling rate and number of steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _merged(spends: list[RoundSpend]) -> list[RoundSpend]:
    """RDP composes linearly in steps: rounds with the same mechanism collapse into one entry."""
    steps: dict[tuple[float, float], int] = {}
    for s in spends:
        if s.steps > 0:
            key = (s.noise_multiplier, s.sample_rate)
            steps[key] = steps.get(key, 0) + s.steps
    return [RoundSpend(z, q, n) for (z, q), n in steps.items()]


def epsilon_of(spends: list[RoundSpend], *, delta: float) -> float:
    """Epsilon of a sequence of subsampled Gaussian steps (RDP composition)."""
    spends = _merged(spends)
    if not spends:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in spends]
    return float(accountant.get_epsilon(delta=delta))


def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose run of ``steps`` steps stays within ``target_epsilon``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))


def user_level_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Cooperative-level DP of central noise on clipped updates: one step per round, sampled cohorts."""
    return epsilon_of([RoundSpend(noise_multiplier, sample_rate, rounds)], delta=delta)


@dataclass
class PrivacyLedger:
    """A cooperative's privacy spending, kept across rounds (in Flower's ``context.state``)."""

    delta: float
    budget: float  # epsilon the cooperative agreed to spend over the run (inf: no cap)
    spends: list[RoundSpend] = field(default_factory=list)
    noise_multiplier: float = 0.0  # derived once from the target, then fixed for the run

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.spends, delta=self.delta)

    def epsilon_after(self, spend: RoundSpend) -> float:
        return epsilon_of([*self.spends, spend], delta=self.delta)

    def record(self, spend: RoundSpend) -> None:
        self.spends.append(spend)

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "budget": self.budget, "noise_multiplier": self.noise_multiplier,
                           "spends": [asdict(s) for s in self.spends]})

    @staticmethod
    def from_json(text: str) -> PrivacyLedger:
        raw = json.loads(text)
        return PrivacyLedger(delta=raw["delta"], budget=raw["budget"], noise_multiplier=raw["noise_multiplier"],
                             spends=[RoundSpend(**s) for s in raw["spends"]])
