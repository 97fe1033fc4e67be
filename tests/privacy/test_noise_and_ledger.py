"""DP-SGD's noise source and the ledger's way across a crash, without a federation."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgov.node import Node
from fedgov.mechanisms.dp_sgd import train_privately
from fedgov.config import Config
from fedgov.data import build_federation
from fedgov.models import build_model
from fedgov.privacy.accounting import PrivacyLedger, RoundSpend, default_delta, epsilon_of
from fedgov.privacy.dp_sgd import plan_round, train_private
from fedgov.privacy.resume import RECORDED_LEDGER_KEY, LedgerHandover, decode_spends, encode_spends, recorded_spends
from fedgov.run_record import Checkpoint, RunRecord

from . import rdp_reference


# -- the reference accountant the end-to-end tests use --------------------------------------

def test_reference_accountant_formulas_agree_with_each_other():
    # The closed-form binomial sum and the quadrature compute the same A_alpha at integer orders.
    for q, sigma in [(0.05, 1.15), (0.2, 0.7), (0.01, 3.0)]:
        for alpha in (2, 5, 17, 40):
            assert rdp_reference.log_a_quadrature(q=q, sigma=sigma, alpha=alpha) == pytest.approx(
                rdp_reference.log_a_binomial(q=q, sigma=sigma, alpha=alpha), rel=1e-7, abs=1e-12)


def test_fedgov_epsilon_agrees_with_the_reference_accountant():
    for spends, delta in [([(1.15, 1 / 18, 144)], 3.5e-4), ([(0.8, 0.1, 50), (1.5, 0.05, 30)], 1e-5)]:
        ours = epsilon_of([RoundSpend(*s) for s in spends], delta=delta)
        assert ours == pytest.approx(rdp_reference.epsilon(spends, delta=delta), rel=0.01)


# -- unpredictable noise ----------------------------------------------------------------------

def _train_once(seed):
    fed = build_federation(Config().data, seed=0)
    coop = fed.cooperatives[1]
    ledger = PrivacyLedger(delta=default_delta(len(coop.train.y)), budget=math.inf)
    spend = plan_round(ledger, num_examples=len(coop.train.y), batch_size=16, epochs=1, rounds=5,
                       noise_multiplier=1.0, target_epsilon=0.0)
    model = build_model("mlp", input_shape=fed.input_shape, num_classes=10, seed=0)
    torch.manual_seed(0)  # as fixed as the global generator of a fresh process: must not matter
    train_private(model, coop.train.x, coop.train.y, spend=spend, batch_size=16, epochs=1, lr=0.05,
                  momentum=0.0, max_grad_norm=1.0, grad_sample_mode="hooks", device=torch.device("cpu"), seed=seed)
    return [t.detach().clone() for t in model.state_dict().values()]


def test_default_noise_differs_between_identical_calls():
    a, b = _train_once(None), _train_once(None)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def test_seeded_noise_repeats_exactly():
    a, b = _train_once(1234), _train_once(1234)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, _train_once(1235)))


def test_seeded_noise_is_off_by_default():
    assert Config().privacy.seeded_noise is False
    cfg = Config().replace(**{"privacy.dp": "sample", "privacy.target_epsilon": 3.0})
    from fedgov.privacy import OS_NOISE, SEEDED_NOISE
    from fedgov.run_record import mechanism

    assert mechanism(cfg)["dp_noise"] == OS_NOISE
    assert mechanism(cfg.replace(**{"privacy.seeded_noise": True}))["dp_noise"] == SEEDED_NOISE
    assert "only against parties that do not hold the config" in SEEDED_NOISE


# -- the ledger: recorded, checkpointed, handed over, adopted --------------------------------

def _row(round_, spends):
    return {"round": round_, "client_train": {
        str(c): {"dp_noise_multiplier": z, "dp_sample_rate": q, "dp_steps": n, "dp_epsilon": 0.0}
        for c, (z, q, n) in spends.items()}}


def test_checkpoint_holds_each_cooperatives_spends(tmp_path):
    cfg = Config().replace(**{"privacy.dp": "sample", "privacy.target_epsilon": 3.0})
    record = RunRecord(tmp_path, cfg, cooperatives={}, num_parameters=1, device="cpu")
    record.rows = [_row(1, {0: (1.2, 0.05, 20), 1: (1.3, 0.1, 10)}), _row(2, {1: (1.3, 0.1, 10)})]
    record.save_checkpoint(ArrayRecord({"w": torch.zeros(3)}))
    checkpoint = Checkpoint.load(tmp_path)
    assert checkpoint.round == 2
    assert checkpoint.ledgers == {0: [(1.2, 0.05, 20)], 1: [(1.3, 0.1, 10), (1.3, 0.1, 10)]}
    assert checkpoint.ledgers == recorded_spends(record.rows)
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary file and renamed


def test_checkpoint_without_dp_has_no_ledgers(tmp_path):
    record = RunRecord(tmp_path, Config(), cooperatives={}, num_parameters=1, device="cpu")
    record.rows = [{"round": 1, "client_train": {"0": {"local_loss": 1.0}}}]
    record.save_checkpoint(ArrayRecord({"w": torch.zeros(3)}))
    assert Checkpoint.load(tmp_path).ledgers == {}


@pytest.fixture
def task_identity(monkeypatch):
    # Messages need a run identity; the simulation engine sets one the same way.
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _FakeGrid:
    def __init__(self, fail=()):
        self.sent, self.fail = [], set(fail)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            if m.metadata.dst_node_id in self.fail:
                reply = Message(Error(code=1, reason="declined"), reply_to=m)
            else:
                reply = Message(RecordDict({}), reply_to=m)
            replies.append(reply)
        return replies

    def get_node_ids(self):
        return [11, 12, 13]


def _train_messages(nodes):
    shared = RecordDict({"config": ConfigRecord({"server-round": 1}), "arrays": ArrayRecord({"w": torch.zeros(2)})})
    return shared, [Message(content=shared, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]


def test_handover_gives_each_node_only_its_own_ledger_until_it_answers(task_identity):
    grid = _FakeGrid(fail={12})
    handover = LedgerHandover(grid, {11: [(1.2, 0.05, 20)], 12: [(1.3, 0.1, 10), (1.3, 0.1, 10)]})
    shared, messages = _train_messages([11, 12, 13])
    replies = handover.send_and_receive(messages)
    assert {r.metadata.src_node_id for r in replies} == {11, 12, 13}
    carried = {m.metadata.dst_node_id: m.content["config"].get(RECORDED_LEDGER_KEY) for m in grid.sent}
    assert decode_spends(carried[11]) == [(1.2, 0.05, 20)]
    assert decode_spends(carried[12]) == [(1.3, 0.1, 10), (1.3, 0.1, 10)]
    assert carried[13] is None
    assert RECORDED_LEDGER_KEY not in shared["config"]  # the strategy's shared payload is untouched
    assert all("arrays" in m.content for m in grid.sent)
    # Round 2: node 11 answered, node 12 declined (error): only 12 still gets its ledger.
    grid.sent.clear()
    handover.send_and_receive(_train_messages([11, 12, 13])[1])
    carried = {m.metadata.dst_node_id: m.content["config"].get(RECORDED_LEDGER_KEY) for m in grid.sent}
    assert carried[11] is None and carried[12] is not None and carried[13] is None
    assert handover.get_node_ids() == [11, 12, 13]  # everything else passes through


def test_handover_leaves_other_message_types_alone(task_identity):
    grid = _FakeGrid()
    handover = LedgerHandover(grid, {11: [(1.2, 0.05, 20)]})
    query = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=11)
    handover.send_and_receive([query])
    assert RECORDED_LEDGER_KEY not in grid.sent[0].content["config"]
    shared, messages = _train_messages([11])
    handover.send_and_receive(messages)
    assert RECORDED_LEDGER_KEY in grid.sent[-1].content["config"]


@pytest.fixture(scope="module")
def dp_node_config():
    return Config().replace(**{"data.num_cooperatives": 4, "data.partition": "iid", "privacy.dp": "sample",
                               "privacy.target_epsilon": 3.0, "train.rounds": 4, "train.local_epochs": 1})


def _context():
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                   run_config={})


def _private_round(cfg, context, round_config):
    node = Node(context, cfg)
    fed = node.federation
    model = build_model("mlp", input_shape=fed.input_shape, num_classes=fed.num_classes, seed=0)
    x, y = node.cooperative.train.x, node.cooperative.train.y
    _, metrics = train_privately(model, cfg=node.config, context=context, seed=1, x=x, y=y,
                                 round_config=round_config, device=node.device)
    return metrics


def test_a_fresh_cooperative_adopts_the_recorded_ledger_and_keeps_its_own_after(dp_node_config):
    context = _context()
    first = _private_round(dp_node_config, context, {})
    spend = (first["dp_noise_multiplier"], first["dp_sample_rate"], int(first["dp_steps"]))
    delta = first["dp_delta"]
    assert first["dp_epsilon"] == pytest.approx(epsilon_of([RoundSpend(*spend)], delta=delta), rel=1e-9)

    # A resumed run: new Flower run, empty context.state, two recorded rounds in the message.
    resumed = _context()
    metrics = _private_round(dp_node_config, resumed, {RECORDED_LEDGER_KEY: encode_spends([spend, spend])})
    assert metrics["dp_epsilon"] == pytest.approx(epsilon_of([RoundSpend(*spend)] * 3, delta=delta), rel=1e-9)
    assert metrics["dp_noise_multiplier"] == first["dp_noise_multiplier"]  # derived by the cooperative itself

    # With a ledger of its own, a record in a later message is ignored (it cannot reset the budget).
    again = _private_round(dp_node_config, resumed, {RECORDED_LEDGER_KEY: encode_spends([])})
    assert again["dp_epsilon"] == pytest.approx(epsilon_of([RoundSpend(*spend)] * 4, delta=delta), rel=1e-9)


def test_a_malformed_recorded_ledger_is_refused(dp_node_config):
    with pytest.raises(ValueError, match="invalid spend"):
        _private_round(dp_node_config, _context(), {RECORDED_LEDGER_KEY: encode_spends([(0.0, 0.05, 10)])})
    with pytest.raises(ValueError, match="invalid spend"):
        _private_round(dp_node_config, _context(), {RECORDED_LEDGER_KEY: encode_spends([(1.0, 1.5, 10)])})
