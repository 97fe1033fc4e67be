"""The ``deployment`` suite's arithmetic and report, from rows (its measurements need a federation of
real processes: ``python -m fedgov.bench --suite deployment``; the tests of that federation are
tests/test_deployment*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgov.bench.cli import SUITES, load_suite_spec
from fedgov.bench.suites import deployment

ROOT = Path(__file__).resolve().parents[2]


def _row(transport: str, repeat: int, seconds: float, lo: float, pss: float) -> dict:
    return {"kind": "federation", "status": "ok", "transport": transport, "repeat": repeat, "members": 20,
            "rounds": 10, "rounds_completed": 10, "rounds_with_every_member": 10, "seconds_per_round": seconds,
            "payload_bytes_per_round": 5e6, "loopback_bytes_per_round": lo, "superlink_peak_pss_bytes": pss,
            "superlink_peak_rss_bytes": pss * 1.2, "wall_seconds": seconds * 10 + 30, "final_accuracy": 0.9}


def test_the_ratio_is_secure_over_clear_text_pair_by_pair_and_the_median_of_the_pairs():
    rows = [_row("insecure", 0, 10.0, 100.0, 500.0), _row("tls+auth", 0, 12.0, 110.0, 520.0),
            _row("insecure", 1, 20.0, 100.0, 500.0), _row("tls+auth", 1, 21.0, 130.0, 500.0),
            _row("insecure", 2, 10.0, 100.0, 500.0), _row("tls+auth", 2, 16.0, 120.0, 510.0),
            {**_row("tls+auth", 3, 99.0, 1.0, 1.0), "status": "failed"}]  # a failed run pairs with nothing
    ratio = deployment.ratio_row(rows)
    assert ratio["pairs"] == 3
    assert ratio["seconds_per_round_ratios"] == pytest.approx([1.2, 1.05, 1.6])
    assert ratio["seconds_per_round_ratio"] == pytest.approx(1.2)
    assert ratio["loopback_bytes_per_round_ratio"] == pytest.approx(1.2)
    assert ratio["superlink_peak_pss_bytes_ratio"] == pytest.approx(1.02)
    assert deployment.ratio_row(rows[:1]) is None
    text = deployment.report([*rows, ratio])
    assert "| 2 | tls+auth | 20 | 10 of 10 | 10 | 21 |" in text
    assert "failed" in text and "seconds per round x1.2" in text


def test_loopback_counters_are_read_from_proc():
    if not Path("/proc/net/dev").is_file():
        assert deployment.loopback_bytes() is None
        return
    first = deployment.loopback_bytes()
    assert first is not None and first >= 0
    assert deployment.loopback_bytes() >= first  # counters only grow


def test_the_suite_is_registered_and_its_quick_definition_is_small():
    assert "deployment" in SUITES
    full = load_suite_spec(ROOT / "benchmarks", "deployment", quick=False)
    quick = load_suite_spec(ROOT / "benchmarks", "deployment", quick=True)
    assert (full["members"], full["rounds"]) == (20, 10)  # the load the deployment issue asks for
    assert quick["members"] < full["members"] and quick["rounds"] < full["rounds"]


def test_flower_is_handed_absolute_paths_when_the_results_folder_is_relative(tmp_path, monkeypatch):
    """`--out benchmarks/results/X` is relative; Flower's CLI runs in the checkout and refuses a relative
    root-certificates path (exiting 0), which failed every TLS run of the suite."""
    import tomllib

    from fedgov.bench.flower_processes import flower_environment, write_connection

    monkeypatch.chdir(tmp_path)
    env = flower_environment(Path("results/work"))
    assert Path(env["HOME"]) == tmp_path.resolve() / "results/work/home"
    assert Path(env["FLWR_HOME"]) == tmp_path.resolve() / "results/work/flwr-home"
    write_connection(Path(env["FLWR_HOME"]), "bench", 9093, root_certificates=Path("results/work/tls/ca.crt"))
    config = tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text())
    assert config["superlink"]["bench"]["root-certificates"] == str(tmp_path.resolve() / "results/work/tls/ca.crt")
