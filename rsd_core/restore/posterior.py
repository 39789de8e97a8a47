"""Diffusion posterior sampling (DPS, Chung et al. 2023) with the teacher as the prior: the slow baseline.

Along the stochastic ancestral schedule the paper states (default) or the teacher's deterministic Heun grid,
each level's update is followed by the guidance step zeta (1 + t^2) / ||r|| * grad_x ||r||^2, r = y - A(D(x; t)):
the paper's variance-preserving step in EDM's variance-exploding coordinates. K samples per observation give a
posterior mean and spread. An Ambient teacher keeps one input mask (MRI: projection) per sample along the
trajectory; blur and super-resolution teachers are priors on A(x), so DPS with them is mis-specified.
docs/algorithms.md §10.2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from tqdm import tqdm

from rsd_core.config import Spec
from rsd_core.operators import Operator, State
from rsd_core.restore.estimate import CONSISTENCY_ITERS, check_observations, data_consistency
from rsd_core.stages import load_model
from rsd_core.train.objectives import Objective
from rsd_core.train.sampling import ancestral_sample, heun_sample


class DPSConfig(Spec):
    """DPS settings: the guidance constant zeta', the schedule and its levels (ancestral: DPS's own, at >= 100
    levels; heun: the teacher's deterministic sampler, 18 levels), and the posterior samples per observation."""

    zeta: float = Field(default=1.0, gt=0)
    schedule: Literal["ancestral", "heun"] = "ancestral"
    num_steps: int = Field(default=100, ge=2)
    samples: int = Field(default=1, ge=1)
    data_consistency: bool = True
    consistency_iters: int = Field(default=CONSISTENCY_ITERS, ge=1)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0


def dps_guidance(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    operator: Operator,
    y: torch.Tensor,
    state: State,
    x: torch.Tensor,
    t: torch.Tensor,
    zeta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, the correction subtracted from the next iterate) at level ``t``: x0_hat = D(x; t) and
    zeta (1 + t^2) / ||y - A(x0_hat)|| * grad_x ||y - A(x0_hat)||^2 per sample (the module docstring's step)."""
    with torch.enable_grad():
        x_in = x.float().requires_grad_(True)
        x0 = denoise(x_in, t).float()
        residual = (y - operator.forward(x0, state)).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(residual.square().sum(), x_in)
    zeta_t = zeta * (1.0 + t.float() ** 2) / residual.detach().clamp_min(1e-12)
    return x0.detach().double(), (zeta_t.view(-1, *([1] * (grad.ndim - 1))) * grad).double()


def dps_batch(
    net: torch.nn.Module,
    objective: Objective,
    image_shape: tuple[int, ...],
    y: torch.Tensor,
    state: State,
    config: DPSConfig,
    rng: torch.Generator,
    sigma_stop: float | None = None,
) -> torch.Tensor:
    """``config.samples`` posterior samples per observation of one batch, (B, K, C, H, W) on the device of y, in
    [-1, 1]."""
    operator = objective.operator
    k = config.samples
    y, state = y.repeat_interleave(k, dim=0), {key: v.repeat_interleave(k, dim=0) for key, v in state.items()}
    b, device = len(y), y.device  # b = observations x samples
    latents = torch.randn((b, *image_shape), generator=rng, device=device)
    input_state = objective.draw_input_state(b, tuple(image_shape), rng, device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objective.denoise(net, x.float(), t.float(), input_state)

    def guide(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dps_guidance(denoise, operator, y, state, x, t, config.zeta)

    if config.schedule == "ancestral":
        x, _ = ancestral_sample(denoise, latents, rng, config.num_steps, sigma_stop=sigma_stop, guide=guide)
    else:
        x, _ = heun_sample(denoise, latents, config.num_steps, sigma_stop=sigma_stop, guide=guide)
    x = x.float()
    if config.data_consistency:
        x = data_consistency(operator, x, y, state, config.consistency_iters)
    return x.clamp(-1.0, 1.0).view(b // k, k, *x.shape[1:])


class PosteriorSamples(NamedTuple):
    """DPS's output per observation: the mean of its K samples, the first sample, and the samples' spread."""

    mean: torch.Tensor
    sample: torch.Tensor
    spread: torch.Tensor


def dps_restore(
    net: torch.nn.Module,
    objective: Objective,
    image_shape: tuple[int, ...],
    y: torch.Tensor,
    state: State,
    config: DPSConfig,
    sigma_stop: float | None = None,
    progress: bool = False,
) -> PosteriorSamples:
    """DPS restorations, each (N, C, H, W) on the CPU, ``config.batch_size`` observations at a time."""
    check_observations(objective.operator, image_shape, y, state)
    device = next(net.parameters()).device
    rng = torch.Generator(device=device).manual_seed(config.seed)
    out = []
    for start in tqdm(range(0, len(y), config.batch_size), desc="dps", disable=not progress):
        stop = start + config.batch_size
        y_b = y[start:stop].to(device=device, dtype=torch.float32)
        state_b = {k: v[start:stop].to(device) for k, v in state.items()}
        out.append(dps_batch(net, objective, image_shape, y_b, state_b, config, rng, sigma_stop).cpu())
    samples = torch.cat(out)
    return PosteriorSamples(samples.mean(1), samples[:, 0], samples.std(1, unbiased=False))


def dps_with_model(
    model_dir: str | Path, y: torch.Tensor, state: State, config: DPSConfig, device: str | torch.device = "cpu"
) -> PosteriorSamples:
    """DPS with a saved teacher folder, truncated where its card says its sampler stops."""
    net, objective, card = load_model(model_dir, device)
    if card.kind != "teacher":
        raise ValueError(f"{model_dir} holds a {card.kind}; DPS needs the teacher (a denoiser at every level)")
    return dps_restore(net, objective, card.image_shape, y, state, config, card.sigma_stop)
