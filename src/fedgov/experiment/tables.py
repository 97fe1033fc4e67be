"""What an experiment writes: ``runs.csv`` (one row per run), ``results.csv`` (mean and 95%
interval per grid point), ``rounds.csv`` (per-round series), ``experiment.json``, and the
results table printed at the end.

A run made by other code than the experiment's (``experiment.json`` ``code``), kept under
``--reuse-stale``, is marked: ``stale = true`` and ``made_by`` (that code) in runs.csv,
``stale`` and ``code`` in experiment.json's ``runs``, and in results.csv the count of such
runs per point (``stale``) and a note. With no stale run, experiment.json names one code
version: the runs' own versions are then the experiment's and are not repeated.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..provenance import describe_code
from ..results import atomic_write_text, write_json
from .runner import RunResult
from .spec import Experiment, metric_value, series_value
from .stats import confidence_interval

__all__ = ["print_results", "results_table", "rounds_table", "runs_table", "write_outputs"]


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


def _flag(value: bool) -> str:
    return "true" if value else "false"


def runs_table(exp: Experiment, results: Sequence[RunResult], out: Path) -> tuple[list[str], list[list[Any]]]:
    keys = list(exp.axes)
    header = ["point", *keys, "seed", "status", "stale", "run_dir", *exp.metrics, "seconds", "made_by", "error"]
    order = {p.id: i for i, p in enumerate(exp.points)}
    rows = []
    for r in sorted(results, key=lambda r: (order[r.job.point.id], r.job.seed)):
        summary = r.summary or {}
        rows.append([r.job.point.id, *(r.job.point.values[k] for k in keys), r.job.seed, r.status,
                     _flag(r.stale), _relative(r.run_dir, out), *(metric_value(summary, m) for m in exp.metrics),
                     round(r.seconds, 1) if r.seconds else "", describe_code(r.code) if r.stale else "",
                     r.error.replace("\n", " | ")])
    return header, rows


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
    """One row per grid point: n successful runs (``stale``: how many of them other code made)
    and, per metric, mean and 95% CI (Student t)."""
    keys = list(exp.axes)
    header = ["point", *keys, "n", "failed", "stale"]
    for m in exp.metrics:
        header += [f"{m}_mean", f"{m}_ci95_low", f"{m}_ci95_high", f"{m}_std"]
    header.append("note")
    rows = []
    for point in exp.points:
        mine = [r for r in results if r.job.point.id == point.id]
        ok = [r for r in mine if r.succeeded]
        stale = sum(r.stale for r in ok)
        row: list[Any] = [point.id, *(point.values[k] for k in keys), len(ok), len(mine) - len(ok), stale]
        for m in exp.metrics:
            ci = confidence_interval([v for r in ok if (v := metric_value(r.summary or {}, m)) is not None])
            row += [ci.mean, ci.low, ci.high, ci.std]
        notes = [{0: "no successful run", 1: "n=1: the interval is the single value, not a CI"}.get(len(ok), "")]
        if stale:
            notes.append(f"{stale} of {len(ok)} runs made by other code (--reuse-stale; see runs.csv made_by)")
        rows.append([*row, "; ".join(n for n in notes if n)])
    return header, rows


def write_outputs(exp: Experiment, results: list[RunResult], out: Path, meta: dict[str, Any],
                  *, final: bool) -> None:
    """runs.csv and experiment.json (after every run), and at the end results.csv and rounds.csv."""
    header, rows = runs_table(exp, results, out)
    atomic_write_text(out / "runs.csv", _csv_text(header, rows))
    runs = []
    for r in results:
        entry = {"point": r.job.point.id, "values": r.job.point.values, "seed": r.job.seed,
                 "config_hash": r.job.config.hash(), "config_file": _relative(r.job.config_file, out),
                 "command": shlex.join(r.command) if r.command else None, "status": r.status,
                 "returncode": r.returncode, "run_dir": _relative(r.run_dir, out), "seconds": r.seconds,
                 "error": r.error or None, "stale": r.stale}
        if r.stale:  # the code that made it; a current run's code is the experiment's, not repeated
            entry["code"] = r.code
        runs.append(entry)
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if final else None
    write_json(out / "experiment.json", {**meta, "finished": finished, "stale_runs": sum(r.stale for r in results),
                                         "runs": runs})
    if final:
        header, rows = results_table(exp, results)
        atomic_write_text(out / "results.csv", _csv_text(header, rows))
        if exp.plot.get("rounds"):
            header, rows = rounds_table(exp, results, exp.plot["rounds"])
            atomic_write_text(out / "rounds.csv", _csv_text(header, rows))


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
        n = row["n"]
        if row["failed"] != "0":
            n += f" ({row['failed']} failed)"
        if row.get("stale", "0") not in ("", "0"):
            n += f" ({row['stale']} stale)"
        cells = [row[k] for k in exp.axes] + [n]
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
