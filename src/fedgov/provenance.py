"""Which code made a result: ``code_version()``, and when two results count as made by the same code.

Every run's ``summary.json`` records ``code_version()`` under ``"code"``;
``fedgov.experiment`` and ``fedgov.bench`` compare it with the code running now
before they reuse a finished run or suite.

``code_version()`` is, from a git checkout::

    {"git_commit": "<40 hex>", "git_dirty": false, "fedgov_version": "0.1.0", "source_hash": "<64 hex>"}

and otherwise (an installed package, a copied tree)::

    {"git_commit": None, "fedgov_version": "0.1.0", "source_hash": "<64 hex>"}

``source_hash`` is the SHA-256 of fedgov's own ``.py`` files (every ``*.py`` under
the ``fedgov`` package folder, in sorted order of their paths relative to it, each
as ``path NUL content NUL``). ``git_dirty`` says whether the package folder has
changes git does not have in that commit (modified, added or untracked files
under ``src/fedgov/``); changes elsewhere in the checkout (results, docs, tests)
do not make it dirty.

**Same code** (:func:`same_code`): two versions are the same code when their
``source_hash`` is equal, i.e. fedgov's sources were byte for byte the same. The
commit is a label, not the test: a run made from a dirty tree whose sources are
those of a later commit, or made before a commit that changed only results, docs
or tests, is the same code. Only when a version has no ``source_hash`` (it was
recorded by something else) does the test fall back to the same ``git_commit``
with neither tree dirty. A missing version (a summary written before fedgov
recorded one) is never the same code. Library versions (torch, flwr, ...) are
recorded separately (``summary.json`` ``versions``) and are not part of it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["code_version", "describe_code", "fedgov_version", "package_dir", "same_code", "source_hash"]

_GIT_TIMEOUT_S = 10


def package_dir() -> Path:
    """The folder of the ``fedgov`` package that is running."""
    return Path(__file__).resolve().parent


def source_hash(package: Path | None = None) -> str:
    """SHA-256 (hex) of every ``*.py`` under ``package``, sorted by relative path."""
    package = (package or package_dir()).resolve()
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        if not path.is_file():
            continue
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def fedgov_version() -> str | None:
    try:
        return metadata.version("fedgov")
    except metadata.PackageNotFoundError:
        return None


def _git(package: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh (write) the index of the checkout it reads.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, env=env,
                          timeout=_GIT_TIMEOUT_S, check=True).stdout.strip()


def _git_state(package: Path) -> tuple[str, bool] | None:
    """(commit, dirty) when ``package`` is tracked in a git checkout, else None.

    A package installed into a virtual environment that happens to sit inside some
    checkout is not that checkout's code: its files must be tracked there.
    """
    try:
        if not _git(package, "ls-files", "--", "__init__.py"):
            return None
        commit = _git(package, "rev-parse", "--verify", "HEAD")
        dirty = bool(_git(package, "status", "--porcelain", "--untracked-files=normal", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        return None
    return commit, dirty


def code_version(package: Path | None = None) -> dict[str, Any]:
    """The code that makes a result now (see the module docstring for the fields)."""
    package = (package or package_dir()).resolve()
    state = _git_state(package)
    version: dict[str, Any]
    if state is not None:
        version = {"git_commit": state[0], "git_dirty": state[1]}
    else:
        version = {"git_commit": None}
    version["fedgov_version"] = fedgov_version()
    version["source_hash"] = source_hash(package)
    return version


def same_code(made: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> bool:
    """Whether a result recorded as made by ``made`` was made by the code ``current``."""
    if not isinstance(made, Mapping) or not isinstance(current, Mapping):
        return False
    ha, hb = made.get("source_hash"), current.get("source_hash")
    if ha and hb:
        return ha == hb
    ca, cb = made.get("git_commit"), current.get("git_commit")
    return bool(ca) and ca == cb and made.get("git_dirty") is False and current.get("git_dirty") is False


def describe_code(version: Mapping[str, Any] | None) -> str:
    """One short phrase for a table cell: ``git 0123456789ab+dirty, source 89abcdef0123``."""
    if not isinstance(version, Mapping) or not version:
        return "unknown (not recorded)"
    parts = []
    if version.get("git_commit"):
        parts.append(f"git {str(version['git_commit'])[:12]}{'+dirty' if version.get('git_dirty') else ''}")
    elif version.get("fedgov_version"):
        parts.append(f"fedgov {version['fedgov_version']}")
    if version.get("source_hash"):
        parts.append(f"source {str(version['source_hash'])[:12]}")
    return ", ".join(parts) or "unknown (not recorded)"
