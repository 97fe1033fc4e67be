"""What every benchmark suite shares: the context it runs in, timing, and row conventions.

A suite is a module ``fedgov.bench.suites.<name>`` with three functions::

    def run(spec: dict, ctx: BenchContext) -> list[dict]      # measure; one row per measurement
    def figures(rows: list[dict], out: Path) -> list[Path]     # PNGs drawn from saved rows only
    def report(rows: list[dict]) -> str                        # a Markdown section for report.md

``spec`` is the suite's table from ``benchmarks/<name>.toml`` (with its ``[quick]``
table merged in under ``--quick``). Rows are flat dicts of JSON scalars; the harness
adds ``suite`` and writes them to results.json / results.csv. A suite may reuse
rows of a suite run earlier in the same invocation, or kept from an earlier one
by the same code (``ctx.rows``; never rows of a suite marked stale), instead of
measuring the same thing twice, but must measure it itself when they are absent.
"""

from __future__ import annotations

import gc
import importlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchContext", "Timing", "fit_power_law", "fmt", "percentile", "suite_module", "time_call",
           "time_paired"]


def suite_module(name: str) -> Any:
    """The module ``fedgov.bench.suites.<name>`` (looked up through here, so tests can stand in for it)."""
    return importlib.import_module(f"fedgov.bench.suites.{name}")


@dataclass
class BenchContext:
    """Where and how a suite runs."""

    quick: bool
    device: str  # "cpu" or "cuda": where training runs; HE always runs on the CPU
    out: Path  # the results folder (suites may keep scratch files under out / "work")
    machine: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda message: None  # one short line: what is being measured now
    rows: list[dict[str, Any]] = field(default_factory=list)  # rows of the suites already there, by this code

    def step(self, message: str) -> None:
        self.progress(message)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls (warm-up calls excluded)."""

    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def p(self, q: float) -> float:
        return percentile(self.samples, q)


def time_call(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> Timing:
    """Time ``fn()`` ``repeat`` times (more if ``min_seconds`` of samples are wanted) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeat or (time.perf_counter() - started < min_seconds and len(samples) < 100_000):
        samples.append(_timed(fn))
    return Timing(tuple(samples))


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call, with the garbage collector paused so a collection does not land in it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def time_paired(a: Callable[[], Any], b: Callable[[], Any], *, repeat: int = 5, warmup: int = 1,
                min_seconds: float = 0.0) -> tuple[Timing, Timing]:
    """Time ``a`` and ``b`` alternately, so that a slow spell of a shared machine hits both alike."""
    for _ in range(warmup):
        a()
        b()
    sa: list[float] = []
    sb: list[float] = []
    started = time.perf_counter()
    while len(sa) < repeat or (time.perf_counter() - started < min_seconds and len(sa) < 100_000):
        sa.append(_timed(a))
        sb.append(_timed(b))
    return Timing(tuple(sa)), Timing(tuple(sb))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fit_power_law(xs: Iterable[float], ys: Iterable[float]) -> tuple[float, float]:
    """Least-squares fit of log y = log a + b log x: returns (b, a), the exponent and the factor."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pairs) < 2:
        return math.nan, math.nan
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    if sxx == 0:
        return math.nan, math.nan
    b = sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx
    return b, math.exp(my - b * mx)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a report table: ``digits`` significant digits, ``-`` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
