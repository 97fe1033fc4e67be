"""A pool worker killed mid-round (SIGKILL) costs only the message it was running; the run goes on.

A DP-SGD run keeps each cooperative's privacy ledger in its node's ``context.state``. One
worker is killed while the cooperatives train round 3: that cooperative's message comes
back as a failure with a clean reason, a new worker takes the dead one's place, the run
finishes every round, and every ledger, the killed cooperative's included, composes all
the rounds that cooperative trained (a lost context would start its epsilon again from 0).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, live_processes
from fedgov.results import read_json, read_jsonl

from privacy import rdp_reference

ROUNDS = 5
ARGS = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.local_epochs=2",
        "--set", "privacy.dp=sample", "--set", "privacy.target_epsilon=8", "--set", f"train.rounds={ROUNDS}",
        "--set", "runtime.workers=2"]


def _rows(out: Path) -> int:
    files = list(out.glob("*/metrics.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_worker_costs_one_message_and_no_context(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "fedgov.simulate", "--no-progress", *ARGS, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while _rows(out) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before round 3"
            time.sleep(0.02)
        time.sleep(0.3)  # round 3 is training now: each DP-SGD update takes longer than this
        workers = live_processes(1, proc.pid)  # the simulate process's children: its workers
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run = Path(stdout.strip().splitlines()[-1])
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))  # the run finished every round
    failures = [(r["round"], f) for r in rows for f in r["failures"]]
    assert len(failures) == 1, failures
    round_lost, failure = failures[0]
    assert round_lost == 3 and failure["crashed"]
    assert failure["reason"].startswith("the pool worker running this ClientApp (pid ")
    assert failure["reason"].endswith(") died: killed by SIGKILL")
    lost = failure["cooperative"]
    # The failure is reported as one clean line, as any crashed cooperative is.
    assert "failed in round 3: the pool worker running this ClientApp" in stderr
    assert proc.returncode == 1
    # Every ledger survived: each epsilon composes exactly the rounds its cooperative trained.
    for coop in read_json(run / "summary.json")["cooperatives"]:
        trained = [m for r in rows if (m := r["client_train"].get(str(coop["id"]))) is not None]
        assert len(trained) == ROUNDS - (coop["id"] == lost)
        spends = [(m["dp_noise_multiplier"], m["dp_sample_rate"], m["dp_steps"]) for m in trained]
        assert [m["dp_epsilon"] for m in trained] == sorted(m["dp_epsilon"] for m in trained)
        expected = rdp_reference.epsilon(spends, delta=coop["delta"])
        assert coop["epsilon"] == pytest.approx(expected, rel=0.01), coop["id"]
