"""A new user's path: their own CSV, errors before anything starts, one-line failures, proper CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_dir_of, run_simulate
from fedgov.client_errors import clean_reason
from fedgov.config import load_config
from fedgov.results import read_json, read_jsonl

SITES = {"North Clinic": 180, "South Hospital": 110, "East Lab": 60, "West Care": 35, "Rural Post": 25}


def write_sites_csv(path: Path) -> Path:
    """Five sites of unequal size, names with spaces, string labels, three classes."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0.0, 2.0, size=(3, 6))
    lines = ["f0,f1,f2,f3,f4,f5,diagnosis,site"]
    for site, rows in SITES.items():
        for _ in range(rows):
            label = int(rng.integers(3))
            x = centres[label] + rng.normal(0.0, 1.0, size=6)
            lines.append(",".join(f"{v:.4f}" for v in x) + f",{['benign', 'malignant', 'unclear'][label]},{site}")
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_args(path: Path) -> list[str]:
    return ["--set", "data.dataset=csv", "--set", f"data.path={path}", "--set", "data.label_column=diagnosis",
            "--set", "data.partition=natural", "--set", "data.cooperative_column=site"]


def test_natural_csv_cooperatives_come_from_the_data(tmp_path):
    csv = write_sites_csv(tmp_path / "sites.csv")
    run_dir = run_dir_of(run_simulate(*csv_args(csv), "--set", "train.rounds=2", "--out", str(tmp_path / "runs")))
    summary = read_json(run_dir / "summary.json")
    # One cooperative per site, in sorted order of the values, named after them.
    assert [c["name"] for c in summary["cooperatives"]] == sorted(SITES)
    assert [c["id"] for c in summary["cooperatives"]] == list(range(len(SITES)))
    by_name = {c["name"]: c["num_examples"] for c in summary["cooperatives"]}
    assert sorted(by_name, key=by_name.get) == sorted(SITES, key=SITES.get)  # sizes follow the sites
    assert load_config(run_dir / "config.toml").data.num_cooperatives == len(SITES)
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        assert row["failures"] == [] and row["participants"] == len(SITES), row

    # The run's config.toml fixes the count: a resume whose CSV now names another number of sites
    # stops before the engine, naming both numbers.
    with csv.open("a") as handle:
        handle.write("0,0,0,0,0,0,benign,New Site\n" * 20)
    proc = _usage_error("--resume", str(run_dir))
    assert "set to 5" in proc.stderr and "names 6 cooperatives" in proc.stderr, proc.stderr


def _usage_error(*args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = run_simulate(*args, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgov.simulate: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    # Found before any engine starts: Ray alone takes longer than this to come up.
    assert time.monotonic() - started < 30
    assert proc.stdout == ""
    return proc


def test_natural_csv_count_the_user_fixed_must_agree(tmp_path):
    csv = write_sites_csv(tmp_path / "sites.csv")
    proc = _usage_error(*csv_args(csv), "--set", "data.num_cooperatives=4", "--out", str(tmp_path / "runs"))
    assert "data.num_cooperatives" in proc.stderr and " 4" in proc.stderr and " 5 " in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_cuda_without_a_gpu_stops_before_the_engine(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _usage_error("--set", "runtime.device=cuda", "--out", str(tmp_path))
    assert "runtime.device" in proc.stderr


def test_a_ray_cluster_that_does_not_answer_stops_before_the_engine(tmp_path):
    from fedgov.bench.flower_processes import free_ports

    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    proc = _usage_error("--set", f"runtime.ray_address={dead}", "--out", str(tmp_path / "runs"))
    assert "runtime.ray_address" in proc.stderr and dead in proc.stderr
    proc = _usage_error("--set", "runtime.ray_address=my-cluster", "--out", str(tmp_path / "runs"))
    assert "not HOST:PORT" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_csv_column_stops_before_the_engine(tmp_path):
    csv = write_sites_csv(tmp_path / "sites.csv")
    proc = _usage_error(*csv_args(csv), "--set", "data.cooperative_column=hospital", "--out", str(tmp_path))
    assert "'hospital'" in proc.stderr and "data.cooperative_column" in proc.stderr


def _keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.crypto.keys", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_key_folders_of_another_preset_are_refused_not_kept(tmp_path):
    key_dir = tmp_path / "keys"
    made = _keys(str(key_dir), "--preset", "compact")
    assert made.returncode == 0, made.stderr
    manifest = json.loads((key_dir / "keys.json").read_text())
    assert manifest["preset"] == "compact" and manifest["key_holder"] == "clients"
    before = (key_dir / "aggregator.ctx").read_bytes()

    again = _keys(str(key_dir), "--preset", "standard")  # used to keep the compact keys silently
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "secure.preset" in again.stderr and "'compact'" in again.stderr
    assert (key_dir / "aggregator.ctx").read_bytes() == before

    same = _keys(str(key_dir), "--preset", "compact")  # the same settings reuse the set
    assert same.returncode == 0 and (key_dir / "aggregator.ctx").read_bytes() == before

    proc = _usage_error("--set", "secure.aggregation=he", "--set", f"secure.key_dir={key_dir}",
                        "--out", str(tmp_path / "runs"))
    assert "secure.key_dir" in proc.stderr and "secure.preset" in proc.stderr

    forced = _keys(str(key_dir), "--preset", "standard", "--key-holder", "custodian", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((key_dir / "keys.json").read_text())["preset"] == "standard"
    assert not (key_dir / "cooperatives.keys").exists()  # nothing of the old set survives
    assert (key_dir / "custodian.keys").is_file()


def test_clean_reason_strips_engine_wrappers_and_colour():
    ray_text = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
                "\x1b[39m (pid=123, ip=127.0.0.1)\n  File \"x.py\", line 3, in run\n    raise ClientAppException\n"
                "flwr.clientapp.client_app.ClientAppException: \n"
                "Exception ClientAppException occurred. Message: preset 'standard': value out of range\n"
                "fedgov.crypto.he.HEError: preset 'standard': value out of range'>")
    reason = clean_reason(ray_text)
    assert "\x1b" not in reason and "ray" not in reason.lower() and "\n" not in reason
    assert reason.startswith("fedgov.crypto.he.HEError: preset 'standard'")
    assert clean_reason("ValueError: plain") == "ValueError: plain"


@pytest.mark.slow
def test_a_failing_cooperative_is_one_line_and_a_clean_record(tmp_path):
    """Cooperative 3 sends noise too large for HE to encode: its encryption raises in every round."""
    failing = ["--set", "secure.aggregation=he", "--set", "attack.kind=noise", "--set", "attack.noise_std=1000",
               "--set", "attack.cooperatives=3", "--set", "train.rounds=2", "--set", "data.num_cooperatives=4",
               "--set", "data.partition=iid"]
    proc = run_simulate(*failing, "--out", str(tmp_path / "quiet"), process=True)  # every library's stderr
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [line for line in errors if line.startswith("fedgov.simulate: error: ")], proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "cooperative 3 (coop-3)" in errors[0] and "HEError" in errors[0], errors[0]
    for word in ("Traceback", "ray", "Ray", "\x1b"):
        assert word not in proc.stderr, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]  # the run went on and kept what was done
    for row in rows:
        (failure,) = row["failures"]
        assert failure["cooperative"] == 3 and failure["crashed"] is True
        assert failure["reason"].startswith("HEError: ") and "\x1b" not in failure["reason"]
        assert row["participants"] == 3
    audit = (run_dir / "audit.jsonl").read_text()
    # The engine leaves no trace in the record (run_start's config names runtime.ray_address, a setting).
    after_start = "\n".join(line for line in audit.splitlines() if '"kind":"run_start"' not in line)
    assert "HEError: " in audit and "ray" not in after_start.lower() and "\\u001b" not in audit

    verbose = run_simulate(*failing, "--set", "train.rounds=1", "--verbose", "--out", str(tmp_path / "verbose"),
                           process=True)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "HEError" in verbose.stderr  # the full trace, on request


@pytest.mark.slow
def test_default_run_reaches_the_documented_accuracy_with_a_clean_stderr(tmp_path):
    """The README's first command: >= 0.90 on digits, and nothing on stderr but fedgov's own progress."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # simulate must quiet Ray itself
    proc = subprocess.run([sys.executable, "-m", "fedgov.simulate", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    run_dir = run_dir_of(proc)
    for word in ("WARNING", "DEPRECATED", "FutureWarning", "Traceback", "Warning"):
        assert word not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 20 and all(line.startswith("round ") for line in lines), proc.stderr
    summary = read_json(run_dir / "summary.json")
    assert summary["rounds"] == 20 and len(summary["cooperatives"]) == 10
    assert summary["final_accuracy"] >= 0.90


TOOLS = {
    "fedgov.simulate": ["--rounds", "3"],
    "fedgov.experiment": ["experiments/heterogeneity.toml", "--jobs", "zero"],
    "fedgov.bench": ["--suite", "nope"],
    "fedgov.audit": ["inspect", "runs/x"],
    "fedgov.plots": ["figure", "runs/x"],
    "fedgov.config": ["--format", "json"],
    "fedgov.crypto.keys": ["/tmp/fedgov-test-keys", "--preset", "nope"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_command_line_tool_has_help_and_one_line_errors(tool):
    helped = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ") and "--help" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", tool, *TOOLS[tool]], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 2, (bad.returncode, bad.stderr)
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""
