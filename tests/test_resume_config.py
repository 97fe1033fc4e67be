"""Resuming under `flwr run`: RUN_DIR/resume.toml carries the run's whole config, and a run config
that differs from the run's own is refused (the members would train under another config)."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fedgov.config import Config
from fedgov.server_app import FederationError, resumed_run, write_resume_config


def test_resume_toml_is_the_runs_config_and_names_the_run(tmp_path):
    cfg = Config().replace(**{"data.num_cooperatives": 3, "train.rounds": 4, "privacy.dp": "sample",
                              "privacy.target_epsilon": 3.0})
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    path = write_resume_config(cfg, tmp_path)
    # What `flwr run --run-config RUN_DIR/resume.toml` hands the ServerApp and every ClientApp.
    given = Config.from_flat(parse_config_args([str(path)]))
    assert given.runtime.resume == str(tmp_path.resolve())
    own, run_dir = resumed_run(given)
    assert run_dir == tmp_path.resolve()
    assert own.to_flat() == cfg.to_flat() and own.hash() == given.hash()


def test_a_run_config_that_differs_from_the_runs_own_is_refused_by_key(tmp_path):
    cfg = Config().replace(**{"data.num_cooperatives": 3})
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    other = cfg.replace(**{"runtime.resume": str(tmp_path), "train.lr": 0.5})
    with pytest.raises(FederationError, match=r"differs from .*config.toml in train.lr; .*resume.toml"):
        resumed_run(other)
    with pytest.raises(FederationError, match="not a run directory"):
        resumed_run(cfg.replace(**{"runtime.resume": str(tmp_path / "nowhere")}))


def test_simulate_points_runtime_resume_to_its_own_flag(tmp_path):
    from conftest import run_simulate

    result = run_simulate("--set", f"runtime.resume={tmp_path}", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "runtime.resume is for `flwr run`; here use --resume" in result.stderr
