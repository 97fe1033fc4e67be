"""One count of traffic for every mechanism: a Grid wrapper that every message of a run goes through.

Train and evaluate messages, SecAgg+'s four stages and HE's decryption round trip all pass
the same :class:`TrafficMeter`, which counts each message's records (arrays, metrics and
configs) the same way, in each direction and per stage. ``bytes_up``/``bytes_down`` in
``metrics.jsonl`` are its totals for the round; ``bytes_by_stage`` shows where they went, and
``messages_by_stage`` how many messages carried them (replies that are errors are counted as
messages, not bytes).
The records that carry ``secure.verify``'s plaintext copies (a measurement aid, not part of
any mechanism) are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

__all__ = ["TrafficMeter", "content_bytes", "MEASUREMENT_ONLY", "SECAGG_VERIFY_RECORD", "VERIFY_RECORD"]

VERIFY_RECORD = "verify"  # HE: secure.verify's plaintext copy of an update
SECAGG_VERIFY_RECORD = "fedgov.secagg.verify.parameters"  # the same for SecAgg+
MEASUREMENT_ONLY = frozenset({VERIFY_RECORD, SECAGG_VERIFY_RECORD})


def _config_bytes(record: ConfigRecord) -> int:
    """Keys plus values (bytes/str by length, numbers 8, booleans 1); empty lists are 0."""
    def size(value: Any) -> int:
        if isinstance(value, bool):
            return 1
        if isinstance(value, (bytes, str)):
            return len(value)
        return 8

    total = 0
    for key, value in record.items():
        total += len(key)
        total += sum(size(v) for v in value) if isinstance(value, list) else size(value)
    return total


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: arrays and metrics as Flower counts them, configs by their values."""
    total = 0
    for key, record in content.items():  # one pass: RecordDict's typed views copy the dict each time
        if isinstance(record, ArrayRecord):
            total += 0 if key in MEASUREMENT_ONLY else record.count_bytes()
        elif isinstance(record, MetricRecord):
            total += record.count_bytes()
        elif isinstance(record, ConfigRecord):
            total += _config_bytes(record)
    return total


def default_stage(message: Message) -> str:
    """``train``, ``evaluate``, ``decrypt`` (an HE aggregate sent to its key holder) or ``query``."""
    from .decryption import REQUEST_KEY

    kind = message.metadata.message_type.split(".")[0]
    if kind == MessageType.QUERY and REQUEST_KEY in message.content:
        return "decrypt"
    return kind


class TrafficMeter:
    """Wraps a Flower Grid; counts every message sent and every reply received, by stage."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self._label: str | None = None
        self.by_stage: dict[str, dict[str, int]] = {}
        self.messages_by_stage: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Count what is sent inside the block under ``label`` (SecAgg+'s stages, say)."""
        previous, self._label = self._label, label
        try:
            yield
        finally:
            self._label = previous

    def _add(self, stage: str, direction: str, count: int) -> None:
        self.by_stage.setdefault(stage, {"up": 0, "down": 0})[direction] += count
        self.messages_by_stage.setdefault(stage, {"up": 0, "down": 0})[direction] += 1

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage_of_node: dict[int, str] = {}
        sizes: dict[int, int] = {}  # a strategy hands one content to many messages: count it once
        for message in messages:
            stage = self._label or default_stage(message)
            stage_of_node[message.metadata.dst_node_id] = stage
            key = id(message.content)
            if key not in sizes:
                sizes[key] = content_bytes(message.content)
            self._add(stage, "down", sizes[key])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            stage = stage_of_node.get(reply.metadata.src_node_id, self._label or default_stage(reply))
            self._add(stage, "up", 0 if reply.has_error() else content_bytes(reply.content))
        return replies

    def take(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """Bytes and messages since the last take, by stage; counting starts afresh."""
        counts, self.by_stage = self.by_stage, {}
        messages, self.messages_by_stage = self.messages_by_stage, {}
        return dict(sorted(counts.items())), dict(sorted(messages.items()))

    def __getattr__(self, name: str) -> Any:  # get_node_ids, push_messages, ... as the wrapped Grid
        return getattr(self._grid, name)
