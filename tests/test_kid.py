"""KID against the closed form of the cubic-kernel MMD between 1-d Gaussians, and its unbiasedness."""

from __future__ import annotations

import numpy as np
import pytest

from rsd_core.select.kid import kernel_distance, mmd2_unbiased


def expected_kernel(p: float, q: float) -> float:
    """E[(a b + 1)^3] for independent a ~ N(p, 1), b ~ N(q, 1) (d = 1): the moments E a = p,
    E a^2 = p^2 + 1, E a^3 = p^3 + 3p enter the expanded cube."""
    return (p**3 + 3 * p) * (q**3 + 3 * q) + 3 * (p**2 + 1) * (q**2 + 1) + 3 * p * q + 1


def closed_form_mmd2(p: float, q: float) -> float:
    return expected_kernel(p, p) + expected_kernel(q, q) - 2 * expected_kernel(p, q)


def test_mmd2_is_unbiased_at_small_n():
    # The mean over many draws of 8 samples matches the population MMD^2; the plug-in estimate that keeps
    # the diagonal terms (the broken variant) is off by ~E k(x, x) / n and fails the same check.
    rng = np.random.default_rng(0)
    p, q, n, draws = 0.0, 0.5, 8, 4000
    truth = closed_form_mmd2(p, q)
    estimates = [mmd2_unbiased(rng.normal(p, 1, (n, 1)), rng.normal(q, 1, (n, 1))) for _ in range(draws)]
    stderr = np.std(estimates) / np.sqrt(draws)
    assert abs(np.mean(estimates) - truth) < 4 * stderr
    biased = [float(np.mean((x @ x.T + 1) ** 3) + np.mean((y @ y.T + 1) ** 3) - 2 * np.mean((x @ y.T + 1) ** 3))
              for x, y in ((rng.normal(p, 1, (n, 1)), rng.normal(q, 1, (n, 1))) for _ in range(draws))]
    assert abs(np.mean(biased) - truth) > 4 * stderr


def test_kid_of_one_distribution_is_zero_within_its_spread():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    kid = kernel_distance(x, y, subset_size=200, subsets=50, seed=0)
    assert kid.subset_size == 200 and kid.std > 0
    assert abs(kid.mean) < 3 * kid.std
    shifted = kernel_distance(x, y + 0.5, subset_size=200, subsets=50, seed=0)
    assert shifted.mean > 10 * shifted.std


def test_kid_refuses_mismatched_features():
    with pytest.raises(ValueError, match="one dimension"):
        kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(np.zeros((1, 3)), np.zeros((5, 3)))
