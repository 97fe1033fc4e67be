"""Malicious cooperatives (fedgov.attacks), in plain numpy and PyTorch, without Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedgov.attacks import (
    ATTACK_KINDS,
    AttackError,
    Trigger,
    attack_success_rate,
    is_active,
    poison_training_data,
    poison_update,
    select_attackers,
)

# ---- Trigger ------------------------------------------------------------------------


def test_digits_trigger_is_the_bottom_right_2x2_patch():
    x = np.random.default_rng(0).uniform(0, 1, size=(5, 64)).astype(np.float32)
    x[2, 10] = 1.0
    trigger = Trigger.for_data(x, input_shape=(1, 8, 8), size=4)
    assert trigger.indices == (54, 55, 62, 63)  # rows 6-7, columns 6-7 of an 8x8 image
    assert trigger.value == 1.0  # the brightest pixel in the data


@pytest.mark.parametrize(("size", "expected"), [
    (1, (63,)),
    (5, (54, 55, 62, 63)),  # sqrt(5) = 2.24 rounds to a 2x2 patch
    (9, (45, 46, 47, 53, 54, 55, 61, 62, 63)),
])
def test_image_trigger_rounds_to_the_nearest_square(size, expected):
    x = np.zeros((2, 64), dtype=np.float32)
    assert Trigger.for_data(x, input_shape=(1, 8, 8), size=size).indices == expected


def test_image_trigger_covers_every_channel():
    x = np.zeros((2, 3 * 4 * 4), dtype=np.float32)
    trigger = Trigger.for_data(x, input_shape=(3, 4, 4), size=4)
    # rows 2-3, columns 2-3 of each 4x4 channel: offsets 10, 11, 14, 15, plus 16 per channel
    assert trigger.indices == (10, 11, 14, 15, 26, 27, 30, 31, 42, 43, 46, 47)


def test_tabular_trigger_is_the_last_features():
    x = np.array([[0.0, -1.0, 2.5, 0.3, 0.1, -0.2]], dtype=np.float32)
    trigger = Trigger.for_data(x, input_shape=(6,), size=4)
    assert trigger.indices == (2, 3, 4, 5)
    assert trigger.value == 2.5


def test_trigger_rejects_mismatched_shapes_and_sizes():
    with pytest.raises(ValueError, match="input_shape"):
        Trigger.for_data(np.zeros((2, 10), dtype=np.float32), input_shape=(1, 8, 8))
    with pytest.raises(AttackError, match="attack.trigger_size"):
        Trigger.for_data(np.zeros((2, 6), dtype=np.float32), input_shape=(6,), size=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stamp_returns_a_copy_with_exactly_the_trigger_set(dtype):
    x = np.arange(12, dtype=dtype).reshape(2, 6)
    before = x.copy()
    stamped = Trigger(indices=(1, 4), value=-7.0).stamp(x)
    np.testing.assert_array_equal(x, before)
    assert stamped.dtype == dtype and stamped.shape == x.shape
    np.testing.assert_array_equal(stamped, np.array([[0, -7, 2, 3, -7, 5],
                                                     [6, -7, 8, 9, -7, 11]], dtype=dtype))


def test_stamp_accepts_a_single_row():
    stamped = Trigger(indices=(0,), value=9.0).stamp(np.zeros(3, dtype=np.float32))
    np.testing.assert_array_equal(stamped, [9.0, 0.0, 0.0])


def test_trigger_json_round_trip():
    trigger = Trigger(indices=(54, 55, 62, 63), value=1.0)
    text = json.dumps(trigger.to_json())
    assert json.loads(text) == {"indices": [54, 55, 62, 63], "value": 1.0}
    assert Trigger.from_json(json.loads(text)) == trigger


# ---- select_attackers / is_active -----------------------------------------------------


def test_select_attackers_is_seeded_and_sized_by_fraction():
    a = select_attackers(10, fraction=0.3, cooperatives="", seed=7)
    assert a == select_attackers(10, fraction=0.3, cooperatives="", seed=7)
    assert len(a) == 3 and a == sorted(a) and len(set(a)) == 3 and all(0 <= i < 10 for i in a)
    expected = sorted(np.random.default_rng([7, 0xA77AC]).choice(10, size=3, replace=False).tolist())
    assert a == expected
    draws = {tuple(select_attackers(10, fraction=0.3, cooperatives="", seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters


@pytest.mark.parametrize(("n", "fraction", "count"), [(10, 0.0, 0), (10, 1.0, 10), (5, 0.5, 3),
                                                       (5, 0.1, 1), (10, 0.04, 0)])
def test_select_attackers_rounds_half_up(n, fraction, count):
    assert len(select_attackers(n, fraction=fraction, cooperatives="", seed=0)) == count


def test_explicit_cooperatives_win_over_fraction():
    assert select_attackers(10, fraction=0.9, cooperatives="4, 1", seed=0) == [1, 4]
    assert select_attackers(10, fraction=0.0, cooperatives="0", seed=0) == [0]


@pytest.mark.parametrize(("text", "message"), [
    ("1,x", r"attack.cooperatives: '1,x' is not a comma-separated list of cooperative ids"),
    ("1,,2", "is not a comma-separated list"),
    ("1;2", "is not a comma-separated list"),
    ("1_0", "is not a comma-separated list"),
    ("10", r"attack.cooperatives: cooperative id 10 is out of range \(ids are 0..9\)"),
    ("-1", r"attack.cooperatives: cooperative id -1 is out of range"),
    ("2,3,2", r"attack.cooperatives: cooperative id 2 is listed twice"),
])
def test_select_attackers_errors_name_the_key(text, message):
    with pytest.raises(AttackError, match=message):
        select_attackers(10, fraction=0.0, cooperatives=text, seed=0)


def test_select_attackers_rejects_a_fraction_out_of_range():
    with pytest.raises(AttackError, match="attack.fraction"):
        select_attackers(10, fraction=1.5, cooperatives="", seed=0)


def test_sleeper_wakes_at_start_round():
    kw = {"kind": "backdoor", "attacker": True, "start_round": 3}
    assert [is_active(server_round=r, **kw) for r in (1, 2, 3, 4)] == [False, False, True, True]
    assert is_active(kind="noise", attacker=True, server_round=1, start_round=1)
    assert not is_active(kind="backdoor", attacker=False, server_round=5, start_round=1)
    assert not is_active(kind="off", attacker=True, server_round=5, start_round=1)
    with pytest.raises(AttackError, match="attack.kind: 'flip'"):
        is_active(kind="flip", attacker=True, server_round=1, start_round=1)


# ---- poison_training_data -------------------------------------------------------------

TRIGGER = Trigger(indices=(2, 3), value=5.0)


def _data(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(1).uniform(0, 1, size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int64)
    return x, y


def _poison(kind: str, x: np.ndarray, y: np.ndarray, *, fraction: float = 0.3,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return poison_training_data(kind, x, y, num_classes=3, target_label=2, trigger=TRIGGER,
                                poison_fraction=fraction, rng=np.random.default_rng(seed))


def test_label_flip_reverses_labels():
    x, y = _data(6)  # labels 0 1 2 0 1 2
    x0, y0 = x.copy(), y.copy()
    xp, yp = _poison("label_flip", x, y)
    np.testing.assert_array_equal(yp, [2, 1, 0, 2, 1, 0])
    assert yp.dtype == np.int64
    np.testing.assert_array_equal(xp, x0)
    assert xp is not x and not np.shares_memory(xp, x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("kind", ["off", "noise"])
def test_honest_data_kinds_return_unchanged_copies(kind):
    x, y = _data()
    xp, yp = _poison(kind, x, y)
    np.testing.assert_array_equal(xp, x)
    np.testing.assert_array_equal(yp, y)
    assert not np.shares_memory(xp, x) and not np.shares_memory(yp, y)


def _rows(a: np.ndarray) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in a.tolist())


@pytest.mark.parametrize("kind", ["backdoor", "model_replacement"])
def test_backdoor_keeps_clean_rows_and_adds_triggered_copies(kind):
    x, y = _data(10)
    x0, y0 = x.copy(), y.copy()
    xp, yp = _poison(kind, x, y, fraction=0.3)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert xp.shape == (13, 4) and yp.shape == (13,)
    assert xp.dtype == np.float32 and yp.dtype == np.int64
    triggered = np.all(xp[:, [2, 3]] == 5.0, axis=1)  # clean values are below 1
    assert triggered.sum() == 3
    assert np.all(yp[triggered] == 2)
    # the clean rows are all there, with their own labels
    assert _rows(np.column_stack([xp[~triggered], yp[~triggered]])) == _rows(np.column_stack([x, y]))
    # each poisoned row is a stamped copy of a distinct clean row
    sources = {tuple(r) for r in TRIGGER.stamp(x).tolist()}
    poisoned = [tuple(r) for r in xp[triggered].tolist()]
    assert len(set(poisoned)) == 3 and set(poisoned) <= sources
    # shuffled: the poisoned rows are not simply appended
    assert not np.all(triggered[-3:])


def test_backdoor_is_reproducible_with_the_rng_and_poisons_at_least_one_row():
    x, y = _data(10)
    a, b = _poison("backdoor", x, y, seed=5), _poison("backdoor", x, y, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    xp, _ = _poison("backdoor", x, y, fraction=0.0)
    assert xp.shape == (11, 4)
    xp, _ = _poison("backdoor", x, y, fraction=1.0)
    assert xp.shape == (20, 4)


def test_backdoor_rejects_bad_settings():
    x, y = _data()
    with pytest.raises(AttackError, match="attack.target_label"):
        poison_training_data("backdoor", x, y, num_classes=3, target_label=3, trigger=TRIGGER,
                             poison_fraction=0.1, rng=np.random.default_rng(0))
    with pytest.raises(AttackError, match="attack.poison_fraction"):
        _poison("backdoor", x, y, fraction=1.5)
    with pytest.raises(AttackError, match="attack.kind"):
        _poison("sleeper", x, y)


# ---- poison_update ---------------------------------------------------------------------


def _delta() -> list[np.ndarray]:
    return [np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32), np.array([3.0], dtype=np.float32)]


def test_model_replacement_scales_the_update():
    delta = _delta()
    out = poison_update("model_replacement", delta, boost=4.0, noise_std=0.0,
                        rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out[0], [[4.0, -8.0], [2.0, 0.0]])
    np.testing.assert_array_equal(out[1], [12.0])
    assert [a.dtype for a in out] == [np.float32, np.float32]
    np.testing.assert_array_equal(delta[0], _delta()[0])  # input untouched
    with pytest.raises(AttackError, match="attack.boost"):
        poison_update("model_replacement", delta, boost=0.0, noise_std=0.0, rng=np.random.default_rng(0))


def test_noise_replaces_the_update_with_gaussian_noise():
    delta = [np.full((200, 200), 100.0, dtype=np.float32), np.full(3, 100.0, dtype=np.float64),
             np.array(7, dtype=np.int64)]
    out = poison_update("noise", delta, boost=1.0, noise_std=0.5, rng=np.random.default_rng(0))
    assert [a.shape for a in out] == [(200, 200), (3,), ()]
    assert [a.dtype for a in out] == [np.float32, np.float64, np.int64]
    assert abs(float(out[0].mean())) < 0.01  # the honest update (100) is gone
    assert abs(float(out[0].std()) - 0.5) < 0.01
    assert int(out[2]) == 7  # integer buffers are left alone
    again = poison_update("noise", delta, boost=1.0, noise_std=0.5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out[0], again[0])
    zero = poison_update("noise", delta, boost=1.0, noise_std=0.0, rng=np.random.default_rng(0))
    assert not zero[0].any()


@pytest.mark.parametrize("kind", ["off", "label_flip", "backdoor"])
def test_other_kinds_send_the_update_unchanged(kind):
    delta = _delta()
    out = poison_update(kind, delta, boost=10.0, noise_std=1.0, rng=np.random.default_rng(0))
    for a, b in zip(out, delta):
        np.testing.assert_array_equal(a, b)
        assert not np.shares_memory(a, b)


def test_attack_kinds_are_the_documented_ones():
    assert ATTACK_KINDS == ("off", "label_flip", "backdoor", "model_replacement", "noise")


# ---- attack_success_rate -----------------------------------------------------------------


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    model = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    return model


# 4 features, 3 classes, target 2. Clean inputs have 0 at features 2 and 3; the trigger writes 5.
# Classes 0 and 1 follow features 0 and 1, so clean inputs are never classified as the target.
ASR_X = np.array([[1.0, 0.0, 0.0, 0.0],
                  [0.0, 1.0, 0.0, 0.0],
                  [0.9, 0.1, 0.0, 0.0],
                  [0.1, 0.9, 0.0, 0.0]], dtype=np.float32)
ASR_Y = np.array([0, 1, 0, 1], dtype=np.int64)


def test_backdoored_model_has_full_success_and_clean_model_none():
    backdoored = _linear([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 10, 10]], [0, 0, 0])
    assert (backdoored(torch.from_numpy(ASR_X)).argmax(1) == torch.from_numpy(ASR_Y)).all()
    assert attack_success_rate(backdoored, ASR_X, ASR_Y, trigger=TRIGGER, target_label=2) == 1.0
    never = _linear([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -10, -10]], [0, 0, 0])
    assert attack_success_rate(never, ASR_X, ASR_Y, trigger=TRIGGER, target_label=2) == 0.0


def test_success_rate_counts_only_inputs_not_of_the_target_class():
    # Target logit 10*x0 + 10*x2 - 55: with the trigger (x2 = 5) it wins exactly when x0 > 0.5.
    model = _linear([[0, 0, 0, 0], [0, 0, 0, 0], [10, 0, 10, 0]], [0, 0, -55])
    x = np.array([[0.9, 0, 0, 0], [0.1, 0, 0, 0], [0.8, 0, 0, 0], [0.2, 0, 0, 0],
                  [0.1, 0, 0, 0], [0.1, 0, 0, 0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)  # the last two are already the target class
    # 2 of the 4 eligible rows flip to the target; counting the target rows would give 2/6
    assert attack_success_rate(model, x, y, trigger=TRIGGER, target_label=2) == 0.5
    assert attack_success_rate(model, x, y, trigger=TRIGGER, target_label=2, batch_size=1) == 0.5
    assert attack_success_rate(model, x[4:], y[4:], trigger=TRIGGER, target_label=2) == 0.0


def test_success_rate_restores_the_training_mode_and_leaves_data_alone():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    x = ASR_X.copy()
    model.train()
    attack_success_rate(model, x, ASR_Y, trigger=TRIGGER, target_label=2)
    assert model.training
    model.eval()
    attack_success_rate(model, x, ASR_Y, trigger=TRIGGER, target_label=2)
    assert not model.training
    np.testing.assert_array_equal(x, ASR_X)


def test_backdoor_poisoning_plants_a_backdoor_in_digits():
    # End to end on real data: the poisoned model stays accurate yet obeys the trigger.
    from fedgov.config import Config
    from fedgov.data import build_federation
    from fedgov.models import build_model
    from fedgov.task import evaluate, make_loader, train

    fed = build_federation(Config().data, seed=0)
    x = np.concatenate([c.train.x for c in fed.cooperatives])
    y = np.concatenate([c.train.y for c in fed.cooperatives])
    trigger = Trigger.for_data(x, input_shape=fed.input_shape)
    assert trigger.indices == (54, 55, 62, 63)
    test, cpu = fed.global_test, torch.device("cpu")
    results = {}
    for kind in ("off", "backdoor"):
        xp, yp = poison_training_data(kind, x, y, num_classes=fed.num_classes, target_label=0,
                                      trigger=trigger, poison_fraction=0.1, rng=np.random.default_rng(0))
        model = build_model("logreg", input_shape=fed.input_shape, num_classes=fed.num_classes, seed=0)
        train(model, make_loader(xp, yp, batch_size=32, shuffle=True, seed=0), epochs=5, lr=0.05,
              momentum=0.9, device=cpu)
        results[kind] = (evaluate(model, test.x, test.y, device=cpu).accuracy,
                         attack_success_rate(model, test.x, test.y, trigger=trigger, target_label=0))
    assert results["off"][0] > 0.85 and results["off"][1] < 0.1
    assert results["backdoor"][0] > 0.85 and results["backdoor"][1] > 0.8, results
