"""From a DataConfig to a federation: a global test set and the cooperatives' data.

Steps: load the dataset; hold out a stratified global test set; partition the rest
into cooperatives; split each cooperative into local train and test. Each step has its
own seeded random stream, so one seed gives one federation. Results are cached per
process, so every simulated client that calls :func:`build_federation` with the same
config shares one build (treat the arrays as read-only for that reason).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgov.config import DataConfig
from fedgov.data.datasets import DataError, LoadedData, largest_remainder, load_dataset, standardize
from fedgov.data.partition import partition_indices

__all__ = ["Split", "Cooperative", "Federation", "build_federation", "clear_cache", "data_seed",
           "federation_summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Split:
    x: np.ndarray  # (n, d) float32, flat even for images: reshape with Federation.input_shape
    y: np.ndarray  # (n,) int64
    index: np.ndarray  # (n,) row numbers in the loaded dataset, for tracing rows

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class Cooperative:
    id: int
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def num_examples(self) -> int:
        return len(self.train) + len(self.test)

    def label_counts(self) -> list[int]:
        y = np.concatenate([self.train.y, self.test.y])
        return np.bincount(y, minlength=self.num_classes).astype(int).tolist()

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "num_examples": self.num_examples,
            "num_train": len(self.train),
            "num_test": len(self.test),
            "label_counts": self.label_counts(),
        }


@dataclass(frozen=True, eq=False)
class Federation:
    dataset: str
    partition: str
    seed: int
    num_classes: int
    input_shape: tuple[int, ...]  # (d,) for tabular data, (1, 8, 8) for digits
    num_features: int
    class_names: tuple[str, ...]
    global_test: Split
    cooperatives: list[Cooperative]
    # The actor behind each cooperative (simulation ground truth): its own id, except for sybils.
    actors: tuple[int, ...] = ()

    @property
    def num_cooperatives(self) -> int:
        return len(self.cooperatives)

    def actor_of(self, cooperative: int) -> int:
        return self.actors[cooperative] if self.actors else cooperative

    @property
    def has_sybils(self) -> bool:
        return any(a != c for c, a in enumerate(self.actors))


# ---- splitting helpers --------------------------------------------------------------

def _test_count(n: int, fraction: float, *, min_test: int = 0, max_test: int | None = None) -> int:
    k = math.floor(fraction * n + 0.5)  # round half up, unlike Python's round()
    k = max(k, min_test)
    if max_test is not None:
        k = min(k, max_test)
    return max(0, min(k, n))


def _local_bounds(n: int) -> tuple[int, int]:
    # At least one local test example once there are two, and never the last training one.
    return (1, n - 1) if n >= 2 else (0, 0)


def _stratified_split(labels: np.ndarray, *, fraction: float, rng: np.random.Generator,
                      min_test: int = 0, max_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, test), sorted, with each class's share of the test set as
    close to its share of ``labels`` as whole numbers allow."""
    n = len(labels)
    k = _test_count(n, fraction, min_test=min_test, max_test=max_test)
    classes, counts = np.unique(labels, return_counts=True)
    alloc = largest_remainder(counts * (k / n)) if n else counts
    test = [rng.permutation(np.flatnonzero(labels == c))[:a] for c, a in zip(classes, alloc)]
    test_pos = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test_pos] = False
    return np.flatnonzero(mask), test_pos


def _min_partition_size(min_train: int, local_test_fraction: float) -> int:
    """Fewest rows a cooperative needs so its local train split keeps ``min_train``."""
    size = max(min_train, 1)
    while True:
        lo, hi = _local_bounds(size)
        if size - _test_count(size, local_test_fraction, min_test=lo, max_test=hi) >= min_train:
            return size
        size += 1


def _global_holdout(data: LoadedData, cfg: DataConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows (pool, global test). Natural partitions hold out the fraction from every group
    (never its last row), so every cooperative keeps data."""
    if cfg.partition != "natural" or data.groups is None:
        return _stratified_split(data.y, fraction=cfg.test_fraction, rng=rng)
    pools, tests = [], []
    for g in np.unique(data.groups):
        rows = np.flatnonzero(data.groups == g)
        keep, held = _stratified_split(data.y[rows], fraction=cfg.test_fraction, rng=rng,
                                       max_test=len(rows) - 1)
        pools.append(rows[keep])
        tests.append(rows[held])
    return np.sort(np.concatenate(pools)), np.sort(np.concatenate(tests))


def _split(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> Split:
    return Split(x=x[rows], y=y[rows], index=rows)


# ---- building -------------------------------------------------------------------------

def _reference_split(data: LoadedData, cfg: DataConfig,
                     seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The reference scripts' split: each device's rows shuffled by Python's ``random`` (seeded
    with the data seed, device by device), the first int((1 - local_test_fraction) n) to train.
    Returns the global test rows (the union of the devices' test rows) and each device's
    (train, test) rows."""
    shuffler = random.Random(seed)
    keep = 1.0 - cfg.local_test_fraction
    parts, tests = [], []
    for g in range(len(data.group_names or ())):
        rows = np.flatnonzero(data.groups == g)
        order = list(range(len(rows)))
        shuffler.shuffle(order)
        rows = rows[order]
        train_len = int(keep * len(rows))
        parts.append((rows[:train_len], rows[train_len:]))
        tests.append(rows[train_len:])
    return np.sort(np.concatenate(tests)), parts


def _build(cfg: DataConfig, seed: int) -> Federation:
    data = load_dataset(cfg, seed=seed)
    if cfg.synthetic_reference:
        global_test, splits = _reference_split(data, cfg, seed)
        cooperatives = [Cooperative(id=cid, name=data.group_names[cid], train=_split(data.x, data.y, train),
                                    test=_split(data.x, data.y, test), num_classes=data.num_classes)
                        for cid, (train, test) in enumerate(splits)]
        return _federation(cooperatives, data, data.x, global_test, cfg, seed)
    streams = np.random.SeedSequence(seed).spawn(2)
    pool, global_test = _global_holdout(data, cfg, np.random.default_rng(streams[0]))

    x = data.x
    if data.standardized:
        # Refit the scaler on the federation's rows only, so the global test set's
        # feature statistics do not leak into training.
        x = standardize(x, rows=pool)

    groups = data.groups[pool] if data.groups is not None else None
    parts = partition_indices(
        data.y[pool], scheme=cfg.partition, num_partitions=cfg.num_cooperatives, alpha=cfg.alpha,
        powerlaw_exponent=cfg.powerlaw_exponent,
        min_size=_min_partition_size(cfg.min_examples, cfg.local_test_fraction),
        groups=groups, seed=seed)

    local_seeds = streams[1].spawn(len(parts))
    cooperatives = []
    for cid, part in enumerate(parts):
        rows = pool[part]
        lo, hi = _local_bounds(len(rows))
        keep, held = _stratified_split(data.y[rows], fraction=cfg.local_test_fraction,
                                       rng=np.random.default_rng(local_seeds[cid]),
                                       min_test=lo, max_test=hi)
        name = f"coop-{cid}"
        if cfg.partition == "natural" and data.group_names is not None:
            name = data.group_names[int(data.groups[rows[0]])]
        cooperatives.append(Cooperative(id=cid, name=name, train=_split(x, data.y, rows[keep]),
                                        test=_split(x, data.y, rows[held]),
                                        num_classes=data.num_classes))

    if cfg.partition == "natural":
        small = [c.name for c in cooperatives if len(c.train) < cfg.min_examples]
        if small:
            log.warning("%d natural cooperatives train on fewer than data.min_examples = %d "
                        "examples (e.g. %s)", len(small), cfg.min_examples, small[0])

    return _federation(cooperatives, data, x, global_test, cfg, seed)


def _federation(cooperatives: list[Cooperative], data: LoadedData, x: np.ndarray, global_test: np.ndarray,
                cfg: DataConfig, seed: int) -> Federation:
    actors = tuple(range(len(cooperatives)))
    if cfg.sybil_identities > 0 and cfg.sybil_mode != "none":
        cooperatives, actors = _add_sybils(cooperatives, cfg, x, data.y, np.random.default_rng([seed, 0x5B11]))
    return Federation(
        dataset=data.name, partition=cfg.partition, seed=seed, num_classes=data.num_classes,
        input_shape=data.image_shape or (data.num_features,), num_features=data.num_features,
        class_names=data.class_names, global_test=_split(x, data.y, global_test),
        cooperatives=cooperatives, actors=actors)


def _add_sybils(cooperatives: list[Cooperative], cfg: DataConfig, x: np.ndarray, y: np.ndarray,
                rng: np.random.Generator) -> tuple[list[Cooperative], tuple[int, ...]]:
    """One actor registers ``sybil_identities`` more identities, appended after the cooperatives.

    ``split`` deals the actor's train and test rows (a seeded shuffle) across itself and its
    identities; ``copies`` gives each identity the actor's rows. The identities are named like
    any cooperative: nothing but the ground truth (``actors``) says who is behind them.
    """
    k = cfg.sybil_identities
    if cfg.sybil_actor >= len(cooperatives):
        raise DataError(f"data.sybil_actor: {cfg.sybil_actor} is not a cooperative "
                        f"(ids are 0..{len(cooperatives) - 1})")
    actor = cfg.sybil_actor if cfg.sybil_actor >= 0 else max(
        range(len(cooperatives)), key=lambda c: (len(cooperatives[c].train), -c))
    owner = cooperatives[actor]
    if cfg.sybil_mode == "split":
        if len(owner.train) < (k + 1) * cfg.min_examples or len(owner.test) < k + 1:
            raise DataError(f"data.sybil_identities: cooperative {actor} ({len(owner.train)} train and "
                            f"{len(owner.test)} local test examples) cannot be split into {k + 1} identities of at "
                            f"least data.min_examples = {cfg.min_examples} training examples and 1 test example")
        train_parts = np.array_split(rng.permutation(owner.train.index), k + 1)
        test_parts = np.array_split(rng.permutation(owner.test.index), k + 1)
    else:
        train_parts = [owner.train.index] * (k + 1)
        test_parts = [owner.test.index] * (k + 1)
    out = list(cooperatives)

    def identity(cid: int, name: str, part: int) -> Cooperative:
        return Cooperative(id=cid, name=name, train=_split(x, y, np.sort(train_parts[part])),
                           test=_split(x, y, np.sort(test_parts[part])), num_classes=owner.num_classes)

    out[actor] = identity(actor, owner.name, 0)
    first = len(cooperatives)
    out += [identity(first + j, f"coop-{first + j}", j + 1) for j in range(k)]
    return out, tuple(range(first)) + (actor,) * k


def _file_stamp(cfg: DataConfig) -> tuple[int, int] | None:
    # A CSV edited between two builds must not be served from the cache.
    if cfg.dataset != "csv":
        return None
    try:
        st = Path(cfg.path).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _build_cached(fields: tuple[Any, ...], stamp: tuple[int, int] | None, seed: int) -> Federation:
    return _build(DataConfig(*fields), seed)


def build_federation(cfg: DataConfig, *, seed: int) -> Federation:
    """The federation ``cfg`` describes, built once per (config, seed) in each process.

    ``seed`` is the run's; ``cfg.seed`` (the data seed), when set, replaces it here.
    """
    return _build_cached(dataclasses.astuple(cfg), _file_stamp(cfg), data_seed(cfg, seed))


def data_seed(cfg: DataConfig, run_seed: int) -> int:
    """The seed the federation is built from: ``data.seed``, or the run's when it is -1."""
    return cfg.seed if cfg.seed >= 0 else run_seed


def clear_cache() -> None:
    """Forget cached federations (tests, or a long-lived process that reloads data)."""
    _build_cached.cache_clear()


# ---- summaries --------------------------------------------------------------------------

def _gini(sizes: np.ndarray) -> float:
    """0 when every cooperative is the same size, towards 1 when one holds everything."""
    if len(sizes) == 0 or sizes.sum() == 0:
        return 0.0
    diffs = np.abs(sizes[:, None] - sizes[None, :]).sum()
    return float(diffs / (2 * len(sizes) ** 2 * sizes.mean()))


def federation_summary(fed: Federation) -> dict[str, Any]:
    """Overall numbers for a 'cooperatives' table, plus each cooperative's stats."""
    stats = [c.stats() for c in fed.cooperatives]
    sizes = np.array([s["num_examples"] for s in stats], dtype=np.float64)
    counts = np.array([s["label_counts"] for s in stats], dtype=np.float64)
    counts = counts.reshape(len(stats), fed.num_classes)
    overall = counts.sum(axis=0) / max(counts.sum(), 1.0)
    local = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    federated = int(sizes.sum())
    return {
        "dataset": fed.dataset,
        "partition": fed.partition,
        "seed": fed.seed,
        "num_cooperatives": fed.num_cooperatives,
        "num_classes": fed.num_classes,
        "num_features": fed.num_features,
        "total_examples": federated + len(fed.global_test),
        "federated_examples": federated,
        "num_train": int(sum(s["num_train"] for s in stats)),
        "num_local_test": int(sum(s["num_test"] for s in stats)),
        "global_test_examples": len(fed.global_test),
        "min_size": int(sizes.min()) if len(sizes) else 0,
        "median_size": float(np.median(sizes)) if len(sizes) else 0.0,
        "max_size": int(sizes.max()) if len(sizes) else 0,
        "largest_share": float(sizes.max() / federated) if federated else 0.0,
        "gini": _gini(sizes),
        # Mean total-variation distance between a cooperative's label mix and the
        # federation's: 0 for identical mixes, 1 for disjoint ones.
        "label_skew": float(0.5 * np.abs(local - overall).sum(axis=1).mean()) if len(stats) else 0.0,
        "cooperatives": stats,
    }
