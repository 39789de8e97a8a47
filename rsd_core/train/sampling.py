"""Sampling: the EDM Heun sampler (full and truncated) and one-step generation, behind one interface.

Every model is sampled through :class:`Sampler.sample` (``n`` and a ``seed``), so evaluation,
export and the CLI do not care whether they hold a 35-NFE teacher or a one-step student.

Truncation rule (noisy and Ambient teachers): run the 18-level Heun sampler and, at the first
level t_i whose *next* level t_{i+1} is below ``sigma_stop``, return the x0 prediction
D(x_i; t_i) instead of stepping on. So the output is the denoiser at the lowest grid level
>= sigma_stop. For an Ambient-Tweedie teacher we use ``sigma_stop = sigma_n`` (the network
was only trained for sigma >= sigma_n; on the 18-step grid at sigma_n = 0.2 this returns at
t = 0.296 after 25 NFE). The reference code's ``stop_variance = 0.2`` corresponds to
``sigma_stop = sqrt(0.2)``. For Ambient Diffusion teachers the truncation point is a model
selection choice made by Proximal FID (see ``selection``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rsd_core.train.objectives import Objective, State

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# guide(x_i, t_i) -> (D(x_i; t_i), correction subtracted from x_{i+1}): posterior sampling (rsd_core.restore.posterior)
Guide = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# EDM's noise range and schedule exponent (Karras et al. 2022), shared by the sampler and SiD's noise levels.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
NUM_STEPS = 18


def rho_sigma(f, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """Karras et al. (2022) eq. 5 at the fraction f in [0, 1] of the way from sigma_max (f = 0) to sigma_min
    (f = 1), floats or tensors: (sigma_max^(1/rho) + f (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + f * (b - a)) ** rho


def rho_fraction(sigma: float, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> float:
    """The inverse of :func:`rho_sigma`: the fraction f at which the schedule reaches ``sigma``."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (sigma ** (1 / rho) - a) / (b - a)


def edm_time_steps(
    num_steps: int = NUM_STEPS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 levels t_0 > ... > t_{N-1}, then t_N = 0, in float64."""
    t = rho_sigma(torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1), sigma_min, sigma_max, rho)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def truncation_index(sigma_stop: float | None, t_steps: torch.Tensor | None = None) -> int | None:
    """The step i at which a truncated sampler returns D(x_i; t_i): the lowest level t_i >= ``sigma_stop``
    (the first level when ``sigma_stop`` exceeds them all) of ``t_steps`` (default: EDM's 18 levels);
    None (run to the end) when ``sigma_stop`` is None or 0. The one copy of the truncation rule."""
    if not sigma_stop:
        return None
    grid = (edm_time_steps() if t_steps is None else t_steps)[:-1].tolist()
    return max((i for i, t in enumerate(grid) if t >= sigma_stop), default=0)


def truncation_nfe(sigma_stop: float | None) -> int:
    """Network evaluations of the (truncated) 18-step Heun sampler: 2 i + 1 when it returns at step i."""
    i = truncation_index(sigma_stop)
    return 2 * NUM_STEPS - 1 if i is None else 2 * i + 1


@torch.no_grad()
def _start(latents: torch.Tensor, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
           sigma_stop: float | None) -> tuple[torch.Tensor, int | None, torch.Tensor]:
    """A trajectory's levels, the index it stops at, and its start x = latents * t_0 in float64."""
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    return t_steps, truncation_index(sigma_stop, t_steps), latents.to(torch.float64) * t_steps[0]


def _first_call(denoise: Denoiser, guide: Guide | None, x: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A level's denoiser call: D(x; t) alone, or through the guide with its correction."""
    if guide is None:
        return denoise(x, t).to(torch.float64), None
    return guide(x, t)


def heun_sample(
    denoise: Denoiser,
    latents: torch.Tensor,
    num_steps: int = NUM_STEPS,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    sigma_stop: float | None = None,
    on_level: Callable[[float, torch.Tensor], None] | None = None,
    guide: Guide | None = None,
) -> tuple[torch.Tensor, int]:
    """Deterministic Heun sampler (EDM Algorithm 2) from ``latents`` ~ N(0, I).

    Returns the sample and the number of denoiser evaluations (35 for 18 steps untruncated).
    The state is kept in float64; ``denoise(x, t)`` receives float64 x and a float64 scalar t.
    ``on_level(t_i, D(x_i; t_i))`` sees the x0 prediction at every level: the output of every
    truncation point, from one trajectory. ``guide``, when given, replaces the first denoiser call
    of every step and returns a correction that is subtracted after the Heun update (DPS
    guidance); it enables gradients itself, the rest of the sampler runs without them.
    """
    t_steps, stop_at, x = _start(latents, num_steps, sigma_min, sigma_max, rho, sigma_stop)
    nfe = 0
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        denoised, correction = _first_call(denoise, guide, x, t_cur)
        nfe += 1
        if on_level is not None:
            on_level(float(t_cur), denoised)
        if i == stop_at:
            return denoised, nfe
        d_cur = (x - denoised) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:
            denoised_next = denoise(x_next, t_next).to(torch.float64)
            nfe += 1
            d_next = (x_next - denoised_next) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next if correction is None else x_next - correction
    return x, nfe


def ancestral_sample(
    denoise: Denoiser,
    latents: torch.Tensor,
    rng: torch.Generator,
    num_steps: int = 100,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    sigma_stop: float | None = None,
    guide: Guide | None = None,
) -> tuple[torch.Tensor, int]:
    """Stochastic ancestral sampler on EDM's grid: DDPM's ancestral step in variance-exploding form, the schedule
    DPS is stated with. From level t to t' < t, with D = D(x; t),

        x' = x + (t_down - t) (x - D) / t + t_up z,   t_up^2 = t'^2 (t^2 - t'^2) / t^2,   t_down^2 = t'^2 - t_up^2,

    z ~ N(0, I) from ``rng``: one denoiser call per level, fresh noise at each. ``guide`` and ``sigma_stop`` as in
    :func:`heun_sample` (the correction is subtracted after the step; the x0 prediction at the truncation level
    is returned). Returns the sample and the number of denoiser evaluations.
    """
    t_steps, stop_at, x = _start(latents, num_steps, sigma_min, sigma_max, rho, sigma_stop)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        denoised, correction = _first_call(denoise, guide, x, t_cur)
        if i == stop_at or t_next == 0:
            return denoised, i + 1
        t_up = torch.sqrt(t_next**2 * (t_cur**2 - t_next**2) / t_cur**2)
        t_down = torch.sqrt(t_next**2 - t_up**2)
        z = torch.randn(x.shape, generator=rng, device=x.device, dtype=torch.float64)
        x = x + (t_down - t_cur) * (x - denoised) / t_cur + t_up * z
        if correction is not None:
            x = x - correction
    return x, num_steps


class Sampler:
    """Anything that turns (n, seed) into n images (or vectors) in the data range."""

    nfe: int

    def sample(self, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        out = []
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for start in range(0, n, batch_size):
            out.append(self._sample_batch(min(batch_size, n - start), gen).float().cpu())
        return torch.cat(out)

    def _sample_batch(self, n: int, rng: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class TeacherSampler(Sampler):
    """The teacher's Heun sampler; with ``sigma_stop`` the truncated variant.

    For objectives with an input state (Ambient masks, MRI projections) one state is drawn per
    sample and kept fixed along the whole trajectory (the fixed-mask sampler).
    """

    net: torch.nn.Module
    objective: Objective
    shape: tuple[int, ...]
    num_steps: int = NUM_STEPS
    sigma_stop: float | None = None
    bf16: bool = False

    def __post_init__(self):
        self.device = next(self.net.parameters()).device
        stop_i = truncation_index(self.sigma_stop, edm_time_steps(self.num_steps))
        self.nfe = 2 * self.num_steps - 1 if stop_i is None else 2 * stop_i + 1

    @torch.no_grad()
    def _sample_batch(self, n, rng):
        latents = torch.randn((n, *self.shape), generator=rng, device=self.device)
        input_state: State = self.objective.draw_input_state(n, self.shape, rng, self.device)

        def denoise(x, t):
            with _autocast(self.device, self.bf16):
                return self.objective.denoise(self.net, x.float(), t.float(), input_state)

        x, _ = heun_sample(denoise, latents, self.num_steps, sigma_stop=self.sigma_stop)
        return x


@dataclass
class OneStepSampler(Sampler):
    """The distilled generator: x = G(sigma_init * eps), one network evaluation."""

    net: torch.nn.Module
    objective: Objective
    shape: tuple[int, ...]
    sigma_init: float = 2.5
    bf16: bool = False

    def __post_init__(self):
        self.device = next(self.net.parameters()).device
        self.nfe = 1

    @torch.no_grad()
    def _sample_batch(self, n, rng):
        return generate(self.net, self.objective, n, self.shape, rng, self.sigma_init, bf16=self.bf16)

    def decode(self, eps: torch.Tensor, input_state: State) -> torch.Tensor:
        """G at given standard-normal latents ``eps`` (N, *shape) and input state, differentiable in eps
        (restoration inverts it); fp32 out."""
        sigma = torch.full((len(eps),), self.sigma_init, device=eps.device)
        return self.objective.denoise(self.net, self.sigma_init * eps, sigma, input_state).float()


def generate(
    net: torch.nn.Module,
    objective: Objective,
    n: int,
    shape: tuple[int, ...],
    rng: torch.Generator | None,
    sigma_init: float = 2.5,
    bf16: bool = False,
) -> torch.Tensor:
    """G(z) = D(z; sigma_init) with z = sigma_init * eps and a fresh input state (differentiable)."""
    device = next(net.parameters()).device
    z = sigma_init * torch.randn((n, *shape), generator=rng, device=device)
    input_state = objective.draw_input_state(n, shape, rng, device)
    with _autocast(device, bf16):
        return objective.denoise(net, z, torch.full((n,), sigma_init, device=device), input_state)
