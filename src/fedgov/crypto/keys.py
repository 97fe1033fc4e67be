"""Out-of-band key provisioning for HE runs: who gets which file.

``python -m fedgov.crypto.keys DIR --preset standard --key-holder clients``

- ``cooperatives.keys`` (key holder ``clients``): the secret context the cooperatives share.
- ``cooperatives.ctx`` (``custodian``): the public context the cooperatives encrypt with.
- ``custodian.keys`` (``custodian``): the oversight custodian's secret context.
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

import argparse
from pathlib import Path

from ..results import atomic_write_bytes

__all__ = ["provision", "AGGREGATOR_CONTEXT", "COOPERATIVE_KEYS", "COOPERATIVE_CONTEXT", "CUSTODIAN_KEYS",
           "ESCROW_DIR", "BOARD_DIR"]

AGGREGATOR_CONTEXT = "aggregator.ctx"
COOPERATIVE_KEYS = "cooperatives.keys"
COOPERATIVE_CONTEXT = "cooperatives.ctx"
CUSTODIAN_KEYS = "custodian.keys"
ESCROW_DIR = "escrow"
BOARD_DIR = "board"


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    atomic_write_bytes(path, data, mode=0o600 if secret else 0o644)


def provision(key_dir: str | Path, *, preset: str, key_holder: str, board_size: int = 5,
              board_threshold: int = 3) -> Path:
    """Generate a fresh key set in ``key_dir`` unless one is already there (a resumed run).

    The secret context is also escrowed for an oversight board of ``board_size`` members,
    any ``board_threshold`` of whom can open it (``fedgov.governance.escrow``).
    """
    from ..governance.escrow import seal, write_escrow, write_shares
    from .he import generate_keys

    key_dir = Path(key_dir)
    if (key_dir / AGGREGATOR_CONTEXT).is_file():
        return key_dir
    key_dir.mkdir(parents=True, exist_ok=True)
    keys = generate_keys(preset, mode=key_holder)
    public = keys.public_context().to_bytes()
    secret = keys.to_bytes()
    if key_holder == "clients":
        _write(key_dir / COOPERATIVE_KEYS, secret, secret=True)
    else:
        _write(key_dir / CUSTODIAN_KEYS, secret, secret=True)
        _write(key_dir / COOPERATIVE_CONTEXT, public, secret=False)
    metadata, sealed, shares = seal(secret, board_size=board_size, threshold=board_threshold)
    write_shares(key_dir / BOARD_DIR, shares)
    write_escrow(key_dir / ESCROW_DIR, metadata=metadata, ciphertext=sealed)
    _write(key_dir / AGGREGATOR_CONTEXT, public, secret=False)  # last: marks a complete set
    return key_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fedgov.crypto.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("key_dir", type=Path)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--key-holder", choices=("clients", "custodian"), default="clients")
    parser.add_argument("--board-size", type=int, default=5, help="oversight board members (escrow shares)")
    parser.add_argument("--board-threshold", type=int, default=3, help="shares needed to open the escrow")
    args = parser.parse_args()
    print(provision(args.key_dir, preset=args.preset, key_holder=args.key_holder, board_size=args.board_size,
                    board_threshold=args.board_threshold))
