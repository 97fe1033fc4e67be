"""Sybils: one actor behind several identities, influence per actor, and the similarity defense."""

import numpy as np
import pytest

from fedgov.config import ConfigError, load_config
from fedgov.data import build_federation
from fedgov.data.datasets import DataError


def _federation(*sets: str):
    cfg = load_config(None, list(sets))
    return build_federation(cfg.data, seed=cfg.seed)


def test_split_deals_the_actors_data_across_its_identities():
    honest = _federation()
    fed = _federation("data.sybil_identities=3")
    actor = max(range(10), key=lambda c: len(honest.cooperatives[c].train))
    assert fed.num_cooperatives == 13 and fed.actors == tuple(range(10)) + (actor,) * 3 and fed.has_sybils
    identities = [fed.cooperatives[c] for c in (actor, 10, 11, 12)]
    rows = np.concatenate([c.train.index for c in identities])
    assert sorted(rows) == sorted(honest.cooperatives[actor].train.index)  # the same rows, dealt, none twice
    test_rows = np.concatenate([c.test.index for c in identities])
    assert sorted(test_rows) == sorted(honest.cooperatives[actor].test.index)
    assert max(len(c.train) for c in identities) - min(len(c.train) for c in identities) <= 1
    for c in range(10):  # everyone else is untouched
        if c != actor:
            assert np.array_equal(fed.cooperatives[c].train.index, honest.cooperatives[c].train.index)
    assert [c.name for c in fed.cooperatives[10:]] == ["coop-10", "coop-11", "coop-12"]  # nothing gives them away
    assert not honest.has_sybils and honest.actor_of(3) == 3


def test_copies_and_a_chosen_actor():
    fed = _federation("data.sybil_identities=2", "data.sybil_mode=copies", "data.sybil_actor=1")
    assert fed.actors[-2:] == (1, 1)
    for c in (10, 11):
        assert np.array_equal(fed.cooperatives[c].train.index, fed.cooperatives[1].train.index)


def test_an_actor_too_small_to_split_and_a_bad_actor_are_clear_errors():
    with pytest.raises(DataError, match="data.sybil_identities"):
        _federation("data.sybil_identities=40")
    with pytest.raises(ConfigError, match="data.sybil_actor"):
        load_config(None, ["data.sybil_identities=2", "data.sybil_actor=10"])
    for other in (["secure.aggregation=he"], ["privacy.dp=user", "privacy.noise_multiplier=1"]):
        with pytest.raises(ConfigError, match="governance.similarity_defense"):
            load_config(None, ["governance.similarity_defense=true", *other])


@pytest.mark.slow
def test_a_whale_behind_several_identities_is_measured_as_one_actor_and_the_defense_cuts_it_down(tmp_path):
    """One member, one vote: undefended, a whale with three extra identities holds 4 of 13 votes."""
    from conftest import run_dir_of, run_simulate
    from fedgov.governance.weighting import influence
    from fedgov.results import read_json, read_jsonl

    run = run_dir_of(run_simulate("--set", "data.sybil_identities=3", "--set", "governance.weighting=equal",
                                  "--set", "governance.similarity_defense=true", "--set", "train.rounds=3",
                                  "--set", "train.local_epochs=1", "--out", str(tmp_path)))
    summary = read_json(run / "summary.json")
    actors = {str(c["id"]): str(c["actor"]) for c in summary["cooperatives"]}
    assert len(actors) == 13 and len(set(actors.values())) == 10
    whale = max(set(actors.values()), key=list(actors.values()).count)
    assert [c for c, a in actors.items() if a == whale] == [whale, "10", "11", "12"]

    rows = read_jsonl(run / "metrics.jsonl")
    assert all(sorted(r["contributors"]) == list(range(13)) for r in rows)  # every identity took part
    assert all(set(r["update_similarity"]) == {str(c) for c in r["contributors"]} for r in rows)
    totals: dict[str, float] = {}
    for row in rows:
        for c, w in row["weights"].items():
            totals[actors[c]] = totals.get(actors[c], 0.0) + w
    shares = {a: w / sum(totals.values()) for a, w in totals.items()}
    by_actor = summary["influence"]["run_by_actor"]
    assert by_actor["members"] == 10 and summary["influence"]["run"]["members"] == 13
    assert by_actor["nakamoto"] == influence(list(shares.values()))["nakamoto"]
    assert by_actor["max_weight"] == pytest.approx(max(shares.values()))
    # The defense scales down the near-identical updates of the whale's identities.
    assert shares[whale] < 4 / 13


def test_a_registrar_that_catches_every_sybil_merges_them_and_the_audit_log_names_it(tmp_path):
    """One member, one vote with a perfect registrar: the whale's 4 identities hold one vote of 10."""
    from conftest import run_dir_of, run_simulate
    from fedgov.results import read_json, read_jsonl

    run = run_dir_of(run_simulate("--set", "data.sybil_identities=3", "--set", "governance.weighting=equal",
                                  "--set", "governance.registrar=civil-registry", "--set",
                                  "governance.registrar_catch=1", "--set", "train.rounds=2", "--set",
                                  "train.local_epochs=1", "--set", "runtime.workers=0", "--out", str(tmp_path)))
    summary = read_json(run / "summary.json")
    actors = {str(c["id"]): c["actor"] for c in summary["cooperatives"]}
    whale = actors["10"]
    identities = [c for c, a in actors.items() if a == whale]
    assert len(identities) == 4
    for row in read_jsonl(run / "metrics.jsonl"):  # everyone trains every round: 10 members, 1/10 each
        assert sum(row["weights"][c] for c in identities) == pytest.approx(0.1)
        assert all(row["weights"][c] == pytest.approx(0.1) for c in actors if c not in identities)
    assert summary["influence"]["run_by_actor"]["max_weight"] == pytest.approx(0.1)
    assert summary["influence"]["sybil_weight"] == pytest.approx(0.1)
    assert summary["influence"]["registrar"] == {"name": "civil-registry", "catch_probability": 1.0,
                                                 "fee_per_identity": 0.0, "merged": 3, "unpaid": 0,
                                                 "sybil_identities": 3}
    registrar = read_jsonl(run / "audit.jsonl")[0]["body"]["registrar"]  # the run_start record
    assert registrar["name"] == "civil-registry" and "admits members" in registrar["power"]
    assert registrar["merged"] == {c: whale for c in ("10", "11", "12")}
    from fedgov.audit import verify

    result = verify(run)
    assert result.ok and "registrar 'civil-registry' (3 of 13 identities merged" in result.covered


def test_a_registrar_that_charges_per_identity_admits_what_the_whale_can_pay_for(tmp_path):
    """A fee of 1 against a budget of 2: the whale registers its own identity and one sybil; its other
    two identities are merged into it, so it holds 2 of the 11 members' votes."""
    from conftest import run_dir_of, run_simulate
    from fedgov.results import read_json, read_jsonl

    run = run_dir_of(run_simulate("--set", "data.sybil_identities=3", "--set", "governance.weighting=equal",
                                  "--set", "governance.registrar=dao-registry", "--set", "governance.registrar_fee=1",
                                  "--set", "governance.identity_budget=2", "--set", "train.rounds=2", "--set",
                                  "train.local_epochs=1", "--set", "runtime.workers=0", "--out", str(tmp_path)))
    summary = read_json(run / "summary.json")
    actors = {str(c["id"]): c["actor"] for c in summary["cooperatives"]}
    whale = actors["10"]
    identities = [c for c, a in actors.items() if a == whale]
    for row in read_jsonl(run / "metrics.jsonl"):
        assert sum(row["weights"][c] for c in identities) == pytest.approx(2 / 11)
    registrar = read_jsonl(run / "audit.jsonl")[0]["body"]["registrar"]
    assert registrar["unpaid"] == ["11", "12"] and registrar["merged"] == {"11": whale, "12": whale}
    assert summary["influence"]["registrar"]["unpaid"] == 2 and summary["influence"]["sybil_weight"] == pytest.approx(
        2 / 11)


def test_stake_weights_follow_the_stakes_the_audit_log_records(tmp_path):
    from conftest import run_dir_of, run_simulate
    from fedgov.results import read_jsonl

    run = run_dir_of(run_simulate("--set", "governance.weighting=stake", "--set", "attack.size_claim=100",
                                  "--set", "attack.fraction=0.2", "--set", "train.rounds=1", "--set",
                                  "train.local_epochs=1", "--set", "runtime.workers=0", "--out", str(tmp_path)))
    stakes = read_jsonl(run / "audit.jsonl")[0]["body"]["stakes"]
    weights = read_jsonl(run / "metrics.jsonl")[0]["weights"]
    total = sum(stakes[c] for c in weights)
    assert weights == pytest.approx({c: stakes[c] / total for c in weights})  # size lies gain nothing
    assert max(stakes.values()) > 2 * sorted(stakes.values())[len(stakes) // 2]  # heavy-tailed
