"""The pool engine's workers as Ray actors, for a federation simulated on a Ray cluster (``runtime.ray_address``).

Each actor holds one ClientApp, built once, and runs the tasks sent to it one after
another, as a worker process does (Ray's public actor API; no Flower LinkState in
between). An actor that dies costs the task it was running, which comes back as an
error reply; the tasks queued on it go back to the queue and a new actor takes its place.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from .tasks import Result, Task, error_reply
from .workers import EngineError, WorkerPool, worker_runner

__all__ = ["RayWorkers"]

TASKS_PER_ACTOR = 2  # one running, one waiting on the actor: no idle gap between tasks


class _ActorRunner:
    """What each actor holds: the ClientApp, built once."""

    def __init__(self, app_fn: Callable[[], ClientApp], run_id: int, num_partitions: int, log_level: int) -> None:
        self.runner = worker_runner(app_fn, run_id=run_id, num_partitions=num_partitions, log_level=log_level)

    def ready(self) -> bool:
        return True

    def run(self, task: Task) -> Result:
        return self.runner.run(task)


@dataclass
class _Actor:
    handle: Any
    running: deque[tuple[Any, Task]] = field(default_factory=deque)  # (object ref, task), in call order


class RayWorkers(WorkerPool):
    """Tasks run on ``count`` Ray actors (-1: one per ``num_cpus`` CPUs of the cluster)."""

    def __init__(self, app_fn: Callable[[], ClientApp], *, address: str, count: int, num_cpus: float,
                 num_gpus: float, run_id: int, num_partitions: int, log_level: int = 50,
                 verbose: bool = False) -> None:
        import ray

        super().__init__()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # As Flower's Ray backend does: the actors see this driver's import path.
            path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=verbose,
                     include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        if count < 1:
            count = max(1, int(ray.cluster_resources().get("CPU", 1.0) // num_cpus))
        self._actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_ActorRunner)
        self._args = (app_fn, run_id, num_partitions, log_level)
        self._actors = [self._start() for _ in range(count)]
        self.replaced = 0
        try:
            ray.get([a.handle.ready.remote() for a in self._actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise EngineError(f"a Ray actor of the pool could not build the ClientApp: {exc}") from None

    def _start(self) -> _Actor:
        return _Actor(handle=self._actor_class.remote(*self._args))

    @property
    def actor_count(self) -> int:
        return len(self._actors)

    def _dispatch(self) -> None:
        for actor in self._actors:
            while len(actor.running) < TASKS_PER_ACTOR and self._pending:
                claimed = self._claim(1)
                if not claimed:
                    return
                actor.running.append((actor.handle.run.remote(claimed[0]), claimed[0]))

    def _collect(self, timeout: float | None) -> list[Result]:
        ray = self._ray
        self._dispatch()
        refs = [ref for actor in self._actors for ref, _ in actor.running]
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(ready)
        results: list[Result] = []
        for actor in list(self._actors):
            while actor.running and actor.running[0][0] in done:
                ref, task = actor.running.popleft()
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    result = error_reply(task, ErrorCode.CLIENT_APP_CRASHED,
                                         f"the Ray actor running this ClientApp died: {type(exc).__name__}")
                    self._settle(task, result)
                    results.append(result)
                    self._replace(actor)
                    break
                except ray.exceptions.RayError as exc:
                    result = error_reply(task, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc))
                self._settle(task, result)
                results.append(result)
        self._dispatch()
        return results

    def _replace(self, actor: _Actor) -> None:
        self._ray.kill(actor.handle)
        self._requeue(task for _, task in actor.running)
        self._actors.remove(actor)
        self._actors.append(self._start())
        self.replaced += 1

    def cancel(self, task_ids: set[int]) -> None:
        super().cancel(task_ids)
        for actor in list(self._actors):
            if any(task.id in task_ids for _, task in actor.running):
                for _, task in actor.running:
                    if task.id in task_ids:
                        self._busy.discard(task.node_id)
                actor.running = deque((r, t) for r, t in actor.running if t.id not in task_ids)
                self._replace(actor)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor.handle)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()
