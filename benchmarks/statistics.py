"""Intervals for benchmark differences measured on the same images: the paired bootstrap.

Two methods scored on the same test images differ by the mean of their per-image differences; resampling the
images (with replacement, the same indices for both methods) keeps the pairing, so the interval reflects how
much the difference depends on which images were drawn, not the spread of either method alone (Efron &
Tibshirani 1993, ch. 13; the usual test for paired restoration scores).
"""

from __future__ import annotations

import numpy as np

N_BOOTSTRAP = 2000


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = N_BOOTSTRAP,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over ``n_boot`` resamples of the pairs (a_i, b_i)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired scores must be two 1-d arrays of the same length >= 2, got {a.shape} and {b.shape}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
