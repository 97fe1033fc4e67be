"""The key holder as a party of its own on the Deployment Engine: HE aggregation with
``secure.key_holder = "custodian"``, each party's key files on its own "machine", and a check
that the SuperLink's and the ServerApp's processes never open a secret-key file.

``python -m fedgov.crypto.keys`` provisions one folder; the test hands each party only its files,
as docs/deployment.md tells a user to: the SuperLink's machine ``aggregator.ctx`` and the sealed
escrow, the custodian ``custodian.keys`` and ``check.key``, each cooperative ``cooperatives.ctx``
and ``check.key``, each SuperNode pointing at its folder with ``--node-config key-dir=...``. All
three SuperNodes (the custodian too) join over TLS with registered keys.

The SuperLink is started with a ``sitecustomize`` that installs an audit hook (``sys.addaudithook``)
in it and in every Python process it starts, the ServerApp included, logging every file each one
opens. No opened file may be a secret-key file or hold any of its secret bytes; the log must show
the ServerApp opening its public context, or the hook was not there to see.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from fedgov.audit import read_chain
from fedgov.crypto.keys import (AGGREGATOR_CONTEXT, BOARD_DIR, CHECK_KEY, COOPERATIVE_CONTEXT, CUSTODIAN_KEYS,
                                ESCROW_DIR, MANIFEST, provision)
from fedgov.member_key import make_member_key
from fedgov.results import read_json, read_jsonl
from fedgov.tls import make_tls_files
from tests.crypto import test_key_holders as key_holder_checks

from fedgov.bench.flower_processes import (FlowerProcesses, flower_environment, flwr_run, register_supernode,
                                           start_member, start_secure_superlink, wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-custodian"
NUM_COOPERATIVES = 2
ROUNDS = 2
RUN_DEADLINE_S = 300.0
OPEN_LOG_VARIABLE = "FEDGOV_TEST_OPEN_LOG"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups"),
]

# Imported by every Python process started with the hook folder first on PYTHONPATH.
SITECUSTOMIZE = f'''
import os, sys
_path = os.environ.get("{OPEN_LOG_VARIABLE}")
if _path:
    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    _who = " ".join(sys.orig_argv[:3]).replace("\\t", " ")

    def _log_open(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            os.write(_fd, f"{{os.getpid()}}\\t{{_who}}\\t{{path}}\\n".encode())

    sys.addaudithook(_log_open)
'''


def _party_folders(provisioned: Path, root: Path) -> dict[str, Path]:
    """Each party's own copy of only the files docs/deployment.md gives it."""
    files = {"aggregator": [AGGREGATOR_CONTEXT, MANIFEST, ESCROW_DIR],
             "custodian": [CUSTODIAN_KEYS, CHECK_KEY, MANIFEST],
             **{f"coop-{c}": [COOPERATIVE_CONTEXT, CHECK_KEY, MANIFEST] for c in range(NUM_COOPERATIVES)}}
    folders = {}
    for party, names in files.items():
        folder = folders[party] = root / party
        folder.mkdir(parents=True)
        for name in names:
            source = provisioned / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, folder / name)
    return folders


def test_the_custodian_is_its_own_authenticated_party_and_the_aggregator_opens_no_secret(tmp_path: Path) -> None:
    env = flower_environment(tmp_path)
    out = tmp_path / "runs"
    procs = FlowerProcesses(tmp_path / "logs", env)
    tls = make_tls_files(tmp_path / "tls", ["127.0.0.1", "localhost"])
    provisioned = provision(tmp_path / "provisioned", preset="standard", key_holder="custodian")
    folders = _party_folders(provisioned, tmp_path / "machines")
    windows = [*key_holder_checks._secret_windows(provisioned), (provisioned / CHECK_KEY).read_bytes()]
    secret_files = {p.resolve() for p in tmp_path.rglob("*") if p.is_file() and (
        p.name in (CUSTODIAN_KEYS, CHECK_KEY) or BOARD_DIR in p.parts)}
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    open_log = tmp_path / "opened.tsv"
    parties = ["custodian", *[f"coop-{c}" for c in range(NUM_COOPERATIVES)]]
    keys = {party: make_member_key(tmp_path / "member-keys" / party) for party in parties}
    with procs.federation(ROOT, CONNECTION):
        superlink, port = start_secure_superlink(procs, tls, extra_env={
            "PYTHONPATH": str(hook), OPEN_LOG_VARIABLE: str(open_log)})
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, port, root_certificates=tls.ca_certificate)
        for party in parties:
            register_supernode(procs, ROOT, CONNECTION, keys[party][1])
        start_member(procs, "supernode-custodian", port, tls, keys["custodian"][0],
                     f'role="custodian" key-dir="{folders["custodian"]}"')
        for c in range(NUM_COOPERATIVES):
            start_member(procs, f"supernode-{c}", port, tls, keys[f"coop-{c}"][0],
                         f'partition-id={c} num-partitions={NUM_COOPERATIVES} key-dir="{folders[f"coop-{c}"]}"')
        overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}", 'data.partition="iid"',
                     'secure.aggregation="he"', 'secure.key_holder="custodian"',
                     f"secure.key_dir={json.dumps(str(folders['aggregator']))}", f"runtime.out={json.dumps(str(out))}"]
        started = time.monotonic()
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=overrides)
        run_dir = wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S)
        print(f"run {run_id} in {time.monotonic() - started:.0f} s")

        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        for row in rows:
            assert row["failures"] == [] and row["contributors"] == list(range(NUM_COOPERATIVES)), row
            assert row["phase_seconds"]["decrypt"] > 0, row  # the custodian decrypted every round's sum
        assert summary["final_accuracy"] > 0.5, summary["final_accuracy"]
        start = read_chain(run_dir).records[0]["body"]
        assert start["custodian"]["member_key"] == keys["custodian"][2]
        assert {c: e["member_key"] for c, e in start["cooperatives"].items()} == {
            str(c): keys[f"coop-{c}"][2] for c in range(NUM_COOPERATIVES)}

        opened = [line.split("\t") for line in open_log.read_text().splitlines()]
        serverapp = {pid for pid, who, path in opened if "flwr-serverapp" in who}
        assert serverapp, "the audit hook never ran in a ServerApp process"
        assert any(pid in serverapp and path == str(folders["aggregator"] / AGGREGATOR_CONTEXT)
                   for pid, _, path in opened), "the ServerApp's own public context is not in the log"
        paths = {Path(path).resolve() for _, _, path in opened}
        assert not paths & secret_files, sorted(paths & secret_files)
        for path in paths:
            if path.is_file() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                assert not any(w in data for w in windows), f"{path} holds secret-key bytes"
