"""HE aggregation inside the federation: same model as plaintext FedAvg, aggregator without secrets."""


import pytest

from conftest import run_dir_of, run_simulate
from fedgov.crypto import SecretKeys, decrypt_aggregate, encrypt_update, generate_keys
from fedgov.crypto.keys import COOPERATIVE_KEYS, provision
from fedgov.results import read_json, read_jsonl
from fedgov.strategies.secure_he import HESecureAggregation

SMALL = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.rounds=3"]


@pytest.mark.parametrize("key_holder", ["clients", "custodian"])
def test_the_aggregator_holds_only_a_public_context(tmp_path, key_holder):
    import numpy as np

    provision(tmp_path, preset="standard", key_holder=key_holder)
    aggregator = HESecureAggregation(object(), key_dir=tmp_path, key_holder=key_holder, examples={},
                                     node_to_cooperative={}, verify=False)
    assert not aggregator.context.is_private()
    update = encrypt_update([np.ones(5)], context=generate_keys("standard", mode=key_holder)
                            if key_holder == "custodian" else
                            SecretKeys.from_bytes((tmp_path / COOPERATIVE_KEYS).read_bytes()), weight=0.5)
    with pytest.raises(Exception):
        decrypt_aggregate(update, keys=aggregator.context)  # no secret key: decryption impossible
    # What the aggregator object holds, attribute by attribute: nothing private.
    for value in vars(aggregator).values():
        assert not getattr(value, "is_private", lambda: False)()


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
    assert block["bytes_per_param"] <= 34.0
    from fedgov.experiment import MECHANISM_METRICS, metric_value  # what privacy_utility.toml aggregates

    assert all(metric_value(he_summary, m) is not None for m in MECHANISM_METRICS if m.startswith("secure_"))
    assert he_summary["bytes_up"] > plain_summary["bytes_up"]
    rows = read_jsonl(he / "metrics.jsonl")
    assert all(r["participants"] == 4 and not r["failures"] for r in rows)
    assert all(r["phase_seconds"]["encrypt_max"] > 0 and r["phase_seconds"]["decrypt"] > 0 for r in rows)
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
