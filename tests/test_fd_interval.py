"""Bootstrap intervals of FD on Gaussian features, where the FD of the populations is known in closed form:
FD(N(m, I), N(0, I)) = |m|^2."""

from __future__ import annotations

import numpy as np

from rsd_core.select.fd_interval import fd_interval, features_fd, paired_difference_interval
from rsd_core.select.frechet import FeatureStats, frechet_distance

DIM, N = 8, 400


def _reference(rng: np.random.Generator) -> FeatureStats:
    return FeatureStats.from_features(rng.standard_normal((20_000, DIM)))


def test_the_interval_covers_the_estimate_and_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    shift = np.full(DIM, 0.5)  # population FD = 8 * 0.25 = 2.0
    small, large = (rng.standard_normal((n, DIM)) + shift for n in (N, 4 * N))
    lo, hi = fd_interval(small, ref, resamples=100)
    estimate = frechet_distance(FeatureStats.from_features(small), ref)
    assert lo < estimate < hi and hi - lo > 0.1
    lo4, hi4 = fd_interval(large, ref, resamples=100)
    assert 0.3 < (hi4 - lo4) / (hi - lo) < 0.75  # ~1/2 for 4x the samples


def test_the_interval_is_around_the_estimate_even_where_resampling_inflates_the_fd():
    """40 samples of the reference's own law: FD estimate ~0.7 (all small-sample bias); resampled FDs lie
    near 1.0-1.8, wholly above it. The interval must still hold the estimate it is compared by."""
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    x = rng.standard_normal((40, DIM))
    estimate = frechet_distance(FeatureStats.from_features(x), ref)
    lo, hi = fd_interval(x, ref, resamples=100)
    assert lo < estimate < hi


def test_paired_candidates_from_one_population_are_not_told_apart_but_a_shift_is():
    """Two checkpoints that map the same latents to nearly the same features: the difference interval
    contains 0 and, the rows being resampled together, is far narrower than either FD's own interval.
    The same latents moved by 0.3 more in every feature: FD larger by 1.68, the interval below 0."""
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    latents = rng.standard_normal((N, DIM)) + 0.2
    a = latents + 0.01 * rng.standard_normal((N, DIM))
    b = latents + 0.01 * rng.standard_normal((N, DIM))
    lo, hi = paired_difference_interval(a, b, ref, resamples=100)
    assert lo < 0 < hi
    one_lo, one_hi = fd_interval(a, ref, resamples=100)
    assert hi - lo < 0.25 * (one_hi - one_lo)  # unpaired resampling would make it wider than one FD's
    lo, hi = paired_difference_interval(latents, latents + 0.3, ref, resamples=100)
    assert lo > -2.5 and hi < -1.0  # population difference 8 * (0.04 - 0.25) = -1.68


def test_the_fast_fd_equals_the_frechet_distance_of_the_statistics_with_fewer_or_more_samples_than_dims():
    rng = np.random.default_rng(2)
    ref = FeatureStats.from_features(rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.3)
    for n in (20, 300):  # n < dim: the n x n route; n > dim: the dim x dim one
        x = rng.standard_normal((n, 64)) * 0.5 + 0.2
        expected = frechet_distance(FeatureStats.from_features(x), ref)
        assert abs(features_fd(x, ref) - expected) < 1e-6 * max(1.0, expected)
