"""Suite ``round``: end-to-end round latency of the federation per mechanism, by phase.

Each mechanism runs the default task (``configs/default.toml``: digits, 10
cooperatives, the 8,970-parameter MLP) through ``python -m fedgov.simulate`` in its
own process for a few rounds on the pool engine, and the per-round ``phase_seconds`` of
its ``metrics.jsonl`` are read back. The first round is dropped (start-up: key loading,
Opacus set-up). With ``plain_on_engines`` the plain round also runs on those engines
(``flower``: Flower's own simulation engine on Ray).

Phases, as the server observes them: ``train`` (send the model, local training,
encryption or masking, the replies), ``aggregate``, ``evaluate``; inside them
``local_train_max`` (the slowest cooperative's training), ``encrypt_max``,
``he_aggregate`` and ``decrypt``; SecAgg+ adds ``secagg_setup`` and
``secagg_share_keys`` rounds of messages before training. ``other`` is what the
round took beyond the named top-level phases (the global evaluation, bookkeeping).

The suite also runs the **engine-free floor** (``fedgov.floor``): the same rounds of the
same federation by fedgov's own training and evaluation code in one process, without
Flower, on one core. A plain round's time beyond the floor is its engine's (messaging,
serialization, per-message set-up, waiting, less what its workers gain by training in
parallel); a mechanism's time beyond the plain round is the mechanism's. Every row carries
both ratios, and the plain pool round is checked against ``TARGET_FLOOR_RATIO``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from ...config import load_config
from ...floor import run_floor
from ...results import read_jsonl
from ..core import BenchContext, percentile

MECHANISMS: dict[str, dict[str, Any]] = {
    "none": {},
    # Fixed noise: the suite times DP-SGD, it does not spend a budget.
    "dp": {"privacy.dp": "sample", "privacy.noise_multiplier": 1.0},
    "he": {"secure.aggregation": "he"},
    "he-compact": {"secure.aggregation": "he", "secure.preset": "compact"},
    "secagg+": {"secure.aggregation": "secagg+"},
    "dp+he": {"privacy.dp": "sample", "privacy.noise_multiplier": 1.0, "secure.aggregation": "he"},
}
FLOOR = "floor"  # the row of the engine-free floor
TOP_PHASES = ("secagg_setup", "secagg_share_keys", "train", "aggregate", "evaluate")
SUB_PHASES = ("local_train_max", "encrypt_max", "he_aggregate", "decrypt", "local_evaluate_max")


def simulate_rounds(mechanism: str, *, rounds: int, cooperatives: int, device: str, out: Path,
                    seed: int = 0, engine: str = "pool") -> list[dict[str, Any]]:
    """Run ``mechanism`` for ``rounds`` rounds on ``engine``; return its metrics.jsonl rows (all rounds)."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r} (one of {', '.join(MECHANISMS)})")
    sets = {"train.rounds": rounds, "data.num_cooperatives": cooperatives, "seed": seed,
            "runtime.device": device, "runtime.engine": engine, **MECHANISMS[mechanism]}
    command = [sys.executable, "-m", "fedgov.simulate", "--no-progress", "--out", str(out)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    run_dir = Path(lines[-1]) if lines else None
    if proc.returncode != 0 or run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"fedgov.simulate ({mechanism}) exited {proc.returncode}: {tail}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if any(r.get("failures") for r in rows) or not rows:
        raise RuntimeError(f"fedgov.simulate ({mechanism}): cooperatives failed, see {run_dir}")
    return rows


def floor_rounds(*, rounds: int, cooperatives: int, device: str, seed: int = 0) -> list[dict[str, Any]]:
    """The engine-free floor of the plain mechanism's rounds (same settings as ``simulate_rounds``)."""
    sets = {"train.rounds": rounds, "data.num_cooperatives": cooperatives, "seed": seed, "runtime.device": device}
    return run_floor(load_config(None, [f"{k}={v}" for k, v in sets.items()]))


def summarize(mechanism: str, rows: list[dict[str, Any]], *, device: str, engine: str = "pool") -> dict[str, Any]:
    """Median round latency and per-phase medians and shares, first round dropped."""
    timed = rows[1:] if len(rows) > 1 else rows
    seconds = [r["seconds"] for r in timed]
    median = statistics.median(seconds)
    bytes_moved = [r["bytes_up"] + r["bytes_down"] for r in timed if "bytes_up" in r]
    out: dict[str, Any] = {"kind": "round", "mechanism": mechanism, "device": device, "rounds_timed": len(timed),
                           "engine": "none" if mechanism == FLOOR else engine,
                           "round_seconds": median, "round_seconds_p99": percentile(seconds, 99),
                           "round_seconds_min": min(seconds),
                           "bytes_per_round": statistics.median(bytes_moved) if bytes_moved else 0,
                           "final_accuracy": rows[-1].get("accuracy")}
    named = 0.0
    for phase in TOP_PHASES + SUB_PHASES + ("global_evaluate",):
        values = [r["phase_seconds"][phase] for r in timed if phase in r.get("phase_seconds", {})]
        if values:
            out[f"{phase}_seconds"] = statistics.median(values)
            out[f"{phase}_share"] = out[f"{phase}_seconds"] / median if median else None
            if phase in TOP_PHASES or phase == "global_evaluate":
                named += out[f"{phase}_seconds"]
    out["other_seconds"] = max(0.0, median - named)
    out["other_share"] = out["other_seconds"] / median if median else None
    # Share of the round spent on cryptography the cooperatives and server do (not on messaging).
    crypto = sum(out.get(f"{p}_seconds", 0.0) for p in ("encrypt_max", "he_aggregate", "decrypt"))
    out["crypto_share"] = crypto / median if median else None
    return out


# The plain round on the pool engine, against the floor's round (issue: the engine's own cost).
TARGET_FLOOR_RATIO = 1.2


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    rounds = int(spec.get("rounds", 6))
    cooperatives = int(spec.get("cooperatives", 10))
    out = ctx.out / "work" / "round"
    rows = []
    for mechanism in spec.get("mechanisms", list(MECHANISMS)):
        ctx.step(f"{mechanism}: {rounds} rounds, {cooperatives} cooperatives on {ctx.device}")
        metrics = simulate_rounds(mechanism, rounds=rounds, cooperatives=cooperatives, device=ctx.device,
                                  out=out / mechanism)
        rows.append(summarize(mechanism, metrics, device=ctx.device))
    for engine in spec.get("plain_on_engines", []):  # the plain round on the other engines, for comparison
        ctx.step(f"none on {engine}'s engine: {rounds} rounds, {cooperatives} cooperatives on {ctx.device}")
        metrics = simulate_rounds("none", rounds=rounds, cooperatives=cooperatives, device=ctx.device,
                                  out=out / f"none-{engine}", engine=engine)
        rows.append(summarize("none", metrics, device=ctx.device, engine=engine))
    ctx.step(f"engine-free floor: {rounds} rounds, {cooperatives} cooperatives on {ctx.device}")
    rows.append(summarize(FLOOR, floor_rounds(rounds=rounds, cooperatives=cooperatives, device=ctx.device),
                          device=ctx.device))
    rows = split_costs(rows)
    return rows + verdicts(rows)


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plain pool round against ``TARGET_FLOOR_RATIO`` times the floor's round."""
    plain = next((r for r in rows if r.get("kind") == "round" and r["mechanism"] == "none"
                  and r["engine"] == "pool"), None)
    if plain is None or plain.get("floor_ratio") is None:
        return []
    return [{"kind": "target", "target": "plain pool round / floor round", "limit": TARGET_FLOOR_RATIO,
             "value": plain["floor_ratio"],
             "verdict": "meets" if plain["floor_ratio"] <= TARGET_FLOOR_RATIO else "misses"}]


def split_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's ratio to the plain pool round and to the floor, and its engine vs mechanism seconds.

    Engine seconds: what the plain round on that row's engine adds to the floor. Mechanism
    seconds: what this row adds to the plain round on its engine.
    """
    plain = {r["engine"]: r for r in rows if r["mechanism"] == "none"}
    base = plain.get("pool")
    floor = next((r for r in rows if r["mechanism"] == FLOOR), None)
    for r in rows:
        r["round_ratio"] = r["round_seconds"] / base["round_seconds"] if base else None
        r["floor_ratio"] = r["round_seconds"] / floor["round_seconds"] if floor else None
        if r["mechanism"] == FLOOR:
            continue
        own = plain.get(r["engine"])
        r["engine_seconds"] = own["round_seconds"] - floor["round_seconds"] if own and floor else None
        r["mechanism_seconds"] = r["round_seconds"] - own["round_seconds"] if own else None
    return rows


def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt  # fedgov.plots selects the Agg backend before pyplot loads

    rows = [r for r in rows if r.get("kind") == "round"]
    if not rows:
        return []
    # Stacked bars of what the round is made of; sub-phases carved out of train / aggregate.
    parts = [("local_train_max", "local training (slowest)"), ("encrypt_max", "encrypt (slowest)"),
             ("train_rest", "train: messaging, waiting"),
             ("others_train", "local training of the others, in turn (floor)"), ("secagg_setup", "SecAgg+ setup"),
             ("secagg_share_keys", "SecAgg+ share keys"), ("he_aggregate", "HE sum"), ("decrypt", "decrypt (incl. query to key holder)"),
             ("aggregate_rest", "aggregate: rest"), ("evaluate", "evaluate (cooperatives)"),
             ("global_evaluate", "global evaluation (floor)"), ("other", "other")]

    def value(r: dict[str, Any], key: str) -> float:
        get = lambda k: r.get(f"{k}_seconds") or 0.0  # noqa: E731
        floor = r["mechanism"] == FLOOR  # no messages: the rest of its train phase is the others' training
        if key in ("train_rest", "others_train"):
            rest = max(0.0, get("train") - get("local_train_max") - get("encrypt_max"))
            return rest if (key == "others_train") == floor else 0.0
        if key == "aggregate_rest":
            return max(0.0, get("aggregate") - get("he_aggregate") - get("decrypt"))
        return get(key)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    several_devices = len({x["device"] for x in rows}) > 1
    names = [row_label(r) + (f"\n({r['device']})" if several_devices else "") for r in rows]
    bottom = [0.0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for i, (key, label) in enumerate(parts):
        heights = [value(r, key) for r in rows]
        if not any(heights):
            continue
        ax.bar(names, heights, bottom=bottom, label=label, color=cmap(i % 20))
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, r in enumerate(rows):
        ax.annotate(f"{r['round_seconds']:.2f} s", (x, bottom[x]), ha="center", va="bottom", fontsize="small")
    ax.set_ylabel("seconds per round (median)")
    ax.set_title("Round latency by phase (floor: the same rounds without an engine)", fontweight="bold")
    _style(ax)
    ax.legend(fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return [_save(fig, out / "round.png", dpi=120)]


def row_label(r: dict[str, Any]) -> str:
    """``he``, ``none``; a row on Flower's engine says so: ``none (flower)``."""
    return r["mechanism"] if r["engine"] in ("pool", "none") else f"{r['mechanism']} ({r['engine']})"


def report(rows: list[dict[str, Any]]) -> str:
    targets = [r for r in rows if r.get("kind") == "target"]
    rows = [r for r in rows if r.get("kind") == "round"]
    if not rows:
        return "No round measurements.\n"
    lines = ["Median seconds per round after the first (default task), and the share of each phase "
             "(every mechanism on the pool engine; `(flower)`: Flower's own engine):", "",
             "| mechanism | device | s/round | x none | local training | encrypt | HE sum + decrypt | "
             "SecAgg+ key rounds | evaluate | crypto share | bytes/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(r: dict[str, Any], *keys: str) -> str:
        total = sum(r.get(f"{k}_share") or 0.0 for k in keys)
        return f"{100 * total:.0f}%" if any(r.get(f"{k}_share") is not None for k in keys) else "-"

    for r in rows:
        if r["mechanism"] == FLOOR:
            continue
        ratio = f"{r['round_ratio']:.2f}" if r.get("round_ratio") else "-"
        lines.append(f"| {row_label(r)} | {r['device']} | {r['round_seconds']:.3f} | {ratio} | "
                     f"{pct(r, 'local_train_max')} | {pct(r, 'encrypt_max')} | {pct(r, 'he_aggregate', 'decrypt')} | "
                     f"{pct(r, 'secagg_setup', 'secagg_share_keys')} | {pct(r, 'evaluate')} | "
                     f"{100 * (r.get('crypto_share') or 0):.0f}% | {r['bytes_per_round']:,.0f} |")
    text = "\n".join(lines) + "\n" + _engine_report(rows)
    for t in targets:
        text += (f"\nTarget: {t['target']} <= {t['limit']:g}: measured {t['value']:.2f}, **{t['verdict']}**.\n")
    return text


def _engine_report(rows: list[dict[str, Any]]) -> str:
    """Engine vs mechanism: each round against the plain round on its engine and the engine-free floor."""
    floor = next((r for r in rows if r["mechanism"] == FLOOR), None)
    if floor is None:
        return ""
    sec = lambda r, k: r.get(f"{k}_seconds") or 0.0  # noqa: E731
    lines = ["", f"The engine-free floor runs the same rounds (same cohorts, seeds and model: final accuracy "
             f"{floor['final_accuracy']:.4f}) with fedgov's own training and evaluation code in one process, "
             f"without Flower, the cooperatives one after another on one core: {floor['round_seconds']:.3f} s per round, of "
             f"which local training {sec(floor, 'train'):.3f} s (slowest cooperative "
             f"{sec(floor, 'local_train_max'):.3f} s) and the cooperatives' evaluation {sec(floor, 'evaluate'):.3f} s."]
    for base in (r for r in rows if r["mechanism"] == "none"):
        messaging = max(0.0, sec(base, "train") - sec(base, "local_train_max"))
        engine = "the pool engine" if base["engine"] == "pool" else f"{base['engine']}'s engine"
        lines.append(
            f"A plain round on {engine} takes {base['round_seconds']:.3f} s ({base['floor_ratio']:.2f}x the floor): "
            f"{base['engine_seconds']:+.3f} s of each round is the engine's. Of its train phase "
            f"({sec(base, 'train'):.3f} s) the slowest cooperative trains {sec(base, 'local_train_max'):.3f} s and "
            f"{messaging:.3f} s is messaging, waiting and the other cooperatives' training; its evaluation phase "
            f"takes {sec(base, 'evaluate'):.3f} s (the slowest cooperative's evaluation "
            f"{sec(base, 'local_evaluate_max'):.4f} s) against the floor's {sec(floor, 'evaluate'):.3f} s for all "
            f"the same evaluations.")
    lines += ["", "| mechanism | s/round | x plain pool round | x floor | engine s (plain - floor) | "
              "mechanism s (this - plain) | mechanism share of the round |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mechanism"] == FLOOR:
            lines.append(f"| floor (no engine) | {r['round_seconds']:.3f} | "
                         f"{r['round_ratio']:.2f} | 1.00 | - | - | - |" if r.get("round_ratio") else
                         f"| floor (no engine) | {r['round_seconds']:.3f} | - | 1.00 | - | - | - |")
            continue
        engine = r.get("engine_seconds")
        mech = r.get("mechanism_seconds")
        share = f"{100 * mech / r['round_seconds']:.0f}%" if mech is not None and r["round_seconds"] else "-"
        lines.append(f"| {row_label(r)} | {r['round_seconds']:.3f} | "
                     f"{r['round_ratio']:.2f} | {r['floor_ratio']:.2f} | "
                     f"{engine:+.3f} | {mech:+.3f} | {share} |" if engine is not None and mech is not None else
                     f"| {row_label(r)} | {r['round_seconds']:.3f} | - | - | - | - | - |")
    return "\n".join(lines) + "\n"
