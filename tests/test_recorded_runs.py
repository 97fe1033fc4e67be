"""Runs with attacks, size lies and compute deadlines give the metrics recorded before a refactor.

``tests/recorded/NAME.json`` holds each case's config overrides, the code that recorded it,
and its per-round metrics without timings. A refactor of how the ClientApp applies attacks and
deadlines must leave every recorded field as it was: cohorts, contributors, weights, failures
and their reasons, bytes, and accuracy and loss (to 1e-6, for CPUs whose kernels round
differently). ``FEDGOV_RECORD=1 python -m pytest tests/test_recorded_runs.py -n 0`` rewrites the
files (only for a change that means to alter the metrics, and say so in the commit).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from conftest import run_dir_of
from fedgov.provenance import code_version
from fedgov.results import read_jsonl

RECORDED = Path(__file__).parent / "recorded"
BASE = ["seed=4", "data.num_cooperatives=6", "train.rounds=4", "train.local_epochs=1", "data.partition=powerlaw"]
CASES = {
    # A backdoor and a boosted model replacement, a size lie, and compute tiers with a deadline, at once.
    "attacks_and_deadlines": ["attack.kind=backdoor", "attack.cooperatives=1,4", "attack.start_round=2",
                              "attack.size_claim=3.0", "heterogeneity.compute=tiers", "heterogeneity.tiers=1.0,0.05",
                              "heterogeneity.deadline=1.5"],
    "model_replacement_under_median": ["attack.kind=model_replacement", "attack.cooperatives=2", "attack.start_round=3",
                                    "strategy.name=median"],
}
TIMINGS = ("seconds", "phase_seconds")


def _comparable(row: dict) -> dict:
    row = {k: v for k, v in row.items() if k not in TIMINGS}
    row["client_train"] = {c: {k: v for k, v in m.items() if not k.startswith("seconds_")}
                           for c, m in row.get("client_train", {}).items()}
    return row


def _assert_same(recorded, now, path: str = "") -> None:  # noqa: ANN001
    if isinstance(recorded, dict):
        assert isinstance(now, dict) and recorded.keys() == now.keys(), (path, set(recorded) ^ set(now or {}))
        for key in recorded:
            _assert_same(recorded[key], now[key], f"{path}.{key}")
    elif isinstance(recorded, list):
        assert isinstance(now, list) and len(recorded) == len(now), path
        for i, (a, b) in enumerate(zip(recorded, now)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(recorded, float) and not isinstance(recorded, bool):
        assert isinstance(now, (int, float)) and math.isclose(recorded, now, rel_tol=1e-6, abs_tol=1e-6), \
            (path, recorded, now)
    else:
        assert recorded == now, (path, recorded, now)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_with_attacks_and_deadlines_gives_its_recorded_metrics(case, simulate, tmp_path):
    overrides = [*BASE, *CASES[case]]
    args = [arg for o in overrides for arg in ("--set", o)]
    rows = [_comparable(r) for r in read_jsonl(run_dir_of(simulate(*args, "--out", str(tmp_path))) / "metrics.jsonl")]
    path = RECORDED / f"{case}.json"
    if os.environ.get("FEDGOV_RECORD") == "1":
        path.write_text(json.dumps({"overrides": overrides, "recorded_by": code_version(), "rounds": rows},
                                   indent=1, sort_keys=True) + "\n")
    recorded = json.loads(path.read_text())
    assert recorded["overrides"] == overrides, "the case changed: record it again (module docstring)"
    if any("deadline" in o for o in overrides):
        assert any(r["failures"] for r in recorded["rounds"]), "the recording holds no missed deadline to compare"
    _assert_same(recorded["rounds"], rows)
