"""Who counts how much: aggregation-weight policies and how concentrated the result is.

FedAvg weights each cooperative by its (claimed) number of examples, so one large
cooperative -- a "whale" -- can outvote all the others put together. The policies here
trade that off against one-cooperative-one-vote, and :func:`influence` measures the
concentration that a set of weights leaves, so runs with different policies can be
compared on governance as well as on accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "INFLUENCE_KEYS",
    "WEIGHTING_POLICIES",
    "influence",
    "mean_influence",
    "policy_weights",
]

WEIGHTING_POLICIES = ("samples", "equal", "sqrt", "capped")
INFLUENCE_KEYS = ("nakamoto", "gini", "hhi", "max_weight")

# Cumulative weights within this of one half count as exactly one half (not a majority),
# so that e.g. ten weights of 0.1 need six cooperatives whatever the rounding.
_HALF_TOL = 1e-12


def _as_nonnegative(values: Sequence[float], *, what: str) -> np.ndarray:
    """A 1-D float64 copy of ``values``, refusing what would make the weights meaningless."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat list of numbers; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: there must be at least one cooperative")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite numbers; got {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"{what} must not be negative; got {arr.tolist()}")
    if not np.any(arr > 0):
        raise ValueError(f"{what} are all zero: there is nothing to weight by")
    return arr


def _capped(sizes: np.ndarray, cap: float) -> np.ndarray:
    """Water-filling: proportional to size, no weight above ``cap``, excess spread over the rest."""
    n = sizes.size
    if cap * n < 1.0:
        # n weights of at most cap cannot sum to 1; equal weights are the closest feasible point.
        return np.full(n, 1.0 / n)
    weights = np.zeros(n)
    fixed = np.zeros(n, dtype=bool)  # cooperatives pinned at the cap
    while True:
        free = ~fixed
        remaining = 1.0 - cap * fixed.sum()
        free_total = sizes[free].sum()
        if free_total > 0:
            weights[free] = remaining * sizes[free] / free_total
        else:
            # Only zero-size cooperatives are left: proportional sharing is undefined, so they
            # share the remainder equally (at most cap each, since cap * n >= 1).
            weights[free] = remaining / free.sum()
        weights[fixed] = cap
        over = free & (weights > cap)
        if not over.any():
            return weights
        fixed |= over  # each pass pins at least one more, so this ends within n passes


def policy_weights(policy: str, sizes: Sequence[float], *, cap: float = 1.0) -> np.ndarray:
    """Normalised aggregation weights (sum 1, float64) for cooperatives with (claimed) ``sizes``.

    * ``samples``: proportional to size (FedAvg) -- the data decides, so whales dominate.
    * ``equal``: one cooperative, one vote -- size does not matter.
    * ``sqrt``: proportional to sqrt(size), as in quadratic voting -- more data still
      counts, but with diminishing returns.
    * ``capped``: proportional to size, but no cooperative above ``cap`` of the total; the
      excess is redistributed proportionally among the others (water-filling, repeated
      until no weight exceeds ``cap``). If ``cap * len(sizes) < 1`` no weights can meet the
      cap, and the result is equal weights, the closest feasible point. If only zero-size
      cooperatives are left below the cap they share the remainder equally.

    ``cap`` is used only by ``capped`` and must be in (0, 1] there (1 = plain ``samples``).
    Raises ``ValueError`` for an unknown policy, or empty, negative, non-finite or all-zero
    sizes (all-zero for every policy: nobody claiming any data is a bug upstream).
    """
    if policy not in WEIGHTING_POLICIES:
        raise ValueError(
            f"unknown weighting policy {policy!r}; choose one of {', '.join(WEIGHTING_POLICIES)}"
        )
    arr = _as_nonnegative(sizes, what="cooperative sizes")
    if policy == "samples":
        return arr / arr.sum()
    if policy == "equal":
        return np.full(arr.size, 1.0 / arr.size)
    if policy == "sqrt":
        root = np.sqrt(arr)
        return root / root.sum()
    cap = float(cap)
    if not (math.isfinite(cap) and 0.0 < cap <= 1.0):
        raise ValueError(f"the weight cap must be a fraction in (0, 1]; got {cap}")
    return _capped(arr, cap)


def influence(weights: Sequence[float]) -> dict[str, float]:
    """How concentrated aggregation weights are (normalised to sum 1 first).

    * ``nakamoto``: the fewest cooperatives whose weights together are *more* than one half
      (an int), i.e. how many must collude to outvote everyone else. Exactly one half is not
      a majority (sums within 1e-12 of a half count as a half): four equal weights give 3.
    * ``gini``: Gini coefficient of the weights, 0 when all are equal, (n-1)/n for a monopoly.
    * ``hhi``: Herfindahl-Hirschman index sum(w_i^2): 1/n when equal, 1 for a monopoly.
    * ``max_weight``: the largest weight.

    A single cooperative gives nakamoto 1, gini 0, hhi 1, max_weight 1. Zero weights count as
    cooperatives (they raise the Gini coefficient). Raises ``ValueError`` for empty, negative,
    non-finite or all-zero weights.
    """
    w = _as_nonnegative(weights, what="weights")
    w = w / w.sum()
    n = w.size
    descending = np.sort(w)[::-1]
    cumulative = np.cumsum(descending)
    majority = np.nonzero(cumulative > 0.5 + _HALF_TOL)[0]
    nakamoto = int(majority[0]) + 1 if majority.size else n
    ascending = descending[::-1]
    ranks = np.arange(1, n + 1)
    gini = float(2.0 * np.dot(ranks, ascending) / n - (n + 1) / n)
    return {
        "nakamoto": nakamoto,
        "gini": max(gini, 0.0),  # rounding can give -1e-17 for equal weights
        "hhi": float(np.dot(w, w)),
        "max_weight": float(descending[0]),
    }


def mean_influence(rounds: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """The average of each influence measure over rounds (e.g. over a run), for one summary row.

    Keys are :data:`INFLUENCE_KEYS` followed by any others the rounds have; each is averaged
    over the rounds that have it (and not None). A key no round has, or every key when there
    are no rounds, is None.
    """
    keys = list(INFLUENCE_KEYS)
    for row in rounds:
        keys.extend(k for k in row if k not in keys)
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(row[key]) for row in rounds if row.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
