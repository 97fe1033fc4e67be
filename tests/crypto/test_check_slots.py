"""Only sums are decrypted: an aggregator that forges what it asks a key holder to decrypt gets nothing.

Each forgery is sent the way the aggregator sends a request (``fedgov.decryption.decrypt_request``)
to the code every key holder answers with (``answer_decrypt_request``, as the custodian node and a
key-holding cooperative run it), for both key holders; docs/he_check_slots.md gives the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgov.crypto import CheckStamp, EncryptedUpdate, PublicContext, SecretKeys, aggregate, encrypt_update
from fedgov.crypto.he_check import CheckKey, check_slots, check_values, verify_checks
from fedgov.crypto.keys import COOPERATIVE_CONTEXT, COOPERATIVE_KEYS, CUSTODIAN_KEYS, load_check_key, provision
from fedgov.crypto.he_presets import HEError, get_preset
from fedgov.decryption import answer_decrypt_request, decrypt_request

SHAPES = [(7, 5), (3,)]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class Party:
    """One key set: what cooperatives encrypt with and what the key holder decrypts with."""

    def __init__(self, key_dir, key_holder):
        self.key_holder = key_holder
        self.check_key = load_check_key(key_dir)
        if key_holder == "clients":
            self.secret = SecretKeys.from_bytes((key_dir / COOPERATIVE_KEYS).read_bytes())
            self.encrypt_with = self.secret
        else:
            self.secret = SecretKeys.from_bytes((key_dir / CUSTODIAN_KEYS).read_bytes())
            self.encrypt_with = PublicContext.from_bytes((key_dir / COOPERATIVE_CONTEXT).read_bytes())
        self.public = self.secret.public_context()
        # The key holder's node: its ledger of decrypted rounds lives in its own context.state.
        self.node = Context(run_id=1, node_id=77, node_config={}, state=RecordDict(), run_config={})

    def update(self, coop, server_round, scale=1.0):
        rng = np.random.default_rng([coop, server_round])
        arrays = [rng.normal(0.0, 0.01, size=s) * scale for s in SHAPES]
        return arrays, encrypt_update(arrays, context=self.encrypt_with, weight=0.25, workers=1,
                                      check=CheckStamp(self.check_key, server_round, coop))

    def ask(self, blobs, *, server_round, contributors):
        total = aggregate(blobs, context=self.public)
        request = decrypt_request(total.to_numpy(), server_round=server_round, contributors=contributors,
                                  dst_node_id=77)
        return answer_decrypt_request(request, self.node, keys=self.secret, check_key=self.check_key)


@pytest.fixture(scope="module", params=["clients", "custodian"])
def party(request, tmp_path_factory):
    return Party(provision(tmp_path_factory.mktemp(request.param), preset="standard", key_holder=request.param),
                 request.param)


def _refused(reply, match="not the sum"):
    assert reply.has_error(), "the key holder released a forged aggregate"
    assert match in reply.error.reason, reply.error.reason


def test_the_whole_sum_of_the_claimed_contributors_is_released(party):
    (a0, u0), (a1, u1), (a2, u2) = (party.update(c, 1) for c in range(3))
    reply = party.ask([u0, u1, u2], server_round=1, contributors=[0, 1, 2])
    assert not reply.has_error(), reply.error.reason
    released = [reply.content["arrays"][str(i)].numpy() for i in range(len(SHAPES))]
    for got, *parts in zip(released, a0, a1, a2):
        assert np.allclose(got, sum(parts) / 3, atol=1e-6)  # weights 0.25 each, divided by their sum


def test_one_update_relabelled_as_a_sum_of_two_is_refused(party):
    _, u0 = party.update(0, 2)
    relabelled = EncryptedUpdate.from_bytes(u0.to_numpy())
    relabelled.contributors = 2  # the header is the aggregator's to write
    _refused(party.ask([relabelled], server_round=2, contributors=[0, 1]))


def test_a_dropped_contributor_is_noticed(party):
    _, u0 = party.update(0, 3)
    _, u1 = party.update(1, 3)
    _refused(party.ask([u0, u1], server_round=3, contributors=[0, 1, 2]))


def test_one_cooperatives_update_twice_is_not_a_sum_of_two(party):
    _, u0 = party.update(0, 4)
    _refused(party.ask([u0, u0], server_round=4, contributors=[0, 1]))


def test_ciphertexts_of_another_round_do_not_pass(party):
    _, u0 = party.update(0, 5)
    _, u1_old = party.update(1, 4)  # cooperative 1's update of an earlier round
    _refused(party.ask([u0, u1_old], server_round=5, contributors=[0, 1]))


def test_a_scaled_update_does_not_pass(party):
    _, u0 = party.update(0, 6)
    _, u1 = party.update(1, 6)
    doubled = aggregate([u0, u0], context=party.public)  # 2 x u0 + u1: not the sum of 0 and 1
    _refused(party.ask([doubled, u1], server_round=6, contributors=[0, 1]))


def test_a_second_request_in_one_round_gets_nothing(party):
    _, u0 = party.update(0, 7)
    _, u1 = party.update(1, 7)
    _, u2 = party.update(2, 7)
    first = party.ask([u0, u1, u2], server_round=7, contributors=[0, 1, 2])
    assert not first.has_error(), first.error.reason
    _refused(party.ask([u0, u1], server_round=7, contributors=[0, 1]), match="already decrypted")


def test_a_refused_forgery_spends_the_round(party):
    _, u0 = party.update(0, 8)
    _, u1 = party.update(1, 8)
    _refused(party.ask([u0, u0], server_round=8, contributors=[0, 1]))
    # Otherwise an aggregator could probe with forgeries and then ask for a subset.
    _refused(party.ask([u0, u1], server_round=8, contributors=[0, 1]), match="already decrypted")


@pytest.mark.parametrize("preset_name", ["standard", "compact"])
def test_masking_data_of_one_with_checks_of_several_is_refused(preset_name):
    """Slot-wise masking (free under BFV, possible under CKKS) as the key holder would decrypt it:
    the data slots of cooperative 0, the check slots of 0 + 1."""
    preset = get_preset(preset_name)
    key = CheckKey(bytes(range(32)))
    rng = np.random.default_rng(0)
    if preset.scheme == "bfv":
        x0, x1 = (rng.integers(-2**40, 2**40, 500) for _ in range(2))
    else:
        x0, x1 = (rng.normal(0.0, 1e-3, 500) for _ in range(2))
    c0, c1 = (check_values(key, preset, x, server_round=1, cooperative=k, chunk=0) for k, x in enumerate((x0, x1)))
    verify_checks(key, preset, x0 + x1, c0 + c1, server_round=1, contributors=[0, 1], chunk=0)  # honest: passes
    with pytest.raises(HEError, match="not the sum"):
        verify_checks(key, preset, x0, c0 + c1, server_round=1, contributors=[0, 1], chunk=0)
    masked = x0.copy()
    masked[: len(masked) // 2] = 0  # half of the slots masked out
    with pytest.raises(HEError, match="not the sum"):
        verify_checks(key, preset, masked + x1, c0 + c1, server_round=1, contributors=[0, 1], chunk=0)
    # Checks of another ciphertext position do not fit either.
    c0_other = check_values(key, preset, x0, server_round=1, cooperative=0, chunk=1)
    with pytest.raises(HEError, match="not the sum"):
        verify_checks(key, preset, x0 + x1, c0_other + c1, server_round=1, contributors=[0, 1], chunk=0)
    assert len(c0) == check_slots(preset)
