"""The linear low-rank experiment of the RSD paper's Theorem 1 (eigenspace recovery).

Clean data x = U z in R^d with z ~ N(0, I_r) are only seen through a linear corruption:
random pixel masks (Ambient Diffusion teacher) or a fixed blur matrix with noise (Ambient
Tweedie teacher). A rank-r :class:`LinearGenerator` distilled by the unchanged RSD loop
(``DistillPhase`` + ``Trainer``) should recover col(U), while PCA of the back-projected data
and of the teacher's own samples should not.

Everything is Gaussian, so the optimal denoisers are linear and known in closed form:
:class:`GaussianDenoiser` is that closed form behind the EDMPrecond call signature, used as an
exact ("analytic") teacher and, with a learnable covariance, as a fake score whose model class
contains the optimum, so the analytic mode isolates the distillation from network error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from pydantic import Field
from torch import nn

from rsd_core.config import DistillConfig, DistillTrainConfig, Spec, TrainConfig
from rsd_core.operators import Inpaint, InpaintSpec, Operator, State
from rsd_core.train.distill import DistillPhase
from rsd_core.train.loop import MetricsCallback, Trainer
from rsd_core.train.networks import build_mlp
from rsd_core.train.objectives import AmbientDiffusionObjective, AmbientTweedieObjective, Objective
from rsd_core.train.pretrain import TensorSource, pretrain_teacher
from rsd_core.train.sampling import TeacherSampler

SCALES = (3.0, 2.0, 1.5, 1.0)
BLUR_TAPS = (0.2, 0.6, 0.2)
ILL_CONDITIONED_TAPS = (0.25, 0.5, 0.25)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _projector(a: torch.Tensor | np.ndarray) -> np.ndarray:
    q = scipy.linalg.orth(_numpy(a))
    return q @ q.T


def principal_angles_deg(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Principal angles in degrees (largest first) between the column spans of ``a`` (D, k), ``b`` (D, l)."""
    return np.degrees(scipy.linalg.subspace_angles(_numpy(a), _numpy(b)))


def projection_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """||P_A - P_B||_F between the orthogonal projectors on the column spans.

    Basis-free; for equal ranks it equals sqrt(2 * sum(sin^2(principal angles))).
    """
    return float(np.linalg.norm(_projector(a) - _projector(b)))


def covariance_error(theta: torch.Tensor | np.ndarray, u: torch.Tensor | np.ndarray) -> float:
    """||theta theta^T - U U^T||_F / ||U U^T||_F: the linear-regime recovery error of Section 9 (Theorem 1).

    Unlike the subspace metrics it also sees scale, and it is invariant to theta -> theta R for orthogonal R.
    """
    t, uu = _numpy(theta), _numpy(u)
    target = uu @ uu.T
    return float(np.linalg.norm(t @ t.T - target) / np.linalg.norm(target))


class MatrixSpec(Spec):
    """A fixed dense matrix A with Gaussian measurement noise sigma_n (the matrix itself is not config)."""

    kind: Literal["matrix"] = "matrix"
    sigma_n: float = Field(default=0.0, ge=0.0)


class MatrixOperator(Operator):
    """y = A x + sigma_n eps for vectors (B, d), with one fixed A (m, d) shared by every sample."""

    def __init__(self, matrix: torch.Tensor, spec: MatrixSpec):
        super().__init__(spec)
        self.matrix = matrix.float()

    def observation_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.matrix.shape[0],)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        return x @ self.matrix.to(device=x.device, dtype=x.dtype).T

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        return y @ self.matrix.to(device=y.device, dtype=y.dtype)


def blur_matrix(d: int, taps: Sequence[float] = BLUR_TAPS) -> torch.Tensor:
    """The d x d Toeplitz matrix of a centred odd-length kernel with zero padding.

    Zero (not reflection) padding keeps A symmetric with eigenvalues sum_k taps_k cos(k j pi/(d+1)),
    so [0.2, 0.6, 0.2] is well conditioned (~5) and [0.25, 0.5, 0.25] is not (~1,700 at d = 64).
    """
    half = len(taps) // 2
    a = torch.zeros(d, d, dtype=torch.float64)
    for offset, tap in zip(range(-half, half + 1), taps, strict=True):
        a += tap * torch.diag(torch.ones(d - abs(offset), dtype=torch.float64), offset)
    return a


def low_rank_basis(d: int = 64, scales: Sequence[float] = SCALES, seed: int = 0) -> torch.Tensor:
    """U (d, r): random orthonormal columns times ``scales``, so Sigma_x = U U^T has eigenvalues scales^2."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, len(scales), generator=gen, dtype=torch.float64))
    return q * torch.tensor(scales, dtype=torch.float64)


def sample_clean(u: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """n clean vectors x = U z, z ~ N(0, I_r), as float32 (B, d)."""
    z = torch.randn(n, u.shape[1], generator=rng, dtype=torch.float64)
    return (z @ u.T).float()


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(0, M) data, with the EDMPrecond signature net(x, sigma, cond=None).

    Without ``cond``: D(x; s) = M (M + s^2 I)^{-1} x. With ``cond`` = a 0/1 mask m (the Ambient
    input mask), the posterior mean of the clean vector from its visible noisy entries:
    D(x; s, m) = M P (P (M + s^2 I) P + (I - P))^{-1} P x with P = diag(m).
    M = L L^T is stored through a factor L (d, k), so a learnable copy stays PSD of rank <= k, and
    by the push-through identity both cases become D = L (L^T P L + s^2 I_k)^{-1} L^T P x (P = I
    without a mask): k x k solves instead of d x d, exact also for singular M. The algebra runs in
    float64 because s goes down to 0.002, where the d x d system has condition number ~1e7.
    """

    def __init__(self, factor: torch.Tensor, learnable: bool = False):
        super().__init__()
        self.factor = nn.Parameter(factor.double().clone(), requires_grad=learnable)

    @classmethod
    def from_covariance(cls, cov: torch.Tensor, learnable: bool = False, rtol: float = 1e-9) -> GaussianDenoiser:
        """A denoiser for N(0, cov) factorised as V_k Lambda_k^{1/2} over the eigenvalues above rtol * max."""
        evals, evecs = torch.linalg.eigh(cov.double())
        keep = evals > rtol * evals.max()
        return cls(evecs[:, keep] * evals[keep].sqrt(), learnable)

    @property
    def covariance(self) -> torch.Tensor:
        return self.factor @ self.factor.T

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        xd = x.double()
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(xd.shape[0])
        lf = self.factor
        k = lf.shape[1]
        eye = torch.eye(k, dtype=torch.float64, device=x.device)
        if cond is None:
            gram = (lf.T @ lf).expand(len(xd), k, k)
        else:
            p = cond.double()
            xd = p * xd
            gram = torch.einsum("di,bd,dj->bij", lf, p, lf)
        system = gram + (s**2)[:, None, None] * eye
        coeff = torch.linalg.solve(system, (xd @ lf).unsqueeze(-1)).squeeze(-1)
        return (coeff @ lf.T).float()


class LinearGenerator(nn.Module):
    """G(z) = theta z with theta (d, r): the rank-r linear generator of Theorem 1."""

    def __init__(self, d: int, r: int, seed: int = 0, scale: float = 0.25):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(scale * torch.randn(d, r, generator=gen))

    def sample(self, n: int, rng: torch.Generator | None, bf16: bool = False) -> torch.Tensor:
        """n samples z @ theta^T with z ~ N(0, I_r) from ``rng`` (bf16 is ignored: linear, tiny)."""
        z = torch.randn(n, self.theta.shape[1], generator=rng, device=self.theta.device)
        return z @ self.theta.T


@dataclass(frozen=True)
class SubspaceReport:
    """How well col(theta) matches col(U): principal angles, projection distance and covariance error."""

    max_angle_deg: float
    projection_distance: float
    covariance_error: float


def subspace_report(theta: torch.Tensor, u: torch.Tensor) -> SubspaceReport:
    """Largest principal angle, projection distance and relative covariance error of theta vs U.

    The covariance error compares scales too, so for PCA baselines (orthonormal directions) it is
    only meaningful after ``scaled_components`` puts the estimated variances back.
    """
    return SubspaceReport(
        max_angle_deg=float(principal_angles_deg(theta, u).max()),
        projection_distance=projection_distance(theta, u),
        covariance_error=covariance_error(theta, u),
    )


def scaled_components(samples: torch.Tensor, r: int) -> torch.Tensor:
    """PCA's rank-r covariance factor V_r Lambda_r^{1/2}, comparable with theta in covariance_error."""
    x = samples.double()
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    return evecs[:, -r:] * evals[-r:].clamp_min(0.0).sqrt()


def condition_number(matrix: torch.Tensor) -> float:
    """sigma_max / sigma_min of a matrix (inf if singular)."""
    sv = torch.linalg.svdvals(matrix.double())
    return float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf


@dataclass(frozen=True)
class Corruption:
    """One corruption of the experiment: its operator, objective, oracle teacher covariance and baseline.

    ``teacher_covariance`` is the covariance of what the teacher denoises: Sigma_x for masks
    (Ambient Diffusion predicts the clean vector), A Sigma_x A^T for the matrix (Tweedie predicts A x).
    ``backproject`` is the naive inverse whose PCA is the baseline: zero filling, or A^{-1} y.
    """

    name: Literal["mask", "blur"]
    operator: Operator
    objective: Objective
    teacher_covariance: torch.Tensor

    @property
    def sigma_n(self) -> float:
        return self.operator.sigma_n

    def observe(self, x: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, State]:
        """Corrupted observations of clean x with fresh per-sample state, as a dataset would hold them."""
        state = self.operator.sample_state(len(x), tuple(x.shape[1:]), rng)
        return self.operator.observe(x, state, rng), state

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.operator, MatrixOperator):
            return torch.linalg.solve(self.operator.matrix.double(), y.double().T).T.float()
        return y


def mask_corruption(u: torch.Tensor, p: float = 0.8, delta: float = 0.1) -> Corruption:
    """Random pixel masks (erasure probability p, noiseless) with the Ambient Diffusion objective."""
    operator = Inpaint(InpaintSpec(p=p, delta=delta))
    return Corruption("mask", operator, AmbientDiffusionObjective(operator), u @ u.T)


def blur_corruption(u: torch.Tensor, sigma_n: float, taps: Sequence[float] = BLUR_TAPS) -> Corruption:
    """A fixed zero-padded blur matrix with noise sigma_n, Ambient Tweedie objective (EDM if noiseless)."""
    a = blur_matrix(u.shape[0], taps)
    operator = MatrixOperator(a, MatrixSpec(sigma_n=sigma_n))
    objective = AmbientTweedieObjective(operator) if sigma_n > 0 else Objective(operator)
    return Corruption("blur", operator, objective, a @ u @ u.T @ a.T)


@dataclass(frozen=True)
class Stage:
    """One constant-lr stretch of distillation; lr_generator = 0 is a fake-score warm-up."""

    steps: int
    lr_generator: float
    lr_fake: float


# Fake warm-up, then generator + fake, then both at lr / 3.3. The fake must track the generator
# faster than the generator moves, yet Adam's lr-sized steps jitter the fake's factor and inflate
# its covariance (E[(L + e)(L + e)^T] = L L^T + E[e e^T]), which alpha > 1 turns into growth of
# theta; the final low-lr stage removes most of that bias. Tuned on the analytic mask run.
# Fake warm-up with the generator frozen, then a stepwise-decaying lr: the learnable fake's Adam
# jitter inflates its covariance, and with alpha > 1 that pushes theta; decaying the lr removes it
# (the last two stages took the analytic blur from 2.08 to 1.72 degrees).
ANALYTIC_SCHEDULE = (Stage(600, 0.0, 1e-2), Stage(300, 0.0, 3e-3), Stage(4000, 5e-4, 5e-3), Stage(2000, 1.5e-4, 1.5e-3),
                     Stage(2000, 5e-5, 5e-4), Stage(2000, 1.5e-5, 1.5e-4))


def distill_linear(
    teacher: nn.Module,
    fake: nn.Module,
    generator: LinearGenerator,
    objective: Objective,
    schedule: Sequence[Stage],
    batch_size: int = 256,
    seed: int = 0,
    callback: MetricsCallback | None = None,
) -> torch.Tensor:
    """Run RSD (``DistillPhase`` + ``Trainer``, unchanged) stage by stage; returns the final EMA theta.

    Each stage is a fresh DistillPhase on the same generator and fake modules (the Trainer has no
    lr decay), with its own RNG seed so stages do not replay one noise stream.
    """
    ema_theta = generator.theta.detach().clone()
    for i, stage in enumerate(schedule):
        cfg = DistillTrainConfig(
            steps=stage.steps,
            batch_size=batch_size,
            lr_rampup_steps=0,
            ema_halflife_nimg=10_000,
            checkpoint_every=stage.steps,
            seed=seed + i,
            device="cpu",
            precision="fp32",
            channels_last=False,
        )
        dcfg = DistillConfig(lr_generator=stage.lr_generator, lr_fake=stage.lr_fake)
        phase = DistillPhase(teacher, objective, generator, fake, cfg, dcfg, {})
        Trainer(phase, cfg, None, callback=callback, progress=False).run()
        ema_theta = phase.generator_ema.theta.detach().clone()
    return ema_theta


def teacher_samples(net: nn.Module, corruption: Corruption, n: int, seed: int = 0) -> torch.Tensor:
    """The teacher's own Heun samples, one fixed input mask per sample for Ambient teachers.

    Tweedie teachers are truncated at sigma_n (they were never trained below it), as in sampling.py.
    """
    sigma_stop = corruption.sigma_n if corruption.sigma_n > 0 else None
    shape = (corruption.teacher_covariance.shape[0],)
    return TeacherSampler(net, corruption.objective, shape, sigma_stop=sigma_stop).sample(n, seed=seed, batch_size=n)


def train_mlp_teacher(
    corruption: Corruption,
    observations: torch.Tensor,
    state: State,
    steps: int,
    batch_size: int = 512,
    lr: float = 1e-3,
    hidden: int = 256,
    depth: int = 3,
    seed: int = 0,
) -> nn.Module:
    """A small EDM MLP pretrained with the corruption-aware objective; returns its EMA.

    The EMA half-life is long (200k samples, ~400 steps at batch 512; EDM uses 500k images):
    with 20k the teacher kept enough step-to-step noise to leave the distilled blur subspace at
    5.0 degrees instead of 3.8.
    """
    d = observations.shape[1]
    torch.manual_seed(seed)
    net = build_mlp(d, hidden, depth, corruption.objective.cond_channels((d,)))
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_rampup_steps=min(200, steps),
        ema_halflife_nimg=200_000,
        checkpoint_every=steps,
        seed=seed,
        device="cpu",
        precision="fp32",
        channels_last=False,
    )
    phase, _ = pretrain_teacher(net, corruption.objective, TensorSource(observations, state), cfg, None, progress=False)
    return phase.ema
