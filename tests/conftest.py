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


def run_simulate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m fedgov.simulate`` as a user would; the run dir is stdout's last line."""
    return subprocess.run([sys.executable, "-m", "fedgov.simulate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    """The run directory a successful ``fedgov.simulate`` printed as its last line."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def simulate():
    return run_simulate
