"""Out-of-band key provisioning for HE runs: who gets which file.

``python -m fedgov.crypto.keys DIR --preset standard --key-holder clients``

- ``cooperatives.keys`` (key holder ``clients``): the secret context the cooperatives share.
- ``cooperatives.ctx`` (``custodian``): the public context the cooperatives encrypt with.
- ``custodian.keys`` (``custodian``): the oversight custodian's secret context.
- ``check.key``: the secret the cooperatives fill their ciphertexts' check slots with and the key
  holder verifies sums with (``fedgov.crypto.he_check``); never the aggregator's.
- ``keys.json``: the preset, key holder and board the set was made for (nothing secret).
- ``aggregator.ctx``: the public context the aggregator adds ciphertexts with. It is the only
  key file the aggregator reads; it holds no secret key.
- ``escrow/`` (``escrow.json``, ``sealed_key.bin``): the secret context that can decrypt
  individual updates, sealed with AES-GCM; it travels with the run's retained ciphertexts.
- ``board/board_member_<i>.share``: one Shamir share of the sealing key per member of the
  oversight board; ``governance.board_threshold`` of them open the escrow
  (``python -m fedgov.audit trace RUN_DIR --share ...``).

In a real deployment each file goes only to its party; in a simulation they share a
folder on one machine, which is a simulation's trust assumption, not fedgov's claim.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..results import atomic_write_bytes, atomic_write_text
from .he_check import CHECK_KEY_BYTES, CheckKey

__all__ = ["provision", "check_key_dir", "read_manifest", "load_check_key", "KeyDirError", "CHECK_KEY", "AGGREGATOR_CONTEXT",
           "COOPERATIVE_KEYS", "COOPERATIVE_CONTEXT", "CUSTODIAN_KEYS", "ESCROW_DIR", "BOARD_DIR", "MANIFEST"]

AGGREGATOR_CONTEXT = "aggregator.ctx"
COOPERATIVE_KEYS = "cooperatives.keys"
COOPERATIVE_CONTEXT = "cooperatives.ctx"
CUSTODIAN_KEYS = "custodian.keys"
ESCROW_DIR = "escrow"
BOARD_DIR = "board"
# The check key (fedgov.crypto.he_check): cooperatives and the key holder hold it, the aggregator never.
CHECK_KEY = "check.key"
# What the folder's keys are for (preset, key holder, board); written last, so it also marks
# a complete set. Nothing secret in it.
MANIFEST = "keys.json"
_KEY_FILES = (AGGREGATOR_CONTEXT, COOPERATIVE_KEYS, COOPERATIVE_CONTEXT, CUSTODIAN_KEYS, CHECK_KEY)


class KeyDirError(ValueError):
    """A key folder that does not hold the keys the run asks for (one line naming the folder)."""


def read_manifest(key_dir: str | Path) -> dict | None:
    """The manifest of a provisioned key folder; None when the folder holds no keys at all."""
    key_dir = Path(key_dir)
    path = key_dir / MANIFEST
    if not path.is_file():
        if any((key_dir / name).exists() for name in _KEY_FILES):
            raise KeyDirError(f"{key_dir}: holds HE key files but no {MANIFEST} (an incomplete set, or one made "
                              f"by an older fedgov); provision a new folder or pass --force to replace them")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeyDirError(f"{path}: not a readable key manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise KeyDirError(f"{path}: not a key manifest")
    return manifest


def load_check_key(key_dir: str | Path) -> CheckKey:
    """The check key of a provisioned folder (cooperatives and key holders only)."""
    return CheckKey((Path(key_dir) / CHECK_KEY).read_bytes())


def check_key_dir(key_dir: str | Path, *, preset: str, key_holder: str, board_size: int,
                  board_threshold: int) -> bool:
    """True when ``key_dir`` holds a complete key set made for exactly these settings, False when
    it holds none; raises KeyDirError when it holds keys made for anything else."""
    manifest = read_manifest(key_dir)
    if manifest is None:
        return False
    if not (Path(key_dir) / CHECK_KEY).is_file():
        raise KeyDirError(f"{key_dir}: no {CHECK_KEY} (made by an older fedgov, without check slots); provision a "
                          f"new folder or pass --force to replace the keys")
    wanted = {"preset": preset, "key_holder": key_holder, "board_size": board_size,
              "board_threshold": board_threshold}
    config_key = {"preset": "secure.preset", "key_holder": "secure.key_holder",
                  "board_size": "governance.board_size", "board_threshold": "governance.board_threshold"}
    for name, value in wanted.items():
        if manifest.get(name) != value:
            raise KeyDirError(f"{key_dir}: its keys were made for {config_key[name]} = {manifest.get(name)!r}, "
                              f"this run asks for {value!r}; use another folder (or --force to replace them)")
    return True


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    atomic_write_bytes(path, data, mode=0o600 if secret else 0o644)


def provision(key_dir: str | Path, *, preset: str, key_holder: str, board_size: int = 5,
              board_threshold: int = 3, force: bool = False) -> Path:
    """Generate a fresh key set in ``key_dir`` unless a matching one is already there (a resumed run).

    A folder holding keys made for another preset, key holder or board is refused
    (KeyDirError) rather than silently reused, unless ``force`` replaces them. The secret
    context is also escrowed for an oversight board of ``board_size`` members, any
    ``board_threshold`` of whom can open it (``fedgov.governance.escrow``).
    """
    from ..governance.escrow import seal, write_escrow, write_shares
    from . import PRESETS, generate_keys

    if preset not in PRESETS:
        raise KeyDirError(f"--preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if not 2 <= board_threshold <= board_size:
        raise KeyDirError(f"--board-threshold: {board_threshold} shares cannot open a board of {board_size} "
                          f"(need 2 <= threshold <= size)")
    key_dir = Path(key_dir)
    if not force and check_key_dir(key_dir, preset=preset, key_holder=key_holder, board_size=board_size,
                                   board_threshold=board_threshold):
        return key_dir
    if force:  # nothing of the old set may survive next to the new one
        (key_dir / MANIFEST).unlink(missing_ok=True)
        for name in _KEY_FILES:
            (key_dir / name).unlink(missing_ok=True)
        for folder in (BOARD_DIR, ESCROW_DIR):
            shutil.rmtree(key_dir / folder, ignore_errors=True)
    key_dir.mkdir(parents=True, exist_ok=True)
    keys = generate_keys(preset, mode=key_holder)
    public = keys.public_context().to_bytes()
    secret = keys.to_bytes()
    if key_holder == "clients":
        _write(key_dir / COOPERATIVE_KEYS, secret, secret=True)
    else:
        _write(key_dir / CUSTODIAN_KEYS, secret, secret=True)
        _write(key_dir / COOPERATIVE_CONTEXT, public, secret=False)
    _write(key_dir / CHECK_KEY, os.urandom(CHECK_KEY_BYTES), secret=True)
    metadata, sealed, shares = seal(secret, board_size=board_size, threshold=board_threshold)
    write_shares(key_dir / BOARD_DIR, shares)
    write_escrow(key_dir / ESCROW_DIR, metadata=metadata, ciphertext=sealed)
    _write(key_dir / AGGREGATOR_CONTEXT, public, secret=False)
    manifest = {"preset": preset, "key_holder": key_holder, "board_size": board_size,
                "board_threshold": board_threshold}
    atomic_write_text(key_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: marks a complete set
    return key_dir


def _parser():  # noqa: ANN202
    from ..cli import ArgumentParser
    from . import PRESETS

    p = ArgumentParser(prog="python -m fedgov.crypto.keys", description=__doc__.split("\n\n")[0])
    p.add_argument("key_dir", type=Path, metavar="DIR", help="folder to write the key set into")
    p.add_argument("--preset", choices=tuple(PRESETS), default="standard", help="HE parameter preset")
    p.add_argument("--key-holder", choices=("clients", "custodian"), default="clients",
                   help="who decrypts aggregates: the cooperatives or a separate custodian")
    p.add_argument("--board-size", type=int, default=5, help="oversight board members (escrow shares)")
    p.add_argument("--board-threshold", type=int, default=3, help="shares needed to open the escrow")
    p.add_argument("--force", action="store_true",
                   help="replace keys already in DIR that were made for other settings")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import fail

    args = _parser().parse_args(argv)
    try:
        print(provision(args.key_dir, preset=args.preset, key_holder=args.key_holder, board_size=args.board_size,
                        board_threshold=args.board_threshold, force=args.force))
    except KeyDirError as exc:
        fail("python -m fedgov.crypto.keys", str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
