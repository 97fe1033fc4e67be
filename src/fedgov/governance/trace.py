"""Traceability: which cooperatives pushed the global model towards the observed misbehaviour?

``python -m fedgov.audit trace RUN_DIR [--share FILE ...]`` replays each retained update
(``fedgov.governance.archive``) on the global model it was computed from and asks how much
that update alone moves the model towards the misbehaviour:

- ``backdoor``: lower loss of the target label on triggered test inputs (the run's trigger);
- ``label_flip``: lower loss of the flipped labels on the test inputs;
- ``damage``: higher loss on the clean test set (any sabotage).

A cooperative's score is the mean of ``loss_before - loss_after`` (for ``damage``,
``after - before``) over the rounds it took part in; the ranking is by score. Every retained
file is first checked against the digest the signed audit log holds for it (a round's
``global.npz`` against the previous round's ``global_model``; round 1's against its record's
``initial_model``), so evidence swapped after the fact is reported rather than trusted; and
every update the log names but ``updates/`` lacks is reported as missing. After a resume
that redid a round, that round's later record is the one that counts, as in ``verify``.

Under HE the retained updates are ciphertexts. Opening them needs the escrowed secret key,
and that needs ``governance.board_threshold`` of the oversight board's shares: with fewer,
trace refuses. Privacy by default, attribution by due process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..audit.log import LOG_NAME, digest_arrays, digest_bytes
from ..audit.verify import verify
from .archive import ARCHIVE_DIR, UpdateArchive

__all__ = ["TraceError", "TraceResult", "trace", "MISBEHAVIOURS"]

MISBEHAVIOURS = ("auto", "backdoor", "label_flip", "damage")


class TraceError(Exception):
    """Trace cannot run (no audit log, nothing retained, too few board shares, ...): one line."""


@dataclass
class TraceResult:
    misbehaviour: str
    ranking: list[dict[str, Any]]  # best-first: cooperative, score, rounds, digests_ok, digests_bad, missing
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # retained files not matching the log
    missing: list[dict[str, Any]] = field(default_factory=list)  # files the log names that are not retained
    escrow_opened: bool = False

    @property
    def evidence_complete(self) -> bool:
        """Every file the log names is retained and matches it: the ranking rests on all the evidence."""
        return not self.mismatches and not self.missing

    def to_json(self) -> dict[str, Any]:
        return {"misbehaviour": self.misbehaviour, "ranking": self.ranking, "mismatches": self.mismatches,
                "missing": self.missing, "evidence_complete": self.evidence_complete,
                "escrow_opened": self.escrow_opened}


def _round_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The signed round records by round (after a resume, the later record of a round wins)."""
    records: dict[int, dict[str, Any]] = {}
    for line in (run_dir / LOG_NAME).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "round":
            records[int(record["body"]["round"])] = record["body"]
    return records


def _missing(archive: UpdateArchive, records: dict[int, dict[str, Any]], *, he: bool) -> list[dict[str, Any]]:
    """What the log's round records name (each update, and the global model it was trained from) but
    ``updates/`` lacks: deleting evidence cannot fake it, but must not pass unnoticed either."""
    suffix = ".he" if he else ".npz"
    missing: list[dict[str, Any]] = []
    for server_round, body in sorted(records.items()):
        updates = body.get("updates") or {}
        if not updates:
            continue
        where = f"{ARCHIVE_DIR}/{archive.round_dir(server_round).name}/"
        if not archive.global_file(server_round).is_file():
            missing.append({"round": server_round, "file": "global.npz",
                            "problem": f"is missing from {where}: the round's updates cannot be replayed"})
        retained = archive.cooperative_files(server_round)
        for coop in sorted(int(c) for c in updates):
            if coop not in retained:
                missing.append({"round": server_round, "cooperative": coop, "file": f"coop_{coop:03d}{suffix}",
                                "problem": f"is named in the audit log but missing from {where}"})
    return missing


def _checked(path: Path, expected: str | None, *, unlogged: str, differs: str) -> tuple[Any, str | None]:
    """A retained file's contents (arrays, or a ciphertext's bytes) and what is wrong with it, if anything."""
    try:
        if path.suffix == ".he":
            content: Any = path.read_bytes()
            actual = digest_bytes(content)
        else:
            content = UpdateArchive.load_arrays(path)
            actual = digest_arrays(content)
    except Exception as exc:  # np.load raises many kinds (BadZipFile, ValueError, OSError, ...)
        return None, f"cannot be read ({exc or type(exc).__name__})"
    if expected is None:
        return content, unlogged
    return content, (differs if expected != actual else None)


def _loss_fn(misbehaviour: str, x: np.ndarray, y: np.ndarray, *, trigger: Any, target_label: int,
             num_classes: int) -> Any:
    """The loss whose decrease means "more misbehaviour" (for damage: the negated clean loss)."""
    if misbehaviour == "backdoor":
        eligible = y != target_label
        xs = torch.from_numpy(np.ascontiguousarray(trigger.stamp(x[eligible]), dtype=np.float32))
        ys = torch.full((len(xs),), target_label, dtype=torch.long)
        sign = 1.0
    elif misbehaviour == "label_flip":
        flipped = num_classes - 1 - y
        eligible = flipped != y
        xs = torch.from_numpy(np.ascontiguousarray(x[eligible], dtype=np.float32))
        ys = torch.from_numpy(flipped[eligible].astype(np.int64))
        sign = 1.0
    else:
        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ys = torch.from_numpy(y.astype(np.int64))
        sign = -1.0
    criterion = nn.CrossEntropyLoss()

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return sign * float(criterion(model(xs), ys))

    return loss


def _load_state(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    names = list(model.state_dict())
    model.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays, strict=True)})


def _he_keys(run_dir: Path, shares: Sequence[Path]) -> Any:
    """Open the escrow with the board's shares; refuse clearly with too few."""
    from ..crypto import SecretKeys
    from ..crypto.keys import ESCROW_DIR
    from .escrow import EscrowError, open_escrow, read_share

    escrow_dir = run_dir / ESCROW_DIR
    if not (escrow_dir / "escrow.json").is_file():
        raise TraceError(f"{escrow_dir}: no escrowed key: this HE run's updates cannot be attributed")
    threshold = json.loads((escrow_dir / "escrow.json").read_text()).get("threshold")
    try:
        board_shares = [read_share(Path(p)) for p in shares]
        if not board_shares:
            raise EscrowError(f"the updates of this HE run are encrypted; opening them needs {threshold} "
                              f"oversight board members' shares (--share FILE, one per member); got none")
        return SecretKeys.from_bytes(open_escrow(escrow_dir, board_shares))
    except EscrowError as exc:
        raise TraceError(f"refused: {exc}") from None


def trace(run_dir: str | Path, *, shares: Sequence[Path] = (), misbehaviour: str = "auto") -> TraceResult:
    from ..config import load_config
    from ..data import build_federation
    from ..models import build_model

    run_dir = Path(run_dir)
    checked = verify(run_dir, require_end=False)
    if not checked.ok:
        raise TraceError(f"the audit log cannot be trusted: {checked.message}")
    if misbehaviour not in MISBEHAVIOURS:
        raise TraceError(f"--misbehaviour: {misbehaviour!r} is not one of {', '.join(MISBEHAVIOURS)}")
    cfg = load_config(run_dir / "config.toml")
    if misbehaviour == "auto":
        misbehaviour = {"backdoor": "backdoor", "model_replacement": "backdoor",
                        "label_flip": "label_flip"}.get(cfg.attack.kind, "damage")
    archive = UpdateArchive(run_dir)
    rounds = archive.rounds()
    records = _round_records(run_dir)
    if not rounds:
        named = sum(len(b.get("updates") or {}) for b in records.values())
        if cfg.governance.retain_updates and named:
            raise TraceError(f"{archive.root}: none of the {named} updates the audit log names is retained, "
                             f"though the run retained them (governance.retain_updates = true): they were deleted")
        raise TraceError(f"{archive.root}: no retained updates (run with governance.retain_updates = true)")
    he = cfg.secure.aggregation == "he"
    if cfg.secure.aggregation == "secagg+":
        raise TraceError("SecAgg+ leaves no individual updates to attribute: only their sum exists")
    keys = _he_keys(run_dir, shares) if he else None

    from ..attacks import trigger_for

    federation = build_federation(cfg.data, seed=cfg.seed)
    model = build_model(cfg.model.name, input_shape=federation.input_shape, num_classes=federation.num_classes,
                        hidden=cfg.model.hidden)
    model.eval()
    test = federation.global_test
    loss = _loss_fn(misbehaviour, test.x, test.y, trigger=trigger_for(federation, size=cfg.attack.trigger_size),
                    target_label=cfg.attack.target_label, num_classes=federation.num_classes)
    missing = _missing(archive, records, he=he)

    scores: dict[int, list[float]] = {}
    digests_ok: dict[int, int] = {}
    mismatches: list[dict[str, Any]] = []
    for server_round in rounds:
        body = records.get(server_round)
        # No record: the round in flight when the run stopped. No global model: reported missing.
        if body is None or not body.get("updates") or not archive.global_file(server_round).is_file():
            continue
        # The model a round started from: the previous round's result, or for round 1 the initial model.
        if server_round == 1:
            expected, whose = body.get("initial_model"), "round 1's initial_model"
        else:
            previous = records.get(server_round - 1) or {}
            expected, whose = previous.get("global_model"), "the previous round's global_model"
        global_arrays, problem = _checked(archive.global_file(server_round), expected,
                                          unlogged=f"cannot be checked: the audit log holds no {whose}",
                                          differs=f"does not match {whose} in the audit log")
        if problem is not None:
            mismatches.append({"round": server_round, "file": "global.npz", "problem": problem})
            continue
        _load_state(model, global_arrays)
        before = loss(model)
        for coop, path in archive.cooperative_files(server_round).items():
            content, problem = _checked(path, body["updates"].get(str(coop)), unlogged="not in the audit log",
                                        differs="does not match the digest in the audit log")
            if problem is not None:
                mismatches.append({"round": server_round, "cooperative": coop, "file": path.name, "problem": problem})
                continue
            digests_ok[coop] = digests_ok.get(coop, 0) + 1
            arrays = content
            if path.suffix == ".he":
                from ..crypto import decrypt_aggregate

                # The ciphertext holds weight * delta and declares its weight: decryption divides it out.
                delta = decrypt_aggregate(content, keys=keys)
                arrays = [(g + d).astype(g.dtype) for g, d in zip(global_arrays, delta)]
            _load_state(model, arrays)
            scores.setdefault(coop, []).append(before - loss(model))

    ranking = [{"cooperative": c, "score": float(np.mean(s)), "rounds": len(s), "digests_ok": digests_ok.get(c, 0),
                "digests_bad": sum(1 for m in mismatches if m.get("cooperative") == c),
                "missing": sum(1 for m in missing if m.get("cooperative") == c)}
               for c, s in scores.items()]
    ranking.sort(key=lambda r: (-r["score"], r["cooperative"]))
    for rank, row in enumerate(ranking, 1):
        row["rank"] = rank
    return TraceResult(misbehaviour=misbehaviour, ranking=ranking, mismatches=mismatches, missing=missing,
                       escrow_opened=he)
