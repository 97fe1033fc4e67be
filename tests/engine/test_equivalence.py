"""The pool engine and Flower's own simulation engine give the same runs.

Each case of ``run_cases.CASES`` runs once on each engine (``run_cases.py``, one process per
engine, the two at once). Deterministic cases must agree on every round's accuracy, loss,
cohort, contributors, weights, per-cooperative accuracy, failures, bytes and messages per
stage, and on every audit round record. What a case cannot repeat by design is compared as
two runs on Flower's own engine would compare:

- HE draws its keys and encryption noise from the OS: the global models agree within the
  preset's stated precision per round, and ciphertext sizes (compressed) vary by a few bytes;
- central DP draws its noise from the OS: only cohorts, contributors, epsilon, bytes and
  message counts agree;
- SecAgg+'s key-sharing stage carries the neighbours' node ids as decimal strings, and node
  ids are random 64-bit integers on both engines (17 to 20 digits but with probability under
  1e-3 each): that stage's bytes down differ by at most 3 bytes per id sent.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from fedgov.config import Config
from fedgov.crypto.he_presets import PRESETS
from fedgov.governance.archive import UpdateArchive

sys.path.insert(0, str(Path(__file__).parent))
from run_cases import BASE, CASES, NONDETERMINISTIC, RESUMED, STOP_AFTER  # noqa: E402

TIMINGS = ("seconds", "phase_seconds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    procs = {engine: subprocess.Popen([sys.executable, str(Path(__file__).parent / "run_cases.py"), engine,
                                       str(out / engine)], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
             for engine in ("pool", "flower")}
    for engine, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{engine}: {stderr[-3000:]}"
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    row = {k: v for k, v in row.items() if k not in TIMINGS}
    row["client_train"] = {c: {k: v for k, v in m.items() if not k.startswith("seconds_")}
                           for c, m in row["client_train"].items()}
    return row


def _share_keys_tolerance(row: dict) -> int:
    """Each key-sharing message names at most ``secagg_num_shares`` neighbours by node id."""
    return 3 * row["messages_by_stage"]["secagg_share_keys"]["down"] * Config().secure.secagg_num_shares


def _without_share_keys_down(row: dict) -> dict:
    row = json.loads(json.dumps(row))
    row["bytes_by_stage"]["secagg_share_keys"]["down"] = 0
    row["secure_aggregation"]["bytes"]["share_keys"]["down"] = 0  # the same count, under SecAgg+'s own name
    row["bytes_down"] = 0
    return row


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [c for c in CASES if c not in NONDETERMINISTIC])
def test_deterministic_runs_are_identical_on_both_engines(runs, case):
    pool, flower = _rows(runs / "pool" / case), _rows(runs / "flower" / case)
    rounds = CASES[case].get("train.rounds", BASE["train.rounds"])
    assert [r["round"] for r in pool] == [r["round"] for r in flower] == list(range(1, rounds + 1))
    assert any(r["contributors"] for r in pool)
    for p, f in zip(pool, flower):
        p, f = _untimed(p), _untimed(f)
        if "secure_aggregation" in p:  # SecAgg+: node ids in the key-sharing stage (module docstring)
            gap = abs(p["bytes_by_stage"]["secagg_share_keys"]["down"] - f["bytes_by_stage"]["secagg_share_keys"]["down"])
            assert gap <= _share_keys_tolerance(p)
            assert p["bytes_down"] - f["bytes_down"] == p["bytes_by_stage"]["secagg_share_keys"]["down"] - \
                f["bytes_by_stage"]["secagg_share_keys"]["down"]
            p, f = _without_share_keys_down(p), _without_share_keys_down(f)
        assert p == f, f"round {p['round']}: " + ", ".join(k for k in p if p[k] != f.get(k))
    audit_pool, audit_flower = _records(runs / "pool" / case), _records(runs / "flower" / case)
    assert [r["kind"] for r in audit_pool] == [r["kind"] for r in audit_flower]
    for a, b in zip(audit_pool, audit_flower):
        if a["kind"] == "round":
            assert a["body"] == b["body"]


@pytest.mark.slow
def test_the_resumed_case_was_resumed(runs):
    kinds = [r["kind"] for r in _records(runs / "pool" / RESUMED)]
    assert kinds.count("run_resume") == 1 and kinds.index("run_resume") == 1 + STOP_AFTER


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NONDETERMINISTIC))
def test_runs_that_draw_from_the_os_agree_as_two_flower_runs_would(runs, case):
    pool, flower = _rows(runs / "pool" / case), _rows(runs / "flower" / case)
    assert len(pool) == len(flower) == BASE["train.rounds"]
    for p, f in zip(pool, flower):
        for key in ("sampled", "contributors", "participants", "failures", "messages_by_stage"):
            assert p[key] == f[key], key
        assert p.get("epsilon") == f.get("epsilon")  # central DP: the accountant's, from the same settings
        if case.startswith("he"):
            assert p["weights"] == f["weights"]
            assert p["bytes_by_stage"].keys() == f["bytes_by_stage"].keys()
            for stage in p["bytes_by_stage"]:  # compressed ciphertexts: a few bytes apart
                for direction in ("up", "down"):
                    a, b = p["bytes_by_stage"][stage][direction], f["bytes_by_stage"][stage][direction]
                    assert abs(a - b) <= 0.001 * max(a, b), (stage, direction)
        else:
            assert p["bytes_by_stage"] == f["bytes_by_stage"]
    if case.startswith("he"):
        precision = PRESETS["standard"].precision
        a, b = UpdateArchive(runs / "pool" / case), UpdateArchive(runs / "flower" / case)
        assert a.rounds() == b.rounds() == [1, 2, 3]
        for k in a.rounds():  # round k's global model went through k - 1 encrypted aggregations
            ours, theirs = UpdateArchive.load_arrays(a.global_file(k)), UpdateArchive.load_arrays(b.global_file(k))
            gap = max(float(np.max(np.abs(x - y))) for x, y in zip(ours, theirs))
            assert gap <= precision * (k - 1), (k, gap)
        for p, f in zip(pool, flower):
            assert p["accuracy"] == pytest.approx(f["accuracy"], abs=0.01)
            assert p["loss"] == pytest.approx(f["loss"], abs=1e-4)
