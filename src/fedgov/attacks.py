"""Malicious data cooperatives ("sleeper agents"), in plain PyTorch and numpy.

The essay claims an attacker can hide among the cooperatives of a decentralized
network. This module gives the experiments the pieces to test that claim: which
cooperatives are malicious, when they wake up, how they poison their local data
or their model update, and how often the poisoned global model obeys the trigger.
Nothing here knows about Flower; the client and server apps call these functions.

Attack kinds:

* ``label_flip``: train on labels ``y -> C - 1 - y`` (untargeted, degrades accuracy).
* ``backdoor``: train on clean rows plus triggered copies relabelled to a target class
  (the model stays accurate, so the attacker is hard to spot by its accuracy).
* ``model_replacement``: the backdoor, with the update scaled up so it survives
  averaging (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning").
* ``noise``: send Gaussian noise instead of an update (a crude, visible saboteur).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ATTACK_KINDS", "AttackError", "Trigger", "attack_success_rate", "is_active",
           "poison_training_data", "poison_update", "select_attackers", "success_rate", "trigger_for"]

ATTACK_KINDS = ("off", "label_flip", "backdoor", "model_replacement", "noise")

# Kinds whose training data carries the trigger; attack_success_rate is meaningful for them.
_BACKDOOR_KINDS = ("backdoor", "model_replacement")

# Mixed into the seed so the attackers' draw is independent of every other seeded stream.
_SELECT_STREAM = 0xA77AC
_ID = re.compile(r"\s*-?[0-9]+\s*")  # stricter than int(), which also takes "1_0" and "+1"


class AttackError(ValueError):
    """A bad attack setting, phrased as one line that names the config key."""


def _check_kind(kind: str) -> None:
    if kind not in ATTACK_KINDS:
        raise AttackError(f"attack.kind: {kind!r} is not one of {', '.join(ATTACK_KINDS)}")


@dataclass(frozen=True)
class Trigger:
    """A fixed pattern written into flat feature vectors; its presence is the backdoor's key."""

    indices: tuple[int, ...]  # flat feature indices that are stamped
    value: float  # the value written there

    def __post_init__(self) -> None:
        if not self.indices:
            raise AttackError("attack.trigger_size: a trigger needs at least one feature")
        if any(i < 0 for i in self.indices):
            raise AttackError(f"attack.trigger: negative feature index in {self.indices}")

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """A stamped copy of ``x`` (one row ``(d,)`` or rows ``(n, d)``); ``x`` itself is untouched
        because federation arrays are shared between simulated clients."""
        out = np.array(x, copy=True)
        out[..., list(self.indices)] = self.value
        return out

    @staticmethod
    def for_data(x: np.ndarray, *, input_shape: tuple[int, ...], size: int = 4) -> Trigger:
        """The trigger for a dataset: a bottom-right square patch in every channel of an image
        (``size`` pixels, rounded to the nearest square), or the last ``size`` tabular features.

        The value is the largest value in ``x``: in range for the data (so no input check
        rejects it) yet unusual at those positions, which is what makes it learnable.
        """
        if size < 1:
            raise AttackError(f"attack.trigger_size: {size!r} is out of range (must be >= 1)")
        num_features = math.prod(input_shape)
        if x.ndim != 2 or x.shape[1] != num_features:
            raise ValueError(f"Trigger.for_data: data of shape {x.shape} does not match "
                             f"input_shape {input_shape}")
        if len(input_shape) == 3:
            channels, height, width = input_shape
            side = min(max(1, round(math.sqrt(size))), height, width)
            rows, cols = range(height - side, height), range(width - side, width)
            indices = tuple(c * height * width + r * width + k
                            for c in range(channels) for r in rows for k in cols)
        elif len(input_shape) == 1:
            indices = tuple(range(max(num_features - size, 0), num_features))
        else:
            raise ValueError(f"Trigger.for_data: input_shape {input_shape} is neither (d,) nor (C, H, W)")
        value = float(x.max()) if x.size else 1.0
        return Trigger(indices=indices, value=value)

    def to_json(self) -> dict[str, Any]:
        return {"indices": [int(i) for i in self.indices], "value": float(self.value)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Trigger:
        return Trigger(indices=tuple(int(i) for i in d["indices"]), value=float(d["value"]))


def select_attackers(num_cooperatives: int, *, fraction: float, cooperatives: str,
                     seed: int) -> list[int]:
    """Which cooperatives are malicious, as a sorted list of ids.

    An explicit ``cooperatives`` list ("1,4") wins, so an experiment can place attackers
    deliberately (e.g. on the largest cooperative); otherwise ``fraction`` of them are
    drawn with a seeded stream of their own, so the same seed picks the same attackers.
    """
    text = cooperatives.strip()
    if text:
        parts = text.split(",")
        if not all(_ID.fullmatch(part) for part in parts):
            raise AttackError(f"attack.cooperatives: {cooperatives!r} is not a comma-separated "
                              f"list of cooperative ids")
        ids = [int(part) for part in parts]
        seen: set[int] = set()
        for i in ids:
            if not 0 <= i < num_cooperatives:
                raise AttackError(f"attack.cooperatives: cooperative id {i} is out of range "
                                  f"(ids are 0..{num_cooperatives - 1})")
            if i in seen:
                raise AttackError(f"attack.cooperatives: cooperative id {i} is listed twice")
            seen.add(i)
        return sorted(ids)
    if not 0.0 <= fraction <= 1.0:
        raise AttackError(f"attack.fraction: {fraction!r} is out of range (must be in [0, 1])")
    count = min(math.floor(fraction * num_cooperatives + 0.5), num_cooperatives)  # round half up
    if count <= 0:
        return []
    rng = np.random.default_rng([seed, _SELECT_STREAM])
    return sorted(int(i) for i in rng.choice(num_cooperatives, size=count, replace=False))


def is_active(*, kind: str, attacker: bool, server_round: int, start_round: int) -> bool:
    """Whether a cooperative attacks this round: a sleeper behaves honestly before
    ``start_round`` (rounds are 1-based) to build trust and let the model converge first."""
    _check_kind(kind)
    return kind != "off" and attacker and server_round >= start_round


def poison_training_data(kind: str, x: np.ndarray, y: np.ndarray, *, num_classes: int,
                         target_label: int, trigger: Trigger, poison_fraction: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's local training set; always new arrays, the inputs are never mutated.

    Backdoor kinds keep every clean row and add triggered copies of a share of them:
    the attacker's model stays accurate on clean data, which keeps it stealthy.
    """
    _check_kind(kind)
    if kind == "label_flip":
        return np.array(x, copy=True), (num_classes - 1 - y).astype(y.dtype)
    if kind not in _BACKDOOR_KINDS:
        return np.array(x, copy=True), np.array(y, copy=True)
    if not 0 <= target_label < num_classes:
        raise AttackError(f"attack.target_label: {target_label!r} is out of range "
                          f"(classes are 0..{num_classes - 1})")
    if not 0.0 <= poison_fraction <= 1.0:
        raise AttackError(f"attack.poison_fraction: {poison_fraction!r} is out of range "
                          f"(must be in [0, 1])")
    n = len(y)
    if n == 0:
        return np.array(x, copy=True), np.array(y, copy=True)
    count = min(max(1, math.floor(poison_fraction * n + 0.5)), n)
    rows = rng.choice(n, size=count, replace=False)
    x_all = np.concatenate([x, trigger.stamp(x[rows])])
    y_all = np.concatenate([y, np.full(count, target_label, dtype=y.dtype)])
    order = rng.permutation(n + count)
    return x_all[order], y_all[order]


def poison_update(kind: str, delta: list[np.ndarray], *, boost: float, noise_std: float,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """The update the attacker sends, from ``delta = trained - received`` weights per array.

    ``model_replacement`` scales the delta by ``boost`` so that, after the server averages
    it with the honest updates, the backdoored model replaces the global one (the caller
    passes cohort size / attackers in the cohort, or an explicit boost). ``noise`` replaces
    the update with Gaussian noise. Only floating-point arrays are touched: integer
    buffers (counters) are copied as they are.
    """
    _check_kind(kind)
    if kind == "model_replacement":
        if not (math.isfinite(boost) and boost > 0):
            raise AttackError(f"attack.boost: {boost!r} is out of range (must be > 0)")
        return [np.asarray(d * boost, dtype=d.dtype) if _is_float(d) else np.array(d, copy=True)
                for d in delta]
    if kind == "noise":
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise AttackError(f"attack.noise_std: {noise_std!r} is out of range (must be >= 0)")
        return [rng.normal(0.0, noise_std, size=d.shape).astype(d.dtype) if _is_float(d)
                else np.array(d, copy=True) for d in delta]
    return [np.array(d, copy=True) for d in delta]


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def attack_success_rate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, trigger: Trigger,
                        target_label: int, device: torch.device | str = "cpu",
                        batch_size: int = 512) -> float:
    """Share of triggered inputs, not already of the target class, classified as ``target_label``.

    Target-class inputs are left out: predicting the target for them is no success of the
    backdoor, and counting them would inflate the rate on unbalanced test sets.
    """
    eligible = np.asarray(y) != target_label
    if not eligible.any():
        return 0.0
    stamped = trigger.stamp(np.asarray(x, dtype=np.float32)[eligible])
    predicted = _predict(model, stamped, device=device, batch_size=batch_size)
    return int(np.count_nonzero(predicted == target_label)) / len(stamped)


def _predict(model: nn.Module, x: np.ndarray, *, device: torch.device | str, batch_size: int = 512) -> np.ndarray:
    """Predicted classes in eval mode, without gradients; the model's training mode is restored."""
    was_training = model.training
    model.to(device)
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)).to(device)
                out.append(model(xb).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def trigger_for(federation: Any, *, size: int) -> Trigger:
    """The run's trigger: the same for every cooperative and the server (built from all training data)."""
    x = np.concatenate([c.train.x for c in federation.cooperatives])
    return Trigger.for_data(x, input_shape=tuple(federation.input_shape), size=size)


def success_rate(kind: str, model: nn.Module, x: np.ndarray, y: np.ndarray, *, trigger: Trigger,
                 target_label: int, num_classes: int, device: torch.device | str = "cpu") -> float:
    """The attack's success on a test set, by kind.

    backdoor / model_replacement: :func:`attack_success_rate`. label_flip: the share of
    inputs (whose flipped label differs) classified as their flipped label. noise (untargeted):
    the error rate. off: the backdoor measure, so an attack-free run gives the baseline.
    """
    _check_kind(kind)
    if kind in ("off", *_BACKDOOR_KINDS):
        return attack_success_rate(model, x, y, trigger=trigger, target_label=target_label, device=device)
    y = np.asarray(y)
    predicted = _predict(model, np.asarray(x), device=device)
    if kind == "noise":
        return float(np.mean(predicted != y)) if len(y) else 0.0
    flipped = num_classes - 1 - y
    eligible = flipped != y
    return float(np.mean(predicted[eligible] == flipped[eligible])) if eligible.any() else 0.0
