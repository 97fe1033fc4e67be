from __future__ import annotations

import numpy as np
import pytest

from fedgov.governance import (
    WEIGHTING_POLICIES,
    influence,
    mean_influence,
    policy_weights,
)


def test_samples_is_fedavg():
    w = policy_weights("samples", [1, 1, 2])
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, [0.25, 0.25, 0.5])


def test_equal_ignores_size():
    np.testing.assert_allclose(policy_weights("equal", [1, 100, 0]), [1 / 3] * 3)


def test_sqrt_known_values():
    np.testing.assert_allclose(policy_weights("sqrt", [1, 4]), [1 / 3, 2 / 3])


def test_capped_redistributes_excess_proportionally():
    np.testing.assert_allclose(policy_weights("capped", [8, 1, 1], cap=0.5), [0.5, 0.25, 0.25])


def test_capped_iterates_until_no_weight_exceeds_cap():
    # First pass pins 100 at 0.4; the remaining 0.6 split 50:10:1 gives 50 about 0.49 > 0.4, so
    # it is pinned too, and 10:1 share the last 0.2.
    w = policy_weights("capped", [100, 50, 10, 1], cap=0.4)
    np.testing.assert_allclose(w, [0.4, 0.4, 0.2 * 10 / 11, 0.2 / 11])


def test_capped_below_cap_is_samples():
    np.testing.assert_allclose(policy_weights("capped", [3, 3, 4], cap=0.5), [0.3, 0.3, 0.4])
    np.testing.assert_allclose(policy_weights("capped", [8, 1, 1]), [0.8, 0.1, 0.1])  # cap 1


def test_capped_infeasible_gives_equal():
    # Three weights of at most 0.2 cannot sum to 1.
    np.testing.assert_allclose(policy_weights("capped", [8, 1, 1], cap=0.2), [1 / 3] * 3)


def test_capped_zero_sizes_share_remainder_equally():
    w = policy_weights("capped", [10, 0, 0], cap=0.5)
    np.testing.assert_allclose(w, [0.5, 0.25, 0.25])


@pytest.mark.parametrize(
    ("policy", "sizes", "cap", "match"),
    [
        ("fedavg", [1, 2], 1.0, "unknown weighting policy 'fedavg'"),
        ("samples", [], 1.0, "empty"),
        ("sqrt", [1, -2], 1.0, "negative"),
        ("equal", [0, 0], 1.0, "all zero"),
        ("samples", [1, float("nan")], 1.0, "finite"),
        ("capped", [1, 2], 0.0, "cap"),
        ("capped", [1, 2], 1.5, "cap"),
    ],
)
def test_policy_weights_rejects(policy, sizes, cap, match):
    with pytest.raises(ValueError, match=match):
        policy_weights(policy, sizes, cap=cap)


def test_capped_random_property():
    rng = np.random.default_rng(12345)
    for _ in range(500):
        n = int(rng.integers(1, 30))
        sizes = rng.pareto(1.2, size=n) * 100  # heavy-tailed: whales are common
        sizes[rng.random(n) < 0.1] = 0.0
        if not sizes.any():
            sizes[0] = 1.0
        cap = float(rng.uniform(0.01, 1.0))
        w = policy_weights("capped", sizes, cap=cap)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(w >= 0)
        if cap * n >= 1:
            assert w.max() <= cap + 1e-12
            # Water-filling keeps the order of sizes (bigger never weighs less).
            order = np.argsort(sizes, kind="stable")
            assert np.all(np.diff(w[order]) >= -1e-12)
        else:
            np.testing.assert_allclose(w, 1 / n)


def test_all_policies_normalised():
    for policy in WEIGHTING_POLICIES:
        w = policy_weights(policy, [5, 1, 0, 3], cap=0.4)
        assert w.sum() == pytest.approx(1.0)


def test_influence_known_values():
    got = influence([0.6, 0.2, 0.2])
    assert got["nakamoto"] == 1
    assert isinstance(got["nakamoto"], int)
    assert got["hhi"] == pytest.approx(0.44)
    assert got["max_weight"] == pytest.approx(0.6)
    assert got["gini"] == pytest.approx(0.4 * 4 / (2 * 3))  # sum |wi - wj| / (2 n)


def test_influence_exact_half_is_not_a_majority():
    got = influence([0.25] * 4)
    assert got["nakamoto"] == 3
    assert got["gini"] == 0.0
    assert got["hhi"] == pytest.approx(0.25)
    assert influence([0.1] * 10)["nakamoto"] == 6  # rounding must not make 5 tenths a majority


def test_influence_normalises_and_edge_cases():
    assert influence([6, 2, 2]) == pytest.approx(influence([0.6, 0.2, 0.2]))
    assert influence([7.0]) == {"nakamoto": 1, "gini": 0.0, "hhi": 1.0, "max_weight": 1.0}
    mono = influence([1, 0, 0, 0])
    assert mono["nakamoto"] == 1 and mono["hhi"] == 1.0 and mono["gini"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty"):
        influence([])


def test_equal_never_less_decentralised_than_samples_with_whales():
    rng = np.random.default_rng(7)
    sizes = [5000, 40, 30, 30, 20, 20, 10]
    assert influence(policy_weights("samples", sizes))["nakamoto"] == 1
    assert influence(policy_weights("equal", sizes))["nakamoto"] == 4
    for _ in range(200):
        sizes = rng.pareto(1.0, size=int(rng.integers(2, 20))) + 1
        sizes[0] *= 1000  # a whale
        eq = influence(policy_weights("equal", sizes))
        fedavg = influence(policy_weights("samples", sizes))
        sq = influence(policy_weights("sqrt", sizes))
        assert eq["nakamoto"] >= sq["nakamoto"] >= fedavg["nakamoto"]
        assert eq["hhi"] <= sq["hhi"] <= fedavg["hhi"] + 1e-12


def test_mean_influence():
    rounds = [influence([0.6, 0.2, 0.2]), influence([0.25] * 4)]
    got = mean_influence(rounds)
    assert list(got)[:4] == ["nakamoto", "gini", "hhi", "max_weight"]
    assert got["nakamoto"] == pytest.approx(2.0)
    assert got["hhi"] == pytest.approx((0.44 + 0.25) / 2)
    assert got["max_weight"] == pytest.approx((0.6 + 0.25) / 2)
    assert mean_influence([]) == {"nakamoto": None, "gini": None, "hhi": None, "max_weight": None}
    assert mean_influence([{"hhi": 0.5, "extra": 1.0}, {"hhi": 0.3}])["extra"] == 1.0


def test_governance_imports_no_flower_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, fedgov.governance.weighting, fedgov.governance.escrow;"
        "print(sorted(m for m in ('flwr', 'torch', 'tenseal') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
