"""Frechet distance at Inception's 2048 dimensions: the eigenvalue form against the general matrix square root.

Selection scores every candidate against one fixed reference, so what counts is the cost of one more distance
once the reference's root is cached. Both methods score the same statistics (n = 128 samples against n = 419
references, the cpu-mri selection's sizes), interleaved over repetitions so machine noise hits both alike.

    python -m benchmarks.frechet [--dim 2048] [--reps 3]

Last stdout line: one JSON object (also written to benchmarks/results/frechet.json).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg

from benchmarks.report import emit
from rsd_core.select.frechet import FeatureStats, frechet_distance


def sqrtm_distance(s1: FeatureStats, s2: FeatureStats) -> float:
    """pytorch-fid's formula: tr sqrtm(S1 S2) by a general (Schur) matrix square root."""
    covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma).real
    diff = s1.mu - s2.mu
    return float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2.0 * np.trace(covmean))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (default: 2048, Inception)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (default: 3)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)

    def stats(n: int) -> FeatureStats:
        f = rng.standard_normal((n, args.dim)) @ mix + rng.standard_normal(args.dim)
        return FeatureStats(f.mean(0), np.cov(f, rowvar=False), n)

    ref = stats(419)
    t = time.perf_counter()
    ref.sigma_root  # noqa: B018 - the once-per-reference cost, reported on its own
    root_s = time.perf_counter() - t
    times: dict[str, list[float]] = {"eigenvalue": [], "sqrtm": []}
    values: dict[str, list[float]] = {"eigenvalue": [], "sqrtm": []}
    for _ in range(args.reps):
        candidate = stats(128)
        for name, fn in (("eigenvalue", frechet_distance), ("sqrtm", sqrtm_distance)):
            t = time.perf_counter()
            values[name].append(fn(candidate, ref))
            times[name].append(time.perf_counter() - t)
    median = {name: statistics.median(v) for name, v in times.items()}
    rel = max(abs(a - b) / abs(b) for a, b in zip(values["eigenvalue"], values["sqrtm"], strict=True))
    result = {
        "dim": args.dim,
        "seconds_per_distance": median,
        "reference_root_seconds": root_s,
        "speedup": median["sqrtm"] / median["eigenvalue"],
        "max_relative_difference": rel,
    }
    print(f"dim {args.dim}: eigenvalue form {median['eigenvalue']:.2f} s, sqrtm {median['sqrtm']:.2f} s per distance "
          f"({result['speedup']:.1f}x; reference root once {root_s:.2f} s); largest relative difference {rel:.1e}")
    return emit("frechet", result)


if __name__ == "__main__":
    main()
