"""Run a command and measure it whole: wall time, and peak memory summed over every process it starts.

A simulation is not one process: Ray starts a GCS server, a raylet, workers and its
helpers, some of them in sessions of their own. Each inherits the environment, so the
command runs with a unique marker variable and every live process that carries it is
counted (resident set size, from ``/proc``), sampled a few times a second. Where there is
no ``/proc`` the peak is unknown (``None``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Measured", "run_measured", "tagged_rss_bytes"]

MARKER = "FEDGOV_BENCH_PROCESS_TAG"


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_rss_bytes: int | None  # summed over every process carrying the marker, at its highest sample
    peak_processes: int  # how many processes were counted at that sample


def tagged_rss_bytes(tag: str) -> tuple[int, int] | None:
    """(total resident bytes, processes) of the live processes whose environment carries ``tag``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    needle = f"{MARKER}={tag}".encode()
    total = count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
                    break
        except OSError:  # gone, or not ours to read
            continue
    return total, count


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
                 interval: float = 0.25) -> Measured:
    """Run ``argv`` to completion; its output, wall time and peak memory over all its processes."""
    tag = uuid.uuid4().hex
    environment = {**(os.environ if env is None else env), MARKER: tag}
    peak: list[int] = [0, 0]
    measurable = tagged_rss_bytes(tag) is not None
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            found = tagged_rss_bytes(tag)
            if found is not None and found[0] > peak[0]:
                peak[0], peak[1] = found

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=environment, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    finally:
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    return Measured(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, wall_seconds=wall,
                    peak_rss_bytes=peak[0] if measurable else None, peak_processes=peak[1])
