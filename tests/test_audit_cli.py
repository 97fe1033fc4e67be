"""``python -m fedgov.audit``: fedgov's parser, help for every option, one-line errors, imports one way."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fedgov.audit import AuditLog
from fedgov.audit.__main__ import _parser
from fedgov.cli import ArgumentParser

PROG = "python -m fedgov.audit"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgov.audit", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_parser_is_fedgovs_and_every_option_has_help() -> None:
    parser = _parser()
    commands = subparsers(parser)
    assert set(commands) == {"verify", "trace"}
    for name, sub in [("", parser), *commands.items()]:
        assert isinstance(sub, ArgumentParser), name
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest} has no help text"
    assert {a.dest for a in commands["verify"]._actions} >= {"run_dir", "public_key", "head", "allow_incomplete"}
    assert {a.dest for a in commands["trace"]._actions} >= {"run_dir", "shares", "misbehaviour", "top"}


def assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(PROG) and ": error: " in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("command", ["verify", "trace"])
def test_a_missing_run_dir_is_one_line_naming_it(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-run"
    assert_usage_error(run_cli(command, missing), str(missing), "no such run directory")


@pytest.mark.parametrize("option", ["--head", "--public-key"])
@pytest.mark.parametrize("value", ["xyz", "ab" * 31, "ab" * 33])
def test_a_bad_hash_is_one_line_naming_the_option(tmp_path: Path, option: str, value: str) -> None:
    log = AuditLog(tmp_path)
    log.append("run_start", {})
    log.append("run_end", {"rounds": 0})
    assert run_cli("verify", tmp_path).returncode == 0
    assert_usage_error(run_cli("verify", tmp_path, option, value), option, "64 hex digits")


def test_a_run_dir_without_a_log_is_one_line_naming_the_file(tmp_path: Path) -> None:
    assert_usage_error(run_cli("verify", tmp_path), "audit.jsonl")


def test_an_unknown_command_or_option_is_one_line(tmp_path: Path) -> None:
    assert_usage_error(run_cli("frobnicate", tmp_path))
    assert_usage_error(run_cli("verify", tmp_path, "--no-such-option"), "--no-such-option")


def test_imports_run_one_way() -> None:
    """The log and verify never import trace (or anything of governance); trace imports them."""
    code = ("import sys, fedgov.audit, fedgov.audit.verify; "
            "assert not [m for m in sys.modules if m.startswith('fedgov.governance')], sorted(sys.modules); "
            "import fedgov.governance.trace; "
            "assert 'fedgov.audit.__main__' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
