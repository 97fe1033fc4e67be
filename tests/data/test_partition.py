"""partition_indices: every scheme is deterministic, disjoint and covering, and skews
the data the way its name says."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedgov.data import DataError, partition_indices
from fedgov.data.partition import SCHEMES, powerlaw_sizes

LABELS = np.repeat(np.arange(10), 150)  # 1500 rows, 10 balanced classes
GROUPS = np.random.default_rng(7).integers(0, 6, size=LABELS.size)


def split(scheme: str, *, seed: int = 0, labels: np.ndarray = LABELS, num_partitions: int = 10,
          alpha: float = 0.5, exponent: float = 1.5, min_size: int = 10,
          groups: np.ndarray | None = GROUPS) -> list[np.ndarray]:
    return partition_indices(labels, scheme=scheme, num_partitions=num_partitions, alpha=alpha,
                             powerlaw_exponent=exponent, min_size=min_size, groups=groups, seed=seed)


def label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean entropy (nats) of the partitions' label mixes: low = label-skewed."""
    out = []
    for p in parts:
        q = np.bincount(labels[p], minlength=10) / len(p)
        out.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    return float(np.mean(out))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_disjoint_sorted_and_covering(scheme: str) -> None:
    parts = split(scheme)
    assert all(len(p) > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == LABELS.size
    assert np.array_equal(np.sort(joined), np.arange(LABELS.size))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_same_seed_same_partitions(scheme: str) -> None:
    a, b = split(scheme, seed=3), split(scheme, seed=3)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "powerlaw"])
def test_different_seed_different_partitions(scheme: str) -> None:
    a, b = split(scheme, seed=0), split(scheme, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_sizes_are_equal_and_mixes_match() -> None:
    parts = split("iid")
    assert {len(p) for p in parts} == {150}
    # Shuffled before sharding: every partition sees (nearly) all classes.
    assert label_entropy(LABELS, parts) > 0.9 * np.log(10)


def test_dirichlet_small_alpha_is_more_label_skewed() -> None:
    skewed = split("dirichlet", alpha=0.1, min_size=5)
    mild = split("dirichlet", alpha=100.0, min_size=5)
    assert label_entropy(LABELS, skewed) < label_entropy(LABELS, mild) - 0.5
    assert label_entropy(LABELS, mild) > 0.95 * np.log(10)


def test_dirichlet_respects_min_size() -> None:
    parts = split("dirichlet", alpha=0.3, min_size=40)
    assert min(len(p) for p in parts) >= 40


def test_dirichlet_impossible_min_size_names_the_keys() -> None:
    with pytest.raises(DataError, match=r"data\.alpha.*data\.num_cooperatives"):
        split("dirichlet", alpha=0.01, num_partitions=40, min_size=30)


def test_too_many_partitions_names_num_cooperatives() -> None:
    with pytest.raises(DataError, match=r"data\.num_cooperatives"):
        split("iid", num_partitions=200, min_size=10)


def test_powerlaw_has_whales_and_respects_min_size() -> None:
    parts = split("powerlaw", exponent=1.5, min_size=20)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20
    assert sizes.sum() == LABELS.size
    assert sizes[0] == sizes.max()  # rank 0 is the largest
    assert sizes.max() >= 4 * np.median(sizes)
    # A steeper exponent concentrates more data in the largest cooperative.
    steeper = max(len(p) for p in split("powerlaw", exponent=3.0, min_size=20))
    assert steeper > sizes.max()


def test_powerlaw_rows_are_shuffled_not_contiguous() -> None:
    biggest = split("powerlaw")[0]
    # Contiguous rows would hold only a few classes; a shuffle gives all of them.
    assert len(np.unique(LABELS[biggest])) == 10


def test_powerlaw_sizes_sum_exactly() -> None:
    sizes = powerlaw_sizes(1001, num_partitions=7, exponent=2.0, min_size=3)
    assert sum(sizes) == 1001
    assert min(sizes) >= 3
    assert sizes == sorted(sizes, reverse=True)
    assert all(type(s) is int for s in sizes)


def test_natural_one_partition_per_group() -> None:
    parts = split("natural", num_partitions=999)  # ignored for natural partitions
    assert len(parts) == 6
    for g, p in enumerate(parts):
        assert np.array_equal(p, np.flatnonzero(GROUPS == g))


def test_natural_without_groups_is_an_error() -> None:
    with pytest.raises(DataError, match="natural"):
        split("natural", groups=None)


def test_unknown_scheme_lists_the_choices() -> None:
    with pytest.raises(DataError, match=r"data\.partition.*dirichlet"):
        split("shards")


@pytest.mark.parametrize("rows,parts", [(103, 7), (40, 40), (1000, 333)])
def test_iid_cuts_the_shards_flwr_datasets_would(rows: int, parts: int) -> None:
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    got = partition_indices(np.zeros(rows, dtype=np.int64), scheme="iid", num_partitions=parts, alpha=1.0,
                            powerlaw_exponent=1.0, min_size=1, groups=None, seed=5)
    order = np.random.default_rng(5).permutation(rows)
    reference = IidPartitioner(num_partitions=parts)
    reference.dataset = Dataset.from_dict({"row": np.arange(rows)})
    expected = [np.sort(order[np.asarray(reference.load_partition(p)["row"])]) for p in range(parts)]
    assert len(got) == parts
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_powerlaw_reads_the_assignment_flwr_datasets_loads_partition_by_partition() -> None:
    from datasets import Dataset
    from flwr_datasets.partitioner import SizePartitioner

    from fedgov.data.partition import powerlaw_sizes

    rows, parts = 500, 25
    got = partition_indices(np.zeros(rows, dtype=np.int64), scheme="powerlaw", num_partitions=parts, alpha=1.0,
                            powerlaw_exponent=1.2, min_size=3, groups=None, seed=9)
    order = np.random.default_rng(9).permutation(rows)
    reference = SizePartitioner(partition_sizes=powerlaw_sizes(rows, num_partitions=parts, exponent=1.2, min_size=3))
    reference.dataset = Dataset.from_dict({"row": np.arange(rows)})
    for pid, mine in enumerate(got):
        np.testing.assert_array_equal(mine, np.sort(order[np.asarray(reference.load_partition(pid)["row"])]))


def test_partitions_drawn_once_are_read_back_by_the_processes_that_share_the_folder(monkeypatch):
    from fedgov.data import partition as module

    monkeypatch.delenv(module.CACHE_ENV, raising=False)
    with module.shared_partitions() as folder:
        assert os.environ[module.CACHE_ENV] == str(folder)
        drawn = split("dirichlet", seed=3)
        assert len(list(folder.glob("*.npz"))) == 1 and not list(folder.glob("*.tmp"))

        def must_not_draw(req):
            raise AssertionError("drew again instead of reading the shared partition")

        monkeypatch.setitem(module.SCHEMES, "dirichlet", must_not_draw)
        again = split("dirichlet", seed=3)  # what a Ray worker does: read, not redraw
        assert len(again) == len(drawn) and all(np.array_equal(a, b) for a, b in zip(again, drawn, strict=True))
        with pytest.raises(AssertionError, match="drew again"):
            split("dirichlet", seed=4)  # other inputs, another key
        with pytest.raises(AssertionError, match="drew again"):
            split("dirichlet", seed=3, labels=LABELS[::-1].copy())
        next(folder.glob("*.npz")).write_bytes(b"not an npz")  # damaged: drawn again, never trusted
        with pytest.raises(AssertionError, match="drew again"):
            split("dirichlet", seed=3)
    assert not folder.exists() and module.CACHE_ENV not in os.environ


def test_a_partition_folder_the_user_names_is_used_and_kept(monkeypatch, tmp_path):
    from fedgov.data import partition as module

    monkeypatch.setenv(module.CACHE_ENV, str(tmp_path))
    with module.shared_partitions() as folder:
        assert folder == tmp_path
        split("powerlaw")
    assert len(list(tmp_path.glob("*.npz"))) == 1 and os.environ[module.CACHE_ENV] == str(tmp_path)
