"""The pool engine: Flower's apps on a pool of long-lived workers, behind Flower's public ``Grid``.

The ServerApp is called with a :class:`PoolGrid` exactly as Flower's simulation calls it
with its in-memory grid. Each message goes straight to its node's ClientApp (with all its
mods) on a worker (``fedgov.engine.workers``); there is no LinkState to scan and no poll
interval, so ``send_and_receive`` returns as soon as the last reply is in.

What it keeps of Flower's semantics: node ids drawn as Flower draws them (random 64-bit
integers, so every byte count that carries an id is the same size as on Flower's engine);
each node's ``Context`` (``partition-id``, ``num-partitions``, ``state``) across rounds;
unique message ids, and replies with Flower's metadata (``src_node_id``,
``reply_to_message_id``); a ClientApp that raises becomes an error reply; a message to
a node that does not exist is dropped, as Flower's LinkState drops it; and
``send_and_receive`` returns when its timeout is up, with the replies that came in (the
workers still running what did not are stopped, as a hung ClientApp cannot be
interrupted otherwise).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable
from logging import ERROR
from uuid import uuid4

from flwr.app import Message
from flwr.common import log
from flwr.common.constant import NODE_ID_NUM_BYTES, SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from .tasks import Task, dumps
from .workers import WorkerPool

__all__ = ["PoolGrid", "draw_node_ids", "random_id"]


def random_id(num_bytes: int) -> int:
    """A random unsigned integer of ``num_bytes`` bytes from the OS, as Flower draws its ids
    (``flwr.supercore.corestate.utils.generate_rand_int_from_bytes``, whose module takes half a
    second to import)."""
    return int.from_bytes(os.urandom(num_bytes), "little", signed=False)


def draw_node_ids(count: int) -> list[int]:
    """``count`` distinct node ids, drawn as Flower's LinkState draws them."""
    ids: list[int] = []
    taken = {0, SUPERLINK_NODE_ID}
    while len(ids) < count:
        node_id = random_id(NODE_ID_NUM_BYTES)
        if node_id not in taken:
            taken.add(node_id)
            ids.append(node_id)
    return ids


class PoolGrid(Grid):
    """A Flower Grid whose nodes are ClientApps on a :class:`~fedgov.engine.workers.WorkerPool`.

    Node ``i`` of ``node_ids`` has ``partition-id`` ``i``.
    """

    def __init__(self, pool: WorkerPool, run: Run, node_ids: list[int]) -> None:
        self._pool = pool
        self._run = run
        self._node_ids = list(node_ids)
        self._partition = {node: i for i, node in enumerate(self._node_ids)}
        self._task_ids = itertools.count()
        self._message_of_task: dict[int, str] = {}
        self._replies: dict[str, Message] = {}  # instruction message id -> reply, until pulled

    # -- Grid --------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        contents: dict[int, bytes] = {}  # one pickle per content object shared by several messages
        tasks: list[Task] = []
        ids: list[str] = []
        for message in messages:
            meta = message.metadata
            meta.__dict__["_message_id"] = str(uuid4())  # as Flower's grids assign it
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {message}")
            if meta.src_node_id != SUPERLINK_NODE_ID or meta.run_id != self._run.run_id \
                    or meta.dst_node_id not in self._partition:
                log(ERROR, "Invalid message for this run (dropped, as Flower's LinkState drops it): "
                           "run %s, from node %s to node %s", meta.run_id, meta.src_node_id, meta.dst_node_id)
                continue
            key = id(message.content)
            if key not in contents:
                contents[key] = dumps(message.content)
            task = Task(id=next(self._task_ids), node_id=meta.dst_node_id,
                        partition_id=self._partition[meta.dst_node_id], metadata=meta, content=contents[key])
            self._message_of_task[task.id] = meta.message_id
            tasks.append(task)
            ids.append(meta.message_id)
        self._pool.submit(tasks)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self._store(self._pool.results(timeout=0))
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        waiting = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._give_up(waiting)
                break
            results = self._pool.results(timeout=left)
            if not results and not self._pool.outstanding:
                break  # nothing left that could answer
            waiting.difference_update(self._store(results))
        # In the order the messages were sent: the same replies in the same order on every run.
        return [self._replies.pop(i) for i in ids if i in self._replies]

    # -- helpers -----------------------------------------------------------------------
    def _store(self, results: list) -> list[str]:
        """Keep the replies until they are pulled; returns the ids of the messages they answer."""
        answered = []
        for result in results:
            message_id = self._message_of_task.pop(result.task_id)
            reply = result.reply
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message_id] = reply
            answered.append(message_id)
        return answered

    def _give_up(self, message_ids: set[str]) -> None:
        """The timeout is up: stop waiting for these messages, and stop whatever still runs them."""
        tasks = {t for t, m in self._message_of_task.items() if m in message_ids}
        self._pool.cancel(tasks)
        for task in tasks:
            del self._message_of_task[task]
