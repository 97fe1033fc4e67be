"""One message for one node, as the pool engine hands it to a worker, and how any worker runs it.

A :class:`Task` carries what Flower's simulation engine hands a ClientApp: the message
(its metadata, and its content pickled, so that every node unpickles a copy of its own
even where a strategy gave many messages one ``RecordDict``) and the node's ``Context``
(its partition in ``node_config`` and its ``state``, kept by the engine between rounds).
:class:`ClientRunner` runs a task through the ClientApp with all its mods and returns a
:class:`Result`: the reply and the node's new state. It is the same code in a worker
process, a Ray actor or the server's own process.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR
from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common import log
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, ErrorCode

__all__ = ["Task", "Result", "ClientRunner", "dumps", "pack_state", "unpack_state", "error_reply"]

PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=PROTOCOL)


@dataclass
class Task:
    """One message to one node."""

    id: int
    node_id: int
    partition_id: int
    metadata: Metadata
    content: bytes  # the pickled RecordDict: each task unpickles its own copy
    state: bytes | None = None  # the node's pickled ``context.state`` (None: empty), attached at dispatch


@dataclass
class Result:
    """What came back for one task: the reply, and the node's state after it (``updated`` False: unchanged)."""

    task_id: int
    reply: Message
    state: bytes | None = None
    updated: bool = False


def pack_state(state: RecordDict) -> bytes | None:
    return dumps(state) if len(state) else None


def unpack_state(blob: bytes | None) -> RecordDict:
    return pickle.loads(blob) if blob else RecordDict()


def error_reply(task: Task, code: int, reason: str) -> Result:
    """An error reply to ``task`` made by the engine itself (the ClientApp never answered)."""
    message = Message(metadata=task.metadata, content=RecordDict())
    return Result(task.id, Message(Error(code=code, reason=reason), reply_to=message))


class ClientRunner:
    """Runs tasks through one ClientApp in this process, as Flower's simulation engine runs messages.

    A ClientApp that raises becomes an error reply with Flower's code and wording
    (``CLIENT_APP_RAISED_EXCEPTION``, the exception wrapped in ``ClientAppException``), and
    the node's state is left as it was, as in Flower's engine.
    """

    def __init__(self, app_fn: Callable[[], ClientApp], *, run_id: int, num_partitions: int) -> None:
        self.app = app_fn()
        self.run_id = run_id
        self.num_partitions = num_partitions

    def run(self, task: Task) -> Result:
        message = Message(metadata=task.metadata, content=pickle.loads(task.content))
        context = Context(run_id=self.run_id, node_id=task.node_id,
                          node_config={PARTITION_ID_KEY: task.partition_id, NUM_PARTITIONS_KEY: self.num_partitions},
                          state=unpack_state(task.state), run_config={})
        try:
            reply = self.app(message=message, context=context)
        except Exception as exc:  # noqa: BLE001 (Flower's engine turns any ClientApp exception into an error reply)
            log(ERROR, "ClientApp of node %s raised:\n%s", task.node_id, traceback.format_exc())
            wrapped = ClientAppException(str(exc))
            reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            return Result(task.id, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                           reply_to=message))
        meta = reply.metadata
        if meta.reply_to_message_id != task.metadata.message_id or meta.src_node_id != task.node_id:
            reason = (f"the ClientApp's reply does not answer message {task.metadata.message_id} "
                      f"(reply_to_message_id={meta.reply_to_message_id!r}, src_node_id={meta.src_node_id})")
            return Result(task.id, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                           reply_to=message))
        return Result(task.id, reply, pack_state(context.state), updated=True)
