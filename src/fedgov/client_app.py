"""Flower ClientApp: each node is one data cooperative that keeps its own data.

This file only translates Messages into calls of ``fedgov.task`` and back.
Node identity comes from ``context.node_config`` (``partition-id``), run-wide
settings from ``context.run_config`` (or the Config handed to
``build_client_app`` by ``fedgov.simulate``), per-round values from the message.
"""

from __future__ import annotations

import math
import time
import traceback
from logging import ERROR
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .client_errors import CODE_DECLINED, CODE_FAILED, exception_reason
from .config import Config
from .data import Cooperative, build_federation
from .decryption import REQUEST_KEY, answer_decrypt_request, custodian_query, extra_nodes, is_custodian_node
from .models import build_model
from .privacy import UNIT_WEIGHT_KEY
from .strategies.governance import WEIGHT_KEY
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
        # In simulation the custodian, when there is one, is the engine's last node: one partition more.
        if num_partitions - extra_nodes(cfg) != self.federation.num_cooperatives or not (
                0 <= partition_id < self.federation.num_cooperatives):
            raise ValueError(
                f"node config partition-id={partition_id} num-partitions={num_partitions} does not fit "
                f"the run's {self.federation.num_cooperatives} cooperatives (data.num_cooperatives)")
        self.cooperative: Cooperative = self.federation.cooperatives[partition_id]
        self.device = resolve_device(cfg.runtime.device)
        self.attackers: list[int] = []
        if cfg.attack.fraction > 0 or cfg.attack.cooperatives:
            from .attacks import select_attackers

            self.attackers = select_attackers(self.federation.num_cooperatives, fraction=cfg.attack.fraction,
                                              cooperatives=cfg.attack.cooperatives, seed=cfg.seed)
        self.malicious = partition_id in self.attackers
        # Simulated clients share the machine's cores; one thread each avoids oversubscription
        # and keeps CPU results reproducible.
        torch.set_num_threads(1)

    def claimed(self, num_examples: int) -> int:
        """The data size this cooperative reports: a lying one overstates it (attack.size_claim).

        Under HE a liar needs no false claim: it scales its update inside the ciphertext,
        where the aggregator cannot see it (see ``_encrypted_reply``).
        """
        lies = self.malicious and self.config.secure.aggregation != "he"
        return round(num_examples * self.config.attack.size_claim) if lies else num_examples

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
            "num-examples": node.claimed(stats["num_examples"]),
            "num-train": node.claimed(stats["num_train"]),
            "num-test": stats["num_test"],
            "label-counts": [int(c) for c in stats["label_counts"]],
        }),
        "identity": ConfigRecord({"name": node.cooperative.name}),
    })
    return Message(content=content, reply_to=message)


_LEDGER_KEY = "fedgov.privacy"


def _train_private(model: torch.nn.Module, node: _Node, context: Context, seed: int, x: np.ndarray, y: np.ndarray,
                   round_config: Mapping[str, Any]) -> tuple[TrainResult, dict[str, float]]:
    """DP-SGD with a ledger that survives between rounds in ``context.state``.

    After ``--resume`` (a new Flower run: empty ``context.state``) the first train message
    carries the spends the aggregator recorded in its checkpoint (``fedgov.privacy.resume``).
    Trust assumption: the cooperative adopts that record as its past spending; it checks
    only that each spend is a valid mechanism. Its noise multiplier, delta and budget come
    from its own config, never from the message.
    """
    from .privacy.accounting import PrivacyLedger, RoundSpend, default_delta
    from .privacy.dp_sgd import plan_round, train_private
    from .privacy.resume import RECORDED_LEDGER_KEY, decode_spends
    cfg = node.config
    n = len(y)
    if _LEDGER_KEY in context.state:
        ledger = PrivacyLedger.from_json(str(context.state[_LEDGER_KEY]["ledger"]))
    else:
        ledger = PrivacyLedger(delta=cfg.privacy.delta or default_delta(n),
                               budget=cfg.privacy.target_epsilon or math.inf)
        recorded = round_config.get(RECORDED_LEDGER_KEY)
        if recorded is not None:
            ledger.spends = [RoundSpend(*spend) for spend in decode_spends(str(recorded))]
        context.state[_LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
    # Noise and Poisson sampling from the OS's randomness unless privacy.seeded_noise (then from the seed).
    noise_seed = seed if cfg.privacy.seeded_noise else None
    spend = plan_round(ledger, num_examples=n, batch_size=cfg.train.batch_size, epochs=cfg.train.local_epochs,
                       rounds=cfg.train.rounds, noise_multiplier=cfg.privacy.noise_multiplier,
                       target_epsilon=cfg.privacy.target_epsilon)  # raises BudgetExhausted
    result = train_private(model, x, y, spend=spend, batch_size=cfg.train.batch_size,
                           epochs=cfg.train.local_epochs, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           max_grad_norm=cfg.privacy.max_grad_norm, grad_sample_mode=cfg.privacy.grad_sample_mode,
                           device=node.device, seed=noise_seed)
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
        result, privacy = _train_private(model, node, context, seed, x, y, round_config)
        extra.update(privacy)
    else:
        loader = make_loader(x, y, batch_size=cfg.train.batch_size, shuffle=True, seed=seed)
        result = train(model, loader, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
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
    from .config import cohort_size

    cfg = node.config
    if cfg.attack.kind not in ("model_replacement", "noise"):
        return
    state = model.state_dict()
    delta = [t.detach().cpu().numpy() - r for t, r in zip(state.values(), received)]
    boost = cfg.attack.boost or cohort_size(cfg.strategy.fraction_train, node.federation.num_cooperatives) / max(
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
    # The weight the aggregator assigned. A lying cooperative declares it, but scales its update
    # inside the ciphertext by attack.size_claim: its influence grows and nobody can see it.
    weight = float(message.content["config"]["he-weight"])
    scale = node.config.attack.size_claim if node.malicious else 1.0
    if scale != 1.0:
        delta = [d * scale for d in delta]
    from .crypto import CheckStamp
    from .crypto.keys import load_check_key

    started = time.perf_counter()
    stamp = CheckStamp(load_check_key(node.config.secure.key_dir), int(message.content["config"]["server-round"]),
                       node.cooperative.id)
    update = encrypt_update(delta, context=_he_context(node.config), weight=weight, workers=1, check=stamp)
    metrics = {**metrics, "seconds_encrypt": time.perf_counter() - started, "he_weight": weight,
               "he_applied_weight": weight * scale}  # the latter: simulation ground truth, for measurement
    if update.num_clipped is not None:  # compact (quantized) preset only
        metrics["he_clipped"] = update.num_clipped
    records = {"he-update": ArrayRecord({"ciphertext": Array(update.to_numpy())}),
               "metrics": MetricRecord(metrics)}
    if node.config.secure.verify:  # measurement only: lets the server compute the HE error
        records["verify"] = ArrayRecord({str(i): Array(weight * d) for i, d in enumerate(delta)})
    return Message(content=RecordDict(records), reply_to=message)


def _declines(cfg: Config) -> tuple[type[Exception], ...]:
    """What makes a cooperative sit a round out: a missed deadline, a spent DP-SGD budget."""
    from .heterogeneity import MissedDeadline

    if cfg.privacy.dp != "sample":  # Opacus is loaded only under DP-SGD
        return (MissedDeadline,)
    from .privacy.dp_sgd import BudgetExhausted

    return (MissedDeadline, BudgetExhausted)


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
        WEIGHT_KEY: result.num_examples,  # strategies average evaluation metrics by the governance weight key
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


def build_client_app(config: Config | None = None) -> ClientApp:
    """The ClientApp; with ``config`` it ignores ``context.run_config`` (used by fedgov.simulate)."""
    client_app = ClientApp(mods=[report_failures, clip_when_asked])

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        cfg = config if config is not None else Config.from_flat(context.run_config)
        federation = build_federation(cfg.data, seed=cfg.seed)
        if is_custodian_node(context, cfg, federation.num_cooperatives):
            return custodian_query(message, context, cfg)
        if REQUEST_KEY in message.content:  # key holder "clients": this cooperative decrypts the round's sum
            from .crypto.keys import load_check_key

            return answer_decrypt_request(message, context, keys=_he_context(cfg),
                                          check_key=load_check_key(cfg.secure.key_dir))
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
