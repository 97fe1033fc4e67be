"""Split row indices into cooperatives with flwr-datasets' partitioners.

The partitioners work on a tiny in-memory ``datasets.Dataset`` holding only the row
index, the label and (for natural partitions) the group, so the features never have
to pass through Arrow. ``datasets``/``flwr_datasets`` are imported lazily: they take
seconds to import and ``import fedgov.data`` should stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedgov.data.datasets import DataError, largest_remainder
from fedgov.results import atomic_write_bytes

__all__ = ["CACHE_ENV", "SCHEMES", "partition_indices", "powerlaw_sizes", "shared_partitions"]

# A folder where one process's partitions wait for the others (workers not forked from it: Ray's, a forkserver's):
# each would otherwise import flwr-datasets (seconds) and redraw the same split.
CACHE_ENV = "FEDGOV_PARTITION_CACHE"


@dataclass(frozen=True, eq=False)
class _Request:
    labels: np.ndarray
    groups: np.ndarray | None
    num_partitions: int
    alpha: float
    powerlaw_exponent: float
    min_size: int
    seed: int


Scheme = Callable[[_Request], list[np.ndarray]]
SCHEMES: dict[str, Scheme] = {}


def _scheme(name: str) -> Callable[[Scheme], Scheme]:
    def register(fn: Scheme) -> Scheme:
        SCHEMES[name] = fn
        return fn
    return register


def _as_dataset(columns: dict[str, np.ndarray]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({name: np.asarray(col) for name, col in columns.items()})


def _read_partitions(partitioner: Any, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of every partition, sorted. ``order`` maps the partitioner's rows
    back to ours when we shuffled them first."""
    if isinstance(getattr(type(partitioner), "partition_id_to_indices", None), property):
        # Size-based partitioners publish their whole assignment once drawn: one read instead of
        # one Arrow selection per partition (seconds at thousands of cooperatives).
        partitioner.load_partition(0)
        row_column = np.asarray(partitioner.dataset["row"], dtype=np.int64)

        def rows_of(pid: int) -> np.ndarray:
            return row_column[np.asarray(partitioner.partition_id_to_indices[pid], dtype=np.int64)]
    else:
        def rows_of(pid: int) -> np.ndarray:
            return np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)
    return [np.sort(rows if order is None else order[rows])
            for rows in map(rows_of, range(partitioner.num_partitions))]


def _check_room(req: _Request) -> None:
    n = len(req.labels)
    if n < req.num_partitions * req.min_size:
        raise DataError(
            f"data.num_cooperatives: {req.num_partitions} cooperatives of at least {req.min_size} "
            f"examples need {req.num_partitions * req.min_size} rows, but only {n} are left to "
            f"share out; lower data.num_cooperatives or data.min_examples")


@_scheme("iid")
def _iid(req: _Request) -> list[np.ndarray]:
    """flwr-datasets' IidPartitioner after a seeded shuffle: contiguous shards, the first
    ``n % k`` one row longer (``Dataset.shard(contiguous=True)``). Cut here with numpy, which
    gives the same shards (tests check) without importing flwr-datasets or one Arrow
    selection per cooperative: seconds per process at ten thousand members."""
    _check_room(req)
    order = np.random.default_rng(req.seed).permutation(len(req.labels))
    return [np.sort(shard) for shard in np.array_split(order, req.num_partitions)]


@_scheme("dirichlet")
def _dirichlet(req: _Request) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    _check_room(req)
    partitioner = DirichletPartitioner(
        num_partitions=req.num_partitions, partition_by="label", alpha=req.alpha,
        min_partition_size=req.min_size, self_balancing=False, shuffle=True, seed=req.seed)
    partitioner.dataset = _as_dataset({"row": np.arange(len(req.labels)), "label": req.labels})
    try:
        with warnings.catch_warnings():
            # It warns on every failed redraw before giving up; our error says it once.
            warnings.simplefilter("ignore", UserWarning)
            return _read_partitions(partitioner)
    except ValueError as exc:  # flwr-datasets gives up after 10 redraws
        raise DataError(
            f"data.alpha: with alpha = {req.alpha} and data.num_cooperatives = {req.num_partitions}, "
            f"the Dirichlet split could not give every cooperative {req.min_size} examples "
            f"({exc}); raise data.alpha or lower data.num_cooperatives / data.min_examples") from None


def powerlaw_sizes(total: int, *, num_partitions: int, exponent: float, min_size: int) -> list[int]:
    """Sizes proportional to (rank + 1) ** -exponent on top of ``min_size`` each, summing
    to ``total``; rank 0 (the first cooperative) is the largest."""
    spare = total - num_partitions * min_size
    if spare < 0:
        raise DataError(f"data.num_cooperatives: {num_partitions} cooperatives of at least {min_size} "
                        f"examples need {num_partitions * min_size} rows, but only {total} are left")
    weights = np.arange(1, num_partitions + 1, dtype=np.float64) ** -exponent
    extra = largest_remainder(weights / weights.sum() * spare)
    # SizePartitioner insists on Python ints (numpy integers fail its isinstance check).
    return [int(s) + min_size for s in extra]


@_scheme("powerlaw")
def _powerlaw(req: _Request) -> list[np.ndarray]:
    from flwr_datasets.partitioner import SizePartitioner

    _check_room(req)
    sizes = powerlaw_sizes(len(req.labels), num_partitions=req.num_partitions,
                           exponent=req.powerlaw_exponent, min_size=req.min_size)
    # SizePartitioner takes contiguous ranges in dataset order, so shuffle the rows first.
    order = np.random.default_rng(req.seed).permutation(len(req.labels))
    partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = _as_dataset({"row": np.arange(len(order))})
    return _read_partitions(partitioner, order)


@contextlib.contextmanager
def _quiet_natural_id_progress() -> Iterator[None]:
    """NaturalIdPartitioner wraps its row loop in a tqdm bar that cannot be switched off;
    it would print once in every simulated client."""
    from flwr_datasets.partitioner import natural_id_partitioner as module

    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        module.tqdm = original


@_scheme("natural")
def _natural(req: _Request) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if req.groups is None:
        raise DataError("data.partition: 'natural' needs a dataset with cooperatives of its own "
                        "('csv' with data.cooperative_column, or 'synthetic')")
    # One partition per distinct group, in sorted order: with groups 0..G-1 all
    # present, partition i is group i.
    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = _as_dataset({"row": np.arange(len(req.groups)), "group": req.groups})
    with _quiet_natural_id_progress():
        return _read_partitions(partitioner)


def partition_indices(labels: np.ndarray, *, scheme: str, num_partitions: int, alpha: float,
                      powerlaw_exponent: float, min_size: int, groups: np.ndarray | None,
                      seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into disjoint, sorted index arrays covering every row.

    ``iid``: equal shares at random. ``dirichlet``: label skew, each class shared out
    by a Dirichlet(alpha) draw, every partition at least ``min_size``. ``powerlaw``: size
    skew, partition i holds a share proportional to (i + 1) ** -powerlaw_exponent (plus
    ``min_size``). ``natural``: one partition per distinct value of ``groups`` (sorted),
    ``num_partitions`` is ignored. The same seed always gives the same partitions.
    """
    try:
        fn = SCHEMES[scheme]
    except KeyError:
        raise DataError(f"data.partition: {scheme!r} is not one of {', '.join(SCHEMES)}") from None
    labels = np.asarray(labels)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise DataError(f"groups has shape {groups.shape}, labels {labels.shape}: one group per row")
    if scheme != "natural" and num_partitions < 1:
        raise DataError(f"data.num_cooperatives: {num_partitions} must be at least 1")
    req = _Request(labels=labels, groups=groups, num_partitions=num_partitions, alpha=alpha,
                   powerlaw_exponent=powerlaw_exponent, min_size=max(int(min_size), 1), seed=seed)
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return fn(req)
    path = Path(folder) / f"{_cache_key(scheme, req)}.npz"
    if (parts := _read_cached(path)) is not None:
        return parts
    parts = fn(req)
    _write_cached(path, parts)
    return parts


@contextlib.contextmanager
def shared_partitions() -> Iterator[Path]:
    """Processes started inside the block (and this one) share the partitions they draw.

    Uses ``$FEDGOV_PARTITION_CACHE`` if set, else a fresh temporary folder removed afterwards.
    """
    given = os.environ.get(CACHE_ENV)
    if given:
        yield Path(given)
        return
    folder = Path(tempfile.mkdtemp(prefix="fedgov-partitions-"))
    os.environ[CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(CACHE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def _cache_key(scheme: str, req: _Request) -> str:
    """Everything the partition depends on: the inputs, this module's code, flwr-datasets' version."""
    h = hashlib.sha256()
    h.update(repr((scheme, req.num_partitions, req.alpha, req.powerlaw_exponent, req.min_size, req.seed,
                   metadata.version("flwr-datasets"))).encode())
    for column in (req.labels, req.groups):
        if column is not None:
            h.update(str((column.dtype, column.shape)).encode())
            h.update(np.ascontiguousarray(column).tobytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _read_cached(path: Path) -> list[np.ndarray] | None:
    try:
        with np.load(path) as data:
            rows, ends = data["rows"], data["ends"]
    except (OSError, KeyError, ValueError):  # not there yet, or unreadable: draw it again
        return None
    return [rows[start:end] for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)]


def _write_cached(path: Path, parts: list[np.ndarray]) -> None:
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, rows=np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64), ends=ends)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the others a redraw
        atomic_write_bytes(path, buffer.getvalue())  # a reader sees the whole file or none
