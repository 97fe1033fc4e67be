import os
import subprocess
import sys
from pathlib import Path

import pytest

# Flower must not phone home or check for updates from tests.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parents[1]


def run_simulate(*args: str, timeout: float = 300, process: bool = False) -> subprocess.CompletedProcess:
    """Run ``fedgov.simulate`` with these arguments; the run dir is stdout's last line.

    By default in this process (``fedgov.simulate.main``, its stdout and stderr captured, its exit
    status returned): the run's own workers are processes either way, and a new Python would
    only import torch, scikit-learn and Flower again (seconds per run). ``process=True`` runs
    ``python -m fedgov.simulate`` as a user does, for what only a whole process shows (the
    stderr of every library, signals).
    """
    if process:
        return subprocess.run([sys.executable, "-m", "fedgov.simulate", "--no-progress", *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    import contextlib
    import io

    from fedgov import simulate

    argv = ["--no-progress", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(ROOT):
        try:
            code = simulate.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["fedgov.simulate", *argv], code, out.getvalue(), err.getvalue())


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    """The run directory a successful ``fedgov.simulate`` printed as its last line."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def live_processes(field: int, value: int) -> list[int]:
    """PIDs of live processes whose /proc stat field ``field`` (after the name) is ``value``:
    1 the parent's PID, 3 the session's id."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[field]) == value and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.fixture
def simulate():
    return run_simulate



# ---- the order files are handed out in, and where the suite's time goes ------------------------
# pytest-xdist's loadfile hands each worker one file at a time, in collection order
# (--no-loadscope-reorder in pyproject.toml). The files below take minutes each, much of it
# waiting on processes they start (a SuperLink, SuperNodes, Ray). Each is placed a fixed share of
# the way into the queue, so that one starts early and the next only after the other workers have
# worked through shorter files beside it: all of them first would leave three workers contending
# for two cores at the start, and all of them last (xdist's own order) the suite waiting on them
# at the end. ``FEDGOV_TEST_TIMELINE=FILE`` writes when each file ran on which worker.
LONG_FILES = {  # file name -> how far into the queue of files it goes (0: first)
    "test_deployment_restart.py": 0.0, "test_deployment_secure.py": 0.06, "test_equivalence.py": 0.12,
    "test_deployment.py": 0.3, "test_ray_cluster.py": 0.4, "test_flower_simulation.py": 0.5,
}


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ARG001
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(str(item.fspath), []).append(item)
    short = [f for f in files if Path(f).name not in LONG_FILES]
    for path in sorted((f for f in files if Path(f).name in LONG_FILES), key=lambda f: LONG_FILES[Path(f).name]):
        short.insert(round(LONG_FILES[Path(path).name] * (len(files) - 1)), path)
    items[:] = [item for path in short for item in files[path]]


_timeline: dict[str, list[float]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001, ARG001
    import time

    started = time.time()
    yield
    span = _timeline.setdefault(str(Path(str(item.fspath)).relative_to(ROOT)), [started, started])
    span[1] = time.time()


def pytest_sessionfinish(session):  # noqa: ANN001
    path = os.environ.get("FEDGOV_TEST_TIMELINE")
    if path and _timeline:
        import json

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as log:
            for name, (start, end) in _timeline.items():
                log.write(json.dumps({"worker": worker, "file": name, "start": start, "end": end}) + "\n")
