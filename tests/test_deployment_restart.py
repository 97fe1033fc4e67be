"""A SuperLink that dies mid-run loses no finished round, and the process that aggregates never
opens a secret: one federation of three parties (two cooperatives and the HE key custodian) on
the Deployment Engine, as docs/deployment.md sets it up.

**The parties.** ``python -m fedgov.crypto.keys`` provisions one folder for HE with
``secure.key_holder = "custodian"``; the test hands each party only the files the docs give it:
the SuperLink's machine ``aggregator.ctx`` and the sealed escrow, the custodian
``custodian.keys`` and ``check.key``, each cooperative ``cooperatives.ctx`` and ``check.key``.
Each SuperNode (the custodian too) points at its folder with ``--node-config key-dir=...`` and
joins over TLS with its own registered key. The cooperatives train with DP-SGD.

**The restart.** Once round 1 is checkpointed, the SuperLink and everything it started (the
ServerApp among them) are SIGKILLed, in round 2. The SuperNodes keep running and retry. The
SuperLink restarts on the same port and ``--database``, where the registered keys survive; the members
reconnect without being registered again; ``flwr run . <connection> --run-config
RUN_DIR/resume.toml`` (the run's config with ``runtime.resume`` set) carries the metrics, the
signed audit log and every cooperative's DP ledger on, as ``fedgov.simulate --resume`` does,
and ``python -m fedgov.audit verify`` passes on the result.

**No secret on the aggregator's side.** Both SuperLinks start with a ``sitecustomize`` that
installs an audit hook (``sys.addaudithook``) in them and in every Python process they start,
the ServerApps included, logging every file each one opens. No opened file may be a secret-key
file or hold any of its secret bytes; the log must show a ServerApp opening its public context,
or the hook was not there to see.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedgov.audit import read_chain
from fedgov.crypto.keys import (AGGREGATOR_CONTEXT, BOARD_DIR, CHECK_KEY, COOPERATIVE_CONTEXT, CUSTODIAN_KEYS,
                                ESCROW_DIR, MANIFEST, provision)
from fedgov.member_key import make_member_key
from fedgov.results import read_json, read_jsonl
from fedgov.tls import make_tls_files
from tests.crypto import test_key_holders as key_holder_checks
from tests.privacy import rdp_reference

from fedgov.bench.flower_processes import (FlowerProcesses, flower_environment, flwr_run, register_supernode,
                                           start_member, start_secure_superlink, wait_for_summary, write_connection)

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedgov-restart"
NUM_COOPERATIVES = 2
ROUNDS = 2
TARGET_EPSILON = 3.0
RUN_DEADLINE_S = 300.0
OPEN_LOG_VARIABLE = "FEDGOV_TEST_OPEN_LOG"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(720),
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


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/config.toml"))


def _checkpoint_round(run_dir: Path) -> int:
    """The round of the run's checkpoint (0 before the first; written atomically, so never half)."""
    path = run_dir / "checkpoint.npz"
    if not path.is_file():
        return 0
    with np.load(path) as data:
        return int(data["__round__"])


def _spends(row: dict) -> dict[str, tuple]:
    return {c: (m["dp_noise_multiplier"], m["dp_sample_rate"], m["dp_steps"]) for c, m in row["client_train"].items()}


def test_a_killed_superlink_resumes_the_run_and_the_aggregators_processes_never_open_a_secret(tmp_path: Path) -> None:
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
    hooked = {"PYTHONPATH": str(hook), OPEN_LOG_VARIABLE: str(open_log)}
    cooperatives = [f"coop-{c}" for c in range(NUM_COOPERATIVES)]
    keys = {party: make_member_key(tmp_path / "member-keys" / party) for party in ["custodian", *cooperatives]}
    database = tmp_path / "superlink" / "state.db"
    database.parent.mkdir()
    with procs.federation(ROOT, CONNECTION):
        superlink, port = start_secure_superlink(procs, tls, database=database, extra_env=hooked)
        write_connection(Path(env["FLWR_HOME"]), CONNECTION, port, root_certificates=tls.ca_certificate)
        node_ids = {party: register_supernode(procs, ROOT, CONNECTION, keys[party][1]) for party in keys}
        start_member(procs, "supernode-custodian", port, tls, keys["custodian"][0],
                     f'role="custodian" key-dir="{folders["custodian"]}"')
        for c, party in enumerate(cooperatives):
            start_member(procs, f"supernode-{c}", port, tls, keys[party][0],
                         f'partition-id={c} num-partitions={NUM_COOPERATIVES} key-dir="{folders[party]}"')
        overrides = [f"data.num_cooperatives={NUM_COOPERATIVES}", f"train.rounds={ROUNDS}", 'data.partition="iid"',
                     "train.local_epochs=1", "train.evaluate_every=100", 'privacy.dp="sample"', f"privacy.target_epsilon={TARGET_EPSILON}",
                     'secure.aggregation="he"', 'secure.key_holder="custodian"',
                     f"secure.key_dir={json.dumps(str(folders['aggregator']))}", f"runtime.out={json.dumps(str(out))}"]
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=overrides)

        deadline = time.monotonic() + RUN_DEADLINE_S
        while not (dirs := _run_dirs(out)) or _checkpoint_round(dirs[0]) < 1:
            assert time.monotonic() < deadline, "round 1 was never checkpointed"
            assert not procs.exited(), procs.log_tails()
            time.sleep(0.2)
        (run_dir,) = dirs
        procs.kill(superlink)  # the SuperLink's machine dies in round 2, and the ServerApp with it
        stopped_at = _checkpoint_round(run_dir)
        before = read_jsonl(run_dir / "metrics.jsonl")[:stopped_at]
        assert stopped_at == 1 and not (run_dir / "summary.json").exists()

        # Restarted on the same port and database: the SuperNodes reconnect with their keys, unregistered anew.
        superlink, _ = start_secure_superlink(procs, tls, database=database, name="superlink-restarted", port=port,
                                              extra_env=hooked)
        run_id = flwr_run(procs, ROOT, CONNECTION, run_config=[str(run_dir / "resume.toml")])
        assert wait_for_summary(procs, out, run_id, superlink.log, deadline_s=RUN_DEADLINE_S) == run_dir
        assert _run_dirs(out) == [run_dir]  # continued, not started afresh

        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        assert summary["resumed_from_round"] == stopped_at
        assert summary["privacy"]["resumed_ledger"]
        for row in rows:
            assert row["failures"] == [] and row["contributors"] == list(range(NUM_COOPERATIVES)), row
            assert row["phase_seconds"]["decrypt"] > 0, row  # the custodian decrypted every round's sum
        # The rounds before the kill are on record as they were spent; each epsilon composes all rounds.
        assert [_spends(r) for r in rows[:stopped_at]] == [_spends(r) for r in before]
        for coop in summary["cooperatives"]:
            spends = [_spends(r)[str(coop["id"])] for r in rows]
            assert coop["epsilon"] == pytest.approx(rdp_reference.epsilon(spends, delta=coop["delta"]), rel=0.01)
            assert coop["epsilon"] <= TARGET_EPSILON * (1 + 1e-9)

        # One signed log across both SuperLinks, naming every party by its key, at the start and at the resume.
        records = read_chain(run_dir).records
        start = records[0]["body"]
        assert start["custodian"]["member_key"] == keys["custodian"][2]
        assert {c: e["member_key"] for c, e in start["cooperatives"].items()} == {
            str(c): keys[party][2] for c, party in enumerate(cooperatives)}
        resumes = [r["body"] for r in records if r["kind"] == "run_resume"]
        assert [r["from_round"] for r in resumes] == [stopped_at]
        assert {c: m["member_key"] for c, m in resumes[0]["members"].items()} == {
            "custodian": keys["custodian"][2], **{str(c): keys[party][2] for c, party in enumerate(cooperatives)}}
        verified = subprocess.run([sys.executable, "-m", "fedgov.audit", "verify", str(run_dir)],
                                  capture_output=True, text=True, env=procs.env, timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert f"rounds 1..{ROUNDS} covered" in verified.stdout, verified.stdout
        # The restarted SuperLink knew the members from its database: the same nodes, registered once.
        assert {m: entry["node_id"] for m, entry in resumes[0]["members"].items()} == {
            "custodian": node_ids["custodian"], **{str(c): node_ids[party] for c, party in enumerate(cooperatives)}}
        assert "RegisterNode" not in superlink.log.read_text()

        # Neither SuperLink, superexec nor ServerApp opened a secret-key file or read secret bytes.
        opened = [line.split("\t") for line in open_log.read_text().splitlines()]
        serverapps = {pid for pid, who, path in opened if "flwr-serverapp" in who}
        assert len(serverapps) >= 2, "the audit hook did not run in both ServerApp processes"
        assert any(pid in serverapps and path == str(folders["aggregator"] / AGGREGATOR_CONTEXT)
                   for pid, _, path in opened), "the ServerApp's own public context is not in the log"
        paths = {Path(path).resolve() for _, _, path in opened}
        assert not paths & secret_files, sorted(paths & secret_files)
        for path in paths:
            if path.is_file() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                assert not any(w in data for w in windows), f"{path} holds secret-key bytes"
