"""Who votes, with what: members as a registrar sees them, and each one's stake.

A DAO that weights by tokens, by data or one-member-one-vote has to decide first who a
member is. Without anyone checking, an actor may register many identities (sybils); a
**registrar** -- a party outside the federation -- can verify identities and merge the ones
it sees through into their actor, at the price of holding the power to admit members.

* :func:`verify_identities`: which sybil identities a registrar catches, each with
  probability ``catch`` (a seeded draw per identity, once per run, as a registration is).
* :func:`unpaid_identities`: the second model of a registrar: it checks nothing but charges a
  fee per identity, and an actor registers only the identities its budget pays for; the data
  behind the rest counts under the identities it did register.
* :func:`draw_stakes`: each actor's stake (Pareto, independent of its data; or its data
  size), shared equally by its identities -- tokens can be split between wallets, not copied.
* :class:`Electorate`: the weighting policy applied to members after the merge. A merged
  member counts once: its weight is the policy's weight of the member's total size (or
  stake), shared among its identities in the round in proportion to their own.

``fedgov.strategies`` (plaintext and HE rounds) weight through an :class:`Electorate`;
``fedgov.server_app`` builds it with :func:`electorate_for`. ``fedgov.floor`` refuses stake
and registrar runs: it weights every identity by its size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from .weighting import policy_weights

if TYPE_CHECKING:
    from ..config import GovernanceConfig

__all__ = ["Electorate", "draw_stakes", "electorate_for", "registrar_record", "unpaid_identities", "verify_identities"]

_REGISTRAR_TAG = 0x5E61
_STAKE_TAG = 0x57AE


def verify_identities(actors: Sequence[int], *, catch: float, seed: int) -> dict[int, int]:
    """The identities a registrar sees through: identity -> the actor it is merged into.

    ``actors[c]`` is the actor behind identity ``c`` (simulation ground truth; an honest
    member is its own actor). Each identity run by another actor is caught with probability
    ``catch``, independently, from a generator seeded by ``seed`` alone: one draw per
    identity in id order, so the same run catches the same identities whatever else changes.
    """
    if not 0.0 <= catch <= 1.0:
        raise ValueError(f"governance.registrar_catch must be in [0, 1]; got {catch}")
    rng = np.random.default_rng([seed, _REGISTRAR_TAG])
    draws = rng.random(len(actors))
    return {c: int(a) for c, a in enumerate(actors) if a != c and draws[c] < catch}


def unpaid_identities(actors: Sequence[int], *, fee: float, budget: float) -> dict[int, int]:
    """The identities an actor could not pay a registrar's ``fee`` for: identity -> its actor.

    Every actor pays the fee for its own identity (an honest member registers once). An actor
    behind several identities pays from ``budget`` for them in id order, its own first, and
    registers ``floor(budget / fee)`` in all, at least its own; the others are not separate
    members, so they are merged into their actor as a caught sybil is. ``fee = 0`` charges
    nothing and merges nothing. The division is done on the decimals the config wrote, so a
    budget of 1 at a fee of 0.1 pays for 10 identities (binary floats would give ``1.0 // 0.1 == 9``).
    """
    if fee < 0 or budget < 0:
        raise ValueError(f"a registrar's fee and an actor's budget cannot be negative; got {fee} and {budget}")
    if fee == 0:
        return {}
    affordable = max(1, math.floor(Fraction(repr(float(budget))) / Fraction(repr(float(fee)))))
    registered: dict[int, int] = {}
    unpaid: dict[int, int] = {}
    for c in sorted(range(len(actors)), key=lambda c: (actors[c] != c, c)):  # each actor's own identity first
        actor = int(actors[c])
        if registered.get(actor, 0) < affordable:
            registered[actor] = registered.get(actor, 0) + 1
        else:
            unpaid[c] = actor
    return unpaid


def draw_stakes(actors: Sequence[int], *, kind: str, shape: float, seed: int,
                sizes: Sequence[float] | None = None) -> dict[int, float]:
    """Each identity's stake: its actor's stake shared equally among the actor's identities.

    * ``pareto``: actor stakes are Pareto(``shape``) with scale 1 (``(1 - U) ** (-1 / shape)``),
      drawn from ``seed`` in actor order, independent of the data. Shape 1.16 is the 80/20
      rule; below 1 the mean is infinite and a few actors hold nearly everything.
    * ``size``: an actor's stake is its data (``sizes``, the actor's identities summed).
    """
    identities: dict[int, list[int]] = {}
    for c, a in enumerate(actors):
        identities.setdefault(int(a), []).append(c)
    if kind == "pareto":
        if not shape > 0:
            raise ValueError(f"governance.stake_shape must be positive; got {shape}")
        u = np.random.default_rng([seed, _STAKE_TAG]).random(len(actors))
        actor_stake = {a: float((1.0 - u[a]) ** (-1.0 / shape)) for a in identities}
    elif kind == "size":
        if sizes is None or len(sizes) != len(actors):
            raise ValueError("stakes equal to data size need every identity's size")
        actor_stake = {a: float(sum(sizes[c] for c in ids)) for a, ids in identities.items()}
    else:
        raise ValueError(f"unknown stake distribution {kind!r}; choose pareto or size")
    return {c: actor_stake[a] / len(ids) for a, ids in identities.items() for c in ids}


@dataclass(frozen=True)
class Electorate:
    """The weighting policy over members: ``weights(claimed)`` for the identities of a round.

    ``merged`` maps identities a registrar caught to the member they count as (see the module
    docstring); ``stakes`` is each identity's stake, used by ``policy = "stake"``.
    """

    policy: str = "samples"
    cap: float = 1.0
    stakes: Mapping[int, float] = field(default_factory=dict)
    merged: Mapping[int, int] = field(default_factory=dict)
    unpaid: Mapping[int, int] = field(default_factory=dict)  # the part of ``merged`` no fee was paid for

    def __post_init__(self) -> None:
        if self.policy == "stake" and not self.stakes:
            raise ValueError("weighting = 'stake' needs each member's stake")

    def weights(self, claimed: Mapping[int, float]) -> dict[int, float]:
        """Normalised weights by identity, from the identities' claimed data sizes.

        Without merged identities this is :func:`policy_weights` of the claimed sizes (or of
        the stakes). A merged member's identities share the weight of one member of their
        summed size (or stake), each in proportion to its own; under ``samples`` (and stakes)
        merging therefore changes nothing, under ``equal`` it turns k identities into one vote.
        """
        if not claimed:
            return {}
        ids = sorted(claimed)
        if self.policy == "stake":
            missing = [c for c in ids if c not in self.stakes]
            if missing:
                raise ValueError(f"no stake recorded for cooperative {missing[0]}")
            values = {c: float(self.stakes[c]) for c in ids}
            policy = "samples"  # proportional to the stake
        else:
            values = {c: float(claimed[c]) for c in ids}
            policy = self.policy
        members: dict[int, list[int]] = {}
        for c in ids:
            members.setdefault(self.merged.get(c, c), []).append(c)
        order = sorted(members)
        totals = [sum(values[c] for c in members[m]) for m in order]
        member_weights = policy_weights(policy, totals, cap=self.cap)
        out: dict[int, float] = {}
        for m, total, weight in zip(order, totals, member_weights):
            for c in members[m]:
                share = values[c] / total if total > 0 else 1.0 / len(members[m])
                out[c] = float(weight) * share
        return out


def electorate_for(cfg: GovernanceConfig, actors: Sequence[int], *, seed: int,
                   sizes: Sequence[float]) -> Electorate:
    """The run's electorate: its policy, the stakes it needs, and what its registrar caught.

    ``actors`` is the ground truth behind each identity (an honest member: itself) and
    ``sizes`` each identity's number of training examples.
    """
    merged: dict[int, int] = {}
    unpaid: dict[int, int] = {}
    if cfg.registrar.strip():
        unpaid = unpaid_identities(actors, fee=cfg.registrar_fee, budget=cfg.identity_budget)
        merged.update(unpaid)
        if cfg.registrar_catch > 0:  # of the identities paid for, it sees through each sybil with p
            caught = verify_identities(actors, catch=cfg.registrar_catch, seed=seed)
            merged.update({c: a for c, a in caught.items() if c not in merged})
    stakes = (draw_stakes(actors, kind=cfg.stake, shape=cfg.stake_shape, seed=seed, sizes=sizes)
              if cfg.weighting == "stake" else {})
    return Electorate(policy=cfg.weighting, cap=cfg.cap, stakes=stakes, merged=merged, unpaid=unpaid)


def registrar_record(cfg: GovernanceConfig, electorate: Electorate, actors: Sequence[int]) -> dict[str, Any] | None:
    """What the audit log says about the registrar: who it is, what it checked, whom it merged."""
    if not cfg.registrar.strip():
        return None
    return {
        "name": cfg.registrar,
        "power": "admits members: decides which identities count as separate members before weighting",
        "catch_probability": cfg.registrar_catch,
        "fee_per_identity": cfg.registrar_fee,
        "identity_budget": cfg.identity_budget,
        "identities_checked": len(actors),
        "merged": {str(c): a for c, a in sorted(electorate.merged.items())},
        "unpaid": [str(c) for c in sorted(electorate.unpaid)],
    }
