"""Suite ``scale``: how wall time and memory grow with the number of members, beside the engine-free floor.

Each size runs ``python -m fedgov.simulate`` in its own process on the pool engine (10
members: the default run, digits; more: synthetic data split IID, a fraction sampled per
round) and the same rounds with ``python -m fedgov.floor`` (fedgov's own training and
evaluation code in one process, without Flower, on one core). Both are timed whole, from
the command's start to its exit, and their peak memory is the highest total over every
process the command started (the pool's workers, or Ray's processes, included:
``fedgov.bench.processes``): ``peak_memory_bytes`` counts each page once (the sum of
proportional set sizes: a forked worker shares the server's data, which it never copies),
``peak_rss_bytes`` once per process that maps it (the sum of resident set sizes, an upper
bound). Where PSS cannot be read, ``peak_memory_bytes`` falls back on the RSS sum. ``startup`` is the simulation's wall time outside its rounds (Python start-up,
imports, the data, discovery, the summary). The sizes in ``flower_members`` also run on
Flower's own engine (``runtime.engine = "flower"``), for comparison. On a shared machine
one pair of commands can be off by a tenth either way, so each pool size runs its pair
``repeats`` times in turn and reports the pair with the median ratio (every ratio is kept).
Each pool size is checked against the targets in ``TARGETS``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from ...results import read_json, read_jsonl
from ..core import BenchContext, fmt
from ..processes import run_measured

# members -> {measure: limit}: wall seconds, the ratio of wall time to the floor's, peak memory (GB).
TARGETS: dict[int, dict[str, float]] = {
    10: {"floor_ratio": 1.2},
    1000: {"floor_ratio": 1.2},
    10000: {"floor_ratio": 1.3, "peak_memory_gb": 4.0},
    100000: {"wall_seconds": 600.0, "peak_memory_gb": 8.0},
}


def case_settings(members: int, *, rounds: int, fraction: float, dataset: str, examples_per_member: int,
                  device: str, engine: str = "pool") -> dict[str, Any]:
    """The ``--set`` overrides of one size (the default run's config for digits)."""
    sets: dict[str, Any] = {"seed": 0, "train.rounds": rounds, "data.num_cooperatives": members,
                            "strategy.fraction_train": fraction, "runtime.device": device}
    if engine != "pool":
        sets["runtime.engine"] = engine
    if dataset != "digits":
        sets.update({"data.dataset": dataset, "data.partition": "iid",
                     "data.synthetic_samples": members * examples_per_member})
    return sets


def _command(module: str, sets: dict[str, Any], *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module, *extra]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def _failure(measured: Any, what: str) -> str:
    tail = (measured.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{what} exited {measured.returncode}: {tail}"


def measure_size(members: int, sets: dict[str, Any], work: Path, *, timeout: float, repeats: int = 1
                 ) -> dict[str, Any]:
    """One size: the simulation and its floor, each timed and metered whole, ``repeats`` times in turn.

    The row is the pair whose ratio is the median (``floor_ratios`` holds every pair's, in
    order); its peak memory is the highest of all the pairs'.
    """
    pairs: list[dict[str, Any]] = []
    for i in range(repeats):
        pair = _measure_pair(members, sets, work / f"repeat-{i}" if repeats > 1 else work, timeout=timeout)
        if pair["status"] != "ok":
            return {**pair, "repeats_done": i}
        pairs.append(pair)
    ratios = [p["floor_ratio"] for p in pairs]
    row = sorted(pairs, key=lambda p: p["floor_ratio"])[(len(pairs) - 1) // 2]
    return {**row, "repeats": repeats, "floor_ratios": ratios,
            "wall_seconds_runs": [p["wall_seconds"] for p in pairs],
            "floor_wall_seconds_runs": [p["floor_wall_seconds"] for p in pairs],
            "peak_memory_bytes": max(p["peak_memory_bytes"] or 0 for p in pairs) or None,
            "peak_rss_bytes": max(p["peak_rss_bytes"] or 0 for p in pairs) or None}


def _measure_pair(members: int, sets: dict[str, Any], work: Path, *, timeout: float) -> dict[str, Any]:
    """The simulation, then its floor, each timed and metered whole."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    engine = sets.get("runtime.engine", "pool")
    row: dict[str, Any] = {"kind": "scale", "members": members, "engine": engine, "rounds": sets["train.rounds"],
                           "fraction": sets["strategy.fraction_train"], "dataset": sets.get("data.dataset", "digits")}
    runs = work / f"{members}-{engine}"
    sim = run_measured(_command("fedgov.simulate", sets, "--no-progress", "--out", str(runs)), env=env, timeout=timeout)
    if sim.timed_out:
        return {**row, **_unfinished(sim, runs, timeout)}
    run_dir = Path(sim.stdout.strip().splitlines()[-1]) if sim.stdout.strip() else None
    if sim.returncode != 0 or run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {**row, "status": "failed", "error": _failure(sim, "fedgov.simulate"), "wall_seconds": sim.wall_seconds,
                **_memory(sim)}
    rounds = read_jsonl(run_dir / "metrics.jsonl")
    summary = read_json(run_dir / "summary.json")
    floor_file = work / f"{members}-{engine}-floor.json"
    floor_sets = {k: v for k, v in sets.items() if k != "runtime.engine"}
    floor = run_measured(_command("fedgov.floor", floor_sets, "--out", str(floor_file)), env=env, timeout=timeout)
    if floor.returncode != 0 or not floor_file.is_file():
        return {**row, "status": "failed", "error": _failure(floor, "fedgov.floor")}
    floor_rows = json.loads(floor_file.read_text())["rows"]
    round_seconds = [r["seconds"] for r in rounds]
    phase = lambda rows, name: sum(r["phase_seconds"].get(name, 0.0) for r in rows)  # noqa: E731
    row.update({
        "status": "ok",
        "sampled_per_round": statistics.median(len(r["sampled"]) for r in rounds),
        "wall_seconds": sim.wall_seconds,
        "federation_seconds": summary["wall_seconds"],
        "rounds_seconds": sum(round_seconds),
        "startup_seconds": sim.wall_seconds - sum(round_seconds),
        "round_seconds_median": statistics.median(round_seconds),
        "train_seconds": phase(rounds, "train"), "aggregate_seconds": phase(rounds, "aggregate"),
        "evaluate_seconds": phase(rounds, "evaluate"),
        **_memory(sim),
        "final_accuracy": summary["final_accuracy"],
        "floor_wall_seconds": floor.wall_seconds,
        "floor_rounds_seconds": sum(r["seconds"] for r in floor_rows),
        "floor_train_seconds": phase(floor_rows, "train"), "floor_evaluate_seconds": phase(floor_rows, "evaluate"),
        "floor_peak_memory_bytes": _memory(floor)["peak_memory_bytes"],
        "floor_final_accuracy": floor_rows[-1]["accuracy"],
    })
    row["floor_ratio"] = row["wall_seconds"] / row["floor_wall_seconds"]
    return row


def _memory(measured: Any) -> dict[str, Any]:
    """Peak memory of every process of a command: shared pages once (PSS) where the platform tells, and the RSS sum."""
    pss, rss = measured.peak_pss_bytes, measured.peak_rss_bytes
    return {"peak_memory_bytes": pss if pss is not None else rss, "memory_measure": "pss" if pss is not None else "rss",
            "peak_rss_bytes": rss, "peak_processes": measured.peak_processes}


def _unfinished(sim: Any, out: Path, timeout: float) -> dict[str, Any]:
    """What a simulation stopped at the timeout got through: its rounds so far, its memory so far."""
    done = [r for f in sorted(out.glob("*/metrics.jsonl")) for r in read_jsonl(f)]
    return {"status": "timed_out", "error": f"did not finish within {timeout:g} s ({len(done)} rounds done)",
            "wall_seconds": sim.wall_seconds, "rounds_done": len(done),
            **_memory(sim)}


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``target`` row per measure in ``TARGETS`` whose size was measured."""
    out = []
    for r in rows:
        if r.get("engine", "pool") != "pool":
            continue
        for measure, limit in TARGETS.get(r["members"], {}).items():
            if r.get("status") == "timed_out" and measure == "wall_seconds":
                value = r["wall_seconds"]  # a lower bound: stopped there
            elif r.get("status") != "ok":
                value = None
            elif measure == "peak_memory_gb":
                value = r["peak_memory_bytes"] / 1e9 if r.get("peak_memory_bytes") is not None else None
            else:
                value = r[measure]
            out.append({"kind": "target", "members": r["members"], "target": measure, "limit": limit,
                        "value": value, "verdict": "unknown" if value is None else
                        ("meets" if value <= limit else "misses")})
    return out


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    members = [int(m) for m in spec["members"]]
    per_size = {key: list(spec[key]) for key in ("rounds", "fraction", "dataset", "repeats") if key in spec}
    for key, values in per_size.items():
        if len(values) != len(members):
            raise ValueError(f"scale.{key}: {len(values)} values for {len(members)} sizes (scale.members)")
    work = ctx.out / "work" / "scale"
    flower = {int(m) for m in spec.get("flower_members", [])}
    rows = []
    for i, m in enumerate(members):
        for engine in ["pool"] + (["flower"] if m in flower else []):
            sets = case_settings(m, rounds=int(per_size["rounds"][i]), fraction=float(per_size["fraction"][i]),
                                 dataset=str(per_size["dataset"][i]), device=ctx.device, engine=engine,
                                 examples_per_member=int(spec.get("examples_per_member", 40)))
            ctx.step(f"{m} members on the {engine} engine: {sets['train.rounds']} rounds, "
                     f"{sets['strategy.fraction_train']:.1%} sampled")
            repeats = int(spec["repeats"][i]) if engine == "pool" and "repeats" in spec else 1
            rows.append(measure_size(m, sets, work, timeout=float(spec.get("timeout_seconds", 1800)),
                                     repeats=repeats))
    return rows + verdicts(rows)


def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt

    ok = [r for r in rows if r.get("kind") == "scale" and r.get("status") == "ok"]
    pool = [r for r in ok if r.get("engine", "pool") == "pool"]
    flower = [r for r in ok if r.get("engine") == "flower"]
    if not ok:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["members"] for r in pool]
    left.plot(xs, [r["wall_seconds"] for r in pool], "o-", label="pool engine (whole command)")
    left.plot(xs, [r["startup_seconds"] for r in pool], "s--", label="of which outside the rounds")
    left.plot(xs, [r["floor_wall_seconds"] for r in pool], "^-", label="engine-free floor (whole command)")
    if flower:
        left.plot([r["members"] for r in flower], [r["wall_seconds"] for r in flower], "x:", markersize=8,
                  label="Flower's engine (whole command)")
    left.set_ylabel("seconds")
    for subset, key, style, label in ((pool, "peak_memory_bytes", "o-", "pool engine, all processes"),
                                      (pool, "floor_peak_memory_bytes", "^-", "floor"),
                                      (flower, "peak_memory_bytes", "x:", "Flower's engine, all processes")):
        measured = [(r["members"], r[key] / 1e9) for r in subset if r.get(key)]  # None where /proc is missing
        if measured:
            right.plot([m for m, _ in measured], [g for _, g in measured], style, label=label)
    right.set_ylabel("peak resident memory (GB)")
    for ax, title in ((left, "Wall time against members"), (right, "Peak memory against members")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("members (cooperatives)")
        ax.set_title(title, fontweight="bold")
        _style(ax)
        ax.legend(fontsize="x-small", frameon=False)
    fig.tight_layout()
    return [_save(fig, out / "scale.png", dpi=120)]


def report(rows: list[dict[str, Any]]) -> str:
    sizes = [r for r in rows if r.get("kind") == "scale"]
    if not sizes:
        return "No scale measurements.\n"
    lines = ["Whole-command wall time and peak memory (every process: the pool's workers, Ray's processes) "
             "against members, beside the engine-free floor of the same rounds. Peak memory counts each page "
             "once (the sum of PSS); the RSS sum counts a page once per process that maps it, so the server's "
             "data, which forked workers share and never copy, counts once per worker there. Where a size ran "
             "several times (simulation and floor in turn), the row is the run with the median ratio, and the "
             "range of the ratios follows it in brackets:", "",
             "| members | engine | data | rounds | sampled/round | wall s | floor s | x floor | outside rounds s | "
             "s/round (median) | evaluate s (all rounds) | peak memory GB | RSS sum GB | processes | "
             "accuracy (floor) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        gb = lambda b: fmt(b / 1e9) if b else "-"  # noqa: E731
        head = f"| {r['members']:,} | {r.get('engine', 'pool')} | {r['dataset']} | {r['rounds']} |"
        if r.get("status") == "timed_out":
            lines.append(f"{head} - | > {r['wall_seconds']:.0f} "
                         f"({r['error']}) | | | | | | {gb(r.get('peak_memory_bytes'))} so far | "
                         f"{gb(r.get('peak_rss_bytes'))} | "
                         f"{r['peak_processes']} | |")
            continue
        if r.get("status") != "ok":
            after = f" after {r['wall_seconds']:.0f} s" if r.get("wall_seconds") else ""
            lines.append(f"{head} - | failed{after}: {r.get('error')} "
                         f"| | | | | | {gb(r.get('peak_memory_bytes'))} | {gb(r.get('peak_rss_bytes'))} | "
                         f"{r.get('peak_processes', '')} | |")
            continue
        spread = (f" ({min(r['floor_ratios']):.2f}-{max(r['floor_ratios']):.2f})"
                  if len(r.get("floor_ratios", [])) > 1 else "")
        lines.append(f"{head} {r['sampled_per_round']:g} | "
                     f"{r['wall_seconds']:.1f} | {r['floor_wall_seconds']:.1f} | {r['floor_ratio']:.2f}{spread} | "
                     f"{r['startup_seconds']:.1f} | {r['round_seconds_median']:.3f} | {r['evaluate_seconds']:.2f} | "
                     f"{gb(r.get('peak_memory_bytes'))} | {gb(r.get('peak_rss_bytes'))} | {r['peak_processes']} | "
                     f"{r['final_accuracy']:.4f} ({r['floor_final_accuracy']:.4f}) |")
    targets = [r for r in rows if r.get("kind") == "target"]
    if targets:
        lines += ["", "| members | target | limit | measured | verdict |", "|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['members']:,} | {t['target']} | {t['limit']:g} | {fmt(t['value'])} | {t['verdict']} |")
    return "\n".join(lines) + "\n"
