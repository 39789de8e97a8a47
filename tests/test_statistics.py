"""The paired bootstrap of benchmarks/statistics.py against the closed form of a Gaussian mean difference."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.statistics import paired_bootstrap_ci


def test_paired_interval_matches_the_normal_interval_and_uses_the_pairing():
    """For n = 400 pairs the percentile interval of mean(a - b) is close to mean +- 1.96 s / sqrt(n) of the
    differences; scores that share a large per-image term (as PSNRs of two methods on the same images do) get
    the narrow interval of their differences, not the wide one of unpaired samples."""
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 5.0, 400)  # what each image makes easy or hard, shared by both methods
    a, b = image + 1.0 + rng.normal(0, 0.5, 400), image + rng.normal(0, 0.5, 400)
    lo, hi = paired_bootstrap_ci(a, b)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.25 * half)
    assert hi - lo < 0.2  # unpaired, the shared term alone would give about 2 * 1.96 * 5 * sqrt(2 / 400) = 1.4
    assert lo > 0.8 and hi < 1.2


def test_paired_interval_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_ci(np.zeros(3), np.zeros(4))
