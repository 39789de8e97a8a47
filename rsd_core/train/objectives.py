"""Corruption-aware pretraining objectives, and how each one's networks are queried.

The operator registry (:mod:`rsd_core.kinds`, through ``objective_for``) maps an operator to
its objective; the teacher, the fake score in distillation and the samplers all
go through the same :class:`Objective`, which is how the "same objective family" rule of RSD
(docs/algorithms.md) is kept by construction.

An objective knows three things:
- ``loss(net, y, state)``: the per-sample training loss on observations y with operator state;
- ``draw_input_state`` / ``denoise``: how a network is evaluated on a noisy image at level
  sigma (with which mask or projection), used by the samplers, the generator G(z) and the
  scoring in the generator step;
- ``measure``: what the generator step compares (A(x_g), or x_g where the input mask or
  projection already plays the role of A).
All losses are summed over pixels per sample (the EDM convention); callers average over batch.
"""

from __future__ import annotations

import torch

from rsd_core.operators import Inpaint, Operator, State
from rsd_core.operators.mri import MRI
from rsd_core.train.input_laws import InpaintLaw, InputLaw, MRILaw

P_MEAN = -1.2
P_STD = 1.2


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class Objective:
    """Standard EDM denoising loss on the observations y (noiseless A)."""

    name = "edm"

    def __init__(self, operator: Operator, P_mean: float = P_MEAN, P_std: float = P_STD, sigma_data: float = 0.5,
                 heldout_sigma_floor: float = 0.0):
        self.operator = operator
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        # Read by the Ambient objectives only: see heldout_floored.
        self.heldout_sigma_floor = heldout_sigma_floor

    def cond_channels(self, shape: tuple[int, ...]) -> int:
        """Extra network input channels (features, for vectors) for data of ``shape``."""
        return 0

    def sample_sigma(self, batch: int, rng: torch.Generator | None, device) -> torch.Tensor:
        """ln sigma ~ N(P_mean, P_std^2)."""
        rnd = torch.randn(batch, generator=rng, device=device)
        return torch.exp(self.P_mean + self.P_std * rnd)

    def draw_input_state(self, batch: int, shape: tuple[int, ...], rng, device) -> State:
        """State that fixes how the network sees its input and how a generated image is measured: for the
        standard objective the network sees no state, and the operator's own state (per-sample shifts, say;
        none for blur or down-sampling) measures."""
        return self.operator.sample_state(batch, shape, rng, device) if self.operator.state_keys else {}

    def input_law(self, image_shape: tuple[int, ...]) -> InputLaw:
        """What the generator's network sees of :meth:`draw_input_state`, as a pure function of U[0, 1) inputs,
        for an exported generator: nothing, for the standard objective."""
        return InputLaw()

    def denoise(self, net, x: torch.Tensor, sigma, input_state: State) -> torch.Tensor:
        """The x0 prediction of ``net`` for a noisy image ``x`` at level ``sigma``."""
        return net(x, sigma)

    def measure(self, x: torch.Tensor, input_state: State) -> torch.Tensor:
        """The clean measurement of a generated image that the generator step scores: A(x)."""
        return self.operator.forward(x, input_state)

    def score_mask(self, input_state: State) -> torch.Tensor | None:
        """Where the generator-step loss is evaluated (None = everywhere)."""
        return None

    def heldout_floored(self, sigma: torch.Tensor, observed: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """An Ambient loss from its squared errors on every observation (A) and on those the network saw (A~).

        The held-out observations (in A, not in A~) are hidden from the network, so their error does not shrink
        with sigma, and EDM's weight lambda(sigma) ~ 1/sigma^2 lets a few low-sigma draws dominate a batch's
        gradient. Below ``heldout_sigma_floor`` they keep the weight lambda_h = lambda(floor):
        lambda_h ||e_A||^2 + (lambda - lambda_h) ||e_A~||^2, both weights >= 0, so the loss stays a positive
        quadratic in the prediction (also where the two errors are not orthogonal, as in multi-coil k-space),
        and with orthogonal errors (pixels) it is lambda on A~ plus lambda_h on the held-out rest. Every weight
        is a function of sigma and A~, which the network is given: the minimiser is still E[x0 | A~ x_t, A~].
        Floor 0 is EDM's lambda ||e_A||^2."""
        weight = edm_weight(sigma, self.sigma_data)
        heldout_weight = edm_weight(sigma.clamp_min(self.heldout_sigma_floor), self.sigma_data)
        return heldout_weight * observed + (weight - heldout_weight) * seen

    def loss(self, net, y: torch.Tensor, state: State, rng: torch.Generator | None = None) -> torch.Tensor:
        sigma = self.sample_sigma(y.shape[0], rng, y.device)
        n = torch.randn(y.shape, generator=rng, device=y.device, dtype=y.dtype)
        D = net(y + _bcast(sigma, y) * n, sigma)
        return edm_weight(sigma, self.sigma_data) * _per_sample_sum((D - y) ** 2)


class AmbientTweedieObjective(Objective):
    """Noisy data y = A x + sigma_n eps: learn E[A x | y_t] for sigma_t >= sigma_n (Daras et al. 2024).

    Only the *extra* noise sqrt(sigma_t^2 - sigma_n^2) is added; the x0 prediction h is mapped to
    a prediction of y by (1 - sigma_n^2/sigma_t^2) h + (sigma_n^2/sigma_t^2) y_t.
    ``sigma_t = max(lognormal, sigma_n)`` as in the reference code: clamped samples carry no gradient.
    """

    name = "ambient_tweedie"

    def loss(self, net, y, state, rng=None):
        sigma_n = self.operator.sigma_n
        sigma = self.sample_sigma(y.shape[0], rng, y.device).clamp_min(sigma_n)
        extra = torch.sqrt((sigma**2 - sigma_n**2).clamp_min(0.0))
        n = torch.randn(y.shape, generator=rng, device=y.device, dtype=y.dtype)
        y_t = y + _bcast(extra, y) * n
        h = net(y_t, sigma)
        ratio = _bcast(sigma_n**2 / sigma**2, y)
        y_pred = (1 - ratio) * h + ratio * y_t
        return edm_weight(sigma, self.sigma_data) * _per_sample_sum((y_pred - y) ** 2)


class AmbientDiffusionObjective(Objective):
    """Random inpainting (Daras et al. 2023): input [A~ x_t, A~], loss masked by A.

    The minimiser is E[x0 | A~ x_t, A~]. The network is always evaluated on a masked image
    with its mask as conditioning, so the samplers and the generator carry an input mask with
    survival (1 - p)(1 - delta), and the generator step scores only visible pixels.
    """

    name = "ambient_diffusion"
    operator: Inpaint

    def cond_channels(self, shape):
        return 1 if len(shape) == 3 else shape[0]

    def draw_input_state(self, batch, shape, rng, device):
        return {"mask": self.operator.input_mask(batch, shape, rng, device)}

    def input_law(self, image_shape):
        return InpaintLaw(self.operator, image_shape)

    def denoise(self, net, x, sigma, input_state):
        mask = input_state["mask"].to(x.dtype)
        return net(mask * x, sigma, mask.expand_as(x[:, :1]) if x.ndim == 4 else mask)

    def measure(self, x, input_state):
        return x

    def score_mask(self, input_state):
        return input_state["mask"]

    def loss(self, net, y, state, rng=None, loss_mask: str = "observed"):
        """``loss_mask`` "further" takes the loss on A~'s pixels only (the RSD reference's fake-score
        train_loss, DistillConfig.fake_loss_mask): the network is then never asked for a pixel it did not see."""
        mask = state["mask"].to(y.dtype)
        further = self.operator.further_mask(mask, rng)
        sigma = self.sample_sigma(y.shape[0], rng, y.device)
        n = torch.randn(y.shape, generator=rng, device=y.device, dtype=y.dtype)
        h = self.denoise(net, y + _bcast(sigma, y) * n, sigma, {"mask": further})
        err = (h - y) ** 2
        seen = _per_sample_sum(further.to(y.dtype) * err)
        if loss_mask == "further":
            return edm_weight(sigma, self.sigma_data) * seen
        return self.heldout_floored(sigma, _per_sample_sum(mask * err), seen)


class FourierAmbientObjective(Objective):
    """Multi-coil MRI (Aali et al.; RSD mri/): input [P_M~(x_t), M~, 1], loss ||P_M (h - x0)||^2.

    Only P_M x0 = A_M^H y and P_M~ x0 = A_M~^H (M~ y) are needed, both computable from the
    measured k-space y because M~ is a subset of M; noise is added in the image domain
    *before* projecting. Observations y are k-space; images are 2-channel complex.
    """

    name = "fourier_ambient"
    operator: MRI

    def cond_channels(self, shape):
        return 2

    def draw_input_state(self, batch, shape, rng, device):
        state = self.operator.sample_state(batch, shape, rng, device)
        return {**state, "mask": self.operator.further_mask(state["mask"], rng)}

    def input_law(self, image_shape):
        return MRILaw(self.operator, image_shape)

    def _cond(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype).expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return torch.cat([m, torch.ones_like(m)], dim=1)

    def denoise(self, net, x, sigma, input_state):
        u = self.operator.normal(x, input_state)
        return net(u, sigma, self._cond(x, input_state["mask"]))

    def measure(self, x, input_state):
        return x

    def loss(self, net, y, state, rng=None, loss_mask: str = "observed"):
        """``loss_mask`` "further" compares P_M~ h with P_M~ x0 instead (the RSD MRI reference's fake-score
        train_loss, DistillConfig.fake_loss_mask)."""
        op = self.operator
        further_state = {**state, "mask": op.further_mask(state["mask"], rng)}
        x0_acq = op.adjoint(y, state)  # P_M x0
        x0_further = op.adjoint(y, further_state)  # P_M~ x0 (mask re-applied inside the adjoint)
        sigma = self.sample_sigma(y.shape[0], rng, y.device)
        n = torch.randn(x0_acq.shape, generator=rng, device=y.device, dtype=x0_acq.dtype)
        u = x0_further + _bcast(sigma, n) * op.normal(n, further_state)
        h = net(u, sigma, self._cond(u, further_state["mask"]))

        def squared_error(on: State, target: torch.Tensor) -> torch.Tensor:
            return _per_sample_sum((op.normal(h, on) - target) ** 2)

        if loss_mask == "further":
            return edm_weight(sigma, self.sigma_data) * squared_error(further_state, x0_further)
        observed = squared_error(state, x0_acq)
        if not self.heldout_sigma_floor:  # EDM's weight everywhere: the seen part's error is not needed
            return edm_weight(sigma, self.sigma_data) * observed
        return self.heldout_floored(sigma, observed, squared_error(further_state, x0_further))
