"""fedgov on Flower's Deployment Engine: one SuperLink, two SuperNodes, ``flwr run``, all on 127.0.0.1.

The same ServerApp and ClientApp as the simulation, started the way docs/deployment.md
tells a user to: ``flower-superlink --insecure``, one ``flower-supernode`` per
cooperative with ``--node-config "partition-id=I num-partitions=N"``, and
``flwr run . <connection>`` with the connection in ``$FLWR_HOME/config.toml``.

Success is judged from the run directory fedgov writes (metrics.jsonl, summary.json),
never from exit codes: ``flwr run`` returns as soon as the run is submitted, and a
Flower run can "finish" with every client failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgov.config import load_config
from fedgov.results import read_json, read_jsonl

try:
    from .flower_processes import FlowerProcesses, Started, flower_bin, tail
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from flower_processes import FlowerProcesses, Started, flower_bin, tail

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-test"
NUM_COOPERATIVES = 2
ROUNDS = 2
RUN_DEADLINE_S = 180.0  # from `flwr run` to summary.json; 75-105 s on a 2-core CPU machine
# 2 IID cooperatives of the 8x8 digits reach ~0.89 global test accuracy after 2 rounds
# (chance is 0.1); 0.5 leaves a wide margin and still fails if training did not happen.
MIN_FINAL_ACCURACY = 0.5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]


def _environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # An isolated Flower home: the connection config, installed FABs and the
        # SuperLink's files stay under tmp_path, never in the user's ~/.flwr.
        "HOME": str(tmp_path / "home"),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The SuperLink would otherwise `uv sync` the app's dependencies (needs the network).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Flower launches flower-superexec, flwr-serverapp and flwr-clientapp by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    # Flower's HTTP clients honour HTTP(S)_PROXY; local traffic must not go through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1,localhost"]))
    for folder in ("HOME", "FLWR_HOME"):
        Path(env[folder]).mkdir(parents=True, exist_ok=True)
    return env


def _write_connection(flwr_home: Path, superlink_port: int) -> None:
    """The `flwr` CLI finds SuperLinks by name in $FLWR_HOME/config.toml (Flower >= 1.42)."""
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{superlink_port}"\n'
        "insecure = true\n"
    )


def _start_federation(procs: FlowerProcesses) -> tuple[Started, int]:
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


def _flwr_run(procs: FlowerProcesses, out: Path) -> str:
    overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}",
                 'data.partition="iid"', f"runtime.out={json.dumps(str(out))}"]
    # ONE --run-config string: Flower 1.42 merges repeated --run-config flags table by table,
    # so `-c data.num_cooperatives=2 -c data.partition="iid"` silently drops num_cooperatives.
    argv = [flower_bin("flwr"), "run", ".", CONNECTION, "--format", "json",
            "--run-config", " ".join(overrides)]
    result = subprocess.run(argv, cwd=ROOT, env=procs.env, capture_output=True, text=True, timeout=120)
    (procs.log_dir / "flwr-run.log").write_text(
        f"$ {' '.join(argv)}\nexit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    start, end = result.stdout.find("{"), result.stdout.rfind("}")
    try:
        reply = json.loads(result.stdout[start:end + 1])
    except ValueError:
        reply = {}
    if not reply.get("success") or not reply.get("run-id"):
        pytest.fail(f"flwr run did not submit the run (exit {result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}")
    return str(reply["run-id"])


def _wait_for_summary(procs: FlowerProcesses, out: Path, run_id: str, superlink_log: Path) -> Path:
    """The run directory once its summary.json exists; fails early if the federation broke."""
    finished = re.compile(rf"Finished task \d+ of run {run_id}\b")
    deadline = time.monotonic() + RUN_DEADLINE_S
    finished_at: float | None = None
    while time.monotonic() < deadline:
        summaries = sorted(out.glob("*/summary.json"))
        if summaries:
            return summaries[-1].parent
        if dead := procs.exited():
            pytest.fail("Flower process(es) exited during the run: "
                        + ", ".join(f"{s.name} (exit {s.process.returncode})" for s in dead))
        if finished_at is None and finished.search(tail(superlink_log, 400)):
            finished_at = time.monotonic()  # the ServerApp ended; give the last write a moment
        if finished_at is not None and time.monotonic() - finished_at > 10:
            pytest.fail(f"run {run_id} finished on the SuperLink without writing summary.json under {out}")
        time.sleep(1.0)
    pytest.fail(f"no summary.json under {out} within {RUN_DEADLINE_S:.0f} s of submitting run {run_id}")


def _serverapp_log(procs: FlowerProcesses, run_id: str | None) -> str:
    """The ServerApp's own output, which the SuperLink keeps (it is not in superlink.log)."""
    if run_id is None or not procs.started or procs.started[0].process.poll() is not None:
        return "<not available>"
    try:
        result = subprocess.run([flower_bin("flwr"), "log", run_id, CONNECTION, "--show"], cwd=ROOT,
                                env=procs.env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        return f"<flwr log timed out>\n{exc.stdout or ''}"
    return "\n".join((result.stdout + result.stderr).splitlines()[-80:])


def test_two_cooperatives_on_the_deployment_engine(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    out = tmp_path / "runs"
    procs = FlowerProcesses(tmp_path / "logs", env)
    started = time.monotonic()
    run_id: str | None = None
    try:
        superlink, superlink_port = _start_federation(procs)
        _write_connection(Path(env["FLWR_HOME"]), superlink_port)
        run_id = _flwr_run(procs, out)
        run_dir = _wait_for_summary(procs, out, run_id, superlink.log)

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
    except BaseException:
        print(procs.log_tails())
        print(f"----- flwr run -----\n{tail(procs.log_dir / 'flwr-run.log')}")
        print(f"----- flwr log {run_id} (ServerApp) -----\n{_serverapp_log(procs, run_id)}")
        raise
    finally:
        leftovers = procs.stop_all()
    assert not leftovers, f"processes still running after stop_all: {sorted(leftovers)}"
