"""A strategy wrapper that samples the cohort deterministically and records each round.

It delegates every decision about aggregation to the wrapped Flower strategy and
only adds what fedgov measures: who was asked, who answered, bytes each way,
time per phase and every cooperative's own metrics. Replies are put in
cooperative order before aggregation so that floating-point sums, and hence the
metrics, do not depend on the order in which messages happen to arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..client_errors import failure_of
from ..sampling import CohortSampler, evaluates_cooperatives
from ..traffic import TrafficMeter

__all__ = ["CohortSampler", "RoundRecorder", "RoundLog"]


class _NodeSubsetGrid:
    """A view of the Grid that shows only the sampled nodes to the inner strategy."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _payload_bytes(message: Message) -> int:
    # "verify" records carry plaintext copies for measuring secure aggregation's error; not traffic.
    return sum(record.count_bytes() for key, record in message.content.array_records.items() if key != "verify")


@dataclass
class RoundLog:
    """What happened in one round, as seen by the aggregator."""

    round: int
    sampled: list[int]
    started: float
    bytes_down: int = 0
    bytes_up: int = 0
    # Every message of the round by stage (fedgov.traffic), when the grid is a TrafficMeter.
    bytes_by_stage: dict[str, dict[str, int]] = field(default_factory=dict)
    messages_by_stage: dict[str, dict[str, int]] = field(default_factory=dict)
    participants: list[int] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    client_train: dict[int, dict[str, float]] = field(default_factory=dict)
    client_eval: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds_train: float = 0.0
    seconds_aggregate: float = 0.0
    seconds_evaluate: float = 0.0
    # Aggregation weight and digest of each accepted update (filled by the governance or HE wrapper).
    weights: dict[int, float] = field(default_factory=dict)
    applied_weights: dict[int, float] = field(default_factory=dict)  # HE: what clients applied themselves
    update_digests: dict[int, str] = field(default_factory=dict)
    # Scheme-specific measurements (e.g. secure aggregation): more phases, more row keys.
    extra_phase_seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class RoundRecorder(Strategy):
    """Wraps a Flower strategy; see the module docstring."""

    def __init__(self, inner: Strategy, *, node_to_cooperative: dict[int, int],
                 sampler: CohortSampler, round_offset: int = 0, meter: TrafficMeter | None = None,
                 evaluate_every: int = 1, last_round: int = 0) -> None:
        self.inner = inner
        self.evaluate_every = evaluate_every
        self.last_round = last_round
        self.meter = meter
        self.node_to_cooperative = dict(node_to_cooperative)
        self.cooperative_to_node = {c: n for n, c in self.node_to_cooperative.items()}
        self.sampler = sampler
        # A resumed run restarts Flower's loop at 1; clients and the sampler must see the true round.
        self.round_offset = round_offset
        self.current: RoundLog | None = None
        self._phase_start = 0.0
        self._sent: list[Message] = []  # this phase's instructions
        self._destinations: dict[str, int] = {}  # their message ids -> destination nodes

    # -- helpers ---------------------------------------------------------------
    def _cooperative_of(self, message: Message) -> int:
        coop = self.node_to_cooperative.get(message.metadata.src_node_id)
        if coop is not None:
            return coop
        # An error the SuperLink wrote itself (a node that stopped sending heartbeats) comes from the
        # SuperLink, not the node: the instruction it answers names the cooperative.
        node = self._destinations.get(message.metadata.reply_to_message_id)
        return self.node_to_cooperative.get(node, -1) if node is not None else -1

    def _in_cooperative_order(self, replies: Iterable[Message]) -> list[Message]:
        # The instructions' ids are set when the grid pushes them, after configure_* returned them.
        self._destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return sorted(replies, key=self._cooperative_of)

    def _metrics_of(self, message: Message) -> dict[str, float]:
        out: dict[str, float] = {}
        for record in message.content.values():  # not .metric_records: a new typed view per call
            if isinstance(record, MetricRecord):
                out.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        return out

    # -- Strategy interface ------------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        started = time.perf_counter()
        server_round += self.round_offset
        sampled = self.sampler.sample(server_round, self.cooperative_to_node)
        stragglers = self.sampler.stragglers(server_round, sampled)
        # FedAvg in FedProx's experiments drops stragglers: the round goes on without them
        if stragglers and self.sampler.straggler_work == "drop":
            sampled = [c for c in sampled if c not in stragglers]
        elif stragglers:  # FedProx keeps their partial work: each is told how many epochs it manages
            config = ConfigRecord({**dict(config), "stragglers": list(stragglers),
                                   "straggler-epochs": list(stragglers.values())})
        nodes = [self.cooperative_to_node[c] for c in sampled]
        messages = self._sent = list(self.inner.configure_train(server_round, arrays, config,
                                                                _NodeSubsetGrid(grid, nodes)))
        if self.meter is not None:
            self.meter.take()  # the round starts here: count its messages from zero
        self.current = RoundLog(round=server_round, sampled=sampled, started=started,
                                bytes_down=sum(_payload_bytes(m) for m in messages))
        if self.sampler.last_present is not None:  # participation: who showed up, before the server sampled
            self.current.extra["present"] = list(self.sampler.last_present)
        if stragglers:
            self.current.extra["stragglers"] = {str(c): e for c, e in stragglers.items()}
        self._phase_start = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        log = self.current
        assert log is not None and log.round == server_round
        log.seconds_train = time.perf_counter() - self._phase_start
        replies = self._in_cooperative_order(replies)
        for reply in replies:
            coop = self._cooperative_of(reply)
            if reply.has_error():
                log.failures.append(failure_of(reply, coop))
                continue
            log.participants.append(coop)
            log.bytes_up += _payload_bytes(reply)
            log.client_train[coop] = self._metrics_of(reply)
        started = time.perf_counter()
        result = self.inner.aggregate_train(server_round, replies)
        log.seconds_aggregate = time.perf_counter() - started
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._phase_start = time.perf_counter()
        server_round += self.round_offset
        if not evaluates_cooperatives(server_round, every=self.evaluate_every, last_round=self.last_round):
            self._sent = []
            return []  # not this round (train.evaluate_every): no message is sent
        # Every cooperative evaluates; other nodes (the custodian) are not shown to the inner strategy.
        cooperatives = _NodeSubsetGrid(grid, sorted(self.cooperative_to_node.values()))
        self._sent = list(self.inner.configure_evaluate(server_round, arrays, config, cooperatives))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        log = self.current
        assert log is not None and log.round == server_round
        replies = self._in_cooperative_order(replies)
        for reply in replies:
            if reply.has_error():
                log.failures.append(failure_of(reply, self._cooperative_of(reply), phase="evaluate"))
            else:
                log.client_eval[self._cooperative_of(reply)] = self._metrics_of(reply)
        log.seconds_evaluate = time.perf_counter() - self._phase_start
        result = self.inner.aggregate_evaluate(server_round, replies) if replies else None
        if self.meter is not None:  # the round's last message: train, decryption and evaluation, counted alike
            log.bytes_by_stage, log.messages_by_stage = self.meter.take()
            log.bytes_up = sum(s["up"] for s in log.bytes_by_stage.values())
            log.bytes_down = sum(s["down"] for s in log.bytes_by_stage.values())
        return result
