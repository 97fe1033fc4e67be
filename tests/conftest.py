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

