"""load_dataset: the built-in datasets, the Synthetic(alpha, beta) generator and CSV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedgov.config import DataConfig
from fedgov.data import DataError, load_dataset
from fedgov.data.datasets import synthetic_min_device_size


def test_digits_is_flat_scaled_and_has_an_image_shape() -> None:
    data = load_dataset(DataConfig(dataset="digits"), seed=0)
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert data.x.min() == 0.0 and data.x.max() == 1.0
    assert data.y.dtype == np.int64 and set(np.unique(data.y)) == set(range(10))
    assert data.num_classes == 10
    assert data.image_shape == (1, 8, 8)
    assert data.groups is None and not data.standardized


def test_breast_cancer_has_two_classes_and_standardized_features() -> None:
    data = load_dataset(DataConfig(dataset="breast_cancer"), seed=0)
    assert data.num_classes == 2 and set(np.unique(data.y)) == {0, 1}
    assert data.x.shape == (569, 30) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.x.std(axis=0), 1.0, atol=1e-3)
    assert data.image_shape is None and data.standardized


# ---- synthetic -------------------------------------------------------------------------

def synthetic(seed: int = 0, **kw: float) -> DataConfig:
    return DataConfig(dataset="synthetic", num_cooperatives=20, **kw)


def test_synthetic_shapes_groups_and_classes() -> None:
    cfg = synthetic(synthetic_features=30, synthetic_classes=5, synthetic_samples=3000)
    data = load_dataset(cfg, seed=0)
    n = len(data.y)
    assert data.x.shape == (n, 30) and data.x.dtype == np.float32
    assert abs(n - 3000) <= 20  # "about" synthetic_samples
    assert data.num_classes == 5 and set(np.unique(data.y)) == set(range(5))
    assert data.groups is not None and set(np.unique(data.groups)) == set(range(20))
    sizes = np.bincount(data.groups)
    assert sizes.min() >= synthetic_min_device_size(cfg)
    assert sizes.max() > 3 * np.median(sizes)  # lognormal sizes: a few large devices
    assert len(data.group_names) == 20


def test_synthetic_is_seeded() -> None:
    a, b, c = (load_dataset(synthetic(), seed=s) for s in (4, 4, 5))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.y[:100], c.y[:100])


def _per_device(data, fn) -> np.ndarray:
    return np.array([fn(data.x[data.groups == g], data.y[data.groups == g])
                     for g in range(data.groups.max() + 1)])


def _label_entropy(x: np.ndarray, y: np.ndarray) -> float:
    q = np.bincount(y, minlength=10) / len(y)
    return float(-(q[q > 0] * np.log(q[q > 0])).sum())


def test_synthetic_larger_alpha_beta_is_more_heterogeneous() -> None:
    seeds = range(4)

    def spread(alpha: float, beta: float) -> tuple[float, float]:
        feat, ent = [], []
        for s in seeds:
            data = load_dataset(synthetic(synthetic_alpha=alpha, synthetic_beta=beta), seed=s)
            means = _per_device(data, lambda x, y: x.mean(axis=0))
            feat.append(np.linalg.norm(means - means.mean(axis=0), axis=1).mean())
            ent.append(_per_device(data, _label_entropy).mean())
        return float(np.mean(feat)), float(np.mean(ent))

    feat_iid, ent_iid = spread(0.0, 0.0)
    feat_1, ent_1 = spread(1.0, 1.0)
    feat_2, ent_2 = spread(2.0, 2.0)
    # Devices' feature means drift apart as beta grows ...
    assert feat_iid < feat_1 < feat_2
    assert feat_2 > 1.5 * feat_iid
    # ... and each device's labels concentrate on fewer classes, so devices differ more.
    assert ent_2 < ent_1 < ent_iid
    assert ent_2 < 0.75 * ent_iid


def test_synthetic_alpha_moves_all_logits_together() -> None:
    # As in the FedProx code, u_k is one scalar added to every entry of W_k and b_k, so
    # it shifts every class's logit equally and leaves the labels as they were.
    a = load_dataset(synthetic(synthetic_alpha=0.0), seed=0)
    b = load_dataset(synthetic(synthetic_alpha=5.0), seed=0)
    assert np.array_equal(a.y, b.y)


# ---- CSV -------------------------------------------------------------------------------

def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def csv_config(path: Path, **kw: str) -> DataConfig:
    return DataConfig(dataset="csv", path=str(path), **kw)


def test_csv_labels_features_and_cooperatives(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "farms.csv", """
yield,rain,farm,label
1.0,10,north,high
2.0,20,south,low
3.0,30,north,mid
4.0,45,east,high
""")
    data = load_dataset(csv_config(path, cooperative_column="farm"), seed=0)
    assert data.class_names == ("high", "low", "mid")
    assert data.y.tolist() == [0, 1, 2, 0]
    assert data.feature_names == ("yield", "rain")
    assert data.x.shape == (4, 2) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x.mean(axis=0), 0.0, atol=1e-6)
    assert data.group_names == ("east", "north", "south")
    assert data.groups.tolist() == [1, 2, 1, 0]


def test_csv_numeric_labels_map_in_sorted_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,label\n1,7\n2,3\n3,7\n4,5")
    data = load_dataset(csv_config(path), seed=0)
    assert data.class_names == ("3", "5", "7") and data.y.tolist() == [2, 0, 2, 1]
    assert data.groups is None


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv"):
        load_dataset(csv_config(tmp_path / "nope.csv"), seed=0)


def test_csv_missing_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,b\n1,2\n3,4")
    with pytest.raises(DataError, match=r"d\.csv.*'target'.*data\.label_column"):
        load_dataset(csv_config(path, label_column="target"), seed=0)


def test_csv_missing_cooperative_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,label\n1,0\n3,1")
    with pytest.raises(DataError, match=r"d\.csv.*'site'.*data\.cooperative_column"):
        load_dataset(csv_config(path, cooperative_column="site"), seed=0)


def test_csv_non_numeric_feature(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,colour,label\n1,red,0\n2,blue,1")
    with pytest.raises(DataError, match=r"d\.csv.*'colour'.*not numeric") as info:
        load_dataset(csv_config(path), seed=0)
    assert "\n" not in str(info.value)


def test_csv_missing_feature_value(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,b,label\n1,,0\n2,5,1")
    with pytest.raises(DataError, match=r"d\.csv.*'b'.*missing"):
        load_dataset(csv_config(path), seed=0)


def test_csv_single_class(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,label\n1,x\n2,x")
    with pytest.raises(DataError, match="one distinct value"):
        load_dataset(csv_config(path), seed=0)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match=r"data\.dataset"):
        load_dataset(DataConfig(dataset="mnist"), seed=0)


def test_synthetic_iid_is_one_linear_rule_over_centred_features() -> None:
    data = load_dataset(synthetic(synthetic_iid=True, synthetic_samples=20000), seed=0)
    n, d = data.x.shape
    np.testing.assert_allclose(data.x.mean(axis=0), 0.0, atol=4 * 1 / np.sqrt(n))
    expected_sd = np.arange(1, d + 1) ** -0.6  # diag(j^-1.2), as in FedProx's generate_iid.py
    np.testing.assert_allclose(data.x.std(axis=0), expected_sd, rtol=0.05)
    # One W and b for every device: one linear classifier fits every device's labels.
    from sklearn.linear_model import LogisticRegression

    subset = slice(0, 5000)
    fit = LogisticRegression(C=1e4, max_iter=2000).fit(data.x[subset], data.y[subset])
    assert fit.score(data.x[subset], data.y[subset]) > 0.97
