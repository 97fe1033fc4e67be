"""Suite ``dp_training``: what DP-SGD costs in local training time.

For each MLP width and each mode (``none``: plain SGD; ``hooks``, ``functorch``,
``ghost``: Opacus DP-SGD with that per-sample gradient mode), seconds per epoch of
fedgov's own training loop (``fedgov.task.train``) on synthetic data (64 features,
10 classes, fixed seed), after one warm-up epoch, and the ratio to ``none`` on the
same device and width. The private model, optimizer, loss and Poisson loader are
made exactly as ``fedgov.privacy.dp_sgd.train_private`` makes them, once per case;
that setup is timed separately (``setup_seconds``) so the epochs time training alone.
Noise is fixed (the suite times DP-SGD, it spends no budget). On the CPU, PyTorch
uses ``cpu_threads`` threads (default 1, as fedgov's ClientApp sets for each cooperative).

On CUDA the same cases also run on the CPU (``also_cpu``) so the report can compare.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core import BenchContext, fmt, time_call

MODES = ("none", "hooks", "functorch", "ghost")
FEATURES, CLASSES = 64, 10
_DEFAULTS: dict[str, Any] = {"hidden": [64, 256, 1024, 2048], "modes": list(MODES), "examples": 2048,
                             "batch_size": 64, "epochs": 3, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                             "lr": 0.05, "momentum": 0.9, "seed": 0, "cpu_threads": 1}


def synthetic_data(examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random centres: learnable, and nothing to download."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, examples)
    x = centres[y] + rng.normal(0.0, 1.0, (examples, FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def _device_name(device: str, ctx: BenchContext) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    from ..machine import _cpu_model

    return str(ctx.machine.get("cpu_model") or _cpu_model())


def _epoch_fn(mode: str, hidden: int, x: np.ndarray, y: np.ndarray, spec: dict[str, Any],
              device: Any) -> tuple[Callable[[], Any], int]:
    """One epoch of what fedgov runs for this mode, and the model's parameter count.

    The DP set-up is fedgov's own (``make_private``, as ``train_private`` uses it),
    done once here so that it is not timed with every epoch.
    """
    import torch
    from torch import nn

    from ...models import build_model, count_parameters
    from ...task import make_loader, train

    seed, lr, momentum = int(spec["seed"]), float(spec["lr"]), float(spec["momentum"])
    model = build_model("mlp", input_shape=(FEATURES,), num_classes=CLASSES, hidden=hidden, seed=seed).to(device)
    params = count_parameters(model)
    if mode == "none":
        torch.manual_seed(seed)
        loader = make_loader(x, y, batch_size=int(spec["batch_size"]), shuffle=True, seed=seed)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        criterion: nn.Module = nn.CrossEntropyLoss()
    else:
        from ...privacy.dp_sgd import make_private

        private = make_private(model, x, y, batch_size=int(spec["batch_size"]), lr=lr, momentum=momentum,
                               noise_multiplier=float(spec["noise_multiplier"]),
                               max_grad_norm=float(spec["max_grad_norm"]), grad_sample_mode=mode,
                               device=device, seed=seed)
        model, optimizer, criterion, loader = private.model, private.optimizer, private.criterion, private.loader

    def epoch() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            train(model, loader, epochs=1, lr=lr, momentum=momentum, device=device, optimizer=optimizer,
                  criterion=criterion, skip_empty_batches=mode == "none")
        if device.type == "cuda":
            torch.cuda.synchronize()

    return epoch, params


def _params_of(hidden: int) -> int:
    return FEATURES * hidden + hidden + hidden * hidden + hidden + hidden * CLASSES + CLASSES


def _measure(device_str: str, hidden: int, mode: str, x: np.ndarray, y: np.ndarray, spec: dict[str, Any],
             ctx: BenchContext) -> dict[str, Any]:
    import time

    import torch

    device = torch.device(device_str)
    epochs, examples = int(spec["epochs"]), len(y)
    threads = int(spec["cpu_threads"]) if device.type == "cpu" else None
    row: dict[str, Any] = {"device": device_str, "device_name": _device_name(device_str, ctx), "model": "mlp",
                           "hidden": hidden, "params": _params_of(hidden), "mode": mode, "examples": examples,
                           "batch_size": int(spec["batch_size"]), "epochs": epochs, "cpu_threads": threads,
                           "noise_multiplier": None if mode == "none" else float(spec["noise_multiplier"]),
                           "max_grad_norm": None if mode == "none" else float(spec["max_grad_norm"]),
                           "seconds_per_epoch": None, "seconds_per_epoch_best": None, "examples_per_second": None,
                           "ratio_to_nondp": None, "setup_seconds": None, "peak_memory_mb": None, "error": None}
    previous_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        epoch, params = _epoch_fn(mode, hidden, x, y, spec, device)
        row["setup_seconds"] = time.perf_counter() - t0
        row["params"] = params
        timing = time_call(epoch, repeat=epochs, warmup=1)
        row.update(seconds_per_epoch=timing.median, seconds_per_epoch_best=timing.best,
                   examples_per_second=examples / timing.median)
        if device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # noqa: BLE001 - Opacus can refuse a model or run out of memory: record it, go on
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(previous_threads)
    return row


def run(spec: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    spec = {**_DEFAULTS, **spec}
    hiddens = [int(h) for h in spec["hidden"]]
    modes = [str(m) for m in spec["modes"]]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"dp_training: unknown modes {unknown}; choose from {', '.join(MODES)}")
    devices = [ctx.device]
    if ctx.device == "cuda" and bool(spec.get("also_cpu", True)):
        devices.append("cpu")
    x, y = synthetic_data(int(spec["examples"]), int(spec["seed"]))
    # Import up front so that the first case's setup_seconds is not import time
    # (the first optimizer made imports torch._dynamo: about a second).
    import torch

    from ...task import train  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    if any(m != "none" for m in modes):
        import opacus  # noqa: F401
    rows: list[dict[str, Any]] = []
    for device in devices:
        for hidden in hiddens:
            for mode in modes:
                ctx.step(f"{device}: MLP hidden {hidden} ({_params_of(hidden):,} parameters), {mode}")
                rows.append(_measure(device, hidden, mode, x, y, spec, ctx))
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["device"], r["hidden"]): r["seconds_per_epoch"] for r in rows if r["mode"] == "none"}
    for r in rows:
        b = base.get((r["device"], r["hidden"]))
        r["ratio_to_nondp"] = r["seconds_per_epoch"] / b if b and r["seconds_per_epoch"] else None


# ---- figures and report -------------------------------------------------------------------

def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and r.get("seconds_per_epoch")]


def figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from ...plots import _save, _style, plt  # fedgov.plots selects the Agg backend before pyplot loads

    ok = _ok(rows)
    if not ok:
        return []
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    devices = list(dict.fromkeys(r["device"] for r in ok))
    colors = plt.get_cmap("tab10").colors
    styles = ("-", "--", ":")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, mode in enumerate(modes):
        for j, device in enumerate(devices):
            mine = sorted((r for r in ok if r["mode"] == mode and r["device"] == device), key=lambda r: r["params"])
            if not mine:
                continue
            label = mode if len(devices) == 1 else f"{mode} ({device})"
            style = {"color": colors[i % len(colors)], "linestyle": styles[j % len(styles)], "marker": "o"}
            xs = [r["params"] for r in mine]
            left.plot(xs, [r["seconds_per_epoch"] for r in mine], label=label, **style)
            if mode != "none":
                right.plot(xs, [r["ratio_to_nondp"] for r in mine], label=label, **style)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_ylabel("seconds per epoch (median)")
    left.set_title("Local training time", fontsize="medium")
    right.set_xscale("log")
    right.set_yscale("log")  # the modes differ by an order of magnitude
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("DP-SGD time / non-private time")
    right.set_title("Slowdown of DP-SGD", fontsize="medium")
    for ax in (left, right):
        ax.set_xlabel("model parameters (MLP)")
        _style(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", frameon=False)
    first = ok[0]
    fig.suptitle(f"DP-SGD training cost: {first['examples']} examples, batch {first['batch_size']}",
                 fontweight="bold")
    fig.tight_layout()
    return [_save(fig, out / "dp_training.png", dpi=120)]


def report(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No DP training measurements.\n"
    first = rows[0]
    lines = [(f"Seconds per local training epoch (median of {first['epochs']} after a warm-up epoch), "
              f"{first['examples']} examples, batch size {first['batch_size']}, MLP of growing width; "
              f"ratio = this mode's time / non-private time on the same device and model"
              + (f"; PyTorch on the CPU used {first['cpu_threads']} thread(s)" if first.get("cpu_threads") else "")
              + ":"), "",
             "| device | params | mode | s/epoch | ratio | peak memory (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['device']} | {r['params']:,} | {r['mode']} | failed: {r['error'][:80]} | - | - |")
            continue
        lines.append(f"| {r['device']} | {r['params']:,} | {r['mode']} | {fmt(r['seconds_per_epoch'])} "
                     f"| {fmt(r['ratio_to_nondp'])} | {fmt(r.get('peak_memory_mb'))} |")
    lines.append("")
    ok = _ok(rows)
    for device in dict.fromkeys(r["device"] for r in rows):
        dp = [r for r in ok if r["device"] == device and r["mode"] != "none" and r.get("ratio_to_nondp")]
        if not dp:
            continue
        lo, hi = min(dp, key=lambda r: r["ratio_to_nondp"]), max(dp, key=lambda r: r["ratio_to_nondp"])
        name = dp[0]["device_name"]
        per_mode = []
        for mode in dict.fromkeys(r["mode"] for r in dp):
            ratios = [r["ratio_to_nondp"] for r in dp if r["mode"] == mode]
            per_mode.append(f"{mode} {min(ratios):.3g}-{max(ratios):.3g}x")
        biggest = max(r["params"] for r in dp)
        at_big = sorted((r for r in dp if r["params"] == biggest), key=lambda r: r["ratio_to_nondp"])
        lines.append(f"On {device} ({name}), DP-SGD took {lo['ratio_to_nondp']:.3g} to {hi['ratio_to_nondp']:.3g} "
                     f"times the non-private time per epoch (lowest: {lo['mode']} at {lo['params']:,} parameters; "
                     f"highest: {hi['mode']} at {hi['params']:,}); by mode: {', '.join(per_mode)}. "
                     f"At the largest model ({biggest:,} parameters) the cheapest mode was {at_big[0]['mode']} "
                     f"({at_big[0]['ratio_to_nondp']:.3g}x) and the dearest {at_big[-1]['mode']} "
                     f"({at_big[-1]['ratio_to_nondp']:.3g}x).")
        lines.append("")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append(f"{len(failed)} case(s) failed: "
                     + "; ".join(f"{r['device']} {r['mode']} {r['params']:,} params" for r in failed) + ".")
    return "\n".join(lines).rstrip() + "\n"
