"""Amortised restoration networks: one network pass per observation instead of an optimisation per image.

Two targets (``EncoderConfig.target``), both fitted without clean images or labels:

* ``"latent"``: an encoder E(y, state) -> eps inverting the frozen generator G, trained on the latent
  objective ||A(G(E(y))) - y||^2 / (2 s^2) + prior_weight ||E(y)||^2 / 2 over the dataset (amortised
  inference, Kingma & Welling 2014; encoder-initialised inversion, Zhu et al. 2016); its latent starts
  latent optimisation.
* ``"image"``: a network R(y, state) -> (mean, log variance) estimating E[x | y] and a per-pixel spread,
  fitted (``fit_on``) either on the dataset's own observations split by the operator's further mask and
  scored on the held-out measurements (Ambient Diffusion's argument, Daras et al. 2023; SSDU, Yaman et al.
  2020), or on pairs the one-step generator simulates through the dataset's operator and states (amortised
  posterior estimation, Papamakarios & Murray 2016).

Inputs are what every operator kind gives as images: A^T y and the sampling pattern A^T A 1. The
derivations, the variance head's loss and the measurements behind the defaults are in docs/algorithms.md
§10.1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from rsd_core.config import Spec
from rsd_core.operators import Operator, State
from rsd_core.train.progress import TrainingProgress

# The header's format name, from when the only network was the latent encoder: kept, so stored restorers load.
_FORMAT = "rsd-latent-encoder"


# Fit settings that differ by target where a field is not given: the posterior-mean network learns a whole
# image-to-image map and does better with more steps of a narrower network; the latent encoder keeps the
# settings it was tuned at (docs/algorithms.md §10.1).
TARGET_DEFAULTS = {"image": {"steps": 1200, "width": 32}, "latent": {"steps": 300, "width": 64}}
# The image fit's choices beyond length and width: how an observation is split (SPLIT_CHOICES, fits on observations
# only) and the variance head's features. Fields added after fits were cached (benchmarks/restore.py digests them
# only where they differ from their defaults).
SPLIT_CHOICES = ("score_on", "acs_holdout", "holdout_delta")
FIT_CHOICES = (*SPLIT_CHOICES, "detach_variance")


class EncoderConfig(Spec):
    """How the encoder is fitted; the misfit's prior weight and noise floor are the restoration's.

    ``steps`` and ``width`` not given take the target's defaults (:data:`TARGET_DEFAULTS`).
    """

    steps: int = Field(default=TARGET_DEFAULTS["image"]["steps"], ge=1, description="Adam steps of the fit")
    batch_size: int = Field(default=32, ge=1, description="observations (or simulated pairs) per fit step")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the encoder (cosine decay to 0)")
    width: int = Field(default=TARGET_DEFAULTS["image"]["width"], ge=8,
                       description="channels of the encoder's first level (twice that below)")
    max_observations: int = Field(default=20_000, ge=1, description="the first observations of the dataset used")
    jitter: float = Field(default=0.3, ge=0, description="target 'latent': std of the noise added to E(y) for "
                          "restarts after the first")
    fit_on: Literal["auto", "observations", "generator"] = Field(
        default="auto", description="target 'image': fit on the observations' own held-out measurements "
        "(Ambient further corruption; operators with a further mask: inpainting, MRI), on the generator's "
        "samples seen through the operator, or 'auto': observations where the operator allows it, else generator")
    target: Literal["latent", "image"] = Field(
        default="image", description="what the encoder outputs: G's latent (fitted on the observations' misfit), "
        "or the posterior mean and std of the image (fitted as fit_on says)")
    score_on: Literal["held", "all"] = Field(
        default="held", description="fit on observations: score the measurements the input lacks ('held'), or "
        "all of them as Ambient Diffusion's objective does ('all': the network also learns to copy its input)")
    detach_variance: bool | None = Field(
        default=None, description="target 'image': the variance head's last layer sees the features detached, so "
        "its loss leaves them to the mean's; None: detached on observation fits, shared on generator fits")
    acs_holdout: float = Field(
        default=0.0, ge=0.0, le=1.0, description="fit on MRI observations: the probability, per observation and "
        "draw, that its ACS lines may be held out too (SSDU's loss set drawn from every sampled line)")
    holdout_delta: float | None = Field(
        default=None, gt=0, description="fit on observations: the further mask's strength for the split "
        "(inpainting: delta; MRI: delta_R); None: the operator's default for restorers (restorer_further), else "
        "its own (the teacher's)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _target_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            target = data.get("target", "image")
            data = {**TARGET_DEFAULTS.get(target, {}), **data}
        return data

    @model_validator(mode="after")
    def _fit_on_needs_image(self) -> EncoderConfig:
        if self.target == "latent" and self.fit_on != "auto":
            raise ValueError(f"fit_on {self.fit_on!r} chooses the training pairs of target 'image'; the latent "
                             "encoder is always fitted on the observations' misfit through G: drop fit_on")
        changed = self.changed_fit_choices()
        if self.target == "latent" and changed:
            raise ValueError(f"{', '.join(changed)} set the fit of target 'image'; the latent encoder has no "
                             "held-out measurements or variance head: drop them")
        return self

    def changed_fit_choices(self, names: tuple[str, ...] = FIT_CHOICES) -> list[str]:
        """Those of the image fit's choices ``names`` that differ from their defaults."""
        return [name for name in names if getattr(self, name) != type(self).model_fields[name].default]

    def image_pairs(self, operator: Operator) -> Literal["observations", "generator"]:
        """What an image-target fit trains on for ``operator``: ``fit_on`` resolved, with a clear error where
        the operator cannot split its observations."""
        pairs = self.fit_on
        if pairs == "auto":
            pairs = "observations" if operator.splits_observations else "generator"
        if pairs == "observations" and not operator.splits_observations:
            raise ValueError(f"fit_on 'observations' needs an operator whose further mask holds measurements out "
                             f"(inpaint with delta > 0, mri); {type(operator).__name__} {operator.spec.model_dump()} "
                             "has none: use fit_on 'generator' or 'auto'")
        if pairs == "generator" and self.changed_fit_choices(SPLIT_CHOICES):
            raise ValueError(f"score_on {self.score_on!r} / acs_holdout {self.acs_holdout} / holdout_delta "
                             f"{self.holdout_delta} choose how observations are split, and "
                             f"{type(operator).__name__} restorers are fitted on the generator's samples: drop them")
        return pairs

    def split_strength(self, operator: Operator) -> float | None:
        """The further mask's strength an observation fit splits with: ``holdout_delta``, else the operator's
        default for restorers; None: the operator's own."""
        return self.holdout_delta if self.holdout_delta is not None else operator.restorer_further


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AmortisedEncoder(nn.Module):
    """A two-level convolutional network from (A^T y, A^T A 1) to a latent of the image's shape
    (``target`` "latent") or to a posterior mean and log-variance of the image (``target`` "image").

    Two levels and four residual blocks see about half of a 32 px image from every pixel; the
    output layer starts at zero, so an unfitted encoder proposes the prior's mode (eps = 0) or
    the image 0 with unit variance.
    """

    def __init__(self, channels: int, width: int = 64, target: Literal["latent", "image"] = "latent"):
        super().__init__()
        self.channels, self.width, self.target = channels, width, target
        outputs = channels if target == "latent" else 2 * channels
        self.inp = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.top = _ResBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Sequential(_ResBlock(2 * width), _ResBlock(2 * width))
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.out = nn.Sequential(_ResBlock(2 * width), _group_norm(2 * width), nn.SiLU(),
                                 nn.Conv2d(2 * width, outputs, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, inputs: torch.Tensor, detach_variance: bool = False) -> torch.Tensor:
        """The output; with ``detach_variance`` (target "image") the log-variance channels see the features
        detached, so the variance head's loss trains only its own last layer and leaves the mean's
        features to the mean's loss."""
        h = self.top(self.inp(inputs))
        low = self.mid(self.down(h))
        up = self.up(F.interpolate(low, size=h.shape[-2:], mode="nearest"))
        if not detach_variance:
            return self.out(torch.cat([h, up], dim=1))
        features, last = self.out[:-1](torch.cat([h, up], dim=1)), self.out[-1]
        weight, bias = last.weight.chunk(2, dim=0), last.bias.chunk(2, dim=0)
        return torch.cat([F.conv2d(features, weight[0], bias[0], padding=1),
                          F.conv2d(features.detach(), weight[1], bias[1], padding=1)], dim=1)


def posterior_moments(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of an image-target encoder's output.

    The variance is bounded by construction: a pixel's value lies in [-1, 1], so its posterior std cannot
    exceed 1 and log-variance is mapped smoothly below 0 by -softplus(-raw) (about raw where raw << 0, so
    the NLL keeps its gradient); an unbounded head once put 8.9 into a restored spread, which the spread
    dataset rightly refused after the whole restoration had run. Clamped below so exp never divides by zero."""
    mean, raw = output.chunk(2, dim=1)
    return mean, (-F.softplus(-raw)).clamp_min(-20.0)


def posterior_loss(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pair ||mean - x||^2 plus the Gaussian NLL of x under (detached mean, variance).

    The squared error alone trains the mean (its minimiser is E[x | y]); the variance head's NLL
    sees the mean detached, so a wrong variance cannot pull the mean away from least squares.
    """
    mean, log_var = posterior_moments(output)
    nll = 0.5 * (log_var + (x - mean.detach()).square() * torch.exp(-log_var))
    return ((mean - x).square() + nll).flatten(1).sum(1)


def held_out_loss(operator: Operator, output: torch.Tensor, y: torch.Tensor, state: State,
                  held: torch.Tensor) -> torch.Tensor:
    """Per-observation squared misfit of the held measurements, plus the NLL of their residual as an image.

    As in :func:`posterior_loss`, the mean gets only the squared error; the variance head sees it
    detached, weighted by where the held measurements reach (|A^T(held * A 1)|).
    """
    mean, log_var = posterior_moments(output)
    residual = (operator.forward(mean, state) - y) * held
    image_residual = operator.adjoint(residual.detach(), state)
    reach = operator.adjoint(operator.forward(torch.ones_like(mean), state) * held, state).abs()
    nll = 0.5 * (log_var + image_residual.square() * torch.exp(-log_var)) * reach
    return residual.square().flatten(1).sum(1) + nll.flatten(1).sum(1)


def encoder_inputs(operator: Operator, y: torch.Tensor, state: State, image_shape: tuple[int, ...]) -> torch.Tensor:
    """(A^T y, A^T A 1) stacked on channels: the observation and its sampling pattern, as images."""
    ones = torch.ones((len(y), *image_shape), device=y.device, dtype=y.dtype)
    return torch.cat([operator.adjoint(y, state), operator.adjoint(operator.forward(ones, state), state)], dim=1)


def fit_encoder(
    generate,
    operator: Operator,
    image_shape: tuple[int, ...],
    y: torch.Tensor,
    state: State,
    config: EncoderConfig,
    *,
    prior_weight: float,
    sigma_floor: float,
    progress: bool = False,
) -> tuple[AmortisedEncoder, list[float]]:
    """Fit an encoder on observations ``y`` (N, *observation shape) with their ``state``.

    ``generate(eps, n)`` is the frozen generator G on ``n`` latents (it draws its own input state);
    its parameters get no gradient. Minibatches are drawn with replacement from the first
    ``config.max_observations`` rows: their observations and states (target "latent"; target "image"
    fitted on observations, split into input and held-out measurements afresh at every draw), or only
    their states, under fresh generator images and fresh measurement noise (target "image" fitted on
    the generator's samples; :meth:`EncoderConfig.image_pairs`).
    Returns the encoder (in eval mode) and the loss per step, per observation, so a caller can
    show that the fit converged.
    """
    device = y.device
    n = min(len(y), config.max_observations)
    y, state = y[:n], {k: v[:n] for k, v in state.items()}
    torch.manual_seed(config.seed)  # the encoder's initial weights
    encoder = AmortisedEncoder(image_shape[0], config.width, config.target).to(device)
    opt = torch.optim.Adam(encoder.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / config.steps)))
    rng = torch.Generator(device=device).manual_seed(config.seed)
    inv_two_s2 = 1.0 / (2.0 * max(operator.sigma_n, sigma_floor) ** 2)
    pairs = config.image_pairs(operator) if config.target == "image" else None
    strength = config.split_strength(operator) if pairs == "observations" else None
    splitter = operator if strength is None else operator.with_further(strength)
    losses = []
    # a bar on a terminal, a plain line every 30 s in logs: a fit takes minutes on a CPU
    report = TrainingProgress("fit restorer", 0, config.steps, min(config.batch_size, n), None, enabled=progress)
    for step in range(config.steps):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=rng, device=device)
        state_b = {k: v[idx] for k, v in state.items()}
        if config.target == "latent":
            y_b = y[idx]
            eps = encoder(encoder_inputs(operator, y_b, state_b, image_shape))
            loss = restoration_loss(operator, generate(eps, len(idx)), eps, y_b, state_b, inv_two_s2, prior_weight)
        elif pairs == "observations":
            y_b = y[idx]
            y_in, state_in, held = splitter.split_observation(y_b, state_b, rng, acs_holdout=config.acs_holdout)
            if not losses and not held.any():  # e.g. MRI whose ACS block leaves no line for the further mask to drop
                raise ValueError(f"the further mask of {operator.spec.model_dump()} held out no measurement of "
                                 f"{len(idx)} observations: nothing to fit on; use fit_on 'generator'")
            if config.score_on == "all":
                held = state_b["mask"].to(y_b.dtype)
            output = encoder(encoder_inputs(operator, y_in, state_in, image_shape),
                             detach_variance=config.detach_variance is not False)
            loss = held_out_loss(operator, output, y_b, state_b, held)
        else:
            with torch.no_grad():
                x = generate(torch.randn((len(idx), *image_shape), generator=rng, device=device), len(idx))
                y_b = operator.observe(x, state_b, rng)
            output = encoder(encoder_inputs(operator, y_b, state_b, image_shape),
                             detach_variance=bool(config.detach_variance))
            loss = posterior_loss(output, x)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        report.update(step + 1, {"loss": losses[-1]}, last=step + 1 == config.steps)
    report.close()
    return encoder.eval(), losses


def restoration_loss(operator: Operator, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, state: State,
                     inv_two_s2: float, prior_weight: float) -> torch.Tensor:
    """Per-observation ||A(x) - y||^2 / (2 s^2) + prior_weight * ||eps||^2 / 2, x = G(eps)."""
    misfit = (operator.forward(x, state) - y).square().flatten(1).sum(1)
    return misfit * inv_two_s2 + 0.5 * prior_weight * eps.square().flatten(1).sum(1)


def save_encoder(encoder: AmortisedEncoder, path: str | Path, meta: dict) -> Path:
    """safetensors with the architecture and ``meta`` (what it was fitted on) in its header."""
    header = {"format": _FORMAT, "channels": str(encoder.channels), "width": str(encoder.width),
              "target": encoder.target,
              "meta": json.dumps(meta, sort_keys=True)}
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(path), header)
    return Path(path)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[AmortisedEncoder, dict]:
    """An encoder written by :func:`save_encoder` (no pickle) and its ``meta``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a restorer network (posterior-mean network or latent encoder) written by rsd "
                         f"(header format {header.get('format')!r})")
    # Files written before the image target existed hold latent encoders.
    encoder = AmortisedEncoder(int(header["channels"]), int(header["width"]), header.get("target", "latent"))
    encoder.load_state_dict(load_file(str(path)))
    return encoder.to(device).eval(), json.loads(header["meta"])
