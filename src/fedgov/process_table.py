"""The processes on this machine, read with psutil: which are alive, which descend from which,
which carry an environment marker, and how much memory they hold.

One place for what the benchmarks (a command's peak memory over every process it starts), the
test harness (stopping a federation's process tree) and HE's scratch folders (is their owner
gone?) ask of the process table, on every platform psutil supports. Where a platform cannot
tell proportional memory (PSS: shared pages counted once), it is ``None``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

__all__ = ["alive", "descendants", "memory", "tagged"]


def alive(pid: int) -> bool:
    """Whether ``pid`` is running: a zombie (exited, not yet reaped) is not; another user's process is."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def descendants(roots: Iterable[int]) -> set[int]:
    """Every live process below ``roots`` (children, their children, ...), the roots excluded."""
    found: set[int] = set()
    for pid in roots:
        try:
            found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def tagged(variable: str, value: str) -> set[int]:
    """PIDs of the live processes, this one aside, whose environment sets ``variable=value``."""
    found: set[int] = set()
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(variable) == value:
                found.add(process.pid)
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
    return found


def memory(pids: Iterable[int]) -> tuple[int, int | None, int]:
    """(RSS bytes, PSS bytes or None, processes counted) summed over the live ``pids``.

    RSS counts a page shared by several processes once per process; PSS counts it once in all
    (Linux's ``smaps_rollup``; ``None`` where any process's PSS cannot be read).
    """
    rss = pss = count = 0
    pss_known = True
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:  # exited: holds no memory, counts as gone
                continue
            try:
                info = process.memory_full_info()
            except psutil.AccessDenied:
                info = process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone (or a zombie) meanwhile
            continue
        rss += info.rss
        count += 1
        if getattr(info, "pss", None) is None:
            pss_known = False
        else:
            pss += info.pss
    return rss, (pss if pss_known else None), count
