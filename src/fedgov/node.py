"""A cooperative's node as the ClientApp and its mods see it for one message: the run's config
and federation (built once per process and config), the cooperative the node holds, its device,
whether it is one of the run's attackers, and the data it trains on.

Shared by the honest app (``fedgov.client_app``) and the behaviour mods around it
(``fedgov.behaviours``), which is why it is a module of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from flwr.app import Context, Message

from .arrays import record_to_numpy
from .config import Config
from .data import Cooperative, build_federation
from .decryption import extra_nodes
from .models import build_model
from .task import resolve_device

__all__ = ["Node", "node_for", "training_data"]

# What this message trains on when a mod substitutes it (data poisoning); None: the cooperative's own.
_TRAINING_DATA: ContextVar[tuple[np.ndarray, np.ndarray] | None] = ContextVar("fedgov_training_data", default=None)


class RunSide:
    """What every node of one run shares in a process: its config, federation, device and attackers,
    and one resident model that each message's arrays are loaded into (built once, not per message)."""

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.federation = build_federation(cfg.data, seed=cfg.seed)
        self.device = resolve_device(cfg.runtime.device)
        self.attackers: list[int] = []
        if cfg.attack.fraction > 0 or cfg.attack.cooperatives:
            from .attacks import select_attackers

            self.attackers = select_attackers(self.federation.num_cooperatives, fraction=cfg.attack.fraction,
                                              cooperatives=cfg.attack.cooperatives, seed=cfg.seed)
        self.attacker_set = frozenset(self.attackers)
        self._model: torch.nn.Module | None = None

    def new_model(self) -> torch.nn.Module:
        cfg = self.config
        return build_model(cfg.model.name, input_shape=self.federation.input_shape,
                           num_classes=self.federation.num_classes, hidden=cfg.model.hidden)

    def model_from(self, message: Message) -> torch.nn.Module:
        """The model the message carries. DP-SGD gets a fresh one: Opacus hooks the model it trains."""
        if self.config.privacy.dp == "sample":
            model = self.new_model()
        else:
            if self._model is None:
                self._model = self.new_model()
            model = self._model
        state = {name: torch.from_numpy(value.copy()) for name, value in
                 record_to_numpy(message.content["arrays"]).items()}
        model.load_state_dict(state)
        return model


_RUN_SIDES: dict[object, RunSide] = {}


def run_side(context: Context, config: Config | None) -> RunSide:
    """The process's :class:`RunSide` for this config (``config`` None: the message's run config)."""
    key: object = id(config) if config is not None else tuple(sorted(context.run_config.items()))
    side = _RUN_SIDES.get(key)
    if side is None or (config is not None and side.config is not config):
        if len(_RUN_SIDES) > 8:
            _RUN_SIDES.clear()
        side = _RUN_SIDES[key] = RunSide(config if config is not None else Config.from_flat(context.run_config))
    return side


class Node:
    """What a node needs for one message: its config, cooperative and device."""

    def __init__(self, context: Context, config: Config | None) -> None:
        side = self.side = run_side(context, config)
        self.config = cfg = side.config
        self.federation = side.federation
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config.get("num-partitions", self.federation.num_cooperatives))
        # In simulation the custodian, when there is one, is the engine's last node: one partition more.
        # On the Deployment Engine each SuperNode counts the cooperatives only, as docs/deployment.md says.
        cooperatives = self.federation.num_cooperatives
        if num_partitions not in (cooperatives, cooperatives + extra_nodes(cfg)) or not (
                0 <= partition_id < cooperatives):
            raise ValueError(
                f"node config partition-id={partition_id} num-partitions={num_partitions} does not fit "
                f"the run's {self.federation.num_cooperatives} cooperatives (data.num_cooperatives)")
        self.cooperative: Cooperative = self.federation.cooperatives[partition_id]
        self.device = side.device
        self.attackers = side.attackers
        self.malicious = partition_id in side.attacker_set
        # Simulated clients share the machine's cores; one thread each avoids oversubscription
        # and keeps CPU results reproducible.
        torch.set_num_threads(1)

    def model_from(self, message: Message) -> torch.nn.Module:
        return self.side.model_from(message)

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) this message trains on: the cooperative's training split, unless a mod substituted it."""
        substituted = _TRAINING_DATA.get()
        return substituted if substituted is not None else (self.cooperative.train.x, self.cooperative.train.y)


def node_for(context: Context, config: Config | None) -> Node:
    """The node handling this message (``config`` None: the message's run config)."""
    return Node(context, config)


@contextmanager
def training_data(x: np.ndarray, y: np.ndarray) -> Iterator[None]:
    """Within this block the node trains on (x, y) instead of its own split (a data-poisoning mod)."""
    token = _TRAINING_DATA.set((x, y))
    try:
        yield
    finally:
        _TRAINING_DATA.reset(token)
