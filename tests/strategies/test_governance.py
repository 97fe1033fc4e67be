"""The governance wrapper: malformed updates are rejected and recorded, weights follow the policy."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedgov.audit import digest_arrays
from fedgov.governance.archive import UpdateArchive
from fedgov.governance.electorate import Electorate
from fedgov.strategies import WEIGHT_KEY, GovernedAggregation
from fedgov.strategies.governance import check_update
from tests.strategies.conftest import FakeGrid

NODES = {501 + i: i for i in range(4)}  # node id -> cooperative id
SIZES = {0: 100, 1: 10, 2: 10, 3: 80}




def _global():
    return ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32)), "b": Array(np.zeros(3, dtype=np.float32))})


def _governed(policy="samples", archive=None, **kw):
    inner = flwr_strategy.FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                                 weighted_by_key=WEIGHT_KEY)
    kw = {"max_update_norm": 100.0, "clip_update_norm": 0.0, **kw}
    return GovernedAggregation(inner, electorate=Electorate(policy, cap=0.5), node_to_cooperative=NODES,
                               archive=archive, set_weights=True, **kw)


def _reply(message, coop, arrays, size=None):
    metrics = MetricRecord({"num-examples": SIZES[coop] if size is None else size})
    return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                       "metrics": metrics}), reply_to=message)


def _good(coop):
    return {"w": np.full((2, 3), float(coop + 1), dtype=np.float32), "b": np.full(3, float(coop + 1), dtype=np.float32)}


def _round(strategy, make):
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), FakeGrid(NODES)))
    replies = [make(m, NODES[m.metadata.dst_node_id]) for m in messages]
    return strategy.aggregate_train(1, replies)


def test_malformed_updates_are_rejected_with_a_reason_and_the_round_goes_on():
    def make(message, coop):
        if coop == 1:  # NaN
            bad = _good(coop)
            bad["w"][0, 0] = np.nan
            return _reply(message, coop, bad)
        if coop == 2:  # wrong shape
            return _reply(message, coop, {"w": np.ones((3, 2), dtype=np.float32), "b": np.ones(3, dtype=np.float32)})
        return _reply(message, coop, _good(coop))

    strategy = _governed()
    arrays, _ = _round(strategy, make)
    reasons = {r["cooperative"]: r["reason"] for r in strategy.last["rejected"]}
    assert set(reasons) == {1, 2}
    assert "NaN or Inf" in reasons[1] and "shape [3, 2], expected [2, 3]" in reasons[2]
    assert all(r["rejected"] for r in strategy.last["rejected"])
    # Only cooperatives 0 and 3 count, weighted 100 : 80.
    expected = (100 * 1.0 + 80 * 4.0) / 180
    assert np.allclose(arrays["w"].numpy(), expected)
    assert set(strategy.last["weights"]) == {0, 3}


def test_an_update_far_beyond_the_norm_bound_is_rejected():
    def make(message, coop):
        values = _good(coop)
        if coop == 3:
            values = {k: v * 1000 for k, v in values.items()}
        return _reply(message, coop, values)

    strategy = _governed(max_update_norm=50.0)
    arrays, _ = _round(strategy, make)
    (rejected,) = strategy.last["rejected"]
    assert rejected["cooperative"] == 3 and "exceeds governance.max_update_norm = 50" in rejected["reason"]
    assert arrays is not None


def test_missing_arrays_and_a_nonsense_size_claim_are_rejected():
    def make(message, coop):
        if coop == 0:
            return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=message)
        if coop == 1:
            return _reply(message, coop, _good(coop), size=-3)
        if coop == 2:
            return _reply(message, coop, {"w": _good(coop)["w"]})  # "b" missing
        return _reply(message, coop, _good(coop))

    strategy = _governed()
    _round(strategy, make)
    reasons = {r["cooperative"]: r["reason"] for r in strategy.last["rejected"]}
    assert "no model arrays" in reasons[0]
    assert "claimed data size -3" in reasons[1]
    assert "missing ['b']" in reasons[2]


def test_when_every_update_is_malformed_the_round_keeps_the_model():
    strategy = _governed()
    arrays, metrics = _round(strategy, lambda m, c: _reply(m, c, {"w": np.full((2, 3), np.inf, dtype=np.float32),
                                                                  "b": np.zeros(3, dtype=np.float32)}))
    assert arrays is None and metrics is None
    assert len(strategy.last["rejected"]) == 4


@pytest.mark.parametrize("policy, expected_w", [
    ("samples", (100 * 1 + 10 * 2 + 10 * 3 + 80 * 4) / 200),
    ("equal", (1 + 2 + 3 + 4) / 4),
])
def test_weights_follow_the_policy(policy, expected_w):
    strategy = _governed(policy)
    arrays, _ = _round(strategy, lambda m, c: _reply(m, c, _good(c)))
    assert np.allclose(arrays["w"].numpy(), expected_w)
    assert sum(strategy.last["weights"].values()) == pytest.approx(1.0)


def test_capped_policy_limits_the_whale():
    strategy = _governed("capped")  # cap 0.5
    _round(strategy, lambda m, c: _reply(m, c, _good(c)))
    assert max(strategy.last["weights"].values()) <= 0.5 + 1e-12


def test_clipping_defense_bounds_each_change_and_digests_keep_what_was_received(tmp_path):
    archive = UpdateArchive(tmp_path)
    strategy = _governed(clip_update_norm=1.0, archive=archive)
    arrays, _ = _round(strategy, lambda m, c: _reply(m, c, _good(c)))
    # Every change had norm > 1, so each became a unit vector along (1, ..., 1): the mean too.
    assert np.allclose(np.linalg.norm(np.concatenate([a.ravel() for a in arrays.to_numpy_ndarrays()])), 1.0)
    assert sorted(strategy.last["clipped"]) == [0, 1, 2, 3]
    for coop in range(4):
        received = [_good(coop)["w"], _good(coop)["b"]]
        assert strategy.last["digests"][coop] == digest_arrays(received)
        saved = UpdateArchive.load_arrays(archive.cooperative_files(1)[coop])
        assert digest_arrays(saved) == strategy.last["digests"][coop]
    assert archive.global_file(1).is_file()


def test_check_update_accepts_a_well_formed_update():
    reference = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    arrays = ArrayRecord({k: Array(v) for k, v in _good(0).items()})
    assert check_update(arrays, reference, max_norm=0.0) is None


@pytest.mark.parametrize("policy, liar_weight", [("samples", 0.7), ("equal", 0.25), ("capped", 0.5)])
def test_a_size_liar_gets_what_the_policy_lets_it_have_and_the_weights_show_it(policy, liar_weight):
    # In plaintext the aggregator applies the weights: cooperative 1 claims 700 examples, the others 100.
    claims = {0: 100, 1: 700, 2: 100, 3: 100}
    strategy = _governed(policy)  # capped at 0.5
    _round(strategy, lambda m, c: _reply(m, c, _good(c), size=claims[c]))
    assert strategy.last["weights"][1] == pytest.approx(liar_weight)


def test_equal_weighting_has_a_larger_nakamoto_coefficient_on_the_powerlaw_partition():
    from fedgov.config import DataConfig
    from fedgov.data import build_federation
    from fedgov.governance.weighting import influence, policy_weights

    federation = build_federation(DataConfig(partition="powerlaw"), seed=0)
    sizes = [len(c.train) for c in federation.cooperatives]
    samples = influence(policy_weights("samples", sizes))
    equal = influence(policy_weights("equal", sizes))
    assert equal["nakamoto"] > samples["nakamoto"]
    assert samples["max_weight"] > 2 / len(sizes)  # a whale: more than twice its equal share


def test_the_similarity_defense_down_weights_near_copies_and_spares_the_distinct():
    """Three near-copies of one update (sybils of one actor) against three distinct ones, equal weights."""
    nodes = {701 + i: i for i in range(6)}
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
    updates = {c: {k: rng.normal(size=v.shape) for k, v in base.items()} for c in range(3)}
    updates.update({c: {k: v + 0.01 * rng.normal(size=v.shape) for k, v in base.items()} for c in (3, 4, 5)})
    inner = flwr_strategy.FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                                 weighted_by_key=WEIGHT_KEY)
    strategy = GovernedAggregation(inner, electorate=Electorate("equal"), node_to_cooperative=nodes, archive=None,
                                   set_weights=True, max_update_norm=100.0, clip_update_norm=0.0,
                                   similarity_defense=True)
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), FakeGrid(nodes)))
    replies = [_reply(m, nodes[m.metadata.dst_node_id],
                      {k: v.astype(np.float32) for k, v in updates[nodes[m.metadata.dst_node_id]].items()}, size=10)
               for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    weights, similarity = strategy.last["weights"], strategy.last["similarity"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(similarity[c] > 0.99 for c in (3, 4, 5)) and all(similarity[c] < 0.9 for c in (0, 1, 2))
    assert sum(weights[c] for c in (3, 4, 5)) < 0.05  # together the near-copies hold almost nothing
    assert max(weights[c] for c in (0, 1, 2)) == pytest.approx(max(weights.values()))
    expected = sum(weights[c] * updates[c]["w"] for c in range(6))  # the model is aggregated with those weights
    assert np.allclose(arrays["w"].numpy(), expected, atol=1e-5)
    # Without the defense the same round gives each of the six a sixth.
    plain = _governed(policy="equal")
    plain.node_to_cooperative = nodes
    plain.configure_train(1, _global(), ConfigRecord(), FakeGrid(nodes))
    plain.aggregate_train(1, replies)
    assert all(w == pytest.approx(1 / 6) for w in plain.last["weights"].values()) and not plain.last["similarity"]
