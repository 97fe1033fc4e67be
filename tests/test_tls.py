"""fedgov.tls: the CA and SuperLink certificate a TLS deployment needs, checked by real handshakes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedgov.tls import TLS_FILES, make_tls_files


def _handshake(files, ca_file, server_hostname: str) -> None:
    """A TLS handshake between a server holding the SuperLink's files and a client trusting ``ca_file``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_certificate, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=server_hostname) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
    assert not errors, errors  # reached only when the client's side succeeded: the server's must have too


def test_the_superlink_certificate_is_signed_by_the_ca_for_every_name(tmp_path):
    files = make_tls_files(tmp_path, ["localhost", "127.0.0.1", "superlink.coop.example"], days=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TLS_FILES)
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "superlink.coop.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == server.public_key()
    for private in (files.ca_key, files.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_client_trusting_the_ca_connects_by_name_and_address_and_one_trusting_another_ca_does_not(tmp_path):
    files = make_tls_files(tmp_path / "ours", ["localhost", "127.0.0.1"])
    _handshake(files, files.ca_certificate, "localhost")
    _handshake(files, files.ca_certificate, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(files, make_tls_files(tmp_path / "other", ["localhost"]).ca_certificate, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _handshake(files, files.ca_certificate, "elsewhere.example")


def test_existing_files_are_never_overwritten(tmp_path):
    files = make_tls_files(tmp_path, ["localhost"])
    before = {name: (tmp_path / name).read_bytes() for name in TLS_FILES}
    with pytest.raises(FileExistsError, match="never overwrites"):
        make_tls_files(tmp_path, ["localhost"])
    assert {name: (tmp_path / name).read_bytes() for name in TLS_FILES} == before
    assert files.ca_key.is_file()


@pytest.mark.parametrize("args, fragment", [
    ([], "--name: give at least one name"),
    (["--name", "bad name"], "'bad name' is neither a host name nor an IP address"),
    (["--name", "localhost", "--days", "0"], "--days: 0 is not a positive number"),
])
def test_the_command_fails_in_one_line_with_status_2(tmp_path, args, fragment):
    proc = subprocess.run([sys.executable, "-m", "fedgov.tls", str(tmp_path / "tls"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_the_command_writes_the_files_and_says_where_the_ca_key_belongs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedgov.tls", str(tmp_path), "--name", "127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "keep it off the SuperLink's machine" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TLS_FILES)
