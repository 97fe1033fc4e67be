import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedgov.config import Config, ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_file_is_valid_and_matches_issue_defaults():
    cfg = load_config(ROOT / "configs" / "default.toml")
    assert cfg.data.dataset == "digits"
    assert cfg.data.num_cooperatives == 10
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_flat_round_trip():
    cfg = load_config(overrides=["data.alpha=0.1", "strategy.name=fedprox", "train.rounds=3"])
    again = Config.from_flat(cfg.to_flat())
    assert again == cfg
    assert again.hash() == cfg.hash()


def test_pyproject_app_config_lists_every_key_with_its_default():
    # `flwr run --run-config` only accepts keys that pyproject.toml declares.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == Config().to_dict()


def test_override_parsing():
    assert parse_override("data.alpha=0.1") == ("data.alpha", 0.1)
    assert parse_override("model.name=cnn") == ("model.name", "cnn")
    assert parse_override('model.name="cnn"') == ("model.name", "cnn")
    assert parse_override("train.rounds=5") == ("train.rounds", 5)


@pytest.mark.parametrize("override, fragment", [
    ("data.no_such_key=1", "data.no_such_key: unknown key"),
    ("train.rounds=1.5", "train.rounds: expected int"),
    ("train.rounds=true", "train.rounds: expected int"),
    ("data.alpha=0", "data.alpha: 0"),
    ("strategy.fraction_train=1.5", "strategy.fraction_train"),
    ("data.dataset=mnist", "data.dataset: 'mnist' is not one of"),
    ("data.partition=natural", "data.partition"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(overrides=[override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nrounds = 'many'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "train.rounds" in str(info.value)
    path.write_text("[data]\nflavour = 1\n")
    with pytest.raises(ConfigError, match="data.flavour: unknown key"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def test_hash_ignores_output_folder_but_not_settings():
    base = Config()
    assert base.replace(**{"runtime.out": "elsewhere"}).hash() == base.hash()
    assert base.replace(**{"seed": 1}).hash() != base.hash()


def test_cli_unknown_key_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedgov.simulate", "--set", "data.no_such_key=1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing was started


def test_cli_bad_file_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nname = 'transformer'\n")
    proc = subprocess.run([sys.executable, "-m", "fedgov.simulate", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.name" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_data_problem_exits_2_naming_the_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedgov.simulate", "--set", "data.dataset=csv",
                           "--set", f"data.path={tmp_path / 'missing.csv'}", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing.csv" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
