"""DP in whole federations: the reported epsilon is Opacus's, cumulative, and within budget."""


import pytest

from conftest import run_dir_of, run_simulate
from fedgov.privacy.accounting import RoundSpend, epsilon_of
from fedgov.results import read_json, read_jsonl

SMALL = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid"]


@pytest.mark.slow
def test_sample_level_dp_stays_within_target_and_matches_opacus(tmp_path):
    run = run_dir_of(run_simulate(*SMALL, "--set", "train.rounds=4", "--set", "privacy.dp=sample",
                                "--set", "privacy.target_epsilon=3", "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    summary = read_json(run / "summary.json")
    for coop in summary["cooperatives"]:
        assert 0 < coop["epsilon"] <= 3.0
        # Recompute independently from what each round recorded: noise, sample rate, steps.
        spends = [RoundSpend(r["client_train"][str(coop["id"])]["dp_noise_multiplier"],
                             r["client_train"][str(coop["id"])]["dp_sample_rate"],
                             int(r["client_train"][str(coop["id"])]["dp_steps"])) for r in rows]
        assert coop["epsilon"] == pytest.approx(epsilon_of(spends, delta=coop["delta"]), rel=1e-9)
        assert coop["delta"] < 1 / coop["num_examples"]
        per_round = [r["client_train"][str(coop["id"])]["dp_epsilon"] for r in rows]
        assert per_round == sorted(per_round) and per_round[0] < per_round[-1]  # cumulative, not per round
    assert summary["privacy"]["mechanism"] == "sample"
    assert summary["privacy"]["max_epsilon"] <= 3.0
    # sized for the whole run: the last round ends close to the target
    assert summary["privacy"]["max_epsilon"] > 2.5


@pytest.mark.slow
def test_spent_budget_stops_a_cooperative(tmp_path):
    run = run_dir_of(run_simulate(*SMALL, "--set", "train.rounds=4", "--set", "privacy.dp=sample",
                                "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.target_epsilon=2.5",
                                "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    declined = [f for r in rows for f in r["failures"]]
    assert declined and all("privacy budget spent" in f["reason"] for f in declined)
    assert rows[-1]["participants"] < rows[0]["participants"]
    for coop in read_json(run / "summary.json")["cooperatives"]:
        assert coop["epsilon"] <= 2.5
        assert coop["participation"] < 1.0


@pytest.mark.slow
def test_user_level_dp_reports_rdp_epsilon_per_round(tmp_path):
    run = run_dir_of(run_simulate(*SMALL, "--set", "train.rounds=3", "--set", "privacy.dp=user",
                                "--set", "privacy.target_epsilon=8", "--set", "privacy.clipping_side=client",
                                "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    privacy = read_json(run / "summary.json")["privacy"]
    z, q, delta = privacy["noise_multiplier"], privacy["sample_rate"], privacy["delta"]
    assert [r["epsilon"] for r in rows] == pytest.approx(
        [epsilon_of([RoundSpend(z, q, k)], delta=delta) for k in (1, 2, 3)], rel=1e-9)
    assert rows[-1]["epsilon"] <= 8.0
    assert all(r["participants"] == 4 for r in rows)
