"""Accountability escrow: privacy by default, attribution only by due process.

The HE secret key that could decrypt individual cooperatives' updates must exist (someone
has to be able to investigate a poisoned update), but no single party should hold it. So
:func:`seal` encrypts it with AES-256-GCM under a fresh random data key and splits that
data key among an oversight board with Shamir secret sharing: any ``threshold`` of the
``board_size`` members can open the escrow together, fewer learn nothing about the key.
The aggregator keeps the sealed blob (``escrow.json`` + ``sealed_key.bin``) but cannot
open it alone; each board member keeps one ``board_member_<i>.share`` file.

``escrow.json`` also records the SHA-256 of the escrowed secret, so a verifier can check
what was escrowed (e.g. that it is the key of the run's public HE context) without
opening it; its other fields are bound to the ciphertext as GCM associated data, so
editing them (say, lowering the threshold) makes the escrow refuse to open.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Crypto.Cipher import AES
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Random import get_random_bytes

from fedgov.results import atomic_write_bytes, write_json

__all__ = [
    "ESCROW_NAME",
    "MAX_BOARD_SIZE",
    "SCHEME",
    "SEALED_NAME",
    "BoardShare",
    "EscrowError",
    "open_escrow",
    "read_share",
    "seal",
    "share_filename",
    "write_escrow",
    "write_shares",
]

SCHEME = "shamir+aes-gcm"
ESCROW_NAME = "escrow.json"
SEALED_NAME = "sealed_key.bin"
MAX_BOARD_SIZE = 255  # member numbers fit one byte (and the ssss tool's convention)

# pycryptodome's Shamir shares 16-byte secrets (elements of GF(2^128)). We want AES-256 for
# the sealed key (it may guard many rounds of updates for years, and 256-bit keys keep a
# margin against Grover-style attacks), so the 32-byte data key is split into two 16-byte
# halves, each shared with the same (threshold, board_size); member i's share is the
# concatenation of its two half-shares. Fewer than threshold shares reveal nothing about
# either half, so the construction is as strong as one 32-byte sharing.
_KEY_BYTES = 32
_HALF = 16
_SHARE_BYTES = 2 * _HALF
_SHARE_PREFIX = "fedgov-escrow-share"
_SHARE_VERSION = "v1"
_SHARE_RE = re.compile(
    rf"^{_SHARE_PREFIX}:{_SHARE_VERSION}:member=(\d{{1,3}}):data=([0-9a-f]+):check=([0-9a-f]{{8}})$"
)


class EscrowError(Exception):
    """The escrow cannot be sealed, stored or opened; the message says why, in one line."""


def _check_digest(member: int, data: bytes) -> str:
    # Catches a share mistyped or truncated in transit (not forgery: the GCM tag does that).
    return hashlib.sha256(bytes([member]) + data).hexdigest()[:8]


@dataclass(frozen=True)
class BoardShare:
    """One board member's share of the data key; alone it says nothing about the key."""

    member: int  # 1..board_size
    data: bytes  # two 16-byte Shamir shares, one per half of the AES-256 data key

    def to_text(self) -> str:
        """One line of text, to store in a file or paste into a message."""
        return (
            f"{_SHARE_PREFIX}:{_SHARE_VERSION}:member={self.member}:data={self.data.hex()}"
            f":check={_check_digest(self.member, self.data)}\n"
        )

    @staticmethod
    def from_text(text: str, *, source: str = "share") -> BoardShare:
        """Parse :meth:`to_text`'s line; ``EscrowError`` naming ``source`` when it is not one."""
        match = _SHARE_RE.match(text.strip())
        if match is None:
            raise EscrowError(f"{source} is not a fedgov board share (expected one line '{_SHARE_PREFIX}:...')")
        member, data_hex, check = int(match[1]), match[2], match[3]
        if not 1 <= member <= MAX_BOARD_SIZE:
            raise EscrowError(f"{source}: member number {member} is out of range 1..{MAX_BOARD_SIZE}")
        if len(data_hex) != 2 * _SHARE_BYTES:
            raise EscrowError(f"{source}: share data has {len(data_hex) // 2} bytes; expected {_SHARE_BYTES}")
        data = bytes.fromhex(data_hex)
        if check != _check_digest(member, data):
            raise EscrowError(f"{source} is garbled: its check digits do not match (was it mistyped or cut?)")
        return BoardShare(member=member, data=data)


def _validate_board(board_size: Any, threshold: Any) -> None:
    for name, value in (("governance.board_size", board_size), ("governance.board_threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EscrowError(f"{name} must be an integer; got {value!r}")
    if not 2 <= board_size <= MAX_BOARD_SIZE:
        raise EscrowError(f"governance.board_size must be between 2 and {MAX_BOARD_SIZE}; got {board_size}")
    if not 2 <= threshold <= board_size:
        raise EscrowError(
            f"governance.board_threshold must be between 2 and governance.board_size ({board_size}); "
            f"got {threshold}"
        )


def _associated_data(metadata: dict[str, Any]) -> bytes:
    """The metadata fields bound to the ciphertext (all but the GCM outputs themselves)."""
    bound = {k: metadata[k] for k in ("scheme", "board_size", "threshold", "secret_sha256")}
    return json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def seal(secret: bytes, *, board_size: int, threshold: int) -> tuple[dict, bytes, list[BoardShare]]:
    """Encrypt ``secret`` under a fresh data key and split the key among ``board_size`` members.

    Returns ``(metadata, ciphertext, shares)``: metadata and ciphertext are for
    :func:`write_escrow` (the aggregator may keep them), one share goes to each member.
    The data key itself is discarded. ``threshold`` members are needed to open it;
    ``2 <= threshold <= board_size <= 255`` (a threshold of 1 would let any member alone
    de-anonymise updates, which is what the escrow exists to prevent).
    """
    _validate_board(board_size, threshold)
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise EscrowError(f"the secret to escrow must be bytes; got {type(secret).__name__}")
    secret = bytes(secret)
    if not secret:
        raise EscrowError("the secret to escrow is empty")
    key = get_random_bytes(_KEY_BYTES)
    metadata: dict[str, Any] = {
        "scheme": SCHEME,
        "board_size": board_size,
        "threshold": threshold,
        "secret_sha256": hashlib.sha256(secret).hexdigest(),
    }
    cipher = AES.new(key, AES.MODE_GCM)
    cipher.update(_associated_data(metadata))
    ciphertext, tag = cipher.encrypt_and_digest(secret)
    metadata["nonce"] = cipher.nonce.hex()
    metadata["tag"] = tag.hex()
    low = Shamir.split(threshold, board_size, key[:_HALF])
    high = Shamir.split(threshold, board_size, key[_HALF:])
    shares = []
    for (i, lo), (j, hi) in zip(low, high, strict=True):
        if i != j:  # pragma: no cover - pycryptodome numbers both lists 1..n in order
            raise EscrowError("secret sharing returned shares out of order")
        shares.append(BoardShare(member=i, data=lo + hi))
    return metadata, ciphertext, shares


def write_escrow(directory: Path, *, metadata: dict, ciphertext: bytes) -> None:
    """Store the sealed secret as ``escrow.json`` + ``sealed_key.bin`` (atomic writes).

    Both are safe to keep beside the run: without ``threshold`` shares they reveal only
    the secret's size and digest.
    """
    directory = Path(directory)
    atomic_write_bytes(directory / SEALED_NAME, bytes(ciphertext))
    write_json(directory / ESCROW_NAME, metadata)  # last: its presence means the pair is complete


def share_filename(member: int) -> str:
    """``board_member_<i>.share``."""
    return f"board_member_{member}.share"


def write_shares(directory: Path, shares: list[BoardShare]) -> list[Path]:
    """Write one ``board_member_<i>.share`` per member (mode 0600), returning the paths.

    Whoever can read all of these files can open the escrow: hand each to its member and
    delete it here (a directory holding them all is only a staging area).
    """
    directory = Path(directory)
    paths = []
    for share in shares:
        path = directory / share_filename(share.member)
        atomic_write_bytes(path, share.to_text().encode(), mode=0o600)
        paths.append(path)
    return paths


def read_share(path: Path) -> BoardShare:
    """Read a share file; ``EscrowError`` naming the file when it is missing or garbled."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EscrowError(f"board share file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EscrowError(f"cannot read board share file {path}: {exc}") from None
    return BoardShare.from_text(text, source=f"board share file {path}")


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EscrowError(f"escrow file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EscrowError(f"escrow file {path} is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise EscrowError(f"escrow file {path} is corrupt: expected a JSON object")
    if meta.get("scheme") != SCHEME:
        raise EscrowError(f"escrow file {path} has scheme {meta.get('scheme')!r}; expected {SCHEME!r}")
    try:
        _validate_board(meta.get("board_size"), meta.get("threshold"))
    except EscrowError as exc:
        raise EscrowError(f"escrow file {path} is corrupt: {exc}") from None
    for field, size in (("nonce", None), ("tag", 16), ("secret_sha256", 32)):
        value = meta.get(field)
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            raw = b""
        if not raw or (size is not None and len(raw) != size):
            want = f"{size} hex-encoded bytes" if size else "hex"
            raise EscrowError(f"escrow file {path} is corrupt: {field} is missing or not {want}")
    return meta


def open_escrow(directory: Path, shares: Sequence[BoardShare]) -> bytes:
    """Recover the escrowed secret with at least ``threshold`` distinct members' shares.

    Repeated shares of one member count once (two *different* shares claiming the same
    member are refused). Exactly ``threshold`` shares are combined -- those of the
    lowest-numbered members given -- so extra shares are not checked. Raises
    ``EscrowError`` if ``escrow.json`` or ``sealed_key.bin`` is missing or corrupt, if too
    few members' shares were given (before any combining), if the shares do not open the
    escrow (wrong, forged or from another escrow, or the sealed files were altered: the GCM
    tag does not verify), or if the secret does not match the recorded ``secret_sha256``.
    """
    directory = Path(directory)
    meta = _read_metadata(directory / ESCROW_NAME)
    sealed_path = directory / SEALED_NAME
    try:
        ciphertext = sealed_path.read_bytes()
    except FileNotFoundError:
        raise EscrowError(f"sealed key file {sealed_path} not found") from None
    except OSError as exc:
        raise EscrowError(f"cannot read sealed key file {sealed_path}: {exc}") from None

    board_size, threshold = meta["board_size"], meta["threshold"]
    by_member: dict[int, bytes] = {}
    for share in shares:
        if not isinstance(share, BoardShare):
            raise EscrowError(f"expected board shares; got {type(share).__name__}")
        if not 1 <= share.member <= board_size:
            raise EscrowError(f"share of member {share.member} does not belong to a board of {board_size}")
        if len(share.data) != _SHARE_BYTES:
            raise EscrowError(f"share of member {share.member} has {len(share.data)} bytes; expected {_SHARE_BYTES}")
        seen = by_member.setdefault(share.member, share.data)
        if seen != share.data:
            raise EscrowError(f"two different shares claim to be member {share.member}'s")
    if len(by_member) < threshold:
        members = ", ".join(str(m) for m in sorted(by_member))
        got = f"{len(by_member)} ({'member' if len(by_member) == 1 else 'members'} {members})" if by_member else "0"
        raise EscrowError(f"the escrow needs {threshold} of {board_size} board members' shares; got {got}")

    chosen = sorted(by_member.items())[:threshold]
    key = Shamir.combine([(m, d[:_HALF]) for m, d in chosen]) + Shamir.combine(
        [(m, d[_HALF:]) for m, d in chosen]
    )
    cipher = AES.new(key, AES.MODE_GCM, nonce=bytes.fromhex(meta["nonce"]))
    cipher.update(_associated_data(meta))
    try:
        secret = cipher.decrypt_and_verify(ciphertext, bytes.fromhex(meta["tag"]))
    except ValueError:
        used = ", ".join(str(m) for m, _ in chosen)
        raise EscrowError(
            f"the shares of members {used} do not open the escrow in {directory} (wrong or forged "
            f"shares, shares of another escrow, or {ESCROW_NAME}/{SEALED_NAME} were altered)"
        ) from None
    if hashlib.sha256(secret).hexdigest() != meta["secret_sha256"]:  # pragma: no cover - AAD binds it
        raise EscrowError(f"the opened secret does not match secret_sha256 in {directory / ESCROW_NAME}")
    return secret
