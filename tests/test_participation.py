"""Who shows up: participation.model's per-member probabilities, the seeded draw, and the run-long influence."""

import numpy as np
import pytest

from fedgov.config import ConfigError, ParticipationConfig, load_config
from fedgov.sampling import CohortSampler, cohort_sampler, evaluates_cooperatives, show_up_probabilities

SIZES = {c: n for c, n in enumerate([2000, 400, 100, 100, 50, 50, 20, 20, 10, 10])}


def test_always_means_everyone_and_turnout_means_the_same_for_all():
    assert show_up_probabilities(ParticipationConfig(), SIZES) is None
    flat = show_up_probabilities(ParticipationConfig(model="turnout", turnout=0.3), SIZES)
    assert set(flat) == set(SIZES) and set(flat.values()) == {0.3}
    assert show_up_probabilities(ParticipationConfig(model="size", turnout=0.3, size_exponent=0), SIZES) == flat


@pytest.mark.parametrize("turnout", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_size_model_has_the_turnout_as_its_mean_and_favours_large_members(turnout, exponent):
    p = show_up_probabilities(ParticipationConfig(model="size", turnout=turnout, size_exponent=exponent), SIZES)
    values = np.array([p[c] for c in sorted(SIZES)])
    assert values.mean() == pytest.approx(turnout, abs=1e-6)
    assert np.all(values <= 1.0) and np.all(values > 0)
    order = sorted(SIZES, key=SIZES.get)  # small to large: probabilities never fall
    assert all(p[a] <= p[b] + 1e-12 for a, b in zip(order, order[1:]))
    if turnout < 1.0:
        assert p[0] > p[9]


def test_the_largest_member_nearly_always_comes_and_small_ones_rarely():
    p = show_up_probabilities(ParticipationConfig(model="size", turnout=0.2, size_exponent=1.0), SIZES)
    assert p[0] == 1.0 and p[9] < 0.05


def test_the_draw_is_seeded_and_records_who_showed_up():
    show_up = show_up_probabilities(ParticipationConfig(model="turnout", turnout=0.4), SIZES)
    first, second = (CohortSampler(seed=3, fraction=0.5, show_up=show_up) for _ in range(2))
    counts = np.zeros(len(SIZES))
    for r in range(1, 201):
        a, b = first.sample(r, SIZES), second.sample(r, SIZES)
        assert a == b and first.last_present == second.last_present
        assert set(a) <= set(first.last_present) and len(a) == max(1, round(0.5 * len(first.last_present)))
        counts[first.last_present] += 1
    assert counts.mean() / 200 == pytest.approx(0.4, abs=0.05)  # turnout over rounds
    # Nobody shows up: the round is held with the member most likely to come.
    assert CohortSampler(seed=0, fraction=1.0, show_up={0: 0.0, 1: 1e-12, 2: 0.0}).sample(1, [0, 1, 2]) == [1]
    # The default draw is the one fedgov always made (always: no participation stream).
    assert CohortSampler(seed=3, fraction=0.5).sample(7, SIZES) == cohort_sampler(load_config(None, [
        "seed=3", "strategy.fraction_train=0.5"]), SIZES).sample(7, SIZES)


def test_mechanisms_that_need_a_fixed_cohort_refuse_participation():
    for other in ("secure.aggregation=secagg+", "privacy.dp=user;privacy.noise_multiplier=1"):
        with pytest.raises(ConfigError, match="participation.model"):
            load_config(None, ["participation.model=turnout", "participation.turnout=0.5", *other.split(";")])


def test_evaluation_schedule_every_k_rounds_and_after_the_last():
    assert [r for r in range(1, 8) if evaluates_cooperatives(r, every=3, last_round=7)] == [3, 6, 7]
    assert all(evaluates_cooperatives(r, every=1, last_round=7) for r in range(1, 8))
    from fedgov.sampling import evaluation_interval

    assert load_config().train.evaluate_every == 0  # automatic by default:
    assert evaluation_interval(0, 10) == evaluation_interval(0, 100) == 1  # today's runs evaluate every round
    assert evaluation_interval(0, 1000) == 10 and evaluation_interval(3, 1000) == 3


def test_the_floor_follows_participation_and_the_schedule():
    from fedgov.floor import run_floor

    cfg = load_config(None, ["data.num_cooperatives=6", "data.partition=iid", "train.rounds=4",
                             "participation.model=turnout", "participation.turnout=0.5", "runtime.device=cpu",
                             "train.evaluate_every=2", "train.local_epochs=1"])
    rows = run_floor(cfg)
    sampler = cohort_sampler(cfg, {c: 1 for c in range(6)})
    assert [r["sampled"] for r in rows] == [sampler.sample(r, range(6)) for r in range(1, 5)]
    assert len({tuple(r["sampled"]) for r in rows}) > 1


@pytest.mark.slow
def test_a_run_records_who_showed_up_and_the_run_long_influence(tmp_path):
    from conftest import run_dir_of, run_simulate
    from fedgov.results import read_json, read_jsonl

    run = run_dir_of(run_simulate("--set", "data.num_cooperatives=6", "--set", "data.partition=iid",
                                  "--set", "train.rounds=4", "--set", "train.local_epochs=1",
                                  "--set", "participation.model=size", "--set", "participation.turnout=0.5",
                                  "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    for row in rows:
        assert set(row["contributors"]) <= set(row["sampled"]) <= set(row["present"])
        assert set(row["weights"]) == {str(c) for c in row["contributors"]}
    assert len({tuple(r["present"]) for r in rows}) > 1
    run_long = read_json(run / "summary.json")["influence"]["run"]
    totals = {str(c): 0.0 for c in range(6)}
    for row in rows:
        for c, w in row["weights"].items():
            totals[c] += w
    from fedgov.governance.weighting import influence

    assert run_long["members"] == 6 and run_long["members_with_weight"] == sum(v > 0 for v in totals.values())
    assert run_long["nakamoto"] == influence(list(totals.values()))["nakamoto"]
    assert run_long["max_weight"] == pytest.approx(max(totals.values()) / sum(totals.values()))
    assert str(run_long["top_member"]) == max(totals, key=totals.get)


def test_fairness_reports_the_worst_tenth_beside_the_worst_member():
    from fedgov.run_record import fairness

    # Twenty members: two tiny ones score 0, the rest 0.5..0.95; the worst is 0, the 10th percentile is not.
    accuracies = [0.0, 0.0] + [0.5 + 0.025 * i for i in range(18)]
    spread = fairness(accuracies)
    assert spread["worst"] == 0.0 and spread["best"] == pytest.approx(0.925)
    assert spread["p10"] == pytest.approx(float(np.percentile(accuracies, 10))) and 0.0 < spread["p10"] < 0.5
    assert set(fairness([])) == set(spread) and all(v is None for v in fairness([]).values())


def test_fairness_reports_qffls_worst_and_best_tenth_and_variance():
    from fedgov.run_record import fairness

    # q-FFL's plot_fairness.py by hand: 20 members -> int(20 * 0.1) = 2 at each end.
    accuracies = [0.1, 0.3] + [0.6] * 16 + [0.9, 1.0]
    spread = fairness(accuracies)
    assert spread["worst10"] == pytest.approx(0.2) and spread["best10"] == pytest.approx(0.95)
    mean = sum(accuracies) / 20
    assert spread["variance_pct2"] == pytest.approx(sum((a - mean) ** 2 for a in accuracies) / 20 * 10_000)
    # Fewer than ten members: the tenth is still one member.
    assert fairness([0.2, 0.4, 0.9])["worst10"] == 0.2 and fairness([0.2, 0.4, 0.9])["best10"] == 0.9
