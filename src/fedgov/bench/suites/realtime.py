"""Suite ``realtime``: is secure AI fast enough for real-time use? Measured against named budgets.

(a) Encrypted inference (CKKS) of a diagnostic model on scikit-learn's breast
cancer data, logistic regression and a small MLP: one-sample latency p50, p95
and p99 end to end (encrypt, send, evaluate on the server, return, decrypt) over
``samples`` timed requests (at least :data:`MIN_LATENCY_SAMPLES` in the full
suite), and batched throughput, against plaintext inference, with agreement of
the predictions (``fedgov.bench.inference``).

The measured latency is computed on one machine; for encrypted requests a
second verdict adds the time to move request and response over a link of
``link_mbps`` (default 100 Mbit/s), since ciphertexts are hundreds of kilobytes.

(b) How fresh a securely trained model can be: the shortest round period each
mechanism sustains on the default task (the p99 of its round latency) over
``freshness_rounds - 1`` timed rounds (the first is start-up; at least
:data:`MIN_FRESHNESS_ROUNDS` timed in the full suite). Taken from the ``round``
suite when it ran in the same invocation on the same device with at least as
many timed rounds, else measured here.

Each measurement is compared with the budgets in :data:`BUDGETS` (see
docs/realtime.md for their sources): a ``verdict`` row per (budget, case) with the
budget, the measured p99, ``meets`` or ``misses``, and the factor p99 / budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import BenchContext

# The full (non-quick) suite's floor: percentiles from fewer samples are too noisy to hold a budget to.
MIN_LATENCY_SAMPLES = 1000  # timed requests per (model, mode): p99 then rests on the 10 slowest
MIN_FRESHNESS_ROUNDS = 20  # timed rounds per mechanism (the first, start-up, is not timed)


@dataclass(frozen=True)
class Budget:
    name: str
    applies_to: str  # "inference" (one request) or "freshness" (one training round)
    seconds: float
    source: str


BUDGETS: tuple[Budget, ...] = (
    Budget("card-fraud scoring", "inference", 0.050,
           "commonly given 30-50 ms for fraud scoring inside a 100-200 ms card authorization window "
           "(industry practice, not a standard; the upper end is used)"),
    Budget("interactive decision support", "inference", 0.100,
           "0.1 s: the limit for a response to feel instantaneous (J. Nielsen, Usability Engineering, 1993, ch. 5)"),
    Budget("cardiac monitor alarm", "inference", 10.0,
           "10 s: the longest alarm condition delay IEC 60601-2-27 allows an ECG monitor"),
    Budget("per-second model refresh", "freshness", 1.0,
           "illustrative tier: a model updated every second from a transaction stream (no external source)"),
    Budget("per-minute model refresh", "freshness", 60.0,
           "illustrative tier: a model updated every minute (no external source)"),
)


def _verdict(budget: Budget, p99_seconds: float, case: dict[str, Any]) -> dict[str, Any]:
    factor = p99_seconds / budget.seconds
    return {"kind": "verdict", "part": budget.applies_to, "budget": budget.name, "budget_ms": budget.seconds * 1e3,
            **case, "p99_ms": p99_seconds * 1e3, "verdict": "meets" if p99_seconds <= budget.seconds else "misses",
            "factor": factor, "source": budget.source}


def _freshness(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    from . import round as round_suite

    wanted = list(spec.get("freshness_mechanisms", ["none", "dp", "he", "secagg+", "dp+he"]))
    rounds = int(spec.get("freshness_rounds", MIN_FRESHNESS_ROUNDS + 1))
    earlier = {r["mechanism"]: r for r in ctx.rows
               if r.get("suite") == "round" and r.get("kind") == "round" and r.get("device") == ctx.device
               and r.get("engine", "pool") == "pool"  # the engine simulate_rounds runs below
               and (r.get("rounds_timed") or 0) >= rounds - 1}  # no fewer rounds than asked for here
    rows = []
    for mechanism in wanted:
        if mechanism in earlier:
            rows.append({**earlier[mechanism], "kind": "freshness", "from_suite": "round"})
            continue
        ctx.step(f"freshness: {mechanism}, {rounds} rounds")
        metrics = round_suite.simulate_rounds(
            mechanism, rounds=rounds,
            cooperatives=int(spec.get("freshness_cooperatives", 10)), device=ctx.device,
            out=ctx.out / "work" / "realtime" / mechanism)
        rows.append({**round_suite.summarize(mechanism, metrics, device=ctx.device), "kind": "freshness",
                     "from_suite": "realtime"})
    keep = ("kind", "mechanism", "device", "round_seconds", "round_seconds_p99", "round_seconds_min",
            "rounds_timed", "from_suite")
    return [{k: r.get(k) for k in keep} for r in rows]


def check_sizes(spec: dict[str, Any], *, quick: bool) -> None:
    """The full suite's statistics floor (``--quick`` may go below it: a smoke test)."""
    if quick:
        return
    samples = int(spec.get("samples", 200))
    timed = int(spec.get("freshness_rounds", MIN_FRESHNESS_ROUNDS + 1)) - 1
    if samples < MIN_LATENCY_SAMPLES:
        raise ValueError(f"samples = {samples}: the full suite times at least {MIN_LATENCY_SAMPLES} requests "
                         f"per model and mode (use --quick for a smoke test)")
    if timed < MIN_FRESHNESS_ROUNDS:
        raise ValueError(f"freshness_rounds = {timed + 1}: the full suite times at least {MIN_FRESHNESS_ROUNDS} "
                         f"rounds after the first (freshness_rounds >= {MIN_FRESHNESS_ROUNDS + 1})")


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    from ..inference import run_encrypted_inference

    check_sizes(spec, quick=ctx.quick)
    rows: list[dict[str, Any]] = []
    inference = [{"kind": "inference", **r} for r in run_encrypted_inference(spec, ctx)]
    rows += inference
    link_mbps = float(spec.get("link_mbps", 100.0))
    for r in inference:
        cases = [(r["mode"], r["latency_p99_ms"] / 1e3)]
        if r["mode"] != "plain" and link_mbps > 0:
            # Ciphertexts are large: add the time to move them over a link (an assumption, stated).
            wire = ((r.get("request_bytes") or 0) + (r.get("response_bytes") or 0)) * 8 / (link_mbps * 1e6)
            cases.append((f"{r['mode']} + {link_mbps:g} Mbit/s link", r["latency_p99_ms"] / 1e3 + wire))
        for mode, seconds in cases:
            for budget in BUDGETS:
                if budget.applies_to == "inference":
                    rows.append(_verdict(budget, seconds, {"model": r["model"], "mode": mode,
                                                           "preset": r.get("preset"), "n": r.get("latency_n")}))
    fresh = _freshness(spec, ctx)
    rows += fresh
    for r in fresh:
        for budget in BUDGETS:
            if budget.applies_to == "freshness":
                rows.append(_verdict(budget, r["round_seconds_p99"], {"mechanism": r["mechanism"],
                                                                      "device": r["device"], "n": r["rounds_timed"]}))
    return rows


def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt  # fedgov.plots selects the Agg backend before pyplot loads

    inf = [r for r in rows if r.get("kind") == "inference"]
    fresh = [r for r in rows if r.get("kind") == "freshness"]
    if not inf and not fresh:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    budgets = {b.applies_to: [x for x in BUDGETS if x.applies_to == b.applies_to] for b in BUDGETS}
    for ax, items, label_of, value_of, part, title in (
            (axes[0], inf, lambda r: f"{r['model']}\n{r['mode']}", lambda r: r["latency_p99_ms"] / 1e3, "inference",
             "One diagnosis: p99 latency (s)"),
            (axes[1], fresh, lambda r: r["mechanism"], lambda r: r["round_seconds_p99"], "freshness",
             "One training round: p99 period (s)")):
        if not items:
            ax.axis("off")
            continue
        values = [value_of(r) for r in items]
        ax.bar([label_of(r) for r in items], values, color="#4C72B0", label="measured on one machine")
        tops = list(values)
        if part == "inference":  # the wire time the link verdicts add, stacked on top
            linked = {(v["model"], v["mode"].split(" + ")[0]): v["p99_ms"] / 1e3 for v in rows
                      if v.get("kind") == "verdict" and v.get("part") == "inference" and " + " in v.get("mode", "")}
            extra = [max(0.0, linked.get((r["model"], r["mode"]), v) - v) for r, v in zip(items, values)]
            if any(extra):
                ax.bar([label_of(r) for r in items], extra, bottom=values, color="#A1C4E8",
                       label="+ request and response over the stated link")
                tops = [v + e for v, e in zip(values, extra)]
        for i, v in enumerate(tops):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize="x-small")
        for j, b in enumerate(budgets.get(part, [])):
            ax.axhline(b.seconds, color=plt.get_cmap("Dark2")(j), linestyle="--", linewidth=1.2,
                       label=f"{b.name}: {b.seconds:g} s")
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(v for v in values if v > 0) / 4)  # plaintext bars are microseconds tall
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="x-small", frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        _style(ax)
    fig.suptitle("Real-time budgets against measured latency (log scale)", fontweight="bold")
    fig.tight_layout()
    return [_save(fig, out / "realtime.png", dpi=120)]


def report(rows: list[dict[str, Any]]) -> str:
    inf = [r for r in rows if r.get("kind") == "inference"]
    verdicts = [r for r in rows if r.get("kind") == "verdict"]
    lines = []
    if inf:
        lines += ["Encrypted inference on breast cancer (one sample end to end, percentiles over n timed "
                  "requests; batched throughput):", "",
                  "| model | mode | n | p50 (ms) | p95 (ms) | p99 (ms) | throughput (/s) | "
                  "request / response bytes | agreement | test accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in inf:
            n = r.get("latency_n") or r.get("n_samples")
            p95 = r.get("latency_p95_ms")
            lines.append(f"| {r['model']} | {r['mode']} | {n if n is not None else '-'} | "
                         f"{r['latency_p50_ms']:.3g} | {f'{p95:.3g}' if p95 is not None else '-'} | "
                         f"{r['latency_p99_ms']:.3g} | "
                         f"{r.get('throughput_per_s') or 0:,.0f} | {r.get('request_bytes') or 0:,} / "
                         f"{r.get('response_bytes') or 0:,} | {r.get('agreement', 1.0):.3f} | "
                         f"{r.get('test_accuracy') or 0:.3f} |")
        lines.append("")
    fresh = [r for r in rows if r.get("kind") == "freshness"]
    if fresh:
        lines += ["Training-round period (the default task; the first round, start-up, not timed):", "",
                  "| mechanism | device | rounds timed | median (s) | p99 (s) | from suite |",
                  "|---|---|---|---|---|---|"]
        for r in fresh:
            lines.append(f"| {r['mechanism']} | {r.get('device')} | {r.get('rounds_timed')} | "
                         f"{r['round_seconds']:.3g} | {r['round_seconds_p99']:.3g} | {r.get('from_suite')} |")
        lines.append("")
    if verdicts:
        lines += ["Verdicts (p99 against each budget, over n requests or rounds; factor = p99 / budget):", "",
                  "| budget | limit | case | n | measured p99 | verdict | factor |", "|---|---|---|---|---|---|---|"]
        for v in verdicts:
            case = (f"{v['model']} {v['mode']}" if v["part"] == "inference" else f"round, {v['mechanism']}")
            n = v.get("n")
            lines.append(f"| {v['budget']} | {v['budget_ms']:g} ms | {case} | {n if n is not None else '-'} | "
                         f"{v['p99_ms']:.3g} ms | "
                         f"{'meets' if v['verdict'] == 'meets' else '**misses**'} | {v['factor']:.3g}x |")
        lines += ["", "Budget sources:", ""]
        lines += [f"- {b.name} ({b.seconds:g} s): {b.source}" for b in BUDGETS]
    return "\n".join(lines) + "\n"
