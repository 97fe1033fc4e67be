"""What a Flower deployment needs for TLS: a certificate authority and the SuperLink's certificate.

``python -m fedgov.tls DIR --name superlink.example.org --name 10.0.0.5`` writes, with the
``cryptography`` package (a dependency of Flower's):

* ``ca.crt``: the CA certificate. Every SuperNode and every ``flwr`` connection trusts it
  (``flower-supernode --root-certificates ca.crt``; ``root-certificates`` in the connection).
* ``ca.key``: the CA's private key (mode 0600). Whoever holds it can mint a certificate any
  SuperNode will trust: keep it off the SuperLink's machine.
* ``server.pem`` and ``server.key`` (mode 0600): the SuperLink's certificate, valid for every
  ``--name`` (DNS names and IP addresses alike) and signed by the CA
  (``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``).

Existing files are never overwritten: a second call into the same folder fails with exit
status 2 and leaves them as they were.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "TLS_FILES", "make_tls_files", "main", "write_new_private", "write_new_public"]

TLS_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


@dataclass(frozen=True)
class TlsFiles:
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path


def _subject_names(names: list[str]) -> list:
    from cryptography import x509

    if not names:
        raise ValueError("--name: give at least one name or address the SuperLink serves")
    entries: list = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() or c in "/:@" for c in name):
                raise ValueError(f"--name: {name!r} is neither a host name nor an IP address") from None
            entries.append(x509.DNSName(name))
    return entries


def write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, failing if it exists (a private key: this
    module's, and a member's from ``fedgov.member_key``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_new_public(path: Path, data: bytes) -> None:
    """Create ``path``, failing if it exists (a certificate, a member's public key)."""
    with open(path, "xb") as handle:
        handle.write(data)


def make_tls_files(out: str | Path, names: list[str], *, days: int = 365) -> TlsFiles:
    """Write a new CA and a SuperLink certificate for ``names`` into ``out``; see the module docstring."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError(f"--days: {days} is not a positive number of days")
    subject_names = _subject_names(names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in TLS_FILES if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out / existing[0]}: exists; fedgov.tls never overwrites (use a new folder)")

    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgov federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(subject_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    write_new_private(files.ca_key, key_bytes(ca_key))
    write_new_private(files.server_key, key_bytes(server_key))
    write_new_public(files.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_new_public(files.server_certificate, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def main(argv: list[str] | None = None) -> int:
    from .cli import ArgumentParser, fail

    parser = ArgumentParser(prog="python -m fedgov.tls", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="DIR", help="folder for ca.crt, ca.key, server.pem, server.key")
    parser.add_argument("--name", action="append", default=[], metavar="NAME",
                        help="a host name or IP address the SuperLink serves (repeat for each)")
    parser.add_argument("--days", type=int, default=365, help="validity of both certificates (default 365)")
    args = parser.parse_args(argv)
    try:
        files = make_tls_files(args.out, args.name, days=args.days)
    except (ValueError, OSError) as exc:
        fail(parser.prog, str(exc))
    print(f"CA: {files.ca_certificate} (its key {files.ca_key}: keep it off the SuperLink's machine)")
    print(f"SuperLink: {files.server_certificate}, {files.server_key} for {', '.join(args.name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
