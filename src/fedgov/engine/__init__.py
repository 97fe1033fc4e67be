"""How a simulated federation's messages reach its ClientApps, behind Flower's ``Grid``.

Two engines run the same ServerApp and ClientApp, which never know which one runs them:

- ``pool`` (the default, ``fedgov.engine.pool``): every message goes straight to its node's
  ClientApp on a pool of long-lived workers: processes on this machine (one per core by
  default, ``runtime.workers``; 0 runs them in the server's own process), or Ray actors
  on the cluster at ``runtime.ray_address``.
- ``flower`` (``fedgov.engine.flower``): Flower's own simulation engine, ``run_simulation``
  on Ray, with its in-memory LinkState.

:func:`start_engine` starts the one ``runtime.engine`` names; its ``run(server_app)`` calls
the ServerApp as Flower calls it. The Deployment Engine (SuperLink, SuperNodes, ``flwr
run``) needs neither: there Flower's own grid carries the messages.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.run import Run

from .flower import FlowerEngine, uses_cuda
from .pool import PoolGrid, draw_node_ids, random_id
from .workers import EngineError, WorkerPool

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ENGINES", "EngineError", "PoolEngine", "FlowerEngine", "PoolGrid", "start_engine", "new_run"]

ENGINES = ("pool", "flower")
# Imported once in the forkserver, where workers cannot be forked from the server (CUDA).
PRELOAD = ("fedgov.client_app", "fedgov.engine.workers")


def new_run() -> Run:
    """A run of its own, with the ids Flower's ``run_simulation`` gives a run; messages are made for it."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.supercore.task_identity import TaskIdentity

    run = Run.create_empty(run_id=random_id(RUN_ID_NUM_BYTES))
    run.primary_task_id = random_id(TASK_ID_NUM_BYTES)
    # Messages are stamped with this process's task identity, as run_simulation stamps them.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    return run


class PoolEngine:
    """The ServerApp in this process, the ClientApps on ``pool``, messages through a :class:`PoolGrid`."""

    name = "pool"

    def __init__(self, pool: WorkerPool, run: Run, num_nodes: int) -> None:
        self.pool = pool
        self.run_info = run
        self.grid = PoolGrid(pool, run, draw_node_ids(num_nodes))

    def run(self, server_app: ServerApp) -> None:
        context = Context(run_id=self.run_info.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grid=self.grid, context=context)

    def close(self) -> None:
        self.pool.close()


def _pool(cfg: Config, client_app_fn: Callable[[], ClientApp], *, run_id: int, num_nodes: int,
          verbose: bool) -> WorkerPool:
    from .workers import InProcessWorkers, ProcessWorkers, default_worker_count, start_method

    log_level = logging.getLogger("flwr").getEffectiveLevel()
    runtime = cfg.runtime
    if runtime.ray_address:
        from .ray_workers import RayWorkers

        cuda = uses_cuda(cfg)
        return RayWorkers(client_app_fn, address=runtime.ray_address, count=runtime.workers,
                          num_cpus=runtime.client_cpus, num_gpus=runtime.client_gpu_fraction if cuda else 0.0,
                          run_id=run_id, num_partitions=num_nodes, log_level=log_level, verbose=verbose)
    if runtime.workers == 0:
        return InProcessWorkers(client_app_fn, run_id=run_id, num_partitions=num_nodes)
    count = runtime.workers if runtime.workers > 0 else default_worker_count()
    return ProcessWorkers(client_app_fn, count=count, run_id=run_id, num_partitions=num_nodes,
                          method=start_method(uses_cuda=uses_cuda(cfg)), log_level=log_level, preload=PRELOAD)


@contextlib.contextmanager
def start_engine(cfg: Config, *, client_app_fn: Callable[[], ClientApp], num_nodes: int,
                 verbose: bool = False) -> Iterator[PoolEngine | FlowerEngine]:
    """The engine ``runtime.engine`` names, with ``num_nodes`` nodes; stopped on leaving the block.

    Node ``i`` has ``partition-id`` ``i``. The pool's workers start here, before anything
    else runs in this process (a progress bar's thread, say), so that forking them is safe.
    """
    if cfg.runtime.engine == "flower":
        yield FlowerEngine(cfg, client_app_fn=client_app_fn, num_nodes=num_nodes, verbose=verbose)
        return
    run = new_run()
    # What is loaded now (modules, the federation's data) lives for the whole run: out of the
    # collector's way, so that neither it nor forked workers' collections walk (and so copy) it.
    gc.collect()
    gc.freeze()
    try:
        engine = PoolEngine(_pool(cfg, client_app_fn, run_id=run.run_id, num_nodes=num_nodes, verbose=verbose),
                            run, num_nodes)
        try:
            yield engine
        finally:
            engine.close()
    finally:
        gc.unfreeze()
