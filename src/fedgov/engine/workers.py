"""The pool engine's workers: long-lived processes that each hold one ClientApp, or the server's own process.

:class:`WorkerPool` keeps what must outlive any worker: the queue of tasks not yet sent,
and every node's ``context.state`` (a worker gets the state with the task and returns
it with the result, so a worker that dies loses no node's context). A node never has
two tasks on workers at once, so each task sees the state its previous one left.

:class:`ProcessWorkers` runs tasks in worker processes, one per core by default. Each
imports fedgov once (on Linux without CUDA each is forked from the server after its
imports and data are loaded, so it starts in milliseconds with the federation already
in memory) and then runs chunk after chunk of tasks, sending each result back as soon as
it is done. Chunks shrink as the queue empties (guided self-scheduling), so both cores
stay busy to the end of a round. A worker that dies (killed, out of memory) costs the
task it was running, which comes back as an error reply; the tasks it had not started
go back to the queue, and a new worker takes its place.

:class:`InProcessWorkers` runs every task in the server's own process (``runtime.workers
= 0``), for debugging and profiling; it restores the process-wide random generators and
thread count after each task, so that no ClientApp's state leaks into the server's.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from .tasks import ClientRunner, Result, Task, dumps, error_reply

__all__ = ["EngineError", "WorkerPool", "ProcessWorkers", "InProcessWorkers", "default_worker_count",
           "quiet", "start_method", "worker_runner"]

MAX_CHUNK = 64  # tasks sent to a worker at once
FLUSH_SECONDS = 0.05  # a worker sends what it has done at least this often during a long chunk
_READY = "ready"


class EngineError(RuntimeError):
    """The engine itself cannot go on (its workers cannot start)."""


def default_worker_count() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def start_method(*, uses_cuda: bool) -> str:
    """``fork`` where it is safe (Linux, no CUDA in the workers), else ``forkserver`` (or ``spawn``)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if sys.platform == "linux" and not uses_cuda and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


class WorkerPool(ABC):
    """Runs tasks on workers; keeps the queue and every node's state."""

    def __init__(self) -> None:
        self._pending: deque[Task] = deque()
        self._states: dict[int, bytes] = {}
        self._busy: set[int] = set()  # nodes with a task on a worker

    # -- what the grid calls -----------------------------------------------------------
    def submit(self, tasks: Iterable[Task]) -> None:
        self._pending.extend(tasks)
        self._dispatch()

    def results(self, timeout: float | None) -> list[Result]:
        """Wait up to ``timeout`` seconds (None: no limit) for at least one result; return all that are done."""
        return self._collect(timeout)

    def cancel(self, task_ids: set[int]) -> None:
        """Give up on these tasks: drop the queued ones, stop the workers running the others."""
        self._pending = deque(t for t in self._pending if t.id not in task_ids)

    @property
    def outstanding(self) -> int:
        """Tasks queued or on a worker."""
        return len(self._pending) + len(self._busy)

    def close(self) -> None:
        """Stop every worker."""

    # -- for the kinds of worker ---------------------------------------------------------
    @abstractmethod
    def _collect(self, timeout: float | None) -> list[Result]: ...

    def _dispatch(self) -> None:
        """Send queued tasks to idle workers (nothing to do where tasks run when collected)."""

    def _claim(self, limit: int) -> list[Task]:
        """Up to ``limit`` queued tasks for nodes with nothing on a worker, each with its node's state."""
        taken: list[Task] = []
        skipped: list[Task] = []
        while self._pending and len(taken) < limit:
            task = self._pending.popleft()
            if task.node_id in self._busy:
                skipped.append(task)  # this node's earlier task must finish first
                continue
            task.state = self._states.get(task.node_id)
            self._busy.add(task.node_id)
            taken.append(task)
        self._pending.extendleft(reversed(skipped))
        return taken

    def _settle(self, task: Task, result: Result) -> None:
        """``task`` is over: keep its node's new state and free the node."""
        if result.updated:
            if result.state is None:
                self._states.pop(task.node_id, None)
            else:
                self._states[task.node_id] = result.state
        self._busy.discard(task.node_id)

    def _requeue(self, tasks: Iterable[Task]) -> None:
        """Tasks a worker took but never started go back to the front of the queue, in order."""
        tasks = list(tasks)
        for task in tasks:
            self._busy.discard(task.node_id)
        self._pending.extendleft(reversed(tasks))


# ---------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------

def quiet(log_level: int) -> None:
    """A worker's logs at the server's level; without --verbose its warnings too stay out of the
    user's terminal, as they stay in Ray's logs on Flower's engine."""
    import logging
    import warnings

    logging.getLogger("flwr").setLevel(log_level)
    if log_level > logging.WARNING:
        warnings.simplefilter("ignore")


def worker_runner(app_fn: Callable[[], ClientApp], *, run_id: int, num_partitions: int,
                  log_level: int) -> ClientRunner:
    """A worker's one-time set-up, in a process of the pool or a Ray actor: the server's log level,
    one core, and the ClientApp built once."""
    import torch

    quiet(log_level)
    torch.set_num_threads(1)
    return ClientRunner(app_fn, run_id=run_id, num_partitions=num_partitions)


def _worker_main(conn: Connection, current: Any, app_fn: Callable[[], ClientApp], run_id: int,
                 num_partitions: int, log_level: int, inherited: list[Connection]) -> None:
    """A worker process: build the ClientApp once, then run the chunks of tasks the server sends.

    Results go back in batches: when the chunk is done, or every ``FLUSH_SECONDS`` of a long
    chunk. ``current`` (shared memory) names the task running now, -1 between tasks, so that
    the server knows which task a worker that dies was running without a message per task.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops the workers
    for other in inherited:  # forked: the server's ends of the other workers' pipes are not ours
        other.close()
    parent = os.getppid()
    try:
        runner = worker_runner(app_fn, run_id=run_id, num_partitions=num_partitions, log_level=log_level)
    except BaseException as exc:  # noqa: BLE001 (reported to the server, which stops the run)
        conn.send_bytes(dumps(("failed", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(dumps(_READY))
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent:  # the server is gone
                return
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if chunk is None:
            return
        done: list[Result] = []
        flushed = time.monotonic()
        for task in chunk:
            current.value = task.id
            done.append(runner.run(task))
            current.value = -1
            if time.monotonic() - flushed > FLUSH_SECONDS:
                conn.send_bytes(dumps(done))
                done, flushed = [], time.monotonic()
        conn.send_bytes(dumps(done))


@dataclass
class _Worker:
    process: Any  # multiprocessing's Process
    conn: Connection
    current: Any  # shared int: the id of the task the worker is running, -1 between tasks
    running: deque[Task] = field(default_factory=deque)  # sent, in the order the worker runs them
    ready: bool = False


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class ProcessWorkers(WorkerPool):
    """Tasks run in ``count`` worker processes (module docstring)."""

    def __init__(self, app_fn: Callable[[], ClientApp], *, count: int, run_id: int, num_partitions: int,
                 method: str = "fork", log_level: int = 50, preload: tuple[str, ...] = ()) -> None:
        import multiprocessing

        super().__init__()
        if count < 1:
            raise ValueError(f"a process pool needs at least one worker, got {count}")
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver" and preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._method = method
        self._args = (app_fn, run_id, num_partitions, log_level)
        self._workers: list[_Worker] = []
        self.replaced = 0  # workers started in place of dead ones
        for _ in range(count):
            self._workers.append(self._start())

    def _start(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        current = self._ctx.RawValue("q", -1)
        inherited = [w.conn for w in self._workers] + [parent_end] if self._method == "fork" else []
        process = self._ctx.Process(target=_worker_main, args=(child_end, current, *self._args, inherited),
                                    name="fedgov-pool-worker", daemon=True)
        process.start()
        child_end.close()
        return _Worker(process=process, conn=parent_end, current=current)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _dispatch(self) -> None:
        for worker in self._workers:
            if worker.running or not self._pending:
                continue
            size = max(1, min(MAX_CHUNK, math.ceil(len(self._pending) / (2 * len(self._workers)))))
            chunk = self._claim(size)
            if not chunk:
                return  # every queued task waits for a node that is busy
            worker.running.extend(chunk)
            try:
                worker.conn.send_bytes(dumps(chunk))
            except OSError:  # the worker is gone: _collect sees it and accounts for the chunk
                pass

    def _collect(self, timeout: float | None) -> list[Result]:
        self._dispatch()
        if not any(w.running for w in self._workers):
            return []
        waiting = {w.conn: w for w in self._workers} | {w.process.sentinel: w for w in self._workers}
        ready = wait(list(waiting), timeout)
        results: list[Result] = []
        for worker in {id(waiting[r]): waiting[r] for r in ready}.values():
            results += self._drain(worker)
            if not worker.process.is_alive():
                results += self._replace(worker)
        self._dispatch()
        return results

    def _drain(self, worker: _Worker) -> list[Result]:
        out: list[Result] = []
        try:
            while worker.conn.poll():
                item = pickle.loads(worker.conn.recv_bytes())
                if not worker.ready:
                    if item != _READY:
                        self.close()
                        raise EngineError(f"a pool worker could not build the ClientApp: {item[1]}")
                    worker.ready = True
                    continue
                for result in item:
                    task = worker.running.popleft()
                    self._settle(task, result)
                    out.append(result)
        except (EOFError, OSError):  # the worker died; _replace accounts for what it held
            pass
        return out

    def _replace(self, worker: _Worker, *, reason: str | None = None) -> list[Result]:
        """``worker`` is dead (or being stopped): fail the task it was running, requeue the rest, start another.

        Tasks it finished but whose results never arrived run again: the server kept no
        trace of them, and each node's state is the one it had before.
        """
        worker.process.join(timeout=5)
        if not worker.ready and reason is None:
            self.close()
            raise EngineError(f"a pool worker died while starting ({_death(worker.process.exitcode)})")
        worker.conn.close()
        self._workers.remove(worker)
        results = []
        running = worker.current.value
        if reason is None and running >= 0 and any(t.id == running for t in worker.running):
            task = next(t for t in worker.running if t.id == running)
            worker.running.remove(task)
            result = error_reply(task, ErrorCode.CLIENT_APP_CRASHED,
                                 f"the pool worker running this ClientApp (pid {worker.process.pid}) died: "
                                 f"{_death(worker.process.exitcode)}")
            self._settle(task, result)
            results.append(result)
        self._requeue(worker.running)
        self._workers.append(self._start())
        self.replaced += 1
        return results

    def cancel(self, task_ids: set[int]) -> None:
        super().cancel(task_ids)
        for worker in list(self._workers):
            if any(t.id in task_ids for t in worker.running):
                worker.process.kill()  # a ClientApp cannot be interrupted any other way
                worker.process.join()
                abandoned = [t for t in worker.running if t.id in task_ids]
                worker.running = deque(t for t in worker.running if t.id not in task_ids)
                for task in abandoned:
                    self._busy.discard(task.node_id)
                self._replace(worker, reason="cancelled")

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(dumps(None))
        deadline = time.monotonic() + 5
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


# ---------------------------------------------------------------------------------------
# The server's own process
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Restore the process-wide random generators and torch's thread count afterwards."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_rng = np.random.get_state()
    python_rng = random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)


class InProcessWorkers(WorkerPool):
    """Every task runs in the server's process, one after another (``runtime.workers = 0``).

    A timeout is checked between tasks only: a ClientApp that hangs hangs the run.
    """

    def __init__(self, app_fn: Callable[[], ClientApp], *, run_id: int, num_partitions: int) -> None:
        super().__init__()
        self._runner = ClientRunner(app_fn, run_id=run_id, num_partitions=num_partitions)

    def _collect(self, timeout: float | None) -> list[Result]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Result] = []
        while self._pending and (deadline is None or time.monotonic() < deadline or not out):
            chunk = self._claim(1)
            if not chunk:
                break
            task = chunk[0]
            with process_state_kept():
                result = self._runner.run(task)
            # Nothing crosses a process boundary here; copy the reply as if it had.
            result = pickle.loads(dumps(result))
            self._settle(task, result)
            out.append(result)
        return out
