"""End-to-end runs of ``python -m fedgov.simulate`` in Flower's simulation engine."""

import json
import math

import pytest

from conftest import run_dir_of, run_simulate
from fedgov.config import load_config
from fedgov.results import read_json, read_jsonl

SMALL = ["--set", "data.num_cooperatives=4", "--set", "train.rounds=3", "--set", "data.partition=iid"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_dir_of(run_simulate(*SMALL, "--out", str(out)))


def test_run_directory_holds_what_the_docs_promise(small_run):
    rows = read_jsonl(small_run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("accuracy", "loss", "seconds", "bytes_up", "bytes_down", "participants"):
            assert key in row, key
        assert row["participants"] == 4
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert math.isfinite(row["accuracy"]) and 0 <= row["accuracy"] <= 1

    summary = read_json(small_run / "summary.json")
    for key in ("run_id", "config_hash", "seed", "final_accuracy", "final_loss", "rounds", "wall_seconds",
                "device", "cooperatives", "fairness"):
        assert key in summary, key
    assert set(summary["versions"]) >= {"flwr", "torch", "opacus", "tenseal"}
    assert summary["rounds"] == 3
    assert set(summary["startup_seconds"]) == {"before_nodes", "wait_for_nodes", "discovery"}
    assert 0 < summary["startup_seconds"]["discovery"] < summary["wall_seconds"]
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["run_id"] == small_run.name
    coops = summary["cooperatives"]
    assert [c["id"] for c in coops] == [0, 1, 2, 3]
    for coop in coops:
        assert coop["num_examples"] == sum(coop["label_counts"]) > 0
        assert 0 <= coop["accuracy"] <= 1
    accs = [c["accuracy"] for c in coops]
    assert summary["fairness"]["worst"] == min(accs) and summary["fairness"]["best"] == max(accs)
    # The saved config reproduces the run's settings exactly.
    assert load_config(small_run / "config.toml").hash() == summary["config_hash"]
    assert not list(small_run.glob(".*.tmp"))  # no half-written files left behind


def test_same_seed_same_accuracy_sequence(small_run, tmp_path):
    again = run_dir_of(run_simulate("--config", str(small_run / "config.toml"), "--out", str(tmp_path)))
    first = [r["accuracy"] for r in read_jsonl(small_run / "metrics.jsonl")]
    second = [r["accuracy"] for r in read_jsonl(again / "metrics.jsonl")]
    assert first == second
    # Another seed, another federation: shown on the engine-free floor, which reproduces the Flower
    # run round by round (test_the_engine_free_floor_runs_the_same_rounds_without_flower).
    from fedgov.floor import run_floor

    cfg = load_config(small_run / "config.toml")
    assert [r["accuracy"] for r in run_floor(cfg)] == pytest.approx(first, abs=1e-9)
    assert [r["accuracy"] for r in run_floor(cfg.replace(seed=1))] != first


def test_resume_continues_exactly_where_the_run_stopped(small_run, tmp_path):
    # A run that stopped after round 2 of 3: its checkpoint and first two metric rows.
    partial = run_dir_of(run_simulate(*SMALL, "--set", "train.rounds=2", "--out", str(tmp_path)))
    config = (partial / "config.toml").read_text().replace("rounds = 2", "rounds = 3")
    (partial / "config.toml").write_text(config)
    (partial / "summary.json").unlink()
    resumed = run_dir_of(run_simulate("--resume", str(partial)))
    assert resumed == partial
    expected = [r["accuracy"] for r in read_jsonl(small_run / "metrics.jsonl")]
    assert [r["accuracy"] for r in read_jsonl(partial / "metrics.jsonl")] == expected
    assert read_json(partial / "summary.json")["resumed_from_round"] == 2
    # The signed audit trail continues across the resume (same key, unbroken chain).
    from fedgov.audit import verify

    assert verify(partial).ok
    kinds = [json.loads(line)["kind"] for line in (partial / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["run_start", "round", "round", "run_end", "run_resume", "round", "run_end"]


def test_resume_of_a_non_run_directory_is_a_clear_error(tmp_path):
    proc = run_simulate("--resume", str(tmp_path))
    assert proc.returncode == 2
    assert "config.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_sampling_fraction_is_seeded_and_respected(tmp_path):
    args = [*SMALL, "--set", "strategy.fraction_train=0.5", "--set", "strategy.name=fedprox"]
    first = run_dir_of(run_simulate(*args, "--out", str(tmp_path / "a")))
    rows = read_jsonl(first / "metrics.jsonl")
    assert all(r["participants"] == 2 and len(r["sampled"]) == 2 for r in rows)
    assert len({tuple(r["sampled"]) for r in rows}) > 1  # different cohorts in different rounds
    # The second run also evaluates the cooperatives only every other round (and after the last):
    # the cohorts, the global model and its global evaluation are the same.
    second = run_dir_of(run_simulate(*args, "--set", "train.evaluate_every=2", "--out", str(tmp_path / "b")))
    sparse = read_jsonl(second / "metrics.jsonl")
    assert [r["sampled"] for r in sparse] == [r["sampled"] for r in rows]
    assert [r["accuracy"] for r in sparse] == [r["accuracy"] for r in rows]
    assert [bool(r["cooperative_accuracy"]) for r in sparse] == [False, True, True]  # rounds 1, 2, 3 (the last)
    assert all(len(r["cooperative_accuracy"]) == 4 for r in rows)
    assert "evaluate" not in sparse[0]["bytes_by_stage"] and "evaluate" in sparse[1]["bytes_by_stage"]
    assert sparse[1]["cooperative_accuracy"] == rows[1]["cooperative_accuracy"]
    assert read_json(second / "summary.json")["fairness"] == read_json(first / "summary.json")["fairness"]


def test_phase_times_measure_work_not_the_poll_interval(small_run):
    """Flower's in-memory grid polls every 0.1 s unless told otherwise, so no phase could end
    before its first 0.1 s sleep; fedgov polls every runtime.poll_interval (5 ms), and four
    small evaluations take well under one such poll."""
    rows = read_jsonl(small_run / "metrics.jsonl")
    assert load_config(small_run / "config.toml").runtime.poll_interval == pytest.approx(0.005)
    evaluate = sorted(r["phase_seconds"]["evaluate"] for r in rows)
    assert evaluate[0] < 0.1, evaluate


def test_the_engine_free_floor_runs_the_same_rounds_without_flower(small_run):
    """Same cohorts, seeds, training and weighting: the floor's global model is the Flower run's."""
    from fedgov.floor import run_floor

    cfg = load_config(small_run / "config.toml")
    flower = read_jsonl(small_run / "metrics.jsonl")
    floor = run_floor(cfg)
    assert [r["round"] for r in floor] == [r["round"] for r in flower]
    assert [r["sampled"] for r in floor] == [r["sampled"] for r in flower]
    assert [r["accuracy"] for r in floor] == pytest.approx([r["accuracy"] for r in flower], abs=1e-9)
    assert [r["loss"] for r in floor] == pytest.approx([r["loss"] for r in flower], rel=1e-4)
    # The members' evaluations, the papers' training loss included, are the floor's work too.
    assert all(r["train_loss"] is not None for r in flower)
    assert [r["train_loss"] for r in floor] == pytest.approx([r["train_loss"] for r in flower], rel=1e-4)
    for row in floor:
        phases = row["phase_seconds"]
        assert 0 < phases["local_train_max"] <= phases["train"] <= row["seconds"]
        assert sum(phases[p] for p in ("train", "aggregate", "evaluate", "global_evaluate")) <= row["seconds"]


def test_the_floor_refuses_what_it_does_not_reproduce():
    from fedgov.floor import FloorError, floor_problem, run_floor

    assert floor_problem(load_config()) is None
    for key in ("privacy.dp=sample;privacy.noise_multiplier=1", "secure.aggregation=he", "strategy.name=krum",
                "attack.kind=label_flip",
                "governance.clip_update_norm=1.0", "governance.similarity_defense=true"):
        cfg = load_config(None, key.split(";"))
        assert floor_problem(cfg), key
        with pytest.raises(FloorError):
            run_floor(cfg, rounds=1)


def test_discovery_names_how_many_cooperatives_did_not_answer_in_one_short_line(monkeypatch):
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    from fedgov.server_app import FederationError, discover_cooperatives

    def reply(node: int, coop: int) -> SimpleNamespace:
        content = {"cooperative": {"partition-id": coop, "num-examples": 5, "num-train": 4, "num-test": 1,
                                   "label-counts": [5]}, "identity": {"name": f"coop-{coop}"}}
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content)

    class ThreeAnswer:  # a grid on which only the first 3 of 40 nodes answer in time
        def send_and_receive(self, messages, *, timeout=None):
            return [reply(m.metadata.dst_node_id, coop) for coop, m in enumerate(list(messages)[:3])]

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # Messages need a run identity
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    with pytest.raises(FederationError) as caught:
        discover_cooperatives(ThreeAnswer(), list(range(100, 140)), timeout=304.0, num_cooperatives=40)
    assert str(caught.value) == ("no reply from 37 of 40 cooperative(s) within 304 s "
                                 "(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, ...)")
