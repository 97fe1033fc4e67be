"""fedgov.process_table: liveness, descendants, environment markers and memory, from psutil."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from fedgov import process_table

# A child that starts a grandchild and waits for it: both carry the parent's environment.
TREE = ("import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(g.pid, flush=True); time.sleep(60)")


def test_a_tree_of_marked_processes_is_found_whole_and_its_memory_summed():
    tag = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "FEDGOV_TEST_TABLE_TAG": tag})
    try:
        grandchild = int(child.stdout.readline())
        assert process_table.descendants([child.pid]) == {grandchild}
        assert process_table.tagged("FEDGOV_TEST_TABLE_TAG", tag) == {child.pid, grandchild}
        assert process_table.tagged("FEDGOV_TEST_TABLE_TAG", "not-" + tag) == set()
        rss, pss, count = process_table.memory([child.pid, grandchild])
        assert count == 2 and rss > 1_000_000  # two Pythons hold more than a megabyte
        if sys.platform.startswith("linux"):
            assert pss is not None and 0 < pss <= rss  # shared pages counted once: never above RSS
        assert all(process_table.alive(p) for p in (child.pid, grandchild))
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 30
    while process_table.alive(grandchild) and time.monotonic() < deadline:  # orphaned: kill it too
        os.kill(grandchild, 9)
        time.sleep(0.1)
    assert not process_table.alive(child.pid) and not process_table.alive(grandchild)
    assert process_table.memory([child.pid, grandchild]) == (0, 0, 0)


def test_a_zombie_is_not_alive_and_this_process_is():
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_table.alive(zombie.pid) and time.monotonic() < deadline:  # exited, never reaped
        time.sleep(0.05)
    assert not process_table.alive(zombie.pid)
    zombie.wait()
    assert process_table.alive(os.getpid())
    assert os.getpid() not in process_table.tagged("PATH", os.environ.get("PATH", ""))  # never itself
