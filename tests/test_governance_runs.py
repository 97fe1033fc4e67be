"""Governance end to end: audit trail, trace and escrow, attacks, weighting, liars, deadlines."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_dir_of, run_simulate
from fedgov.audit import verify
from fedgov.results import read_json, read_jsonl

pytestmark = pytest.mark.slow

# A sleeper (cooperative 2 of 6) plants a backdoor from round 3 of 6.
BACKDOOR = ["--set", "data.num_cooperatives=6", "--set", "train.rounds=6", "--set", "attack.kind=backdoor",
            "--set", "attack.cooperatives=2", "--set", "attack.start_round=3"]


def audit_cli(*args):
    return subprocess.run([sys.executable, "-m", "fedgov.audit", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def backdoor_run(tmp_path_factory):
    return run_dir_of(run_simulate(*BACKDOOR, "--out", str(tmp_path_factory.mktemp("backdoor"))))


@pytest.fixture(scope="module")
def he_backdoor_run(tmp_path_factory):
    return run_dir_of(run_simulate(*BACKDOOR, "--set", "secure.aggregation=he",
                                   "--out", str(tmp_path_factory.mktemp("he-backdoor"))))


def test_every_run_writes_a_verifiable_audit_trail(backdoor_run):
    proc = audit_cli("verify", str(backdoor_run))
    assert proc.returncode == 0, proc.stderr
    lines = (backdoor_run / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["run_start"] + ["round"] * 6 + ["run_end"]
    summary = read_json(backdoor_run / "summary.json")
    assert (backdoor_run / "audit_public_key.txt").read_text().strip() == summary["audit"]["public_key"]
    rows = read_jsonl(backdoor_run / "metrics.jsonl")
    for record, row in zip(records[1:-1], rows):
        body = record["body"]
        assert body["round"] == row["round"]
        assert body["participants"] == row["contributors"] == list(range(6))
        assert set(body["updates"]) == {str(c) for c in range(6)}
        assert body["weights"] == row["weights"] and sum(body["weights"].values()) == pytest.approx(1.0)
        assert body["mechanism"]["strategy"] == "fedavg" and body["mechanism"]["secure_aggregation"] == "off"
        assert len(body["global_model"]) == 64 and body["rejected"] == []
    # The private signing key never lands in the run directory.
    key = (backdoor_run.parent / ".audit-keys" / f"{backdoor_run.name}.ed25519").read_bytes()
    for path in backdoor_run.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path


@pytest.mark.parametrize("tamper", ["edit", "delete", "move"])
def test_verify_fails_after_one_record_is_edited_deleted_or_moved(backdoor_run, tmp_path, tamper):
    copy = tmp_path / "run"
    shutil.copytree(backdoor_run, copy, ignore=shutil.ignore_patterns("updates"))
    log = copy / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    if tamper == "edit":
        lines[4] = lines[4].replace('"round":4', '"round":40')
    elif tamper == "delete":
        del lines[4]
    else:
        lines[4], lines[6] = lines[6], lines[4]
    log.write_text("".join(lines))
    proc = audit_cli("verify", str(copy))
    assert proc.returncode == 1
    assert "line 5" in proc.stderr


def test_the_sleeper_is_stealthy_but_succeeds_and_is_recorded(backdoor_run):
    summary = read_json(backdoor_run / "summary.json")
    attack = summary["attack"]
    assert attack["attackers"] == [2] and attack["kind"] == "backdoor"
    series = attack["success_rate_by_round"]
    assert len(series) == 6 and attack["success_rate"] == series[-1]
    assert max(series[:2]) < 0.2 < series[-1]  # asleep, then awake
    assert [c["malicious"] for c in summary["cooperatives"]] == [c == 2 for c in range(6)]


def test_trace_names_the_attacker_first_in_a_plaintext_run(backdoor_run, tmp_path):
    proc = audit_cli("trace", str(backdoor_run))
    assert proc.returncode == 0, proc.stderr
    result = read_json(backdoor_run / "trace.json")
    assert result["misbehaviour"] == "backdoor"
    assert result["ranking"][0]["cooperative"] == 2
    assert all(r["digests_ok"] == 6 and r["digests_bad"] == 0 for r in result["ranking"])

    # A retained update swapped after the fact is caught against the signed digest.
    copy = tmp_path / "run"
    shutil.copytree(backdoor_run, copy)
    shutil.copy(copy / "updates" / "round_0005" / "coop_000.npz", copy / "updates" / "round_0005" / "coop_002.npz")
    proc = audit_cli("trace", str(copy))
    assert proc.returncode == 1
    assert "round 5: coop_002.npz does not match the digest in the audit log" in proc.stderr


def test_trace_under_he_needs_the_boards_threshold_of_shares(he_backdoor_run):
    board = he_backdoor_run / "keys" / "board"
    shares = sorted(board.glob("board_member_*.share"))
    assert len(shares) == 5
    # The run directory carries the sealed key, never a share of it.
    assert (he_backdoor_run / "escrow" / "sealed_key.bin").is_file()
    assert not list((he_backdoor_run / "escrow").glob("*.share"))

    refused = audit_cli("trace", str(he_backdoor_run))
    assert refused.returncode == 2 and "needs 3" in refused.stderr and "got none" in refused.stderr
    two = [arg for s in shares[:2] for arg in ("--share", str(s))]
    refused = audit_cli("trace", str(he_backdoor_run), *two)
    assert refused.returncode == 2
    assert "refused" in refused.stderr and "3 of 5" in refused.stderr and "got 2" in refused.stderr
    assert not (he_backdoor_run / "trace.json").exists()

    three = [arg for s in shares[1:4] for arg in ("--share", str(s))]
    proc = audit_cli("trace", str(he_backdoor_run), *three)
    assert proc.returncode == 0, proc.stderr
    result = read_json(he_backdoor_run / "trace.json")
    assert result["escrow_opened"] and result["ranking"][0]["cooperative"] == 2
    # Under HE the audit log holds the digest of each ciphertext as received.
    body = json.loads((he_backdoor_run / "audit.jsonl").read_text().splitlines()[3])["body"]
    assert body["mechanism"]["secure_aggregation"] == "he" and len(body["updates"]) == 6
    assert verify(he_backdoor_run).ok


def test_the_sleeper_succeeds_under_he_too(he_backdoor_run, backdoor_run):
    he_attack = read_json(he_backdoor_run / "summary.json")["attack"]
    plain_attack = read_json(backdoor_run / "summary.json")["attack"]
    # The same poisoned updates, summed under encryption: the same success (CKKS error ~1e-7).
    assert he_attack["success_rate"] == pytest.approx(plain_attack["success_rate"], abs=0.02)


def test_malformed_updates_and_missed_deadlines_are_recorded_and_the_rounds_go_on(tmp_path):
    run = run_dir_of(run_simulate(
        "--set", "data.num_cooperatives=4", "--set", "train.rounds=3", "--set", "data.partition=iid",
        "--set", "attack.kind=noise", "--set", "attack.cooperatives=1", "--set", "attack.noise_std=100.0",
        "--set", "heterogeneity.compute=tiers", "--set", "heterogeneity.tiers=1.0,0.01",
        "--set", "heterogeneity.deadline=2.0", "--out", str(tmp_path)))
    summary = read_json(run / "summary.json")
    slow = summary["compute"]["slowest"]
    assert len(slow) == 2  # two tiers dealt over four cooperatives
    rows = read_jsonl(run / "metrics.jsonl")
    records = [json.loads(line)["body"] for line in (run / "audit.jsonl").read_text().splitlines()[1:-1]]
    for row, body in zip(rows, records):
        missed = {f["cooperative"] for f in row["failures"] if "deadline" in f["reason"]}
        assert missed == set(slow)
        rejected = {f["cooperative"]: f["reason"] for f in body["rejected"]}
        if 1 not in slow:  # the saboteur trains in time, and its noise is turned away
            assert set(rejected) == {1} and "exceeds governance.max_update_norm" in rejected[1]
        assert {m["cooperative"] for m in body["missed"]} == missed
        assert set(row["contributors"]) == set(range(4)) - missed - set(rejected)
    assert summary["compute"]["slowest_participation"] == 0.0
    assert summary["compute"]["others_participation"] > 0
    assert summary["final_accuracy"] > 0.5  # the rounds went on with the rest


def test_a_size_liar_under_he_looks_honest_in_the_log_but_is_not(tmp_path):
    # (In plaintext the aggregator applies the weights itself: tests/strategies/test_governance.py.)
    run = run_dir_of(run_simulate(
        "--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.rounds=2",
        "--set", "attack.cooperatives=3", "--set", "attack.size_claim=10.0", "--set", "governance.weighting=equal",
        "--set", "secure.aggregation=he", "--out", str(tmp_path)))
    summary = read_json(run / "summary.json")
    # The aggregator assigns and records equal weights...
    assert summary["influence"]["max_weight"] == pytest.approx(0.25)
    assert summary["attack"]["recorded_weight"] == pytest.approx(0.25)
    # ...but the liar scaled its update inside the ciphertext: it really applied 10 / 13 of the total
    # (simulation ground truth, which the aggregator cannot see).
    assert summary["influence"]["applied"]["max_weight"] == pytest.approx(10 / 13)
    assert summary["attack"]["effective_weight"] == pytest.approx(10 / 13)
    assert summary["influence"]["applied_weight_sum"] == pytest.approx(13 / 4)
