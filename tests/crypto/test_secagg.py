"""Flower's SecAgg+ in fedgov (fedgov.crypto.secagg): the protocol, what it costs, how exact it is.

The fast tests run whole federations in this process: a Grid that hands a copy of
every message to fedgov's real ClientApp (no Ray), so the four SecAgg+ stages, the
client's ``secaggplus_mod`` and the server's ``SecAggPlusWorkflow`` all run for real.
The slow tests run ``python -m fedgov.simulate`` as a user would.

Quantization error bound used below (derived in fedgov.crypto.secagg's docstring):
each of the k cooperatives' values is stochastically rounded to within one step
2c/Q (c = secagg_clip_range, Q = secagg_quantization_range), and the sum is divided
by the sum of the weights (>= 1), so the SecAgg+ aggregate is within k * 2c/Q of a
plaintext FedAvg of the same clipped updates.
"""

from __future__ import annotations

import copy
import math
import shutil
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from conftest import run_dir_of, run_simulate
from fedgov.client_app import build_client_app
from fedgov.config import Config, ConfigError
from fedgov.crypto.secagg import STAGES, VERIFY_RECORD, is_secagg_message
from fedgov.data import build_federation
from fedgov.models import build_model
from fedgov.results import read_json, read_jsonl
from fedgov.run_record import Checkpoint
from fedgov.server_app import run_federation
from fedgov.strategies import CohortSampler

C, Q = 8.0, 4194304  # the config's defaults: secure.secagg_clip_range, secure.secagg_quantization_range
STEP = 2 * C / Q


def quantization_bound(num_cooperatives: int) -> float:
    return num_cooperatives * STEP


# ---------------------------------------------------------------------------
# In-process federations (fast)
# ---------------------------------------------------------------------------

class InProcessGrid:
    """Delivers a copy of each message to fedgov's ClientApp in this process, one node per cooperative."""

    def __init__(self, cfg: Config, *, drop: tuple[int, str, int] | None = None) -> None:
        n = cfg.data.num_cooperatives
        self.app = build_client_app(cfg)
        self.run = SimpleNamespace(run_id=7)
        self.contexts = {1000 + 11 * i: Context(run_id=7, node_id=1000 + 11 * i, state=RecordDict(), run_config={},
                                                node_config={"partition-id": i, "num-partitions": n})
                         for i in range(n)}
        self.drop = drop  # (cooperative, SecAgg+ stage, round): that node fails there
        self.leaked = 0  # replies that carried the unmasked parameters (secure.verify only)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self) -> list[NodeInfo]:  # as Flower's Grid answers for nodes that joined without a key
        return [NodeInfo(node_id=node) for node in self.contexts]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            received = Message(copy.deepcopy(message.content), dst_node_id=node,
                               message_type=message.metadata.message_type, group_id=message.metadata.group_id)
            received.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            received.metadata.__dict__["_src_node_id"] = 0
            if self._dropped(received):
                replies.append(Message(Error(code=1, reason="node dropped out"), reply_to=received))
            else:
                replies.append(self.app(received, self.contexts[node]))
                self.leaked += VERIFY_RECORD in replies[-1].content.array_records
        return replies

    def _dropped(self, message: Message) -> bool:
        if self.drop is None or not is_secagg_message(message):
            return False
        coop, stage, server_round = self.drop
        node = message.metadata.dst_node_id
        return (self.contexts[node].node_config["partition-id"] == coop
                and message.content.config_records["secaggplus_configs"]["stage"] == stage
                and message.metadata.group_id == str(server_round))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages need a run identity; the simulation engine sets one the same way.
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _config(**overrides) -> Config:
    base = {"secure.aggregation": "secagg+", "data.num_cooperatives": 3, "data.partition": "iid",
            "train.rounds": 2, "train.local_epochs": 1, "runtime.device": "cpu"}
    return Config().replace(**{**base, **overrides})


def _model_bytes(cfg: Config) -> int:
    federation = build_federation(cfg.data, seed=cfg.seed)
    model = build_model(cfg.model.name, input_shape=federation.input_shape, num_classes=federation.num_classes,
                        hidden=cfg.model.hidden)
    return ArrayRecord(model.state_dict()).count_bytes()


def test_secagg_round_records_costs_and_stays_within_the_quantization_bound(tmp_path):
    cfg = _config(**{"secure.verify": True})
    grid = InProcessGrid(cfg)
    record = run_federation(grid, cfg, tmp_path / "secagg")
    assert grid.leaked == 2 * 3  # every cooperative, every round: the measurement-only copy
    rows = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["participants"] == 3 and row["sampled"] == [0, 1, 2] and row["failures"] == []
        assert set(row["cooperative_accuracy"]) == {"0", "1", "2"}
        assert set(row["client_train"]) == {"0", "1", "2"}
        assert math.isfinite(row["accuracy"])
        block = row["secure_aggregation"]
        assert block["halted_at"] is None and block["num_shares"] == 3 and block["threshold"] == 2
        for stage in STAGES:
            assert block["bytes"][stage]["up"] > 0 and block["bytes"][stage]["down"] > 0, stage
            assert row["phase_seconds"][f"secagg_{stage}"] > 0
        # One meter counts every message of the round: SecAgg+'s own count of its stages agrees with it,
        # and the round's totals add the evaluation.
        for stage in STAGES:
            assert row["bytes_by_stage"][f"secagg_{stage}"] == block["bytes"][stage], stage
        assert set(row["bytes_by_stage"]) == {f"secagg_{s}" for s in STAGES} | {"evaluate"}
        assert row["bytes_up"] == sum(b["up"] for b in row["bytes_by_stage"].values())
        assert row["bytes_down"] == sum(b["down"] for b in row["bytes_by_stage"].values())
        assert row["bytes_by_stage"]["evaluate"]["down"] >= 3 * _model_bytes(cfg)
        # masked vectors are int64: at least 8 bytes per parameter per cooperative, twice float32
        assert row["bytes_up"] > 2 * 3 * _model_bytes(cfg) * 0.99
        assert 0 < block["max_abs_error"] <= block["error_bound"] <= quantization_bound(3)
        assert block["clipped_values"] == 0
        assert block["verify_bytes_up"] > 0  # the measurement-only copy, not in bytes_up
    summary = read_json(tmp_path / "secagg" / "summary.json")
    secure = summary["secure_aggregation"]
    assert secure["scheme"] == "secagg+" and secure["verify"] is True
    assert (secure["num_shares"], secure["threshold"], secure["clip_range"], secure["quantization_range"]) == (
        3, 2, C, Q)
    assert secure["bytes_per_parameter"]["up"] > 8 and secure["bytes_per_parameter"]["down"] > 4
    assert secure["max_abs_error"] == max(r["secure_aggregation"]["max_abs_error"] for r in rows)
    assert record.rows == rows


def test_secagg_model_equals_plaintext_fedavg_within_the_bound(tmp_path):
    cfg = _config(**{"train.rounds": 1})
    grid = InProcessGrid(cfg)
    run_federation(grid, cfg, tmp_path / "secagg")
    assert grid.leaked == 0  # without secure.verify no cooperative sends its unmasked parameters
    plain_cfg = cfg.replace(**{"secure.aggregation": "off"})
    run_federation(InProcessGrid(plain_cfg), plain_cfg, tmp_path / "plain")
    secagg = Checkpoint.load(tmp_path / "secagg").arrays
    plain = Checkpoint.load(tmp_path / "plain").arrays
    assert list(secagg.keys()) == list(plain.keys())
    diff = max(float(np.max(np.abs(secagg[k].numpy() - plain[k].numpy()))) for k in plain)
    assert diff <= quantization_bound(3) + 1e-6  # + float32 rounding of the plaintext mean
    secagg_row = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")[0]
    plain_row = read_jsonl(tmp_path / "plain" / "metrics.jsonl")[0]
    assert secagg_row["sampled"] == plain_row["sampled"]
    assert secagg_row["bytes_up"] > plain_row["bytes_up"]
    assert secagg_row["bytes_down"] > plain_row["bytes_down"]
    assert "secure_aggregation" not in read_json(tmp_path / "plain" / "summary.json")


def test_partial_cohorts_are_fedgovs_seeded_sample_and_weights_are_exact(tmp_path):
    cfg = _config(**{"secure.verify": True, "data.num_cooperatives": 5, "data.partition": "dirichlet",
                     "strategy.fraction_train": 0.6})
    run_federation(InProcessGrid(cfg), cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    sizes = {c["id"]: c["num_train"] for c in read_json(tmp_path / "run" / "summary.json")["cooperatives"]}
    sampler = CohortSampler(seed=cfg.seed, fraction=0.6)
    for row in rows:
        assert row["sampled"] == sampler.sample(row["round"], range(5))
        assert row["participants"] == 3 and sorted(map(int, row["client_train"])) == row["sampled"]
        block = row["secure_aggregation"]
        assert block["max_weight"] == max(sizes[c] for c in row["sampled"])  # largest weight is exactly 1
        assert 0 < block["max_abs_error"] <= block["error_bound"] <= quantization_bound(3)
        # The aggregate is FedAvg weighted by num_examples: rounding the weights n/max_weight to
        # multiples of 1/Q (relative error <= 1/(2 Q w)) adds far less than a quantization step.
        assert block["max_abs_error_vs_fedavg"] < 2 * block["error_bound"]


def test_a_cooperative_that_drops_out_while_masking_is_unmasked_exactly(tmp_path):
    cfg = _config(**{"secure.verify": True, "train.rounds": 1})
    run_federation(InProcessGrid(cfg, drop=(1, "collect_masked_vectors", 1)), cfg, tmp_path / "run")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["sampled"] == [0, 1, 2]
    assert row["participants"] == 2 and set(row["client_train"]) == {"0", "2"}
    assert [f["cooperative"] for f in row["failures"]] == [1]
    assert "collect_masked_vectors" in row["failures"][0]["reason"]
    block = row["secure_aggregation"]
    assert block["halted_at"] is None
    # the dropped cooperative's pairwise masks were reconstructed from its neighbours' shares
    assert 0 < block["max_abs_error"] <= block["error_bound"] <= quantization_bound(2)


def test_too_few_cooperatives_halt_the_round_and_keep_the_model(tmp_path):
    cfg = _config(**{"train.rounds": 1, "data.num_cooperatives": 2})
    run_federation(InProcessGrid(cfg, drop=(1, "setup", 1)), cfg, tmp_path / "run")
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert row["participants"] == 0 and row["secure_aggregation"]["halted_at"] == "setup"
    assert any("halted" in f["reason"] for f in row["failures"])
    assert read_json(tmp_path / "run" / "summary.json")["secure_aggregation"]["halted_rounds"] == [1]


def test_plain_train_messages_are_not_secagg():
    plain = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    stage = Message(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    assert not is_secagg_message(plain) and is_secagg_message(stage)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"secure.secagg_num_shares": 2}, "secure.secagg_num_shares"),
    ({"secure.secagg_threshold": 3}, "secure.secagg_threshold"),  # must be below num_shares (3)
    ({"secure.secagg_threshold": 1}, "secure.secagg_threshold"),
    ({"strategy.fraction_train": 0.1}, "strategy.fraction_train"),  # one cooperative per round
    ({"secure.secagg_quantization_range": 2**31}, "secure.secagg_quantization_range"),  # 4 x 2**31 overflows
])
def test_settings_flower_would_reject_or_halt_on_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        Config().replace(**{"secure.aggregation": "secagg+", "data.num_cooperatives": 4, **overrides})


def test_robust_strategy_with_secagg_is_a_usage_error():
    proc = run_simulate("--set", "secure.aggregation=secagg+", "--set", "strategy.name=median")
    assert proc.returncode == 2
    assert "strategy.name" in proc.stderr and "median" in proc.stderr and "secure aggregation" in proc.stderr


# ---------------------------------------------------------------------------
# End-to-end runs in Flower's simulation engine (slow)
# ---------------------------------------------------------------------------

SMALL = ["--set", "data.num_cooperatives=4", "--set", "data.partition=iid", "--set", "train.rounds=3",
         "--set", "secure.aggregation=secagg+"]


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg")
    yield run_dir_of(run_simulate(*SMALL, "--out", str(out)))
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_simulated_secagg_run(secagg_run):
    rows = read_jsonl(secagg_run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    accuracies = [r["accuracy"] for r in rows]
    assert all(math.isfinite(a) for a in accuracies)
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.1  # learns, above chance (10 digits)
    plaintext_bytes_up = 4 * _model_bytes(Config().replace(**{"data.num_cooperatives": 4}))
    for row in rows:
        assert row["participants"] == 4
        assert len(row["cooperative_accuracy"]) == 4
        assert row["bytes_up"] > plaintext_bytes_up
        assert "max_abs_error" not in row["secure_aggregation"]  # nothing leaked without secure.verify
    summary = read_json(secagg_run / "summary.json")
    assert summary["secure_aggregation"]["scheme"] == "secagg+"
    assert summary["secure_aggregation"]["verify"] is False
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)


@pytest.mark.slow
def test_simulated_secagg_verify_reports_quantization_error(secagg_run, tmp_path):
    run = run_dir_of(run_simulate(*SMALL, "--set", "secure.verify=true", "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    secure = read_json(run / "summary.json")["secure_aggregation"]
    assert 0 < secure["max_abs_error"] < quantization_bound(4)
    assert secure["max_abs_error"] <= secure["error_bound"]
    # The verification copy is not protocol traffic, and rounding is seeded: same bytes, same models.
    plain = read_jsonl(secagg_run / "metrics.jsonl")
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in plain]
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in plain]


@pytest.mark.slow
def test_simulated_secagg_with_dp_sgd_reports_epsilon(tmp_path):
    # Cooperatives of different sizes spend the budget at different rates: some sit rounds out,
    # which SecAgg+ handles as dropouts.
    run = run_dir_of(run_simulate("--set", "secure.aggregation=secagg+", "--set", "data.num_cooperatives=5",
                                "--set", "data.alpha=1.0", "--set", "train.rounds=2", "--set", "privacy.dp=sample",
                                "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.target_epsilon=2.5",
                                "--out", str(tmp_path)))
    rows = read_jsonl(run / "metrics.jsonl")
    summary = read_json(run / "summary.json")
    assert rows[0]["participants"] >= 2 and rows[0]["secure_aggregation"]["halted_at"] is None
    for row in rows:
        assert all("privacy budget spent" in f["reason"] for f in row["failures"] if f["cooperative"] >= 0)
        for metrics in row["client_train"].values():
            assert 0 < metrics["dp_epsilon"] <= 2.5 and metrics["dp_steps"] > 0
    assert summary["privacy"]["mechanism"] == "sample"
    assert 0 < summary["privacy"]["max_epsilon"] <= 2.5
    reported = [c["epsilon"] for c in summary["cooperatives"] if c["epsilon"] is not None]
    assert len(reported) >= 2 and all(0 < e <= 2.5 for e in reported)
    assert summary["secure_aggregation"]["scheme"] == "secagg+"
