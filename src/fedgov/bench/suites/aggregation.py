"""Suite ``aggregation``: what secure aggregation costs per client and at the server.

For each mechanism (plaintext FedAvg, HE with each preset, SecAgg+ masking, and the
NVIDIA FLARE reference row: TenSEAL CKKS N=8192 [60, 40, 40], one ciphertext per
layer), model size and number of clients: the client's time to prepare its upload
(serialize; encrypt; or quantize and mask), the server's time to aggregate, the
time to decrypt the aggregate, and the bytes each client uploads, each also as a
ratio to plaintext. Updates are shaped like a 2-layer MLP (two weight matrices and
two bias vectors) with values ~ N(0, 0.01), as model deltas are.

To keep memory and time bounded at 10^7 parameters and 100 clients, a few distinct
updates are encrypted (``distinct_updates``) and the server sums K of them,
repeating those: summing costs the same whatever the ciphertexts hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core import BenchContext, fit_power_law, fmt, time_call, time_paired

# Targets of fedgov's own code (issue: benchmark targets, not timed tests).
TARGET_ENCRYPT_US_PER_PARAM_PER_CORE = 0.25
TARGET_AGGREGATION_OVERHEAD = 1.2
TARGET_BYTES_RATIO = {"standard": 0.6, "compact": 0.2}  # of the FLARE reference row

MEASURED = ("client_seconds", "server_seconds", "decrypt_seconds", "bytes_per_client")


def update_shapes(params: int) -> list[tuple[int, ...]]:
    """Layer shapes of a 2-layer-MLP-like update with exactly ``params`` values."""
    b1 = max(1, int(math.sqrt(params)) // 2)
    b2 = min(10, max(1, params // 100))
    w2 = max(1, params // 10)
    w1 = params - b1 - w2 - b2
    if w1 < 1:
        return [(params,)]
    return [(w1,), (b1,), (w2,), (b2,)]


def _updates(params: int, count: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(0.0, 0.01, s).astype(np.float32) for s in update_shapes(params)] for _ in range(count)]


def _repeat(spec: dict[str, Any], params: int) -> int:
    return int(spec.get("repeat_large", 1)) if params >= int(spec.get("large", 5_000_000)) else int(spec.get("repeat", 3))


def _plain(updates: list[list[np.ndarray]], clients: int, repeat: int) -> dict[str, Any]:
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    x = updates[0]
    blobs = [[ndarray_to_bytes(a) for a in u] for u in updates]
    weights = np.full(clients, 1.0 / clients)

    def server() -> None:  # what FedAvg does: decode every upload, weighted sum
        acc = [np.zeros(a.shape, dtype=np.float64) for a in x]
        for k in range(clients):
            for j, b in enumerate(blobs[k % len(blobs)]):
                acc[j] += weights[k] * bytes_to_ndarray(b)
        [a.astype(np.float32) for a in acc]

    return {"client_seconds": time_call(lambda: [ndarray_to_bytes(a) for a in x], repeat=repeat).median,
            "server_seconds": time_call(server, repeat=repeat).median,
            "decrypt_seconds": 0.0,
            "bytes_per_client": sum(len(b) for b in blobs[0])}


def _he(preset: str, updates: list[list[np.ndarray]], clients: int, repeat: int, *,
        cores: int, measure_client: bool, min_seconds: float = 0.0) -> dict[str, Any]:
    from ... import crypto
    from ..he_reference import max_abs_error, plaintext_fedavg, tenseal_direct_sum

    mode = "custodian" if preset == "flare" else "clients"  # FLARE encrypts with the public key
    keys = crypto.generate_keys(preset, mode=mode)
    enc_ctx = keys if mode == "clients" else crypto.PublicContext.from_bytes(keys.public_context().to_bytes())
    public = keys.public_context()
    weight = 1.0 / clients
    blobs = [crypto.encrypt_update(u, context=enc_ctx, weight=weight, workers=cores).to_bytes() for u in updates]
    row: dict[str, Any] = {"bytes_per_client": len(blobs[0])}
    if measure_client:
        row["client_seconds"] = time_call(
            lambda: crypto.encrypt_update(updates[0], context=enc_ctx, weight=weight, workers=cores).to_bytes(),
            repeat=repeat).median
        row["client_seconds_1core"] = time_call(
            lambda: crypto.encrypt_update(updates[0], context=enc_ctx, weight=weight, workers=1).to_bytes(),
            repeat=repeat, warmup=0).median
    cohort = [blobs[k % len(blobs)] for k in range(clients)]
    chunks = [crypto.EncryptedUpdate.from_bytes(b).chunk_bytes() for b in blobs]
    cohort_chunks = [chunks[k % len(chunks)] for k in range(clients)]
    ours, raw = time_paired(lambda: crypto.aggregate(cohort, context=public).to_bytes(),
                            lambda: tenseal_direct_sum(cohort_chunks, context=public),
                            repeat=repeat, min_seconds=min_seconds)
    row["server_seconds"], row["server_raw_seconds"] = ours.median, raw.median
    total = crypto.aggregate(cohort, context=public).to_bytes()
    row["decrypt_seconds"] = time_call(lambda: crypto.decrypt_aggregate(total, keys=keys), repeat=repeat).median
    expected = plaintext_fedavg([updates[k % len(updates)] for k in range(clients)], [weight] * clients)
    row["max_abs_error"] = max_abs_error(crypto.decrypt_aggregate(total, keys=keys), expected)
    return row


def _secagg(updates: list[list[np.ndarray]], clients: int, repeat: int, *, spec: dict[str, Any]) -> dict[str, Any]:
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    from ...crypto.secagg_masking import MaskingCohort

    cohort = MaskingCohort(clients, num_shares=int(spec.get("secagg_num_shares", 3)),
                           threshold=int(spec.get("secagg_threshold", 2)))
    weight = 1.0 / clients

    def client() -> list[bytes]:
        return [ndarray_to_bytes(a) for a in cohort.mask(0, updates[0], weight=weight)]

    masked = [[ndarray_to_bytes(a) for a in cohort.mask(k, updates[k % len(updates)], weight=weight)]
              for k in range(clients)]

    def server() -> list[np.ndarray]:
        return cohort.unmask([[bytes_to_ndarray(b) for b in m] for m in masked], list(range(clients)))

    result = server()
    expected = [sum(updates[k % len(updates)][j].astype(np.float64) for k in range(clients)) / clients
                for j in range(len(updates[0]))]
    return {"client_seconds": time_call(client, repeat=repeat).median,
            "server_seconds": time_call(server, repeat=repeat).median,
            "decrypt_seconds": 0.0,
            "bytes_per_client": sum(len(b) for b in masked[0]) + cohort.setup_bytes,
            "setup_seconds": cohort.setup_seconds,
            "max_abs_error": max(float(np.max(np.abs(r - e))) for r, e in zip(result, expected))}


def _mechanisms(spec: dict[str, Any]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [("plain", None)]
    out += [("he", p) for p in spec.get("presets", ["standard", "compact"])]
    if spec.get("flare_reference", True):
        out.append(("he", "flare"))
    if spec.get("secagg", True):
        out.append(("secagg+", None))
    return out


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    params_list = [int(p) for p in spec.get("params", [1000, 10_000, 100_000, 1_000_000, 10_000_000])]
    clients_list = [int(k) for k in spec.get("clients", [2, 10, 100])]
    fixed_clients = int(spec.get("clients_for_param_sweep", 10))
    fixed_params = int(spec.get("params_for_client_sweep", 100_000))
    distinct = int(spec.get("distinct_updates", 2))
    cores = int(ctx.machine.get("cpu_cores_usable") or 1)
    cases = [(p, fixed_clients) for p in params_list] + [(fixed_params, k) for k in clients_list if k != fixed_clients]
    rows: list[dict[str, Any]] = []
    for mechanism, preset in _mechanisms(spec):
        name = mechanism if preset is None else f"{mechanism}/{preset}"
        measured_client: dict[int, dict[str, Any]] = {}
        for params, clients in cases:
            ctx.step(f"{name}: {params:,} parameters, {clients} clients")
            repeat = _repeat(spec, params)
            updates = _updates(params, distinct, seed=params)
            first = params not in measured_client  # client cost does not depend on the cohort size
            if mechanism == "plain":
                row = _plain(updates, clients, repeat)
            elif mechanism == "he":
                row = _he(preset or "standard", updates, clients, repeat, cores=cores, measure_client=first,
                          min_seconds=float(spec.get("min_seconds", 0.0)))
            else:
                row = _secagg(updates, clients, repeat, spec=spec)
            if mechanism == "he":
                if first:
                    measured_client[params] = {k: row[k] for k in ("client_seconds", "client_seconds_1core")}
                row.update({k: v for k, v in measured_client[params].items() if k not in row})
                row["server_overhead"] = row["server_seconds"] / row["server_raw_seconds"]
                row["client_us_per_param_per_core"] = row["client_seconds"] * cores / params * 1e6
                row["client_us_per_param_1core"] = row["client_seconds_1core"] / params * 1e6
            rows.append({"kind": "measurement", "mechanism": mechanism, "preset": preset,
                         "reference": preset == "flare", "params": params, "clients": clients,
                         "cores": cores, "repeat": repeat, **row,
                         "bytes_per_param": row["bytes_per_client"] / params})
    _add_ratios(rows)
    rows += _fits(rows, fixed_clients=fixed_clients, fixed_params=fixed_params)
    rows += _targets(rows, cores=cores)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    plain = {(r["params"], r["clients"]): r for r in rows if r["mechanism"] == "plain"}
    for r in rows:
        base = plain.get((r["params"], r["clients"]))
        for key in ("client_seconds", "server_seconds", "bytes_per_client"):
            r[f"{key}_ratio"] = r[key] / base[key] if base and base[key] else None


def _label(row: dict[str, Any]) -> str:
    return row["mechanism"] if not row.get("preset") else f"{row['mechanism']}/{row['preset']}"


def _fits(rows: list[dict[str, Any]], *, fixed_clients: int, fixed_params: int) -> list[dict[str, Any]]:
    """Scaling exponents b of cost ~ a x^b: against parameters (fixed clients) and clients (fixed size)."""
    out = []
    for label in dict.fromkeys(_label(r) for r in rows):
        mine = [r for r in rows if _label(r) == label]
        by_params = [r for r in mine if r["clients"] == fixed_clients]
        by_clients = [r for r in mine if r["params"] == fixed_params]
        for metric in MEASURED:
            for against, group in (("params", by_params), ("clients", by_clients)):
                if against == "clients" and metric != "server_seconds":
                    continue  # per-client costs do not depend on the cohort size
                pts = [(r[against], r[metric]) for r in group if r.get(metric)]
                b, a = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
                if not math.isnan(b):
                    out.append({"kind": "fit", "mechanism": mine[0]["mechanism"], "preset": mine[0]["preset"],
                                "metric": metric, "against": against, "exponent": b, "factor": a,
                                "points": len(pts)})
    return out


def _targets(rows: list[dict[str, Any]], *, cores: int) -> list[dict[str, Any]]:
    meas = [r for r in rows if r["kind"] == "measurement"]
    out = []
    for preset in ("standard", "compact"):
        he_rows = [r for r in meas if r["mechanism"] == "he" and r["preset"] == preset]
        if not he_rows:
            continue
        big = max(he_rows, key=lambda r: (r["params"], -r["clients"]))
        value = big["client_us_per_param_per_core"]
        out.append({"kind": "target", "preset": preset, "target": "encryption_us_per_param_per_core",
                    "value": value, "limit": TARGET_ENCRYPT_US_PER_PARAM_PER_CORE, "params": big["params"],
                    "cores": cores, "met": value <= TARGET_ENCRYPT_US_PER_PARAM_PER_CORE,
                    "note": f"wall time with {cores} encrypting processes x {cores} cores / parameters; "
                            f"one process alone: {big['client_us_per_param_1core']:.3f}"})
        worst = max(he_rows, key=lambda r: r["server_overhead"])
        out.append({"kind": "target", "preset": preset, "target": "aggregation_over_raw_tenseal",
                    "value": worst["server_overhead"], "limit": TARGET_AGGREGATION_OVERHEAD,
                    "params": worst["params"], "clients": worst["clients"],
                    "met": worst["server_overhead"] <= TARGET_AGGREGATION_OVERHEAD,
                    "note": "largest ratio over all sizes and cohorts"})
        flare = {(r["params"], r["clients"]): r for r in meas if r["preset"] == "flare"}
        ratios = [(r["bytes_per_client"] / flare[(r["params"], r["clients"])]["bytes_per_client"], r)
                  for r in he_rows if (r["params"], r["clients"]) in flare]
        if ratios and preset in TARGET_BYTES_RATIO:
            ratio, r = max(ratios, key=lambda t: t[0])
            out.append({"kind": "target", "preset": preset, "target": "bytes_over_flare_reference",
                        "value": ratio, "limit": TARGET_BYTES_RATIO[preset], "params": r["params"],
                        "met": ratio <= TARGET_BYTES_RATIO[preset], "note": "largest ratio over all sizes"})
    return out


# ---- figures and report -------------------------------------------------------------------

def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt  # fedgov.plots selects the Agg backend before pyplot loads

    meas = [r for r in rows if r.get("kind") == "measurement"]
    if not meas:
        return []
    fits = {(r["mechanism"], r["preset"], r["metric"], r["against"]): r["exponent"]
            for r in rows if r.get("kind") == "fit"}
    clients_fixed = max((r["clients"] for r in meas), key=lambda k: sum(1 for r in meas if r["clients"] == k))
    params_fixed = max((r["params"] for r in meas), key=lambda p: sum(1 for r in meas if r["params"] == p))
    labels = list(dict.fromkeys(_label(r) for r in meas))
    panels = [("client_seconds", "client: prepare upload (s)", "params"),
              ("server_seconds", "server: aggregate (s)", "params"),
              ("decrypt_seconds", "decrypt aggregate (s)", "params"),
              ("bytes_per_client", "bytes uploaded per client", "params"),
              ("server_seconds", f"server: aggregate (s), {params_fixed:,} parameters", "clients")]
    fig, axes = plt.subplots(3, 2, figsize=(11, 11))
    flat = [ax for row in axes for ax in row]
    for ax, (metric, title, against) in zip(flat, panels):
        for i, label in enumerate(labels):
            mine = [r for r in meas if _label(r) == label and r.get(metric)
                    and (r["clients"] == clients_fixed if against == "params" else r["params"] == params_fixed)]
            mine.sort(key=lambda r: r[against])
            if not mine:
                continue
            key = (mine[0]["mechanism"], mine[0]["preset"], metric, against)
            slope = f" (slope {fits[key]:.2f})" if key in fits else ""
            ax.plot([r[against] for r in mine], [r[metric] for r in mine], marker="o",
                    linestyle="--" if mine[0].get("reference") else "-", label=f"{label}{slope}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters" if against == "params" else "clients")
        ax.set_title(title if against == "clients" else f"{title}, {clients_fixed} clients", fontsize="medium")
        _style(ax)
        ax.legend(fontsize="x-small", frameon=False)
    flat[-1].axis("off")
    fig.suptitle("Aggregation cost by mechanism (log-log; slope = fitted scaling exponent)", fontweight="bold")
    fig.tight_layout()
    return [_save(fig, out / "aggregation.png", dpi=120)]


def report(rows: list[dict[str, Any]]) -> str:
    meas = [r for r in rows if r.get("kind") == "measurement"]
    if not meas:
        return "No aggregation measurements.\n"
    clients_fixed = max((r["clients"] for r in meas), key=lambda k: sum(1 for r in meas if r["clients"] == k))
    biggest = max(r["params"] for r in meas if r["clients"] == clients_fixed)
    lines = [f"Per client and at the server, {biggest:,} parameters, {clients_fixed} clients "
             f"(ratios to plaintext FedAvg in brackets):", "",
             "| mechanism | client prepares upload (s) | server aggregates (s) | decrypt (s) | bytes/param | max abs error |",
             "|---|---|---|---|---|---|"]
    for r in meas:
        if r["params"] != biggest or r["clients"] != clients_fixed:
            continue
        ref = " (FLARE reference)" if r.get("reference") else ""
        lines.append(f"| {_label(r)}{ref} | {fmt(r['client_seconds'])} [{fmt(r.get('client_seconds_ratio'))}x] "
                     f"| {fmt(r['server_seconds'])} [{fmt(r.get('server_seconds_ratio'))}x] "
                     f"| {fmt(r['decrypt_seconds'])} | {r['bytes_per_param']:.2f} "
                     f"| {fmt(r.get('max_abs_error'))} |")
    fits = [r for r in rows if r.get("kind") == "fit" and r["metric"] == "server_seconds"]
    if fits:
        lines += ["", "Fitted scaling exponents of server aggregation time (cost ~ x^b):", "",
                  "| mechanism | b vs parameters | b vs clients |", "|---|---|---|"]
        for label in dict.fromkeys(_label(r) for r in fits):
            by = {r["against"]: r["exponent"] for r in fits if _label(r) == label}
            lines.append(f"| {label} | {fmt(by.get('params'))} | {fmt(by.get('clients'))} |")
    targets = [r for r in rows if r.get("kind") == "target"]
    if targets:
        lines += ["", "Targets for fedgov's own code:", "", "| preset | target | measured | limit | met |",
                  "|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['preset']} | {t['target']} | {t['value']:.3f} | {t['limit']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        notes = [f"{t['preset']} {t['target']}: {t['note']}" for t in targets if t.get("note")]
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
