"""The benchmark harness: ``python -m fedgov.bench``, its statistics, and the aggregation suite's arithmetic."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedgov.bench.cli import BenchError, load_suite_spec
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
    from fedgov.crypto.secagg import MaskingCohort

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
    for name in ("aggregation", "dp_training", "round", "realtime"):
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
    proc = subprocess.run([sys.executable, "-m", "fedgov.bench", "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["machine"]["cpu_cores"] >= 1 and results["machine"]["libraries"]["tenseal"]
    assert {n: s["status"] for n, s in results["suites"].items()} == {
        "aggregation": "ok", "dp_training": "ok", "round": "ok", "realtime": "ok"}
    rows = results["rows"]
    mechanisms = {r["mechanism"] for r in rows if r["suite"] == "aggregation" and r.get("kind") == "measurement"}
    assert {"plain", "he", "secagg+"} <= mechanisms
    verdicts = [r for r in rows if r["suite"] == "realtime" and r.get("kind") == "verdict"]
    assert verdicts and all(r["budget_ms"] > 0 and r["p99_ms"] > 0 and r["verdict"] in ("meets", "misses")
                            for r in verdicts)
    assert {r["part"] for r in verdicts} == {"inference", "freshness"}
    rounds = {r["mechanism"]: r for r in rows if r["suite"] == "round"}
    assert rounds["he"]["encrypt_max_seconds"] > 0 and rounds["none"]["round_seconds"] > 0
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
