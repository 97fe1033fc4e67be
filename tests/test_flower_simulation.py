"""The README's Flower-native simulation path: a simulation-mode SuperLink and ``flwr run . <connection>``.

Exactly the commands the README shows, on 127.0.0.1: ``flower-superlink --insecure --simulation
--disable-runtime-dependency-installation``, a named connection in ``$FLWR_HOME/config.toml``, and
``flwr run . fedgov-sim --federation-config "num-supernodes=N ..." --run-config "..."``. The
federation's size comes from the data (a CSV with a natural cooperative column), so the run
config names no ``data.num_cooperatives``. Success is judged from metrics.jsonl, never from exit
codes; every process the test started is stopped by its PID.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedgov.config import load_config
from fedgov.results import read_json, read_jsonl

from fedgov.bench.flower_processes import (FlowerProcesses, flower_bin, flower_environment, flwr_run, wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-sim"
SITES = {"Site A": 160, "Site B north": 90, "Site C": 50}  # unequal cooperatives, names with spaces
ROUNDS = 2
RUN_DEADLINE_S = 240.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(480),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]


def _write_sites_csv(path: Path) -> None:
    """Two well-separated classes with string labels, rows of three sites."""
    rng = np.random.default_rng(0)
    lines = ["x1,x2,x3,outcome,site"]
    for site, rows in SITES.items():
        for _ in range(rows):
            label = int(rng.integers(2))
            x = rng.normal(2.0 * label - 1.0, 0.6, size=3)
            lines.append(",".join(f"{v:.4f}" for v in x) + f",{'yes' if label else 'no'},{site}")
    path.write_text("\n".join(lines) + "\n")


def test_natural_cooperatives_on_a_simulation_superlink(tmp_path: Path) -> None:
    env = flower_environment(tmp_path)
    out = tmp_path / "runs"
    csv = tmp_path / "sites.csv"
    _write_sites_csv(csv)
    procs = FlowerProcesses(tmp_path / "logs", env)
    started = time.monotonic()
    with procs.federation(ROOT, CONNECTION):
        superlink, port = procs.start_http_service("superlink", lambda port: [
            flower_bin("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)])
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, port)
        run_config = ['data.dataset="csv"', f"data.path={json.dumps(str(csv))}", 'data.label_column="outcome"',
                      'data.partition="natural"', 'data.cooperative_column="site"', f"train.rounds={ROUNDS}",
                      f"runtime.out={json.dumps(str(out))}"]
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=run_config,
                          federation_config=[f"num-supernodes={len(SITES)}", "client-resources-num-cpus=1"])
        run_dir = wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        print(f"run {run_id} -> {run_dir} in {time.monotonic() - started:.0f} s")

        # The data decided the federation: three cooperatives, named after the sites, in sorted order.
        assert load_config(run_dir / "config.toml").data.num_cooperatives == len(SITES)
        assert [c["name"] for c in summary["cooperatives"]] == sorted(SITES)
        sizes = {c["name"]: c["num_examples"] for c in summary["cooperatives"]}
        assert sizes["Site A"] > sizes["Site B north"] > sizes["Site C"], sizes
        assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
        for row in rows:
            assert row["failures"] == [], row
            assert row["participants"] == len(SITES), row
            assert sorted(row["cooperative_accuracy"]) == [str(c) for c in range(len(SITES))], row
            assert math.isfinite(row["accuracy"]) and row["bytes_up"] > 0, row
        # Separable classes: well above chance (0.5) once trained.
        assert summary["final_accuracy"] > 0.8, summary["final_accuracy"]
