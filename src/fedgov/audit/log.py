"""The audit log's format: write signed, chained records to ``audit.jsonl`` and read the chain back.

Each line is one record in canonical JSON (sorted keys, no spaces)::

    {"body":{...},"kind":"round","prev":"<sha256 of the previous line>","seq":3,"sig":"<hex>","time":"..."}

``prev`` chains each record to the line before it, so deleting, inserting or moving a
record breaks the chain at that place; ``sig`` is the aggregator's Ed25519 signature over
the record without ``sig``, so editing a record (and re-chaining the lines after it)
needs the private key. The anchor is the public key in ``audit_public_key.txt``: whoever
can replace that file can re-sign everything, so a verifier that learnt the key some
other way should pass it.

This module knows lines, hashes and signatures only; what the records must say about a
run (rounds, run_end, the other files of the run directory) is ``fedgov.audit.verify``'s.

The private key lives in memory only and is never written to the run directory. To
resume a run, pass the same key back as ``private_key_bytes=``; where it is kept between
processes is the deployment's business (``fedgov.simulate`` keeps it outside the run dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedgov.results import atomic_write_text

__all__ = [
    "AuditError",
    "AuditLog",
    "Chain",
    "VerifyResult",
    "read_chain",
    "digest_bytes",
    "digest_arrays",
    "canonical_json",
    "LOG_NAME",
    "PUBLIC_KEY_NAME",
    "GENESIS",
]

LOG_NAME = "audit.jsonl"
PUBLIC_KEY_NAME = "audit_public_key.txt"
GENESIS = "0" * 64  # ``prev`` of the first record
_FIELDS = {"seq": int, "kind": str, "time": str, "prev": str, "body": dict, "sig": str}


class AuditError(Exception):
    """The audit log cannot be written or continued (e.g. its existing chain is broken)."""


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed and signed, so a verifier can rebuild it exactly."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):  # numpy scalars in a body, e.g. a weight
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def digest_bytes(b: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``b`` (any contiguous bytes-like object: no copy is made)."""
    return hashlib.sha256(b).hexdigest()


def digest_arrays(arrays: Sequence[np.ndarray]) -> str:
    """Hex SHA-256 of a model's arrays: dtype, shape and C-order bytes of each, in order.

    Equal arrays give equal digests whatever their memory layout; a changed value, dtype
    or shape changes it. The header per array keeps ``[a, b]`` apart from ``[concat(a, b)]``.
    """
    h = hashlib.sha256(f"arrays:{len(arrays)}\n".encode())
    for a in arrays:
        arr = np.asarray(a)
        if arr.dtype.hasobject:  # the bytes of an object array are pointers, not values
            raise TypeError("digest_arrays needs numeric arrays, not dtype=object")
        data = np.ascontiguousarray(arr)  # hashed in place: the same bytes as tobytes(order="C")
        h.update(f"{arr.dtype.str}:{list(arr.shape)}:{data.nbytes}\n".encode())
        h.update(data)
    return h.hexdigest()


def _load_public_key(hex_key: str) -> Ed25519PublicKey:
    raw = bytes.fromhex(hex_key.strip())
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VerifyResult:
    """What a check found. ``line`` is 1-based; ``line``/``seq`` are None when not about a record.

    ``reason`` is one of: ``"edited"``, ``"deleted or inserted"``, ``"reordered"``,
    ``"malformed JSON"``, ``"malformed record"``, ``"truncated"``, ``"incomplete"``,
    ``"public key"``, ``"no audit log"`` (the chain), ``"rounds"`` (what the records say
    about the run's rounds), ``"run directory"`` (another file of the run disagrees, named
    in ``file``), ``"head"`` (the last record is not the witness); None when ``ok``.
    """

    ok: bool
    records: int  # records read before the first problem (all of them when ok)
    line: int | None = None
    seq: int | None = None
    reason: str | None = None
    detail: str = ""
    head: str | None = None  # hash of the last good line: give it to a witness to anchor the end
    file: str | None = None  # the file the problem is in, when it is not the log
    covered: str = ""  # what a good log covers, e.g. "rounds 1..6 covered"

    def __bool__(self) -> bool:
        return self.ok

    @property
    def message(self) -> str:
        """One line for a person: the success summary, or the first problem and where."""
        if self.ok:
            extra = f", {self.covered}" if self.covered else ""
            return f"{LOG_NAME}: {self.records} records, chain and signatures intact{extra}"
        if self.file is not None:
            return f"{self.file}: {self.detail}"
        where = LOG_NAME
        if self.line is not None:
            where += f" line {self.line}"
            if self.seq is not None:
                where += f" (seq {self.seq})"
        return f"{where}: {self.detail}"


@dataclass
class Chain:
    """The records of ``audit.jsonl`` up to the first bad line, and that line's problem if any."""

    records: list[dict[str, Any]] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # hash of each good line, the next one's ``prev``
    problem: VerifyResult | None = None

    @property
    def head(self) -> str:
        return self.hashes[-1] if self.hashes else GENESIS


def read_chain(run_dir: str | Path, public_key_hex: str | None = None) -> Chain:
    """Read ``run_dir/audit.jsonl`` and check its chain and signatures; stop at the first bad line.

    Every line must be canonical JSON with the record fields; ``seq`` must run 0..n-1;
    each ``prev`` must be the hash of the line before; each ``sig`` must verify against
    ``audit_public_key.txt``, and that file must hold ``public_key_hex`` when it is given.
    """
    run_dir = Path(run_dir)
    log = run_dir / LOG_NAME

    def fail(reason: str, detail: str) -> Chain:
        return Chain(problem=VerifyResult(False, 0, reason=reason, detail=detail))

    if not run_dir.is_dir():
        return fail("no audit log", f"no audit log: no run directory {run_dir}")
    if not log.is_file():
        return fail("no audit log", f"no audit log in {run_dir}")
    key_path = run_dir / PUBLIC_KEY_NAME
    try:
        file_key_hex = key_path.read_text().strip()
        key = _load_public_key(file_key_hex)
    except FileNotFoundError:
        return fail("public key", f"{PUBLIC_KEY_NAME} is missing: the signatures cannot be checked")
    except ValueError as exc:
        return fail("public key", f"{PUBLIC_KEY_NAME} does not hold an Ed25519 public key ({exc})")
    if public_key_hex is not None and file_key_hex.lower() != public_key_hex.strip().lower():
        return fail("public key", f"{PUBLIC_KEY_NAME} does not match the expected public key: the key file was replaced")
    data = log.read_bytes()
    if not data:
        return fail("no audit log", f"no audit log: {log} is empty")
    return _check_lines(data, key)


def _check_lines(data: bytes, key: Ed25519PublicKey) -> Chain:
    lines = data.split(b"\n")
    complete = lines[-1] == b""  # every record ends with a newline; anything after the last one is torn
    if complete:
        lines.pop()
    # A loose pass over all lines, only to tell "deleted" from "reordered" below.
    seqs_seen: dict[int, int] = {}
    for number, raw in enumerate(lines, 1):
        try:
            s = json.loads(raw).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(s, int):
            seqs_seen.setdefault(s, number)

    chain = Chain()
    first_line_of: dict[bytes, int] = {}
    for index, raw in enumerate(lines):
        number = index + 1
        prev = chain.head

        def bad(reason: str, detail: str, seq: int | None = None) -> Chain:
            chain.problem = VerifyResult(False, index, number, seq, reason, detail, prev if index else None)
            return chain

        if number == len(lines) and not complete:
            return bad("truncated", "the last line is incomplete (no newline): the log was cut off mid-record")
        try:
            text = raw.decode("ascii")  # canonical JSON escapes everything else
            record = json.loads(text)
        except ValueError as exc:
            return bad("malformed JSON", f"malformed JSON ({exc})")
        if not isinstance(record, dict):
            return bad("malformed JSON", "malformed JSON (not an object)")
        seq = record.get("seq") if isinstance(record.get("seq"), int) else None
        if set(record) != set(_FIELDS) or any(
            not isinstance(record[f], t) or (t is int and isinstance(record[f], bool)) for f, t in _FIELDS.items()
        ):
            return bad("malformed record", f"malformed record: expected the fields {sorted(_FIELDS)}", seq)
        assert seq is not None

        # The record itself first: a failed signature means this very line was changed.
        unsigned = {k: v for k, v in record.items() if k != "sig"}
        try:
            key.verify(bytes.fromhex(record["sig"]), canonical_json(unsigned).encode())
        except (ValueError, InvalidSignature):
            return bad("edited", "signature does not match: the record was edited", seq)
        if canonical_json(record) != text:  # signed content intact but the line's bytes changed
            return bad("edited", "the line is not in canonical form: the record was edited", seq)

        if seq != index:
            if seq > index:
                if index in seqs_seen:
                    return bad("reordered", f"expected seq {index}, which is at line {seqs_seen[index]}: "
                                            "records were moved or reordered", seq)
                return bad("deleted or inserted", f"expected seq {index}: a record was deleted here", seq)
            if raw in first_line_of:
                return bad("deleted or inserted", f"expected seq {index}: a copy of line {first_line_of[raw]} "
                                                  "was inserted", seq)
            return bad("reordered", f"expected seq {index}, but seq {seq} came before: "
                                    "records were moved or reordered", seq)
        if record["prev"] != prev:
            return bad("deleted or inserted", "prev does not match the hash of the line before: "
                                              "a record before it was deleted, inserted or replaced", seq)
        first_line_of.setdefault(raw, number)
        chain.records.append(record)
        chain.hashes.append(digest_bytes(raw))
    return chain


# --------------------------------------------------------------------------- writing


class AuditLog:
    """Appends signed, chained records to ``run_dir/audit.jsonl``.

    A new log gets a fresh Ed25519 key pair; only the public key is written (to
    ``audit_public_key.txt``). An existing log is checked and continued; that needs its
    private key, passed as ``private_key_bytes`` (raw 32 bytes, see ``private_key_bytes``).
    One writer per log: records are appended under a lock, but not across processes.
    """

    def __init__(self, run_dir: str | Path, private_key_bytes: bytes | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_NAME
        self._lock = threading.Lock()
        if private_key_bytes is not None:
            try:
                self._key = Ed25519PrivateKey.from_private_bytes(private_key_bytes)
            except ValueError as exc:
                raise AuditError(f"not an Ed25519 private key: {exc}") from None
        else:
            self._key = Ed25519PrivateKey.generate()
        self.public_key_hex = _public_hex(self._key)

        if self.path.is_file() and self.path.stat().st_size > 0:
            self._continue(private_key_bytes is not None)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Nothing is signed yet, so a stale key file from an aborted start may be replaced.
            atomic_write_text(self.run_dir / PUBLIC_KEY_NAME, self.public_key_hex + "\n")
            self._seq, self._prev = 0, GENESIS

    def _continue(self, key_given: bool) -> None:
        if not key_given:
            raise AuditError(f"{self.path} already exists: pass private_key_bytes of its key to continue it")
        # The chain only: whether the run's other files agree is for verify, not for the writer.
        chain = read_chain(self.run_dir, public_key_hex=self.public_key_hex)
        if chain.problem is not None:
            raise AuditError(f"cannot continue {self.path}: {chain.problem.message}")
        self._seq, self._prev = len(chain.records), chain.head

    @property
    def private_key_bytes(self) -> bytes:
        """The raw 32-byte private key, for the caller to keep (outside the run dir) to resume."""
        return self._key.private_bytes_raw()

    @property
    def seq(self) -> int:
        """The ``seq`` the next record will get (= records written so far)."""
        return self._seq

    @property
    def head(self) -> str:
        """Hash of the last line written (``GENESIS`` before the first)."""
        return self._prev

    def append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Sign and append one record; returns it. Durable when this returns."""
        if not isinstance(kind, str) or not kind:
            raise ValueError("kind must be a non-empty string")
        if not isinstance(body, dict):
            raise TypeError(f"body must be a dict, not {type(body).__name__}")
        with self._lock:
            # Round-trip the body so what is signed is exactly what a reader will parse.
            record: dict[str, Any] = {
                "seq": self._seq,
                "kind": kind,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "prev": self._prev,
                "body": json.loads(canonical_json(body)),
            }
            record["sig"] = self._key.sign(canonical_json(record).encode()).hex()
            line = canonical_json(record)
            self._write_line(line)
            self._seq += 1
            self._prev = digest_bytes(line.encode())
            return record

    def _write_line(self, line: str) -> None:
        # One os.write on an O_APPEND descriptor, then fsync: the record lands whole, or a
        # torn tail that verify reports as "truncated" (and refuses to continue from).
        data = (line + "\n").encode("ascii")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise AuditError(f"short write to {self.path}: {written} of {len(data)} bytes")
            os.fsync(fd)  # no user-space buffer to flush: os.write goes straight to the kernel
        finally:
            os.close(fd)
        if created:  # make the new directory entry durable too
            dir_fd = os.open(self.run_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
