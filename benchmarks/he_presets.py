"""The measured numbers in docs/he_presets.md: bytes per parameter, error and encryption cost of each preset.

    python benchmarks/he_presets.py > benchmarks/results/<machine>-<date>/he_presets.md   # ~1 minute on 2 cores

Bytes per parameter for fedgov's default model (8,970 parameters) and a
99,450-parameter MLP (784-120-40-10); max abs error against plaintext FedAvg for
10 cooperatives with unequal weights summing to 1, values ~ N(0, 0.1), worst of
3 trials; encryption time of a 10^6-parameter update, best of 5, in one process
and spread over this process plus one worker.
"""

from __future__ import annotations

import time

import numpy as np

from fedgov import crypto as he
from fedgov.bench.he_reference import max_abs_error, plaintext_fedavg
from fedgov.config import Config
from fedgov.models import build_model

MLP_SHAPES = [(784, 120), (120,), (120, 40), (40,), (40, 10), (10,)]


def default_model_arrays() -> list[np.ndarray]:
    cfg = Config()
    model = build_model(cfg.model.name, input_shape=(64,), num_classes=10, hidden=cfg.model.hidden)
    return [p.detach().numpy() for p in model.parameters()]


def max_error(preset: str, mode: str, trials: int = 3) -> float:
    keys = he.generate_keys(preset, mode=mode)
    enc = keys if mode == "clients" else keys.public_context()
    worst = 0.0
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        clients = [[rng.normal(0, 0.1, s) for s in MLP_SHAPES] for _ in range(10)]
        w = rng.random(10) + 0.1
        w /= w.sum()
        ups = [he.encrypt_update(c, context=enc, weight=wk, workers=1).to_bytes() for c, wk in zip(clients, w)]
        agg = he.aggregate(ups, context=keys.public_context())
        worst = max(worst, max_abs_error(he.decrypt_aggregate(agg, keys=keys), plaintext_fedavg(clients, w)))
    return worst


def encrypt_us_per_param(preset: str, mode: str, workers: int, params: int = 1_000_000) -> float:
    keys = he.generate_keys(preset, mode=mode)
    enc = keys if mode == "clients" else keys.public_context()
    x = [np.random.default_rng(0).normal(0, 0.01, params).astype(np.float32)]
    he.encrypt_update(x, context=enc, weight=0.1, workers=workers)  # start the workers, warm caches
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        he.encrypt_update(x, context=enc, weight=0.1, workers=workers).to_bytes()
        best = min(best, time.perf_counter() - t)
    return best / params * 1e6


ROWS = (("standard", "clients"), ("standard", "custodian"), ("compact", "clients"), ("compact", "custodian"),
        ("flare", "custodian"))


def main() -> None:
    from fedgov.bench.machine import describe_machine

    m = describe_machine()
    print(f"Measured by `python benchmarks/he_presets.py` on {time.strftime('%Y-%m-%d', time.gmtime())}: "
          f"{m.get('cpu_model')}, {m.get('cpu_cores_usable')} usable cores, TenSEAL "
          f"{m.get('libraries', {}).get('tenseal')}, fedgov {str(m.get('fedgov_commit'))[:10]}.\n")
    default = default_model_arrays()
    rng = np.random.default_rng(0)
    mlp = [rng.normal(0, 0.1, s) for s in MLP_SHAPES]
    print("| preset, who encrypts | B/param, default model | B/param, 99,450 params | max abs error |")
    print("|---|---|---|---|")
    for name, mode in ROWS:
        keys = he.generate_keys(name, mode=mode)
        enc = keys if mode == "clients" else keys.public_context()
        bpp = [he.bytes_per_param(he.encrypt_update(x, context=enc, weight=0.1, workers=1)) for x in (default, mlp)]
        print(f"| {name}, {mode} | {bpp[0]:.1f} | {bpp[1]:.1f} | {max_error(name, mode):.2g} |", flush=True)
    print()
    print("| preset, who encrypts | 1 process, µs/param | 2 processes, µs/param |")
    print("|---|---|---|")
    for name, mode in ROWS:
        one, two = (encrypt_us_per_param(name, mode, w) for w in (1, 2))
        print(f"| {name}, {mode} | {one:.2f} | {two:.2f} |", flush=True)
    he.shutdown_workers()


if __name__ == "__main__":
    main()
