"""A federation across organizations as docs/deployment.md sets it up: TLS, admitted members only,
and members that fail on the wire.

One SuperLink over TLS (``python -m fedgov.tls``'s files) with SuperNode authentication on, three
cooperatives each joining with its own key (``python -m fedgov.member_key``), registered with
``flwr supernode register``; all on 127.0.0.1, every process stopped by its PID. Then:

* Three would-be members are refused and never receive a model: one trusting another CA, one
  with a key nobody registered, one with no key.
* Cooperative 1 runs fedgov's ClientApp plus a mod that breaks its training replies on the real
  wire (``tests/faulty_clientapp.py``): a NaN in round 1, a wrong shape in round 2, an update a
  million times too large in round 3, honest from round 4. Each broken update is rejected and
  recorded, and the round goes on.
* Cooperative 2's SuperNode is SIGKILLed (with its ClientApp) while it trains round 2: the round
  ends without it once the SuperLink declares it unavailable, the miss is recorded with a clean
  reason, and, restarted with its key, it rejoins under the same node and trains later rounds.
* The audit log names each member's key fingerprint, and ``python -m fedgov.audit verify
  --members`` lists which keys stood behind each round.

Judged from the run directory (metrics.jsonl, summary.json, audit.jsonl), never exit codes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgov.audit import read_chain
from fedgov.member_key import make_member_key
from fedgov.results import read_json, read_jsonl
from fedgov.tls import make_tls_files

from fedgov.bench.flower_processes import (FlowerProcesses, fedgov_test_app, flower_environment, flwr_run,
                                           register_supernode, start_member, start_secure_superlink,
                                           tail, wait_for_log, wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-secure"
NUM_COOPERATIVES = 3
ROUNDS = 4
FAULTY, KILLED = 1, 2
# Round 2 waits for the SuperLink to give the killed member up: two missed 30 s heartbeats.
RUN_DEADLINE_S = 360.0
MIN_FINAL_ACCURACY = 0.5  # 3 IID cooperatives of the 8x8 digits: ~0.9 after 4 rounds; chance 0.1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]


def _metric_rows(out: Path) -> int:
    files = sorted(out.glob("*/metrics.jsonl"))
    return len(files[-1].read_text().splitlines()) if files else 0


def _refused(procs: FlowerProcesses, started, why: str) -> None:  # noqa: ANN001
    """A would-be member exits non-zero, its log says why in one line, and it never got a message."""
    started.process.wait(timeout=90)
    procs.retire(started)
    text = started.log.read_text(errors="replace")
    assert started.process.returncode != 0, tail(started.log)
    assert why in text, tail(started.log)
    assert "Receiving:" not in text, tail(started.log)


def test_admitted_members_over_tls_survive_broken_updates_and_a_killed_node(tmp_path: Path) -> None:
    env = flower_environment(tmp_path)
    out = tmp_path / "runs"
    procs = FlowerProcesses(tmp_path / "logs", env)
    started = time.monotonic()
    tls = make_tls_files(tmp_path / "tls", ["127.0.0.1", "localhost"])
    keys = [make_member_key(tmp_path / "keys" / f"coop-{c}") for c in range(NUM_COOPERATIVES)]
    unregistered = make_member_key(tmp_path / "keys" / "not-a-member")[0]
    app = fedgov_test_app(ROOT, tmp_path / "app", clientapp_file=Path(__file__).with_name("faulty_clientapp.py"))

    def node_config(coop: int) -> str:
        return f"partition-id={coop} num-partitions={NUM_COOPERATIVES}" + (' fault="rounds"' if coop == FAULTY else "")

    with procs.federation(app, CONNECTION):
        superlink, port = start_secure_superlink(procs, tls)
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, port, root_certificates=tls.ca_certificate)
        node_ids = [register_supernode(procs, app, CONNECTION, public) for _, public, _ in keys]
        members = {c: start_member(procs, f"supernode-{c}", port, tls, keys[c][0], node_config(c))
                   for c in range(NUM_COOPERATIVES)}

        other_ca = make_tls_files(tmp_path / "other-tls", ["127.0.0.1"])
        rogues = {"CERTIFICATE_VERIFY_FAILED": (other_ca, keys[0][0]),
                  "[code: 2004] Failed to activate SuperNode": (tls, unregistered),
                  "[code: 2001] SuperNode authentication is enabled": (tls, None)}
        started_rogues = {why: start_member(procs, f"rogue-{i}", port, trust, key, node_config(0), wait=False)
                          for i, (why, (trust, key)) in enumerate(rogues.items())}
        for why, rogue in started_rogues.items():
            _refused(procs, rogue, why)

        # Cooperatives evaluate only after the last round: each message costs a ClientApp process.
        overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}", "train.evaluate_every=100",
                     'data.partition="iid"', f"runtime.out={json.dumps(str(out))}"]
        run_id = flwr_run(procs, app, CONNECTION, run_config=overrides)

        # Cooperative 2's machine dies while it trains round 2 ...
        killed = members[KILLED]
        wait_for_log(killed.log, r"Receiving: train message", count=2, timeout=RUN_DEADLINE_S)
        wait_for_log(killed.log, r"Start `flwr-clientapp` process", count=3, timeout=60)  # query, train, train
        procs.kill(killed)
        # ... and comes back with its key once round 2 is over.
        deadline = time.monotonic() + RUN_DEADLINE_S
        while _metric_rows(out) < 2:
            assert time.monotonic() < deadline, "round 2 never ended without the killed member"
            time.sleep(0.5)
        start_member(procs, f"supernode-{KILLED}-restarted", port, tls, keys[KILLED][0], node_config(KILLED))

        run_dir = wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        print(f"run {run_id} -> {run_dir} in {time.monotonic() - started:.0f} s; "
              f"final accuracy {summary['final_accuracy']:.3f}")

        assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
        # Each round's training failures by cooperative (a lost node also misses that round's evaluation).
        failures = [{f["cooperative"]: f for f in row["failures"] if f.get("phase", "train") == "train"}
                    for row in rows]
        assert all(f["cooperative"] in range(NUM_COOPERATIVES) for row in rows for f in row["failures"]), rows
        expected_rejections = {1: "holds NaN or Inf", 2: "has shape", 3: "exceeds governance.max_update_norm"}
        for number, why in expected_rejections.items():
            fault = failures[number - 1].get(FAULTY)
            assert fault is not None and fault.get("rejected") and why in fault["reason"], rows[number - 1]
            assert FAULTY not in rows[number - 1]["contributors"]
        assert FAULTY in rows[3]["contributors"] and FAULTY not in failures[3]  # honest again, and counted

        assert KILLED in rows[0]["contributors"]
        missed = failures[1].get(KILLED)
        assert missed is not None and not missed.get("rejected"), rows[1]
        assert "Node Unavailable" in missed["reason"] and "\n" not in missed["reason"], missed
        assert rows[1]["contributors"] == [0], rows[1]
        assert KILLED in rows[3]["contributors"], rows[3]  # rejoined under its own key
        assert 0 in rows[3]["contributors"]
        for row in rows:
            assert math.isfinite(row["accuracy"]) and math.isfinite(row["loss"]), row
        assert summary["final_accuracy"] > MIN_FINAL_ACCURACY, summary["final_accuracy"]

        # Only the three registered keys ever joined: three node ids, cooperative 2's twice.
        activated = re.findall(r"Activated node_id=(\d+)", superlink.log.read_text())
        assert sorted(set(map(int, activated))) == sorted(node_ids), activated
        assert len(activated) == NUM_COOPERATIVES + 1, activated

        # The audit log names each member by its key; verify lists the keys behind every round.
        start = read_chain(run_dir).records[0]["body"]["cooperatives"]
        for c, (_, _, fingerprint) in enumerate(keys):
            assert start[str(c)]["member_key"] == fingerprint
            assert start[str(c)]["node_id"] == node_ids[c]
        verified = subprocess.run([sys.executable, "-m", "fedgov.audit", "verify", str(run_dir), "--members"],
                                  capture_output=True, text=True, env=procs.env, timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "3 members admitted by their registered keys" in verified.stdout, verified.stdout
        lines = {line.split(":", 1)[0]: line for line in verified.stdout.splitlines() if line.startswith("round ")}
        assert lines["round 2"] == f"round 2: 0 {keys[0][2]}", verified.stdout
        assert lines["round 4"] == "round 4: " + ", ".join(f"{c} {keys[c][2]}" for c in range(3)), verified.stdout
