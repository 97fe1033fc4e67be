"""The experiment file: :class:`Experiment` and its grid :class:`Point` s, read and checked by
:func:`load_experiment`; the summary.json metrics an experiment may aggregate.

An experiment file holds one ``[experiment]`` table (see :mod:`fedgov.experiment` for the
format). Loading it builds and validates every grid point's Config, so a bad key or value
is an :class:`ExperimentError` naming the file and key before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config

__all__ = [
    "MECHANISM_METRICS",
    "QUICK_COOPERATIVES",
    "QUICK_ROUNDS",
    "RESERVED_KEYS",
    "SUMMARY_METRICS",
    "VARIANT_AXIS",
    "Experiment",
    "ExperimentError",
    "Point",
    "expand_grid",
    "load_experiment",
    "metric_value",
    "point_id",
    "series_value",
]

SUMMARY_METRICS = (
    "final_accuracy", "final_loss", "rounds", "wall_seconds", "bytes_up", "bytes_down",
    "seconds_per_round", "bytes_per_round",
    "fairness.worst", "fairness.p10", "fairness.mean", "fairness.best", "fairness.std", "model.num_parameters",
    # q-FFL's fairness figures (worst and best 10% mean accuracy, variance in %^2) and FedProx's training loss
    "fairness.worst10", "fairness.best10", "fairness.variance_pct2", "final_train_loss",
    "influence.nakamoto", "influence.gini", "influence.hhi", "influence.max_weight",
    # over the whole run, every member counted (influence.run), and per actor behind identities
    "influence.run.nakamoto", "influence.run.gini", "influence.run.max_weight",
    "influence.run_by_actor.nakamoto", "influence.run_by_actor.gini", "influence.run_by_actor.max_weight",
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
    "influence.sybil_weight",  # data.sybil_identities > 0: the sybil actor's share of the run's weight
    "influence.registrar.merged",  # governance.registrar: identities it merged into their actor
    "influence.registrar.unpaid",  # governance.registrar_fee: the merged identities no fee was paid for
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
QUICK_ROUNDS = 2
QUICK_COOPERATIVES = 3


class ExperimentError(ValueError):
    """A problem with an experiment file, phrased as one line naming the file and key."""


# ---- the experiment file ---------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One grid point: its id (a folder name) and the grid values as the Config holds them."""

    id: str
    values: dict[str, Any]
    skipped_seeds: frozenset[int] = frozenset()  # seeds an experiment.skip entry with a "seed" key leaves out


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


_EXPERIMENT_KEYS = ("name", "description", "base", "seeds", "metrics", "overrides", "grid", "variants", "skip", "plot")
_PLOT_KEYS = ("x", "series", "y", "xscale", "ylog", "title", "labels", "rounds")
# kind = "frontier": one point per grid point, metric against metric (fedgov.plots.plot_frontier).
_FRONTIER_KEYS = ("kind", "x", "y", "point", "series", "facet", "title", "labels", "note", "rounds", "xscale",
                  "rounds_only", "rounds_facet", "point_names")


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


def _frontier_spec(raw: Mapping[str, Any], *, where: str, grid: Mapping[str, list[Any]], base: Config,
                   metrics: tuple[str, ...], title: str) -> dict[str, Any]:
    """``kind = "frontier"``: x and y are metrics; ``point`` labels each point, ``series`` colours
    it, ``facet`` (grid keys) splits the panels; every grid key must be one of them."""
    for key in raw:
        if key not in _FRONTIER_KEYS:
            raise ExperimentError(f"{where}.{key}: unknown key for a frontier (one of {', '.join(_FRONTIER_KEYS)})")
    x = _str(raw.get("x", ""), f"{where}.x")
    if x not in metrics:
        raise ExperimentError(f"{where}.x: {x!r} is not one of experiment.metrics")
    y = raw.get("y", [])
    if not isinstance(y, list) or not y or any(m not in metrics for m in y):
        raise ExperimentError(f"{where}.y: expected a non-empty list of experiment.metrics")
    point = raw.get("point", "")
    points = [point] if isinstance(point, str) else point
    if not isinstance(points, list) or not points or not all(isinstance(k, str) and k for k in points):
        raise ExperimentError(f"{where}.point: expected a grid key or a list of grid keys")
    series = raw.get("series")  # a grid key, or a list of them: one colour per combination of their values
    series_keys = [series] if isinstance(series, str) else list(series or [])
    if not all(isinstance(k, str) and k for k in series_keys):
        raise ExperimentError(f"{where}.series: expected a grid key or a list of grid keys")
    facet = raw.get("facet", [])
    if isinstance(facet, str):
        facet = [facet]
    named = list(points) + series_keys + list(facet)
    for key in named:
        if key not in grid:
            raise ExperimentError(f"{where}: {key!r} is not a grid key ({', '.join(grid)})")
    for key in grid:
        if key not in named and len(grid[key]) > 1:
            raise ExperimentError(f"{where}: grid key {key!r} has {len(grid[key])} values but is "
                                  f"neither plot.point, plot.series nor plot.facet")
    labels = _flat_table(raw.get("labels", {}), f"{where}.labels")
    # a point label writes a later key's value as "name=value" when the key has a short name here
    point_names = _flat_table(raw.get("point_names", {}), f"{where}.point_names")
    for key, name in point_names.items():
        if not isinstance(name, str) or not name:
            raise ExperimentError(f"{where}.point_names.{key}: expected a short name, got {name!r}")
        if key not in points[1:]:
            raise ExperimentError(f"{where}.point_names.{key}: not one of plot.point after the first")
    note = raw.get("note")
    if note is not None and note not in metrics:
        raise ExperimentError(f"{where}.note: {note!r} is not one of experiment.metrics")
    rounds = raw.get("rounds", [])
    if not isinstance(rounds, list) or not all(isinstance(m, str) and m for m in rounds):
        raise ExperimentError(f"{where}.rounds: expected a list of per-round summary paths")
    xscale = raw.get("xscale", "linear")
    if xscale not in ("linear", "log"):
        raise ExperimentError(f"{where}.xscale: {xscale!r} is not one of linear, log")
    # The learning curves of a few cells: entries as in experiment.skip, a point drawn if it matches one.
    rounds_only = _skip(raw.get("rounds_only", []), f"{where}.rounds_only", grid, base)
    # The learning curves' panels: a list of grid keys (two and one metric: a grid of panels); default facet.
    rounds_facet = raw.get("rounds_facet", list(facet))
    if isinstance(rounds_facet, str):
        rounds_facet = [rounds_facet]
    if not isinstance(rounds_facet, list) or any(k not in grid for k in rounds_facet):
        raise ExperimentError(f"{where}.rounds_facet: expected grid keys ({', '.join(grid)})")
    flat = base.to_flat()
    return {"kind": "frontier", "x": x, "y": list(y), "point": list(points), "series": series, "facet": list(facet),
            "title": _str(raw.get("title", title), f"{where}.title"), "labels": labels, "note": note,
            "rounds": list(rounds), "xscale": xscale, "rounds_only": rounds_only, "rounds_facet": list(rounds_facet),
            # a label leaves out a value the base config already has (as the CSV writes it)
            "point_defaults": {k: str(flat[k]) for k in points[1:] if k in flat}, "point_names": point_names}


def _plot_spec(raw: Any, *, where: str, grid: Mapping[str, list[Any]], base: Config, metrics: tuple[str, ...],
               title: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: expected a table, got {type(raw).__name__}")
    if raw.get("kind") == "frontier":
        return _frontier_spec(raw, where=where, grid=grid, base=base, metrics=metrics, title=title)
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
    skip = _skip(exp.get("skip", []), f"{where}.skip", {**axes, "seed": list(seeds)}, base)
    points = []
    for values in expand_grid(axes):
        matching = [entry for entry in skip if all(values[k] in chosen for k, chosen in entry.items() if k != "seed")]
        if any("seed" not in entry for entry in matching):
            continue
        skipped_seeds = frozenset(s for entry in matching for s in entry["seed"])
        if skipped_seeds >= set(seeds):
            continue
        point = Point(id=point_id(values), values=values, skipped_seeds=skipped_seeds)
        try:  # combinations can still clash (cross-key checks such as cnn needing digits)
            chosen = dict(values)
            variant = chosen.pop(VARIANT_AXIS, None)
            base.replace(**(variants[variant] if variant is not None else {}), **chosen)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={_format_value(v)}" for k, v in values.items())
            raise ExperimentError(f"{where}.grid: point {shown}: {_strip_source(str(exc))}") from None
        points.append(point)

    plot = _plot_spec(exp.get("plot", {}), where=f"{where}.plot", grid=axes, base=base, metrics=metrics,
                      title=description or name)
    return Experiment(path=path, name=name, description=description, base_path=base_path, base=base,
                      seeds=seeds, metrics=metrics, overrides=overrides, grid=normalized, plot=plot,
                      points=tuple(points), text=text, variants=variants)


def _skip(raw: Any, where: str, axes: Mapping[str, list[Any]], base: Config) -> list[dict[str, list[Any]]]:
    """``skip = [{key = value or [values], ...}, ...]``: the grid points matching every key of an
    entry are not run (a product of axes where only some combinations are worth their cost); an
    entry with a ``seed`` key leaves out only those seeds of the points it matches."""
    if not isinstance(raw, list):
        raise ExperimentError(f"{where}: expected a list of tables (axis -> value or list of values)")
    entries = []
    for i, table in enumerate(raw):
        here = f"{where}[{i}]"
        chosen = _flat_table(table, here)
        if not chosen:
            raise ExperimentError(f"{here}: empty (it would skip every point)")
        entry: dict[str, list[Any]] = {}
        for key, values in chosen.items():
            if key not in axes:
                raise ExperimentError(f"{here}.{key}: not an axis of the grid ({', '.join(axes)})")
            values = values if isinstance(values, list) else [values]
            normalized = []
            for value in values:
                if key not in (VARIANT_AXIS, "seed"):
                    try:
                        value = base.replace(**{key: value}).to_flat()[key]
                    except ConfigError as exc:
                        raise ExperimentError(f"{here}: {_strip_source(str(exc))}") from None
                if value not in axes[key]:
                    raise ExperimentError(f"{here}.{key}: {value!r} is not one of the axis' values")
                normalized.append(value)
            entry[key] = normalized
        entries.append(entry)
    return entries


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


# ---- reading summary.json ---------------------------------------------------------------

def metric_value(summary: Mapping[str, Any], path: str) -> float | None:
    """The number at a dotted path of summary.json (None when absent or not a number)."""
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


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
