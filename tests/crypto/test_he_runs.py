"""HE aggregation inside the federation: the same model as plaintext FedAvg (secrets: test_key_holders.py)."""


import pytest

from conftest import run_dir_of, run_simulate
from fedgov.results import read_json, read_jsonl

SMALL = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.rounds=3"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The unprotected run both HE runs are compared with."""
    return run_dir_of(run_simulate(*SMALL, "--out", str(tmp_path_factory.mktemp("plain"))))


@pytest.mark.slow
def test_he_run_reaches_the_plaintext_accuracy(tmp_path, plain):
    he = run_dir_of(run_simulate(*SMALL, "--set", "secure.aggregation=he", "--set", "secure.verify=true",
                               "--out", str(tmp_path / "he")))
    plain_summary, he_summary = read_json(plain / "summary.json"), read_json(he / "summary.json")
    assert abs(he_summary["final_accuracy"] - plain_summary["final_accuracy"]) <= 0.005
    block = he_summary["secure_aggregation"]
    assert block["scheme"] == "he" and block["preset"] == "standard"
    assert block["max_abs_error"] <= 1e-6
    # secure.verify sent every plaintext update to the aggregator: the run says so, in the summary and the log.
    assert block["reveals_updates"] is True
    assert "reveals_updates" not in plain_summary.get("secure_aggregation", {})
    run_start = read_jsonl(he / "audit.jsonl")[0]
    assert run_start["body"]["mechanism"]["reveals_updates"] is True
    assert block["bytes_per_param"] <= 34.0
    from fedgov.experiment import MECHANISM_METRICS, metric_value  # what privacy_utility.toml aggregates

    assert all(metric_value(he_summary, m) is not None for m in MECHANISM_METRICS if m.startswith("secure_"))
    assert he_summary["bytes_up"] > plain_summary["bytes_up"]
    rows = read_jsonl(he / "metrics.jsonl")
    assert all(r["participants"] == 4 and not r["failures"] for r in rows)
    assert all(r["phase_seconds"]["encrypt_max"] > 0 and r["phase_seconds"]["decrypt"] > 0 for r in rows)
    for row in rows:  # the decryption round trip is traffic too, counted like training and evaluation
        assert set(row["bytes_by_stage"]) == {"train", "decrypt", "evaluate"}
        assert row["bytes_by_stage"]["decrypt"]["up"] > 0 and row["bytes_by_stage"]["decrypt"]["down"] > 0
        assert row["bytes_up"] == sum(b["up"] for b in row["bytes_by_stage"].values())
    assert "keys" in {p.name for p in he.iterdir()}


@pytest.mark.slow
def test_compact_run_stays_close_to_the_plaintext_accuracy(tmp_path, plain):
    compact = run_dir_of(run_simulate(*SMALL, "--set", "secure.aggregation=he", "--set", "secure.preset=compact",
                                    "--set", "secure.verify=true", "--out", str(tmp_path / "compact")))
    plain_summary, compact_summary = read_json(plain / "summary.json"), read_json(compact / "summary.json")
    assert abs(compact_summary["final_accuracy"] - plain_summary["final_accuracy"]) <= 0.01
    block = compact_summary["secure_aggregation"]
    assert block["preset"] == "compact" and block["bytes_per_param"] <= 12.0
    assert 0 < block["max_abs_error"] <= 1.6e-4  # quantization: measured, never zero
