"""A SuperLink that dies mid-run loses no finished round: restarted on its ``--database``, one
``flwr run`` with the run's ``resume.toml`` continues the run from fedgov's checkpoint.

A secure federation (TLS, two registered members, as docs/deployment.md sets it up) trains with
DP-SGD. After round 2 is on record, the SuperLink and everything it started (the ServerApp
among them) are SIGKILLed. The SuperNodes keep running and retry. The SuperLink restarts on the
same port and database, where the registered keys survive; the members reconnect without being
registered again; ``flwr run . <connection> --run-config RUN_DIR/resume.toml`` (the run's config
with ``runtime.resume`` set, so the members train under the same config) carries the metrics,
the signed audit log and every cooperative's DP ledger on, as ``fedgov.simulate --resume``
does, and ``python -m fedgov.audit verify`` passes on the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedgov.audit import read_chain
from fedgov.member_key import make_member_key
from fedgov.results import read_json, read_jsonl
from fedgov.tls import make_tls_files
from tests.privacy import rdp_reference

from fedgov.bench.flower_processes import (FlowerProcesses, flower_environment, flwr_run, register_supernode,
                                           start_member, start_secure_superlink, wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-restart"
NUM_COOPERATIVES = 2
ROUNDS = 3
TARGET_EPSILON = 3.0
RUN_DEADLINE_S = 300.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/config.toml"))


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _spends(row: dict) -> dict[str, tuple]:
    return {c: (m["dp_noise_multiplier"], m["dp_sample_rate"], m["dp_steps"]) for c, m in row["client_train"].items()}


def test_a_superlink_killed_mid_run_restarts_on_its_database_and_the_run_resumes(tmp_path: Path) -> None:
    env = flower_environment(tmp_path)
    out = tmp_path / "runs"
    procs = FlowerProcesses(tmp_path / "logs", env)
    tls = make_tls_files(tmp_path / "tls", ["127.0.0.1", "localhost"])
    keys = [make_member_key(tmp_path / "keys" / f"coop-{c}") for c in range(NUM_COOPERATIVES)]
    database = tmp_path / "superlink" / "state.db"
    database.parent.mkdir()
    with procs.federation(ROOT, CONNECTION):
        superlink, port = start_secure_superlink(procs, tls, database=database)
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, port, root_certificates=tls.ca_certificate)
        node_ids = [register_supernode(procs, ROOT, CONNECTION, public) for _, public, _ in keys]
        for c in range(NUM_COOPERATIVES):
            start_member(procs, f"supernode-{c}", port, tls, keys[c][0],
                         f"partition-id={c} num-partitions={NUM_COOPERATIVES}")
        overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}", 'data.partition="iid"',
                     "train.local_epochs=1", 'privacy.dp="sample"', f"privacy.target_epsilon={TARGET_EPSILON}",
                     f"runtime.out={json.dumps(str(out))}"]
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=overrides)

        deadline = time.monotonic() + RUN_DEADLINE_S
        while not (dirs := _run_dirs(out)) or _rows(dirs[0]) < 2:
            assert time.monotonic() < deadline, "round 2 was never recorded"
            assert not procs.exited(), procs.log_tails()
            time.sleep(0.2)
        (run_dir,) = dirs
        procs.kill(superlink)  # the SuperLink's machine dies, and the ServerApp with it
        with np.load(run_dir / "checkpoint.npz") as data:
            stopped_at = int(data["__round__"])
        before = read_jsonl(run_dir / "metrics.jsonl")[:stopped_at]
        # Round 2's record is written just before its checkpoint: a kill between the two leaves round 1's.
        assert 1 <= stopped_at < ROUNDS and not (run_dir / "summary.json").exists()

        # Restarted on the same port and database: the SuperNodes reconnect with their keys, unregistered anew.
        superlink, _ = start_secure_superlink(procs, tls, database=database, name="superlink-restarted", port=port)
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=[str(run_dir / "resume.toml")])
        assert wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S) == run_dir
        assert _run_dirs(out) == [run_dir]  # continued, not started afresh

        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        assert summary["resumed_from_round"] == stopped_at
        assert summary["privacy"]["resumed_ledger"]
        assert all(r["contributors"] == list(range(NUM_COOPERATIVES)) for r in rows), rows
        # The rounds before the kill are on record as they were spent; each epsilon composes all rounds.
        assert [_spends(r) for r in rows[:stopped_at]] == [_spends(r) for r in before]
        for coop in summary["cooperatives"]:
            spends = [_spends(r)[str(coop["id"])] for r in rows]
            assert coop["epsilon"] == pytest.approx(rdp_reference.epsilon(spends, delta=coop["delta"]), rel=0.01)
            assert coop["epsilon"] <= TARGET_EPSILON * (1 + 1e-9)

        # One signed log across both SuperLinks; the resume names the members' keys again.
        records = read_chain(run_dir).records
        resumes = [r["body"] for r in records if r["kind"] == "run_resume"]
        assert [r["from_round"] for r in resumes] == [stopped_at]
        assert {c: m["member_key"] for c, m in resumes[0]["members"].items()} == {
            str(c): keys[c][2] for c in range(NUM_COOPERATIVES)}
        verified = subprocess.run([sys.executable, "-m", "fedgov.audit", "verify", str(run_dir)],
                                  capture_output=True, text=True, env=procs.env, timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert f"rounds 1..{ROUNDS} covered" in verified.stdout, verified.stdout
        # The restarted SuperLink knew the members from its database: the same nodes, registered once.
        assert [resumes[0]["members"][str(c)]["node_id"] for c in range(NUM_COOPERATIVES)] == node_ids
        assert "RegisterNode" not in superlink.log.read_text()
