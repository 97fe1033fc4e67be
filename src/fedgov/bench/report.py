"""report.md: the machine, the command, a headline table, and each suite's section with its figures."""

from __future__ import annotations

from typing import Any

from ..provenance import describe_code
from . import core
from .core import fmt

__all__ = ["headline_rows", "render_report"]


def headline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per mechanism: overhead ratios to plaintext, bytes per parameter, real-time verdicts."""
    meas = [r for r in rows if r.get("suite") == "aggregation" and r.get("kind") == "measurement"]
    out: list[dict[str, Any]] = []
    if meas:
        clients = max((r["clients"] for r in meas), key=lambda k: sum(1 for r in meas if r["clients"] == k))
        biggest = max(r["params"] for r in meas if r["clients"] == clients)
        for r in meas:
            if r["params"] == biggest and r["clients"] == clients:
                out.append({"mechanism": r["mechanism"] if not r.get("preset") else f"{r['mechanism']}/{r['preset']}",
                            "params": biggest, "clients": clients,
                            "client_ratio": r.get("client_seconds_ratio"), "server_ratio": r.get("server_seconds_ratio"),
                            "bytes_per_param": r["bytes_per_param"], "bytes_ratio": r.get("bytes_per_client_ratio")})
    return out


def render_report(results: dict[str, Any], figures: dict[str, list[str]]) -> str:
    m = results.get("machine", {})
    gpu = m.get("gpu") or "none"
    code = (describe_code(results["code"]) if results.get("code")
            else f"git {str(m.get('fedgov_commit') or 'unknown')[:12]}")  # written before results.json had it
    lines = ["# fedgov benchmark report", "",
             f"Command: `{results.get('invocation', 'python -m fedgov.bench')}`"
             f"{' (quick: small sizes, a smoke test)' if results.get('quick') else ''}", "",
             f"Machine: {m.get('cpu_model')} ({m.get('cpu_cores_usable')} usable cores of {m.get('cpu_cores')}), "
             f"{m.get('memory_gb')} GB RAM, GPU: {gpu}; training device: {results.get('device')}. "
             f"Python {m.get('python')}, " + ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items() if v)
             + f"; fedgov code: {code}.", "",
             f"Started {results.get('started')}, finished {results.get('finished') or '(still running)'}.", ""]
    head = headline_rows(results.get("rows", []))
    if head:
        r0 = head[0]
        lines += [f"## Headline: overhead against plaintext ({r0['params']:,} parameters, {r0['clients']} clients)", "",
                  "| mechanism | client time (x plain) | server time (x plain) | bytes/param | bytes (x plain) |",
                  "|---|---|---|---|---|"]
        for h in head:
            lines.append(f"| {h['mechanism']} | {fmt(h['client_ratio'])} | {fmt(h['server_ratio'])} | "
                         f"{h['bytes_per_param']:.2f} | {fmt(h['bytes_ratio'])} |")
        lines.append("")
    for name, info in results.get("suites", {}).items():
        lines += [f"## Suite `{name}`", ""]
        if info.get("status") != "ok":
            lines += [f"**Failed**: {info.get('error')}", ""]
            continue
        by = info.get("invocation") or results.get("invocation")
        lines.append(f"Measured in {info.get('seconds', 0):.0f} s by `{by}`"
                     f"{', started ' + info['started'] if info.get('started') else ''}.")
        lines.append("")
        if info.get("failed_measurements"):
            lines += [f"**{info['failed_measurements']} measurement(s) failed**; the rows below say why.", ""]
        if info.get("stale"):
            lines += [f"**Stale**: kept with `--reuse-stale` from a run by other code "
                      f"({describe_code(info.get('code'))}), not the code named above.", ""]
        rows = [r for r in results.get("rows", []) if r.get("suite") == name]
        try:
            lines.append(core.suite_module(name).report(rows))
        except Exception as exc:  # the numbers are in results.json either way
            lines.append(f"(report section failed: {type(exc).__name__}: {exc})")
        for fig in figures.get(name, []):
            lines += [f"![{name}]({fig})", ""]
    return "\n".join(lines) + "\n"
