"""Sample-level DP-SGD in one cooperative with Opacus.

The privacy engine is made fresh each round (the model arrives fresh each round),
but the spending is carried across rounds by a ``PrivacyLedger``, so the epsilon
a cooperative reports covers the whole run, not one round.

The noise and the Poisson sampling are drawn from generators seeded by the operating
system's randomness (``secrets``), fresh in every cooperative and round, so nothing in
the config, run directory or audit log determines them. Opacus's own ``secure_mode``
would need ``torchcsprng``, which has no build for the installed torch; torch's
generators are not cryptographic, but their 63-bit seeds never leave the process and
their outputs are released only as noised sums. Opacus's defence against floating-point
attacks on the Gaussian sampler (part of ``secure_mode``) is not applied. With
``privacy.seeded_noise`` (``seed`` given) both come from the run's seed, reproducibly:
then anyone holding the config can regenerate the noise, and the guarantee holds only
against parties that do not hold it.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..task import TrainResult, make_loader, train
from .accounting import PrivacyLedger, RoundSpend, noise_for_target

__all__ = ["BudgetExhausted", "PrivateTrainResult", "PrivateTraining", "plan_round", "make_private", "train_private",
           "GRAD_SAMPLE_MODES"]

# fedgov's names -> Opacus's grad_sample_mode
GRAD_SAMPLE_MODES = {"hooks": "hooks", "functorch": "functorch", "ghost": "ghost"}


class BudgetExhausted(RuntimeError):
    """This round would take the cooperative past its epsilon budget; it sits the round out."""


@dataclass(frozen=True)
class PrivateTrainResult:
    train: TrainResult
    spend: RoundSpend


def plan_round(ledger: PrivacyLedger, *, num_examples: int, batch_size: int, epochs: int,
               rounds: int, noise_multiplier: float, target_epsilon: float) -> RoundSpend:
    """The round's mechanism; raises BudgetExhausted if it would overspend the ledger's budget.

    With only a target epsilon, the noise is chosen so that taking part in every one of
    ``rounds`` rounds spends exactly (at most) the target.
    """
    # Opacus's Poisson loader draws ceil(n / B) batches an epoch, each row with probability 1/that.
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps = epochs * batches
    if noise_multiplier <= 0:
        if ledger.noise_multiplier <= 0:  # the search is slow: derive once, keep in the ledger
            ledger.noise_multiplier = noise_for_target(target_epsilon=target_epsilon, delta=ledger.delta,
                                                       sample_rate=sample_rate, steps=rounds * steps)
        noise_multiplier = ledger.noise_multiplier
    spend = RoundSpend(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    after = ledger.epsilon_after(spend)
    if after > ledger.budget * (1 + 1e-9):
        raise BudgetExhausted(f"privacy budget spent: epsilon {ledger.epsilon:.3f} so far, "
                              f"{after:.3f} after this round > budget {ledger.budget:g}")
    return spend


@dataclass
class PrivateTraining:
    """A model, optimizer, loss and loader wrapped by Opacus for DP-SGD, and the engine that accounts."""

    engine: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: Any


def _os_seed() -> int:
    return secrets.randbits(63)


def make_private(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int, lr: float, momentum: float,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str, device: torch.device,
                 seed: int | None) -> PrivateTraining:
    """Attach Opacus (RDP accountant, Poisson sampling, noise) the way fedgov trains privately.

    ``seed`` None (the default, ``privacy.seeded_noise = false``): sampling and noise from the
    operating system's randomness. An int: both reproducible from it.
    """
    from opacus import PrivacyEngine

    if seed is None:
        sampling_seed, noise_seed = _os_seed(), _os_seed()
        # Anything that falls back on torch's global generator (whose seed is fixed in a fresh process).
        torch.manual_seed(_os_seed())
    else:
        sampling_seed, noise_seed = seed, seed + 1
        torch.manual_seed(seed)  # Poisson sampling and noise: reproducible for a given seed
    model.to(device)
    # Opacus's Poisson sampler draws from this loader's generator.
    loader = make_loader(x, y, batch_size=batch_size, shuffle=True, seed=sampling_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and the optimizer's state
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                                   noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   grad_sample_mode=GRAD_SAMPLE_MODES[grad_sample_mode], poisson_sampling=True,
                                   noise_generator=torch.Generator(device=device).manual_seed(noise_seed))
    # Ghost clipping also wraps the loss, so Opacus returns four things instead of three.
    if len(made) == 4:
        private_model, private_optimizer, criterion, private_loader = made
    else:
        private_model, private_optimizer, private_loader = made
    return PrivateTraining(engine, private_model, private_optimizer, criterion, private_loader)


def train_private(model: nn.Module, x: np.ndarray, y: np.ndarray, *, spend: RoundSpend, batch_size: int,
                  epochs: int, lr: float, momentum: float, max_grad_norm: float, grad_sample_mode: str,
                  device: torch.device, seed: int | None = None) -> PrivateTrainResult:
    """DP-SGD for one round; returns the mechanism actually run (steps counted by Opacus).

    ``seed`` None: noise and sampling from the operating system (see ``make_private``).
    """
    private = make_private(model, x, y, batch_size=batch_size, lr=lr, momentum=momentum,
                           noise_multiplier=spend.noise_multiplier, max_grad_norm=max_grad_norm,
                           grad_sample_mode=grad_sample_mode, device=device, seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")  # raised by Opacus's own hooks
        result = train(private.model, private.loader, epochs=epochs, lr=lr, momentum=momentum, device=device,
                       optimizer=private.optimizer, criterion=private.criterion, skip_empty_batches=False)
    history = private.engine.accountant.history
    (noise, sample_rate, _), *_ = history
    actual = RoundSpend(noise_multiplier=float(noise), sample_rate=float(sample_rate),
                        steps=int(sum(s for _, _, s in history)))
    return PrivateTrainResult(train=result, spend=actual)
