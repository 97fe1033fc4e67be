"""Verify a run's audit trail: the chain, what its records claim about the rounds, and the run directory.

``verify(run_dir)`` checks, in this order, stopping at the first problem:

1. **The chain** (``fedgov.audit.log.read_chain``): every line signed, chained and in order.
2. **The witness** (``head=``): the last record's hash must be the one a witness holds. A
   chain cannot prove its own end: cutting records off the end leaves a valid chain.
3. **The end**: by default the last record must be ``run_end``.
4. **The rounds**: one ``run_start`` first; then round records 1, 2, ... in order, each
   once per attempt. A ``run_resume`` restarts from its ``from_round`` (the checkpoint),
   which is the round the log is at or one before it, because a round record is written
   just before its checkpoint: a crash between the two makes the resumed run redo that
   round. The redone round's later record is the one that counts (``trace`` does the
   same). After a ``run_end``, a ``run_resume`` must start from the rounds it stated. Each
   ``run_end`` states ``rounds`` (and ``round_range``), which must be the rounds recorded.
5. **The run directory**: ``summary.json`` (``rounds``, ``audit.head``), ``checkpoint.npz``
   (its round and model) and ``metrics.jsonl`` (its rows) must agree with what the log
   says was done; each is checked when present. This catches a log cut back to an
   earlier ``run_end`` while the files say more was done, unless those files were
   rewritten too: only a witness of the head (2) catches that.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from .log import LOG_NAME, Chain, VerifyResult, digest_arrays, read_chain

__all__ = ["verify", "members_by_round", "is_digest", "SUMMARY_NAME", "CHECKPOINT_NAME", "METRICS_NAME"]

# Written by fedgov.run_record, which imports this package, so the names are not imported from it.
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.jsonl"

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """True for a SHA-256 hex digest (64 hex digits, either case)."""
    return bool(_HEX64.fullmatch(text.strip().lower()))


def verify(run_dir: str | Path, public_key_hex: str | None = None, *, require_end: bool = True,
           head: str | None = None) -> VerifyResult:
    """Check ``run_dir/audit.jsonl`` and the run directory around it; report the first problem.

    ``public_key_hex``: the aggregator's key, learnt out of band (else the key file is trusted).
    ``require_end``: the last record must be ``run_end``; pass False for a run still going.
    ``head``: a witness of the last record's hash, e.g. the board's copy of ``summary.json``'s
    ``audit.head`` printed at the end of the run. Raises ValueError if it is not a digest.
    """
    if head is not None and not is_digest(head):
        raise ValueError(f"head: {head!r} is not a SHA-256 hex digest (64 hex digits)")
    run_dir = Path(run_dir)
    chain = read_chain(run_dir, public_key_hex)
    if chain.problem is not None:
        return chain.problem
    n = len(chain.records)
    if head is not None and chain.head != head.strip().lower():
        return _head_problem(chain, head.strip().lower())
    if require_end and chain.records[-1]["kind"] != "run_end":
        return VerifyResult(False, n, n + 1, n, "incomplete",
                            "missing: the log ends without a run_end record "
                            "(the run did not finish, or its last records were deleted)", chain.head)
    walk = _walk_rounds(chain)
    if isinstance(walk, VerifyResult):
        return walk
    problem = _check_run_dir(run_dir, chain, walk)
    if problem is not None:
        return problem
    covered = walk.describe() + (", head matches the witness" if head else "") + _membership(chain)
    return VerifyResult(True, n, head=chain.head, covered=covered)


def _membership(chain: Chain) -> str:
    """Who decided who counts as a member, when someone did: the registrar named in run_start,
    and the SuperNode keys registered on the Deployment Engine."""
    text = ""
    keys = _keys_of(chain.records[0]["body"].get("cooperatives"))
    if keys:
        text += f"; {len(keys)} members admitted by their registered keys (--members lists them by round)"
    registrar = chain.records[0]["body"].get("registrar")
    if not isinstance(registrar, dict):
        return text
    merged = registrar.get("merged") or {}
    return text + (f"; membership decided by registrar {registrar.get('name')!r} "
                   f"({len(merged)} of {registrar.get('identities_checked')} identities merged into another member)")


def _keys_of(entries: object) -> dict[int, str]:
    """cooperative -> key fingerprint, from run_start's cooperatives or run_resume's members."""
    if not isinstance(entries, dict):
        return {}
    return {int(c): e["member_key"] for c, e in entries.items()
            if str(c).isdigit() and isinstance(e, dict) and isinstance(e.get("member_key"), str)}


def members_by_round(chain: Chain) -> list[tuple[int, dict[int, str | None]]]:
    """Each round record, in log order, with the key behind each cooperative whose update it counted.

    The keys are those the SuperNodes joined with when the run started, or resumed (a resumed
    run may meet re-registered members); None where the log names no key (a simulated member).
    """
    keys: dict[int, str] = {}
    rounds: list[tuple[int, dict[int, str | None]]] = []
    for record in chain.records:
        kind, body = record["kind"], record["body"]
        if kind == "run_start":
            keys = _keys_of(body.get("cooperatives"))
        elif kind == "run_resume" and "members" in body:
            keys = _keys_of(body.get("members"))
        elif kind == "round" and isinstance(body.get("round"), int):
            contributors = [int(c) for c in body.get("participants") or [] if str(c).isdigit()]
            rounds.append((body["round"], {c: keys.get(c) for c in sorted(contributors)}))
    return rounds


def _head_problem(chain: Chain, witness: str) -> VerifyResult:
    n = len(chain.records)
    if witness in chain.hashes:
        at = chain.hashes.index(witness) + 1
        detail = (f"the witness is the hash of line {at}, but the log goes on to line {n}: "
                  f"{n - at} record(s) were added after the witness was taken")
    else:
        detail = (f"the last record's hash {chain.head} is not the witness {witness}, nor is any earlier "
                  f"line's: records were cut off after the witnessed one, or the log was replaced")
    return VerifyResult(False, n, n, n - 1, "head", detail, chain.head)


# --------------------------------------------------------------------------- rounds


@dataclass
class _Rounds:
    """What the records say was done."""

    position: int = 0  # the round the run is at: the last round recorded, or where it resumed
    highest: int = 0  # the highest round any record names
    ended: int | None = None  # the rounds the last run_end stated, while no resume followed it
    end_line: int | None = None
    redone: list[int] = field(default_factory=list)
    complete: bool = False  # the log ends with that run_end

    def describe(self) -> str:
        text = f"rounds 1..{self.position} covered" if self.position else "no rounds"
        if self.redone:
            text += f" (round {', '.join(map(str, self.redone))} redone after a resume; the later record counts)"
        return text if self.complete else text + ", run not finished"


def _walk_rounds(chain: Chain) -> _Rounds | VerifyResult:
    walk = _Rounds()
    for index, record in enumerate(chain.records):
        line, kind, body = index + 1, record["kind"], record["body"]

        def bad(detail: str) -> VerifyResult:
            return VerifyResult(False, index, line, record["seq"], "rounds", detail,
                                chain.hashes[index - 1] if index else None)

        def number(key: str) -> int | None:
            value = body.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

        if index == 0:
            if kind != "run_start":
                return bad(f"the log starts with {kind}, not run_start")
            continue
        if kind == "run_start":
            return bad("a second run_start: two runs were written into one log")
        if kind == "round":
            r = number("round")
            if r is None:
                return bad("a round record without a round number")
            if walk.ended is not None:
                return bad(f"round {r} after the run_end at line {walk.end_line}, with no run_resume between")
            if r != walk.position + 1:
                return bad(f"round {r} where round {walk.position + 1} was due: "
                           f"rounds were skipped, repeated or cut out")
            if r <= walk.highest:
                walk.redone.append(r)
            walk.position, walk.highest = r, max(walk.highest, r)
        elif kind == "run_resume":
            start = number("from_round")
            if start is None:
                return bad("a run_resume without from_round")
            if walk.ended is not None and start != walk.ended:
                return bad(f"run_resume from round {start}, but the run_end at line {walk.end_line} "
                           f"stated {walk.ended} rounds")
            if walk.ended is None and start > walk.position:
                return bad(f"run_resume from round {start}, but the log was only at round {walk.position}; "
                           f"a checkpoint is never ahead of the round records")
            if walk.ended is None and start < walk.position - 1:
                return bad(f"run_resume from round {start}, but the log was at round {walk.position}; "
                           f"a checkpoint is never more than one round behind the log")
            walk.position, walk.ended = start, None
        elif kind == "run_end":
            stated = number("rounds")
            if walk.ended is not None:
                return bad(f"a second run_end after the one at line {walk.end_line}, with no run_resume between")
            if stated is None:
                return bad("a run_end that does not state its rounds")
            if stated != walk.position or walk.highest > stated:
                return bad(f"run_end states {stated} rounds, but the round records cover 1..{walk.highest}"
                           + (f" and the run was at round {walk.position}" if walk.position != walk.highest else ""))
            if "round_range" in body and body["round_range"] != ([1, stated] if stated else None):
                return bad(f"run_end states round_range {body['round_range']}, but the records cover 1..{stated}")
            walk.ended, walk.end_line = stated, line
        # Other kinds (markers other mechanisms add) say nothing about rounds.
    walk.complete = chain.records[-1]["kind"] == "run_end"
    return walk


# --------------------------------------------------------------------------- run directory


def _check_run_dir(run_dir: Path, chain: Chain, walk: _Rounds) -> VerifyResult | None:
    n = len(chain.records)
    end_body = chain.records[-1]["body"] if walk.complete else {}
    claim = (f"{LOG_NAME} ends with a run_end for {walk.ended} rounds (line {walk.end_line})" if walk.complete
             else f"{LOG_NAME} reaches round {walk.position} and has no run_end")

    def bad(name: str, detail: str) -> VerifyResult:
        return VerifyResult(False, n, reason="run directory", detail=detail, head=chain.head, file=name)

    try:
        summary = _read_summary(run_dir / SUMMARY_NAME)
        checkpoint = _read_checkpoint(run_dir / CHECKPOINT_NAME)
        metrics = _read_metric_rounds(run_dir / METRICS_NAME)
    except _Unreadable as exc:
        return bad(exc.name, f"cannot be read ({exc.why}), so it cannot be checked against {LOG_NAME}")

    if summary is not None:
        rounds, head = summary
        if (rounds != walk.ended) if walk.complete else (rounds > walk.highest):
            return bad(SUMMARY_NAME, f"says {rounds} rounds were done, but {claim}: "
                                     f"the log was cut back, or {SUMMARY_NAME} was edited")
        if head is not None and head not in chain.hashes:
            return bad(SUMMARY_NAME, f"audit.head {head} is the hash of no line of {LOG_NAME}: "
                                     f"records were cut off after it, or one of the two files was replaced")
        if head is not None and walk.complete and head != chain.head:
            at = chain.hashes.index(head) + 1
            return bad(SUMMARY_NAME, f"audit.head is line {at} of {LOG_NAME}, but the log ends at line {n}: "
                                     f"{SUMMARY_NAME} is from an earlier end of the run")
    if checkpoint is not None:
        done, model = checkpoint
        # A live run's checkpoint is written just after each round record: it may be one behind.
        if (done != walk.ended) if walk.complete else not (walk.position - 1 <= done <= walk.position):
            return bad(CHECKPOINT_NAME, f"holds the model after round {done}, but {claim}: "
                                        f"the log was cut back, or {CHECKPOINT_NAME} was replaced")
        expected = end_body.get("global_model")
        if isinstance(expected, str) and digest_arrays(model) != expected:
            return bad(CHECKPOINT_NAME, f"its model does not match the global_model digest of the run_end at "
                                        f"line {walk.end_line}: {CHECKPOINT_NAME} was replaced")
    if metrics is not None:
        # metrics.jsonl is written just before each round record, so a live run may be one row ahead.
        last = metrics[-1] if metrics else 0
        contiguous = metrics == list(range(1, last + 1))
        agrees = last == walk.ended if walk.complete else walk.position <= last <= walk.position + 1
        if not (contiguous and agrees):
            rows = f"rows for rounds {_ranges(metrics)}" if metrics else "no rows"
            return bad(METRICS_NAME, f"has {rows}, but {claim}: the log was cut back, or {METRICS_NAME} was edited")
    return None


class _Unreadable(Exception):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name, self.why = name, why


def _read_summary(path: Path) -> tuple[int, str | None] | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        rounds = summary["rounds"]
        if not isinstance(rounds, int):
            raise ValueError("rounds is not a number")
        head = (summary.get("audit") or {}).get("head")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Unreadable(path.name, str(exc) or type(exc).__name__) from None
    return rounds, head.lower() if isinstance(head, str) else None


def _read_checkpoint(path: Path) -> tuple[int, list[np.ndarray]] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names = data["__names__"]
            return int(data["__round__"]), [data[f"a{i}"] for i in range(len(names))]
    except Exception as exc:  # np.load raises many kinds (BadZipFile, ValueError, KeyError, OSError)
        raise _Unreadable(path.name, str(exc) or type(exc).__name__) from None


def _read_metric_rounds(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    try:
        return [int(json.loads(line)["round"]) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Unreadable(path.name, str(exc) or type(exc).__name__) from None


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1..3, 5"``: short enough for one line."""
    parts: list[str] = []
    start = prev = numbers[0]
    for x in [*numbers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)
