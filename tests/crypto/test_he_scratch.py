"""No plaintext left behind: HE scratch files live in private folders, and killed processes' folders go."""

import glob
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fedgov.bench.he_reference import max_abs_error
from fedgov.crypto import decrypt_aggregate, encrypt_update, generate_keys, he_scratch, he_workers

# Run as a script (spawned workers need an importable __main__): start the worker pool, write
# a block of plaintext values into the scratch folder as the pool does before a worker reads it,
# report the folders, and wait to be killed.
CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from fedgov.crypto import encrypt_update, generate_keys, he_scratch, he_workers

    if __name__ == "__main__":
        keys = generate_keys("standard")
        x = [np.random.default_rng(0).normal(0, 0.01, 40_000).astype(np.float32)]
        encrypt_update(x, context=keys, weight=0.5, workers=2)
        assert he_workers._POOL is not None and not he_workers._POOL_BROKEN
        block = he_scratch.scratch_path("in-0")
        he_workers._write_plaintext_block(block, [x[0][:4096]])
        print(json.dumps({"dir": he_scratch.scratch_dir(), "block": block,
                          "workers": list(he_workers._POOL._processes)}), flush=True)
        time.sleep(600)
""")


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _folders_of(pid):
    return glob.glob(os.path.join(he_scratch.scratch_base(), f"{he_scratch.SCRATCH_PREFIX}{pid}-*"))


def _wait_dead(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while any(he_scratch._is_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} still alive"
        time.sleep(0.05)


def _wait_gone(folders, *, sweep, timeout=5.0):
    """Wait until ``folders`` are gone, sweeping again each time if ``sweep``. (A process that
    sweeps at the same time holds a dead folder's lock while it removes it; a sweep then leaves
    that folder to it, so a folder may outlive a sweep by the time that removal takes.)"""
    deadline = time.monotonic() + timeout
    while True:
        if sweep:
            he_scratch.remove_stale_scratch()
        left = [f for f in folders if os.path.lexists(f)]
        if not left:
            return
        assert time.monotonic() < deadline, f"still there: {left}"
        time.sleep(0.05)


def _start_child(script):
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)


def _read_info(proc):
    line = proc.stdout.readline()
    assert line, f"child exited with {proc.wait()}"
    return json.loads(line)


def _kill(proc, workers):
    """SIGKILL the process and its encryption workers (not multiprocessing's resource
    tracker, which then removes the pool's semaphores from /dev/shm)."""
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def fresh_pool(monkeypatch):
    """A pool started by the test itself, and a working pool again afterwards."""
    monkeypatch.setattr(he_workers, "_POOL_BROKEN", False)
    he_workers.shutdown_workers()
    yield
    he_workers.shutdown_workers()


def test_scratch_folder_is_private_and_named_for_its_process():
    path = he_scratch.scratch_dir()
    assert os.path.dirname(path) == he_scratch.scratch_base()
    assert os.path.basename(path).startswith(f"fedgov-he-{os.getpid()}-")
    assert _mode(path) == 0o700
    assert os.stat(path).st_uid == os.getuid()


def test_a_worker_removes_its_plaintext_block_as_soon_as_it_has_read_it():
    keys = generate_keys("standard")
    x = np.random.default_rng(1).normal(0, 0.01, 2 * 4096).astype(np.float64)  # two ciphertexts' worth
    in_path, out_path = he_scratch.scratch_path("test-in"), he_scratch.scratch_path("test-out")
    he_workers._write_plaintext_block(in_path, [x[:4096], x[4096:]])
    assert _mode(in_path) == 0o600 and os.path.getsize(in_path) == x.nbytes
    he_workers._worker_encrypt(b"test-token", keys._encryption_bytes(), keys.preset.to_json(), in_path,
                               x.dtype.str, [4096, 4096], out_path)  # as a worker process runs it
    assert not os.path.exists(in_path)
    assert os.path.getsize(out_path) > 2 * 4096  # two ciphertexts were written
    os.unlink(out_path)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a silent fall-back to one process would fail here
def test_parallel_encryption_leaves_no_plaintext_file(fresh_pool):
    keys = generate_keys("compact")
    x = [np.random.default_rng(2).normal(0, 0.01, 60_000).astype(np.float32)]
    upd = encrypt_update(x, context=keys, weight=0.5, workers=2)
    assert he_workers._POOL is not None  # a worker process did encrypt
    assert max_abs_error(decrypt_aggregate(upd, keys=keys), x) <= keys.preset.precision
    assert [n for n in os.listdir(he_scratch.scratch_dir()) if n.startswith("in-")] == []


def test_folders_of_killed_processes_are_removed_when_the_pool_next_starts(tmp_path, fresh_pool):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    doomed, alive = _start_child(script), _start_child(script)
    dead = live = {"workers": []}
    try:
        dead, live = _read_info(doomed), _read_info(alive)
        dead_folders = [dead["dir"], *(f for pid in dead["workers"] for f in _folders_of(pid))]
        assert os.path.isfile(dead["block"]) and len(dead_folders) >= 2  # plaintext there, worker folders too
        _kill(doomed, dead["workers"])  # SIGKILL: no atexit runs in the process nor in its workers
        _wait_dead([doomed.pid, *dead["workers"]])
        assert all(os.path.isdir(f) for f in dead_folders)  # what a killed process leaves behind

        keys = generate_keys("standard")
        x = [np.random.default_rng(3).normal(0, 0.01, 40_000).astype(np.float32)]
        encrypt_update(x, context=keys, weight=0.5, workers=2)  # starts the pool again
        assert he_workers._POOL is not None and not he_workers._POOL_BROKEN

        _wait_gone(dead_folders, sweep=False)  # the pool's start removed them
        assert not os.path.exists(dead["block"])
        live_folders = [live["dir"], *(f for pid in live["workers"] for f in _folders_of(pid))]
        assert len(live_folders) >= 2 and os.path.isfile(live["block"])  # a live process keeps its folder
        mine = [he_scratch.scratch_dir(), *(f for pid in he_workers._POOL._processes for f in _folders_of(pid))]
        assert len(mine) >= 2
        assert {f: _mode(f) for f in live_folders + mine} == {f: 0o700 for f in live_folders + mine}
    finally:
        _kill(doomed, dead["workers"])
        _kill(alive, live["workers"])
    _wait_dead([alive.pid, *live["workers"]])
    _wait_gone(live_folders, sweep=True)  # dead now: removed by the next sweep


def test_a_killed_worker_leaves_no_plaintext_and_its_folder_goes(fresh_pool):
    keys = generate_keys("standard")
    x = [np.random.default_rng(4).normal(0, 0.01, 40_000).astype(np.float32)]
    encrypt_update(x, context=keys, weight=0.5, workers=2)
    pids = list(he_workers._POOL._processes)
    folders = [f for pid in pids for f in _folders_of(pid)]
    assert folders
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _wait_dead(pids)
    with pytest.warns(RuntimeWarning, match="worker processes failed"):
        upd = encrypt_update(x, context=keys, weight=0.5, workers=2)  # its block is written, never read
    assert max_abs_error(decrypt_aggregate(upd, keys=keys), x) <= 1e-6
    assert [n for n in os.listdir(he_scratch.scratch_dir()) if n.startswith("in-")] == []
    assert [f for f in folders if os.path.lexists(f)] == []


def test_a_folder_whose_process_holds_its_lock_is_kept(tmp_path):
    # a PID that looks dead here (another PID namespace sharing /dev/shm) but whose owner holds the lock
    folder = tmp_path / f"{he_scratch.SCRATCH_PREFIX}999999999-x"
    folder.mkdir(mode=0o700)
    (folder / "in-0").write_bytes(b"plaintext")
    lock = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / ".lock")!r}, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert lock.stdout.readline().strip() == "locked"
        assert not he_scratch._is_alive(999999999)
        assert he_scratch.remove_stale_scratch(str(tmp_path)) == [] and folder.is_dir()
    finally:
        lock.kill()
        lock.wait()
        lock.stdout.close()
    assert he_scratch.remove_stale_scratch(str(tmp_path)) == [str(folder)] and not folder.exists()


def test_a_sweep_removes_the_folder_of_a_zombie_and_keeps_live_and_unknown_ones(tmp_path):
    def folder(name):
        path = tmp_path / name
        path.mkdir(mode=0o700)
        (path / "in-0").write_bytes(b"plaintext")
        return path

    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    live, zombie = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    try:
        zombie.kill()  # not waited for: a zombie until reaped
        deadline = time.monotonic() + 20
        while open(f"/proc/{zombie.pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kept = [folder(f"fedgov-he-{live.pid}-a"), folder("fedgov-he-0-b"), folder("fedgov-he-k3j9x0qz")]
        doomed = folder(f"fedgov-he-{zombie.pid}-c")
        assert he_scratch._is_alive(live.pid) and not he_scratch._is_alive(zombie.pid)
        assert he_scratch.remove_stale_scratch(str(tmp_path)) == [str(doomed)]
        assert all(f.is_dir() for f in kept) and not doomed.exists()
    finally:
        live.kill()
        live.wait()
        zombie.wait()
