"""Run a command and measure it whole: wall time, and peak memory summed over every process it starts.

A simulation is not one process: Ray starts a GCS server, a raylet, workers and its
helpers, some of them in sessions of their own. Each inherits the environment, so the
command runs with a unique marker variable and every live process that carries it is
counted, sampled a few times a second, two ways: the sum of resident set sizes (RSS), in
which a page shared by several processes (a forked worker's copy of the server's data,
say) counts once per process, and the sum of proportional set sizes (PSS, from
``smaps_rollup``), in which it counts once in all: the memory the command holds. Where
there is no ``/proc`` the peaks are unknown (``None``).
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
from pathlib import Path

__all__ = ["Measured", "run_measured", "tagged_memory", "tagged_pids", "tagged_rss_bytes"]

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


def _tagged(tag: str) -> list[Path]:
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(entry)
        except OSError:  # gone, or not ours to read
            continue
    return found


def tagged_pids(tag: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``tag`` (none where there is no /proc)."""
    return [int(entry.name) for entry in _tagged(tag)] if Path("/proc").is_dir() else []


def tagged_rss_bytes(tag: str) -> tuple[int, int] | None:
    """(total resident bytes, processes) of the live processes whose environment carries ``tag``."""
    found = tagged_memory(tag)
    return None if found is None else (found[0], found[2])


def tagged_memory(tag: str) -> tuple[int, int | None, int] | None:
    """(total RSS bytes, total PSS bytes or None, processes) of the live processes carrying ``tag``.

    Both come from one read of each process's ``smaps_rollup`` (a process gone meanwhile is
    skipped); where a kernel has no ``smaps_rollup``, RSS comes from ``status`` and PSS is unknown.
    """
    if not Path("/proc").is_dir():
        return None
    rss = pss = count = 0
    pss_known = True
    for entry in _tagged(tag):
        try:
            fields = _fields(entry / "smaps_rollup", ("Rss:", "Pss:"))
        except FileNotFoundError:  # no smaps_rollup on this kernel (or the process is gone)
            try:
                fields = _fields(entry / "status", ("VmRSS:",))
            except OSError:
                continue
            fields = {"Rss:": fields.get("VmRSS:")}
            pss_known = False
        except OSError:  # gone, or not ours to read
            continue
        if fields.get("Rss:") is None:  # a kernel thread, or gone between two reads
            continue
        rss += fields["Rss:"]
        count += 1
        if fields.get("Pss:") is None:
            pss_known = False
        else:
            pss += fields["Pss:"]
    return rss, (pss if pss_known else None), count


def _fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The named ``kB`` fields of a /proc file, in bytes."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name = line.split(":", 1)[0] + ":"
        if name in names:
            out[name] = int(line.split()[1]) * 1024
    return out


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
                 interval: float = 0.25) -> Measured:
    """Run ``argv`` to completion; its output, wall time and peak memory over all its processes."""
    tag = uuid.uuid4().hex
    environment = {**(os.environ if env is None else env), MARKER: tag}
    peak: list[int] = [0, 0]
    peak_pss: list[int | None] = [0]
    measurable = tagged_memory(tag) is not None
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            found = tagged_memory(tag)
            if found is None:
                continue
            rss, pss, count = found
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
                    peak_rss_bytes=peak[0] if measurable else None, peak_processes=peak[1], timed_out=timed_out,
                    peak_pss_bytes=peak_pss[0] if measurable and peak_pss[0] else None)


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
