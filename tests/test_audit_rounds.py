"""verify checks what the records claim about the rounds: run_end's rounds are exactly the round records."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgov.audit import AuditLog, verify


def rounds(first: int, last: int) -> list[tuple[str, dict]]:
    return [("round", {"round": r}) for r in range(first, last + 1)]


def end(n: int) -> tuple[str, dict]:
    return ("run_end", {"rounds": n, "round_range": [1, n] if n else None})


def resume(from_round: int) -> tuple[str, dict]:
    return ("run_resume", {"from_round": from_round})


START = ("run_start", {})


def write_log(run_dir: Path, records: list[tuple[str, dict]]) -> Path:
    """A log signed by its own key: every problem below is the writer's, not a forger's."""
    log = AuditLog(run_dir)
    for kind, body in records:
        log.append(kind, body)
    return run_dir


def assert_rounds_problem(run_dir: Path, line: int, *words: str) -> None:
    result = verify(run_dir)
    assert not result.ok and result.reason == "rounds", result.message
    assert result.line == line, result.message
    for word in words:
        assert word in result.message, result.message


GOOD = {
    "one attempt": [START, *rounds(1, 3), end(3)],
    "extended after its run_end": [START, *rounds(1, 2), end(2), resume(2), *rounds(3, 4), end(4)],
    "resumed mid-way": [START, *rounds(1, 2), resume(2), *rounds(3, 3), end(3)],
    # A crash between round 2's record and its checkpoint: the resumed run redoes round 2.
    "redid the round after the checkpoint": [START, *rounds(1, 2), resume(1), *rounds(2, 3), end(3)],
    "crashed before the first checkpoint": [START, *rounds(1, 1), resume(0), *rounds(1, 2), end(2)],
    "other kinds of record": [START, ("marker", {}), *rounds(1, 2), ("marker", {"round": 9}), end(2)],
}


@pytest.mark.parametrize("records", GOOD.values(), ids=GOOD.keys())
def test_runs_whose_records_cover_their_rounds_verify(tmp_path: Path, records: list) -> None:
    result = verify(write_log(tmp_path, records))
    assert result.ok, result.message
    last = records[-1][1]["rounds"]
    assert f"rounds 1..{last} covered" in result.message


def test_a_redone_round_is_named_and_its_later_record_counts(tmp_path: Path) -> None:
    result = verify(write_log(tmp_path, GOOD["redid the round after the checkpoint"]))
    assert result.ok and "round 2 redone" in result.message


BAD = {
    # name: (records, line of the first bad record, words its message must hold)
    "run_end claims more rounds than recorded": ([START, *rounds(1, 2), end(3)], 4, ("states 3", "1..2")),
    "run_end claims fewer rounds than recorded": ([START, *rounds(1, 3), end(2)], 5, ("states 2", "1..3")),
    "a round left out": ([START, *rounds(1, 1), *rounds(3, 3), end(3)], 3, ("round 3", "round 2 was due")),
    "a round twice in one attempt": ([START, *rounds(1, 2), *rounds(2, 2), end(3)], 4, ("round 2", "round 3 was due")),
    "round_range that is not 1..rounds": ([START, *rounds(1, 2), ("run_end", {"rounds": 2, "round_range": [2, 2]})],
                                         4, ("round_range",)),
    "run_end without rounds": ([START, *rounds(1, 2), ("run_end", {})], 4, ("does not state",)),
    "a resume two rounds back": ([START, *rounds(1, 3), resume(1), *rounds(2, 3), end(3)], 5, ("from round 1",)),
    "a resume ahead of the log": ([START, *rounds(1, 1), resume(2), *rounds(3, 3), end(3)], 3, ("from round 2",)),
    "a resume after run_end from elsewhere": ([START, *rounds(1, 2), end(2), resume(1), *rounds(2, 3), end(3)],
                                              5, ("stated 2",)),
    "a round after run_end without a resume": ([START, *rounds(1, 2), end(2), *rounds(3, 3), end(3)], 5,
                                               ("after the run_end at line 4",)),
    "two run_ends in a row": ([START, *rounds(1, 2), end(2), end(2)], 5, ("second run_end",)),
    "no run_start first": ([*rounds(1, 2), end(2)], 1, ("not run_start",)),
    "two runs in one log": ([START, *rounds(1, 1), end(1), START, *rounds(1, 1), end(1)], 4, ("second run_start",)),
}


@pytest.mark.parametrize("records,line,words", BAD.values(), ids=BAD.keys())
def test_records_that_do_not_cover_the_claimed_rounds_fail(tmp_path: Path, records: list, line: int,
                                                          words: tuple[str, ...]) -> None:
    assert_rounds_problem(write_log(tmp_path, records), line, *words)


def test_a_live_run_is_checked_so_far(tmp_path: Path) -> None:
    write_log(tmp_path, [START, *rounds(1, 1), *rounds(3, 3)])
    result = verify(tmp_path, require_end=False)
    assert not result.ok and result.reason == "rounds" and result.line == 3
    (tmp_path / "audit.jsonl").unlink()
    (tmp_path / "audit_public_key.txt").unlink()
    result = verify(write_log(tmp_path, [START, *rounds(1, 2)]), require_end=False)
    assert result.ok and "run not finished" in result.message
