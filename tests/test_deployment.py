"""fedgov on Flower's Deployment Engine: one SuperLink, two SuperNodes, ``flwr run``, all on 127.0.0.1.

The same ServerApp and ClientApp as the simulation, started the way docs/deployment.md
tells a user to: ``flower-superlink --insecure``, one ``flower-supernode`` per
cooperative with ``--node-config "partition-id=I num-partitions=N"``, and
``flwr run . <connection>`` with the connection in ``$FLWR_HOME/config.toml``; and again
over TLS with ``python -m fedgov.tls``'s files, where a SuperNode trusting another CA is
refused and never joins.

Success is judged from the run directory fedgov writes (metrics.jsonl, summary.json),
never from exit codes: ``flwr run`` returns as soon as the run is submitted, and a
Flower run can "finish" with every client failed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from fedgov.config import load_config
from fedgov.results import read_json, read_jsonl

from fedgov.bench.flower_processes import (FlowerProcesses, Started, flower_bin, flower_environment, flwr_run,
                                           wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-test"
NUM_COOPERATIVES = 2
ROUNDS = 1  # the secure tests run several rounds; this one shows the shortcut's flags work
RUN_DEADLINE_S = 180.0  # from `flwr run` to summary.json
# 2 IID cooperatives of the 8x8 digits reach ~0.85 global test accuracy after one round of two
# local epochs (chance is 0.1); 0.5 leaves a wide margin and still fails if training did not happen.
MIN_FINAL_ACCURACY = 0.5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]


def _start_insecure_federation(procs: FlowerProcesses) -> tuple[Started, int]:
    """A SuperLink and one SuperNode per cooperative, in clear text: the one-laptop shortcut."""
    superlink, superlink_port = procs.start_http_service("superlink", lambda port: [
        flower_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port)])
    for coop in range(NUM_COOPERATIVES):
        procs.start_http_service(f"supernode-{coop}", lambda port, coop=coop: [
            flower_bin("flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{superlink_port}",
            "--host", "127.0.0.1", "--port", str(port),  # this SuperNode's ClientApp runtime API
            "--node-config", f"partition-id={coop} num-partitions={NUM_COOPERATIVES}"])
    return superlink, superlink_port


def test_two_cooperatives_on_the_deployment_engine(tmp_path: Path) -> None:
    env = flower_environment(tmp_path)
    out = tmp_path / "runs"
    procs = FlowerProcesses(tmp_path / "logs", env)
    started = time.monotonic()
    with procs.federation(ROOT, CONNECTION):
        superlink, superlink_port = _start_insecure_federation(procs)
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, superlink_port)
        overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}",
                     'data.partition="iid"', f"runtime.out={json.dumps(str(out))}"]
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=overrides)
        run_dir = wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S)

        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        cfg = load_config(run_dir / "config.toml")
        print(f"run {run_id} -> {run_dir} in {time.monotonic() - started:.0f} s; "
              f"final accuracy {summary['final_accuracy']:.3f}")

        # The --run-config overrides reached the ServerApp.
        assert cfg.data.num_cooperatives == NUM_COOPERATIVES
        assert cfg.train.rounds == ROUNDS
        assert cfg.data.partition == "iid"
        assert Path(cfg.runtime.out) == out

        assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
        for row in rows:
            assert row["participants"] == NUM_COOPERATIVES, row
            assert row["failures"] == [], row
            assert math.isfinite(row["accuracy"]) and 0.0 <= row["accuracy"] <= 1.0, row
            assert math.isfinite(row["loss"]), row
            assert row["bytes_up"] > 0 and row["bytes_down"] > 0, row
            # Each SuperNode trained and evaluated its own cooperative.
            assert sorted(row["cooperative_accuracy"]) == [str(c) for c in range(NUM_COOPERATIVES)], row

        assert summary["rounds"] == ROUNDS
        assert sorted(c["id"] for c in summary["cooperatives"]) == list(range(NUM_COOPERATIVES))
        assert all(c["participation"] == 1.0 for c in summary["cooperatives"])
        assert summary["partition"] == "iid"
        assert math.isfinite(summary["final_accuracy"])
        assert summary["final_accuracy"] > MIN_FINAL_ACCURACY, summary["final_accuracy"]
        assert superlink.log.read_text().count("Activated node_id") == NUM_COOPERATIVES
