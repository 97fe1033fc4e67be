"""Out-of-band key provisioning for HE runs: who gets which file.

``python -m fedgov.crypto.keys DIR --preset standard --key-holder clients``

- ``cooperatives.keys`` (key holder ``clients``): the secret context the cooperatives share.
- ``cooperatives.ctx`` (``custodian``): the public context the cooperatives encrypt with.
- ``custodian.keys`` (``custodian``): the oversight custodian's secret context.
- ``aggregator.ctx``: the public context the aggregator adds ciphertexts with. It is the only
  file the aggregator reads; it holds no secret key.

In a real deployment each file goes only to its party; in a simulation they share a
folder on one machine, which is a simulation's trust assumption, not fedgov's claim.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["provision", "AGGREGATOR_CONTEXT", "COOPERATIVE_KEYS", "COOPERATIVE_CONTEXT", "CUSTODIAN_KEYS"]

AGGREGATOR_CONTEXT = "aggregator.ctx"
COOPERATIVE_KEYS = "cooperatives.keys"
COOPERATIVE_CONTEXT = "cooperatives.ctx"
CUSTODIAN_KEYS = "custodian.keys"


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def provision(key_dir: str | Path, *, preset: str, key_holder: str) -> Path:
    """Generate a fresh key set in ``key_dir`` unless one is already there (a resumed run)."""
    from .he import generate_keys

    key_dir = Path(key_dir)
    if (key_dir / AGGREGATOR_CONTEXT).is_file():
        return key_dir
    key_dir.mkdir(parents=True, exist_ok=True)
    keys = generate_keys(preset, mode=key_holder)
    public = keys.public_context().to_bytes()
    if key_holder == "clients":
        _write(key_dir / COOPERATIVE_KEYS, keys.to_bytes(), secret=True)
    else:
        _write(key_dir / CUSTODIAN_KEYS, keys.to_bytes(), secret=True)
        _write(key_dir / COOPERATIVE_CONTEXT, public, secret=False)
    _write(key_dir / AGGREGATOR_CONTEXT, public, secret=False)  # last: marks a complete set
    return key_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fedgov.crypto.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("key_dir", type=Path)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--key-holder", choices=("clients", "custodian"), default="clients")
    args = parser.parse_args()
    print(provision(args.key_dir, preset=args.preset, key_holder=args.key_holder))
