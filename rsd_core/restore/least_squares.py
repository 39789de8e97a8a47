"""Regularised least squares over an operator's own normal map, by conjugate gradient.

Two users: the classical estimate of a linear kind without a closed form (SENSE for MRI,
:mod:`rsd_core.restore.baselines`), and data consistency (:func:`rsd_core.restore.estimate.data_consistency`), which
corrects a learnt estimate by the smallest change that reproduces noiseless measurements. Both go
through ``operator.forward`` / ``operator.adjoint``, so the model solved is exactly the one that
made y (coil maps, masks and borders included) and a new linear operator needs nothing here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from rsd_core.operators import Operator, State

# Conjugate-gradient iterations at most, for both users: masks and block means converge after one; multi-coil
# MRI R = 4 converges by about 2,000 (chosen on validation slices, docs/results.md "Which split chose what"),
# and CG stops early once converged.
CG_ITERS = 2000


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products, shaped to broadcast against a batch."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))


def solve_normal(operator: Operator, y: torch.Tensor, state: State, lam: float | torch.Tensor, iters: int,
                 rtol: float = 1e-6) -> torch.Tensor:
    """argmin_x ||A(x) - y||^2 + lam ||x||^2 per sample (lam: one weight, or one per sample): CG on
    (A^T A + lam I) x = A^T y from x = 0.

    With lam = 0 the iterates stay in the range of A^T, so CG converges to the minimum-norm
    least-squares solution A^+ y (the pseudo-inverse), not just any x with A(x) = y. At most
    ``iters`` iterations; it stops early once every sample's normal-equation residual is below
    ``rtol`` of its start (a mask or block average converges after one).

    The iterations run in float64 whatever ``y``'s dtype (the result comes back in it): the multi-coil
    normal map is ill-conditioned, and in float32 CG loses the conjugacy of its directions and diverges after
    some hundreds of iterations (docs/algorithms.md, "Data consistency").
    """
    dtype = y.dtype
    y = y.double()
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    rhs = operator.adjoint(y, state)
    if isinstance(lam, torch.Tensor):  # one weight per sample
        lam = lam.to(rhs.dtype).view(-1, *([1] * (rhs.ndim - 1)))
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
    return x.to(dtype)


# Tikhonov weights the measurements choose from (lambda_by_held_out).
LAMBDA_GRID = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _observation_seed(y: torch.Tensor, seed: int) -> int:
    """A seed that depends on one observation's values only, so its split never depends on its batch."""
    digest = hashlib.sha256(y.detach().cpu().float().numpy().tobytes() + seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lambda_by_held_out(operator: Operator, y: torch.Tensor, state: State, iters: int,
                       lambdas: tuple[float, ...] = LAMBDA_GRID, seed: int = 0,
                       solve: Callable[[torch.Tensor, State, float], torch.Tensor] | None = None) -> torch.Tensor:
    """The Tikhonov weight of each observation (B,), chosen by its measurements alone (no clean image), for
    operators with a further mask.

    Each y is split as Ambient Diffusion splits it (:meth:`Operator.split_observation`), with a split drawn
    from its own values (so an observation gets the same weight in any batch: a served request restores as
    the batch job did); each lambda's solution from the kept measurements predicts the held-out ones, and the
    lambda that predicts them best wins (the self-validation of SSDU, Yaman et al. 2020). Where the forward
    model is exact (simulated coil maps) the smallest weight tends to win; where it is itself an estimate
    (coil maps estimated per scan), exact inversion amplifies its error through the ill-conditioned unfolding
    and a larger weight wins. The split has fewer measurements than y, so the weight chosen leans high. Ties
    (inpainting: the held-out pixels are never predicted) go to the smallest weight. ``solve(y, state, lam)``
    is the reconstruction whose weight is chosen (default: Tikhonov least squares by ``iters`` CG iterations).
    """
    if solve is None:

        def solve(y_part: torch.Tensor, state_part: State, lam: float) -> torch.Tensor:
            return solve_normal(operator, y_part, state_part, lam, iters)

    splits = [operator.split_observation(y[i:i + 1], {k: v[i:i + 1] for k, v in state.items()},
                                         torch.Generator().manual_seed(_observation_seed(y[i], seed)))
              for i in range(len(y))]
    y_kept = torch.cat([s[0] for s in splits])
    state_kept = {k: torch.cat([s[1][k] for s in splits]) for k in splits[0][1]}
    held = torch.cat([s[2] for s in splits])
    scale = (held * y).pow(2).flatten(1).sum(1).clamp_min(1e-30)
    errors = torch.stack([(held * (operator.forward(solve(y_kept, state_kept, lam), state) - y)).pow(2).flatten(1)
                          .sum(1) / scale for lam in lambdas])
    best = torch.round(errors.double(), decimals=6).argmin(0)  # the first minimum: the smallest weight on ties
    return torch.tensor(lambdas, dtype=y.dtype, device=y.device)[best]
