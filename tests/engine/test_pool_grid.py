"""The pool engine's Grid keeps Flower's semantics: ids, metadata, contexts, errors, timeouts, faults."""

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedgov.engine import EngineError, PoolGrid, new_run
from fedgov.engine.pool import draw_node_ids
from fedgov.engine.workers import InProcessWorkers, ProcessWorkers

from .apps import broken_app, counting_app

NODES = 6


def _grid(pool_kind: str = "process", workers: int = 2) -> PoolGrid:
    run = new_run()
    if pool_kind == "process":
        pool = ProcessWorkers(counting_app, count=workers, run_id=run.run_id, num_partitions=NODES)
    else:
        pool = InProcessWorkers(counting_app, run_id=run.run_id, num_partitions=NODES)
    return PoolGrid(pool, run, draw_node_ids(NODES))


@pytest.fixture
def grid():
    grid = _grid()
    yield grid
    grid._pool.close()


def _round(grid: Grid, timeout: float | None = None, **config) -> dict[int, Message]:
    """One train message per node, all sharing one content (as FedAvg sends them); replies by node."""
    content = RecordDict({"config": ConfigRecord(config)})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in grid.get_node_ids()]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}


def _counts(replies: dict[int, Message]) -> dict[int, int]:
    return {node: int(r.content["metrics"]["n"]) for node, r in replies.items() if not r.has_error()}


def test_node_ids_and_messages_look_like_flowers(grid):
    nodes = grid.get_node_ids()
    assert len(set(nodes)) == NODES and isinstance(grid, Grid)
    assert all(0 < n < 2**64 and n != SUPERLINK_NODE_ID for n in nodes)
    assert max(n.bit_length() for n in nodes) > 32  # random 64-bit ids, not 1, 2, 3
    content = RecordDict({"config": ConfigRecord({})})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    replies = grid.send_and_receive(messages)
    ids = [m.metadata.message_id for m in messages]
    assert len(set(ids)) == NODES and all(ids)
    assert len(replies) == NODES
    for message, reply in zip(messages, replies):  # in the order sent
        meta = reply.metadata
        assert meta.src_node_id == message.metadata.dst_node_id
        assert meta.dst_node_id == SUPERLINK_NODE_ID
        assert meta.reply_to_message_id == message.metadata.message_id
        assert meta.run_id == grid.run.run_id
        assert meta.message_id and meta.message_id not in ids
        partition = int(reply.content["metrics"]["partition"])
        assert nodes[partition] == meta.src_node_id  # node i holds partition i
        assert reply.content["metrics"]["num-partitions"] == NODES


def test_push_and_pull_as_flower_grids_do(grid):
    content = RecordDict({"config": ConfigRecord({})})
    nodes = grid.get_node_ids()[:3]
    ids = list(grid.push_messages([Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]))
    # A message to a node that does not exist is dropped, as Flower's LinkState drops it.
    assert list(grid.push_messages([Message(content, dst_node_id=12345, message_type=MessageType.TRAIN)])) == []
    replies = []
    deadline = time.monotonic() + 60
    while len(replies) < 3 and time.monotonic() < deadline:
        replies += grid.pull_messages(ids)
        time.sleep(0.01)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert list(grid.pull_messages(ids)) == []  # pulled once


def test_each_node_keeps_its_context_and_gets_content_of_its_own(grid):
    first = _round(grid, mutate=[0])  # node 0 changes the record it received
    assert _counts(first) == {n: 1 for n in grid.get_node_ids()}
    assert all(r.content["metrics"]["saw-mutation"] == 0 for r in first.values())
    assert _counts(_round(grid)) == {n: 2 for n in grid.get_node_ids()}
    pids = {int(r.content["metrics"]["pid"]) for r in _round(grid).values()}
    assert os.getpid() not in pids  # the ClientApps ran in the workers, not here


def test_a_clientapp_that_raises_becomes_an_error_reply_and_keeps_its_state(grid):
    nodes = grid.get_node_ids()
    _round(grid)
    replies = _round(grid, **{"raise": [2]})
    error = replies[nodes[2]]
    assert error.has_error() and error.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "cooperative 2 broke" in error.error.reason
    assert error.metadata.reply_to_message_id and error.metadata.src_node_id == nodes[2]
    after = _counts(_round(grid))
    assert after[nodes[2]] == 2 and after[nodes[0]] == 3  # its failed round changed nothing


@pytest.mark.timeout(120)
def test_send_and_receive_honours_its_timeout_and_stops_the_hung_clientapp(grid):
    nodes = grid.get_node_ids()
    started = time.monotonic()
    replies = _round(grid, timeout=1.5, sleep=[4], **{"sleep-seconds": 30.0})
    assert time.monotonic() - started < 10
    assert nodes[4] not in replies and len(replies) == NODES - 1  # no reply, as on Flower's grids
    # The worker that ran it was stopped and replaced; the next round has every node.
    assert _counts(_round(grid)) == {n: (1 if n == nodes[4] else 2) for n in nodes}


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_round_costs_only_its_message(grid, tmp_path):
    nodes = grid.get_node_ids()
    _round(grid)
    pid_file = tmp_path / "pid"

    def kill_when_hung():
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_hung)
    killer.start()
    replies = _round(grid, hang=[3], **{"pid-file": str(pid_file)})
    killer.join()
    assert len(replies) == NODES
    lost = replies[nodes[3]]
    assert lost.has_error() and lost.error.code == ErrorCode.CLIENT_APP_CRASHED
    assert "died: killed by SIGKILL" in lost.error.reason
    assert _counts(replies) == {n: 2 for n in nodes if n != nodes[3]}
    assert grid._pool.replaced == 1 and len(grid._pool.pids) == 2
    # No node's context was lost: the next round counts on from where each node was.
    assert _counts(_round(grid)) == {n: (2 if n == nodes[3] else 3) for n in nodes}


def test_in_process_workers_leave_the_servers_generators_and_threads_alone():
    grid = _grid("in-process")
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    threads = torch.get_num_threads()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    content = RecordDict({"config": ConfigRecord({})})
    replies = grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.QUERY)
                                     for n in grid.get_node_ids()])
    assert all(int(r.content["metrics"]["pid"]) == os.getpid() for r in replies)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    # Contexts and content isolation hold in one process too.
    assert _counts(_round(grid, mutate=[0])) == {n: 1 for n in grid.get_node_ids()}
    assert all(r.content["metrics"]["saw-mutation"] == 0 for r in _round(grid).values())


def test_a_clientapp_that_cannot_be_built_stops_the_engine_with_its_reason():
    run = new_run()
    with pytest.raises(EngineError, match="could not build the ClientApp: RuntimeError: this ClientApp cannot be built"):
        pool = ProcessWorkers(broken_app, count=1, run_id=run.run_id, num_partitions=2)
        grid = PoolGrid(pool, run, draw_node_ids(2))
        grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                                       message_type=MessageType.TRAIN) for n in grid.get_node_ids()])
