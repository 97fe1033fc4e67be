"""A log cut back to an earlier run_end is still a valid chain: the run's other files or a head witness catch it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedgov.audit import LOG_NAME, AuditLog, digest_arrays, verify


def model_after(r: int) -> list[np.ndarray]:
    return [np.full((2, 3), float(r), dtype=np.float32), np.arange(4, dtype=np.int64) + r]


def write_checkpoint(run_dir: Path, done: int, arrays: list[np.ndarray]) -> None:
    # The layout fedgov.run_record.RunRecord.save_checkpoint writes.
    np.savez(run_dir / "checkpoint.npz", __names__=np.array([f"p{i}" for i in range(len(arrays))]),
             __round__=np.array(done), **{f"a{i}": a for i, a in enumerate(arrays)})


def write_metrics(run_dir: Path, last: int) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(1, last + 1)))


def write_summary(run_dir: Path, rounds: int, head: str | None) -> None:
    (run_dir / "summary.json").write_text(json.dumps({"rounds": rounds, "audit": {"head": head}}))


@pytest.fixture
def extended(tmp_path: Path) -> dict:
    """A run that finished 2 rounds, was extended to 3 and finished again, with its files."""
    log = AuditLog(tmp_path)
    log.append("run_start", {})

    def train(first: int, last: int) -> None:
        for r in range(first, last + 1):
            log.append("round", {"round": r, "global_model": digest_arrays(model_after(r))})
        log.append("run_end", {"rounds": last, "round_range": [1, last],
                               "global_model": digest_arrays(model_after(last))})

    train(1, 2)
    first_end = {"line": log.seq, "head": log.head}
    log.append("run_resume", {"from_round": 2})
    train(3, 3)
    write_summary(tmp_path, 3, log.head)
    write_metrics(tmp_path, 3)
    write_checkpoint(tmp_path, 3, model_after(3))
    return {"dir": tmp_path, "head": log.head, "records": log.seq, "first_end": first_end}


def cut_back(run: dict) -> None:
    """Keep the log only up to the first run_end: still a valid, signed chain ending in run_end."""
    path = run["dir"] / LOG_NAME
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: run["first_end"]["line"]]))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.audit", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def assert_file_problem(run_dir: Path, name: str, *words: str) -> None:
    result = verify(run_dir)
    assert not result.ok and result.reason == "run directory" and result.file == name, result.message
    assert result.message.startswith(f"{name}: ")
    for word in words:
        assert word in result.message, result.message


def test_the_intact_run_verifies_and_its_head_is_the_summarys(extended: dict) -> None:
    result = verify(extended["dir"])
    assert result.ok, result.message
    assert result.records == extended["records"] and result.head == extended["head"]
    assert verify(extended["dir"], head=extended["head"]).ok


def test_cut_back_log_fails_on_the_summary(extended: dict) -> None:
    assert verify(extended["dir"]).ok
    cut_back(extended)
    assert_file_problem(extended["dir"], "summary.json", "says 3 rounds", "run_end for 2 rounds",
                        f"(line {extended['first_end']['line']})")


def test_cut_back_log_fails_on_the_summarys_head_when_its_rounds_were_edited(extended: dict) -> None:
    cut_back(extended)
    write_summary(extended["dir"], 2, extended["head"])
    assert_file_problem(extended["dir"], "summary.json", "audit.head", "hash of no line")


def test_cut_back_log_fails_on_the_checkpoint(extended: dict) -> None:
    cut_back(extended)
    (extended["dir"] / "summary.json").unlink()
    assert_file_problem(extended["dir"], "checkpoint.npz", "after round 3", "run_end for 2 rounds")
    # Relabelled as round 2, the model after round 3 still gives it away.
    write_checkpoint(extended["dir"], 2, model_after(3))
    assert_file_problem(extended["dir"], "checkpoint.npz", "does not match the global_model")


def test_cut_back_log_fails_on_the_metrics(extended: dict) -> None:
    cut_back(extended)
    (extended["dir"] / "summary.json").unlink()
    (extended["dir"] / "checkpoint.npz").unlink()
    assert_file_problem(extended["dir"], "metrics.jsonl", "rounds 1..3", "run_end for 2 rounds")


def test_with_every_other_file_rewritten_only_a_witness_catches_the_cut(extended: dict) -> None:
    cut_back(extended)
    write_summary(extended["dir"], 2, extended["first_end"]["head"])
    write_metrics(extended["dir"], 2)
    write_checkpoint(extended["dir"], 2, model_after(2))
    assert verify(extended["dir"]).ok  # a consistent, signed, shorter story
    result = verify(extended["dir"], head=extended["head"])
    assert not result.ok and result.reason == "head"
    assert "records were cut off" in result.message


def test_a_witness_taken_earlier_says_how_much_came_after(extended: dict) -> None:
    result = verify(extended["dir"], head=extended["first_end"]["head"])
    assert not result.ok and result.reason == "head"
    line, total = extended["first_end"]["line"], extended["records"]
    assert f"line {line}" in result.message and f"{total - line} record(s) were added" in result.message


def test_verify_head_on_the_command_line(extended: dict) -> None:
    ok = run_cli("verify", extended["dir"], "--head", extended["head"].upper())
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == f"head {extended['head']}"
    cut_back(extended)
    (extended["dir"] / "summary.json").unlink()
    (extended["dir"] / "checkpoint.npz").unlink()
    (extended["dir"] / "metrics.jsonl").unlink()
    bad = run_cli("verify", extended["dir"], "--head", extended["head"])
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "witness" in bad.stderr, bad.stderr


def test_a_live_run_may_be_a_round_ahead_in_metrics_and_behind_in_its_checkpoint(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("run_start", {})
    for r in (1, 2):
        log.append("round", {"round": r})
    # Killed after round 3's metrics row and before its record; round 2's checkpoint not yet written.
    write_metrics(tmp_path, 3)
    write_checkpoint(tmp_path, 1, model_after(1))
    assert verify(tmp_path, require_end=False).ok
    write_checkpoint(tmp_path, 3, model_after(3))  # a checkpoint ahead of every record
    result = verify(tmp_path, require_end=False)
    assert not result.ok and result.file == "checkpoint.npz", result.message
    write_checkpoint(tmp_path, 2, model_after(2))
    write_metrics(tmp_path, 4)  # two rows ahead
    result = verify(tmp_path, require_end=False)
    assert not result.ok and result.file == "metrics.jsonl", result.message


def test_an_unreadable_file_is_named(extended: dict) -> None:
    (extended["dir"] / "summary.json").write_text("{not json")
    assert_file_problem(extended["dir"], "summary.json", "cannot be read")
