"""Run the engine-equivalence cases on one engine, one after another in this process.

``python tests/engine/run_cases.py ENGINE OUT [CASE ...]`` writes each case's run directory to
``OUT/CASE``. In one process, Flower's engine starts Ray once for all cases (each case
still starts its own actors). ``plain-resumed`` is stopped after round 2 of 4 by an exception
from the ServerApp's round callback, as a crash would stop it after its checkpoint, and
then continued from its run directory as ``fedgov.simulate --resume`` continues one.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {"seed": 3, "data.num_cooperatives": 5, "train.rounds": 3, "train.local_epochs": 1}

# Each of the configurations once; features that can share a run share one (each Flower run
# starts a Ray actor that imports torch: seconds).
CASES: dict[str, dict[str, Any]] = {
    "plain-resumed": {"train.rounds": 4},  # plain FedAvg, stopped after round 2 and resumed
    "secagg+dp-sgd-seeded": {"secure.aggregation": "secagg+", "privacy.dp": "sample",
                             "privacy.noise_multiplier": 1.0, "privacy.seeded_noise": True},
    "central-dp": {"privacy.dp": "user", "privacy.noise_multiplier": 0.3},
    "he-clients": {"secure.aggregation": "he"},
    "he-custodian": {"secure.aggregation": "he", "secure.key_holder": "custodian"},
    # A backdoor under a robust strategy, compute tiers with a deadline, size-driven turnout and a
    # sybil whale, in one run: each shapes its own part of the record (failures, cohorts, weights).
    "attacks-and-governance": {"attack.kind": "backdoor", "attack.cooperatives": "2", "attack.start_round": 2,
                               "strategy.name": "median", "heterogeneity.compute": "tiers",
                               "heterogeneity.tiers": "1.0,0.01", "heterogeneity.deadline": 2.0,
                               "data.partition": "powerlaw", "data.sybil_identities": 3,
                               "participation.model": "size", "participation.turnout": 0.6},
}
# Not deterministic by design: HE draws keys and encryption noise from the OS, central DP its noise.
NONDETERMINISTIC = frozenset({"central-dp", "he-clients", "he-custodian"})
RESUMED = "plain-resumed"
STOP_AFTER = 2  # the resumed case's interruption


class Interrupted(RuntimeError):
    pass


def run_case(name: str, engine: str, out: Path) -> Path:
    from fedgov.client_app import build_client_app, preload
    from fedgov.config import Config
    from fedgov.data import build_federation
    from fedgov.decryption import extra_nodes
    from fedgov.engine import start_engine
    from fedgov.preflight import preflight
    from fedgov.server_app import build_server_app
    from fedgov.simulate import simulate

    run_dir = out / name
    settings = {**BASE, **CASES[name], "runtime.engine": engine, "runtime.out": str(out),
                "secure.key_dir": str((run_dir / "keys").resolve())}
    if engine == "flower":
        settings["runtime.client_cpus"] = 2.0  # one Ray actor: each starts a Python with torch
    cfg, _ = preflight(Config().replace(**settings), given=frozenset(settings))
    if name == RESUMED:
        def stop(row: dict[str, Any]) -> None:
            if row["round"] == STOP_AFTER:
                raise Interrupted(f"stopped after round {STOP_AFTER}")

        preload(cfg)
        nodes = build_federation(cfg.data, seed=cfg.seed).num_cooperatives + extra_nodes(cfg)
        try:
            with start_engine(cfg, client_app_fn=functools.partial(build_client_app, cfg), num_nodes=nodes) as eng:
                eng.run(build_server_app(cfg, run_dir, on_round=stop))
        except Exception as exc:  # noqa: BLE001 (Flower's engine wraps the ServerApp's exception)
            if "stopped after round" not in repr(exc) + repr(exc.__cause__):
                raise
    simulate(cfg, run_dir, show_progress=False)
    return run_dir


def main(argv: list[str]) -> int:
    from fedgov.data.partition import shared_partitions

    engine, out, *names = argv
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    with shared_partitions():  # as fedgov.simulate: Flower's Ray actors read the split drawn here
        for name in names or list(CASES):
            print(run_case(name, engine, Path(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
