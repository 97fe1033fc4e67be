"""A cooperative's own key pair for SuperNode authentication, and the fingerprint that names it.

``python -m fedgov.member_key keys/coop-0`` writes, on the cooperative's own machine:

* ``keys/coop-0`` (mode 0600): the private key, an ECDSA P-384 key in OpenSSH format
  (``flower-supernode --auth-supernode-private-key keys/coop-0``). It never leaves that machine.
* ``keys/coop-0.pub``: the public key. The cooperative hands it to whoever admits members,
  who registers it on the SuperLink (``flwr supernode register keys/coop-0.pub <connection>``).

and prints the key's fingerprint, ``SHA256:...``, computed as ``ssh-keygen -lf`` computes it.
The same fingerprint names the member in the run's audit log (``run_start``'s cooperatives),
so ``python -m fedgov.audit verify RUN_DIR --members`` shows which registered key stood behind
each round's contributions. Existing files are never overwritten (exit status 2).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

__all__ = ["make_member_key", "fingerprint", "fingerprint_of_pem", "main"]


def fingerprint(public_key) -> str:  # noqa: ANN001 - a cryptography EllipticCurvePublicKey
    """``SHA256:<base64>`` of the key's OpenSSH wire form, exactly as ``ssh-keygen -lf`` prints it."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprint_of_pem(pem: bytes) -> str | None:
    """The fingerprint of a PEM public key as the SuperLink stores it (None if there is none)."""
    from cryptography.hazmat.primitives import serialization

    if not pem:
        return None
    try:
        return fingerprint(serialization.load_pem_public_key(pem))
    except (ValueError, TypeError):  # not a key the SuperLink would have admitted
        return None


def make_member_key(path: str | Path) -> tuple[Path, Path, str]:
    """Write a new P-384 key pair at ``path`` and ``path.pub``; return both paths and the fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from .tls import write_new_private, write_new_public

    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise FileExistsError(f"{existing}: exists; fedgov.member_key never overwrites (choose a new name)")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    write_new_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    write_new_public(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path, fingerprint(key.public_key())


def main(argv: list[str] | None = None) -> int:
    from .cli import ArgumentParser, fail

    parser = ArgumentParser(prog="python -m fedgov.member_key", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, metavar="PATH",
                        help="the private key's file; the public key goes to PATH.pub")
    args = parser.parse_args(argv)
    try:
        private_path, public_path, print_ = make_member_key(args.path)
    except OSError as exc:
        fail(parser.prog, str(exc))
    print(f"{print_}  {public_path}")
    print(f"keep {private_path} on this machine (flower-supernode --auth-supernode-private-key {private_path}); "
          f"send {public_path} to whoever registers members (flwr supernode register {public_path} <connection>)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
