"""Flower ClientApp: each node is one data cooperative that keeps its own data.

This file only translates Messages into calls of ``fedgov.task`` and back.
Node identity comes from ``context.node_config`` (``partition-id``), run-wide
settings from ``context.run_config`` (or the Config handed to
``build_client_app`` by ``fedgov.simulate``), per-round values from the message.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .config import Config
from .data import Cooperative, build_federation
from .models import build_model
from .privacy import UNIT_WEIGHT_KEY
from .task import TrainResult, evaluate, make_loader, resolve_device, train

__all__ = ["app", "build_client_app"]


class _Node:
    """What a node needs for one message: its config, cooperative and device."""

    def __init__(self, context: Context, config: Config | None) -> None:
        self.config = config if config is not None else Config.from_flat(context.run_config)
        cfg = self.config
        self.federation = build_federation(cfg.data, seed=cfg.seed)
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config.get("num-partitions", self.federation.num_cooperatives))
        if num_partitions != self.federation.num_cooperatives or not (
                0 <= partition_id < self.federation.num_cooperatives):
            raise ValueError(
                f"node config partition-id={partition_id} num-partitions={num_partitions} does not fit "
                f"the run's {self.federation.num_cooperatives} cooperatives (data.num_cooperatives)")
        self.cooperative: Cooperative = self.federation.cooperatives[partition_id]
        self.device = resolve_device(cfg.runtime.device)
        # Simulated clients share the machine's cores; one thread each avoids oversubscription
        # and keeps CPU results reproducible.
        torch.set_num_threads(1)

    def model_from(self, message: Message) -> torch.nn.Module:
        cfg = self.config
        model = build_model(cfg.model.name, input_shape=self.federation.input_shape,
                            num_classes=self.federation.num_classes, hidden=cfg.model.hidden)
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        return model

    def model_from_arrays(self, arrays: list) -> torch.nn.Module:
        """The model from unnamed numpy arrays in state_dict order (SecAgg+'s legacy messages)."""
        cfg = self.config
        model = build_model(cfg.model.name, input_shape=self.federation.input_shape,
                            num_classes=self.federation.num_classes, hidden=cfg.model.hidden)
        names = list(model.state_dict())
        if len(names) != len(arrays):
            raise ValueError(f"received {len(arrays)} arrays for a model with {len(names)}")
        model.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays)})
        return model


def _handle_query(message: Message, node: _Node) -> Message:
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


# Error code of a reply from a cooperative that sits the round out (budget spent).
CODE_DECLINED = 1001
_LEDGER_KEY = "fedgov.privacy"


def _train_private(model: torch.nn.Module, node: _Node, context: Context, seed: int
                   ) -> tuple[TrainResult, dict[str, float]]:
    """DP-SGD with a ledger that survives between rounds in ``context.state``."""
    from .privacy.accounting import PrivacyLedger, default_delta
    from .privacy.dp_sgd import plan_round, train_private
    cfg, coop = node.config, node.cooperative
    n = len(coop.train.y)
    if _LEDGER_KEY in context.state:
        ledger = PrivacyLedger.from_json(str(context.state[_LEDGER_KEY]["ledger"]))
    else:
        ledger = PrivacyLedger(delta=cfg.privacy.delta or default_delta(n),
                               budget=cfg.privacy.target_epsilon or math.inf)
    spend = plan_round(ledger, num_examples=n, batch_size=cfg.train.batch_size, epochs=cfg.train.local_epochs,
                       rounds=cfg.train.rounds, noise_multiplier=cfg.privacy.noise_multiplier,
                       target_epsilon=cfg.privacy.target_epsilon)  # raises BudgetExhausted
    result = train_private(model, coop.train.x, coop.train.y, spend=spend, batch_size=cfg.train.batch_size,
                           epochs=cfg.train.local_epochs, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           max_grad_norm=cfg.privacy.max_grad_norm, grad_sample_mode=cfg.privacy.grad_sample_mode,
                           device=node.device, seed=seed)
    ledger.record(result.spend)
    context.state[_LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
    return result.train, {
        "dp_epsilon": ledger.epsilon,
        "dp_delta": ledger.delta,
        "dp_noise_multiplier": result.spend.noise_multiplier,
        "dp_sample_rate": result.spend.sample_rate,
        "dp_steps": result.spend.steps,
    }


def _train_model(model: torch.nn.Module, node: _Node, context: Context, round_config: Mapping[str, Any]
                 ) -> dict[str, float]:
    """Local training of ``model`` in place (plain SGD or DP-SGD); returns the round's metrics.

    Shared by the plain path and the SecAgg+ path. Raises BudgetExhausted when DP-SGD's budget is spent.
    """
    cfg = node.config
    server_round = int(round_config.get("server-round", 0))
    coop = node.cooperative
    seed = cfg.seed * 1_000_003 + server_round * 1_009 + coop.id
    started = time.perf_counter()
    extra: dict[str, float] = {}
    if cfg.strategy.name == "qfedavg":  # q-FedAvg needs the loss of the *received* model
        extra["train_loss"] = evaluate(model, coop.train.x, coop.train.y, device=node.device).loss
    if cfg.privacy.dp == "sample":
        result, privacy = _train_private(model, node, context, seed)
        extra.update(privacy)
    else:
        loader = make_loader(coop.train.x, coop.train.y, batch_size=cfg.train.batch_size, shuffle=True, seed=seed)
        result = train(model, loader, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                       momentum=cfg.train.momentum, device=node.device,
                       proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    return {
        "num-examples": result.num_examples,
        UNIT_WEIGHT_KEY: 1,
        "partition-id": coop.id,
        "local_loss": result.train_loss,
        "steps": result.steps,
        "seconds_local_train": time.perf_counter() - started,
        **extra,
    }


def _handle_train(message: Message, node: _Node, context: Context) -> Message:
    model = node.model_from(message)
    try:
        metrics = _train_model(model, node, context, message.content["config"])
    except _declines(node.config) as exc:
        return Message(Error(code=CODE_DECLINED, reason=str(exc)), reply_to=message)
    if node.config.secure.aggregation == "he":
        return _encrypted_reply(message, node, model, metrics)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def _he_context(cfg: Config):  # noqa: ANN202
    """The cooperatives' HE context: the shared secret keys, or the custodian's public context."""
    from .crypto import PublicContext, SecretKeys
    from .crypto.keys import COOPERATIVE_CONTEXT, COOPERATIVE_KEYS

    key_dir = Path(cfg.secure.key_dir)
    if cfg.secure.key_holder == "clients":
        return SecretKeys.from_bytes((key_dir / COOPERATIVE_KEYS).read_bytes())
    return PublicContext.from_bytes((key_dir / COOPERATIVE_CONTEXT).read_bytes())


def _encrypted_reply(message: Message, node: _Node, model: torch.nn.Module, metrics: dict[str, float]) -> Message:
    """Encrypt the weighted update (new - received weights); the FedAvg weight is applied here."""
    from .crypto import encrypt_update

    received = [a.numpy() for a in message.content["arrays"].values()]
    trained = [t.detach().cpu().numpy() for t in model.state_dict().values()]
    delta = [(t - r).astype(np.float64) for t, r in zip(trained, received)]
    cohort_examples = float(message.content["config"]["cohort-examples"])
    weight = metrics["num-examples"] / cohort_examples
    started = time.perf_counter()
    update = encrypt_update(delta, context=_he_context(node.config), weight=weight, workers=1)
    metrics = {**metrics, "seconds_encrypt": time.perf_counter() - started, "he_weight": weight}
    if update.num_clipped is not None:  # compact (quantized) preset only
        metrics["he_clipped"] = update.num_clipped
    records = {"he-update": ArrayRecord({"ciphertext": Array(update.to_numpy())}),
               "metrics": MetricRecord(metrics)}
    if node.config.secure.verify:  # measurement only: lets the server compute the HE error
        records["verify"] = ArrayRecord({str(i): Array(weight * d) for i, d in enumerate(delta)})
    return Message(content=RecordDict(records), reply_to=message)


def _handle_decrypt(message: Message, node: _Node) -> Message:
    """A key-holding cooperative decrypts an aggregate (key holder 'clients'), never one update."""
    from .crypto import EncryptedUpdate, decrypt_aggregate

    started = time.perf_counter()
    aggregate = EncryptedUpdate.from_bytes(message.content["he-aggregate"]["ciphertext"].numpy())
    if aggregate.contributors < 2:
        return Message(Error(code=CODE_DECLINED, reason="refusing to decrypt fewer than 2 updates"),
                       reply_to=message)
    arrays = decrypt_aggregate(aggregate, keys=_he_context(node.config))
    content = RecordDict({"arrays": ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)}),
                          "metrics": MetricRecord({"seconds_decrypt": time.perf_counter() - started})})
    return Message(content=content, reply_to=message)


def _declines(cfg: Config) -> tuple[type[Exception], ...]:
    """What makes a cooperative sit a round out: a spent DP-SGD budget (Opacus loaded only under DP-SGD)."""
    if cfg.privacy.dp != "sample":
        return ()
    from .privacy.dp_sgd import BudgetExhausted

    return (BudgetExhausted,)


def _handle_secagg(message: Message, context: Context, config: Config | None) -> Message | None:
    """A SecAgg+ stage (fedgov.crypto.secagg) when the run uses SecAgg+, else None.

    All four stages are TRAIN messages; only ``collect_masked_vectors`` trains, with the
    same ``_train_model`` as the plain path.
    """
    cfg = config if config is not None else Config.from_flat(context.run_config)
    if cfg.secure.aggregation != "secagg+":
        return None
    from .crypto.secagg import is_secagg_message, secagg_train

    if not is_secagg_message(message):
        return None

    def fit(arrays: list, round_config: dict[str, Any]) -> tuple[list, int, dict[str, float]]:
        node = _Node(context, cfg)
        model = node.model_from_arrays(arrays)
        metrics = _train_model(model, node, context, round_config)
        return [t.detach().cpu().numpy() for t in model.state_dict().values()], int(metrics["num-examples"]), metrics

    return secagg_train(message, context, fit=fit, declined={kind: CODE_DECLINED for kind in _declines(cfg)},
                        verify=cfg.secure.verify)


def _handle_evaluate(message: Message, node: _Node) -> Message:
    model = node.model_from(message)
    coop = node.cooperative
    result = evaluate(model, coop.test.x, coop.test.y, device=node.device)
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        UNIT_WEIGHT_KEY: 1,
        "partition-id": coop.id,
        "eval_loss": result.loss,
        "eval_acc": result.accuracy,
    })
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


def clip_when_asked(message: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Flower's client-side clipping mod, only on train messages that carry a clipping norm.

    (``privacy.dp = 'user'`` with ``privacy.clipping_side = 'client'``; the bare mod would
    reject every other message.)
    """
    if message.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in message.content.get(
            "config", {}):
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


def build_client_app(config: Config | None = None) -> ClientApp:
    """The ClientApp; with ``config`` it ignores ``context.run_config`` (used by fedgov.simulate)."""
    client_app = ClientApp(mods=[clip_when_asked])

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        if "he-aggregate" in message.content:
            return _handle_decrypt(message, _Node(context, config))
        return _handle_query(message, _Node(context, config))

    @client_app.train()
    def train_(message: Message, context: Context) -> Message:
        if (reply := _handle_secagg(message, context, config)) is not None:
            return reply
        return _handle_train(message, _Node(context, config), context)

    @client_app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return _handle_evaluate(message, _Node(context, config))

    return client_app


app = build_client_app()
