"""The electorate: a registrar's merges, stakes, and the weights members end up with (worked by hand)."""

import numpy as np
import pytest

from fedgov.config import ConfigError, load_config
from fedgov.governance.electorate import Electorate, draw_stakes, electorate_for, verify_identities

# Actor 0 (60 examples) registered identity 3 and dealt it half its data: identities 0 and 3
# hold 30 each; members 1 and 2 hold 10 each.
CLAIMED = {0: 30.0, 1: 10.0, 2: 10.0, 3: 30.0}
ACTORS = [0, 1, 2, 0]


def test_one_member_one_vote_without_a_registrar_gives_the_sybil_two_votes():
    w = Electorate("equal").weights(CLAIMED)
    assert w == pytest.approx({0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25})  # actor 0: 1/2 of the weight


def test_a_caught_identity_is_merged_and_the_member_votes_once():
    # Merged: members {0, 3} (60), 1 (10), 2 (10) -> 1/3 each; the merged member's third is
    # shared 30:30 between its identities -> 1/6 each. Actor 0 drops from 1/2 to 1/3.
    w = Electorate("equal", merged={3: 0}).weights(CLAIMED)
    assert w == pytest.approx({0: 1 / 6, 1: 1 / 3, 2: 1 / 3, 3: 1 / 6})


def test_merging_under_sqrt_and_capped_by_hand():
    # sqrt: unmerged sqrt(30), sqrt(10), sqrt(10), sqrt(30) -> actor 0 holds 2*5.477/(2*5.477+2*3.162) = 0.634;
    # merged: sqrt(60) = 7.746 against 3.162 twice -> 7.746/14.071 = 0.5505, shared 1:1.
    unmerged = Electorate("sqrt").weights(CLAIMED)
    assert unmerged[0] + unmerged[3] == pytest.approx(2 * 30 ** 0.5 / (2 * 30 ** 0.5 + 2 * 10 ** 0.5))
    merged = Electorate("sqrt", merged={3: 0}).weights(CLAIMED)
    assert merged[0] == merged[3] == pytest.approx(0.5 * 60 ** 0.5 / (60 ** 0.5 + 2 * 10 ** 0.5))
    assert merged[1] == pytest.approx(10 ** 0.5 / (60 ** 0.5 + 2 * 10 ** 0.5))
    # capped at 0.5: unmerged 30/80 each stays under the cap (actor 0: 0.75); merged 60/80 = 0.75 is
    # cut to 0.5 and the rest shared 10:10 -> 0.25 each; actor 0 goes from 0.75 to 0.5.
    capped = Electorate("capped", cap=0.5, merged={3: 0}).weights(CLAIMED)
    assert capped == pytest.approx({0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25})
    assert Electorate("capped", cap=0.5).weights(CLAIMED)[0] == pytest.approx(0.375)


def test_merging_changes_nothing_under_fedavg():
    assert Electorate("samples", merged={3: 0}).weights(CLAIMED) == pytest.approx(
        Electorate("samples").weights(CLAIMED))


def test_a_merged_member_counts_once_even_when_only_its_sybils_show_up():
    claimed = {1: 10.0, 2: 10.0, 3: 30.0, 4: 30.0}  # identities 3 and 4 (actor 0) came, 0 did not
    w = Electorate("equal", merged={3: 0, 4: 0}).weights(claimed)
    assert w == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 6, 4: 1 / 6})


def test_stake_weights_follow_stakes_not_claims():
    e = Electorate("stake", stakes={0: 5.0, 1: 1.0, 2: 2.0, 3: 5.0})
    assert e.weights(CLAIMED) == pytest.approx({0: 5 / 13, 1: 1 / 13, 2: 2 / 13, 3: 5 / 13})
    assert e.weights({1: 1e9, 2: 1.0}) == pytest.approx({1: 1 / 3, 2: 2 / 3})  # a size lie gains nothing
    with pytest.raises(ValueError, match="stake"):
        Electorate("stake")


def test_the_registrar_catches_about_p_of_the_sybils_and_never_an_honest_member():
    actors = list(range(1000)) + [7] * 2000
    assert verify_identities(actors, catch=0.0, seed=1) == {}
    assert verify_identities(actors, catch=1.0, seed=1) == {c: 7 for c in range(1000, 3000)}
    caught = verify_identities(actors, catch=0.5, seed=1)
    assert set(caught.values()) == {7} and all(c >= 1000 for c in caught)
    assert 900 < len(caught) < 1100  # Binomial(2000, 0.5): 6 standard deviations either side
    assert verify_identities(actors, catch=0.5, seed=1) == caught  # seeded
    assert verify_identities(actors, catch=0.5, seed=2) != caught


def test_pareto_stakes_are_heavy_tailed_seeded_independent_of_data_and_shared_by_identities():
    honest = draw_stakes(list(range(10_000)), kind="pareto", shape=1.16, seed=3)
    values = np.sort(np.array(list(honest.values())))[::-1]
    top20 = values[:2000].sum() / values.sum()
    assert 0.6 < top20 < 0.95  # the 80/20 rule, with a Pareto tail's sampling spread
    assert values.min() >= 1.0
    with_sybils = draw_stakes(list(range(10_000)) + [5, 5], kind="pareto", shape=1.16, seed=3)
    assert with_sybils[5] == with_sybils[10_000] == with_sybils[10_001] == pytest.approx(honest[5] / 3)
    assert all(with_sybils[c] == honest[c] for c in range(10_000) if c != 5)  # nobody else's stake moves
    sized = draw_stakes([0, 1, 0], kind="size", shape=1.16, seed=0, sizes=[30, 10, 30])
    assert sized == {0: 30.0, 1: 10.0, 2: 30.0}


def test_the_run_electorate_from_config_and_the_registrar_needs_a_name():
    cfg = load_config(None, ["governance.weighting=equal", "governance.registrar=national-id-office",
                             "governance.registrar_catch=1"])
    e = electorate_for(cfg.governance, ACTORS, seed=0, sizes=list(CLAIMED.values()))
    assert e.merged == {3: 0} and e.weights(CLAIMED)[1] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="governance.registrar"):
        load_config(None, ["governance.registrar_catch=0.5"])
    with pytest.raises(ConfigError, match="governance.weighting"):
        load_config(None, ["governance.weighting=stake", "privacy.dp=user", "privacy.noise_multiplier=1"])


# Actor 0 behind identities 0, 3, 4 and 5 (its own first), members 1 and 2 honest.
FEE_ACTORS = [0, 1, 2, 0, 0, 0]
FEE_CLAIMED = {0: 20.0, 1: 10.0, 2: 10.0, 3: 20.0, 4: 20.0, 5: 20.0}


def test_a_fee_per_identity_registers_what_the_budget_pays_for_and_merges_the_rest():
    from fedgov.governance.electorate import unpaid_identities

    # Fee 1, budget 2.5: actor 0 pays for two identities, its own (0) and the next (3); 4 and 5
    # are not registered, so their data counts under actor 0's registered identities.
    assert unpaid_identities(FEE_ACTORS, fee=1.0, budget=2.5) == {4: 0, 5: 0}
    assert unpaid_identities(FEE_ACTORS, fee=1.0, budget=10.0) == {}  # rich enough for every identity
    assert unpaid_identities(FEE_ACTORS, fee=3.0, budget=2.0) == {3: 0, 4: 0, 5: 0}  # its own identity only
    assert unpaid_identities(FEE_ACTORS, fee=0.0, budget=0.0) == {}  # no fee: nothing merged
    # One member, one vote: members {0, 4, 5} (60), {3} (20), 1 and 2 -> 1/4 each; the first
    # member's quarter is shared 20:20:20 -> 1/12 each. Actor 0 holds 1/4 + 1/4 = 1/2, down from 4/6.
    w = Electorate("equal", merged={4: 0, 5: 0}).weights(FEE_CLAIMED)
    assert w == pytest.approx({0: 1 / 12, 4: 1 / 12, 5: 1 / 12, 3: 1 / 4, 1: 1 / 4, 2: 1 / 4})
    assert Electorate("equal").weights(FEE_CLAIMED)[0] * 4 == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="negative"):
        unpaid_identities(FEE_ACTORS, fee=-1.0, budget=1.0)


def test_a_budget_pays_for_the_identities_its_decimals_say_not_what_binary_floats_round_to():
    from fedgov.governance.electorate import unpaid_identities

    assert 1.0 // 0.1 == 9.0 and 0.3 / 0.1 < 3  # why the division is exact
    whale = [0] * 12  # one actor behind twelve identities
    assert sorted(unpaid_identities(whale, fee=0.1, budget=1.0)) == [10, 11]  # ten paid for, not nine
    assert sorted(unpaid_identities(whale, fee=0.1, budget=0.3)) == list(range(3, 12))  # three
    assert sorted(unpaid_identities(whale, fee=0.1, budget=0.35)) == list(range(3, 12))  # 3.5: still three


def test_the_fee_and_the_catch_combine_and_the_audit_record_names_both():
    from fedgov.governance.electorate import registrar_record

    cfg = load_config(None, ["governance.weighting=equal", "governance.registrar=dao-registry",
                             "governance.registrar_fee=1", "governance.identity_budget=2",
                             "governance.registrar_catch=1"])
    e = electorate_for(cfg.governance, FEE_ACTORS, seed=0, sizes=list(FEE_CLAIMED.values()))
    assert e.merged == {3: 0, 4: 0, 5: 0}  # 4 and 5 unpaid, 3 paid for but seen through
    record = registrar_record(cfg.governance, e, FEE_ACTORS)
    assert record["unpaid"] == ["4", "5"] and record["merged"] == {"3": 0, "4": 0, "5": 0}
    assert record["fee_per_identity"] == 1.0 and record["identity_budget"] == 2.0
    fee_only = load_config(None, ["governance.weighting=equal", "governance.registrar=dao-registry",
                                  "governance.registrar_fee=1", "governance.identity_budget=2"])
    assert electorate_for(fee_only.governance, FEE_ACTORS, seed=0, sizes=[1] * 6).merged == {4: 0, 5: 0}
    with pytest.raises(ConfigError, match="governance.registrar"):
        load_config(None, ["governance.registrar_fee=1"])
