"""``python -m fedgov.experiment FILE``: sweep a grid of configs over several seeds and aggregate.

An experiment file holds one ``[experiment]`` table::

    [experiment]
    name = "heterogeneity"            # output folder name (default: the file's stem)
    description = "..."
    base = "../configs/default.toml"  # relative to THIS file (absolute paths work too)
    seeds = [0, 1, 2]                 # or a count: seeds = 3 means [0, 1, 2]
    metrics = ["final_accuracy", "fairness.worst"]   # dotted paths into summary.json

    [experiment.overrides]            # optional, applied to every run
    "train.rounds" = 20

    [experiment.grid]                 # dotted config keys -> lists; runs their cartesian product
    "data.alpha" = [0.1, 0.5, 1.0, 100.0]

    [experiment.variants]             # optional named override sets, in order (an axis "variant")
    none = {}
    "dp-eps3" = { "privacy.dp" = "sample", "privacy.target_epsilon" = 3.0 }
    he = { "secure.aggregation" = "he" }

With variants the grid is optional; with both, every variant runs at every grid
point. A variant and the grid may not set the same key.

    [experiment.plot]                 # optional
    x = "data.alpha"                  # a grid key (default: the first)
    series = "strategy.name"          # optional grid key: one line per value
    y = ["final_accuracy"]            # metrics to draw, one panel each (default: all)
    xscale = "log"                    # or "linear"
    ylog = ["bytes_per_round"]        # panels drawn with a log y axis
    title = "..."
    labels = { "data.alpha" = "Dirichlet alpha" }   # display names for keys and metrics
    rounds = ["attack.success_rate_by_round"]        # optional: per-round lists in summary.json,
                                                     # drawn over rounds (rounds.csv, figure_rounds.png)

Every (grid point, seed) runs ``python -m fedgov.simulate`` in its own process, so
each run gets a fresh Ray. Results go to ``<folder of FILE>/results/<name>/``:
``points/<point>/seed-<s>/`` (the run directories), ``runs.csv``, ``results.csv``
(mean and 95% Student t interval per grid point), ``figure.png`` and
``experiment.json``. Running the same command again skips runs whose
``summary.json`` exists for the same config, continues interrupted runs from
their checkpoint, and starts the rest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .results import atomic_write_text, read_json, write_json

import tomllib

__all__ = [
    "Experiment",
    "ExperimentError",
    "Interval",
    "Job",
    "RunResult",
    "confidence_interval",
    "expand_grid",
    "load_experiment",
    "main",
    "run_experiment",
    "student_t_quantile",
]

# Numeric paths of summary.json that can be aggregated (tests check they exist in a real summary).
SUMMARY_METRICS = (
    "final_accuracy", "final_loss", "rounds", "wall_seconds", "bytes_up", "bytes_down",
    "seconds_per_round", "bytes_per_round",
    "fairness.worst", "fairness.mean", "fairness.best", "fairness.std", "model.num_parameters",
    "influence.nakamoto", "influence.gini", "influence.hhi", "influence.max_weight",
)
# Present only in runs that use the mechanism (empty cells elsewhere).
MECHANISM_METRICS = (
    "privacy.max_epsilon",  # dp = "sample": the largest cooperative epsilon
    "privacy.epsilon",  # dp = "user"
    "secure_aggregation.bytes_per_param",
    "secure_aggregation.max_abs_error",
    "influence.applied.max_weight",  # HE: the weights clients applied inside their ciphertexts
    "influence.applied.nakamoto",
    "influence.applied_weight_sum",
    "attack.success_rate",  # attack.kind != "off" (or a size_claim)
    "attack.recorded_weight",  # the attackers' share of the weights in the audit log
    "attack.effective_weight",  # ... and of what was really applied (differs under HE)
    "compute.slowest_participation",  # heterogeneity.compute != "off" or a deadline
    "compute.slowest_accuracy",
    "compute.others_participation",
    "compute.others_accuracy",
    "compute.missed",
)
VARIANT_AXIS = "variant"
# Keys the experiment sets itself, per run.
RESERVED_KEYS = ("seed", "runtime.out")
CI_LEVEL = 0.95
STDERR_TAIL_LINES = 15
QUICK_ROUNDS = 2
QUICK_COOPERATIVES = 3


class ExperimentError(ValueError):
    """A problem with an experiment file, phrased as one line naming the file and key."""


# ---- statistics -----------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function, modified Lentz (Numerical Recipes 6.4).
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution, e.g. ``student_t_quantile(0.975, 2) == 4.3027...``.

    Written out (bisection on the exact CDF) because scipy is not a fedgov dependency.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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


def confidence_interval(values: Sequence[float], *, level: float = CI_LEVEL) -> Interval:
    """Mean +- t((1 + level) / 2, n - 1) * s / sqrt(n). With one value the interval is that value."""
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


# ---- the experiment file ---------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One grid point: its id (a folder name) and the grid values as the Config holds them."""

    id: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    description: str
    base_path: Path
    base: Config  # the base config with the overrides applied
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]
    plot: dict[str, Any]
    points: tuple[Point, ...] = field(default=())
    text: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> overrides, in file order

    @property
    def axes(self) -> dict[str, list[Any]]:
        """What tells the points apart: ``variant`` (when there are variants), then the grid keys."""
        return {**({VARIANT_AXIS: list(self.variants)} if self.variants else {}), **self.grid}

    def config_for(self, point: Point) -> Config:
        values = dict(point.values)
        variant = values.pop(VARIANT_AXIS, None)
        return self.base.replace(**(self.variants[variant] if variant is not None else {}), **values)

    def default_out(self, *, quick: bool = False) -> Path:
        return self.path.parent / "results" / (f"{self.name}-quick" if quick else self.name)


_EXPERIMENT_KEYS = ("name", "description", "base", "seeds", "metrics", "overrides", "grid", "variants", "plot")
_PLOT_KEYS = ("x", "series", "y", "xscale", "ylog", "title", "labels", "rounds")


def _flat_table(value: Any, where: str, *, leaves: type | tuple[type, ...] | None = None) -> dict[str, Any]:
    """``{"data": {"alpha": 1}}`` and ``{"data.alpha": 1}`` both -> ``{"data.alpha": 1}``."""
    if not isinstance(value, dict):
        raise ExperimentError(f"{where}: expected a table, got {type(value).__name__}")
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, item in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(item, dict):
                walk(item, f"{dotted}.")
                continue
            if dotted in out:
                raise ExperimentError(f"{where}.{dotted}: given twice")
            out[dotted] = item

    walk(value, "")
    return out


def _strip_source(message: str) -> str:
    # Config.replace phrases errors as "override: KEY: ..."; the experiment names its own source.
    return message.removeprefix("override: ")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    return str(value)


def point_id(values: Mapping[str, Any]) -> str:
    """A readable folder name such as ``data.alpha=0.1``.

    Named by value, not by index, so adding values to a grid keeps the finished runs' folders.
    """
    text = "__".join(f"{k}={_format_value(v)}" for k, v in values.items()) or "base"
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    if safe != text or len(safe) > 100:  # keep lossy or long names unique
        digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
        safe = f"{safe[:90]}-{digest}"
    return safe


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in file order: the last key varies fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ExperimentError(f"{where}: a count of seeds must be >= 1, got {value}")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        raise ExperimentError(f"{where}: expected a non-empty list of seeds or a count, got {value!r}")
    for s in value:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ExperimentError(f"{where}: seeds must be integers >= 0, got {s!r}")
    if len(set(value)) != len(value):
        raise ExperimentError(f"{where}: a seed is listed twice")
    return tuple(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ExperimentError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _metrics(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ExperimentError(f"{where}: expected a non-empty list of metric names")
    for m in value:
        if m not in SUMMARY_METRICS + MECHANISM_METRICS:
            raise ExperimentError(f"{where}: {m!r} is not a summary.json metric "
                                  f"(one of {', '.join(SUMMARY_METRICS + MECHANISM_METRICS)})")
    if len(set(value)) != len(value):
        raise ExperimentError(f"{where}: a metric is listed twice")
    return tuple(value)


def _plot_spec(raw: Any, *, where: str, grid: Mapping[str, list[Any]], metrics: tuple[str, ...],
               title: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: expected a table, got {type(raw).__name__}")
    for key in raw:
        if key not in _PLOT_KEYS:
            raise ExperimentError(f"{where}.{key}: unknown key (one of {', '.join(_PLOT_KEYS)})")
    keys = list(grid)
    x = _str(raw.get("x", keys[0]), f"{where}.x")
    if x not in grid:
        raise ExperimentError(f"{where}.x: {x!r} is not a grid key ({', '.join(keys)})")
    series = raw.get("series")
    if series is not None:
        series = _str(series, f"{where}.series")
        if series not in grid or series == x:
            raise ExperimentError(f"{where}.series: {series!r} is not a grid key other than x")
    for key in keys:  # every other grid key must be fixed, or points would pile up on one x
        if key not in (x, series) and len(grid[key]) > 1:
            raise ExperimentError(f"{where}: grid key {key!r} has {len(grid[key])} values but is "
                                  f"neither plot.x nor plot.series")
    y = raw.get("y", list(metrics))
    if not isinstance(y, list) or not y:
        raise ExperimentError(f"{where}.y: expected a non-empty list of metrics")
    for m in y:
        if m not in metrics:
            raise ExperimentError(f"{where}.y: {m!r} is not one of experiment.metrics")
    xscale = raw.get("xscale", "linear")
    if xscale not in ("linear", "log"):
        raise ExperimentError(f"{where}.xscale: {xscale!r} is not one of linear, log")
    if xscale == "log" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                   for v in grid[x]):
        raise ExperimentError(f"{where}.xscale: 'log' needs positive numbers in grid key {x!r}")
    ylog = raw.get("ylog", [])
    if not isinstance(ylog, list) or any(m not in y for m in ylog):
        raise ExperimentError(f"{where}.ylog: expected a list of metrics drawn in plot.y")
    labels = _flat_table(raw.get("labels", {}), f"{where}.labels")
    for key, label in labels.items():
        if key not in grid and key not in metrics and key not in raw.get("rounds", []):
            raise ExperimentError(f"{where}.labels.{key}: not a grid key or metric")
        _str(label, f"{where}.labels.{key}")
    rounds = raw.get("rounds", [])
    if not isinstance(rounds, list) or not all(isinstance(m, str) and m for m in rounds):
        raise ExperimentError(f"{where}.rounds: expected a list of per-round summary paths")
    return {"x": x, "series": series, "y": list(y), "xscale": xscale, "ylog": list(ylog),
            "title": _str(raw.get("title", title), f"{where}.title"), "labels": labels, "rounds": list(rounds)}


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every grid point is built as a Config."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not valid TOML ({exc})") from None
    for key in raw:
        if key != "experiment":
            raise ExperimentError(f"{path}: {key}: unknown key (an experiment file holds one [experiment] table)")
    if not isinstance(raw.get("experiment"), dict):
        raise ExperimentError(f"{path}: experiment: missing [experiment] table")
    exp = raw["experiment"]
    where = f"{path}: experiment"
    for key in exp:
        if key not in _EXPERIMENT_KEYS:
            raise ExperimentError(f"{where}.{key}: unknown key (one of {', '.join(_EXPERIMENT_KEYS)})")

    name = _str(exp.get("name", path.stem), f"{where}.name")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ExperimentError(f"{where}.name: {name!r} must be a folder name (letters, digits, . _ -)")
    description = _str(exp.get("description", ""), f"{where}.description")
    if "base" not in exp:
        raise ExperimentError(f"{where}.base: required (a config TOML, relative to {path.name})")
    base_path = path.parent / _str(exp["base"], f"{where}.base")
    if "seeds" not in exp:
        raise ExperimentError(f"{where}.seeds: required (a list of seeds or a count)")
    seeds = _seeds(exp["seeds"], f"{where}.seeds")
    if "metrics" not in exp:
        raise ExperimentError(f"{where}.metrics: required (e.g. [\"final_accuracy\", \"fairness.worst\"])")
    metrics = _metrics(exp["metrics"], f"{where}.metrics")

    try:
        base = load_config(base_path)
    except ConfigError as exc:
        raise ExperimentError(f"{where}.base: {exc}") from None

    overrides = _flat_table(exp.get("overrides", {}), f"{where}.overrides")
    for key in overrides:
        if key in RESERVED_KEYS:
            raise ExperimentError(f"{where}.overrides.{key}: set by the experiment itself "
                                  f"(use experiment.seeds and --out)")
    try:
        base = base.replace(**overrides)
    except ConfigError as exc:
        raise ExperimentError(f"{where}.overrides: {_strip_source(str(exc))}") from None

    variants = _variants(exp.get("variants", {}), f"{where}.variants", base)
    if "grid" not in exp and not variants:
        raise ExperimentError(f"{where}.grid: required (dotted config keys -> lists of values), "
                              f"unless experiment.variants names override sets")
    grid = _flat_table(exp.get("grid", {}), f"{where}.grid")
    if not grid and not variants:
        raise ExperimentError(f"{where}.grid: empty (give at least one key with a list of values)")
    normalized: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if key in RESERVED_KEYS:
            raise ExperimentError(f"{where}.grid.{key}: set by the experiment itself (use experiment.seeds)")
        for variant, chosen in variants.items():
            if key in chosen:
                raise ExperimentError(f"{where}.grid.{key}: also set by variant {variant!r}; "
                                      f"set each key in the grid or in the variants, not both")
        if not isinstance(values, list) or not values:
            raise ExperimentError(f"{where}.grid.{key}: expected a non-empty list of values")
        normalized[key] = []
        for value in values:
            try:  # one key at a time, so a bad value names its key
                cfg = base.replace(**{key: value})
            except ConfigError as exc:
                raise ExperimentError(f"{where}.grid: {_strip_source(str(exc))}") from None
            normalized[key].append(cfg.to_flat()[key])  # e.g. 100 -> 100.0 for a float key
        if len(set(map(repr, normalized[key]))) != len(values):
            raise ExperimentError(f"{where}.grid.{key}: a value is listed twice")

    axes = {**({VARIANT_AXIS: list(variants)} if variants else {}), **normalized}
    points = []
    for values in expand_grid(axes):
        point = Point(id=point_id(values), values=values)
        try:  # combinations can still clash (cross-key checks such as cnn needing digits)
            chosen = dict(values)
            variant = chosen.pop(VARIANT_AXIS, None)
            base.replace(**(variants[variant] if variant is not None else {}), **chosen)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={_format_value(v)}" for k, v in values.items())
            raise ExperimentError(f"{where}.grid: point {shown}: {_strip_source(str(exc))}") from None
        points.append(point)

    plot = _plot_spec(exp.get("plot", {}), where=f"{where}.plot", grid=axes, metrics=metrics,
                      title=description or name)
    return Experiment(path=path, name=name, description=description, base_path=base_path, base=base,
                      seeds=seeds, metrics=metrics, overrides=overrides, grid=normalized, plot=plot,
                      points=tuple(points), text=text, variants=variants)


def _variants(raw: Any, where: str, base: Config) -> dict[str, dict[str, Any]]:
    """``{name: {dotted key: value}}`` in file order; each set is checked against the base config."""
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: expected a table of named override tables")
    variants: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,40}", name):
            raise ExperimentError(f"{where}.{name}: a variant name must be 1-40 letters, digits or . _ + -")
        chosen = _flat_table(table, f"{where}.{name}")
        for key in chosen:
            if key in RESERVED_KEYS:
                raise ExperimentError(f"{where}.{name}.{key}: set by the experiment itself")
        try:
            cfg = base.replace(**chosen)
        except ConfigError as exc:
            raise ExperimentError(f"{where}.{name}: {_strip_source(str(exc))}") from None
        flat = cfg.to_flat()
        variants[name] = {key: flat[key] for key in chosen}
    return variants


# ---- running ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One (grid point, seed) run of ``fedgov.simulate``."""

    point: Point
    seed: int
    config: Config
    seed_dir: Path  # <out>/points/<point>/seed-<s>/: the config file and the run directory(ies)

    @property
    def config_file(self) -> Path:
        return self.seed_dir / "run.toml"

    def command(self, *, resume: Path | None = None) -> list[str]:
        if resume is not None:  # the run directory's own config.toml is the same config
            return [sys.executable, "-m", "fedgov.simulate", "--resume", str(resume), "--no-progress"]
        return [sys.executable, "-m", "fedgov.simulate", "--config", str(self.config_file),
                "--out", str(self.seed_dir), "--no-progress"]


@dataclass
class RunResult:
    job: Job
    status: str  # "ok" (ran now), "done" (kept from an earlier invocation) or "failed"
    run_dir: Path | None = None
    returncode: int | None = None
    seconds: float = 0.0
    error: str = ""
    command: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "done")


# A runner takes a command and returns (exit status, stdout, stderr); tests swap in a fake one.
Runner = Callable[[list[str]], tuple[int, str, str]]


def subprocess_runner(command: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def metric_value(summary: Mapping[str, Any], path: str) -> float | None:
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


def _run_dirs(seed_dir: Path) -> list[Path]:
    if not seed_dir.is_dir():
        return []
    # Run directories are named <UTC time>-<hash>, so the newest sorts last.
    return sorted((p for p in seed_dir.iterdir() if p.is_dir() and (p / "config.toml").is_file()),
                  key=lambda p: p.name)


def _same_config(run_dir: Path, config_hash: str) -> bool:
    # Read the run's config.toml with today's Config rather than trusting the hash in summary.json:
    # keys added to Config since (at their defaults) then still match, changed settings do not.
    try:
        return load_config(run_dir / "config.toml").hash() == config_hash
    except ConfigError:
        return False


def find_completed(seed_dir: Path, config_hash: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest run directory under ``seed_dir`` with a summary.json for this config."""
    for run_dir in reversed(_run_dirs(seed_dir)):
        path = run_dir / "summary.json"
        if not path.is_file() or not _same_config(run_dir, config_hash):
            continue
        try:
            return run_dir, read_json(path)
        except (OSError, ValueError):
            continue
    return None


def find_resumable(seed_dir: Path, config_hash: str) -> Path | None:
    """The newest unfinished run directory of this config that has a checkpoint to continue from."""
    for run_dir in reversed(_run_dirs(seed_dir)):
        if (run_dir / "summary.json").is_file() or not (run_dir / "checkpoint.npz").is_file():
            continue
        if _same_config(run_dir, config_hash):
            return run_dir
    return None


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def execute_job(job: Job, *, runner: Runner = subprocess_runner) -> RunResult:
    """Run one job unless its summary.json already exists; never raises for a failed run."""
    config_hash = job.config.hash()
    found = find_completed(job.seed_dir, config_hash)
    if found is not None:
        run_dir, summary = found
        return RunResult(job=job, status="done", run_dir=run_dir, summary=summary, returncode=0)
    atomic_write_text(job.config_file, job.config.to_toml())
    command = job.command(resume=find_resumable(job.seed_dir, config_hash))
    start = time.perf_counter()
    try:
        code, stdout, stderr = runner(command)
    except OSError as exc:
        code, stdout, stderr = 127, "", f"could not start {command[0]}: {exc}"
    seconds = time.perf_counter() - start
    atomic_write_text(job.seed_dir / "simulate.log",
                      f"$ {shlex.join(command)}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
    result = RunResult(job=job, status="failed", returncode=code, seconds=seconds, command=command)
    lines = stdout.strip().splitlines()
    if code != 0:
        result.error = _tail(stderr) or f"exit status {code}"
        return result
    run_dir = Path(lines[-1].strip()) if lines else None
    if run_dir is None or not (run_dir / "summary.json").is_file():
        result.error = f"fedgov.simulate exited 0 but printed no run directory with a summary.json " \
                       f"(last line: {lines[-1] if lines else ''!r})"
        return result
    result.status, result.run_dir = "ok", run_dir
    result.summary = read_json(run_dir / "summary.json")
    return result


def build_jobs(exp: Experiment, out: Path, *, seeds: Sequence[int], quick: bool = False) -> list[Job]:
    """Seed-major order: after the first pass every point has one run, so a partial sweep shows the curve."""
    jobs = []
    for seed in seeds:
        for point in exp.points:
            seed_dir = out / "points" / point.id / f"seed-{seed}"
            cfg = exp.config_for(point).replace(seed=seed)
            if quick:  # shrink, never grow, whatever the grid says
                shrink: dict[str, Any] = {"train.rounds": min(cfg.train.rounds, QUICK_ROUNDS)}
                if cfg.data.partition != "natural":
                    shrink["data.num_cooperatives"] = min(cfg.data.num_cooperatives, QUICK_COOPERATIVES)
                cfg = cfg.replace(**shrink)
            jobs.append(Job(point=point, seed=seed, config=cfg.replace(**{"runtime.out": str(seed_dir)}),
                            seed_dir=seed_dir))
    return jobs


# ---- tables -----------------------------------------------------------------------------

def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return buffer.getvalue()


def _relative(path: Path | None, out: Path) -> str:
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def runs_table(exp: Experiment, results: Sequence[RunResult], out: Path) -> tuple[list[str], list[list[Any]]]:
    keys = list(exp.axes)
    header = ["point", *keys, "seed", "status", "run_dir", *exp.metrics, "seconds", "error"]
    order = {p.id: i for i, p in enumerate(exp.points)}
    rows = []
    for r in sorted(results, key=lambda r: (order[r.job.point.id], r.job.seed)):
        summary = r.summary or {}
        rows.append([r.job.point.id, *(r.job.point.values[k] for k in keys), r.job.seed, r.status,
                     _relative(r.run_dir, out), *(metric_value(summary, m) for m in exp.metrics),
                     round(r.seconds, 1) if r.seconds else "", r.error.replace("\n", " | ")])
    return header, rows


def series_value(summary: Mapping[str, Any], path: str) -> list[float | None] | None:
    """A per-round list at a dotted path of summary.json (None entries stay None)."""
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, list):
        return None
    return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in node]


def rounds_table(exp: Experiment, results: Sequence[RunResult], paths: Sequence[str]
                 ) -> tuple[list[str], list[list[Any]]]:
    """One row per (grid point, per-round metric, round): mean and 95% CI over seeds."""
    keys = list(exp.axes)
    header = ["point", *keys, "metric", "round", "n", "mean", "ci95_low", "ci95_high", "min", "max"]
    rows = []
    for point in exp.points:
        ok = [r for r in results if r.job.point.id == point.id and r.succeeded]
        for path in paths:
            per_run = [v for r in ok if (v := series_value(r.summary or {}, path))]
            for index in range(max((len(v) for v in per_run), default=0)):
                values = [v[index] for v in per_run if index < len(v) and v[index] is not None]
                ci = confidence_interval(values)
                rows.append([point.id, *(point.values[k] for k in keys), path, index + 1, len(values),
                             ci.mean, ci.low, ci.high, min(values, default=None), max(values, default=None)])
    return header, rows


def results_table(exp: Experiment, results: Sequence[RunResult]) -> tuple[list[str], list[list[Any]]]:
    """One row per grid point: n successful runs and, per metric, mean and 95% CI (Student t)."""
    keys = list(exp.axes)
    header = ["point", *keys, "n", "failed"]
    for m in exp.metrics:
        header += [f"{m}_mean", f"{m}_ci95_low", f"{m}_ci95_high", f"{m}_std"]
    header.append("note")
    rows = []
    for point in exp.points:
        mine = [r for r in results if r.job.point.id == point.id]
        ok = [r for r in mine if r.succeeded]
        row: list[Any] = [point.id, *(point.values[k] for k in keys), len(ok), len(mine) - len(ok)]
        for m in exp.metrics:
            ci = confidence_interval([v for r in ok if (v := metric_value(r.summary or {}, m)) is not None])
            row += [ci.mean, ci.low, ci.high, ci.std]
        note = {0: "no successful run", 1: "n=1: the interval is the single value, not a CI"}.get(len(ok), "")
        rows.append([*row, note])
    return header, rows


# ---- the command line -----------------------------------------------------------------

class _Reporter:
    """A rich progress bar on stderr when it is a terminal, else one plain line per run."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = total
        self.count = 0
        self.console = Console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.progress = Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=self.console) if self.tty else None
        self.task: Any = None

    def __enter__(self) -> _Reporter:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("runs", total=self.total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def started(self, job: Job) -> None:
        if self.progress is not None:
            self.progress.update(self.task, status=f"{job.point.id} seed {job.seed}")

    def finished(self, result: RunResult, metrics: Sequence[str]) -> None:
        self.count += 1
        job = result.job
        if result.succeeded:
            values = "  ".join(f"{m} {v:.4f}" for m in metrics
                               if (v := metric_value(result.summary or {}, m)) is not None)
            how = "kept (summary.json exists)" if result.status == "done" else f"ok in {result.seconds:.0f} s"
            line = f"[{self.count}/{self.total}] {job.point.id} seed {job.seed}: {how}  {values}"
        else:
            last = result.error.splitlines()[-1] if result.error else ""
            line = f"[{self.count}/{self.total}] {job.point.id} seed {job.seed}: FAILED (exit {result.returncode}) {last}"
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)
            self.progress.update(self.task, completed=self.count)
        else:
            print(line, file=sys.stderr, flush=True)


def _write_outputs(exp: Experiment, results: list[RunResult], out: Path, meta: dict[str, Any],
                   *, final: bool) -> None:
    header, rows = runs_table(exp, results, out)
    atomic_write_text(out / "runs.csv", _csv_text(header, rows))
    runs = [{"point": r.job.point.id, "values": r.job.point.values, "seed": r.job.seed,
             "config_hash": r.job.config.hash(), "config_file": _relative(r.job.config_file, out),
             "command": shlex.join(r.command) if r.command else None, "status": r.status,
             "returncode": r.returncode, "run_dir": _relative(r.run_dir, out), "seconds": r.seconds,
             "error": r.error or None} for r in results]
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if final else None
    write_json(out / "experiment.json", {**meta, "finished": finished, "runs": runs})
    if final:
        header, rows = results_table(exp, results)
        atomic_write_text(out / "results.csv", _csv_text(header, rows))
        if exp.plot.get("rounds"):
            header, rows = rounds_table(exp, results, exp.plot["rounds"])
            atomic_write_text(out / "rounds.csv", _csv_text(header, rows))


def code_version() -> dict[str, Any]:
    """Which fedgov code ran: a hash of its sources, and the git commit when it is a checkout."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    version: dict[str, Any] = {"source": str(package), "sources_sha256": digest.hexdigest()[:16],
                               "git_commit": None, "git_dirty": None}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        version["git_commit"] = git("rev-parse", "HEAD")
        version["git_dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package, a copied tree)
    return version


def _earlier_runs(out: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The runs recorded by an earlier invocation into the same folder, by (point, seed, run dir)."""
    try:
        runs = read_json(out / "experiment.json").get("runs", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {(r.get("point"), r.get("seed"), r.get("run_dir")): r for r in runs if isinstance(r, dict)}


def run_experiment(exp: Experiment, *, out: Path, seeds: Sequence[int] | None = None, quick: bool = False,
                   jobs: int = 1, runner: Runner | None = None,
                   argv: Sequence[str] = ()) -> list[RunResult]:
    """Run every (point, seed) not yet done; write runs.csv, results.csv, experiment.json, figure.png."""
    runner = runner or subprocess_runner  # looked up now, so tests can monkeypatch the module's runner
    if seeds is None:
        seeds = exp.seeds[:1] if quick else exp.seeds
    todo = build_jobs(exp, out, seeds=seeds, quick=quick)
    plot = dict(exp.plot)
    if quick:  # the title describes the full runs; say that these are not them
        plot["title"] = f"{plot['title']} [--quick: {QUICK_ROUNDS} rounds, <= {QUICK_COOPERATIVES} cooperatives]"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": exp.name,
        "description": exp.description,
        "experiment_file": str(exp.path),
        "experiment_toml": exp.text,
        "invocation": shlex.join(["python", "-m", "fedgov.experiment", *argv]),
        "python": sys.executable,
        "code": code_version(),
        "base": str(exp.base_path),
        "base_config": exp.base.to_flat(),  # with the overrides; seed and runtime.out are set per run
        "overrides": exp.overrides,
        "grid": exp.grid,
        "variants": exp.variants,
        "seeds": list(seeds),
        "quick": quick,
        "metrics": list(exp.metrics),
        "interval": f"mean and {CI_LEVEL:.0%} Student t interval over seeds (n=1: the value itself)",
        "plot": plot,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    earlier = _earlier_runs(out)
    results: list[RunResult] = []
    with _Reporter(len(todo)) as reporter, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def work(job: Job) -> RunResult:
            reporter.started(job)
            return execute_job(job, runner=runner)

        futures = [pool.submit(work, job) for job in todo]
        try:
            for future in as_completed(futures):
                result = future.result()
                if result.status == "done":  # keep how the kept run was made, from the last experiment.json
                    made = earlier.get((result.job.point.id, result.job.seed, _relative(result.run_dir, out)), {})
                    result.command = shlex.split(made["command"]) if made.get("command") else []
                    result.seconds = float(made.get("seconds") or 0.0)
                results.append(result)
                reporter.finished(result, exp.metrics)
                _write_outputs(exp, results, out, meta, final=False)  # cheap, and survives an interrupt
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    _write_outputs(exp, results, out, meta, final=True)
    from .plots import plot_experiment

    plot_experiment(out / "results.csv", plot, out / "figure.png", runs_csv=out / "runs.csv")
    if plot.get("rounds"):
        from .plots import plot_rounds

        plot_rounds(out / "rounds.csv", plot, out / "figure_rounds.png")
    return results


def print_results(exp: Experiment, out: Path) -> None:
    """results.csv as a rich table on stdout: mean [95% CI] per metric."""
    from rich.console import Console
    from rich.table import Table

    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = Table(title=f"{exp.name}: mean [95% CI] over seeds", title_justify="left")
    for key in exp.axes:
        table.add_column(key, justify="right")
    table.add_column("n", justify="right")
    for m in exp.metrics:
        table.add_column(m, justify="right")
    for row in rows:
        cells = [row[k] for k in exp.axes] + [row["n"] if row["failed"] == "0" else f"{row['n']} ({row['failed']} failed)"]
        for m in exp.metrics:
            if row[f"{m}_mean"] == "":
                cells.append("-")
            elif row["n"] == "1":
                cells.append(f"{float(row[f'{m}_mean']):.4f} (n=1, no CI)")
            else:
                cells.append(f"{float(row[f'{m}_mean']):.4f} [{float(row[f'{m}_ci95_low']):.4f}, "
                             f"{float(row[f'{m}_ci95_high']):.4f}]")
        table.add_row(*cells)
    Console(width=max(100, Console().width)).print(table)


def _parser() -> argparse.ArgumentParser:
    from .cli import ArgumentParser

    p = ArgumentParser(prog="python -m fedgov.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="experiment TOML file (see experiments/)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/<name>/ beside the experiment file)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run every point with seeds 0, 1, ..., N-1 (N seeds) instead of the file's seeds")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_ROUNDS} rounds, at most {QUICK_COOPERATIVES} cooperatives, "
                        f"one seed; writes to results/<name>-quick/")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time (each starts its own Ray; default 1)")
    return p


def _fail(message: str, code: int) -> None:
    print(f"fedgov.experiment: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        _fail(f"--seeds: must be >= 1, got {args.seeds}", 2)
    if args.jobs < 1:
        _fail(f"--jobs: must be >= 1, got {args.jobs}", 2)
    try:
        exp = load_experiment(args.experiment)
    except ExperimentError as exc:
        _fail(str(exc), 2)
    out = args.out if args.out is not None else exp.default_out(quick=args.quick)
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    try:
        results = run_experiment(exp, out=out, seeds=seeds, quick=args.quick, jobs=args.jobs, argv=argv)
    except KeyboardInterrupt:
        _fail(f"interrupted; run the same command again to continue (finished runs are kept in {out})", 130)
    print_results(exp, out)
    failed = [r for r in results if not r.succeeded]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed; see runs.csv and points/*/seed-*/simulate.log",
              file=sys.stderr)
    print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
