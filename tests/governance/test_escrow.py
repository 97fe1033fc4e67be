from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from pathlib import Path

import pytest

from fedgov.governance import (
    BoardShare,
    EscrowError,
    open_escrow,
    read_share,
    seal,
    write_escrow,
    write_shares,
)

SECRET = os.urandom(3000) + b"tenseal-secret-context"


@pytest.fixture
def escrow(tmp_path: Path):
    """A 3-of-5 escrow written to tmp_path; returns (directory, shares)."""
    metadata, ciphertext, shares = seal(SECRET, board_size=5, threshold=3)
    write_escrow(tmp_path, metadata=metadata, ciphertext=ciphertext)
    return tmp_path, shares


def test_seal_metadata_and_shares():
    metadata, ciphertext, shares = seal(SECRET, board_size=5, threshold=3)
    assert metadata["scheme"] == "shamir+aes-gcm"
    assert (metadata["board_size"], metadata["threshold"]) == (5, 3)
    assert metadata["secret_sha256"] == hashlib.sha256(SECRET).hexdigest()
    assert len(bytes.fromhex(metadata["tag"])) == 16 and bytes.fromhex(metadata["nonce"])
    assert SECRET not in ciphertext and len(ciphertext) == len(SECRET)
    assert [s.member for s in shares] == [1, 2, 3, 4, 5]
    assert len({s.data for s in shares}) == 5
    json.dumps(metadata)  # serialisable as is


def test_round_trip_threshold_and_all(escrow):
    directory, shares = escrow
    assert open_escrow(directory, shares) == SECRET
    assert open_escrow(directory, shares[:3]) == SECRET


def test_any_threshold_subset_opens(escrow):
    directory, shares = escrow
    for subset in itertools.combinations(shares, 3):
        assert open_escrow(directory, list(subset)[::-1]) == SECRET


def test_large_secret_round_trip(tmp_path):
    big = os.urandom(3 * 1024 * 1024)
    metadata, ciphertext, shares = seal(big, board_size=2, threshold=2)
    write_escrow(tmp_path, metadata=metadata, ciphertext=ciphertext)
    assert open_escrow(tmp_path, shares) == big


def test_below_threshold_refused_naming_counts(escrow):
    directory, shares = escrow
    with pytest.raises(EscrowError, match=r"^the escrow needs 3 of 5 board members' shares; got 2 \(members 1, 4\)$"):
        open_escrow(directory, [shares[3], shares[0]])
    with pytest.raises(EscrowError, match=r"got 0$"):
        open_escrow(directory, [])


def test_duplicates_count_once(escrow):
    directory, shares = escrow
    with pytest.raises(EscrowError, match=r"got 2 \(members 2, 3\)"):
        open_escrow(directory, [shares[1], shares[1], shares[2], shares[1]])
    assert open_escrow(directory, [shares[0], shares[0], shares[2], shares[4]]) == SECRET


def test_conflicting_shares_for_one_member_refused(escrow):
    directory, shares = escrow
    forged = BoardShare(member=2, data=bytes(32))
    with pytest.raises(EscrowError, match="member 2"):
        open_escrow(directory, [shares[0], shares[1], forged, shares[2]])


def _flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize("index", [0, 20])  # one byte in each half of the data key
def test_tampered_share_refused(escrow, index):
    directory, shares = escrow
    bad = BoardShare(member=shares[1].member, data=_flip(shares[1].data, index))
    with pytest.raises(EscrowError, match="do not open the escrow"):
        open_escrow(directory, [shares[0], bad, shares[2]])


def test_shares_of_another_escrow_refused(escrow, tmp_path):
    directory, _ = escrow
    _, _, other = seal(SECRET, board_size=5, threshold=3)
    with pytest.raises(EscrowError, match="do not open the escrow"):
        open_escrow(directory, other)


def test_tampered_ciphertext_refused(escrow):
    directory, shares = escrow
    path = directory / "sealed_key.bin"
    path.write_bytes(_flip(path.read_bytes(), 100))
    with pytest.raises(EscrowError, match="do not open the escrow"):
        open_escrow(directory, shares)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tag", None), ("nonce", None), ("secret_sha256", None), ("board_size", 6)],
)
def test_tampered_metadata_refused(escrow, field, value):
    directory, shares = escrow
    path = directory / "escrow.json"
    meta = json.loads(path.read_text())
    meta[field] = value if value is not None else _flip(bytes.fromhex(meta[field])).hex()
    path.write_text(json.dumps(meta))
    with pytest.raises(EscrowError, match="do not open the escrow"):
        open_escrow(directory, shares)


def test_lowered_threshold_does_not_help(escrow):
    directory, shares = escrow
    path = directory / "escrow.json"
    meta = json.loads(path.read_text())
    meta["threshold"] = 2
    path.write_text(json.dumps(meta))
    with pytest.raises(EscrowError, match="do not open the escrow"):
        open_escrow(directory, shares[:2])


def test_missing_or_corrupt_escrow_files_named(escrow):
    directory, shares = escrow
    (directory / "escrow.json").write_text("{not json")
    with pytest.raises(EscrowError, match=r"escrow\.json is corrupt"):
        open_escrow(directory, shares)
    (directory / "escrow.json").write_text(json.dumps({"scheme": "shamir+aes-gcm", "board_size": 5}))
    with pytest.raises(EscrowError, match=r"escrow\.json is corrupt"):
        open_escrow(directory, shares)
    (directory / "escrow.json").unlink()
    with pytest.raises(EscrowError, match=r"escrow\.json not found"):
        open_escrow(directory, shares)


def test_missing_sealed_key_named(escrow):
    directory, shares = escrow
    (directory / "sealed_key.bin").unlink()
    with pytest.raises(EscrowError, match=r"sealed_key\.bin not found"):
        open_escrow(directory, shares)


@pytest.mark.parametrize(
    ("board_size", "threshold", "name"),
    [
        (5, 1, "governance.board_threshold"),
        (5, 6, "governance.board_threshold"),
        (1, 1, "governance.board_size"),
        (256, 3, "governance.board_size"),
        (5.0, 3, "governance.board_size"),
    ],
)
def test_seal_validates_board(board_size, threshold, name):
    with pytest.raises(EscrowError, match=name):
        seal(SECRET, board_size=board_size, threshold=threshold)


def test_seal_rejects_non_bytes_and_empty():
    with pytest.raises(EscrowError, match="bytes"):
        seal("text", board_size=3, threshold=2)  # type: ignore[arg-type]
    with pytest.raises(EscrowError, match="empty"):
        seal(b"", board_size=3, threshold=2)


def test_share_text_round_trip():
    _, _, shares = seal(SECRET, board_size=3, threshold=2)
    for share in shares:
        text = share.to_text()
        assert "\n" not in text.strip()
        assert BoardShare.from_text(text) == share
        assert BoardShare.from_text("  " + text.strip() + "\r\n") == share


def test_share_text_garbage_rejected():
    _, _, shares = seal(SECRET, board_size=3, threshold=2)
    good = shares[0].to_text().strip()
    with pytest.raises(EscrowError, match="^alice's share is not a fedgov board share"):
        BoardShare.from_text("hello", source="alice's share")
    data_hex = good.split("data=")[1].split(":")[0]
    typo = good.replace(data_hex, ("f" if data_hex[0] != "f" else "e") + data_hex[1:])
    with pytest.raises(EscrowError, match="garbled"):
        BoardShare.from_text(typo)
    short = good.replace(data_hex, data_hex[:-2])
    with pytest.raises(EscrowError, match="expected 32"):
        BoardShare.from_text(short)


def test_write_and_read_share_files(tmp_path):
    _, _, shares = seal(SECRET, board_size=4, threshold=2)
    paths = write_shares(tmp_path / "board", shares)
    assert [p.name for p in paths] == [f"board_member_{i}.share" for i in range(1, 5)]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths)
    assert [read_share(p) for p in paths] == shares
    assert not list((tmp_path / "board").glob(".*.tmp"))


def test_read_share_names_the_file(tmp_path):
    missing = tmp_path / "board_member_9.share"
    with pytest.raises(EscrowError, match=r"board_member_9\.share not found"):
        read_share(missing)
    garbled = tmp_path / "board_member_2.share"
    garbled.write_text("fedgov-escrow-share:v1:member=2:data=zz\n")
    with pytest.raises(EscrowError, match=r"board_member_2\.share is not a fedgov board share"):
        read_share(garbled)
    binary = tmp_path / "board_member_3.share"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EscrowError, match=r"board_member_3\.share"):
        read_share(binary)


def test_share_files_open_escrow(escrow):
    directory, shares = escrow
    paths = write_shares(directory / "board", shares)
    assert open_escrow(directory, [read_share(p) for p in paths[2:]]) == SECRET


def test_share_out_of_board_refused(escrow):
    directory, shares = escrow
    with pytest.raises(EscrowError, match="member 7"):
        open_escrow(directory, [*shares[:3], BoardShare(member=7, data=bytes(32))])
