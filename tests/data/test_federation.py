"""build_federation: global test hold-out, cooperatives, local splits, caching, summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedgov.config import DataConfig
from fedgov.data import DataError, Federation, build_federation, clear_cache, federation_summary
from fedgov.data import load_dataset


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def all_rows(fed: Federation) -> np.ndarray:
    parts = [fed.global_test.index]
    for coop in fed.cooperatives:
        parts += [coop.train.index, coop.test.index]
    return np.concatenate(parts)


def assert_same(a: Federation, b: Federation) -> None:
    assert np.array_equal(a.global_test.index, b.global_test.index)
    assert a.num_cooperatives == b.num_cooperatives
    for ca, cb in zip(a.cooperatives, b.cooperatives):
        assert np.array_equal(ca.train.index, cb.train.index)
        assert np.array_equal(ca.test.index, cb.test.index)
        assert np.array_equal(ca.train.x, cb.train.x)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "powerlaw"])
def test_every_row_used_exactly_once(partition: str) -> None:
    fed = build_federation(DataConfig(partition=partition), seed=0)
    rows = all_rows(fed)
    assert len(rows) == 1797
    assert np.array_equal(np.sort(rows), np.arange(1797))


def test_default_digits_federation() -> None:
    cfg = DataConfig()
    fed = build_federation(cfg, seed=0)
    data = load_dataset(cfg, seed=0)
    assert fed.num_cooperatives == 10 and fed.num_classes == 10
    assert fed.input_shape == (1, 8, 8) and fed.num_features == 64
    assert len(fed.global_test) == round(0.2 * 1797)
    for coop in fed.cooperatives:
        assert coop.name == f"coop-{coop.id}"
        assert len(coop.train) >= cfg.min_examples
        assert len(coop.test) >= 1
        # Arrays hold exactly the rows their index names.
        np.testing.assert_array_equal(coop.train.x, data.x[coop.train.index])
        np.testing.assert_array_equal(coop.test.y, data.y[coop.test.index])
        stats = coop.stats()
        assert stats["num_examples"] == stats["num_train"] + stats["num_test"]
        assert len(stats["label_counts"]) == 10
        assert sum(stats["label_counts"]) == stats["num_examples"]
        assert all(type(c) is int for c in stats["label_counts"])


def test_global_test_is_stratified() -> None:
    fed = build_federation(DataConfig(), seed=0)
    y_all = load_dataset(DataConfig(), seed=0).y
    expected = np.bincount(y_all) * len(fed.global_test) / len(y_all)
    assert np.all(np.abs(np.bincount(fed.global_test.y, minlength=10) - expected) <= 1)


def test_local_splits_keep_their_fraction() -> None:
    fed = build_federation(DataConfig(partition="iid", local_test_fraction=0.25), seed=0)
    for coop in fed.cooperatives:
        assert abs(len(coop.test) - 0.25 * coop.num_examples) <= 1


def test_same_seed_same_federation_different_seed_different() -> None:
    cfg = DataConfig()
    a = build_federation(cfg, seed=1)
    clear_cache()
    b = build_federation(cfg, seed=1)
    assert a is not b
    assert_same(a, b)
    c = build_federation(cfg, seed=2)
    assert not np.array_equal(a.global_test.index, c.global_test.index)
    assert not np.array_equal(a.cooperatives[0].train.index, c.cooperatives[0].train.index)


def test_cached_per_config_and_seed() -> None:
    cfg = DataConfig()
    fed = build_federation(cfg, seed=0)
    assert build_federation(DataConfig(), seed=0) is fed  # an equal config hits the cache
    assert build_federation(cfg, seed=1) is not fed
    cfg.alpha = 5.0  # DataConfig is mutable: the key is its current values
    assert build_federation(cfg, seed=0) is not fed


def test_digits_builds_fast() -> None:
    build_federation(DataConfig(), seed=0)  # imports and sklearn's file read
    clear_cache()
    start = time.perf_counter()
    build_federation(DataConfig(), seed=3)
    assert time.perf_counter() - start < 1.0


def test_powerlaw_federation_has_a_whale() -> None:
    cfg = DataConfig(partition="powerlaw", powerlaw_exponent=2.0, min_examples=15)
    summary = federation_summary(build_federation(cfg, seed=0))
    sizes = [c["num_examples"] for c in summary["cooperatives"]]
    assert summary["max_size"] == max(sizes) > 4 * summary["median_size"]
    assert summary["largest_share"] > 0.4
    assert all(c["num_train"] >= 15 for c in summary["cooperatives"])


def test_summary_numbers() -> None:
    fed = build_federation(DataConfig(partition="iid"), seed=0)
    s = federation_summary(fed)
    assert s["total_examples"] == 1797
    assert s["federated_examples"] + s["global_test_examples"] == 1797
    assert s["num_train"] + s["num_local_test"] == s["federated_examples"]
    assert s["gini"] < 0.01 and abs(s["largest_share"] - 0.1) < 0.01
    skewed = federation_summary(build_federation(DataConfig(partition="dirichlet", alpha=0.1), seed=0))
    assert skewed["label_skew"] > s["label_skew"] + 0.2
    whales = federation_summary(build_federation(DataConfig(partition="powerlaw"), seed=0))
    assert whales["gini"] > 0.3


def test_breast_cancer_scaler_fitted_on_training_rows() -> None:
    fed = build_federation(DataConfig(dataset="breast_cancer", num_cooperatives=5), seed=0)
    assert fed.num_classes == 2 and fed.input_shape == (30,) and fed.num_features == 30
    pooled = np.concatenate([s.x for c in fed.cooperatives for s in (c.train, c.test)])
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-4)
    # The held-out rows are scaled with the training statistics, so not exactly centred.
    assert np.abs(fed.global_test.x.mean(axis=0)).max() > 1e-3


def test_synthetic_natural_one_cooperative_per_device() -> None:
    cfg = DataConfig(dataset="synthetic", partition="natural", num_cooperatives=15)
    fed = build_federation(cfg, seed=0)
    data = load_dataset(cfg, seed=0)
    assert fed.num_cooperatives == 15 and fed.input_shape == (60,)
    for coop in fed.cooperatives:
        assert coop.name == f"device-{coop.id}"
        assert set(data.groups[coop.train.index]) == {coop.id}
        assert set(data.groups[coop.test.index]) == {coop.id}
        assert len(coop.train) >= cfg.min_examples
    # The global test set takes its share from every device.
    held = np.bincount(data.groups[fed.global_test.index], minlength=15)
    assert np.all(np.abs(held - 0.2 * np.bincount(data.groups)) <= 1)


def test_natural_csv_keeps_cooperative_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    farms = ["oak", "birch", "elm"]
    lines = ["farm,rain,heat,label"]
    for i in range(90):
        farm = farms[i % 3]
        heat = farms.index(farm) + rng.normal()
        lines.append(f"{farm},{rng.normal():.4f},{heat:.4f},{'yes' if i % 2 else 'no'}")
    path = tmp_path / "farms.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(dataset="csv", path=str(path), partition="natural", cooperative_column="farm",
                     num_cooperatives=2)  # ignored: the file has three farms
    fed = build_federation(cfg, seed=0)
    assert [c.name for c in fed.cooperatives] == ["birch", "elm", "oak"]
    assert fed.num_classes == 2 and fed.input_shape == (2,)
    names = np.array([line.split(",")[0] for line in lines[1:]])
    for coop in fed.cooperatives:
        assert set(names[coop.train.index]) == {coop.name}
        assert coop.num_examples == 24  # 30 rows, 6 held out for the global test set
    assert set(names[fed.global_test.index]) == set(farms)


def test_csv_edit_is_not_served_from_cache(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(60)))
    cfg = DataConfig(dataset="csv", path=str(path), partition="iid", num_cooperatives=2, min_examples=2)
    first = build_federation(cfg, seed=0)
    path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(80)))
    assert federation_summary(build_federation(cfg, seed=0))["total_examples"] == 80
    assert federation_summary(first)["total_examples"] == 60


def test_too_many_cooperatives_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"data\.num_cooperatives"):
        build_federation(DataConfig(partition="iid", num_cooperatives=500), seed=0)
