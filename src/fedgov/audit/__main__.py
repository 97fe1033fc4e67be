"""``python -m fedgov.audit``: check a run's audit trail, and trace who pushed the model where.

    python -m fedgov.audit verify RUN_DIR [--public-key HEX] [--head HASH] [--allow-incomplete] [--members]
        exit 0 intact (the last line printed is "head <hash>"), 1 tampered or inconsistent,
        2 bad input or nothing to verify
    python -m fedgov.audit trace RUN_DIR [--share FILE ...] [--misbehaviour KIND] [--top N]
        exit 0 ranked, 1 ranked but evidence is missing or does not match the log, 2 cannot trace

This module sits above ``fedgov.audit.verify`` and ``fedgov.governance.trace``; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedgov.audit.log import LOG_NAME, read_chain
from fedgov.audit.verify import is_digest, members_by_round, verify
from fedgov.cli import ArgumentParser, fail

PROG = "python -m fedgov.audit"


def _hex64(what: str) -> Callable[[str], str]:
    """An argparse type for 32 bytes in hex: a bad value is a one-line usage error."""

    def parse(text: str) -> str:
        if not is_digest(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (64 hex digits)")
        return text.strip().lower()

    return parse


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Check a run's signed audit trail, and trace who pushed "
                                                   "the model where.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{verify,trace}")
    p_verify = sub.add_parser("verify", help="check RUN_DIR/audit.jsonl: chain, signatures, rounds, and the "
                                             "run directory's other files")
    p_verify.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory holding audit.jsonl")
    p_verify.add_argument("--public-key", metavar="HEX", type=_hex64("an Ed25519 public key"),
                          help="the aggregator's public key, learnt out of band (else audit_public_key.txt "
                               "is trusted)")
    p_verify.add_argument("--head", metavar="HASH", type=_hex64("a SHA-256 digest"),
                          help="a witness of the last record's hash (summary.json's audit.head, held by the "
                               "oversight board): fail unless the log ends exactly there")
    p_verify.add_argument("--allow-incomplete", action="store_true",
                          help="accept a log without run_end (a run still in progress)")
    p_verify.add_argument("--members", action="store_true",
                          help="once verified, list for each round the cooperatives counted and the key each "
                               "one's SuperNode was admitted with (Deployment Engine with authentication)")
    p_trace = sub.add_parser("trace", help="rank cooperatives by how much their retained updates pushed the "
                                           "model towards the misbehaviour")
    p_trace.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory (with updates/)")
    p_trace.add_argument("--share", dest="shares", action="append", default=[], type=Path, metavar="FILE",
                         help="an oversight board member's escrow share (HE runs; repeat, one per member)")
    p_trace.add_argument("--misbehaviour", default="auto",
                         help="backdoor, label_flip or damage (default auto: from the run's attack.kind)")
    p_trace.add_argument("--top", type=int, default=0, metavar="N", help="show only the first N cooperatives")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = f"{PROG} {args.command}"
    if not args.run_dir.is_dir():
        fail(prog, f"{args.run_dir}: no such run directory")
    if args.command == "trace":
        return _trace(args, prog)
    return _verify(args, prog)


def _verify(args: argparse.Namespace, prog: str) -> int:
    try:
        result = verify(args.run_dir, args.public_key, require_end=not args.allow_incomplete, head=args.head)
    except OSError as exc:
        fail(prog, f"{exc.filename or args.run_dir / LOG_NAME}: cannot read: {exc.strerror or exc}")
    if result.reason == "no audit log":
        fail(prog, result.message)
    if not result.ok:
        print(result.message, file=sys.stderr)
        return 1
    print(result.message)
    if args.members:
        for number, members in members_by_round(read_chain(args.run_dir, args.public_key)):
            named = ", ".join(f"{c} {key or '(no key)'}" for c, key in members.items()) or "none"
            print(f"round {number}: {named}")
    print(f"head {result.head}")  # last, so that a script can hand it to a witness
    return 0


def _trace(args: argparse.Namespace, prog: str) -> int:
    # Imported here: trace needs torch and the data sets, verify does not.
    from fedgov.config import ConfigError
    from fedgov.governance.trace import TraceError, trace
    from fedgov.results import write_json

    try:
        result = trace(args.run_dir, shares=args.shares, misbehaviour=args.misbehaviour)
    except (TraceError, ConfigError, OSError) as exc:
        fail(prog, str(exc))
    write_json(args.run_dir / "trace.json", result.to_json())
    rows = result.ranking[: args.top] if args.top > 0 else result.ranking
    how = "escrow opened by the board's shares; " if result.escrow_opened else ""
    print(f"trace of {args.run_dir} ({how}misbehaviour: {result.misbehaviour}); higher score = pushed more")
    print(f"{'rank':>4}  {'cooperative':>11}  {'score':>10}  {'rounds':>6}  digests")
    for row in rows:
        digests = (f"{row['digests_ok']} match" + (f", {row['digests_bad']} DO NOT" if row["digests_bad"] else "")
                   + (f", {row['missing']} missing" if row["missing"] else ""))
        print(f"{row['rank']:>4}  {row['cooperative']:>11}  {row['score']:>10.4f}  {row['rounds']:>6}  {digests}")
    for m in result.missing:
        print(f"round {m['round']}: {m['file']} {m['problem']}", file=sys.stderr)
    for m in result.mismatches:
        print(f"round {m['round']}: {m['file']} {m['problem']}", file=sys.stderr)
    return 1 if result.mismatches or result.missing else 0


if __name__ == "__main__":
    sys.exit(main())
