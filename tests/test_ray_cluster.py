"""The simulation on an existing Ray cluster when asked (runtime.ray_address), and never on one merely recorded.

Both engines run there: the pool engine's workers as Ray actors, and Flower's own engine.

A Ray head and one worker node are started on 127.0.0.1 with ``ray start --block`` (each
in a session of its own, stopped by PID through ``FlowerProcesses``), in a Ray temp
folder of the test's own (``RAY_TMPDIR``), as docs/deployment.md's multi-machine steps
do on one machine. After the cluster is stopped, the current-cluster file that ``ray
start`` wrote still names its dead head: a default run must start its own Ray and finish.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_dir_of
from fedgov.results import read_jsonl
from fedgov.bench.flower_processes import FlowerProcesses, flower_bin, free_ports

SMALL = ["--set", "data.num_cooperatives=3", "--set", "train.rounds=2", "--set", "data.partition=iid"]


def _simulate(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.simulate", "--no-progress", *SMALL, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _alive_nodes(env: dict, address: str) -> int:
    """How many nodes the cluster at ``address`` reports alive (0 while it is not up)."""
    script = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
              "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([sys.executable, "-c", script, address], capture_output=True, text=True, timeout=60, env=env)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0


def _check_rounds(run_dir: Path, cooperatives: int = 3, rounds: int = 2) -> None:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert all(r["participants"] == cooperatives and not r["failures"] for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] - 0.05


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_federation_runs_on_a_ray_cluster_and_a_dead_one_is_never_joined(tmp_path):
    # Ray's socket paths must stay short: a temp folder of its own directly under /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fgray", dir="/tmp"))
    procs = FlowerProcesses(tmp_path / "logs", env={
        **os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    procs.env.pop("RAY_ADDRESS", None)
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    ray = flower_bin("ray")
    try:
        procs.start("ray-head", [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                 "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"])
        deadline = time.monotonic() + 120
        while _alive_nodes(procs.env, address) < 1:
            assert time.monotonic() < deadline and not procs.exited(), procs.log_tails()
            time.sleep(1)
        procs.start("ray-worker", [ray, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
                                   "--num-cpus=1", "--disable-usage-stats"])
        while _alive_nodes(procs.env, address) < 2:
            assert time.monotonic() < deadline and not procs.exited(), procs.log_tails()
            time.sleep(1)

        # Both engines on the cluster: the pool's workers as Ray actors (the default), and Flower's own.
        for engine in ("pool", "flower"):
            drivers_before = set((ray_tmp / "ray").glob("session_*/logs/python-core-driver-*"))
            on_cluster = _simulate(procs.env, "--set", f"runtime.ray_address={address}",
                                   "--set", f"runtime.engine={engine}", "--out", str(tmp_path / engine))
            run_dir = run_dir_of(on_cluster)
            _check_rounds(run_dir)
            config = (run_dir / "config.toml").read_text()
            assert f'ray_address = "{address}"' in config and f'engine = "{engine}"' in config
            # The run's driver joined this cluster: its session holds the driver's log.
            drivers = set((ray_tmp / "ray").glob("session_*/logs/python-core-driver-*")) - drivers_before
            assert drivers, f"no driver of the {engine} engine connected to the test's Ray cluster"
        # The pool's ClientApps ran in actors of the cluster, one per CPU of its two nodes.
        actors = [p for p in (ray_tmp / "ray").glob("session_*/logs/worker-*.out")
                  if "_ActorRunner" in p.read_text(errors="replace")]
        assert len(actors) >= 2, "the pool engine started no actors on the cluster"
    finally:
        leftovers = procs.stop_all()
    assert not leftovers, f"Ray processes still alive: {leftovers}"

    recorded = ray_tmp / "ray" / "ray_current_cluster"
    # What a dead `ray start` leaves behind (Ray may record the machine's own address for the head).
    assert recorded.is_file() and recorded.read_text().strip().endswith(f":{port}")
    started = time.monotonic()
    default = _simulate(procs.env, "--out", str(tmp_path / "b"), timeout=300)
    _check_rounds(run_dir_of(default))
    assert time.monotonic() - started < 240
    shutil.rmtree(ray_tmp, ignore_errors=True)
