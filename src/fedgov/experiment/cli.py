"""``python -m fedgov.experiment FILE``: sweep a grid of configs over several seeds and aggregate.

The command line of :mod:`fedgov.experiment`: read the file, run the sweep, print the
results table and, as the last line of standard output, the results folder. Bad input
is one line on stderr and exit status 2; a failed run makes the exit status 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..cli import ArgumentParser, fail
from .spec import QUICK_COOPERATIVES, QUICK_ROUNDS, ExperimentError, load_experiment
from .sweep import run_experiment
from .tables import print_results

__all__ = ["main"]

PROG = "fedgov.experiment"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fedgov.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="experiment TOML file (see experiments/)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/<name>/ beside the experiment file)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run every point with seeds 0, 1, ..., N-1 (N seeds) instead of the file's seeds")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_ROUNDS} rounds, at most {QUICK_COOPERATIVES} cooperatives, "
                        f"one seed; writes to results/<name>-quick/")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time (each a process with its own engine and workers; default 1)")
    p.add_argument("--reuse-stale", action="store_true",
                   help="keep finished runs made by other code (other fedgov sources) instead of running them "
                        "again; they are marked stale in runs.csv, results.csv and experiment.json")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        fail(PROG, f"--seeds: must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        fail(PROG, f"--jobs: must be >= 1, got {args.jobs}")
    try:
        exp = load_experiment(args.experiment)
    except ExperimentError as exc:
        fail(PROG, str(exc))
    out = args.out if args.out is not None else exp.default_out(quick=args.quick)
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop the runs too, as Ctrl-C does
    try:
        results = run_experiment(exp, out=out, seeds=seeds, quick=args.quick, jobs=args.jobs, argv=argv,
                                 reuse_stale=args.reuse_stale)
    except KeyboardInterrupt:
        fail(PROG, f"interrupted; run the same command again to continue (finished runs are kept in {out})", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_results(exp, out)
    failed = [r for r in results if not r.succeeded]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed; see runs.csv and points/*/seed-*/simulate.log",
              file=sys.stderr)
    stale = [r for r in results if r.stale]
    if stale:
        print(f"{len(stale)} of {len(results)} runs were made by other code (marked stale; "
              f"run without --reuse-stale to run them again)", file=sys.stderr)
    print(out)
    return 1 if failed else 0
