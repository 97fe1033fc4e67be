"""Encrypted inference: is CKKS fast enough for a real-time diagnostic?

Two small diagnostic models are trained in plain PyTorch on scikit-learn's
breast-cancer data (569 samples, 30 features, binary; a stratified 80/20 split
with a fixed seed; features standardized with the training split's statistics):
logistic regression and a 30-16-1 MLP with a square activation (the function
CKKS evaluates, so the plaintext and encrypted models are the same function).
The standardization is folded into the first layer, so both paths take raw
features.

Each model is then served two ways and timed:

* ``plain``: the float64 numpy model on one sample (what a server without
  encryption does per request; no network or serialization).
* ``he``: :mod:`fedgov.bench.he_inference`: the client encrypts and serializes
  the sample, the server (public keys only) evaluates and serializes the
  encrypted logit, the client decrypts. Latency is the sum, per sample; the
  stages are also reported. Throughput packs a whole batch (one ciphertext per
  feature, up to 4096 samples per ciphertext).

All HE work runs on one core (SEAL through TenSEAL's bindings, which hold the GIL).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .core import BenchContext, percentile, time_call

if TYPE_CHECKING:
    from .he_inference import (
        InferenceKeys,
        InferenceServer,
        LinearModel,
        SquareMLP,
    )

__all__ = [
    "DiagnosticData",
    "load_data",
    "run_encrypted_inference",
    "train_logreg",
    "train_models",
    "train_square_mlp",
]

MODELS = ("logreg", "mlp")


@dataclass(frozen=True)
class DiagnosticData:
    """Raw features; ``mean``/``std`` are the training split's (used for training only)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def load_data(seed: int = 0, test_fraction: float = 0.2) -> DiagnosticData:
    """Breast-cancer data (bundled with scikit-learn), stratified train/test split."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float64), y.astype(np.int64), test_size=test_fraction,
                                              stratify=y, random_state=seed)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    return DiagnosticData(x_tr, y_tr, x_te, y_te, mean, std)


def _fit(module: Any, weights: list[Any], x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, l2: float
         ) -> None:
    """Full-batch Adam on the logistic loss plus ``l2 * sum ||W||^2`` over ``weights``."""
    import torch

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 455 x 30: more threads only contend (50x slower measured on a busy 2-core box)
    try:
        for _ in range(epochs):
            opt.zero_grad()
            loss = loss_fn(module(xt).squeeze(-1), yt) + l2 * sum(w.pow(2).sum() for w in weights)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


def train_logreg(data: DiagnosticData, *, seed: int = 0, epochs: int = 300) -> LinearModel:
    """Logistic regression on standardized features, returned with the standardization folded in."""
    import torch

    from .he_inference import LinearModel

    torch.manual_seed(seed)
    lin = torch.nn.Linear(data.x_train.shape[1], 1, dtype=torch.float64)
    _fit(lin, [lin.weight], (data.x_train - data.mean) / data.std, data.y_train, epochs=epochs, lr=0.05, l2=1e-3)
    w = lin.weight.detach().numpy()[0]
    b = float(lin.bias.detach().numpy()[0])
    return LinearModel(w / data.std, b - float(np.dot(w, data.mean / data.std)))


def train_square_mlp(data: DiagnosticData, *, hidden: int = 16, seed: int = 0, epochs: int = 300) -> SquareMLP:
    """A d-hidden-1 MLP with activation x^2 on standardized features, standardization folded in."""
    import torch

    from .he_inference import SquareMLP

    class Square(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    torch.manual_seed(seed)
    d = data.x_train.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden, dtype=torch.float64), Square(),
                              torch.nn.Linear(hidden, 1, dtype=torch.float64))
    with torch.no_grad():  # small first layer: squares of standardized inputs stay moderate early on
        net[0].weight.mul_(0.5)
    # x^2 on 30 features is a full quadratic form: without a real L2 penalty it fits the
    # training split perfectly and loses ~4 points of test accuracy (and its logits reach ~100)
    _fit(net, [net[0].weight, net[2].weight], (data.x_train - data.mean) / data.std, data.y_train,
         epochs=epochs, lr=0.01, l2=3e-2)
    w1 = net[0].weight.detach().numpy().T  # (d, h)
    b1 = net[0].bias.detach().numpy()
    w2 = net[2].weight.detach().numpy()[0]
    b2 = float(net[2].bias.detach().numpy()[0])
    # (x - m)/s @ w1 + b1 = x @ (w1 / s[:, None]) + (b1 - (m/s) @ w1)
    return SquareMLP(w1 / data.std[:, None], b1 - (data.mean / data.std) @ w1, w2, b2)


def train_models(data: DiagnosticData, models: list[str], *, hidden: int = 16, seed: int = 0
                 ) -> dict[str, LinearModel | SquareMLP]:
    out: dict[str, LinearModel | SquareMLP] = {}
    for name in models:
        if name == "logreg":
            out[name] = train_logreg(data, seed=seed)
        elif name == "mlp":
            out[name] = train_square_mlp(data, hidden=hidden, seed=seed)
        else:
            raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")
    return out


def _ms(seconds: float) -> float:
    return 1000.0 * float(seconds)


def _latency_fields(samples_s: list[float] | tuple[float, ...]) -> dict[str, float]:
    """Percentiles of the timed requests, and how many there were (``latency_n``)."""
    return {"latency_n": len(samples_s), "latency_p50_ms": _ms(percentile(samples_s, 50)),
            "latency_p95_ms": _ms(percentile(samples_s, 95)), "latency_p99_ms": _ms(percentile(samples_s, 99)),
            "latency_mean_ms": _ms(statistics.fmean(samples_s))}


def _measure_plain(model: LinearModel | SquareMLP, x_test: np.ndarray, order: np.ndarray, x_batch: np.ndarray,
                   *, samples: int, warmup: int, batch_repeat: int) -> dict[str, Any]:
    n, counter = len(order), itertools.count()
    timing = time_call(lambda: model.logits(x_test[order[next(counter) % n]][None, :]), repeat=samples,
                       warmup=warmup)
    batch = time_call(lambda: model.logits(x_batch), repeat=max(batch_repeat, 5), warmup=1)
    d, b = model.n_features, len(x_batch)
    return {**_latency_fields(timing.samples), "encrypt_ms": None, "evaluate_ms": None, "decrypt_ms": None,
            "request_bytes": 8 * d, "response_bytes": 8,  # float64 features in, one float64 logit out
            "throughput_per_s": b / batch.median, "batch_seconds": batch.median, "batch_capacity": None,
            "batch_request_bytes": 8 * d * b, "batch_response_bytes": 8 * b}


def _measure_he(keys: InferenceKeys, server: InferenceServer, x_test: np.ndarray, order: np.ndarray,
                x_batch: np.ndarray, *, samples: int, warmup: int, batch_repeat: int
                ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Timings of single requests and of batches, and the logits they produced:
    (fields, single-request sample indices, their logits, the last batch's logits)."""
    n, counter = len(order), itertools.count()
    stages: list[tuple[float, float, float]] = []
    single: list[tuple[int, float]] = []
    sizes: list[tuple[int, int]] = []

    def request() -> None:  # one sample, end to end; bytes on the wire both ways
        i = int(order[next(counter) % n])
        t0 = time.perf_counter()
        req = keys.encrypt_sample(x_test[i], server.layout)
        t1 = time.perf_counter()
        resp = server.evaluate(req)
        t2 = time.perf_counter()
        logit = keys.decrypt_logits(resp)[0]
        t3 = time.perf_counter()
        stages.append((t1 - t0, t2 - t1, t3 - t2))
        single.append((i, float(logit)))
        sizes.append((len(req), len(resp)))

    timing = time_call(request, repeat=samples, warmup=warmup)
    stages, single = stages[warmup:], single[warmup:]
    last: dict[str, Any] = {}

    def batch() -> None:
        req = keys.encrypt_batch(x_batch)
        resp = server.evaluate(req)
        last.update(logits=keys.decrypt_logits(resp), req=len(req), resp=len(resp))

    batch_timing = time_call(batch, repeat=batch_repeat, warmup=0)
    enc, ev, dec = (statistics.median(s) for s in zip(*stages))
    fields = {**_latency_fields(timing.samples), "encrypt_ms": _ms(enc), "evaluate_ms": _ms(ev),
              "decrypt_ms": _ms(dec), "request_bytes": int(statistics.median(r for r, _ in sizes)),
              "response_bytes": int(statistics.median(r for _, r in sizes)),
              "throughput_per_s": len(x_batch) / batch_timing.median, "batch_seconds": batch_timing.median,
              "batch_capacity": server.preset.slots, "batch_request_bytes": last["req"],
              "batch_response_bytes": last["resp"]}
    return (fields, np.array([i for i, _ in single], dtype=np.int64), np.array([v for _, v in single]),
            last["logits"])


def run_encrypted_inference(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    """Plain vs CKKS inference of the diagnostic models: one row per (model, mode).

    ``spec``: ``samples`` (single-sample latencies per model, default 200),
    ``batch_size`` (default: the whole test split; larger batches cycle through
    it), ``models`` (default ["logreg", "mlp"]), ``preset`` (default
    "inference"), ``hidden`` (16), ``seed`` (0), ``warmup`` (2 untimed requests),
    ``batch_repeat`` (3 timed batches). The ``realtime`` suite asks for at least 1,000.

    ``agreement``: the fraction of HE predictions (the whole test split, batched,
    plus every timed single request) equal to the plaintext model's;
    ``max_abs_logit_error``: the largest |HE - plaintext| logit over the same and
    over the timed batches. Latencies: one sample end to end (HE: encrypt and
    serialize, evaluate, decrypt), percentiles p50, p95 and p99 over ``samples`` requests
    (``latency_n``: how many were timed).
    """
    from .he_inference import (
        InferenceKeys,
        InferenceServer,
        get_inference_preset,
    )

    samples = int(spec.get("samples", 200))
    models = list(spec.get("models", MODELS))
    seed = int(spec.get("seed", 0))
    warmup = int(spec.get("warmup", 2))
    batch_repeat = int(spec.get("batch_repeat", 3))
    preset = get_inference_preset(spec.get("preset", "inference"))
    if samples < 1 or batch_repeat < 1 or warmup < 0:
        raise ValueError("samples and batch_repeat must be >= 1, warmup >= 0")

    ctx.step("inference: loading the breast-cancer data and training the models")
    data = load_data(seed)
    trained = train_models(data, models, hidden=int(spec.get("hidden", 16)), seed=seed)
    x_test, y_test = data.x_test, data.y_test
    n_test = len(y_test)
    batch_size = int(spec.get("batch_size") or n_test)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x_batch = x_test[np.arange(batch_size) % n_test]
    order = np.random.default_rng(seed).permutation(n_test)  # the test samples single requests cycle through

    ctx.step(f"inference: generating CKKS keys ({preset.name})")
    t0 = time.perf_counter()
    keys = InferenceKeys.generate(preset)
    keygen_s = time.perf_counter() - t0
    server_bytes = keys.server_context_bytes()

    rows: list[dict[str, Any]] = []
    for name in models:
        model = trained[name]
        plain_test = model.logits(x_test)
        plain_pred = (plain_test > 0).astype(np.int64)
        base = {"part": "inference", "model": name, "n_features": model.n_features, "hidden": model.hidden,
                "n_train": len(data.y_train), "n_test": n_test, "batch_size": batch_size, "n_samples": samples}
        opts = {"samples": samples, "warmup": warmup, "batch_repeat": batch_repeat}

        ctx.step(f"inference: {name} plaintext, {samples} single requests and a batch of {batch_size}")
        rows.append({**base, "mode": "plain", "preset": None,
                     **_measure_plain(model, x_test, order, x_batch, **opts),
                     "test_accuracy": float(np.mean(plain_pred == y_test)), "agreement": 1.0,
                     "max_abs_logit_error": 0.0, "precision": None, "keygen_s": None, "context_bytes": None,
                     "server_setup_s": None})

        ctx.step(f"inference: {name} CKKS, {samples} single requests and a batch of {batch_size}")
        t0 = time.perf_counter()
        server = InferenceServer(server_bytes, model)  # as the model owner would: from the client's bytes
        setup_s = time.perf_counter() - t0
        fields, idx, single_logits, batch_logits = _measure_he(keys, server, x_test, order, x_batch, **opts)
        if batch_size >= n_test:  # the batch starts with the whole test split
            he_test = batch_logits[:n_test]
        else:
            ctx.step(f"inference: {name} CKKS, the whole test split for accuracy")
            he_test = keys.decrypt_logits(server.evaluate(keys.encrypt_batch(x_test)))
        he_pred = (he_test > 0).astype(np.int64)
        agree = np.concatenate([he_pred == plain_pred, (single_logits > 0) == (plain_test[idx] > 0)])
        err = max(float(np.max(np.abs(he_test - plain_test))),
                  float(np.max(np.abs(single_logits - plain_test[idx]))),
                  float(np.max(np.abs(batch_logits - model.logits(x_batch)))))
        rows.append({**base, "mode": "he", "preset": preset.name, **fields,
                     "test_accuracy": float(np.mean(he_pred == y_test)), "agreement": float(np.mean(agree)),
                     "max_abs_logit_error": err, "precision": preset.precision, "keygen_s": keygen_s,
                     "context_bytes": len(server_bytes), "server_setup_s": setup_s})
    return rows
