"""Under HE, a malformed or dishonest ciphertext is rejected and recorded, and the round goes on."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedgov.crypto import CheckStamp, PublicContext, encrypt_update, generate_keys
from fedgov.crypto.keys import COOPERATIVE_CONTEXT, provision
from fedgov.governance.archive import UpdateArchive
from fedgov.governance.electorate import Electorate
from fedgov.strategies.secure_he import HESecureAggregation
from tests.strategies.conftest import CUSTODIAN_NODE, CustodianGrid, FakeGrid

NODES = {701 + i: i for i in range(5)}
SIZES = {c: 10 for c in NODES.values()}




@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("keys"), preset="standard", key_holder="custodian")


def _message(reply_to, blob):
    return Message(content=RecordDict({"he-update": ArrayRecord({"ciphertext": Array(blob)}),
                                       "metrics": MetricRecord({"num-examples": 10})}), reply_to=reply_to)


def test_bad_ciphertexts_are_rejected_and_the_rest_are_summed(key_dir, tmp_path):
    public = PublicContext.from_bytes((key_dir / COOPERATIVE_CONTEXT).read_bytes())
    archive = UpdateArchive(tmp_path)
    strategy = HESecureAggregation(
        flwr_strategy.FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1), key_dir=key_dir,
        custodian_node=CUSTODIAN_NODE, examples=SIZES, node_to_cooperative=NODES, verify=False, electorate=Electorate("equal"),
        archive=archive)
    start = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32))})
    grid = CustodianGrid(NODES, key_dir)
    messages = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    weight = messages[0].content["config"]["he-weight"]
    assert weight == pytest.approx(0.2)


    def honest(value, coop):  # round 1, with the check slots the custodian verifies
        return encrypt_update([np.full((3, 4), value)], context=public, weight=weight,
                              check=CheckStamp(grid.check_key, 1, coop)).to_numpy()

    other_keys = generate_keys("standard", mode="custodian").public_context()
    blobs = {
        0: honest(1.0, 0),
        1: encrypt_update([np.ones((3, 4))], context=other_keys, weight=weight).to_numpy(),  # foreign keys
        2: encrypt_update([np.ones((4, 3))], context=public, weight=weight).to_numpy(),  # wrong shape
        3: encrypt_update([np.ones((3, 4))], context=public, weight=0.9).to_numpy(),  # claims more weight
        4: honest(3.0, 4),
    }
    corrupt = honest(5.0, 0).copy()
    corrupt[len(corrupt) // 2:len(corrupt) // 2 + 64] ^= 0xFF  # the header parses, a ciphertext does not
    replies = [_message(m, blobs[NODES[m.metadata.dst_node_id]]) for m in messages]
    to_coop0 = next(m for m in messages if NODES[m.metadata.dst_node_id] == 0)
    replies.append(_message(to_coop0, corrupt))  # a second, corrupted reply claiming to be cooperative 0
    arrays, _ = strategy.aggregate_train(1, replies)

    reasons = [(r["cooperative"], r["reason"]) for r in strategy.last["rejected"]]
    by_coop = {}
    for coop, reason in reasons:
        by_coop.setdefault(coop, []).append(reason)
    assert "different keys" in by_coop[1][0]
    assert "layer shapes" in by_coop[2][0]
    assert "weight 0.9" in by_coop[3][0]
    assert len(by_coop[0]) == 1  # the corrupted copy; the honest update of cooperative 0 was summed
    # (1 + 3) * 0.2 / (0.2 + 0.2) = 2: the mean of the two honest updates.
    assert np.allclose(arrays["w"].numpy(), 2.0, atol=1e-5)
    assert sorted(strategy.last["digests"]) == [0, 4]
    assert sorted(archive.cooperative_files(1)) == [0, 4]


def test_each_cooperative_is_told_its_own_weight(key_dir):
    # Flower's strategies send one shared RecordDict to every node; a per-node weight must not leak across.
    sizes = {c: 10 * (c + 1) for c in NODES.values()}
    strategy = HESecureAggregation(
        flwr_strategy.FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1), key_dir=key_dir,
        custodian_node=CUSTODIAN_NODE, examples=sizes, node_to_cooperative=NODES, verify=False, electorate=Electorate("samples"))
    start = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32))})
    messages = list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid(NODES)))
    told = {NODES[m.metadata.dst_node_id]: m.content["config"]["he-weight"] for m in messages}
    assert told == pytest.approx({c: (c + 1) / 15 for c in range(5)})
