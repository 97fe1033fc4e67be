"""Flower ClientApp: each node is one data cooperative that keeps its own data.

This file only translates Messages into calls of ``fedgov.task`` and back.
Node identity comes from ``context.node_config`` (``partition-id``), run-wide
settings from ``context.run_config`` (or the Config handed to
``build_client_app`` by ``fedgov.simulate``), per-round values from the message.
"""

from __future__ import annotations

import time
import traceback
from logging import ERROR
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from .arrays import record_to_numpy
from .client_errors import CODE_DECLINED, CODE_FAILED, exception_reason
from .config import Config
from .data import Cooperative, build_federation
from .decryption import extra_nodes
from .mechanisms import mechanism_mods
from .models import build_model
from .privacy import UNIT_WEIGHT_KEY
from .sampling import training_seed
from .strategies.governance import WEIGHT_KEY
from .task import evaluate, make_loader, resolve_device, train

__all__ = ["app", "build_client_app", "preload"]


class _RunSide:
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


_RUN_SIDES: dict[object, _RunSide] = {}


def _run_side(context: Context, config: Config | None) -> _RunSide:
    """The process's :class:`_RunSide` for this config (``config`` None: the message's run config)."""
    key: object = id(config) if config is not None else tuple(sorted(context.run_config.items()))
    side = _RUN_SIDES.get(key)
    if side is None or (config is not None and side.config is not config):
        if len(_RUN_SIDES) > 8:
            _RUN_SIDES.clear()
        side = _RUN_SIDES[key] = _RunSide(config if config is not None else Config.from_flat(context.run_config))
    return side


class _Node:
    """What a node needs for one message: its config, cooperative and device."""

    def __init__(self, context: Context, config: Config | None) -> None:
        side = self.side = _run_side(context, config)
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

    def claimed(self, num_examples: int) -> int:
        """The data size this cooperative reports: a lying one overstates it (attack.size_claim).

        Under HE a liar needs no false claim: it scales its update inside the ciphertext,
        where the aggregator cannot see it (``fedgov.mechanisms.he``).
        """
        lies = self.malicious and self.config.secure.aggregation != "he"
        return round(num_examples * self.config.attack.size_claim) if lies else num_examples

    def model_from(self, message: Message) -> torch.nn.Module:
        return self.side.model_from(message)


def _handle_query(message: Message, node: _Node) -> Message:
    stats = node.cooperative.stats()
    content = RecordDict({
        "cooperative": MetricRecord({
            "partition-id": node.cooperative.id,
            "num-examples": node.claimed(stats["num_examples"]),
            "num-train": node.claimed(stats["num_train"]),
            "num-test": stats["num_test"],
            "label-counts": [int(c) for c in stats["label_counts"]],
        }),
        "identity": ConfigRecord({"name": node.cooperative.name}),
    })
    return Message(content=content, reply_to=message)


def _train_model(model: torch.nn.Module, node: _Node, context: Context, round_config: Mapping[str, Any]
                 ) -> dict[str, float]:
    """Local training of ``model`` in place (plain SGD or DP-SGD); returns the round's metrics.

    Shared by the plain path and the SecAgg+ path. Raises BudgetExhausted when DP-SGD's budget is spent.
    """
    cfg = node.config
    server_round = int(round_config.get("server-round", 0))
    coop = node.cooperative
    seed = training_seed(cfg.seed, server_round, coop.id)
    started = time.perf_counter()
    extra: dict[str, float] = {}
    speed = _check_deadline(node)
    if speed is not None:
        extra["compute_speed"] = speed
    x, y = coop.train.x, coop.train.y
    attacking = _attacking(node, server_round)
    if attacking:
        from .attacks import poison_training_data, trigger_for

        rng = np.random.default_rng([cfg.seed, server_round, coop.id, 0xBAD])
        x, y = poison_training_data(cfg.attack.kind, x, y, num_classes=coop.num_classes,
                                    target_label=cfg.attack.target_label,
                                    trigger=trigger_for(node.federation, size=cfg.attack.trigger_size),
                                    poison_fraction=cfg.attack.poison_fraction, rng=rng)
        received = [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]
    if cfg.strategy.name == "qfedavg":  # q-FedAvg needs the loss of the *received* model
        extra["train_loss"] = evaluate(model, x, y, device=node.device).loss
    if cfg.privacy.dp == "sample":
        from .mechanisms.dp_sgd import train_privately

        result, privacy = train_privately(model, cfg=cfg, context=context, seed=seed, x=x, y=y,
                                          round_config=round_config, device=node.device)
        extra.update(privacy)
    else:
        loader = make_loader(x, y, batch_size=cfg.train.batch_size, shuffle=True, seed=seed)
        epochs = _local_epochs(cfg.train.local_epochs, round_config, coop.id)
        extra["local_epochs"] = epochs  # every reply carries it: Flower averages only metrics all replies share
        result = train(model, loader, epochs=epochs, lr=cfg.train.lr,
                       momentum=cfg.train.momentum, device=node.device,
                       proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    if attacking:
        _poison_model(model, received, node, server_round)
    return {
        "num-examples": node.claimed(len(coop.train)),
        UNIT_WEIGHT_KEY: 1,
        "partition-id": coop.id,
        "local_loss": result.train_loss,
        "steps": result.steps,
        "seconds_local_train": time.perf_counter() - started,
        **extra,
    }


def _local_epochs(epochs: int, round_config: Mapping[str, Any], cooperative: int) -> int:
    """``train.local_epochs``, or fewer when the server names this cooperative a straggler that keeps its work."""
    stragglers = list(round_config.get("stragglers", []))
    if cooperative in stragglers:
        return int(list(round_config.get("straggler-epochs", []))[stragglers.index(cooperative)])
    return epochs


def _check_deadline(node: _Node) -> float | None:
    """This cooperative's compute speed (None when all are equal); raises MissedDeadline when too slow."""
    from .heterogeneity import MissedDeadline, compute_speeds, local_steps, misses_deadline

    h, cfg = node.config.heterogeneity, node.config
    if h.compute == "off" and h.deadline <= 0:
        return None
    coop = node.cooperative
    speed = float(compute_speeds(h, node.federation.num_cooperatives, seed=cfg.seed)[coop.id])
    steps = local_steps(num_examples=len(coop.train), batch_size=cfg.train.batch_size, epochs=cfg.train.local_epochs)
    needed = misses_deadline(h, steps=steps, speed=speed)
    if needed is not None:
        raise MissedDeadline(f"cooperative {coop.id} missed the round deadline: its {steps} local steps take "
                             f"{needed:.2f} s at compute speed {speed:.2g}, the deadline is {h.deadline:g} s")
    return speed


def _attacking(node: _Node, server_round: int) -> bool:
    from .attacks import is_active

    cfg = node.config
    return cfg.attack.kind != "off" and is_active(kind=cfg.attack.kind, attacker=node.malicious,
                                                   server_round=server_round, start_round=cfg.attack.start_round)


def _poison_model(model: torch.nn.Module, received: list[np.ndarray], node: _Node, server_round: int) -> None:
    """Replace the trained model by received + poisoned update (model replacement, noise)."""
    from .attacks import poison_update

    cfg = node.config
    if cfg.attack.kind not in ("model_replacement", "noise"):
        return
    state = model.state_dict()
    delta = [t.detach().cpu().numpy() - r for t, r in zip(state.values(), received)]
    boost = cfg.attack.boost or cfg.strategy.cohort_size(node.federation.num_cooperatives) / max(
        1, len(node.attackers))
    rng = np.random.default_rng([cfg.seed, server_round, node.cooperative.id, 0x4015E])
    poisoned = poison_update(cfg.attack.kind, delta, boost=boost, noise_std=cfg.attack.noise_std, rng=rng)
    model.load_state_dict({name: torch.from_numpy(np.asarray(r + d, dtype=r.dtype))
                           for (name, _), r, d in zip(state.items(), received, poisoned)})


def _handle_train(message: Message, node: _Node, context: Context) -> Message:
    model = node.model_from(message)
    try:
        metrics = _train_model(model, node, context, message.content["config"])
    except _declines(node.config) as exc:
        return Message(Error(code=CODE_DECLINED, reason=str(exc)), reply_to=message)
    if node.malicious and node.config.secure.aggregation == "he" and node.config.attack.size_claim != 1.0:
        # Under HE a liar needs no false claim: its own HE mod scales the update inside the ciphertext.
        from .mechanisms.he import SIZE_LIE_KEY

        metrics[SIZE_LIE_KEY] = node.config.attack.size_claim
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def _declines(cfg: Config) -> tuple[type[Exception], ...]:
    """What makes a cooperative sit a round out: a missed deadline, a spent DP-SGD budget."""
    from .heterogeneity import MissedDeadline

    if cfg.privacy.dp != "sample":  # Opacus is loaded only under DP-SGD
        return (MissedDeadline,)
    from .privacy.dp_sgd import BudgetExhausted

    return (MissedDeadline, BudgetExhausted)


def _handle_evaluate(message: Message, node: _Node) -> Message:
    model = node.model_from(message)
    coop = node.cooperative
    started = time.perf_counter()
    result = evaluate(model, coop.test.x, coop.test.y, device=node.device)
    seconds = time.perf_counter() - started
    on_train = evaluate(model, coop.train.x, coop.train.y, device=node.device)  # the papers' training loss
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        UNIT_WEIGHT_KEY: 1,
        WEIGHT_KEY: result.num_examples,  # strategies average evaluation metrics by the governance weight key
        "partition-id": coop.id,
        "eval_loss": result.loss,
        "eval_acc": result.accuracy,
        "train_loss": on_train.loss,
        "num-train": on_train.num_examples,
        "seconds_local_evaluate": seconds,
    })
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


def report_failures(message: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Outermost mod: whatever a cooperative raises becomes one clean error reply.

    The aggregator records the cause as raised (no engine wrapper, no colour codes) and the
    round goes on; the full traceback goes to this node's own log (the SuperNode's, or with
    ``fedgov.simulate --verbose`` the terminal).
    """
    try:
        return call_next(message, context)
    except Exception as exc:  # noqa: BLE001 (a broken cooperative must not take the engine's error path)
        partition = context.node_config.get("partition-id", "?")
        log(ERROR, "fedgov: cooperative %s failed on a %s message:\n%s", partition,
            message.metadata.message_type, traceback.format_exc())
        return Message(Error(code=CODE_FAILED, reason=exception_reason(exc)), reply_to=message)


def preload(cfg: Config) -> None:
    """Import, in this process, what the cooperatives of ``cfg`` will use, so that workers forked from it
    start ready: torch builds its first optimizer through ``torch._dynamo`` (seconds to import),
    DP-SGD needs Opacus, HE TenSEAL, SecAgg+ Flower's legacy stack."""
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    mechanism_mods(cfg)
    from . import heterogeneity  # noqa: F401

    if cfg.privacy.dp == "sample":
        import opacus  # noqa: F401

        from .privacy import dp_sgd  # noqa: F401
    if cfg.secure.aggregation == "he":
        from . import crypto  # noqa: F401
    if cfg.secure.aggregation == "secagg+":
        from .crypto import secagg  # noqa: F401
    if cfg.attack.kind != "off":
        from . import attacks  # noqa: F401


def build_client_app(config: Config | None = None) -> ClientApp:
    """The ClientApp; with ``config`` it ignores ``context.run_config`` (used by fedgov.simulate)."""
    # The honest cooperative, inside the client halves of the run's mechanisms (fedgov.mechanisms):
    # encryption, masking and clipping wrap what it returns.
    client_app = ClientApp(mods=[report_failures, mechanism_mods(config)])

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        return _handle_query(message, _Node(context, config))

    @client_app.train()
    def train_(message: Message, context: Context) -> Message:
        return _handle_train(message, _Node(context, config), context)

    @client_app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return _handle_evaluate(message, _Node(context, config))

    return client_app


app = build_client_app()
