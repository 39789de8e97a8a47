"""Restoring a data team's own observations y = A(x) + sigma_n * eps, with their per-sample operator state.

:class:`RestoreConfig` says how; :func:`restore_observations` runs the estimators that go through the operator's
own forward model, so any kind (MRI included) restores without kind-specific code: a posterior-mean network
(rsd_core.restore.encoder, target "image") fitted on the observations themselves or on the generator's samples,
one pass per observation; or the generator inverted over its latent, by a latent encoder and/or Adam steps, over
restarts. Both end with the data-consistency projection. Named methods: rsd_core.restore.methods; the choices
and their evidence: docs/algorithms.md §10.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from rsd_core.config import Spec
from rsd_core.operators import Operator, State
from rsd_core.restore.encoder import (
    AmortisedEncoder,
    EncoderConfig,
    encoder_inputs,
    fit_encoder,
    posterior_moments,
    restoration_loss,
)
from rsd_core.restore.least_squares import CG_ITERS, lambda_by_held_out, solve_normal
from rsd_core.stages import load_model
from rsd_core.train.sampling import OneStepSampler

# Conjugate-gradient iterations (at most) of the data-consistency projection (least_squares.CG_ITERS).
CONSISTENCY_ITERS = CG_ITERS

# The restoration methods' names, the default first: the built-in ones (rsd_core.restore.methods registers a module
# for each; the configs below name them at import), then any a module registers elsewhere, which is all such a
# method takes.
METHOD_NAMES: list[str] = ["posterior-net", "latent", "dps", "classical", "projection"]
# The target of the network a method fits for the dataset first; methods not named here fit none.
METHOD_ENCODER_TARGET = {"posterior-net": "image", "latent": "latent"}


class RestoreConfig(Spec):
    """How observations are restored; the defaults restore a whole dataset (docs/algorithms.md §10.1).

    By default a posterior-mean network (:mod:`rsd_core.restore.encoder`, target "image") is fitted first: on
    the observations themselves, corrupted further (Ambient self-supervision), where the operator has a
    further mask (inpainting, MRI), else on the generator's samples seen through the operator with the
    observations' states (``encoder.fit_on``); each observation then costs one pass of it (mean and
    spread; no generator pass). With
    ``encoder.target`` "latent" a latent encoder starts ``restarts`` latents per observation, one
    generator pass each; ``steps`` adds Adam steps on them, and with ``encoder`` None they start from
    noise (:data:`LATENT_OPTIMISATION`, for a handful of observations without a dataset to fit on,
    e.g. one serving request).

    ``method`` names what restores (:mod:`rsd_core.restore.methods`): ``posterior-net`` (the image-target
    network above), ``latent`` (a latent encoder, or latent optimisation with ``encoder`` None), ``dps``
    (the teacher's posterior samples, ``restarts`` of them), ``classical`` (the kind's estimate without a
    learnt prior, projected onto the measurements with ``data_consistency``) or ``projection`` (that
    projection alone, from a zero image). Configs written before the field existed name their method by
    ``encoder`` alone, so where ``method`` is not given it is read from there; where ``encoder`` is not given it
    is the method's own (its target, or none).
    """

    method: str = "posterior-net"
    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=0.3, gt=0)
    # Latents per observation of the latent paths (None: LATENT_RESTARTS); the posterior-mean network has none.
    restarts: int | None = Field(default=None, ge=1)
    prior_weight: float = Field(default=0.1, ge=0)
    # The misfit's noise scale for noiseless data: without a floor the prior would carry no weight.
    sigma_floor: float = Field(default=0.05, gt=0)
    # Project onto the measurements (noiseless data); a network fitted on observations always is (encoder.py).
    data_consistency: bool = True
    consistency_iters: int = Field(default=CONSISTENCY_ITERS, ge=1)
    # Noisy pointwise observations (masked pixels with sigma_n > 0) restored by a network fitted on them: the
    # further-mask draws over which each measured value is predicted from the others and shrunk toward that
    # prediction (held_out_measurements); 0 puts the noisy measurements back as they are.
    held_out_passes: int = Field(default=16, ge=0)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0
    encoder: EncoderConfig | None = Field(default_factory=EncoderConfig)

    @model_validator(mode="before")
    @classmethod
    def _method_and_encoder(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "method" not in data:
            encoder = data.get("encoder", {})
            target = (encoder.get("target") if isinstance(encoder, dict)
                      else "latent" if encoder is None else encoder.target)
            return {**data, "method": "latent" if target == "latent" else "posterior-net"}
        target = METHOD_ENCODER_TARGET.get(data["method"])
        if "encoder" not in data:
            return {**data, "encoder": None if target is None else {"target": target}}
        if isinstance(data["encoder"], dict) and target is not None and "target" not in data["encoder"]:
            return {**data, "encoder": {**data["encoder"], "target": target}}
        return data

    @model_validator(mode="after")
    def _something_to_do(self) -> RestoreConfig:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown restoration method {self.method!r}: choose one of {', '.join(METHOD_NAMES)}")
        target = METHOD_ENCODER_TARGET.get(self.method)
        if target is None and self.encoder is not None:
            raise ValueError(f"method {self.method!r} fits no network for the dataset: drop encoder")
        if target == "image" and self.encoder is None:
            raise ValueError("method 'posterior-net' restores with the posterior-mean network fitted for the dataset: "
                             "set encoder (or method 'latent' for latent optimisation from noise)")
        if self.encoder is not None and self.encoder.target != target:
            raise ValueError(f"method {self.method!r} fits a network of target {target!r}, not encoder.target "
                             f"{self.encoder.target!r}: drop encoder.target or set method "
                             f"{'latent' if self.encoder.target == 'latent' else 'posterior-net'!r}")
        if self.steps == 0 and self.method == "latent" and self.encoder is None:
            raise ValueError("steps 0 restores nothing without an encoder: set encoder (or steps >= 1)")
        if self.steps and self.encoder is not None and self.encoder.target == "image":
            raise ValueError("steps refine G's latent, which an encoder with target 'image' does not give: "
                             "set steps 0 or encoder.target 'latent'")
        if self.restarts is not None and self.encoder is not None and self.encoder.target == "image":
            raise ValueError("restarts are latents of G, which an encoder with target 'image' does not use "
                             "(it gives the mean and spread in one pass): drop restarts or set encoder.target "
                             "'latent'")
        return self

    def updated(self, **changes: Any) -> Self:
        """As :meth:`Spec.updated`, but a change of ``encoder`` alone reads the method from it again, and a change
        of ``method`` alone gives the new method its own encoder: the two name one choice, and a copy that kept
        the other one would contradict itself."""
        base = self.model_dump()
        if "encoder" in changes and "method" not in changes:
            del base["method"]
        if changes.get("method", self.method) != self.method and "encoder" not in changes:
            del base["encoder"]
        return type(self).model_validate({**base, **changes})

    @property
    def latent_restarts(self) -> int:
        """Restarts of the latent paths: ``restarts``, or :data:`LATENT_RESTARTS` when unset."""
        return self.restarts or LATENT_RESTARTS


# Restarts averaged per observation on the latent paths: their mean estimates the posterior mean
# (docs/algorithms.md §10.1).
LATENT_RESTARTS = 4


# Latent optimisation from noise, with the settings tuned in docs/algorithms.md §10.1.
LATENT_OPTIMISATION = RestoreConfig(steps=30, restarts=LATENT_RESTARTS, encoder=None)


@dataclass
class Restoration:
    """Per-observation posterior-mean estimate and per-pixel std over restarts, both (N, C, H, W); methods without
    a posterior (the classical estimate, the projection) give no spread."""

    mean: torch.Tensor
    spread: torch.Tensor | None


def check_observations(operator: Operator, image_shape: tuple[int, ...], y: torch.Tensor, state: State) -> None:
    """One-line errors for observations that do not fit the model (before any work is done)."""
    expected = (len(y), *operator.observation_shape(tuple(image_shape)))
    if tuple(y.shape) != expected:
        raise ValueError(f"observations of shape {tuple(y.shape)} do not fit a {operator.spec.kind} model of "
                         f"images {tuple(image_shape)}: expected {expected}")
    missing = [k for k in operator.state_keys if k not in state]
    if missing:
        raise ValueError(f"{operator.spec.kind} observations need their state {missing} (stored with the dataset)")
    short = [k for k in operator.state_keys if len(state[k]) != len(y)]
    if short:
        raise ValueError(f"state {short} has not one row per observation ({len(y)})")


def data_consistency(operator: Operator, x: torch.Tensor, y: torch.Tensor, state: State,
                     iters: int = CONSISTENCY_ITERS, keep_noise: bool = False) -> torch.Tensor:
    """x + A^+(y - A(x)) for noiseless data: the nearest image to x that reproduces y; x for noisy data
    unless ``keep_noise``. Where the forward model is itself an estimate (coil maps estimated per scan) the
    correction is regularised by the weight each observation's held-out measurements choose
    (:func:`rsd_core.restore.least_squares.lambda_by_held_out`).

    The correction is the minimum-norm solution of A(d) = y - A(x) (conjugate gradient on the normal
    map, :func:`rsd_core.restore.least_squares.solve_normal`), so x is kept wherever the measurements say
    nothing (the null space of A) and replaced by the measurements where they do. For inpainting
    (measured pixels kept) and super-resolution (block means kept) one iteration is exact; for
    multi-coil MRI, where the coils jointly determine most of the image, it is a SENSE solve for the
    residual. With sigma_n > 0 a projection would put the measurement noise back, so nothing is done,
    unless ``keep_noise`` asks for the measurements as they are (a network fitted on held-out
    measurements has no better estimate of the ones it was given).
    """
    if operator.sigma_n > 0 and not keep_noise:
        return x
    lam = lambda_by_held_out(operator, y, state, iters) if operator.estimated_model else 0.0
    return x + solve_normal(operator, y - operator.forward(x, state), state, lam, iters)


def held_out_measurements(encoder: AmortisedEncoder, operator: Operator, y: torch.Tensor, state: State,
                          image_shape: tuple[int, ...], rng: torch.Generator, passes: int) -> torch.Tensor:
    """Noisy pointwise measurements shrunk toward what the network predicts of each from the others.

    A network fitted on observations predicts a held-out measurement from y~ with mean m and variance
    v_net = Var[x | y~] + sigma_n^2 (it is scored against noisy values). Over ``passes`` further-mask draws, every
    measurement held out at least once gets m and v = v_net - sigma_n^2 averaged over the draws that held it; with
    its own value y it becomes (v y + sigma_n^2 m) / (v + sigma_n^2), the Gaussian posterior mean of x given y~ and
    y: the value never enters its own prediction (J-invariance, Batson & Royer 2019), so the noise is not pasted
    back. Measurements never held out keep y."""
    s2 = operator.sigma_n**2
    total, variance, count = (torch.zeros_like(y) for _ in range(3))
    with torch.no_grad():
        for _ in range(passes):
            y_in, state_in, held = operator.split_observation(y, state, rng)
            mean, log_var = posterior_moments(encoder(encoder_inputs(operator, y_in, state_in, image_shape)))
            held = held.expand_as(y)
            total += held * operator.forward(mean, state)
            variance += held * operator.forward(log_var.exp(), state)
            count += held
    seen = count > 0
    prediction, v = total / count.clamp_min(1), (variance / count.clamp_min(1) - s2).clamp_min(1e-6)
    return torch.where(seen, (v * y + s2 * prediction) / (v + s2), y)


def _repeat(state: State, times: int) -> State:
    return {k: v.repeat_interleave(times, dim=0) for k, v in state.items()}


def generator_fn(generator: OneStepSampler, rng: torch.Generator):
    """G as a function of (eps, n): the generator at latents eps with a fresh input state per call."""

    def generate(eps: torch.Tensor, n: int) -> torch.Tensor:
        return generator.decode(eps, generator.objective.draw_input_state(n, generator.shape, rng, eps.device))

    return generate


def _restore_batch(
    generator: OneStepSampler,
    y: torch.Tensor,
    state: State,
    config: RestoreConfig,
    rng: torch.Generator,
    encoder: AmortisedEncoder | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, spread) of one batch, each (B, C, H, W).

    An image-target encoder gives both in one pass (its posterior mean and std). Otherwise R
    restarts are optimised together as B * R latents and averaged: without an encoder every restart
    starts at eps ~ N(0, I); with one, restart 0 starts at E(y) and the others at E(y) + jitter * N(0, I).
    """
    operator, image_shape = generator.objective.operator, generator.shape
    if encoder is not None and encoder.target == "image":
        with torch.no_grad():
            mean, log_var = posterior_moments(encoder(encoder_inputs(operator, y, state, image_shape)))
            # Fitted on observations, the network was scored only on measurements its input lacked: its own
            # output on the ones it is given is arbitrary, so the measurements are always put back (noisy pointwise
            # ones first shrunk toward its prediction of each from the others).
            on_observations = config.encoder.image_pairs(operator) == "observations"
            measured = y
            if on_observations and operator.sigma_n > 0 and operator.pointwise and config.held_out_passes:
                measured = held_out_measurements(encoder, operator, y, state, image_shape, rng,
                                                 config.held_out_passes)
            if config.data_consistency or on_observations:
                mean = data_consistency(operator, mean, measured, state, config.consistency_iters,
                                        keep_noise=on_observations)
        return mean.clamp(-1.0, 1.0), torch.exp(0.5 * log_var)
    b, r = len(y), config.latent_restarts
    device = y.device
    y_r, state_r = y.repeat_interleave(r, dim=0), _repeat(state, r)
    noise = torch.randn((b * r, *image_shape), generator=rng, device=device)
    input_state = generator.objective.draw_input_state(b * r, image_shape, rng, device)
    inv_two_s2 = 1.0 / (2.0 * max(operator.sigma_n, config.sigma_floor) ** 2)
    if encoder is None:
        eps = noise
    else:
        with torch.no_grad():
            start = encoder(encoder_inputs(operator, y, state, image_shape)).repeat_interleave(r, dim=0)
        jitter = torch.full((b, r), config.encoder.jitter, device=device)
        jitter[:, 0] = 0.0
        eps = start + jitter.view(b * r, *[1] * len(image_shape)) * noise

    def generate(latent: torch.Tensor) -> torch.Tensor:
        return generator.decode(latent, input_state)

    if config.steps:
        eps.requires_grad_(True)
        opt = torch.optim.Adam([eps], lr=config.lr)
        # Cosine decay to zero: the last steps settle instead of oscillating at the initial step size.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / config.steps)))
        with torch.enable_grad():
            for _ in range(config.steps):
                loss = restoration_loss(operator, generate(eps), eps, y_r, state_r, inv_two_s2,
                                        config.prior_weight).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        x = generate(eps)
        if config.data_consistency:
            x = data_consistency(operator, x, y_r, state_r, config.consistency_iters)
        x = x.clamp(-1.0, 1.0).view(b, r, *x.shape[1:])
        return x.mean(dim=1), x.std(dim=1, unbiased=False)


def restore_observations(
    generator: OneStepSampler,
    y: torch.Tensor,
    state: State,
    config: RestoreConfig,
    progress: bool = False,
    encoder: AmortisedEncoder | None = None,
) -> Restoration:
    """Restore observations ``y`` (N, *observation shape) with their per-sample ``state``.

    ``generator`` (G(eps) = D(sigma_init * eps; sigma_init), e.g. from :func:`load_generator`)
    is evaluated on the device of its network, where y and state are moved.
    ``config.batch_size`` observations are processed together (times ``config.latent_restarts`` latents on the
    latent paths).
    Results are deterministic for a given seed and batch size and come back on the CPU.
    ``encoder`` (fitted by :func:`fit_restore_encoder`) is required exactly when ``config.encoder`` is set.
    """
    check_observations(generator.objective.operator, generator.shape, y, state)
    if (encoder is None) != (config.encoder is None):
        raise ValueError("config.encoder is set but no fitted encoder was given" if encoder is None
                         else "a fitted encoder was given but config.encoder is not set")
    if encoder is not None and encoder.target != config.encoder.target:
        raise ValueError(f"the fitted encoder has target {encoder.target!r} but config.encoder.target is "
                         f"{config.encoder.target!r}")
    device = generator.device
    rng = torch.Generator(device=device).manual_seed(config.seed)
    means, spreads = [], []
    starts = range(0, len(y), config.batch_size)
    for start in tqdm(starts, desc="restore", disable=not progress):
        stop = start + config.batch_size
        y_b = y[start:stop].to(device=device, dtype=torch.float32)
        state_b = {k: v[start:stop].to(device) for k, v in state.items()}
        mean, spread = _restore_batch(generator, y_b, state_b, config, rng, encoder)
        means.append(mean.cpu())
        spreads.append(spread.cpu())
    return Restoration(mean=torch.cat(means), spread=torch.cat(spreads))


def fit_restore_encoder(
    generator: OneStepSampler,
    y: torch.Tensor,
    state: State,
    config: RestoreConfig,
    progress: bool = False,
) -> tuple[AmortisedEncoder, list[float]]:
    """Fit ``config.encoder`` on observations ``y`` with the restoration's own objective (G frozen)."""
    if config.encoder is None:
        raise ValueError("config.encoder is not set: nothing to fit")
    operator, device = generator.objective.operator, generator.device
    check_observations(operator, generator.shape, y, state)
    frozen = [p for p in generator.net.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        generate = generator_fn(generator, torch.Generator(device=device).manual_seed(config.encoder.seed + 1))
        return fit_encoder(generate, operator, generator.shape, y.to(device=device, dtype=torch.float32),
                           {k: v.to(device) for k, v in state.items()}, config.encoder,
                           prior_weight=config.prior_weight, sigma_floor=config.sigma_floor, progress=progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu") -> OneStepSampler:
    """The one-step generator of a saved model folder (``model.json`` + ``model.safetensors``)."""
    net, objective, card = load_model(model_dir, device)
    if card.kind != "generator":
        raise ValueError(f"{model_dir} holds a {card.kind}; restoration needs a one-step generator "
                         "(the teacher's posterior sampler is rsd_core.restore.posterior)")
    return OneStepSampler(net, objective, tuple(card.image_shape), card.sigma_init)

