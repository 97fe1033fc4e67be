"""fedgov.provenance: which code made a result, and when two results count as the same code."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedgov import provenance
from fedgov.provenance import code_version, describe_code, same_code, source_hash

PACKAGE = Path(provenance.__file__).resolve().parent
HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org",
                           "-c", "commit.gpgsign=false", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def copy_sources(dest: Path) -> Path:
    """A copy of fedgov's .py files (a frozen tree: the checkout may be edited while tests run)."""
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture
def outside_git(tmp_path):
    probe = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--show-toplevel"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the temporary folder is inside a git checkout")
    return tmp_path


def test_in_this_checkout_the_commit_and_state_are_recorded():
    if not (PACKAGE.parents[1] / ".git").exists():
        pytest.skip("not run from a git checkout")
    version = code_version()
    assert set(version) == {"git_commit", "git_dirty", "fedgov_version", "source_hash"}
    assert HEX40.fullmatch(version["git_commit"])
    assert version["git_commit"] == git(PACKAGE, "rev-parse", "HEAD")
    assert isinstance(version["git_dirty"], bool)
    assert HEX64.fullmatch(version["source_hash"]) and version["fedgov_version"]


def test_an_installed_copy_records_its_version_and_source_hash(outside_git):
    package = copy_sources(outside_git / "site-packages" / "fedgov")
    version = code_version(package)
    assert version == {"git_commit": None, "fedgov_version": provenance.fedgov_version(),
                       "source_hash": source_hash(package)}
    assert HEX64.fullmatch(version["source_hash"])


def test_source_hash_follows_the_python_sources_only(outside_git):
    package = copy_sources(outside_git / "fedgov")
    before = source_hash(package)
    assert source_hash(package) == before  # deterministic
    (package / "notes.txt").write_text("not code")
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert source_hash(package) == before
    same_bytes = outside_git / "elsewhere" / "fedgov"  # where the tree sits does not matter
    shutil.copytree(package, same_bytes)
    assert source_hash(same_bytes) == before
    target = package / "provenance.py"
    target.write_text(target.read_text() + "\n# one more line\n")
    changed = source_hash(package)
    assert changed != before
    target.rename(package / "provenance_renamed.py")  # same bytes under another name
    assert source_hash(package) not in (before, changed)


def test_a_package_tracked_in_git_is_clean_until_its_sources_change(outside_git):
    repo = outside_git / "repo"
    package = copy_sources(repo / "src" / "fedgov")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "snapshot")
    head = git(repo, "rev-parse", "HEAD")
    clean = code_version(package)
    assert clean["git_commit"] == head and clean["git_dirty"] is False
    (repo / "results.csv").write_text("a,b\n")  # outside the package: still clean
    (repo / "README.md").write_text("changed\n")
    assert code_version(package)["git_dirty"] is False
    (package / "new_module.py").write_text("x = 1\n")  # an untracked source file
    dirty = code_version(package)
    assert dirty["git_dirty"] is True and dirty["git_commit"] == head
    assert dirty["source_hash"] != clean["source_hash"]
    (package / "new_module.py").unlink()
    assert code_version(package)["git_dirty"] is False
    with (package / "config.py").open("a") as handle:  # a modified tracked file
        handle.write("\n")
    assert code_version(package)["git_dirty"] is True


def test_a_package_in_an_ignored_folder_of_a_checkout_is_not_that_checkouts_code(outside_git):
    # e.g. fedgov installed into .venv/ of some other project's checkout
    repo = outside_git / "project"
    repo.mkdir()
    (repo / ".gitignore").write_text(".venv/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "project")
    package = copy_sources(repo / ".venv" / "lib" / "site-packages" / "fedgov")
    assert code_version(package)["git_commit"] is None


A = {"git_commit": "a" * 40, "git_dirty": False, "fedgov_version": "0.1.0", "source_hash": "1" * 64}


@pytest.mark.parametrize("made, current, same", [
    (A, A, True),
    # The source hash decides: another commit or a dirty tree with the same sources is the same code.
    ({**A, "git_commit": "b" * 40}, A, True),
    ({**A, "git_dirty": True}, A, True),
    ({"git_commit": None, "fedgov_version": "0.1.0", "source_hash": "1" * 64}, A, True),
    ({**A, "source_hash": "2" * 64}, A, False),  # same commit label, other sources
    (None, A, False),  # recorded before fedgov recorded the code
    ({}, A, False),
    ("abc", A, False),
    # Without a source hash: the same commit, and neither tree dirty.
    ({"git_commit": "a" * 40, "git_dirty": False}, {"git_commit": "a" * 40, "git_dirty": False}, True),
    ({"git_commit": "a" * 40, "git_dirty": True}, {"git_commit": "a" * 40, "git_dirty": False}, False),
    ({"git_commit": "a" * 40}, {"git_commit": "a" * 40, "git_dirty": False}, False),
    ({"git_commit": None}, {"git_commit": None}, False),
])
def test_same_code(made, current, same):
    assert same_code(made, current) is same


def test_describe_code():
    assert describe_code(A) == f"git {'a' * 12}, source {'1' * 12}"
    assert describe_code({**A, "git_dirty": True}).startswith(f"git {'a' * 12}+dirty")
    assert describe_code({"git_commit": None, "fedgov_version": "0.1.0", "source_hash": "f" * 64}) == \
        f"fedgov 0.1.0, source {'f' * 12}"
    assert describe_code(None) == "unknown (not recorded)"
