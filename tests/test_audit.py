"""The signed audit trail: every single-record tamper is caught at the right line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedgov.audit import (
    GENESIS,
    LOG_NAME,
    PUBLIC_KEY_NAME,
    AuditError,
    AuditLog,
    canonical_json,
    digest_arrays,
    digest_bytes,
    verify,
)

N_RECORDS = 6  # run_start, 4 rounds, run_end


def build_log(run_dir: Path) -> AuditLog:
    log = AuditLog(run_dir)
    rng = np.random.default_rng(0)
    log.append("run_start", {"config_hash": "abc123", "strategy": "fedavg", "cooperatives": 4})
    for rnd in range(1, 5):
        updates = {f"coop-{i}": digest_arrays([rng.normal(size=(3, 2)).astype(np.float32)]) for i in range(4)}
        log.append("round", {
            "round": rnd,
            "participants": sorted(updates),
            "update_digests": updates,
            "weights": {k: 0.25 for k in updates},
            "model_digest": digest_arrays([rng.normal(size=(3, 2)).astype(np.float32)]),
            "rejected": [{"client": "coop-9", "why": "norm too large"}] if rnd == 3 else [],
        })
    log.append("run_end", {"rounds": 4, "model_digest": digest_bytes(b"final")})
    return log


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.audit", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def lines_of(run_dir: Path) -> list[str]:
    return (run_dir / LOG_NAME).read_text().splitlines(keepends=True)


def write_lines(run_dir: Path, lines: list[str]) -> None:
    (run_dir / LOG_NAME).write_text("".join(lines))


def assert_fails_at(run_dir: Path, line: int, reason: str | None = None) -> None:
    """verify and the CLI both name ``line`` as the first bad record, in one stderr line."""
    result = verify(run_dir)
    assert not result.ok
    assert result.line == line, result.message
    if reason is not None:
        assert result.reason == reason, result.message
    proc = run_cli("verify", run_dir)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    # "line 7 (seq 6): ..." or, when the line does not parse, "line 7: ..."
    assert re.match(rf"{LOG_NAME} line {line}( \(seq \d+\))?: ", err[0]), err[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    build_log(tmp_path)
    return tmp_path


def test_intact_log_verifies(run_dir: Path) -> None:
    result = verify(run_dir)
    assert result.ok and result.records == N_RECORDS and result.line is None
    records = [json.loads(line) for line in lines_of(run_dir)]
    assert [r["seq"] for r in records] == list(range(N_RECORDS))
    assert [r["kind"] for r in records] == ["run_start", "round", "round", "round", "round", "run_end"]
    assert records[0]["prev"] == GENESIS
    for before, after, raw in zip(records, records[1:], lines_of(run_dir)):
        assert after["prev"] == digest_bytes(raw.rstrip("\n").encode())
    assert all(canonical_json(r) + "\n" == raw for r, raw in zip(records, lines_of(run_dir)))
    assert result.head == digest_bytes(lines_of(run_dir)[-1].rstrip("\n").encode())

    proc = run_cli("verify", run_dir)
    assert proc.returncode == 0, proc.stderr
    summary, head = proc.stdout.strip().splitlines()
    assert summary.startswith(f"{LOG_NAME}: {N_RECORDS} records, chain and signatures intact")
    assert head == f"head {result.head}"  # last, for a witness to keep
    assert proc.stderr == ""


@pytest.mark.parametrize("index", range(N_RECORDS))
@pytest.mark.parametrize("how", ["field", "byte"])
def test_editing_any_record_is_caught_at_its_line(run_dir: Path, index: int, how: str) -> None:
    lines = lines_of(run_dir)
    if how == "field":
        record = json.loads(lines[index])
        record["body"]["tampered"] = True
        lines[index] = canonical_json(record) + "\n"
    else:  # one character inside the signature-covered time stamp: still valid JSON
        pos = lines[index].index('"time":"') + len('"time":"') + 3
        digit = lines[index][pos]
        lines[index] = lines[index][:pos] + ("1" if digit != "1" else "2") + lines[index][pos + 1:]
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, index + 1, "edited")


@pytest.mark.parametrize("index", range(N_RECORDS))
def test_editing_seq_or_prev_is_an_edit(run_dir: Path, index: int) -> None:
    lines = lines_of(run_dir)
    record = json.loads(lines[index])
    record["prev"] = digest_bytes(b"elsewhere")
    lines[index] = canonical_json(record) + "\n"
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, index + 1, "edited")


def test_whitespace_change_is_caught_at_its_line(run_dir: Path) -> None:
    lines = lines_of(run_dir)
    lines[2] = lines[2].replace(",", ", ", 1)  # same JSON, signature still verifies, bytes differ
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, 3, "edited")


@pytest.mark.parametrize("index", range(N_RECORDS))
def test_deleting_any_record_is_caught(run_dir: Path, index: int) -> None:
    lines = lines_of(run_dir)
    del lines[index]
    write_lines(run_dir, lines)
    # the line that now holds the next record, or one past the end for the last one
    assert_fails_at(run_dir, index + 1, "incomplete" if index == N_RECORDS - 1 else "deleted or inserted")


@pytest.mark.parametrize("index", range(N_RECORDS))
def test_inserting_a_copy_is_caught(run_dir: Path, index: int) -> None:
    lines = lines_of(run_dir)
    lines.insert(index + 1, lines[index])
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, index + 2, "deleted or inserted")


def test_inserting_a_copy_elsewhere_is_caught(run_dir: Path) -> None:
    lines = lines_of(run_dir)
    lines.insert(4, lines[1])
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, 5)


@pytest.mark.parametrize("index", range(N_RECORDS - 1))
def test_swapping_adjacent_records_is_caught(run_dir: Path, index: int) -> None:
    lines = lines_of(run_dir)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, index + 1, "reordered")


@pytest.mark.parametrize("index", range(N_RECORDS))
def test_truncating_mid_line_is_caught(run_dir: Path, index: int) -> None:
    lines = lines_of(run_dir)
    write_lines(run_dir, lines[:index] + [lines[index][: len(lines[index]) // 2]])
    assert_fails_at(run_dir, index + 1, "truncated")


def test_garbage_line_is_malformed_json(run_dir: Path) -> None:
    lines = lines_of(run_dir)
    lines[3] = "{not json\n"
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, 4, "malformed JSON")


def test_resigning_with_another_key_is_caught(run_dir: Path) -> None:
    """Without the aggregator's key, an edit cannot be made to verify, even re-chained."""
    forger = Ed25519PrivateKey.generate()
    lines = lines_of(run_dir)
    prev = digest_bytes(lines[1].rstrip("\n").encode())
    for i in range(2, N_RECORDS):  # edit record 2, re-chain and re-sign everything after it
        record = json.loads(lines[i])
        record.pop("sig")
        record["prev"] = prev
        if i == 2:
            record["body"]["weights"]["coop-0"] = 0.97
        record["sig"] = forger.sign(canonical_json(record).encode()).hex()
        lines[i] = canonical_json(record) + "\n"
        prev = digest_bytes(lines[i].rstrip("\n").encode())
    write_lines(run_dir, lines)
    assert_fails_at(run_dir, 3, "edited")


def test_replacing_the_public_key_is_caught_with_the_expected_key(tmp_path: Path) -> None:
    original = build_log(tmp_path).public_key_hex
    forger = Ed25519PrivateKey.generate()
    lines = lines_of(tmp_path)
    prev = GENESIS
    for i, raw in enumerate(lines):  # re-sign the whole log with the forger's key
        record = json.loads(raw)
        record.pop("sig")
        record["prev"] = prev
        if i == 3:
            record["body"]["rejected"] = []
        record["sig"] = forger.sign(canonical_json(record).encode()).hex()
        lines[i] = canonical_json(record) + "\n"
        prev = digest_bytes(lines[i].rstrip("\n").encode())
    write_lines(tmp_path, lines)
    (tmp_path / PUBLIC_KEY_NAME).write_text(forger.public_key().public_bytes_raw().hex() + "\n")

    assert verify(tmp_path).ok  # the key file alone is the anchor: a full forgery passes
    result = verify(tmp_path, public_key_hex=original)
    assert not result.ok and result.reason == "public key"
    proc = run_cli("verify", tmp_path, "--public-key", original)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert PUBLIC_KEY_NAME in proc.stderr
    assert run_cli("verify", tmp_path, "--public-key", forger.public_key().public_bytes_raw().hex()).returncode == 0


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    first = AuditLog(tmp_path)
    first.append("run_start", {"rounds": 3})
    first.append("round", {"round": 1})
    key, head = first.private_key_bytes, first.head

    with pytest.raises(AuditError):  # a new key cannot continue a signed log
        AuditLog(tmp_path)
    with pytest.raises(AuditError):
        AuditLog(tmp_path, private_key_bytes=Ed25519PrivateKey.generate().private_bytes_raw())

    second = AuditLog(tmp_path, private_key_bytes=key)
    assert second.seq == 2 and second.head == head
    record = second.append("round", {"round": 2})
    assert record["seq"] == 2 and record["prev"] == head
    second.append("run_end", {"rounds": 2})
    result = verify(tmp_path)
    assert result.ok and result.records == 4


def test_reopening_a_tampered_log_is_refused(run_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()  # the fixture's key is gone; use a log we hold the key of
    log = AuditLog(run_dir / "sub", private_key_bytes=key.private_bytes_raw())
    for i in range(3):
        log.append("round", {"round": i})
    lines = lines_of(run_dir / "sub")
    del lines[1]
    write_lines(run_dir / "sub", lines)
    with pytest.raises(AuditError, match="line 2"):
        AuditLog(run_dir / "sub", private_key_bytes=key.private_bytes_raw())


def test_unfinished_log_needs_allow_incomplete(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("run_start", {})
    log.append("round", {"round": 1})
    assert verify(tmp_path).reason == "incomplete"
    assert verify(tmp_path, require_end=False).ok
    assert run_cli("verify", tmp_path, "--allow-incomplete").returncode == 0


def test_missing_or_empty_log(tmp_path: Path) -> None:
    for target in (tmp_path / "nope", tmp_path):
        result = verify(target)
        assert not result.ok and result.reason == "no audit log"
        proc = run_cli("verify", target)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc
        assert "Traceback" not in proc.stderr
    AuditLog(tmp_path)  # writes the key, no records yet
    (tmp_path / LOG_NAME).write_text("")
    assert verify(tmp_path).reason == "no audit log"
    assert run_cli("verify", tmp_path).returncode == 2


def test_digest_arrays() -> None:
    a = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.int64)]
    same = [x.copy() for x in a]
    assert digest_arrays(a) == digest_arrays(same)
    assert digest_arrays([np.asfortranarray(a[0]), a[1]]) == digest_arrays(a)  # layout does not matter

    changed = [x.copy() for x in a]
    changed[0][1, 2] = 5.5
    assert digest_arrays(changed) != digest_arrays(a)
    assert digest_arrays([a[0].astype(np.float64), a[1]]) != digest_arrays(a)
    assert digest_arrays([a[0].reshape(3, 2), a[1]]) != digest_arrays(a)
    assert digest_arrays([a[0].ravel(), a[1]]) != digest_arrays(a)
    assert digest_arrays([np.concatenate([a[0].ravel(), a[0].ravel()])]) != digest_arrays([a[0].ravel()] * 2)
    assert digest_bytes(b"x") == digest_bytes(b"x") != digest_bytes(b"y")


def test_private_key_never_written(tmp_path: Path) -> None:
    log = build_log(tmp_path)
    secret = log.private_key_bytes
    assert len(secret) == 32
    needles = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {LOG_NAME, PUBLIC_KEY_NAME}
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), path
    assert (tmp_path / PUBLIC_KEY_NAME).read_text().strip() == log.public_key_hex
