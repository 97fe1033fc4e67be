"""``he``: homomorphic-encryption aggregation with TenSEAL (``fedgov.crypto``).

Client half (:func:`he_mod`): encrypts each trained update, weighted by the weight the
aggregator assigned, with check slots (``fedgov.crypto.he_check``); answers decryption
requests when this node holds the key (``fedgov.decryption``: the custodian node, or with
``key_holder = "clients"`` any cooperative). Server half: ``HESecureAggregation`` sums
ciphertexts with a public context and asks the key holder, through the grid, for the sum.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from . import Mechanism, ServerSide, register
from .plain import note_governance

__all__ = ["HE", "he_mod", "SIZE_LIE_KEY", "NODE_KEY_DIR", "cooperative_context"]

# On the Deployment Engine each party keeps its key files on its own machine:
# flower-supernode --node-config "... key-dir='/path'" overrides secure.key_dir for that SuperNode.
NODE_KEY_DIR = "key-dir"

# A lying cooperative's own app tells its HE mod to scale its update inside the ciphertext
# (attack.size_claim); the mod takes the value out of the metrics it sends.
SIZE_LIE_KEY = "fedgov.size-lie-scale"


def cooperative_context(cfg: Any) -> Any:
    """The cooperatives' HE context: the shared secret keys, or the custodian's public context."""
    from ..crypto import PublicContext, SecretKeys
    from ..crypto.keys import COOPERATIVE_CONTEXT, COOPERATIVE_KEYS

    key_dir = Path(cfg.secure.key_dir)
    if cfg.secure.key_holder == "clients":
        return SecretKeys.from_bytes((key_dir / COOPERATIVE_KEYS).read_bytes())
    return PublicContext.from_bytes((key_dir / COOPERATIVE_CONTEXT).read_bytes())


def _encrypted(message: Message, reply: Message, cfg: Any, cooperative: int) -> Message:
    """The trained reply as an encrypted, weighted update (new - received weights)."""
    from ..crypto import CheckStamp, encrypt_update
    from ..crypto.keys import load_check_key

    received = [a.numpy() for a in message.content["arrays"].values()]
    trained = [a.numpy() for a in reply.content["arrays"].values()]
    delta = [(t - r).astype(np.float64) for t, r in zip(trained, received)]
    metrics = dict(reply.content["metrics"])
    # The weight the aggregator assigned. A lying cooperative declares it, but scales its update
    # inside the ciphertext: its influence grows and nobody can see it.
    weight = float(message.content["config"]["he-weight"])
    scale = float(metrics.pop(SIZE_LIE_KEY, 1.0))
    if scale != 1.0:
        delta = [d * scale for d in delta]
    started = time.perf_counter()
    stamp = CheckStamp(load_check_key(cfg.secure.key_dir), int(message.content["config"]["server-round"]), cooperative)
    update = encrypt_update(delta, context=cooperative_context(cfg), weight=weight, workers=1, check=stamp)
    metrics.update({"seconds_encrypt": time.perf_counter() - started, "he_weight": weight,
                    "he_applied_weight": weight * scale})  # the latter: simulation ground truth, for measurement
    if update.num_clipped is not None:  # compact (quantized) preset only
        metrics["he_clipped"] = update.num_clipped
    records = {"he-update": ArrayRecord({"ciphertext": Array(update.to_numpy())}), "metrics": MetricRecord(metrics)}
    if cfg.secure.verify:  # measurement only: lets the server compute the HE error (marked reveals_updates)
        records["verify"] = ArrayRecord({str(i): Array(weight * d) for i, d in enumerate(delta)})
    return Message(content=RecordDict(records), reply_to=message)


def he_mod(config: Any) -> Any:
    """The HE client half as a Flower mod (``config`` None: read from each message's run config)."""
    from ..client_errors import CODE_FAILED
    from ..config import Config
    from ..data import build_federation
    from ..decryption import REQUEST_KEY, answer_decrypt_request, custodian_query, is_custodian_node

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        cfg = config if config is not None else Config.from_flat(context.run_config)
        if NODE_KEY_DIR in context.node_config:  # this machine keeps its own key files where it chose to
            cfg = cfg.replace(**{"secure.key_dir": str(context.node_config[NODE_KEY_DIR])})
        kind = message.metadata.message_type
        federation = build_federation(cfg.data, seed=cfg.seed)
        if is_custodian_node(context, cfg, federation.num_cooperatives):  # no data: it only decrypts
            if kind == MessageType.QUERY:
                return custodian_query(message, context, cfg)
            return Message(Error(code=CODE_FAILED, reason="the custodian holds no data"), reply_to=message)
        if kind == MessageType.QUERY and REQUEST_KEY in message.content:  # key holder "clients"
            from ..crypto.keys import load_check_key

            return answer_decrypt_request(message, context, keys=cooperative_context(cfg),
                                          check_key=load_check_key(cfg.secure.key_dir))
        reply = call_next(message, context)
        if kind != MessageType.TRAIN or reply.has_error():
            return reply
        return _encrypted(message, reply, cfg, int(context.node_config["partition-id"]))

    return mod


def note_he_round(log: Any, measured: dict[str, Any]) -> None:
    """Put what the HE aggregator measured into the round log (phases, bytes, rejected updates)."""
    note_governance(log, measured)
    declared = sum(log.weights.values())
    if declared > 0:  # what the clients applied inside their ciphertexts, as shares of the declared total
        log.applied_weights = {c: float(m["he_applied_weight"]) / declared for c, m in log.client_train.items()
                               if "he_applied_weight" in m and c in log.weights}
    log.extra_phase_seconds.update({
        "encrypt_max": max((m.get("seconds_encrypt", 0.0) for m in log.client_train.values()), default=0.0),
        "he_aggregate": measured.get("seconds_he_aggregate", 0.0),
        "decrypt": measured.get("seconds_decrypt", 0.0),
    })
    log.extra["he"] = {k: v for k, v in measured.items() if k not in ("rejected", "digests", "weights")}


@register
class HE(Mechanism):
    name = "he"

    @classmethod
    def applies(cls, cfg: Any) -> bool:
        return cfg.secure.aggregation == "he"

    def client_mods(self) -> list[Any]:
        return [he_mod(self.cfg)]

    def wrap_strategy(self, strategy: Any, side: ServerSide) -> Any:
        from ..crypto.keys import AGGREGATOR_CONTEXT
        from ..governance.electorate import Electorate
        from ..strategies.secure_he import HESecureAggregation

        key_dir = Path(self.cfg.secure.key_dir)
        if not (key_dir / AGGREGATOR_CONTEXT).is_file():
            raise FileNotFoundError(f"secure.key_dir: no provisioned HE keys in {key_dir!s} "
                                    f"(python -m fedgov.crypto.keys DIR --preset {self.cfg.secure.preset})")
        g = self.cfg.governance
        return HESecureAggregation(
            strategy, key_dir=key_dir, custodian_node=side.custodian_node, node_to_cooperative=side.node_to_cooperative,
            examples={c: s["num_train"] for c, s in side.cooperatives.items()}, verify=self.cfg.secure.verify,
            electorate=side.electorate or Electorate(g.weighting, cap=g.cap), archive=side.archive)

    def note_round(self, log: Any, strategy: Any) -> None:
        note_he_round(log, strategy.last)

    def summary(self, rows: list[dict[str, Any]], *, num_parameters: int) -> dict[str, Any]:
        he_rows = [r["he"] for r in rows if r.get("he", {}).get("bytes_per_param")]
        errors = [h["max_abs_error"] for h in he_rows if "max_abs_error" in h]
        block = {"scheme": "he", "preset": self.cfg.secure.preset, "key_holder": self.cfg.secure.key_holder,
                 "bytes_per_param": max((h["bytes_per_param"] for h in he_rows), default=None),
                 "max_abs_error": max(errors) if errors else None}
        if self.cfg.secure.verify:
            block["reveals_updates"] = True
        return {"secure_aggregation": block}

    def audit_fields(self) -> dict[str, Any]:
        return {"he_preset": self.cfg.secure.preset, "key_holder": self.cfg.secure.key_holder,
                "reveals_updates": bool(self.cfg.secure.verify)}
