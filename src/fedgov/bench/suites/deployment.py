"""Suite ``deployment``: what encrypted links and admitted members cost on Flower's Deployment Engine.

The same federation runs twice on 127.0.0.1, in turn, ``repeats`` times: once in clear text
(``--insecure``, the one-laptop shortcut) and once as docs/deployment.md sets it up (TLS with
``python -m fedgov.tls``'s files, SuperNode authentication, every member registered with its own
key from ``python -m fedgov.member_key``). One SuperLink, ``members`` SuperNodes, ``rounds``
rounds of the default task (digits, IID), submitted with ``flwr run``; the cooperatives evaluate
after the last round only, so that a round is the training round trip.

Per run: whether every round completed with every member; the seconds per round (median of
metrics.jsonl's ``seconds``); fedgov's payload bytes per round (the models sent and received);
the bytes that crossed the loopback interface per round (``/proc/net/dev``'s ``lo``, both
directions: payload, HTTP and TLS framing, heartbeats and polling; other loopback traffic on the
machine lands there too); and the peak memory of the SuperLink with everything it started (the
ServerApp among them), sampled a few times a second (PSS and RSS sums, ``fedgov.bench.processes``).
The ``ratio`` row divides the secure run's figures by the clear-text run's of the same repeat
(the median over repeats), so that a slow spell of a shared machine hits both alike.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...results import read_json, read_jsonl
from ..core import BenchContext, fmt
from ..processes import MARKER, tagged_memory

TRANSPORTS = ("insecure", "tls+auth")
RATIO_KEYS = ("seconds_per_round", "loopback_bytes_per_round", "payload_bytes_per_round",
              "superlink_peak_pss_bytes", "superlink_peak_rss_bytes", "wall_seconds")


def loopback_bytes() -> int | None:
    """Bytes received plus sent on the loopback interface so far (None without /proc/net/dev)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            fields = counters.split()
            return int(fields[0]) + int(fields[8])
    return None


class _MemorySampler:
    """The highest PSS and RSS sums of the processes carrying a marker, sampled every 0.2 s."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.peak_rss: int | None = None
        self.peak_pss: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss, pss, _ = tagged_memory(self.tag)
            self.peak_rss = max(self.peak_rss or 0, rss)
            if pss is not None:
                self.peak_pss = max(self.peak_pss or 0, pss)

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def measure_federation(transport: str, *, members: int, rounds: int, work: Path, deadline_s: float,
                       app_dir: Path) -> dict[str, Any]:
    """One federation, started, run and stopped: the row of measurements described above."""
    from ...member_key import make_member_key
    from ...tls import make_tls_files
    from ..flower_processes import (FlowerProcesses, flower_bin, flower_environment, flwr_run, free_ports,
                                    register_supernode, start_member, start_secure_superlink, wait_for_summary,
                                    write_connection)

    if transport not in TRANSPORTS:
        raise ValueError(f"transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
    work = work.resolve()  # `flwr` runs in the checkout: a relative --out would name other folders there
    work.mkdir(parents=True, exist_ok=True)
    env = flower_environment(work)
    procs = FlowerProcesses(work / "logs", env)
    tag = uuid.uuid4().hex
    connection, out = "fedgov-bench", work / "runs"
    row: dict[str, Any] = {"kind": "federation", "transport": transport, "members": members, "rounds": rounds}
    try:
        if transport == "insecure":
            superlink, port = procs.start_http_service("superlink", lambda p: [
                flower_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(p)], extra_env={MARKER: tag})
            write_connection(Path(env["FLWR_HOME"]), connection, port)
            for c in range(members):
                procs.start(f"supernode-{c}", [
                    flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                    "--host", "127.0.0.1", "--port", str(free_ports(1)[0]), "--node-config",
                    f"partition-id={c} num-partitions={members}"])
        else:
            tls = make_tls_files(work / "tls", ["127.0.0.1", "localhost"])
            keys = [make_member_key(work / "keys" / f"coop-{c}") for c in range(members)]
            superlink, port = start_secure_superlink(procs, tls, extra_env={MARKER: tag})
            write_connection(Path(env["FLWR_HOME"]), connection, port, root_certificates=tls.ca_certificate)
            with ThreadPoolExecutor(max_workers=4) as pool:  # registration is outside what is measured
                list(pool.map(lambda key: register_supernode(procs, app_dir, connection, key[1]), keys))
            for c in range(members):
                start_member(procs, f"supernode-{c}", port, tls, keys[c][0],
                             f"partition-id={c} num-partitions={members}", wait=False)
        overrides = [f"data.num_cooperatives={members}", f"train.rounds={rounds}", 'data.partition="iid"',
                     f"train.evaluate_every={rounds}", f"runtime.out={json.dumps(str(out))}"]
        lo_before, started = loopback_bytes(), time.perf_counter()
        with _MemorySampler(tag) as memory:
            run_id = flwr_run(procs, app_dir, connection, run_config=overrides)
            run_dir = wait_for_summary(procs, out, run_id, superlink.log, deadline_s=deadline_s)
        wall = time.perf_counter() - started
        lo_after = loopback_bytes()
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        complete = [r for r in metrics if r["participants"] == members and not r["failures"]]
        row.update({
            "status": "ok", "rounds_completed": len(metrics), "rounds_with_every_member": len(complete),
            "seconds_per_round": statistics.median(r["seconds"] for r in metrics),
            "payload_bytes_per_round": statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in metrics),
            "loopback_bytes_per_round": ((lo_after - lo_before) / len(metrics)
                                         if lo_before is not None and lo_after is not None else None),
            "superlink_peak_pss_bytes": memory.peak_pss, "superlink_peak_rss_bytes": memory.peak_rss,
            "wall_seconds": wall, "final_accuracy": summary["final_accuracy"],
        })
    except Exception as exc:  # noqa: BLE001 - a failed federation is a row, with its cause
        row.update({"status": "failed", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    finally:
        procs.stop_all()
    return row


def ratio_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The secure run's figures over the clear-text run's, repeat by repeat (the median of each)."""
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "federation" and r.get("status") == "ok":
            by_repeat.setdefault(r["repeat"], {})[r["transport"]] = r
    pairs = [(p["tls+auth"], p["insecure"]) for p in by_repeat.values() if set(p) == set(TRANSPORTS)]
    if not pairs:
        return None
    ratio: dict[str, Any] = {"kind": "ratio", "pairs": len(pairs)}
    for key in RATIO_KEYS:
        values = [s[key] / c[key] for s, c in pairs if s.get(key) and c.get(key)]
        ratio[f"{key}_ratio"] = statistics.median(values) if values else None
        ratio[f"{key}_ratios"] = values
    return ratio


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    root = Path(__file__).resolve().parents[4]  # the checkout: `flwr run` packs its Flower App from here
    if not (root / "pyproject.toml").is_file():
        raise RuntimeError(f"{root}: no pyproject.toml; the deployment suite runs from a checkout of fedgov")
    rows: list[dict[str, Any]] = []
    for repeat in range(int(spec["repeats"])):
        for transport in TRANSPORTS:
            ctx.step(f"{spec['members']} SuperNodes, {spec['rounds']} rounds, {transport} (repeat {repeat + 1})")
            row = measure_federation(transport, members=int(spec["members"]), rounds=int(spec["rounds"]),
                                     work=ctx.out / "work" / "deployment" / f"{transport}-{repeat}",
                                     deadline_s=float(spec["timeout_seconds"]), app_dir=root)
            rows.append({**row, "repeat": repeat})
    if (ratio := ratio_row(rows)) is not None:
        rows.append(ratio)
    return rows


def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt

    ok = [r for r in rows if r.get("kind") == "federation" and r.get("status") == "ok"]
    if not ok:
        return []
    measures = (("seconds_per_round", "seconds per round", 1.0), ("loopback_bytes_per_round", "MB per round on the "
                "loopback", 1e6), ("superlink_peak_pss_bytes", "SuperLink + ServerApp peak memory (MB, PSS)", 1e6))
    fig, axes = plt.subplots(1, len(measures), figsize=(12, 3.6))
    for ax, (key, label, unit) in zip(axes, measures):
        for i, transport in enumerate(TRANSPORTS):
            values = [r[key] / unit for r in ok if r["transport"] == transport and r.get(key) is not None]
            if values:
                ax.bar(i, statistics.median(values), color=("#9e9e9e", "#1f77b4")[i], width=0.6)
                ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(TRANSPORTS)), ["clear text", "TLS + registered keys"])
        ax.set_title(label, fontsize="small", fontweight="bold")
        _style(ax)
    fig.suptitle(f"{ok[0]['members']} SuperNodes on one machine, {ok[0]['rounds']} rounds (bars: median; dots: runs)",
                 fontsize="small")
    return [_save(fig, out / "deployment.png", dpi=120)]


def report(rows: list[dict[str, Any]]) -> str:
    runs = [r for r in rows if r.get("kind") == "federation"]
    if not runs:
        return "No deployment measurements.\n"
    mb = lambda b: fmt(b / 1e6) if b else "-"  # noqa: E731
    lines = ["One SuperLink and its SuperNodes on 127.0.0.1, the default task, clear text against TLS with "
             "registered member keys, in turn. Loopback bytes are everything that crossed `lo` during the run "
             "(payload, HTTP and TLS framing, heartbeats, polling); peak memory is the SuperLink's with every "
             "process it started (the ServerApp among them):", "",
             "| repeat | transport | members | rounds done | rounds with every member | s/round (median) | "
             "payload MB/round | loopback MB/round | SuperLink peak MB (PSS) | RSS sum MB | wall s | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("status") != "ok":
            lines.append(f"| {r['repeat'] + 1} | {r['transport']} | {r['members']} | failed: {r.get('error')} "
                         f"| | | | | | | | |")
            continue
        lines.append(f"| {r['repeat'] + 1} | {r['transport']} | {r['members']} | {r['rounds_completed']} of "
                     f"{r['rounds']} | {r['rounds_with_every_member']} | {fmt(r['seconds_per_round'])} | "
                     f"{mb(r['payload_bytes_per_round'])} | {mb(r['loopback_bytes_per_round'])} | "
                     f"{mb(r['superlink_peak_pss_bytes'])} | {mb(r['superlink_peak_rss_bytes'])} | "
                     f"{fmt(r['wall_seconds'])} | {fmt(r['final_accuracy'])} |")
    ratio = next((r for r in rows if r.get("kind") == "ratio"), None)
    if ratio is not None:
        named = ", ".join(f"{key.replace('_', ' ')} x{fmt(ratio[f'{key}_ratio'])}"
                          for key in RATIO_KEYS if ratio.get(f"{key}_ratio") is not None)
        lines += ["", f"TLS with registered keys against clear text, the median over {ratio['pairs']} pair(s) "
                      f"of runs: {named}."]
    return "\n".join(lines) + "\n"
