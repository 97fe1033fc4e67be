"""Flower's own simulation engine (``runtime.engine = "flower"``): ``run_simulation`` on Ray.

It is what ``flwr run`` users know; fedgov's equivalence tests run the pool engine against
it. Each simulated cooperative is a Ray actor with ``runtime.client_cpus`` CPUs (and, on
CUDA, ``runtime.client_gpu_fraction`` of a GPU); Ray runs where ``runtime.ray_address``
says, else in a local instance of fedgov's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["FlowerEngine", "backend_config", "uses_cuda"]


def uses_cuda(cfg: Config) -> bool:
    """Whether the cooperatives train on a GPU (``runtime.device``, ``auto`` where one is present)."""
    if cfg.runtime.device == "cpu":
        return False
    import torch

    return cfg.runtime.device == "cuda" or torch.cuda.is_available()


def backend_config(cfg: Config, *, verbose: bool = False) -> dict[str, Any]:
    """Ray resources: each simulated cooperative gets CPUs and, on CUDA, a GPU fraction.

    Ray is told where to run: ``runtime.ray_address`` when set, else ``local``, a new
    instance of fedgov's own. Left to itself, ``ray.init`` would attach to whatever cluster
    ``RAY_ADDRESS`` or the last ``ray start`` recorded in Ray's temp folder names, and wait
    minutes for a head node that may have died long ago.
    """
    return {
        "client_resources": {
            "num_cpus": cfg.runtime.client_cpus,
            "num_gpus": cfg.runtime.client_gpu_fraction if uses_cuda(cfg) else 0.0,
        },
        "init_args": {"address": cfg.runtime.ray_address or "local", "logging_level": "ERROR",
                      "log_to_driver": verbose, "include_dashboard": False},
    }


class _HideRunSimulationDeprecation(logging.Filter):
    """Flower 1.42 marks ``run_simulation`` deprecated in favour of ``flwr run``. fedgov still
    calls it: only the in-process engine lets the ServerApp and ClientApp share fedgov's typed
    Config and progress callback (``flwr run`` serialises apps and config through a SuperLink,
    which fedgov also supports, see docs/deployment.md). The banner says nothing a fedgov user
    can act on, so this filter drops that one record and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


class FlowerEngine:
    """Runs a ServerApp and ClientApp with Flower's ``run_simulation``."""

    name = "flower"

    def __init__(self, cfg: Config, *, client_app_fn: Callable[[], ClientApp], num_nodes: int,
                 verbose: bool = False) -> None:
        self.cfg = cfg
        self.client_app_fn = client_app_fn
        self.num_nodes = num_nodes
        self.verbose = verbose

    def run(self, server_app: ServerApp) -> None:
        from flwr.simulation import run_simulation

        flwr_logger = logging.getLogger("flwr")
        if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_logger.filters):
            flwr_logger.addFilter(_HideRunSimulationDeprecation())
        run_simulation(server_app=server_app, client_app=self.client_app_fn(), num_supernodes=self.num_nodes,
                       backend_config=backend_config(self.cfg, verbose=self.verbose),
                       verbose_logging=self.verbose)

    def close(self) -> None:
        pass
