"""The strategy wrapper: seeded cohorts, reply order, and every Flower strategy by name."""

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgov.config import Config
from fedgov.strategies import STRATEGIES, CohortSampler, RoundRecorder, build_strategy, govern
from tests.strategies.conftest import FakeGrid

NODES = {1001 + 7 * i: i for i in range(6)}  # node id -> cooperative id




def _global():
    rng = np.random.default_rng(0)
    return ArrayRecord({"w": Array(rng.normal(size=(4, 3)).astype(np.float32)),
                        "b": Array(rng.normal(size=3).astype(np.float32))})


def _replies(messages, scale=0.1):
    replies = []
    for m in messages:
        coop = NODES[m.metadata.dst_node_id]
        rng = np.random.default_rng(coop)
        arrays = {k: Array((v.numpy() + scale * rng.normal(size=v.numpy().shape)).astype(np.float32))
                  for k, v in m.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10 + coop, "train_loss": 1.0 + coop / 10, "partition-id": coop})
        replies.append(Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}),
                               reply_to=m))
    return replies


def _recorder(cfg, **kw):
    strategy = build_strategy(cfg)
    if cfg.secure.aggregation == "off":  # as the server does: the governance policy sets the weights
        strategy = govern(strategy, cfg, node_to_cooperative=NODES)
    return RoundRecorder(strategy, node_to_cooperative=NODES,
                         sampler=CohortSampler(seed=cfg.seed, fraction=cfg.strategy.fraction_train), **kw)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_named_strategy_aggregates(name):
    cfg = Config().replace(**{"strategy.name": name, "data.num_cooperatives": 6})
    recorder = _recorder(cfg)
    messages = list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES)))
    assert len(messages) == 6
    arrays, _ = recorder.aggregate_train(1, _replies(messages))
    assert arrays is not None
    out = arrays.to_numpy_ndarrays()
    assert [a.shape for a in out] == [(4, 3), (3,)]
    assert all(np.isfinite(a).all() for a in out)
    log = recorder.current
    assert log.participants == list(range(6))
    assert log.bytes_down == 6 * _global().count_bytes()
    assert log.bytes_up > 0


def test_fedavg_result_does_not_depend_on_reply_order():
    cfg = Config().replace(**{"data.num_cooperatives": 6})
    results = []
    for shuffle_seed in range(3):
        recorder = _recorder(cfg)
        replies = _replies(list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES))))
        random.Random(shuffle_seed).shuffle(replies)
        arrays, _ = recorder.aggregate_train(1, replies)
        results.append(np.concatenate([a.ravel() for a in arrays.to_numpy_ndarrays()]).tobytes())
    assert len(set(results)) == 1


def test_fedavg_weights_by_examples():
    cfg = Config().replace(**{"data.num_cooperatives": 6})
    recorder = _recorder(cfg)
    replies = _replies(list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES))))
    arrays, _ = recorder.aggregate_train(1, replies)
    updates = {NODES[r.metadata.src_node_id]: r.content["arrays"]["b"].numpy() for r in replies}
    weights = {c: 10 + c for c in updates}
    expected = sum(weights[c] * updates[c] for c in updates) / sum(weights.values())
    np.testing.assert_allclose(arrays["b"].numpy(), expected, rtol=1e-6)


def test_cohort_sampler_is_seeded_and_sized():
    sampler = CohortSampler(seed=3, fraction=0.5)
    first = [sampler.sample(r, range(10)) for r in range(1, 6)]
    assert first == [CohortSampler(seed=3, fraction=0.5).sample(r, range(10)) for r in range(1, 6)]
    assert all(len(s) == 5 and s == sorted(s) for s in first)
    assert len({tuple(s) for s in first}) > 1
    assert CohortSampler(seed=4, fraction=0.5).sample(1, range(10)) != first[0] or \
        CohortSampler(seed=4, fraction=0.5).sample(2, range(10)) != first[1]
    assert CohortSampler(seed=0, fraction=0.01).sample(1, range(10)) != []  # at least one


def test_only_sampled_cooperatives_are_asked():
    cfg = Config().replace(**{"data.num_cooperatives": 6, "strategy.fraction_train": 0.5})
    recorder = _recorder(cfg)
    messages = list(recorder.configure_train(4, _global(), ConfigRecord(), FakeGrid(NODES)))
    asked = sorted(NODES[m.metadata.dst_node_id] for m in messages)
    assert asked == recorder.current.sampled == CohortSampler(seed=0, fraction=0.5).sample(4, range(6))


def test_failed_replies_are_recorded_not_fatal():
    cfg = Config().replace(**{"data.num_cooperatives": 6})
    recorder = _recorder(cfg)
    messages = list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES)))
    replies = _replies(messages[1:])
    from flwr.app import Error
    replies.append(Message(Error(code=0, reason="out of memory"), reply_to=messages[0]))
    arrays, _ = recorder.aggregate_train(1, replies)
    assert arrays is not None
    # An engine error (code 0, not a fedgov decline) is a crash of that cooperative, recorded as one line.
    assert recorder.current.failures == [{"cooperative": NODES[messages[0].metadata.dst_node_id],
                                          "reason": "out of memory", "crashed": True, "phase": "train"}]
    assert len(recorder.current.participants) == 5


def test_round_offset_shows_clients_the_true_round():
    cfg = Config().replace(**{"data.num_cooperatives": 6})
    recorder = _recorder(cfg, round_offset=7)
    messages = list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES)))
    assert recorder.current.round == 8
    assert messages[0].content["config"]["server-round"] == 8


def test_an_error_the_superlink_writes_for_a_lost_node_is_the_cooperatives():
    """On the Deployment Engine a node that stops sending heartbeats is answered by the SuperLink,
    from the SuperLink's own node id: the failure still belongs to the cooperative it was sent to."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID

    cfg = Config().replace(**{"data.num_cooperatives": 6})
    recorder = _recorder(cfg)
    messages = list(recorder.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES)))
    for m in messages:  # what a grid does when it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    lost = next(m for m in messages if NODES[m.metadata.dst_node_id] == 4)
    replies = [r for r in _replies(messages) if r.metadata.reply_to_message_id != lost.metadata.message_id]
    unavailable = Message(Error(code=5, reason="Error: Node Unavailable - no heartbeat"), reply_to=lost)
    unavailable.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID
    recorder.aggregate_train(1, [*replies, unavailable])
    log = recorder.current
    assert log.participants == [0, 1, 2, 3, 5]
    assert [(f["cooperative"], f["reason"]) for f in log.failures] == [(4, "Error: Node Unavailable - no heartbeat")]
