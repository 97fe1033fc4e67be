"""What a cooperative may do besides honest training, each as a Flower mod around the honest
ClientApp (``fedgov.client_app``): miss a compute deadline, lie about its size, poison the data
it trains on, or poison the update it sends. A sleeper is any attack with a later
``attack.start_round``.

The mods sit inside the mechanisms' mods (``fedgov.mechanisms``), so encryption, masking and
clipping wrap what the cooperative, honest or not, returns, as they would on its own machine.
Each mod leaves a message alone unless the config and the node make it apply; the plain
PyTorch and NumPy arithmetic of attacks is in ``fedgov.attacks``, of compute tiers in
``fedgov.heterogeneity``. A new behaviour is one mod here and one line in :data:`BEHAVIOURS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType

from .arrays import record_to_numpy
from .client_errors import CODE_DECLINED
from .config import Config
from .node import Node, node_for, training_data

__all__ = ["BEHAVIOURS", "behaviour_mods"]

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def _is_train(message: Message) -> bool:
    return message.metadata.message_type == MessageType.TRAIN


def _server_round(message: Message) -> int:
    return int(message.content["config"].get("server-round", 0))


def _attacking(node: Node, server_round: int) -> bool:
    from .attacks import is_active

    cfg = node.config
    return cfg.attack.kind != "off" and is_active(kind=cfg.attack.kind, attacker=node.malicious,
                                                   server_round=server_round, start_round=cfg.attack.start_round)


def deadline_mod(config: Config | None) -> Mod:
    """A cooperative too slow for the round deadline sits the round out (a declined reply, no
    training); one that makes it reports its compute speed (``fedgov.heterogeneity``)."""
    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        node = node_for(context, config)
        h, cfg = node.config.heterogeneity, node.config
        if not _is_train(message) or (h.compute == "off" and h.deadline <= 0):
            return call_next(message, context)
        from .heterogeneity import compute_speeds, local_steps, misses_deadline

        coop = node.cooperative
        speed = float(compute_speeds(h, node.federation.num_cooperatives, seed=cfg.seed)[coop.id])
        steps = local_steps(num_examples=len(coop.train), batch_size=cfg.train.batch_size,
                            epochs=cfg.train.local_epochs)
        needed = misses_deadline(h, steps=steps, speed=speed)
        if needed is not None:
            reason = (f"cooperative {coop.id} missed the round deadline: its {steps} local steps take "
                      f"{needed:.2f} s at compute speed {speed:.2g}, the deadline is {h.deadline:g} s")
            return Message(Error(code=CODE_DECLINED, reason=reason), reply_to=message)
        reply = call_next(message, context)
        if not reply.has_error():
            reply.content["metrics"]["compute_speed"] = speed
        return reply

    return mod


def size_lie_mod(config: Config | None) -> Mod:
    """An attacker claims ``attack.size_claim`` times its data, when asked and with each update.

    Under HE a liar needs no false claim: it asks its HE mod to scale the update inside the
    ciphertext, where the aggregator cannot see it (``fedgov.mechanisms.he``).
    """
    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(message, context)
        node = node_for(context, config)
        claim = node.config.attack.size_claim
        if reply.has_error() or not node.malicious or claim == 1.0:
            return reply
        kind = message.metadata.message_type
        if node.config.secure.aggregation == "he":
            if kind == MessageType.TRAIN:
                from .mechanisms.he import SIZE_LIE_KEY

                reply.content["metrics"][SIZE_LIE_KEY] = claim
            return reply
        # What it claims when asked (query) and with each update (train); evaluation replies carry no claim.
        record = {MessageType.QUERY: "cooperative", MessageType.TRAIN: "metrics"}.get(kind)
        if record is not None:
            metrics = reply.content[record]
            for key in ("num-examples", "num-train"):
                if key in metrics:
                    metrics[key] = round(metrics[key] * claim)
        return reply

    return mod


def data_poisoning_mod(config: Config | None) -> Mod:
    """An active attacker trains on poisoned data (label flips, backdoor triggers: ``fedgov.attacks``)."""
    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        if not _is_train(message):
            return call_next(message, context)
        node, server_round = node_for(context, config), _server_round(message)
        if not _attacking(node, server_round):
            return call_next(message, context)
        from .attacks import poison_training_data, trigger_for

        cfg, coop = node.config, node.cooperative
        rng = np.random.default_rng([cfg.seed, server_round, coop.id, 0xBAD])
        x, y = poison_training_data(cfg.attack.kind, coop.train.x, coop.train.y, num_classes=coop.num_classes,
                                    target_label=cfg.attack.target_label,
                                    trigger=trigger_for(node.federation, size=cfg.attack.trigger_size),
                                    poison_fraction=cfg.attack.poison_fraction, rng=rng)
        with training_data(x, y):
            return call_next(message, context)

    return mod


def model_poisoning_mod(config: Config | None) -> Mod:
    """An active attacker replaces its trained model by the received one plus a poisoned update
    (``model_replacement``: boosted to outweigh the cohort; ``noise``: Gaussian)."""
    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(message, context)
        if reply.has_error() or not _is_train(message):
            return reply
        node, server_round = node_for(context, config), _server_round(message)
        cfg = node.config
        if cfg.attack.kind not in ("model_replacement", "noise") or not _attacking(node, server_round):
            return reply
        from .attacks import poison_update

        received = list(record_to_numpy(message.content["arrays"]).values())
        trained = record_to_numpy(reply.content["arrays"])
        delta = [t - r for t, r in zip(trained.values(), received)]
        boost = cfg.attack.boost or cfg.strategy.cohort_size(node.federation.num_cooperatives) / max(
            1, len(node.attackers))
        rng = np.random.default_rng([cfg.seed, server_round, node.cooperative.id, 0x4015E])
        poisoned = poison_update(cfg.attack.kind, delta, boost=boost, noise_std=cfg.attack.noise_std, rng=rng)
        reply.content["arrays"] = ArrayRecord({name: torch.from_numpy(np.asarray(r + d, dtype=r.dtype))
                                               for name, r, d in zip(trained, received, poisoned)})
        return reply

    return mod


# Outermost first: a cooperative that misses the deadline does nothing else; a liar's claim is
# written on whatever it sends; an update is poisoned after training on poisoned data.
BEHAVIOURS: tuple[Callable[[Config | None], Mod], ...] = (
    deadline_mod,
    size_lie_mod,
    model_poisoning_mod,
    data_poisoning_mod,
)


def behaviour_mods(config: Config | None) -> list[Mod]:
    """The behaviour mods around the honest ClientApp, outermost first."""
    return [make(config) for make in BEHAVIOURS]
