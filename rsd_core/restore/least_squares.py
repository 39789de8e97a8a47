"""Regularised least squares over an operator's own normal map, by conjugate gradient.

Two users: the classical estimate of a linear kind without a closed form (SENSE for MRI,
:mod:`rsd_core.restore.baselines`), and data consistency (:func:`rsd_core.restore.estimate.data_consistency`), which
corrects a learnt estimate by the smallest change that reproduces noiseless measurements. Both go
through ``operator.forward`` / ``operator.adjoint``, so the model solved is exactly the one that
made y (coil maps, masks and borders included) and a new linear operator needs nothing here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rsd_core.operators import Operator, State


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products, shaped to broadcast against a batch."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))


def solve_normal(operator: Operator, y: torch.Tensor, state: State, lam: float, iters: int,
                 rtol: float = 1e-6) -> torch.Tensor:
    """argmin_x ||A(x) - y||^2 + lam ||x||^2 per sample: CG on (A^T A + lam I) x = A^T y from x = 0.

    With lam = 0 the iterates stay in the range of A^T, so CG converges to the minimum-norm
    least-squares solution A^+ y (the pseudo-inverse), not just any x with A(x) = y. At most
    ``iters`` iterations; it stops early once every sample's normal-equation residual is below
    ``rtol`` of its start (a mask or block average converges after one).
    """
    rhs = operator.adjoint(y, state)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    stop = rtol**2 * rr
    for _ in range(iters):
        if bool((rr <= stop).all()):
            break
        ap = operator.adjoint(operator.forward(p, state), state) + lam * p
        alpha = rr / _dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        p = r + rr_new / rr.clamp_min(1e-30) * p
        rr = rr_new
    return x


# Tikhonov weights the measurements choose from (lambda_by_held_out).
LAMBDA_GRID = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def lambda_by_held_out(operator: Operator, y: torch.Tensor, state: State, iters: int,
                       lambdas: tuple[float, ...] = LAMBDA_GRID, seed: int = 0,
                       solve: Callable[[torch.Tensor, State, float], torch.Tensor] | None = None) -> float:
    """The Tikhonov weight chosen by the measurements alone (no clean image), for operators with a further mask.

    y is split as Ambient Diffusion splits it (:meth:`Operator.split_observation`): each lambda's solution
    from the kept measurements predicts the held-out ones, and the lambda that predicts them best wins (the
    self-validation of SSDU, Yaman et al. 2020). Where the forward model is exact (simulated coil maps) the
    smallest weight tends to win; where it is itself an estimate (coil maps estimated per scan), exact
    inversion amplifies its error through the ill-conditioned unfolding and a larger weight wins. The split
    has fewer measurements than y, so the weight chosen leans high. Ties (inpainting: the held-out pixels
    are never predicted) go to the smallest weight. ``solve(y, state, lam)`` is the reconstruction whose
    weight is chosen (default: Tikhonov least squares by ``iters`` CG iterations).
    """
    if solve is None:

        def solve(y_part: torch.Tensor, state_part: State, lam: float) -> torch.Tensor:
            return solve_normal(operator, y_part, state_part, lam, iters)

    y_kept, state_kept, held = operator.split_observation(y, state, torch.Generator().manual_seed(seed))
    scale = (held * y).pow(2).sum().clamp_min(1e-30)
    errors = []
    for lam in lambdas:
        x = solve(y_kept, state_kept, lam)
        errors.append(float((held * (operator.forward(x, state) - y)).pow(2).sum() / scale))
    return lambdas[min(range(len(lambdas)), key=lambda i: (round(errors[i], 6), i))]
