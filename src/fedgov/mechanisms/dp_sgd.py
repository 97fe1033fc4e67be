"""``dp-sgd`` (``privacy.dp = "sample"``): example-level DP inside each cooperative, with Opacus.

Client half: :func:`train_privately`, the cooperative's local training under DP-SGD, with
its privacy ledger in ``context.state`` (a cooperative whose next round would overspend
declines it). Server half: on ``--resume`` a grid wrapper hands each cooperative the spends
recorded in the checkpoint (``fedgov.privacy.resume``), so the budget survives a crash.
Audit fields: where the noise comes from (the OS, or ``privacy.seeded_noise``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Mechanism, ServerSide, register

__all__ = ["DPSGD", "train_privately", "noise_source"]

_LEDGER_KEY = "fedgov.privacy"


def noise_source(cfg: Any) -> str | None:
    """Where DP-SGD's noise comes from: the OS's randomness, or (privacy.seeded_noise) the config."""
    from ..privacy import OS_NOISE, SEEDED_NOISE

    if cfg.privacy.dp != "sample":
        return None
    return SEEDED_NOISE if cfg.privacy.seeded_noise else OS_NOISE


def train_privately(model: Any, *, cfg: Any, context: Any, seed: int, x: np.ndarray, y: np.ndarray,
                    round_config: Mapping[str, Any], device: Any) -> tuple[Any, dict[str, float]]:
    """DP-SGD for one round, with a ledger that survives between rounds in ``context.state``.

    After ``--resume`` (a new Flower run: empty ``context.state``) the first train message
    carries the spends the aggregator recorded in its checkpoint (``fedgov.privacy.resume``).
    Trust assumption: the cooperative adopts that record as its past spending; it checks
    only that each spend is a valid mechanism. Its noise multiplier, delta and budget come
    from its own config, never from the message. Raises BudgetExhausted when spent.
    """
    from flwr.app import ConfigRecord

    from ..privacy.accounting import PrivacyLedger, RoundSpend, default_delta
    from ..privacy.dp_sgd import plan_round, train_private
    from ..privacy.resume import RECORDED_LEDGER_KEY, decode_spends

    n = len(y)
    if _LEDGER_KEY in context.state:
        ledger = PrivacyLedger.from_json(str(context.state[_LEDGER_KEY]["ledger"]))
    else:
        ledger = PrivacyLedger(delta=cfg.privacy.delta or default_delta(n),
                               budget=cfg.privacy.target_epsilon or math.inf)
        recorded = round_config.get(RECORDED_LEDGER_KEY)
        if recorded is not None:
            ledger.spends = [RoundSpend(*spend) for spend in decode_spends(str(recorded))]
        context.state[_LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
    # Noise and Poisson sampling from the OS's randomness unless privacy.seeded_noise (then from the seed).
    noise_seed = seed if cfg.privacy.seeded_noise else None
    spend = plan_round(ledger, num_examples=n, batch_size=cfg.train.batch_size, epochs=cfg.train.local_epochs,
                       rounds=cfg.train.rounds, noise_multiplier=cfg.privacy.noise_multiplier,
                       target_epsilon=cfg.privacy.target_epsilon)  # raises BudgetExhausted
    result = train_private(model, x, y, spend=spend, batch_size=cfg.train.batch_size,
                           epochs=cfg.train.local_epochs, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           max_grad_norm=cfg.privacy.max_grad_norm, grad_sample_mode=cfg.privacy.grad_sample_mode,
                           device=device, seed=noise_seed)
    ledger.record(result.spend)
    context.state[_LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
    return result.train, {
        "dp_epsilon": ledger.epsilon,
        "dp_delta": ledger.delta,
        "dp_noise_multiplier": result.spend.noise_multiplier,
        "dp_sample_rate": result.spend.sample_rate,
        "dp_steps": result.spend.steps,
    }


@register
class DPSGD(Mechanism):
    name = "dp-sgd"
    layer = 0

    @classmethod
    def applies(cls, cfg: Any) -> bool:
        return cfg.privacy.dp == "sample"

    def wrap_grid(self, grid: Any, side: ServerSide) -> Any:
        checkpoint = side.checkpoint
        if checkpoint is None or not checkpoint.ledgers:
            return grid
        from ..privacy.resume import LedgerHandover

        # Each cooperative continues the spends recorded with the checkpoint.
        return LedgerHandover(grid, {node: checkpoint.ledgers[coop] for node, coop in side.node_to_cooperative.items()
                                     if coop in checkpoint.ledgers})

    def audit_fields(self) -> dict[str, Any]:
        return {"dp": "sample", "dp_noise": noise_source(self.cfg)}
