"""Confidence intervals over seeds: mean and two-sided Student t interval (``scipy.stats.t``).

For ``n`` finite values with mean ``m`` and sample standard deviation ``s`` (ddof = 1),
the interval at ``level`` (default 95%) is ``m +- t((1 + level) / 2, n - 1) * s / sqrt(n)``.
With one value the interval is that value (no spread to estimate); with none, NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CI_LEVEL", "Interval", "confidence_interval", "student_t_quantile"]

CI_LEVEL = 0.95


def student_t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution, e.g. ``student_t_quantile(0.975, 2) == 4.3027...``."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    from scipy.stats import t  # imported here: scipy.stats takes a while, and --help needs none of it

    return float(t.ppf(q, df))


@dataclass(frozen=True)
class Interval:
    """Mean and two-sided Student t confidence interval of ``n`` values."""

    n: int
    mean: float
    low: float
    high: float
    std: float  # sample standard deviation (ddof = 1); 0 when n = 1

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def confidence_interval(values: Sequence[float | None], *, level: float = CI_LEVEL) -> Interval:
    """Mean +- t((1 + level) / 2, n - 1) * s / sqrt(n). With one value the interval is that value.

    Missing (None) and non-finite values are left out, not counted as zeros.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        nan = float("nan")
        return Interval(n=0, mean=nan, low=nan, high=nan, std=nan)
    mean = statistics.fmean(xs)
    if n == 1:
        return Interval(n=1, mean=mean, low=mean, high=mean, std=0.0)
    std = statistics.stdev(xs)
    half = student_t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n=n, mean=mean, low=mean - half, high=mean + half, std=std)
