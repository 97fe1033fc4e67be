"""data.synthetic_reference against the reference scripts themselves (litian96/FedProx).

``_reference_generate`` and ``_reference_split`` below are ``generate_synthetic`` (FedProx's
``data/synthetic_1_1/generate_synthetic.py`` merged with ``data/synthetic_iid/generate_iid.py``,
which draws in the same order) and the loop of its ``main``, copied with only the printing
removed and the user count, dimension and seeds made parameters. Seeding numpy's and Python's
global generators before calling them is all the reference needs to be repeatable.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedgov.config import Config, ConfigError, DataConfig, load_config
from fedgov.data import build_federation
from fedgov.data.federation import clear_cache


def _softmax(x):
    ex = np.exp(x)
    sum_ex = np.sum(np.exp(x))
    return ex / sum_ex


def _reference_generate(alpha, beta, iid, num_user, dimension=60, num_class=10):
    samples_per_user = np.random.lognormal(4, 2, (num_user)).astype(int) + 50
    X_split = [[] for _ in range(num_user)]
    y_split = [[] for _ in range(num_user)]
    if iid:  # generate_iid.py
        mean_x = np.zeros((num_user, dimension))
        diagonal = np.zeros(dimension)
        for j in range(dimension):
            diagonal[j] = np.power((j + 1), -1.2)
        cov_x = np.diag(diagonal)
        W = np.random.normal(0, 1, (dimension, num_class))
        b = np.random.normal(0, 1, num_class)
        for i in range(num_user):
            xx = np.random.multivariate_normal(mean_x[i], cov_x, samples_per_user[i])
            yy = np.zeros(samples_per_user[i])
            for j in range(samples_per_user[i]):
                tmp = np.dot(xx[j], W) + b
                yy[j] = np.argmax(_softmax(tmp))
            X_split[i] = xx.tolist()
            y_split[i] = yy.tolist()
        return X_split, y_split
    mean_W = np.random.normal(0, alpha, num_user)
    mean_b = mean_W
    B = np.random.normal(0, beta, num_user)
    mean_x = np.zeros((num_user, dimension))
    diagonal = np.zeros(dimension)
    for j in range(dimension):
        diagonal[j] = np.power((j + 1), -1.2)
    cov_x = np.diag(diagonal)
    for i in range(num_user):
        mean_x[i] = np.random.normal(B[i], 1, dimension)
    for i in range(num_user):
        W = np.random.normal(mean_W[i], 1, (dimension, num_class))
        b = np.random.normal(mean_b[i], 1, num_class)
        xx = np.random.multivariate_normal(mean_x[i], cov_x, samples_per_user[i])
        yy = np.zeros(samples_per_user[i])
        for j in range(samples_per_user[i]):
            tmp = np.dot(xx[j], W) + b
            yy[j] = np.argmax(_softmax(tmp))
        X_split[i] = xx.tolist()
        y_split[i] = yy.tolist()
    return X_split, y_split


def _reference_split(X, y, num_user):
    train, test = [], []
    for i in range(num_user):
        combined = list(zip(X[i], y[i]))
        random.shuffle(combined)
        X[i][:], y[i][:] = zip(*combined)
        num_samples = len(X[i])
        train_len = int(0.9 * num_samples)
        train.append((X[i][:train_len], y[i][:train_len]))
        test.append((X[i][train_len:], y[i][train_len:]))
    return train, test


def _reference(alpha, beta, iid, num_user, seed):
    np.random.seed(seed)
    random.seed(seed)
    X, y = _reference_generate(alpha, beta, iid, num_user)
    return _reference_split(X, y, num_user)


def _fedgov(alpha, beta, iid, num_user, seed):
    cfg = DataConfig(dataset="synthetic", partition="natural", synthetic_reference=True, synthetic_iid=iid,
                     synthetic_alpha=alpha, synthetic_beta=beta, num_cooperatives=num_user,
                     local_test_fraction=0.1, seed=seed)
    clear_cache()
    return build_federation(cfg, seed=99)  # the run's seed: data.seed replaces it


@pytest.mark.parametrize("alpha,beta,iid,seed", [(1.0, 1.0, False, 0), (0.5, 0.5, False, 7), (0.0, 0.0, False, 3),
                                                 (0.0, 0.0, True, 1)])
def test_reference_generator_gives_the_reference_scripts_numbers(alpha, beta, iid, seed) -> None:
    num_user = 6
    train, test = _reference(alpha, beta, iid, num_user, seed)
    fed = _fedgov(alpha, beta, iid, num_user, seed)
    assert fed.num_cooperatives == num_user and fed.seed == seed
    for coop, (x_tr, y_tr), (x_te, y_te) in zip(fed.cooperatives, train, test):
        assert len(coop.train) >= 45 and len(coop.train) == len(y_tr) and len(coop.test) == len(y_te)
        np.testing.assert_array_equal(coop.train.x, np.asarray(x_tr, dtype=np.float32))
        np.testing.assert_array_equal(coop.train.y, np.asarray(y_tr, dtype=np.int64))
        np.testing.assert_array_equal(coop.test.x, np.asarray(x_te, dtype=np.float32))
        np.testing.assert_array_equal(coop.test.y, np.asarray(y_te, dtype=np.int64))
    # The test set is the union of the devices' test splits, as the papers score it.
    assert len(fed.global_test) == sum(len(c.test) for c in fed.cooperatives)
    np.testing.assert_array_equal(np.sort(fed.global_test.index),
                                  np.sort(np.concatenate([c.test.index for c in fed.cooperatives])))


def test_reference_sizes_follow_the_size_law() -> None:
    # int(lognormal(4, 2)) + 50: at least 50 rows, a median near e^4 + 50 and a heavy tail.
    fed = _fedgov(1.0, 1.0, False, 200, 5)
    sizes = np.array([c.num_examples for c in fed.cooperatives])
    np.random.seed(5)
    expected = np.random.lognormal(4, 2, 200).astype(int) + 50
    np.testing.assert_array_equal(sizes, expected)
    assert sizes.min() >= 50 and 60 < np.median(sizes) < 160 and sizes.max() > 20 * np.median(sizes)


def test_data_seed_fixes_the_federation_across_run_seeds() -> None:
    cfg = Config().data
    cfg.seed = 4
    clear_cache()
    a, b = build_federation(cfg, seed=0), build_federation(cfg, seed=1)
    np.testing.assert_array_equal(a.cooperatives[0].train.index, b.cooperatives[0].train.index)
    cfg.seed = -1
    c, d = build_federation(cfg, seed=0), build_federation(cfg, seed=1)
    assert not np.array_equal(c.cooperatives[0].train.index, d.cooperatives[0].train.index)


def test_reference_generator_needs_natural_synthetic(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "synthetic"\npartition = "dirichlet"\nsynthetic_reference = true\n')
    with pytest.raises(ConfigError, match="data.synthetic_reference"):
        load_config(path)
