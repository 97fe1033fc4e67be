"""The benchmark harness: ``python -m fedgov.bench``, its statistics, and the aggregation suite's arithmetic."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedgov.bench.cli import BenchError, load_suite_spec, run_benchmarks
from fedgov.bench.core import BenchContext, fit_power_law, percentile, time_call
from fedgov.bench.suites import aggregation

ROOT = Path(__file__).resolve().parents[2]
SUITES_DIR = ROOT / "benchmarks"


def test_percentile_and_power_law_fit():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    xs = [1e3, 1e4, 1e5, 1e6]
    b, a = fit_power_law(xs, [3 * x**1.5 for x in xs])
    assert b == pytest.approx(1.5) and a == pytest.approx(3)
    assert math.isnan(fit_power_law([1.0], [2.0])[0])
    t = time_call(lambda: None, repeat=4)
    assert len(t.samples) == 4 and t.best <= t.median


def test_update_shapes_hold_exactly_the_parameters():
    for n in (1, 7, 1000, 12345, 10**7):
        assert sum(math.prod(s) for s in aggregation.update_shapes(n)) == n


def test_secagg_masking_cohort_recovers_the_weighted_average():
    from fedgov.crypto.secagg_masking import MaskingCohort

    rng = np.random.default_rng(0)
    cohort = MaskingCohort(5, num_shares=3, threshold=2)
    updates = [[rng.normal(0, 0.1, (50,)), rng.normal(0, 0.1, (2, 3))] for _ in range(5)]
    weights = [0.1, 0.3, 0.2, 0.2, 0.2]
    masked = [cohort.mask(i, u, weight=w) for i, (u, w) in enumerate(zip(updates, weights))]
    # A single masked upload says nothing useful: it is uniform modulo 2^32, far from the update.
    assert np.abs(masked[0][1].astype(np.float64)).mean() > 1e6
    got = cohort.unmask(masked, list(range(5)))
    step = 2 * cohort.clip_range / cohort.quantization_range
    for j in range(2):
        want = sum(w * u[j] for u, w in zip(updates, weights)) / sum(weights)
        assert np.max(np.abs(got[j] - want)) <= 5 * step


def test_suite_definitions_load_and_quick_only_shrinks_known_keys(tmp_path):
    for name in ("aggregation", "dp_training", "round", "realtime", "scale"):
        full = load_suite_spec(SUITES_DIR, name, quick=False)
        quick = load_suite_spec(SUITES_DIR, name, quick=True)
        assert full["name"] == quick["name"] == name and set(quick) == set(full)
    (tmp_path / "aggregation.toml").write_text('[suite]\nname = "aggregation"\n[quick]\nparamz = [1]\n')
    with pytest.raises(BenchError, match="quick.paramz: not a key"):
        load_suite_spec(tmp_path, "aggregation", quick=True)


def test_aggregation_suite_small(tmp_path):
    spec = {"params": [1000, 5000], "clients": [2, 3], "clients_for_param_sweep": 2, "params_for_client_sweep": 5000,
            "presets": ["standard", "compact"], "repeat": 1}
    ctx = BenchContext(quick=True, device="cpu", out=tmp_path, machine={"cpu_cores_usable": 1})
    rows = aggregation.run(spec, ctx)
    meas = [r for r in rows if r["kind"] == "measurement"]
    labels = {(r["mechanism"], r["preset"]) for r in meas}
    assert labels == {("plain", None), ("he", "standard"), ("he", "compact"), ("he", "flare"), ("secagg+", None)}
    for r in meas:
        assert r["client_seconds"] > 0 and r["server_seconds"] > 0 and r["bytes_per_client"] > 0
        if r["mechanism"] == "plain":
            assert r["bytes_per_client_ratio"] == 1.0
        else:  # every protection costs bytes and client time over plaintext
            assert r["bytes_per_client_ratio"] > 1.0 and r["client_seconds_ratio"] > 1.0
        if r["mechanism"] == "he":
            assert r["server_raw_seconds"] > 0 and r["max_abs_error"] < 1e-3
    std = {r["params"]: r for r in meas if r["preset"] == "standard" and r["clients"] == 2}
    flare = {r["params"]: r for r in meas if r["preset"] == "flare" and r["clients"] == 2}
    assert all(std[p]["bytes_per_client"] < flare[p]["bytes_per_client"] for p in std)
    targets = {(r["preset"], r["target"]) for r in rows if r["kind"] == "target"}
    assert ("standard", "bytes_over_flare_reference") in targets and ("compact", "aggregation_over_raw_tenseal") in targets
    fits = [r for r in rows if r["kind"] == "fit"]
    assert any(r["against"] == "params" for r in fits) and any(r["against"] == "clients" for r in fits)
    paths = aggregation.figures(rows, tmp_path)
    assert paths and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "he/standard" in aggregation.report(rows)


def test_bad_device_and_bad_suite_file_exit_2_with_one_line(tmp_path):
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "fedgov.bench", "--device", "cuda", "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and "--device cuda" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "round.toml").write_text("[suite\n")
    proc = subprocess.run([sys.executable, "-m", "fedgov.bench", "--suite", "round", "--suites-dir", str(tmp_path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "round.toml: not valid TOML" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmark_writes_results_report_and_verdicts(tmp_path):
    out = tmp_path / "bench"
    suites = [arg for name in ("aggregation", "dp_training", "round", "realtime") for arg in ("--suite", name)]
    proc = subprocess.run([sys.executable, "-m", "fedgov.bench", "--quick", "--device", "cpu", *suites,
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["machine"]["cpu_cores"] >= 1 and results["machine"]["libraries"]["tenseal"]
    assert len(results["code"]["source_hash"]) == 64  # the code that measured it: one version in the file
    assert len(set(GIT_COMMIT.findall((out / "results.json").read_text()))) <= 1
    assert {n: s["status"] for n, s in results["suites"].items()} == {
        "aggregation": "ok", "dp_training": "ok", "round": "ok", "realtime": "ok"}
    rows = results["rows"]
    mechanisms = {r["mechanism"] for r in rows if r["suite"] == "aggregation" and r.get("kind") == "measurement"}
    assert {"plain", "he", "secagg+"} <= mechanisms
    verdicts = [r for r in rows if r["suite"] == "realtime" and r.get("kind") == "verdict"]
    assert verdicts and all(r["budget_ms"] > 0 and r["p99_ms"] > 0 and r["verdict"] in ("meets", "misses")
                            for r in verdicts)
    assert {r["part"] for r in verdicts} == {"inference", "freshness"}
    rounds = {r["mechanism"]: r for r in rows if r["suite"] == "round" and r.get("kind") == "round"}
    assert rounds["he"]["encrypt_max_seconds"] > 0 and rounds["none"]["round_seconds"] > 0
    assert rounds["floor"]["engine"] == "none" and rounds["floor"]["final_accuracy"] == rounds["none"]["final_accuracy"]
    assert rounds["he"]["engine"] == rounds["none"]["engine"] == "pool"
    assert rounds["he"]["engine_seconds"] == rounds["none"]["engine_seconds"]
    assert rounds["he"]["mechanism_seconds"] == pytest.approx(rounds["he"]["round_seconds"] - rounds["none"]["round_seconds"])
    (target,) = [r for r in rows if r["suite"] == "round" and r.get("kind") == "target"]
    assert target["value"] == rounds["none"]["floor_ratio"] and target["verdict"] in ("meets", "misses")
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "suite" in header and len((out / "results.csv").read_text().splitlines()) == len(rows) + 1
    for name in ("aggregation.png", "round.png", "realtime.png", "dp_training.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "misses" in report + "meets"
    # Running it again keeps every finished suite instead of measuring again.
    again = subprocess.run([sys.executable, "-m", "fedgov.bench", "--quick", "--device", "cpu", "--out", str(out),
                            "--suite", "aggregation"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "kept from the earlier run" in again.stderr


# ---- which code measured a suite: kept only when the same code did ---------------------------------

CODE = {"git_commit": "a" * 40, "git_dirty": False, "fedgov_version": "0.1.0", "source_hash": "1" * 64}
OTHER_CODE = {"git_commit": "b" * 40, "git_dirty": False, "fedgov_version": "0.1.0", "source_hash": "2" * 64}
GIT_COMMIT = re.compile(r'"git_commit": "([0-9a-f]{40})"')  # what the before-stop check greps


class FakeSuite:
    """Stands in for a suite module: counts its runs, records the rows it was given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs = 0
        self.seen: list[list[dict]] = []

    def run(self, spec, ctx):
        self.runs += 1
        self.seen.append(list(ctx.rows))
        return [{"kind": "fake", "value": spec["value"], "run": self.runs}]

    def figures(self, rows, out):
        return []

    def report(self, rows):
        return f"{self.name}: {len(rows)} rows\n"


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    from fedgov.bench import core

    suites_dir = tmp_path / "suites"
    suites_dir.mkdir()
    for name in ("aggregation", "round"):
        (suites_dir / f"{name}.toml").write_text(f'[suite]\nname = "{name}"\nvalue = 1\n[quick]\nvalue = 0\n')
    fakes = {name: FakeSuite(name) for name in ("aggregation", "round")}
    monkeypatch.setattr(core, "suite_module", lambda name: fakes[name])
    monkeypatch.setattr("fedgov.bench.cli.describe_machine", lambda: {"cpu_model": "test", "fedgov_commit": None})

    def bench(suites, *, code=CODE, **kwargs):
        return run_benchmarks(suites=suites, quick=False, device="cpu", out=tmp_path / "out", suites_dir=suites_dir,
                              code=code, **kwargs)

    bench.fakes = fakes
    bench.out = tmp_path / "out"
    return bench


def commits(path: Path) -> set[str]:
    return set(GIT_COMMIT.findall(path.read_text()))


def test_a_suite_is_kept_only_when_the_same_code_measured_it(fake_bench, capsys):
    fakes, out = fake_bench.fakes, fake_bench.out
    fake_bench(["aggregation", "round"])
    assert fakes["aggregation"].runs == fakes["round"].runs == 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["code"] == CODE and not saved["reuse_stale"]
    assert {n: s["source_hash"] for n, s in saved["suites"].items()} == {"aggregation": "1" * 64, "round": "1" * 64}
    assert commits(out / "results.json") == {CODE["git_commit"]}
    fake_bench(["aggregation", "round"])  # the same code: both kept
    assert fakes["aggregation"].runs == fakes["round"].runs == 1
    # The same sources under another commit (or a dirty tree) are the same code: kept, and the file
    # names the current commit only.
    fake_bench(["aggregation", "round"], code={**CODE, "git_commit": "c" * 40, "git_dirty": True})
    assert fakes["aggregation"].runs == fakes["round"].runs == 1
    assert commits(out / "results.json") == {"c" * 40}
    # Other code: the suite asked for is measured again; the one not asked for is dropped, not kept.
    capsys.readouterr()
    results = fake_bench(["aggregation"], code=OTHER_CODE)
    assert fakes["aggregation"].runs == 2 and fakes["round"].runs == 1
    assert set(results["suites"]) == {"aggregation"} and {r["suite"] for r in results["rows"]} == {"aggregation"}
    err = capsys.readouterr().err
    assert "[aggregation] measured by other code" in err and "[round] measured by other code" in err
    assert "dropped" in err
    assert commits(out / "results.json") == {OTHER_CODE["git_commit"]}
    assert "stale" not in results["suites"]["aggregation"]


def test_reuse_stale_keeps_other_codes_suites_and_marks_them(fake_bench):
    fakes, out = fake_bench.fakes, fake_bench.out
    fake_bench(["round"])
    results = fake_bench(["aggregation", "round"], code=OTHER_CODE, reuse_stale=True)
    assert fakes["round"].runs == 1 and fakes["aggregation"].runs == 1  # round kept, aggregation new
    saved = json.loads((out / "results.json").read_text())
    assert saved["reuse_stale"] and saved["code"] == OTHER_CODE
    rnd, agg = saved["suites"]["round"], saved["suites"]["aggregation"]
    assert rnd["stale"] is True and rnd["code"]["git_commit"] == CODE["git_commit"]
    assert rnd["code"]["source_hash"] == CODE["source_hash"] and "source_hash" not in rnd
    assert "stale" not in agg and agg["source_hash"] == OTHER_CODE["source_hash"]
    assert results["suites"]["round"]["stale"]
    # A suite run now must not build on rows other code measured.
    assert all(r.get("suite") != "round" for r in fakes["aggregation"].seen[-1])
    csv_rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["suite"]: r["stale"] for r in csv_rows} == {"round": "True", "aggregation": "False"}
    report = (out / "report.md").read_text()
    assert "**Stale**" in report and f"git {'a' * 12}" in report and f"fedgov code: git {'b' * 12}" in report
    assert commits(out / "results.json") == {CODE["git_commit"], OTHER_CODE["git_commit"]}
    # A stale suite stays stale (its code is still not this one) until it is measured again.
    fake_bench(["round"], code=OTHER_CODE, reuse_stale=True)
    assert fakes["round"].runs == 1
    assert json.loads((out / "results.json").read_text())["suites"]["round"]["code"]["git_commit"] == "a" * 40
    fake_bench(["round"], code=OTHER_CODE)
    assert fakes["round"].runs == 2
    assert commits(out / "results.json") == {OTHER_CODE["git_commit"]}


def test_a_results_file_from_before_the_code_was_recorded_is_stale(fake_bench):
    fakes, out = fake_bench.fakes, fake_bench.out
    fake_bench(["round"])
    saved = json.loads((out / "results.json").read_text())
    del saved["code"]  # as fedgov wrote it before: only machine.fedgov_commit
    saved["machine"]["fedgov_commit"] = CODE["git_commit"]
    for info in saved["suites"].values():
        del info["source_hash"]
    (out / "results.json").write_text(json.dumps(saved))
    fake_bench(["round"])
    assert fakes["round"].runs == 2


def test_reuse_stale_is_an_option_of_the_command_line():
    from fedgov.bench.cli import _parser

    assert _parser().parse_args(["--reuse-stale"]).reuse_stale
    assert not _parser().parse_args([]).reuse_stale


# ---- realtime: enough samples for the percentiles it reports -------------------------------------

def test_the_full_realtime_suite_times_enough_requests_and_rounds():
    from fedgov.bench.suites import realtime

    full = load_suite_spec(SUITES_DIR, "realtime", quick=False)
    assert full["samples"] >= realtime.MIN_LATENCY_SAMPLES == 1000
    assert full["freshness_rounds"] - 1 >= realtime.MIN_FRESHNESS_ROUNDS == 20  # the first round is not timed
    realtime.check_sizes(full, quick=False)
    quick = load_suite_spec(SUITES_DIR, "realtime", quick=True)
    assert quick["samples"] <= 50 and quick["freshness_rounds"] <= 2  # the smoke test stays small
    realtime.check_sizes(quick, quick=True)
    with pytest.raises(ValueError, match="at least 1000 requests"):
        realtime.check_sizes({**full, "samples": 999}, quick=False)
    with pytest.raises(ValueError, match="at least 20 rounds"):
        realtime.check_sizes({**full, "freshness_rounds": 20}, quick=False)


def test_latency_fields_report_n_and_p50_p95_p99():
    from fedgov.bench.inference import _latency_fields

    fields = _latency_fields([i / 1000 for i in range(1, 1001)])  # 1 ms ... 1000 ms
    assert fields["latency_n"] == 1000
    assert fields["latency_p50_ms"] == pytest.approx(500.5)
    assert fields["latency_p95_ms"] == pytest.approx(950.05)
    assert fields["latency_p99_ms"] == pytest.approx(990.01)


def _round_metrics(rounds: int) -> list[dict]:
    return [{"seconds": 0.5 + 0.01 * i, "bytes_up": 10, "bytes_down": 10, "accuracy": 0.9,
             "phase_seconds": {"train": 0.3, "evaluate": 0.1}} for i in range(rounds)]


def test_freshness_uses_round_rows_only_with_enough_timed_rounds(tmp_path, monkeypatch):
    from fedgov.bench.suites import realtime, round as round_suite

    calls = []

    def fake_simulate(mechanism, *, rounds, cooperatives, device, out, seed=0, engine="pool"):
        calls.append((mechanism, rounds))
        return _round_metrics(rounds)

    monkeypatch.setattr(round_suite, "simulate_rounds", fake_simulate)
    spec = {"freshness_mechanisms": ["none", "he"], "freshness_rounds": 21, "freshness_cooperatives": 3}
    short = {"suite": "round", "kind": "round", "device": "cpu", "rounds_timed": 5, "round_seconds": 0.4,
             "round_seconds_p99": 0.5, "round_seconds_min": 0.3}
    ctx = BenchContext(quick=False, device="cpu", out=tmp_path, rows=[
        {**short, "mechanism": "none"}, {**short, "mechanism": "he", "rounds_timed": 20},
        {**short, "mechanism": "none", "engine": "flower", "rounds_timed": 20}])
    rows = realtime._freshness(spec, ctx)
    # 5 timed rounds are too few, 20 are enough; a round on Flower's engine is not the pool's to reuse.
    assert calls == [("none", 21)]
    by = {r["mechanism"]: r for r in rows}
    assert by["none"]["rounds_timed"] == 20 and by["none"]["from_suite"] == "realtime"
    assert by["he"]["rounds_timed"] == 20 and by["he"]["from_suite"] == "round"
    text = realtime.report([{"kind": "freshness", "device": "cpu", **r} for r in rows])
    assert "| none | cpu | 20 |" in text


def test_realtime_report_shows_n_and_three_percentiles():
    from fedgov.bench.suites import realtime

    row = {"kind": "inference", "model": "logreg", "mode": "he", "latency_n": 1000, "latency_p50_ms": 15.0,
           "latency_p95_ms": 20.0, "latency_p99_ms": 23.0, "throughput_per_s": 100.0, "request_bytes": 10,
           "response_bytes": 10, "agreement": 1.0, "test_accuracy": 0.97}
    verdict = realtime._verdict(realtime.BUDGETS[0], 0.023, {"model": "logreg", "mode": "he", "n": 1000})
    text = realtime.report([row, verdict])
    assert "| n | p50 (ms) | p95 (ms) | p99 (ms) |" in text
    assert "| logreg | he | 1000 | 15 | 20 | 23 |" in text
    assert "| logreg he | 1000 | 23 ms |" in text


# ---- round: engine vs mechanism, against the engine-free floor -----------------------------------

def test_round_rows_split_engine_from_mechanism_against_the_floor():
    from fedgov.bench.suites import round as round_suite

    def rows(seconds: float, train: float, local: float) -> list[dict]:
        return [{"seconds": seconds, "bytes_up": 10, "bytes_down": 10, "accuracy": 0.5,
                 "phase_seconds": {"train": train, "local_train_max": local, "evaluate": 0.01}}] * 3

    summarized = round_suite.split_costs([
        round_suite.summarize("none", rows(0.12, 0.08, 0.02), device="cpu"),
        round_suite.summarize("he", rows(0.42, 0.30, 0.02), device="cpu"),
        round_suite.summarize("none", rows(0.30, 0.20, 0.02), device="cpu", engine="flower"),
        round_suite.summarize(round_suite.FLOOR, rows(0.10, 0.08, 0.02), device="cpu")])
    plain, he, flower, floor = summarized
    assert floor["engine"] == "none" and plain["engine"] == he["engine"] == "pool" and flower["engine"] == "flower"
    assert plain["floor_ratio"] == pytest.approx(1.2) and he["floor_ratio"] == pytest.approx(4.2)
    assert he["round_ratio"] == pytest.approx(3.5) and floor["round_ratio"] == pytest.approx(0.1 / 0.12)
    assert he["engine_seconds"] == pytest.approx(0.02) and he["mechanism_seconds"] == pytest.approx(0.30)
    assert flower["engine_seconds"] == pytest.approx(0.20) and flower["mechanism_seconds"] == pytest.approx(0.0)
    assert plain["mechanism_seconds"] == pytest.approx(0.0) and "engine_seconds" not in floor
    (verdict,) = round_suite.verdicts(summarized)
    assert verdict["value"] == pytest.approx(1.2) and verdict["verdict"] == "meets"
    text = round_suite.report(summarized + [verdict])
    assert "| he | 0.420 | 3.50 | 4.20 | +0.020 | +0.300 | 71% |" in text
    assert "| none (flower) | 0.300 | 2.50 | 3.00 | +0.200 | +0.000 | 0% |" in text
    assert "floor (no engine)" in text and "+0.020 s of each round is the engine's" in text
    assert "+0.200 s of each round is the engine's" in text and "measured 1.20, **meets**" in text


def test_gpu_check_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    import torch

    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run for real")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "DEVICE": "cuda"})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "out").exists()


# ---- scale: whole commands, every process's memory, targets -------------------------------------

def test_run_measured_counts_the_memory_of_every_process_the_command_starts():
    from fedgov.bench.processes import run_measured

    # A child that holds ~200 MB while its parent holds little: only the sum over both sees it.
    script = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
              "'import time; x = bytearray(200 * 2**20); x[::4096] = b\"1\" * len(x[::4096]); time.sleep(1.5)'])")
    measured = run_measured([sys.executable, "-c", script], interval=0.1)
    assert measured.returncode == 0 and measured.wall_seconds >= 1.5
    if measured.peak_rss_bytes is not None:  # a machine with /proc
        assert measured.peak_rss_bytes > 200 * 2**20 and measured.peak_processes >= 2


def test_run_measured_stops_the_command_and_everything_it_started_at_the_timeout():
    import os

    from fedgov.bench.processes import run_measured, tagged_pids

    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to find the processes")
    # The grandchild leaves the command's session, as Ray's processes do; it must be stopped too.
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); print('started', flush=True); time.sleep(60)")
    started = time.monotonic()
    measured = run_measured([sys.executable, "-c", script], timeout=2.0, interval=0.1)
    assert measured.timed_out and measured.returncode != 0 and "started" in measured.stdout
    assert 2.0 <= measured.wall_seconds < 30 and time.monotonic() - started < 30
    if measured.peak_rss_bytes is not None:
        assert measured.peak_processes >= 2
    leftovers = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"time.sleep(60)" in cmdline and b"start_new_session" not in cmdline:
            leftovers.append(pid)
    assert not leftovers, f"the grandchild survived the timeout: {leftovers}"
    assert tagged_pids("no-such-tag") == []


def test_scale_verdicts_and_report():
    from fedgov.bench.suites import scale

    ok = {"kind": "scale", "status": "ok", "dataset": "synthetic", "rounds": 20, "sampled_per_round": 50,
          "wall_seconds": 70.0, "floor_wall_seconds": 20.0, "floor_ratio": 3.5, "startup_seconds": 10.0,
          "round_seconds_median": 3.0, "evaluate_seconds": 5.0, "peak_memory_bytes": 3e9, "peak_processes": 9,
          "final_accuracy": 0.5, "floor_final_accuracy": 0.5, "floor_peak_memory_bytes": 1e9}
    rows = [{**ok, "members": 1000}, {"kind": "scale", "members": 10000, "status": "failed", "dataset": "synthetic",
                                       "rounds": 5, "error": "fedgov.simulate exited 1: boom"},
            {"kind": "scale", "members": 3000, "status": "timed_out", "dataset": "synthetic", "rounds": 5,
             "wall_seconds": 900.0, "rounds_done": 1, "peak_memory_bytes": 2e9, "peak_processes": 7,
             "error": "did not finish within 900 s (1 rounds done)"}]
    verdicts = {(v["members"], v["target"]): v for v in scale.verdicts(rows)}
    assert verdicts[(1000, "floor_ratio")]["verdict"] == "misses" and verdicts[(1000, "floor_ratio")]["value"] == 3.5
    assert (1000, "wall_seconds") not in verdicts  # 1,000 members have a ratio target, no wall-time target
    assert verdicts[(10000, "peak_memory_gb")]["verdict"] == "unknown"
    scale.TARGETS[3000] = {"wall_seconds": 600.0, "peak_memory_gb": 8.0}
    try:
        timed = {v["target"]: v for v in scale.verdicts(rows) if v["members"] == 3000}
    finally:
        del scale.TARGETS[3000]
    # Stopped at 900 s: the wall target is missed whatever the rest would have taken; memory is not known.
    assert timed["wall_seconds"]["verdict"] == "misses" and timed["wall_seconds"]["value"] == 900
    assert timed["peak_memory_gb"]["verdict"] == "unknown"
    text = scale.report(rows + list(verdicts.values()))
    assert "| 3,000 | pool | synthetic | 5 | - | > 900 (did not finish within 900 s (1 rounds done))" in text
    assert "| 1,000 | pool | synthetic | 20 | 50 | 70.0 | 20.0 | 3.50 |" in text
    assert "failed: fedgov.simulate exited 1" in text
    # A size also run on Flower's engine is reported, and never held to the pool's targets.
    flower_row = {**ok, "members": 1000, "engine": "flower", "wall_seconds": 140.0, "floor_ratio": 7.0}
    assert [v for v in scale.verdicts([flower_row])] == []
    assert "| 1,000 | flower | synthetic | 20 | 50 | 140.0 |" in scale.report([flower_row])
    assert scale.case_settings(1000, rounds=20, fraction=0.05, dataset="synthetic", examples_per_member=40,
                               device="cpu", engine="flower")["runtime.engine"] == "flower"
    assert scale.case_settings(10, rounds=20, fraction=1.0, dataset="digits", examples_per_member=40,
                               device="cpu") == {"seed": 0, "train.rounds": 20, "data.num_cooperatives": 10,
                                                 "strategy.fraction_train": 1.0, "runtime.device": "cpu"}


@pytest.mark.slow
def test_scale_measures_a_small_federation_and_its_floor(tmp_path):
    from fedgov.bench.suites import scale

    sets = scale.case_settings(20, rounds=2, fraction=0.25, dataset="synthetic", examples_per_member=40, device="cpu")
    row = scale.measure_size(20, sets, tmp_path, timeout=300)
    assert row["status"] == "ok", row
    assert row["sampled_per_round"] == 5 and row["floor_final_accuracy"] == pytest.approx(row["final_accuracy"])
    assert row["wall_seconds"] > row["rounds_seconds"] > 0 and row["startup_seconds"] > 0
    assert row["floor_ratio"] == pytest.approx(row["wall_seconds"] / row["floor_wall_seconds"])
    if row["peak_memory_bytes"] is not None:  # the pool's workers counted: more than the floor's one process
        assert row["peak_processes"] > 2 and row["peak_memory_bytes"] > row["floor_peak_memory_bytes"]
    paths = scale.figures([row], tmp_path)
    assert paths and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_repeated_size_reports_the_pair_with_the_median_ratio(tmp_path, monkeypatch):
    from fedgov.bench.suites import scale

    ratios = iter([1.4, 1.1, 1.2])
    calls = []

    def fake_pair(members, sets, work, *, timeout):
        calls.append(work)
        ratio = next(ratios)
        return {"kind": "scale", "members": members, "status": "ok", "floor_ratio": ratio,
                "wall_seconds": 10 * ratio, "floor_wall_seconds": 10.0, "peak_memory_bytes": int(ratio * 1e9),
                "peak_rss_bytes": int(ratio * 2e9)}

    monkeypatch.setattr(scale, "_measure_pair", fake_pair)
    row = scale.measure_size(1000, {}, tmp_path, timeout=10, repeats=3)
    assert len(set(calls)) == 3  # each pair in a folder of its own
    assert row["floor_ratio"] == 1.2 and row["wall_seconds"] == 12.0 and row["floor_ratios"] == [1.4, 1.1, 1.2]
    assert row["peak_memory_bytes"] == int(1.4e9) and row["peak_rss_bytes"] == int(2.8e9)  # the highest of all
    assert "| 1.20 (1.10-1.40) |" in scale.report([{**row, "engine": "pool", "dataset": "synthetic", "rounds": 20,
                                                    "sampled_per_round": 50, "startup_seconds": 1.0,
                                                    "round_seconds_median": 0.3, "evaluate_seconds": 1.0,
                                                    "peak_processes": 3, "final_accuracy": 0.5,
                                                    "floor_final_accuracy": 0.5}])


def test_a_suite_with_a_failed_measurement_says_so_and_is_measured_again(fake_bench, capsys):
    """The deployment suite's TLS federation once failed while the run printed `ok`, exited 0, and a
    rerun would have kept the suite: a failed row now shows in the status line and the report, and
    the next run measures that suite again."""
    fakes, out = fake_bench.fakes, fake_bench.out
    fakes["round"].run = lambda spec, ctx: [{"kind": "fake", "status": "ok"},
                                            {"kind": "fake", "status": "failed", "error": "RuntimeError: no"}]
    results = fake_bench(["aggregation", "round"])
    assert results["suites"]["round"]["failed_measurements"] == 1
    assert "failed_measurements" not in results["suites"]["aggregation"]
    assert "[round] ok in" in capsys.readouterr().err.split("1 of them FAILED")[0]
    assert "**1 measurement(s) failed**" in (out / "report.md").read_text()
    fakes["round"].run = FakeSuite.run.__get__(fakes["round"])
    fake_bench(["aggregation", "round"])
    assert fakes["round"].runs == 1 and fakes["aggregation"].runs == 1  # round measured again, aggregation kept
    assert "failed_measurements" not in json.loads((out / "results.json").read_text())["suites"]["round"]
