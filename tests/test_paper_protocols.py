"""The FedProx and q-FFL papers' protocols as settings: exactly m members a round, drawn
uniformly or by size, and FedProx's stragglers, dropped or kept with their partial work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedgov.config import ConfigError, load_config
from fedgov.sampling import CohortSampler

SIZES = {c: n for c, n in enumerate([5000, 800, 400, 200, 100, 80, 60, 55, 52, 50])}


def test_exactly_m_members_a_round_whatever_the_fraction():
    sampler = CohortSampler(seed=1, fraction=0.9, count=3)
    for r in range(1, 20):
        cohort = sampler.sample(r, SIZES)
        assert len(cohort) == 3 and len(set(cohort)) == 3
    assert CohortSampler(seed=1, fraction=0.1, count=50).sample(1, SIZES) == sorted(SIZES)  # m above the population


def test_size_sampling_draws_members_in_proportion_to_their_size_without_replacement():
    uniform = CohortSampler(seed=0, fraction=1.0, count=1)
    by_size = CohortSampler(seed=0, fraction=1.0, count=1, size_weights=SIZES)
    rounds = 4000
    counts_uniform = np.bincount([uniform.sample(r, SIZES)[0] for r in range(rounds)], minlength=10)
    counts_size = np.bincount([by_size.sample(r, SIZES)[0] for r in range(rounds)], minlength=10)
    share = np.array([SIZES[c] for c in range(10)]) / sum(SIZES.values())
    assert np.abs(counts_size / rounds - share).max() < 0.03  # one draw a round: exactly proportional
    assert np.abs(counts_uniform / rounds - 0.1).max() < 0.03
    pairs = CohortSampler(seed=0, fraction=1.0, count=2, size_weights=SIZES)
    assert all(len(set(pairs.sample(r, SIZES))) == 2 for r in range(200))  # without replacement


def test_stragglers_are_round_m_times_share_seeded_and_run_one_to_e_minus_one_epochs():
    sampler = CohortSampler(seed=4, fraction=1.0, count=10, stragglers=0.5, local_epochs=20)
    twin = CohortSampler(seed=4, fraction=1.0, count=10, stragglers=0.5, local_epochs=20, straggler_work="partial")
    epochs = []
    for r in range(1, 200):
        cohort = sampler.sample(r, range(30))
        late = sampler.stragglers(r, cohort)
        assert len(late) == 5 and set(late) <= set(cohort)
        assert late == twin.stragglers(r, twin.sample(r, range(30)))  # the same for FedAvg and FedProx
        epochs += list(late.values())
    assert min(epochs) == 1 and max(epochs) == 19  # randint(1, E): 1..E-1, as the reference
    most = CohortSampler(seed=4, fraction=1.0, count=10, stragglers=0.9, local_epochs=20)
    assert len(most.stragglers(1, most.sample(1, range(30)))) == 9  # round(10 * 0.1) = 1 finishes
    assert CohortSampler(seed=4, fraction=1.0, count=10).stragglers(1, list(range(10))) == {}


def test_straggler_settings_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[heterogeneity]\nstragglers = 0.5\n[secure]\naggregation = "secagg+"\n')
    with pytest.raises(ConfigError, match="heterogeneity.stragglers"):
        load_config(path)
    path.write_text('[heterogeneity]\nstraggler_work = "late"\n')
    with pytest.raises(ConfigError, match="heterogeneity.straggler_work"):
        load_config(path)
    path.write_text('[strategy]\nsampling = "weighted"\n')
    with pytest.raises(ConfigError, match="strategy.sampling"):
        load_config(path)


PAPER = ["--set", "data.dataset=synthetic", "--set", "data.partition=natural", "--set", "data.synthetic_reference=true",
         "--set", "data.num_cooperatives=12", "--set", "data.local_test_fraction=0.1", "--set", "data.seed=3",
         "--set", "model.name=logreg", "--set", "train.rounds=3", "--set", "train.local_epochs=4",
         "--set", "train.batch_size=10", "--set", "train.lr=0.01", "--set", "train.momentum=0",
         "--set", "strategy.clients_per_round=4", "--set", "heterogeneity.stragglers=0.5"]


@pytest.mark.parametrize("work", ["drop", "partial"])
def test_a_run_drops_stragglers_or_keeps_their_partial_work(tmp_path, work):
    from conftest import run_dir_of, run_simulate

    run = run_dir_of(run_simulate(*PAPER, "--set", f"heterogeneity.straggler_work={work}",
                                  "--set", f"runtime.out={tmp_path}"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    for row in rows:
        late = {int(c): e for c, e in row["stragglers"].items()}
        assert len(late) == 2
        epochs = {int(c): m["local_epochs"] for c, m in row["client_train"].items()}
        if work == "drop":  # FedAvg: the round goes on with the two that finished
            assert len(row["sampled"]) == 2 and not set(late) & set(row["sampled"])
            assert set(epochs.values()) == {4}
        else:  # FedProx: all four train, the stragglers for fewer epochs, and all are averaged
            assert len(row["sampled"]) == 4 and set(late) <= set(row["contributors"])
            assert all(epochs[c] == (late[c] if c in late else 4) for c in epochs) and all(e < 4 for e in late.values())
        # FedProx's training loss: every member's loss on its own training data, weighted by size
        assert row["train_loss"] > 0
    assert summary["train_loss_by_round"] == [r["train_loss"] for r in rows]
    assert summary["final_train_loss"] == rows[-1]["train_loss"]
    assert summary["fairness"]["worst10"] <= summary["fairness"]["mean"] <= summary["fairness"]["best10"]


def test_every_round_keeps_one_member_who_finishes(tmp_path):
    from conftest import run_dir_of, run_simulate

    all_late = CohortSampler(seed=2, fraction=1.0, count=10, stragglers=1.0, local_epochs=20)
    for r in range(1, 50):
        cohort = all_late.sample(r, range(30))
        assert len(cohort) - len(all_late.stragglers(r, cohort)) == 1
    # Dropping every straggler still leaves a round someone to aggregate: the run finishes.
    run = run_dir_of(run_simulate(*PAPER, "--set", "heterogeneity.stragglers=1.0", "--set", "train.rounds=2",
                                  "--set", f"runtime.out={tmp_path}", timeout=240))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["contributors"]) for r in rows] == [1, 1]
