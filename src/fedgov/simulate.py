"""``python -m fedgov.simulate``: run a federation of data cooperatives in Flower's simulation engine.

Prints progress per round and a summary table; the last line of standard output
is the run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .data import DataError, build_federation
from .results import new_run_dir, read_json

__all__ = ["main", "simulate"]


def _quiet_environment() -> None:
    # fedgov runs offline; Flower's telemetry and update check would only wait on the network.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources: each simulated cooperative gets CPUs and, on CUDA, a GPU fraction."""
    import torch

    use_cuda = cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto" and torch.cuda.is_available())
    return {
        "client_resources": {
            "num_cpus": cfg.runtime.client_cpus,
            "num_gpus": cfg.runtime.client_gpu_fraction if use_cuda else 0.0,
        },
        "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
    }


def simulate(cfg: Config, run_dir: Path, *, show_progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run the federation described by ``cfg`` into ``run_dir``; return its summary."""
    _quiet_environment()
    from flwr.simulation import run_simulation

    from .client_app import build_client_app
    from .progress import RoundProgress
    from .server_app import build_server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if cfg.secure.aggregation == "he":  # out-of-band key distribution, before anyone starts
        from .crypto.keys import provision

        provision(cfg.secure.key_dir, preset=cfg.secure.preset, key_holder=cfg.secure.key_holder,
                  board_size=cfg.governance.board_size, board_threshold=cfg.governance.board_threshold)
    with RoundProgress(total=cfg.train.rounds, enabled=show_progress) as progress:
        run_simulation(
            server_app=build_server_app(cfg, run_dir, on_round=progress.update),
            client_app=build_client_app(cfg),
            num_supernodes=cfg.data.num_cooperatives,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the federation stopped before writing {summary_path} (run with --verbose for Flower's log)")
    return read_json(summary_path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedgov.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/default.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set data.alpha=0.1 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="folder under which run directories are made (default: runs/)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint, with its own config.toml")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return p


def _fail(message: str, code: int) -> None:
    print(f"fedgov.simulate: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.resume is not None:
            if args.config or args.overrides:
                raise ConfigError("--resume uses the run's own config.toml; drop --config and --set")
            config_path = args.resume / "config.toml"
            if not config_path.is_file():
                raise ConfigError(f"{config_path}: not a run directory (no config.toml)")
            cfg = load_config(config_path)
            run_dir = args.resume
        else:
            cfg = load_config(args.config, args.overrides)
            if args.out is not None:
                cfg = cfg.replace(**{"runtime.out": str(args.out)})
            if cfg.data.path:  # simulated clients may not share our working directory
                cfg = cfg.replace(**{"data.path": str(Path(cfg.data.path).resolve())})
        # Build the cooperatives once here: bad data is a usage error, found before Ray starts.
        build_federation(cfg.data, seed=cfg.seed)
        if args.resume is None:
            run_dir = new_run_dir(cfg.runtime.out, cfg.hash())
            if cfg.secure.aggregation == "he" and not cfg.secure.key_dir:
                cfg = cfg.replace(**{"secure.key_dir": str((run_dir / "keys").resolve())})
    except (ConfigError, DataError) as exc:
        _fail(str(exc), 2)
    try:
        summary = simulate(cfg, run_dir, show_progress=not args.no_progress, verbose=args.verbose)
    except KeyboardInterrupt:
        _fail(f"interrupted; resume with: python -m fedgov.simulate --resume {run_dir}", 130)
    except Exception as exc:  # one line, no traceback: the run directory keeps what was done
        _fail(f"{exc} (partial results in {run_dir})", 1)
    from .progress import print_summary

    print_summary(summary)
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
