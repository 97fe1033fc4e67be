"""``python -m fedgov.bench``: run the overhead benchmark suites and write results, figures and a report.

Suites are defined in ``benchmarks/<name>.toml`` (a ``[suite]`` table, and a
``[quick]`` table merged over it under ``--quick``) and implemented in
``fedgov.bench.suites.<name>``. Output (default
``benchmarks/results/<machine>-<date>/``): ``results.json`` (machine, invocation,
per-suite status and every row), ``results.csv`` (the rows), ``<suite>*.png`` and
``report.md``. Results are written after each suite; running the same command
again keeps the suites already finished with the same definition, device and
``--quick`` flag by the same code (the same fedgov sources, see
:mod:`fedgov.provenance`; ``--fresh`` measures everything asked for again). A
suite measured by other code is measured again; one not asked for this time is
dropped from ``results.json``. With ``--reuse-stale`` such suites are kept
instead, and marked ``stale`` (with the code that measured them) in
``results.json``, ``results.csv`` and the report. ``results.json`` ``code`` is the
code that measured every suite not marked stale; the suites record only its
``source_hash``, so a folder with no stale suite names one code version.
"""

from __future__ import annotations

import argparse
import csv
import io
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..provenance import code_version, describe_code, same_code
from ..results import atomic_write_text, read_json, write_json
from . import core
from .core import BenchContext
from .machine import describe_machine, machine_slug

import tomllib

__all__ = ["SUITES", "BenchError", "load_suite_spec", "main", "run_benchmarks"]

SUITES = ("aggregation", "dp_training", "round", "realtime", "scale", "deployment")


class BenchError(ValueError):
    """Bad command-line input or suite definition, phrased as one line."""


def default_suites_dir() -> Path:
    here = Path.cwd() / "benchmarks"
    if (here / "aggregation.toml").is_file():
        return here
    return Path(__file__).resolve().parents[3] / "benchmarks"  # a source checkout


def load_suite_spec(suites_dir: Path, name: str, *, quick: bool) -> dict[str, Any]:
    path = suites_dir / f"{name}.toml"
    if not path.is_file():
        raise BenchError(f"{path}: no such suite definition (suites: {', '.join(SUITES)})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"{path}: not valid TOML ({exc})") from None
    for key in raw:
        if key not in ("suite", "quick"):
            raise BenchError(f"{path}: {key}: unknown table (a suite file holds [suite] and [quick])")
    spec = dict(raw.get("suite", {}))
    if quick:
        for key, value in raw.get("quick", {}).items():
            if key not in spec:
                raise BenchError(f"{path}: quick.{key}: not a key of [suite]")
            spec[key] = value
    return spec


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to PyTorch (use --device cpu or auto)")
    return name


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


class _Progress:
    """One status line per step on stderr, with the time since the suite started."""

    def __init__(self) -> None:
        self.suite = ""
        self.started = time.perf_counter()

    def start(self, suite: str) -> None:
        self.suite, self.started = suite, time.perf_counter()
        print(f"[{suite}] starting", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        print(f"[{self.suite} {time.perf_counter() - self.started:6.1f} s] {message}", file=sys.stderr, flush=True)


def _stale_suites(results: dict[str, Any]) -> set[str]:
    return {name for name, info in results.get("suites", {}).items() if info.get("stale")}


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.csv, figures and report.md, all from the saved results."""
    write_json(out / "results.json", results)
    rows = results["rows"]
    stale = _stale_suites(results)
    atomic_write_text(out / "results.csv", _csv_text([{**r, "stale": r.get("suite") in stale} for r in rows]))
    from .report import render_report

    figures: dict[str, list[str]] = {}
    for name in results["suites"]:
        mine = [r for r in rows if r.get("suite") == name]
        if not mine:
            continue
        try:
            figures[name] = [p.name for p in core.suite_module(name).figures(mine, out)]
        except Exception as exc:  # a figure must not lose the measurements
            results["suites"][name].setdefault("figure_error", f"{type(exc).__name__}: {exc}")
    atomic_write_text(out / "report.md", render_report(results, figures))


def _made_by(info: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any] | None:
    """The code that measured a suite of an earlier results.json (None: not recorded)."""
    if info.get("stale"):
        return info.get("code")
    if info.get("source_hash"):  # measured by the code that file names (same sources, maybe another commit)
        return {**(earlier.get("code") or {}), "source_hash": info["source_hash"]}
    return None  # written before fedgov recorded the code


def run_benchmarks(*, suites: list[str], quick: bool, device: str, out: Path, suites_dir: Path,
                   fresh: bool = False, argv: list[str] | None = None, reuse_stale: bool = False,
                   code: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``suites`` into ``out``, keeping what ``out`` already holds where it may be kept.

    ``code``: the code running now (default :func:`fedgov.provenance.code_version`).
    """
    specs = {name: load_suite_spec(suites_dir, name, quick=quick) for name in suites}
    out.mkdir(parents=True, exist_ok=True)
    code = dict(code) if code is not None else code_version()
    machine = describe_machine()
    earlier: dict[str, Any] = {}
    if (out / "results.json").is_file():
        try:
            earlier = read_json(out / "results.json")
        except (OSError, ValueError):
            earlier = {}
    results: dict[str, Any] = {
        "invocation": shlex.join(["python", "-m", "fedgov.bench", *(argv or [])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished": None,
        "quick": quick,
        "device": device,
        "code": code,  # the code that measured every suite not marked stale
        "reuse_stale": reuse_stale,
        "machine": machine,
        "suites": {},
        "rows": [],
    }
    # Keep suites that finished earlier with the same definition, device, quick flag and code; suites
    # not asked for this time stay as they were (a folder can be filled one suite at a time).
    same_setup = earlier.get("quick") == quick and earlier.get("device") == device
    for name, info in (earlier.get("suites") or {}).items():
        if not same_setup or not isinstance(info, dict):
            continue
        made = _made_by(info, earlier)
        current = same_code(made, code)
        if name in specs:
            keep = (not fresh and info.get("status") == "ok" and not info.get("failed_measurements")
                    and info.get("spec") == specs[name])
            if keep and not current and not reuse_stale:
                print(f"[{name}] measured by other code ({describe_code(made)}): measuring again "
                      f"(--reuse-stale keeps it, marked stale)", file=sys.stderr)
                keep = False
        else:
            keep = current or reuse_stale
            if not keep:
                print(f"[{name}] measured by other code ({describe_code(made)}): dropped from {out / 'results.json'} "
                      f"(--suite {name} measures it again; --reuse-stale keeps it, marked stale)", file=sys.stderr)
        if not keep:
            continue
        info = {"invocation": earlier.get("invocation"), **info}  # the command that measured it
        info.pop("stale", None)
        info.pop("code", None)
        if current:
            info["source_hash"] = code["source_hash"]
        else:  # the code that made it, in full: it is not the code this file names
            info.pop("source_hash", None)
            info.update(stale=True, code=made)
        results["suites"][name] = {**info, "kept": True} if name in specs else info
        results["rows"] += [r for r in earlier.get("rows", []) if r.get("suite") == name]
    progress = _Progress()
    ctx = BenchContext(quick=quick, device=device, out=out, machine=machine, progress=progress)
    for name in suites:
        if name in results["suites"]:
            how = "STALE (other code; --reuse-stale)" if results["suites"][name].get("stale") else "same code"
            print(f"[{name}] kept from the earlier run in {out}, {how} (--fresh measures again)", file=sys.stderr)
            continue
        progress.start(name)
        stale = _stale_suites(results)  # a suite must not build on rows that other code measured
        ctx.rows = [r for r in results["rows"] if r.get("suite") not in stale]
        started = time.perf_counter()
        info: dict[str, Any] = {"spec": specs[name], "status": "ok", "invocation": results["invocation"],
                                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "source_hash": code["source_hash"]}
        try:
            rows = core.suite_module(name).run(specs[name], ctx)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken suite must not lose the others' measurements
            rows = []
            info.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc(limit=8))
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        info["seconds"] = round(time.perf_counter() - started, 1)
        failed_rows = sum(1 for r in rows if r.get("status") == "failed")
        if failed_rows:  # e.g. a federation that never ran: measured again by the next run
            info["failed_measurements"] = failed_rows
        results["suites"][name] = info
        results["rows"] = [r for r in results["rows"] if r.get("suite") != name]
        results["rows"] += [{"suite": name, **row} for row in rows]
        write_outputs(out, results)
        failures = f"; {failed_rows} of them FAILED (see report.md)" if failed_rows else ""
        print(f"[{name}] {info['status']} in {info['seconds']:.0f} s, {len(rows)} rows{failures}", file=sys.stderr)
    results["suites"] = {n: results["suites"][n] for n in SUITES if n in results["suites"]}
    results["rows"] = [r for r in results["rows"] if r.get("suite") in results["suites"]]
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_outputs(out, results)
    return results


def _parser() -> argparse.ArgumentParser:
    from ..cli import ArgumentParser

    p = ArgumentParser(prog="python -m fedgov.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", choices=SUITES,
                   help=f"suite to run (repeatable; default all: {', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="every suite at small sizes (about two minutes on 2 cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where training runs (HE always runs on the CPU); auto = cuda when available")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<machine>-<date>[-quick]/)")
    p.add_argument("--suites-dir", type=Path, default=None, help="folder of suite definitions (default benchmarks/)")
    p.add_argument("--fresh", action="store_true",
                   help="measure the chosen suites again even if --out holds them (other suites there are kept)")
    p.add_argument("--reuse-stale", action="store_true",
                   help="keep suites in --out that other code (other fedgov sources) measured instead of "
                        "measuring them again; they are marked stale in results.json, results.csv and report.md")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    suites = [s for s in SUITES if s in (args.suite or SUITES)]
    suites_dir = args.suites_dir or default_suites_dir()
    try:
        device = _resolve_device(args.device)
        for name in suites:
            load_suite_spec(suites_dir, name, quick=args.quick)
        if args.out is None:
            machine = describe_machine()
            stamp = time.strftime("%Y%m%d", time.gmtime())
            args.out = suites_dir / "results" / f"{machine_slug(machine)}-{stamp}{'-quick' if args.quick else ''}"
    except BenchError as exc:
        print(f"fedgov.bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_benchmarks(suites=suites, quick=args.quick, device=device, out=args.out,
                                 suites_dir=suites_dir, fresh=args.fresh, argv=argv,
                                 reuse_stale=args.reuse_stale)
    except KeyboardInterrupt:
        print(f"fedgov.bench: interrupted; finished suites are saved in {args.out} "
              f"(run the same command again to continue)", file=sys.stderr)
        return 130
    failed = [n for n, info in results["suites"].items() if info["status"] != "ok"]
    incomplete = [n for n, info in results["suites"].items() if info.get("failed_measurements")]
    print((args.out / "report.md").read_text())
    if failed:
        print(f"fedgov.bench: suites failed: {', '.join(failed)} (see results.json)", file=sys.stderr)
    if incomplete:
        print(f"fedgov.bench: measurements failed in: {', '.join(incomplete)} (see report.md; the same command "
              f"measures those suites again)", file=sys.stderr)
    stale = sorted(_stale_suites(results))
    if stale:
        print(f"fedgov.bench: kept suites measured by other code, marked stale: {', '.join(stale)}",
              file=sys.stderr)
    print(args.out)
    return 1 if failed or incomplete else 0
