"""The audit guarantees on real runs: resumed, extended, cut back, and traced with evidence missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_dir_of, run_simulate
from fedgov.audit import LOG_NAME, digest_arrays, verify
from fedgov.governance.archive import UpdateArchive
from fedgov.results import read_json, read_jsonl

pytestmark = pytest.mark.slow  # two short simulations and a resume shared by the module, then trace twice

SMALL = ["--set", "data.num_cooperatives=3", "--set", "train.rounds=2"]


def audit_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.audit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]


def copy_run(run_dir: Path, target: Path) -> Path:
    """A copy with its signing key where the ServerApp looks for it (beside the run, in .audit-keys/)."""
    copy = target / run_dir.name
    shutil.copytree(run_dir, copy)
    keys = target / ".audit-keys"
    keys.mkdir()
    shutil.copy(run_dir.parent / ".audit-keys" / f"{run_dir.name}.ed25519", keys)
    return copy


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that finished 2 rounds, then was resumed with train.rounds = 3 and finished again."""
    run = run_dir_of(run_simulate(*SMALL, "--out", str(tmp_path_factory.mktemp("extended"))))
    config = run / "config.toml"
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    assert run_dir_of(run_simulate("--resume", str(run))) == run
    return run


def test_run_end_states_the_rounds_the_records_cover(extended_run: Path) -> None:
    records = records_of(extended_run)
    assert [r["kind"] for r in records] == ["run_start", "round", "round", "run_end", "run_resume", "round", "run_end"]
    rows = read_jsonl(extended_run / "metrics.jsonl")
    ends = [r["body"] for r in records if r["kind"] == "run_end"]
    assert [(e["rounds"], e["round_range"]) for e in ends] == [(2, [1, 2]), (len(rows), [1, rows[-1]["round"]])]
    assert verify(extended_run).ok


def test_summary_carries_the_head_that_verify_prints(extended_run: Path) -> None:
    summary = read_json(extended_run / "summary.json")
    proc = audit_cli("verify", extended_run, "--head", summary["audit"]["head"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"head {summary['audit']['head']}"
    assert summary["audit"]["records"] == len(records_of(extended_run))


def test_resuming_a_finished_run_again_leaves_a_log_that_verifies(extended_run: Path, tmp_path: Path) -> None:
    run = copy_run(extended_run, tmp_path)
    before = {name: (run / name).read_bytes() for name in (LOG_NAME, "summary.json", "metrics.jsonl")}
    assert run_dir_of(run_simulate("--resume", str(run))) == run
    # Nothing was left to train, so nothing was appended: the log still ends with its run_end.
    assert {name: (run / name).read_bytes() for name in before} == before
    result = verify(run)
    assert result.ok, result.message
    assert result.head == read_json(run / "summary.json")["audit"]["head"]


def test_a_log_cut_back_to_the_first_run_end_fails_naming_the_summary(extended_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(extended_run, run)
    lines = (run / LOG_NAME).read_text().splitlines(keepends=True)
    first_end = next(i for i, line in enumerate(lines, 1) if json.loads(line)["kind"] == "run_end")
    (run / LOG_NAME).write_text("".join(lines[:first_end]))
    proc = audit_cli("verify", run)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("summary.json: says 3 rounds") and f"run_end for 2 rounds (line {first_end})" in line


def test_round_1_records_the_initial_model(extended_run: Path) -> None:
    from fedgov.config import load_config
    from fedgov.data import build_federation
    from fedgov.models import build_model

    body = records_of(extended_run)[1]["body"]
    assert body["round"] == 1
    archived = UpdateArchive.load_arrays(UpdateArchive(extended_run).global_file(1))
    assert body["initial_model"] == digest_arrays(archived)
    # ... and that is the seeded model the run started from, not whatever was archived.
    cfg = load_config(extended_run / "config.toml")
    federation = build_federation(cfg.data, seed=cfg.seed)
    model = build_model(cfg.model.name, input_shape=federation.input_shape, num_classes=federation.num_classes,
                        hidden=cfg.model.hidden, seed=cfg.seed)
    assert body["initial_model"] == digest_arrays([t.detach().numpy() for t in model.state_dict().values()])


def test_trace_with_all_evidence_is_complete(extended_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(extended_run, run)
    proc = audit_cli("trace", run)
    assert proc.returncode == 0, proc.stderr
    result = read_json(run / "trace.json")
    assert result["evidence_complete"] and result["missing"] == [] and result["mismatches"] == []


def test_trace_reports_missing_updates_and_a_swapped_initial_model(extended_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(extended_run, run)
    archive = UpdateArchive(run)
    (archive.round_dir(2) / "coop_001.npz").unlink()
    shutil.copy(archive.global_file(2), archive.global_file(1))  # round 1's starting model replaced
    proc = audit_cli("trace", run)
    assert proc.returncode == 1, proc.stderr
    assert "round 2: coop_001.npz is named in the audit log but missing from updates/round_0002/" in proc.stderr
    assert "round 1: global.npz does not match round 1's initial_model" in proc.stderr
    result = read_json(run / "trace.json")
    assert not result["evidence_complete"]
    assert [(m["round"], m["cooperative"]) for m in result["missing"]] == [(2, 1)]
    assert [(m["round"], m["file"]) for m in result["mismatches"]] == [(1, "global.npz")]
    assert next(r for r in result["ranking"] if r["cooperative"] == 1)["missing"] == 1
