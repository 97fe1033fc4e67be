"""The ``dp_training`` suite: runs its quick definition on the CPU, and draws and reports from the rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedgov.bench.cli import load_suite_spec
from fedgov.bench.core import BenchContext
from fedgov.bench.suites import dp_training

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    spec = load_suite_spec(ROOT / "benchmarks", "dp_training", quick=True)
    # Median of 3 epochs: the quick spec's single epoch is at the mercy of a busy 2-core machine.
    spec["epochs"] = 3
    ctx = BenchContext(quick=True, device="cpu", out=tmp_path_factory.mktemp("dp_training"))
    return spec, dp_training.run(spec, ctx)


def test_one_row_per_size_and_mode_with_sane_times(quick_rows: tuple[dict, list[dict]]) -> None:
    spec, rows = quick_rows
    assert [(r["hidden"], r["mode"]) for r in rows] == [(h, m) for h in spec["hidden"] for m in spec["modes"]]
    assert set(spec["modes"]) == {"none", "hooks", "functorch", "ghost"}
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["device"] == "cpu" and r["model"] == "mlp" and r["peak_memory_mb"] is None
        assert r["examples"] == spec["examples"] and r["epochs"] == spec["epochs"]
        assert 0 < r["seconds_per_epoch_best"] <= r["seconds_per_epoch"] and math.isfinite(r["seconds_per_epoch"])
        assert r["examples_per_second"] == pytest.approx(r["examples"] / r["seconds_per_epoch"])
    params = {r["hidden"]: r["params"] for r in rows}
    assert params[32] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10  # the MLP's real parameter count


def test_each_ratio_is_against_plain_training_of_the_same_size(quick_rows: tuple[dict, list[dict]]) -> None:
    # Whether DP-SGD is slower is the committed benchmark's finding, measured on an idle machine; a
    # quick run beside the rest of the suite on two busy cores only checks the arithmetic.
    _, rows = quick_rows
    plain = {r["hidden"]: r["seconds_per_epoch"] for r in rows if r["mode"] == "none"}
    for r in rows:
        assert r["ratio_to_nondp"] == pytest.approx(r["seconds_per_epoch"] / plain[r["hidden"]]), r
        assert r["ratio_to_nondp"] > 0


def test_figures_and_report_come_from_the_rows(quick_rows: tuple[dict, list[dict]], tmp_path: Path) -> None:
    _, rows = quick_rows
    [png] = dp_training.figures(rows, tmp_path)
    assert png.name == "dp_training.png" and png.read_bytes()[:8] == PNG_MAGIC
    text = dp_training.report(rows)
    for mode in ("none", "hooks", "functorch", "ghost"):
        assert f"| {mode} |" in text
    assert "DP-SGD took" in text


def test_a_failing_mode_becomes_an_error_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("layer not supported")

    real = dp_training._epoch_fn
    monkeypatch.setattr(dp_training, "_epoch_fn",
                        lambda mode, *a, **k: refuse() if mode == "ghost" else real(mode, *a, **k))
    spec = {"hidden": [16], "modes": ["none", "ghost"], "examples": 64, "epochs": 1}
    rows = dp_training.run(spec, BenchContext(quick=True, device="cpu", out=tmp_path))
    assert [r["mode"] for r in rows] == ["none", "ghost"]
    assert rows[1]["error"] == "RuntimeError: layer not supported" and rows[1]["seconds_per_epoch"] is None
    assert "failed" in dp_training.report(rows) and dp_training.figures(rows, tmp_path)
