"""Run a command and measure it whole: wall time, and peak memory summed over every process it starts.

A simulation is not one process: Ray starts a GCS server, a raylet, workers and its
helpers, some of them in sessions of their own. Each inherits the environment, so the
command runs with a unique marker variable and every live process that carries it is
counted, sampled a few times a second, two ways (``fedgov.process_table``, psutil): the sum of
resident set sizes (RSS), in which a page shared by several processes (a forked worker's copy
of the server's data, say) counts once per process, and the sum of proportional set sizes
(PSS, Linux's ``smaps_rollup``), in which it counts once in all: the memory the command holds.
Where a platform cannot tell PSS, its peak is unknown (``None``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import process_table

__all__ = ["Measured", "run_measured", "tagged_memory", "tagged_pids"]

MARKER = "FEDGOV_BENCH_PROCESS_TAG"


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_rss_bytes: int | None  # summed over every process carrying the marker, at its highest sample
    peak_processes: int  # how many processes were counted at that sample
    timed_out: bool = False  # stopped at the timeout, with every process it started
    peak_pss_bytes: int | None = None  # the same with shared pages counted once (None: no smaps_rollup)


def tagged_pids(tag: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``tag``."""
    return sorted(process_table.tagged(MARKER, tag))


def tagged_memory(tag: str) -> tuple[int, int | None, int]:
    """(total RSS bytes, total PSS bytes or None, processes) of the live processes carrying ``tag``
    (PSS is None where the platform cannot tell it: ``fedgov.process_table.memory``)."""
    return process_table.memory(process_table.tagged(MARKER, tag))


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
                 interval: float = 0.25) -> Measured:
    """Run ``argv`` to completion; its output, wall time and peak memory over all its processes."""
    tag = uuid.uuid4().hex
    environment = {**(os.environ if env is None else env), MARKER: tag}
    peak: list[int] = [0, 0]
    peak_pss: list[int | None] = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            rss, pss, count = tagged_memory(tag)
            if rss > peak[0]:
                peak[0], peak[1] = rss, count
            if pss is None and count:
                peak_pss[0] = None  # some process's PSS could not be read: the sum is unknown
            elif peak_pss[0] is not None and pss is not None:
                peak_pss[0] = max(peak_pss[0], pss)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    timed_out = False
    stopped_at: float | None = None
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out, stopped_at = True, time.perf_counter()  # the wall time is the command's, not its stopping
        _stop(proc, tag)
        stdout, stderr = proc.communicate()
    finally:
        wall = (stopped_at or time.perf_counter()) - started
        done.set()
        sampler.join()
        if proc.poll() is None:  # interrupted (Ctrl-C): leave nothing of it running
            _stop(proc, tag)
    return Measured(returncode=proc.returncode, stdout=stdout, stderr=stderr, wall_seconds=wall,
                    peak_rss_bytes=peak[0], peak_processes=peak[1], timed_out=timed_out,
                    peak_pss_bytes=peak_pss[0] or None)


def _stop(proc: subprocess.Popen, tag: str, grace: float = 10.0) -> None:
    """Stop the command and every process it started (Ray's too, some in sessions of their own), by PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in {proc.pid, *tagged_pids(tag)}:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or tagged_pids(tag)):
            time.sleep(0.2)
        if proc.poll() is not None and not tagged_pids(tag):
            return
