"""Flower ClientApp: each node is one data cooperative that keeps its own data.

This file is the honest cooperative: it translates query, train and evaluate Messages into
calls of ``fedgov.task`` and back. What a cooperative may do besides (miss a deadline, poison
its data or its update, lie about its size) is a mod around it (``fedgov.behaviours``), inside
the mechanisms' mods (``fedgov.mechanisms``).
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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from .client_errors import CODE_DECLINED, CODE_FAILED, exception_reason
from .config import Config
from .behaviours import behaviour_mods
from .mechanisms import mechanism_mods
from .node import Node, node_for
from .privacy import UNIT_WEIGHT_KEY
from .sampling import training_seed
from .strategies.governance import WEIGHT_KEY
from .task import evaluate, make_loader, train

__all__ = ["app", "build_client_app", "preload"]


def _handle_query(message: Message, node: Node) -> Message:
    stats = node.cooperative.stats()
    content = RecordDict({
        "cooperative": MetricRecord({
            "partition-id": node.cooperative.id,
            "num-examples": stats["num_examples"],
            "num-train": stats["num_train"],
            "num-test": stats["num_test"],
            "label-counts": [int(c) for c in stats["label_counts"]],
        }),
        "identity": ConfigRecord({"name": node.cooperative.name}),
    })
    return Message(content=content, reply_to=message)


def _train_model(model: torch.nn.Module, node: Node, context: Context, round_config: Mapping[str, Any]
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
    x, y = node.training_data()
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
    return {
        "num-examples": len(coop.train),
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


def _handle_train(message: Message, node: Node, context: Context) -> Message:
    model = node.model_from(message)
    try:
        metrics = _train_model(model, node, context, message.content["config"])
    except _declines(node.config) as exc:
        return Message(Error(code=CODE_DECLINED, reason=str(exc)), reply_to=message)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def _declines(cfg: Config) -> tuple[type[Exception], ...]:
    """What makes an honest cooperative sit a round out: a spent DP-SGD budget (a missed deadline is
    the deadline mod's, ``fedgov.behaviours``)."""
    if cfg.privacy.dp != "sample":  # Opacus is loaded only under DP-SGD
        return ()
    from .privacy.dp_sgd import BudgetExhausted

    return (BudgetExhausted,)


def _handle_evaluate(message: Message, node: Node) -> Message:
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
    # The honest cooperative, inside what a cooperative may do besides (fedgov.behaviours: deadlines,
    # attacks), inside the client halves of the run's mechanisms (fedgov.mechanisms): encryption,
    # masking and clipping wrap what the cooperative, honest or not, returns.
    client_app = ClientApp(mods=[report_failures, mechanism_mods(config), *behaviour_mods(config)])

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        return _handle_query(message, node_for(context, config))

    @client_app.train()
    def train_(message: Message, context: Context) -> Message:
        return _handle_train(message, node_for(context, config), context)

    @client_app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return _handle_evaluate(message, node_for(context, config))

    return client_app


app = build_client_app()
