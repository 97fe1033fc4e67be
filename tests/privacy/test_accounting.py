"""Privacy accounting: fedgov's numbers against Opacus's accountant, computed independently."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedgov.config import Config
from fedgov.data import build_federation
from fedgov.models import build_model
from fedgov.privacy.accounting import PrivacyLedger, RoundSpend, default_delta, epsilon_of
from fedgov.privacy.dp_sgd import BudgetExhausted
from fedgov.privacy.dp_sgd import plan_round, train_private


def _opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    for z, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_epsilon_matches_opacus_step_by_step():
    spends = [RoundSpend(1.1, 0.1, 20), RoundSpend(1.1, 0.1, 20), RoundSpend(0.9, 0.05, 7)]
    ours = epsilon_of(spends, delta=1e-5)
    theirs = _opacus_epsilon([(1.1, 0.1, 20), (1.1, 0.1, 20), (0.9, 0.05, 7)], 1e-5)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_default_delta_is_below_one_over_n():
    assert default_delta(134) < 1 / 134


def test_ledger_round_trips_and_keeps_spending_across_rounds():
    ledger = PrivacyLedger(delta=1e-4, budget=math.inf)
    for _ in range(3):
        ledger.record(RoundSpend(1.2, 0.1, 18))
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    assert again.epsilon == pytest.approx(_opacus_epsilon([(1.2, 0.1, 54)], 1e-4), rel=1e-9)


def test_target_epsilon_is_for_the_whole_run_and_a_spent_budget_stops():
    ledger = PrivacyLedger(delta=1e-4, budget=3.0)
    rounds = 0
    with pytest.raises(BudgetExhausted, match="privacy budget spent"):
        while True:
            spend = plan_round(ledger, num_examples=134, batch_size=16, epochs=2, rounds=20,
                               noise_multiplier=0.0, target_epsilon=3.0)
            ledger.record(spend)
            rounds += 1
            assert rounds <= 20
    assert rounds == 20  # the noise was sized for exactly the configured run
    assert 2.9 < ledger.epsilon <= 3.0


def test_fixed_noise_with_a_budget_stops_early():
    ledger = PrivacyLedger(delta=1e-4, budget=2.0)
    taken = 0
    for _ in range(20):
        try:
            ledger.record(plan_round(ledger, num_examples=134, batch_size=16, epochs=2, rounds=20,
                                     noise_multiplier=1.5, target_epsilon=2.0))
            taken += 1
        except BudgetExhausted:
            break
    assert 0 < taken < 20 and ledger.epsilon <= 2.0


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_each_grad_sample_mode_runs_the_planned_mechanism(mode):
    fed = build_federation(Config().data, seed=0)
    coop = fed.cooperatives[2]
    ledger = PrivacyLedger(delta=default_delta(len(coop.train.y)), budget=math.inf)
    spend = plan_round(ledger, num_examples=len(coop.train.y), batch_size=16, epochs=1, rounds=5,
                       noise_multiplier=1.0, target_epsilon=0.0)
    model = build_model("mlp", input_shape=fed.input_shape, num_classes=10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_private(model, coop.train.x, coop.train.y, spend=spend, batch_size=16, epochs=1, lr=0.05,
                           momentum=0.0, max_grad_norm=1.0, grad_sample_mode=mode, device=torch.device("cpu"),
                           seed=0)
    assert result.spend == spend  # what was accounted is what Opacus ran
    assert result.train.steps == spend.steps
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert np.isfinite(result.train.train_loss)
