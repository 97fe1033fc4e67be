"""``python -m fedgov.simulate``: run a federation of data cooperatives in a simulation engine.

Prints progress per round and a summary table; the last line of standard output
is the run directory.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .cli import ArgumentParser, fail
from .client_errors import clean_reason
from .config import Config, ConfigError, load_config, read_config
from .data import build_federation
from .data.partition import shared_partitions
from .decryption import extra_nodes
from .preflight import PreflightError, preflight
from .results import new_run_dir, read_json, read_jsonl

__all__ = ["main", "simulate", "crash_reports"]

PROG = "fedgov.simulate"


def _quiet_environment() -> None:
    # fedgov runs offline; Flower's telemetry and update check would only wait on the network.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray's FutureWarning about CUDA_VISIBLE_DEVICES on zero-GPU actors: keep today's behaviour, quietly.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(cfg: Config, run_dir: Path, *, show_progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run the federation described by ``cfg`` into ``run_dir`` on ``runtime.engine``; return its summary."""
    _quiet_environment()
    from .client_app import build_client_app, preload
    from .engine import start_engine
    from .progress import RoundProgress
    from .server_app import build_server_app

    if not verbose:
        # Failures reach the user as fedgov's one-line errors; Flower's tracebacks only with --verbose.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    if cfg.secure.aggregation == "he":  # out-of-band key distribution, before anyone starts
        from .crypto.keys import provision

        provision(cfg.secure.key_dir, preset=cfg.secure.preset, key_holder=cfg.secure.key_holder,
                  board_size=cfg.governance.board_size, board_threshold=cfg.governance.board_threshold)
    # One node per identity (sybils included), + the custodian, a node of its own.
    num_nodes = build_federation(cfg.data, seed=cfg.seed).num_cooperatives + extra_nodes(cfg)
    if cfg.runtime.engine == "pool" and not cfg.runtime.ray_address:
        preload(cfg)  # the pool's workers are forked from this process: they start with what it loaded
    with start_engine(cfg, client_app_fn=functools.partial(build_client_app, cfg), num_nodes=num_nodes,
                      verbose=verbose) as engine, \
            RoundProgress(total=cfg.train.rounds, enabled=show_progress) as progress:
        engine.run(build_server_app(cfg, run_dir, on_round=progress.update))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the federation stopped before writing {summary_path} (run with --verbose for the "
                           f"engine's log)")
    return read_json(summary_path)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/default.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set data.alpha=0.1 (repeatable; "
                        "python -m fedgov.config lists every key)")
    p.add_argument("--out", type=Path, default=None, help="folder under which run directories are made (default: runs/)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint, with its own config.toml")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's logs (and Ray's, on Flower's engine), the workers' warnings, and full "
                        "tracebacks of failing cooperatives")
    return p


def crash_reports(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """One line per cooperative that crashed (not declined): its id, name, rounds and first cause."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    names = {c["id"]: c.get("name", "") for c in summary.get("cooperatives", [])}
    crashes: dict[int, tuple[list[int], str]] = {}
    for row in read_jsonl(path):
        for failure in row.get("failures", []):
            if failure.get("crashed"):
                rounds, _ = crashes.setdefault(int(failure["cooperative"]), ([], failure["reason"]))
                rounds.append(int(row["round"]))
    lines = []
    for coop, (rounds, reason) in sorted(crashes.items()):
        where = f"round {rounds[0]}" if len(rounds) == 1 else f"{len(rounds)} rounds from round {rounds[0]}"
        label = f"cooperative {coop} ({names[coop]})" if names.get(coop) else f"cooperative {coop}"
        lines.append(f"{label} failed in {where}: {reason}")
    return lines


def _prepare(args: argparse.Namespace) -> tuple[Config, Path]:
    """The settled config and run directory; raises ConfigError or PreflightError (usage errors)."""
    if args.resume is not None:
        if args.config or args.overrides:
            raise ConfigError("--resume uses the run's own config.toml; drop --config and --set")
        config_path = args.resume / "config.toml"
        if not config_path.is_file():
            raise ConfigError(f"{config_path}: not a run directory (no config.toml)")
        cfg, _ = preflight(load_config(config_path), given=None)  # every key of config.toml is fixed
        return cfg, args.resume
    cfg, given = read_config(args.config, args.overrides)
    if cfg.runtime.resume:
        raise ConfigError(f"runtime.resume is for `flwr run`; here use --resume {cfg.runtime.resume}")
    if args.out is not None:
        cfg = cfg.replace(**{"runtime.out": str(args.out)})
    if cfg.data.path:  # simulated clients may not share our working directory
        cfg = cfg.replace(**{"data.path": str(Path(cfg.data.path).resolve())})
    if cfg.secure.key_dir:
        cfg = cfg.replace(**{"secure.key_dir": str(Path(cfg.secure.key_dir).resolve())})
    # Data, device and key folder are checked here: a bad one is a usage error, found before any engine starts.
    cfg, _ = preflight(cfg, given=given)
    run_dir = new_run_dir(cfg.runtime.out, cfg.hash())
    if cfg.secure.aggregation == "he" and not cfg.secure.key_dir:
        cfg = cfg.replace(**{"secure.key_dir": str((run_dir / "keys").resolve())})
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with shared_partitions():  # workers that do not fork from here (Ray's, forkserver's) read the split drawn here
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        cfg, run_dir = _prepare(args)
    except (ConfigError, PreflightError) as exc:
        fail(PROG, str(exc), 2)
    try:
        summary = simulate(cfg, run_dir, show_progress=not args.no_progress, verbose=args.verbose)
    except KeyboardInterrupt:
        fail(PROG, f"interrupted; resume with: python -m fedgov.simulate --resume {run_dir}", 130)
    except Exception as exc:  # one line, no traceback: the run directory keeps what was done
        if args.verbose:
            traceback.print_exc()
        fail(PROG, f"{clean_reason(str(exc)) or type(exc).__name__} (partial results in {run_dir})", 1)
    from .progress import print_summary

    print_summary(summary)
    crashes = crash_reports(run_dir, summary)
    for line in crashes:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    print(run_dir)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
