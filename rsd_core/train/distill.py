"""Stage II: Restoration Score Distillation into a one-step generator (docs/algorithms.md §7).

Each iteration, on fresh z:
1. fake-score step: x_g = sg(G(z)) is *re-corrupted* with fresh operator state and fresh
   measurement noise, y~ = A(x_g) + sigma_n eps', and the fake score f_psi takes one step on the
   teacher's own objective L_A;
2. generator step: y_g = A(G(z)) with *no* measurement noise, y_s = y_g + s n with s on the
   rho = 7 schedule for u ~ U[0, t_max / 1000] (from generator_sigma_min up, when set), and the SiD loss
   w (f_phi - f_psi) . [(f_phi - y_g) - alpha (f_phi - f_psi)], with w = 1 / mean|y_g - f_phi|
   computed without gradient, scaled by 100; gradients reach G through y_g and through both
   networks' inputs, whose weights are frozen.
The generator's EMA is what is evaluated and exported.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rsd_core.config import DistillConfig, DistillTrainConfig
from rsd_core.train.ema import make_ema
from rsd_core.train.loop import CheckpointCallback, MetricsCallback, Phase, StepContext, Trainer, TrainResult
from rsd_core.train.networks import EDMPrecond
from rsd_core.train.objectives import AmbientDiffusionObjective, FourierAmbientObjective, Objective
from rsd_core.train.sampling import generate, rho_fraction, rho_sigma


class OneStepGenerator(nn.Module):
    """G(z) = D_theta(z; sigma_init) with z = sigma_init * eps: the teacher's network, one evaluation."""

    def __init__(
        self, net: EDMPrecond, objective: Objective, shape: tuple[int, ...], sigma_init: float = 2.5
    ):
        super().__init__()
        self.net = net
        self.objective = objective
        self.shape = tuple(shape)
        self.sigma_init = sigma_init

    def sample(self, n: int, rng: torch.Generator | None, bf16: bool = False) -> torch.Tensor:
        return generate(self.net, self.objective, n, self.shape, rng, self.sigma_init, bf16)


def sid_noise_levels(
    batch: int, t_max: float, rng: torch.Generator | None, device, sigma_floor: float | None = None
) -> torch.Tensor:
    """s = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho, u ~ U[0, t_max/1000]; with
    ``sigma_floor``, u ~ U[u_floor, t_max/1000] where s(u_floor) = sigma_floor (the schedule truncated there)."""
    low, high = (0.0 if sigma_floor is None else 1 - rho_fraction(sigma_floor)), t_max / 1000.0
    return rho_sigma(1 - (low + torch.rand(batch, generator=rng, device=device) * (high - low)))


def sid_generator_loss(
    f_phi: torch.Tensor,
    f_psi: torch.Tensor,
    y_g: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None = None,
    mean_over: str = "visible",
) -> torch.Tensor:
    """Per-sample SiD loss w (f_phi - f_psi) . [(f_phi - y_g) - alpha (f_phi - f_psi)].

    f_phi is the teacher ("real") score, f_psi the fake. ``mask`` restricts the loss to visible
    pixels (inpainting); w = 1 / mean|y_g - f_phi| over the masked pixels, averaged over the
    ``"visible"`` ones or over ``"all"`` pixels (the reference code's choice; DistillConfig.generator_loss_mean).
    w is computed without gradient.
    """
    mask = torch.ones_like(y_g) if mask is None else mask.to(y_g.dtype).expand_as(y_g)
    with torch.no_grad():
        count = mask.flatten(1).sum(1).clamp_min(1.0) if mean_over == "visible" else float(mask[0].numel())
        w = 1.0 / ((y_g - f_phi).abs() * mask).flatten(1).sum(1).div(count).clamp_min(1e-5)
    diff = f_phi - f_psi
    per_pixel = mask * diff * ((f_phi - y_g) - alpha * diff)
    return w * per_pixel.flatten(1).sum(1)


def fake_loss_mask(dcfg: DistillConfig, objective: Objective) -> str:
    """The pixels the fake score's loss is taken on (DistillConfig.fake_loss_mask, None resolved per objective)."""
    has_further = isinstance(objective, AmbientDiffusionObjective | FourierAmbientObjective)
    if dcfg.fake_loss_mask == "further" and not has_further:
        raise ValueError(f"fake_loss_mask 'further' needs an objective with a further corruption (ambient_diffusion, "
                         f"fourier_ambient); this teacher's is '{objective.name}'")
    if dcfg.fake_loss_mask is None:  # "further" was compared with "observed" for random inpainting only
        return "further" if isinstance(objective, AmbientDiffusionObjective) else "observed"
    return dcfg.fake_loss_mask


class DistillPhase(Phase):
    """``fake_updates`` fake-score steps, then a generator step, each on fresh z (one RSD iteration per ``step``)."""

    name = "distill"

    def __init__(
        self,
        teacher: nn.Module,
        objective: Objective,
        generator: nn.Module,
        fake: nn.Module,
        train_cfg: DistillTrainConfig,
        dcfg: DistillConfig,
        config: dict,
    ):
        if not isinstance(train_cfg, DistillTrainConfig):  # a TrainConfig's lr, betas, ... would be ignored here
            raise TypeError(f"distillation's loop takes a DistillTrainConfig (its optimisers are DistillConfig's), "
                            f"got {type(train_cfg).__name__}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.frozen_modules = {"teacher": self.teacher}
        self.objective = objective
        self.operator = objective.operator
        self.generator = generator.requires_grad_(True)
        self.fake = fake.requires_grad_(True)
        self.generator_ema = make_ema(generator)
        self.dcfg = dcfg = dcfg.updated(fake_loss_mask=fake_loss_mask(dcfg, objective))  # None resolved
        self.fake_loss_options = {"loss_mask": "further"} if dcfg.fake_loss_mask == "further" else {}
        self.batch_size = train_cfg.batch_size
        eps = train_cfg.adam_eps
        self.opt_fake = torch.optim.Adam(fake.parameters(), lr=dcfg.lr_fake, betas=dcfg.betas_fake, eps=eps)
        self.opt_g = torch.optim.Adam(
            generator.parameters(), lr=dcfg.lr_generator, betas=dcfg.betas_generator, eps=eps
        )
        self.modules = {"generator": generator, "fake": fake, "generator_ema": self.generator_ema}
        self.optimizers = {"fake": self.opt_fake, "generator": self.opt_g}
        self.ema_pairs = [(generator, self.generator_ema)]
        # Checkpoints record the settings used (selection samples them at sigma_init; the resolved fake_loss_mask).
        self.config = {**config, "distill": dcfg.model_dump()}

    def _fake_step(self, ctx: StepContext) -> tuple[float, float]:
        b, rng = self.batch_size, ctx.rng
        self.generator.eval()
        with torch.no_grad():
            x_g = self.generator.sample(b, rng, ctx.bf16).float()
        shape = tuple(x_g.shape[1:])
        state = self.operator.sample_state(b, shape, rng, ctx.device)
        y_fake = self.operator.observe(x_g, state, rng)  # re-corrupted: fresh state, fresh noise
        self.fake.train()
        with ctx.autocast():
            loss = self.objective.loss(self.fake, y_fake, state, rng, **self.fake_loss_options).mean()
        return float(loss.detach()), ctx.optimizer_step(loss, self.opt_fake, self.dcfg.grad_clip_fake)

    def _generator_step(self, ctx: StepContext) -> tuple[float, float]:
        b, rng, d = self.batch_size, ctx.rng, self.dcfg
        self.generator.train()
        self.fake.eval().requires_grad_(False)
        try:
            x_g = self.generator.sample(b, rng, ctx.bf16).float()
            shape = tuple(x_g.shape[1:])
            input_state = self.objective.draw_input_state(b, shape, rng, ctx.device)
            y_g = self.objective.measure(x_g, input_state)  # A(G(z)), no measurement noise
            s = sid_noise_levels(b, d.t_max, rng, ctx.device, d.generator_sigma_min)
            n = torch.randn(y_g.shape, generator=rng, device=ctx.device)
            y_s = y_g + s.reshape((-1,) + (1,) * (y_g.ndim - 1)) * n
            with ctx.autocast():
                f_phi = self.objective.denoise(self.teacher, y_s, s, input_state).float()
                f_psi = self.objective.denoise(self.fake, y_s, s, input_state).float()
            per_sample = sid_generator_loss(
                f_phi, f_psi, y_g, d.alpha, self.objective.score_mask(input_state), d.generator_loss_mean
            )
            finite = torch.isfinite(per_sample)  # drop NaN samples, as the reference code does
            loss = per_sample[finite].sum() / b * d.loss_scaling_g if finite.any() else per_sample.sum()
            return float(loss.detach()), ctx.optimizer_step(loss, self.opt_g, d.grad_clip_generator)
        finally:
            self.fake.requires_grad_(True)

    def step(self, ctx: StepContext) -> dict[str, float]:
        fake = [self._fake_step(ctx) for _ in range(self.dcfg.fake_updates)]
        loss_fake, gn_fake = (sum(values) / len(fake) for values in zip(*fake, strict=True))
        loss_g, gn_g = self._generator_step(ctx)
        return {
            "loss_fake": loss_fake,
            "loss_generator": loss_g,
            "grad_norm_fake": gn_fake,
            "grad_norm_generator": gn_g,
        }


def distill(
    teacher: EDMPrecond,
    objective: Objective,
    shape: tuple[int, ...],
    train_cfg: DistillTrainConfig,
    dcfg: DistillConfig,
    out_dir: str | Path | None,
    *,
    callback: MetricsCallback | None = None,
    config: dict | None = None,
    progress: bool = True,
    on_checkpoint: CheckpointCallback | None = None,
) -> tuple[DistillPhase, TrainResult]:
    """Distil ``teacher`` (its EMA weights) into a one-step generator; G and the fake start as its copies."""
    generator = OneStepGenerator(copy.deepcopy(teacher), objective, shape, dcfg.sigma_init)
    fake = copy.deepcopy(teacher)
    phase = DistillPhase(teacher, objective, generator, fake, train_cfg, dcfg, config or {})
    result = Trainer(phase, train_cfg, out_dir, callback=callback, progress=progress,
                     on_checkpoint=on_checkpoint).run()
    return phase, result
