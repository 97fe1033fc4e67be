"""A small RDP accountant for DP-SGD, written for the tests and independent of Opacus.

The Poisson-subsampled Gaussian mechanism (sampling rate q, noise multiplier sigma) at an
integer Renyi order alpha >= 2 has (Mironov, Talwar and Zhang 2019, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism", Section 3.3, the closed-form binomial sum)

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),
    RDP(alpha) = log(A_alpha) / (alpha - 1),

summed in log space here. At a fractional order the same quantity is
A_alpha = E_{z ~ N(0, sigma^2)} [(1 - q + q exp((2 z - 1) / (2 sigma^2)))^alpha] (ibid.),
computed here by quadrature on a fine grid. RDP composes additively over steps. The conversion to
(epsilon, delta) is the one Opacus's ``get_privacy_spent`` uses (Balle et al. 2020,
"Hypothesis testing interpretations and Renyi differential privacy", Theorem 21):

    epsilon = min_alpha  RDP(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).

The orders are 1.1, 1.2, ..., 10.9 (fractional) and 11, ..., 256 (integer), a superset of
Opacus's default orders, so its bound can differ from Opacus's only by numerics or by
finding a better order above Opacus's largest (63).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

ORDERS = tuple(1 + x / 10 for x in range(1, 100)) + tuple(range(11, 257))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def rdp_sampled_gaussian(*, q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one step of the Poisson-subsampled Gaussian mechanism."""
    if q == 0:
        return 0.0
    if q == 1:  # no subsampling: the Gaussian mechanism
        return alpha / (2 * sigma**2)
    if alpha != int(alpha):
        return log_a_quadrature(q=q, sigma=sigma, alpha=alpha) / (alpha - 1)
    return log_a_binomial(q=q, sigma=sigma, alpha=int(alpha)) / (alpha - 1)


def log_a_quadrature(*, q: float, sigma: float, alpha: float, points_per_sigma: int = 400) -> float:
    """log A_alpha as an integral over z ~ N(0, sigma^2), for any real alpha > 1."""
    # The integrand has its mass near z = 0 (the (1 - q) part) and near z = alpha (the tilted q part).
    z = np.arange(-40 * sigma, alpha + 40 * sigma, sigma / points_per_sigma)
    log_density = -z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_integrand = log_density + alpha * log_ratio
    top = float(log_integrand.max())
    return top + math.log(float(np.exp(log_integrand - top).sum()) * (sigma / points_per_sigma))


def log_a_binomial(*, q: float, sigma: float, alpha: int) -> float:
    """log A_alpha by the closed-form binomial sum, for integer alpha >= 2."""
    log_terms = []
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        log_terms.append(log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q)
                         + (k * k - k) / (2 * sigma**2))
    return _logsumexp(log_terms)


def epsilon(spends: Iterable[tuple[float, float, int]], *, delta: float,
            orders: Iterable[float] = ORDERS) -> float:
    """Epsilon at ``delta`` of the composition of ``(noise_multiplier, sample_rate, steps)`` spends."""
    spends = [(float(z), float(q), int(n)) for z, q, n in spends if int(n) > 0]
    if not spends:
        return 0.0
    best = math.inf
    for alpha in orders:
        rdp = sum(n * rdp_sampled_gaussian(q=q, sigma=z, alpha=alpha) for z, q, n in spends)
        eps = rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)
