"""DP-SGD ledgers across a crash: recorded by the aggregator, handed back on ``--resume``.

A cooperative keeps its privacy ledger in Flower's ``context.state``, which lives only
as long as the Flower run. ``--resume`` starts a new Flower run, so without help every
cooperative would start again from epsilon 0 and could spend its whole budget twice.

What survives is the run directory. The aggregator already receives, in each train
reply, the mechanism the cooperative ran (``dp_noise_multiplier``, ``dp_sample_rate``,
``dp_steps``); ``recorded_spends`` collects them per cooperative from the round rows and
``RunRecord.save_checkpoint`` writes them into ``checkpoint.npz`` together with the
global model, in one atomic replace, so the ledgers always match the checkpoint's round.
On resume, ``LedgerHandover`` adds each cooperative's recorded spends to the train
messages sent to its node (until that node has answered one), and the cooperative
adopts them when its ``context.state`` holds no ledger of its own.

Trust assumption: on resume a cooperative trusts the aggregator's record of its past
spending. An aggregator that under-reports it makes the cooperative's epsilon look
smaller than it is, and lets it train past its budget (over-reporting only makes it stop
earlier). The cooperative checks that each recorded spend is a valid mechanism, and
derives its noise multiplier itself, from its own config. A round whose updates were sent but
whose checkpoint was never written (the round in flight at the crash) is trained again
on resume and counted once: the aggregator that was running then saw one more noisy
release than the ledger counts. A cooperative that must not depend on the aggregator
would keep its ledger on its own disk instead.

Nothing here imports Opacus: spends are plain ``[noise_multiplier, sample_rate, steps]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

__all__ = ["RECORDED_LEDGER_KEY", "LedgerHandover", "decode_spends", "encode_spends", "recorded_spends"]

# Key of the recorded spends in a train message's config (Message API "config" or SecAgg+'s "fitins.config").
RECORDED_LEDGER_KEY = "fedgov.recorded-dp-ledger"
_CONFIG_RECORDS = ("config", "fitins.config")

Spend = tuple[float, float, int]


def recorded_spends(rows: Iterable[Mapping[str, Any]]) -> dict[int, list[Spend]]:
    """Each cooperative's DP-SGD spends, round by round, from ``metrics.jsonl`` rows (client_train)."""
    ledgers: dict[int, list[Spend]] = {}
    for row in rows:
        for coop, metrics in row.get("client_train", {}).items():
            if "dp_steps" in metrics:
                ledgers.setdefault(int(coop), []).append(
                    (float(metrics["dp_noise_multiplier"]), float(metrics["dp_sample_rate"]), int(metrics["dp_steps"])))
    return dict(sorted(ledgers.items()))


def encode_spends(spends: Iterable[Spend]) -> str:
    return json.dumps([[float(z), float(q), int(n)] for z, q, n in spends])


def decode_spends(text: str) -> list[Spend]:
    """The spends of ``encode_spends``; raises ValueError on anything that is not a valid mechanism."""
    raw = json.loads(text)
    if not isinstance(raw, list):
        raise ValueError("recorded DP ledger: not a list of spends")
    spends = []
    for item in raw:
        z, q, n = item
        z, q, n = float(z), float(q), int(n)
        if not (math.isfinite(z) and z > 0 and 0 < q <= 1 and n >= 0):
            raise ValueError(f"recorded DP ledger: invalid spend {item!r}")
        spends.append((z, q, n))
    return spends


def _with_ledger(content: RecordDict, record_key: str, encoded: str) -> RecordDict:
    """A copy of ``content`` whose config record also carries the ledger.

    Strategies send one RecordDict to every node of a round; it must not be changed in place.
    """
    copy = RecordDict({key: value for key, value in content.items()})
    config = ConfigRecord(dict(content[record_key]))
    config[RECORDED_LEDGER_KEY] = encoded
    copy[record_key] = config
    return copy


class LedgerHandover:
    """A Grid that gives each node's train messages its cooperative's recorded ledger, until it replies.

    ``ledgers`` maps node ids to spends. Every other message, and every message once
    that node has answered a train message carrying its ledger, passes unchanged.
    """

    def __init__(self, grid: Any, ledgers: Mapping[int, Iterable[Spend]]) -> None:
        self._grid = grid
        self._pending = {int(node): encode_spends(spends) for node, spends in ledgers.items()}

    def _hand_over(self, messages: Iterable[Message]) -> tuple[list[Message], set[int]]:
        out, carried = [], set()
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self._pending and message.metadata.message_type == MessageType.TRAIN:
                records = message.content.config_records
                key = next((k for k in _CONFIG_RECORDS if k in records), None)
                if key is not None:
                    message.content = _with_ledger(message.content, key, self._pending[node])
                    carried.add(node)
            out.append(message)
        return out, carried

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages, carried = self._hand_over(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in carried and not reply.has_error():
                del self._pending[node]
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages, _ = self._hand_over(messages)  # no reply seen here: keep handing over
        return self._grid.push_messages(messages)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
