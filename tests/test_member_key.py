"""fedgov.member_key: a cooperative's key pair for SuperNode authentication, and the fingerprint that
names the member in the audit log (checked against ssh-keygen and Flower's own key loaders)."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedgov.audit import AuditLog, read_chain
from fedgov.audit.verify import members_by_round
from fedgov.member_key import fingerprint_of_pem, make_member_key


def test_the_key_pair_is_what_flower_loads_and_the_private_half_is_the_owners_alone(tmp_path):
    private, public, fingerprint = make_member_key(tmp_path / "keys" / "coop-0")
    assert public == tmp_path / "keys" / "coop-0.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # What flower-supernode --auth-supernode-private-key and `flwr supernode register` load.
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    registered = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert registered.public_numbers() == key.public_key().public_numbers()
    # The SuperLink stores the key as PEM; its fingerprint is the one printed for the .pub file.
    pem = registered.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fingerprint_of_pem(pem) == fingerprint
    assert fingerprint_of_pem(b"") is None and fingerprint_of_pem(b"not a key") is None


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path):
    _, public, fingerprint = make_member_key(tmp_path / "coop-1")
    shown = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True).stdout
    assert shown.split()[1] == fingerprint


def test_the_command_never_overwrites_a_key(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fedgov.member_key", *args], capture_output=True, text=True)

    first = run(str(tmp_path / "coop-2"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("SHA256:")
    before = (tmp_path / "coop-2").read_bytes()
    again = run(str(tmp_path / "coop-2"))
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "coop-2: exists" in again.stderr
    assert (tmp_path / "coop-2").read_bytes() == before


def test_members_by_round_follows_the_keys_of_the_latest_start_or_resume(tmp_path):
    log = AuditLog(tmp_path)
    log.append("run_start", {"cooperatives": {"0": {"name": "a", "member_key": "SHA256:A"},
                                              "1": {"name": "b", "member_key": "SHA256:B"},
                                              "2": {"name": "c"}}})
    log.append("round", {"round": 1, "participants": [1, 0, 2]})
    # After a restart cooperative 1 joined with a newly registered key.
    log.append("run_resume", {"from_round": 1, "members": {"0": {"member_key": "SHA256:A"},
                                                           "1": {"member_key": "SHA256:B2"}}})
    log.append("round", {"round": 2, "participants": [0, 1]})
    rounds = members_by_round(read_chain(tmp_path))
    assert rounds == [(1, {0: "SHA256:A", 1: "SHA256:B", 2: None}), (2, {0: "SHA256:A", 1: "SHA256:B2"})]
    json.dumps(rounds)  # plain data, as the command prints it
