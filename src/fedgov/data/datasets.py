"""The datasets a fedgov federation can be built from, loaded as plain numpy arrays.

Every loader returns a :class:`LoadedData`: float32 features, int64 labels 0..C-1 and,
where the data has cooperatives of its own (synthetic devices, a CSV cooperative
column), an int64 group id per row. Nothing here downloads anything: digits and
breast_cancer ship with scikit-learn, synthetic data is generated, CSVs are local.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgov.config import DataConfig

__all__ = ["DATASETS", "DataError", "LoadedData", "largest_remainder", "load_dataset", "standardize",
           "synthetic_min_device_size"]


class DataError(ValueError):
    """A data problem, phrased as one line that names the file, column or config key."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays do not compare to a bool
class LoadedData:
    name: str
    x: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) int64 in 0..num_classes-1
    num_classes: int
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    # Shape one row takes for a CNN, e.g. (1, 8, 8); None for tabular data.
    image_shape: tuple[int, ...] | None = None
    # Cooperative id per row (int64 0..G-1) where the data has natural cooperatives.
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None
    # True when x was standardized; build_federation then refits the scaler on the
    # training rows only (see federation.py).
    standardized: bool = False

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])


def standardize(x: np.ndarray, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit variance per column, with statistics from ``rows`` (default: all).

    Constant columns are only centred, not divided by zero.
    """
    ref = x if rows is None else x[rows]
    mean = ref.mean(axis=0, dtype=np.float64)
    std = ref.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((x - mean) / std).astype(np.float32)


def largest_remainder(quotas: np.ndarray) -> np.ndarray:
    """Whole numbers summing to round(sum(quotas)), each within 1 of its quota."""
    base = np.floor(quotas).astype(np.int64)
    short = int(round(float(quotas.sum()))) - int(base.sum())
    if short > 0:
        # Stable sort: ties go to the earlier entry, so the result is deterministic.
        order = np.argsort(-(quotas - base), kind="stable")
        base[order[:short]] += 1
    return base


# ---- scikit-learn datasets -------------------------------------------------------

def _load_digits(cfg: DataConfig, *, seed: int) -> LoadedData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel intensities are 0..16: a fixed scale keeps images comparable, so no fitting.
    x = (bunch.data / 16.0).astype(np.float32)
    return LoadedData(
        name="digits",
        x=x,
        y=bunch.target.astype(np.int64),
        num_classes=10,
        feature_names=tuple(bunch.feature_names),
        class_names=tuple(str(c) for c in bunch.target_names),
        image_shape=(1, 8, 8),
    )


def _load_breast_cancer(cfg: DataConfig, *, seed: int) -> LoadedData:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    # Global statistics here; build_federation refits them on the training rows only.
    return LoadedData(
        name="breast_cancer",
        x=standardize(bunch.data),
        y=bunch.target.astype(np.int64),
        num_classes=2,
        feature_names=tuple(bunch.feature_names),
        class_names=tuple(str(c) for c in bunch.target_names),
        standardized=True,
    )


# ---- Synthetic(alpha, beta) ---------------------------------------------------------

def synthetic_min_device_size(cfg: DataConfig) -> int:
    """Fewest rows a synthetic device gets, so that after the global and local test
    hold-outs it still trains on at least ``cfg.min_examples`` rows."""
    keep = (1.0 - cfg.test_fraction) * (1.0 - cfg.local_test_fraction)
    # +2 absorbs the rounding of the two hold-outs (each takes round(fraction * n)).
    return math.ceil(cfg.min_examples / keep) + 2


def _device_sizes(cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Lognormal device sizes (as in FedProx), rescaled so they sum to about
    ``synthetic_samples`` with every device at least the minimum size."""
    k = cfg.num_cooperatives
    floor = synthetic_min_device_size(cfg)
    # FedProx draws lognormal(4, 2) + 50; we keep the heavy-tailed shape but rescale it.
    weights = rng.lognormal(mean=4.0, sigma=2.0, size=k)
    spare = max(cfg.synthetic_samples - floor * k, 0)
    return floor + largest_remainder(weights / weights.sum() * spare)


def _load_synthetic(cfg: DataConfig, *, seed: int) -> LoadedData:
    """Synthetic(alpha, beta) of Li et al. 2020 (FedProx), appendix, following its code.

    Device k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) of shape (C, d), b_k ~ N(u_k, 1);
    B_k ~ N(0, beta), v_k ~ N(B_k, 1); x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k).
    alpha and beta are standard deviations, as in the reference code. Note that u_k
    shifts every logit of a row by the same amount, so alpha leaves the labels (and so
    the data) unchanged; the heterogeneity across devices comes from beta and from W_k.

    With ``synthetic_iid`` (FedProx's ``data/synthetic_iid/generate_iid.py``): one W ~ N(0, 1)
    and b ~ N(0, 1) for every device and x ~ N(0, diag(j^-1.2)): a single linear rule.
    """
    if cfg.synthetic_reference:
        return _synthetic_reference(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    k, d, c = cfg.num_cooperatives, cfg.synthetic_features, cfg.synthetic_classes
    sizes = _device_sizes(cfg, rng)
    if cfg.synthetic_iid:
        return _synthetic_iid(cfg, sizes, rng)
    # Draw everything per device in one fixed order so a seed gives one dataset.
    u = rng.normal(0.0, 1.0, size=k) * cfg.synthetic_alpha
    big_b = rng.normal(0.0, 1.0, size=k) * cfg.synthetic_beta
    sd = np.arange(1, d + 1, dtype=np.float64) ** (-1.2 / 2)  # sqrt of diag(Sigma)
    xs, ys = [], []
    for dev in range(k):
        w = u[dev] + rng.standard_normal((c, d))
        b = u[dev] + rng.standard_normal(c)
        v = big_b[dev] + rng.standard_normal(d)
        x = v + rng.standard_normal((int(sizes[dev]), d)) * sd
        xs.append(x)
        ys.append(np.argmax(x @ w.T + b, axis=1))  # argmax of softmax = argmax of logits
    groups = np.repeat(np.arange(k, dtype=np.int64), sizes)
    return LoadedData(
        name="synthetic",
        x=np.concatenate(xs).astype(np.float32),
        y=np.concatenate(ys).astype(np.int64),
        num_classes=c,
        feature_names=tuple(f"x{j}" for j in range(d)),
        class_names=tuple(str(j) for j in range(c)),
        groups=groups,
        group_names=tuple(f"device-{dev}" for dev in range(k)),
    )


def _synthetic_iid(cfg: DataConfig, sizes: np.ndarray, rng: np.random.Generator) -> LoadedData:
    k, d, c = cfg.num_cooperatives, cfg.synthetic_features, cfg.synthetic_classes
    w = rng.standard_normal((d, c))
    b = rng.standard_normal(c)
    sd = np.arange(1, d + 1, dtype=np.float64) ** (-1.2 / 2)
    x = rng.standard_normal((int(sizes.sum()), d)) * sd
    return LoadedData(
        name="synthetic", x=x.astype(np.float32), y=np.argmax(x @ w + b, axis=1).astype(np.int64), num_classes=c,
        feature_names=tuple(f"x{j}" for j in range(d)), class_names=tuple(str(j) for j in range(c)),
        groups=np.repeat(np.arange(k, dtype=np.int64), sizes),
        group_names=tuple(f"device-{dev}" for dev in range(k)))


def _synthetic_reference(cfg: DataConfig, *, seed: int) -> LoadedData:
    """Synthetic(alpha, beta) and Synthetic-IID exactly as litian96/FedProx's scripts draw them.

    ``data/synthetic_*/generate_synthetic.py`` and ``data/synthetic_iid/generate_iid.py`` (also
    fair_flearn's ``data/synthetic``), with ``np.random.seed(seed)`` before the call: the same
    legacy-generator calls in the same order, so the same seed gives the same numbers. Device i
    holds int(lognormal(4, 2)) + 50 rows. Non-IID: mean_W ~ N(0, alpha) per device and
    mean_b = mean_W, B ~ N(0, beta), mean_x[i] ~ N(B[i], 1) per feature, then per device
    W ~ N(mean_W[i], 1) of shape (d, C), b ~ N(mean_W[i], 1), x ~ N(mean_x[i], diag(j^-1.2)).
    IID: one W ~ N(0, 1), b ~ N(0, 1) and x ~ N(0, diag(j^-1.2)). y = argmax(x W + b).
    """
    rs = np.random.RandomState(seed)
    k, d, c = cfg.num_cooperatives, cfg.synthetic_features, cfg.synthetic_classes
    sizes = rs.lognormal(4, 2, k).astype(int) + 50
    cov = np.diag(np.power(np.arange(1, d + 1, dtype=np.float64), -1.2))
    xs, ys = [], []
    if cfg.synthetic_iid:
        w, b = rs.normal(0, 1, (d, c)), rs.normal(0, 1, c)
        for i in range(k):
            x = rs.multivariate_normal(np.zeros(d), cov, sizes[i])
            xs.append(x)
            ys.append(np.argmax(x @ w + b, axis=1))
    else:
        mean_w = rs.normal(0, cfg.synthetic_alpha, k)
        big_b = rs.normal(0, cfg.synthetic_beta, k)
        mean_x = np.stack([rs.normal(big_b[i], 1, d) for i in range(k)])
        for i in range(k):
            w = rs.normal(mean_w[i], 1, (d, c))
            b = rs.normal(mean_w[i], 1, c)
            x = rs.multivariate_normal(mean_x[i], cov, sizes[i])
            xs.append(x)
            ys.append(np.argmax(x @ w + b, axis=1))  # the reference's argmax(softmax(.)), row by row
    return LoadedData(
        name="synthetic", x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys).astype(np.int64),
        num_classes=c, feature_names=tuple(f"x{j}" for j in range(d)), class_names=tuple(str(j) for j in range(c)),
        groups=np.repeat(np.arange(k, dtype=np.int64), sizes),
        group_names=tuple(f"f_{i:05d}" for i in range(k)))


# ---- CSV ------------------------------------------------------------------------------

def _sorted_distinct(values: Any) -> list[Any]:
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct)
    except TypeError:  # mixed types (e.g. 1 and "a" in an object column)
        return sorted(distinct, key=str)


def _codes(values: Any, distinct: list[Any]) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(distinct)}
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


def _load_csv(cfg: DataConfig, *, seed: int) -> LoadedData:
    import pandas as pd

    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable CSV file ({reason})") from None
    if len(frame) == 0:
        raise DataError(f"{path}: the file has a header but no rows")

    label_col, coop_col = cfg.label_column, cfg.cooperative_column
    for key, col in (("data.label_column", label_col), ("data.cooperative_column", coop_col)):
        if col and col not in frame.columns:
            raise DataError(f"{path}: no column {col!r} ({key}); "
                            f"columns are {', '.join(map(str, frame.columns))}")

    for col in filter(None, (label_col, coop_col)):
        missing = frame[col].isna()
        if missing.any():
            raise DataError(f"{path}: column {col!r} has {int(missing.sum())} missing values "
                            f"(first at data row {int(missing.to_numpy().argmax()) + 1})")

    label_values = frame[label_col].tolist()
    classes = _sorted_distinct(label_values)
    if len(classes) < 2:
        raise DataError(f"{path}: column {label_col!r} (data.label_column) has only one distinct value")

    feature_cols = [col for col in frame.columns if col not in (label_col, coop_col)]
    if not feature_cols:
        raise DataError(f"{path}: no feature columns besides {label_col!r}")
    for col in feature_cols:
        series = frame[col]
        if not pd.api.types.is_numeric_dtype(series):
            bad = pd.to_numeric(series, errors="coerce").isna() & series.notna()
            example = series[bad].iloc[0] if bad.any() else series.iloc[0]
            raise DataError(f"{path}: column {col!r} is not numeric (e.g. {example!r}); "
                            f"every column except the label and cooperative columns must be a number")
        missing = series.isna()
        if missing.any():
            raise DataError(f"{path}: column {col!r} has {int(missing.sum())} missing values "
                            f"(first at data row {int(missing.to_numpy().argmax()) + 1})")

    groups = group_names = None
    if coop_col:
        coop_values = frame[coop_col].tolist()
        coops = _sorted_distinct(coop_values)
        groups = _codes(coop_values, coops)
        group_names = tuple(str(g) for g in coops)

    # Global statistics here; build_federation refits them on the training rows only.
    x = standardize(frame[feature_cols].to_numpy(dtype=np.float64))
    return LoadedData(
        name=path.stem,
        x=x,
        y=_codes(label_values, classes),
        num_classes=len(classes),
        feature_names=tuple(str(c) for c in feature_cols),
        class_names=tuple(str(c) for c in classes),
        groups=groups,
        group_names=group_names,
        standardized=True,
    )


DATASETS: dict[str, Callable[..., LoadedData]] = {
    "digits": _load_digits,
    "breast_cancer": _load_breast_cancer,
    "synthetic": _load_synthetic,
    "csv": _load_csv,
}


def load_dataset(cfg: DataConfig, *, seed: int) -> LoadedData:
    """Load ``cfg.dataset`` as numpy arrays; ``seed`` only matters for synthetic data."""
    try:
        loader = DATASETS[cfg.dataset]
    except KeyError:
        raise DataError(f"data.dataset: {cfg.dataset!r} is not one of {', '.join(DATASETS)}") from None
    return loader(cfg, seed=seed)
