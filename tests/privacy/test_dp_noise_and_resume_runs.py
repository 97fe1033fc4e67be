"""DP-SGD end to end: noise nobody can regenerate by default, and a ledger that survives SIGKILL."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import ROOT, live_processes, run_dir_of, run_simulate
from fedgov.privacy import OS_NOISE, SEEDED_NOISE
from fedgov.progress import print_summary
from fedgov.results import read_json, read_jsonl

from . import rdp_reference

SMALL = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.local_epochs=1",
         "--set", "privacy.dp=sample", "--set", "privacy.target_epsilon=3"]
TARGET = 3.0


def _final_model(run: Path) -> list[np.ndarray]:
    with np.load(run / "checkpoint.npz") as data:
        return [data[k] for k in sorted(data.files) if k.startswith("a")]


def _run_start(run: Path) -> dict:
    first = json.loads((run / "audit.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "run_start"
    return first["body"]


def _table(summary: dict) -> str:
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=400))
    return out.getvalue()


@pytest.mark.slow
def test_default_dp_noise_differs_between_runs_of_one_config_and_seeded_noise_repeats(tmp_path):
    def run(name, *extra):
        return run_dir_of(run_simulate(*SMALL, "--set", "train.rounds=1", *extra, "--out", str(tmp_path / name)))

    first, second = run("default"), run("default")
    assert first != second
    assert (first / "config.toml").read_text() == (second / "config.toml").read_text()  # one config
    models = _final_model(first), _final_model(second)
    assert any(not np.array_equal(a, b) for a, b in zip(*models)), "two default DP runs drew the same noise"
    for r in (first, second):
        summary = read_json(r / "summary.json")
        assert summary["privacy"]["seeded_noise"] is False and summary["privacy"]["noise"] == OS_NOISE
        assert _run_start(r)["mechanism"]["dp_noise"] == OS_NOISE
        assert "holds only against" not in _table(summary)

    seeded = run("seeded", "--set", "privacy.seeded_noise=true"), run("seeded", "--set", "privacy.seeded_noise=true")
    models = _final_model(seeded[0]), _final_model(seeded[1])
    assert all(np.array_equal(a, b) for a, b in zip(*models)), "seeded DP runs differ"
    rows = [read_jsonl(r / "metrics.jsonl") for r in seeded]
    assert [r["accuracy"] for r in rows[0]] == [r["accuracy"] for r in rows[1]]
    for r in seeded:
        summary = read_json(r / "summary.json")
        assert summary["privacy"]["seeded_noise"] is True and summary["privacy"]["noise"] == SEEDED_NOISE
        assert _run_start(r)["mechanism"]["dp_noise"] == SEEDED_NOISE
        assert "the DP guarantee holds only against parties that do not hold the config" in _table(summary)


def _session_processes(sid: int) -> list[int]:
    """Processes in session ``sid`` (the simulate process and everything it started, Ray included)."""
    return live_processes(3, sid)


def _rows_written(out: Path) -> int:
    runs = list(out.glob("*/metrics.jsonl"))
    if not runs:
        return 0
    return sum(1 for line in runs[0].read_text().splitlines() if line.strip())


def _epsilons(run: Path) -> dict[int, float]:
    return {c["id"]: c["epsilon"] for c in read_json(run / "summary.json")["cooperatives"]}


def _check_against_reference(run: Path) -> None:
    """Each reported epsilon is the composition of every round that cooperative trained (not Opacus's)."""
    rows = read_jsonl(run / "metrics.jsonl")
    for coop in read_json(run / "summary.json")["cooperatives"]:
        spends = [(m["dp_noise_multiplier"], m["dp_sample_rate"], m["dp_steps"]) for r in rows
                  if (m := r["client_train"].get(str(coop["id"]))) is not None]
        assert len(spends) == len(rows)  # every cooperative trained every round here
        expected = rdp_reference.epsilon(spends, delta=coop["delta"])
        assert coop["epsilon"] == pytest.approx(expected, rel=0.01), coop["id"]
        assert coop["epsilon"] <= TARGET * (1 + 1e-9)


@pytest.mark.slow
def test_dp_ledger_survives_sigkill_and_resume(tmp_path):
    args = [*SMALL, "--set", "train.rounds=8"]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedgov.simulate", "--no-progress", *args, "--out", str(killed_out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _rows_written(killed_out) < 4:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no 4th round within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: simulate, Ray's daemons and workers
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed run survived: {left}"

    (killed,) = [p.parent for p in killed_out.glob("*/config.toml")]
    assert not (killed / "summary.json").exists()
    with np.load(killed / "checkpoint.npz") as data:
        stopped_at = int(data["__round__"])
    assert 3 <= stopped_at < 8

    before_kill = read_jsonl(killed / "metrics.jsonl")[:stopped_at]
    resumed = run_dir_of(run_simulate("--resume", str(killed)))
    assert resumed == killed
    assert read_json(resumed / "summary.json")["resumed_from_round"] == stopped_at
    assert read_json(resumed / "summary.json")["privacy"]["resumed_ledger"]

    # Every round is on record once, the rounds before the kill as they were spent, and each
    # cooperative's epsilon composes all eight rounds' spends (an uninterrupted run spends
    # exactly these: the noise multiplier is calibrated from the config alone).
    rows = read_jsonl(resumed / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 9))
    spend = lambda r: {c: (m["dp_noise_multiplier"], m["dp_sample_rate"], m["dp_steps"])  # noqa: E731
                       for c, m in r["client_train"].items()}
    assert [spend(r) for r in rows[:stopped_at]] == [spend(r) for r in before_kill]
    assert len({tuple(sorted(spend(r).values())) for r in rows}) == 1  # the same spend every round
    assert all(eps <= TARGET * (1 + 1e-9) for eps in _epsilons(resumed).values())
    _check_against_reference(resumed)
