"""Decryption requests, as the key holder answers them, and the custodian node that is one.

With ``secure.key_holder = "custodian"`` the custodian is a party of its own: a node of the
federation that holds ``custodian.keys`` and nothing else, never sampled and holding no
data. The ServerApp reaches it through the grid like any node and receives only decrypted
sums; it never opens a secret key itself. In simulation the custodian is one more virtual
node (the partition id after the last cooperative's); on the Deployment Engine it is one
more SuperNode started with ``--node-config "role=custodian"``.

With ``"clients"`` the aggregator asks one contributing cooperative, which answers with the
same rules (``fedgov.crypto.key_holder``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from .client_errors import CODE_DECLINED
from .config import Config

__all__ = ["CUSTODIAN_ROLE", "ROLE_KEY", "REQUEST_KEY", "uses_custodian", "extra_nodes", "is_custodian_node",
           "answer_decrypt_request", "custodian_query", "decrypt_request"]

ROLE_KEY = "role"  # node_config key on the Deployment Engine
CUSTODIAN_ROLE = "custodian"
REQUEST_KEY = "he-aggregate"  # the record holding the aggregate ciphertext of a decryption request
_LEDGER_KEY = "fedgov.key_holder"


def uses_custodian(cfg: Config) -> bool:
    return cfg.secure.aggregation == "he" and cfg.secure.key_holder == "custodian"


def extra_nodes(cfg: Config) -> int:
    """Nodes beyond the cooperatives that the federation needs (the custodian)."""
    return 1 if uses_custodian(cfg) else 0


def is_custodian_node(context: Context, cfg: Config, num_cooperatives: int) -> bool:
    role = context.node_config.get(ROLE_KEY)
    if role is not None:
        return str(role) == CUSTODIAN_ROLE
    # Simulation: the engine numbers its nodes 0..N; the one after the last cooperative is the custodian.
    return uses_custodian(cfg) and int(context.node_config.get("partition-id", -1)) == num_cooperatives


def decrypt_request(aggregate_bytes: Any, *, server_round: int, contributors: list[int],
                    dst_node_id: int) -> Message:
    """The aggregator's request to a key holder: decrypt this aggregate of ``contributors``' updates."""
    from flwr.app import MessageType

    config = ConfigRecord({"server-round": server_round, "contributors": [int(c) for c in contributors]})
    return Message(content=RecordDict({REQUEST_KEY: ArrayRecord({"ciphertext": Array(aggregate_bytes)}),
                                       "config": config}),
                   message_type=MessageType.QUERY, dst_node_id=dst_node_id)


def answer_decrypt_request(message: Message, context: Context, *, keys: Any, check_key: Any) -> Message:
    """Decrypt the aggregate in ``message`` if the key holder's rules allow it, else decline."""
    from .crypto import EncryptedUpdate, HEError
    from .crypto.key_holder import DecryptRefused, KeyHolder

    started = time.perf_counter()
    ledger = context.state.get(_LEDGER_KEY)
    holder = KeyHolder(keys, check_key,
                       decrypted_rounds=[int(r) for r in ledger["rounds"]] if ledger is not None else ())
    try:
        config = message.content["config"]
        server_round, contributors = int(config["server-round"]), [int(c) for c in config["contributors"]]
        aggregate = EncryptedUpdate.from_bytes(message.content[REQUEST_KEY]["ciphertext"].numpy())
        arrays = holder.decrypt(aggregate, server_round=server_round, contributors=contributors)
    except (DecryptRefused, HEError, KeyError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, DecryptRefused) else f"refusing to decrypt a malformed request: {exc}"
        return Message(Error(code=CODE_DECLINED, reason=reason), reply_to=message)
    finally:  # a refused request still spends its round
        context.state[_LEDGER_KEY] = ConfigRecord({"rounds": sorted(holder.decrypted_rounds)})
    content = RecordDict({"arrays": ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)}),
                          "metrics": MetricRecord({"seconds_decrypt": time.perf_counter() - started})})
    return Message(content=content, reply_to=message)


def custodian_query(message: Message, context: Context, cfg: Config) -> Message:
    """Everything a custodian node answers: who it is, and decryption requests."""
    if REQUEST_KEY in message.content:
        from .crypto.keys import load_check_key

        return answer_decrypt_request(message, context, keys=_custodian_keys(cfg),
                                      check_key=load_check_key(cfg.secure.key_dir))
    return Message(content=RecordDict({"identity": ConfigRecord({"role": CUSTODIAN_ROLE, "name": CUSTODIAN_ROLE})}),
                   reply_to=message)


def _custodian_keys(cfg: Config) -> Any:
    from .crypto import SecretKeys
    from .crypto.keys import CUSTODIAN_KEYS

    return SecretKeys.from_bytes((Path(cfg.secure.key_dir) / CUSTODIAN_KEYS).read_bytes())
