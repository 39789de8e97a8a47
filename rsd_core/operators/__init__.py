"""Corruption operators y = A(x) + sigma_n * eps.

Every operator works on batches of images in [-1, 1] with shape (B, C, H, W). Where A varies
per sample (inpainting masks, MRI masks and coil maps) the variation lives in an explicit
*state* dict of tensors with leading batch dimension, drawn by :meth:`Operator.sample_state`
from a caller-owned ``torch.Generator``; the dataset stores that state next to each
observation, and distillation draws fresh state at every step. ``forward`` is differentiable
and adds no noise; ``observe`` adds the measurement noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from rsd_core.operators.spec import OperatorSpecBase

State = dict[str, torch.Tensor]
# Observed states an operator with ``pool_keys`` keeps (its dataset's first rows): enough scans for a
# varied draw, small enough to save with every model.
POOL_SIZE = 128


def parse_operator_spec(data: dict) -> OperatorSpecBase:
    """Validate a plain dict (from JSON/YAML/CLI) into the spec of its registered ``kind``."""
    return OperatorSpecBase.model_validate(data)


class Operator:
    """Base class: a (possibly per-sample) forward model with Gaussian measurement noise."""

    linear: bool = True
    state_keys: tuple[str, ...] = ()
    # Measurements selected by a 0/1 state "mask" with a further_mask (Ambient Diffusion's A~ = B A): such
    # observations can be split into a network input and held-out measurements (split_observation).
    splits_observations: bool = False
    # The spec field that sets the further mask's strength (inpainting: delta; MRI: delta_R), if any.
    further_field: str | None = None
    # The strength (a value of further_field) a restorer fitted on observations splits them with where its fit
    # does not say; None: the operator's own, the teacher's. Chosen per operator on validation images
    # (docs/results.md, "Which split chose what").
    restorer_further: float | None = None
    # The forward model is itself an estimate (coil maps estimated per scan): exact inversion would amplify its
    # error, so least squares and data consistency take the weight held-out measurements choose.
    estimated_model: bool = False
    # Each measurement is one pixel of the image (a 0/1 mask): the image's per-pixel variance is the
    # measurements' own, so a measured value can be weighed against a prediction of it pixel by pixel.
    pointwise: bool = False

    # State keys an operator draws fresh values of from observed data rather than from a law of its own
    # (per-scan coil maps): such an operator needs a pool of observed states (attach_pool), taken from
    # its dataset and saved with every model trained on it. Empty: the operator's law is its own.
    pool_keys: tuple[str, ...] = ()

    def __init__(self, spec: OperatorSpecBase):
        self.spec = spec
        self.sigma_n = float(spec.sigma_n)
        self.pool: State | None = None

    def with_further(self, value: float) -> Operator:
        """This operator with its further mask's strength (``further_field``) set to ``value``: a split of
        another strength, validated as the spec validates it."""
        if self.further_field is None:
            raise ValueError(f"{type(self).__name__} has no further mask whose strength could be set")
        spec = type(self.spec).model_validate({**self.spec.model_dump(), self.further_field: value})
        return type(self)(spec)

    def attach_pool(self, state: State) -> None:
        """Keep observed states (the ``pool_keys`` of up to :data:`POOL_SIZE` rows) to draw fresh ones from."""
        missing = [k for k in self.pool_keys if k not in state]
        if missing:
            raise ValueError(f"a state pool for operator '{self.spec.kind}' needs {missing}")
        self.pool = {k: state[k][:POOL_SIZE].detach().cpu().contiguous() for k in self.pool_keys}

    def state_shapes(self, image_shape: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape (without the batch axis) and dtype of each per-sample state tensor for such images."""
        drawn = self.sample_state(1, tuple(image_shape), torch.Generator().manual_seed(0))
        return {key: (tuple(value.shape[1:]), value.dtype) for key, value in drawn.items()}

    def observation_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Shape (C, H, W) of one observation of an image of ``image_shape``."""
        return image_shape

    def image_view(self, y: torch.Tensor, state: State) -> torch.Tensor:
        """Observations as images (for grids and Proximal FD features): image-domain operators
        already observe images; operators that measure elsewhere override this."""
        return y

    def first_invalid(self, y: torch.Tensor, state: State, atol: float) -> tuple[int, str] | None:
        """The first row of imported observations that this operator could not have produced, and
        why (None if all are consistent). ``atol`` allows for uint8 quantisation of image files."""
        return None

    def observation_bound(self, image_shape: Sequence[int], value_range: tuple[float, float]) -> tuple[float, float]:
        """A provable range of noiseless observations of images in ``value_range``: masking,
        blurring and block averaging are convex combinations, so A(x) stays in the image range."""
        return value_range

    def split_observation(
        self, y: torch.Tensor, state: State, rng: torch.Generator | None, acs_holdout: float = 0.0
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """Ambient Diffusion's further corruption applied to the data: (y~, state~, held).

        y~ = A~(x) + noise keeps the measurements of A~ = B A (``further_mask`` of the state's mask), and
        ``held`` (broadcastable to y) is 1 on the measurements of A that y~ lacks. A network fed y~ and
        scored on the held measurements, ||held * (A(R(y~)) - y)||^2, learns E[x | y~] wherever held
        measurements can fall (B is random, so it cannot tell them from the ones A never took), with no
        clean image: the self-supervision of Ambient Diffusion (Daras et al. 2023) at the data's own
        noise level. ``acs_holdout``: the probability that an observation's always-sampled measurements (MRI's
        ACS lines) may be held out too; operators without such measurements refuse a nonzero one.
        """
        if not self.splits_observations:
            raise NotImplementedError(f"{type(self).__name__} observations have no further mask to split by")
        further = self.further_mask(state["mask"], rng, acs_holdout)
        held = (state["mask"] - further).to(y.dtype)
        return y * further.to(y.dtype), {**state, "mask": further}, held

    def sample_state(
        self,
        batch: int,
        image_shape: tuple[int, int, int],
        rng: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> State:
        """Draw per-sample operator state; empty for operators that do not vary."""
        return {}

    def simulation_state(
        self, batch: int, image_shape: tuple[int, int, int], rng: torch.Generator | None = None
    ) -> State:
        """The state a simulated corruption observes through: the operator's own law, unless it has none."""
        return self.sample_state(batch, image_shape, rng)

    def recorded_state(self, y: torch.Tensor, state: State) -> State:
        """The state a dataset stores beside a simulated observation: what the data's owner would know of it."""
        return state

    def simulation_provenance(self) -> dict[str, str]:
        """What a simulated dataset's provenance should say about how its state was made, where it matters."""
        return {}

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        """A^T y, by a vector-Jacobian product of the (linear) forward map."""
        x0 = torch.zeros(
            y.shape[:1] + self._image_shape_for(y), dtype=y.dtype, device=y.device, requires_grad=True
        )
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.forward(x0, state), x0, grad_outputs=y)
        return grad

    def _image_shape_for(self, y: torch.Tensor) -> tuple[int, ...]:
        return tuple(y.shape[1:])

    def noise(self, y: torch.Tensor, rng: torch.Generator | None, state: State) -> torch.Tensor:
        """Measurement noise sigma_n * eps in observation space."""
        if self.sigma_n == 0.0:
            return torch.zeros_like(y)
        eps = torch.randn(y.shape, generator=rng, device=y.device, dtype=y.dtype)
        return self.sigma_n * eps

    def observe(self, x: torch.Tensor, state: State, rng: torch.Generator | None = None) -> torch.Tensor:
        """y = A(x) + sigma_n * eps with fresh noise from ``rng``."""
        y = self.forward(x, state)
        return y + self.noise(y, rng, state)


class IdentitySpec(OperatorSpecBase):
    """A = I: pure denoising (the DSD case)."""

    kind: Literal["identity"] = "identity"


class Identity(Operator):
    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        return y


def rng_device(rng: torch.Generator | None) -> torch.device:
    """Where ``rng`` draws (the CPU's default generator for None): a CUDA generator draws only CUDA tensors."""
    return rng.device if rng is not None else torch.device("cpu")


def lowest(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Bool (B, W): the ``k`` lowest scores of each row (``k`` an int or a (B, 1) tensor of counts)."""
    return scores.argsort(-1).argsort(-1) < k


def bernoulli_mask(
    batch: int,
    shape_hw: tuple[int, ...],
    keep_prob: float,
    rng: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A 0/1 mask, 1 = observed: (B, 1, H, W) for images (shared across channels by
    broadcasting), (B, d) for vectors (``shape_hw`` = (d,))."""
    shape = (batch, 1, *shape_hw) if len(shape_hw) == 2 else (batch, *shape_hw)
    u = torch.rand(shape, generator=rng, device=device)
    return (u < keep_prob).float()


def _mask_shape(image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial shape of a mask: (H, W) for (C, H, W) images, (d,) for vectors."""
    return tuple(image_shape[1:]) if len(image_shape) == 3 else tuple(image_shape)


class InpaintSpec(OperatorSpecBase):
    """Random pixel erasure with probability ``p``, one mask shared across channels.

    ``delta`` is the Ambient Diffusion further-corruption probability: each surviving pixel is
    erased again with probability ``delta`` to form the network's input mask.
    """

    kind: Literal["inpaint"] = "inpaint"
    p: float = Field(0.6, description="erasure probability")
    delta: float = Field(0.1, description="further-corruption probability of the network's input mask")

    @field_validator("p")
    @classmethod
    def _check_p(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"p (erasure probability) must be in [0, 1), got {value}")
        return value

    @field_validator("delta")
    @classmethod
    def _check_delta(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"delta (further-corruption probability) must be in [0, 1), got {value}")
        return value


class Inpaint(Operator):
    """Each pixel erased with probability p (mask broadcast over channels; 1 = observed)."""

    state_keys = ("mask",)
    pointwise = True
    further_field = "delta"
    restorer_further = 0.2  # chosen on validation over the teachers' 0.1 (docs/results.md)

    def __init__(self, spec: InpaintSpec):
        super().__init__(spec)
        self.p = spec.p
        self.delta = spec.delta
        self.splits_observations = self.delta > 0  # delta 0: the further mask is the mask, nothing is held out

    def sample_state(self, batch, image_shape, rng=None, device="cpu") -> State:
        return {"mask": bernoulli_mask(batch, _mask_shape(image_shape), 1.0 - self.p, rng, device)}

    def further_mask(self, mask: torch.Tensor, rng: torch.Generator | None, acs_holdout: float = 0.0) -> torch.Tensor:
        """Ambient Diffusion's A~ = B A: erase each surviving pixel again with probability delta."""
        if acs_holdout:
            raise ValueError(f"acs_holdout {acs_holdout}: inpainting has no always-sampled (ACS) measurements to "
                             "hold out; leave it 0")
        keep = torch.rand(mask.shape, generator=rng, device=mask.device) >= self.delta
        return mask * keep.to(mask.dtype)

    def input_mask(
        self, batch: int, image_shape: tuple[int, int, int], rng: torch.Generator | None, device="cpu"
    ) -> torch.Tensor:
        """A network input mask with survival (1-p)(1-delta), as the fixed-mask sampler uses."""
        keep = (1.0 - self.p) * (1.0 - self.delta)
        return bernoulli_mask(batch, _mask_shape(image_shape), keep, rng, device)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        return x * state["mask"].to(x.dtype)

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        return y * state["mask"].to(y.dtype)

    def first_invalid(self, y, state, atol):
        return mask_errors(y, state["mask"], atol, "the pixel is erased")

    def noise(self, y, rng, state):
        # Erased pixels carry no measurement, hence no noise.
        return super().noise(y, rng, state) * state["mask"].to(y.dtype)


def first_nonbinary(mask: torch.Tensor) -> int | None:
    """Index of the first sample whose mask has a value other than 0 or 1."""
    bad = ((mask != 0) & (mask != 1)).flatten(1).any(1)
    return int(bad.nonzero()[0]) if bad.any() else None


def first_outside_mask(y: torch.Tensor, mask: torch.Tensor, atol: float) -> int | None:
    """Index of the first sample with a measurement where its mask says "not measured"."""
    bad = ((y * (1 - mask.to(y.dtype))).abs() > atol).flatten(1).any(1)
    return int(bad.nonzero()[0]) if bad.any() else None


def mask_errors(y: torch.Tensor, mask: torch.Tensor, atol: float, what: str) -> tuple[int, str] | None:
    if (row := first_nonbinary(mask)) is not None:
        return row, "state 'mask' is not binary (0 = not measured, 1 = measured)"
    if (row := first_outside_mask(y, mask, atol)) is not None:
        return row, f"observation is non-zero where its mask says {what}"
    return None


def gaussian_kernel2d(kernel_size: int, std: float) -> torch.Tensor:
    """Normalised (sum 1) separable Gaussian kernel of odd size."""
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def reflected_gaussian_kernel2d(kernel_size: int, std: float, truncate: float = 4.0) -> torch.Tensor:
    """The RSD / DPS reference blur kernel: a centred delta filtered by ``scipy.ndimage.gaussian_filter``.

    That filter samples a normalised Gaussian out to radius int(truncate * std + 0.5), which for the
    default 9 x 9 kernel of std 2 is wider than the kernel; in its "reflect" boundary mode the taps that
    fall outside fold back onto the kernel's edge (d c b a | a b c d | d c b a), so the outer taps are
    heavier than a sampled Gaussian's. Computed here in closed form (scipy is not needed); separable, sum 1.
    """
    radius = int(truncate * std + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / std) ** 2)
    taps = taps / taps.sum()
    centre, period = kernel_size // 2, 2 * kernel_size
    g = torch.zeros(kernel_size, dtype=torch.float64)
    for j, w in zip(range(-radius, radius + 1), taps.tolist(), strict=True):
        # the delta sits at `centre`; output i reads input i + j, which reflects onto `centre` for one i
        for i in range(kernel_size):
            m = (i + j) % period
            if (m if m < kernel_size else period - 1 - m) == centre:
                g[i] += w
    return torch.outer(g, g).float()


BLUR_KERNELS = {"sampled": gaussian_kernel2d, "scipy-reflect": reflected_gaussian_kernel2d}


class BlurSpec(OperatorSpecBase):
    """Gaussian blur with reflection padding (shape preserving)."""

    kind: Literal["blur"] = "blur"
    kernel_size: int = Field(9, description="odd kernel size")
    std: float = Field(2.0, description="Gaussian width in pixels")
    kernel: Literal["sampled", "scipy-reflect"] = Field(
        "sampled", description="'sampled': a Gaussian sampled on the kernel's support, normalised; 'scipy-reflect': "
        "the RSD reference's (a delta through scipy.ndimage.gaussian_filter, tails folded onto the edge). Datasets "
        "written before this setting existed were made with 'sampled', which is why it stays the default")

    @field_validator("kernel_size")
    @classmethod
    def _check_kernel_size(cls, value: int) -> int:
        if value < 1 or value % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _check_std(cls, value: float) -> float:
        if not value > 0.0:
            raise ValueError(f"std (blur width in pixels) must be > 0, got {value}")
        return value


class Blur(Operator):
    """Depthwise Gaussian blur with reflection padding; the kernel is a frozen constant."""

    def __init__(self, spec: BlurSpec):
        super().__init__(spec)
        self.kernel = BLUR_KERNELS[spec.kernel](spec.kernel_size, spec.std)
        self.pad = spec.kernel_size // 2

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        c = x.shape[1]
        weight = self.kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, *self.kernel.shape)
        if self.pad > 0:
            if self.pad >= min(x.shape[-2:]):
                raise ValueError(
                    f"blur kernel_size {self.kernel.shape[-1]} too large for images of size {tuple(x.shape[-2:])}"
                )
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.conv2d(x, weight, groups=c)


class SuperResSpec(OperatorSpecBase):
    """Down-sampling by ``factor`` (average pooling), kept at full size by nearest up-sampling."""

    kind: Literal["superres"] = "superres"
    factor: int = Field(2, description="down-sampling factor")

    @field_validator("factor")
    @classmethod
    def _check_factor(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"factor (down-sampling factor) must be an integer >= 2, got {value}")
        return value


class SuperRes(Operator):
    """Average-pool by ``factor`` then nearest up-sample: low resolution kept at full size.

    A is a self-adjoint orthogonal projection (block averaging), so A^T = A. Measurement noise
    is white on the full-size grid (the base class's), because the Ambient Tweedie objective that
    noisy super-resolution trains with maps h to E[A x | y_t] by ``(1 - r) h + r y_t``, which holds
    only for white image-domain noise of std sigma_n. Noise drawn on the low-resolution grid and
    up-sampled (one value per f x f block) is coloured and made that objective learn the wrong
    denoiser (tests/test_edm.py checks the least-squares minimiser).
    """

    def __init__(self, spec: SuperResSpec):
        super().__init__(spec)
        self.factor = spec.factor

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"superres factor {self.factor} must divide the image size {(h, w)}")
        low = F.avg_pool2d(x, self.factor)
        return F.interpolate(low, scale_factor=self.factor, mode="nearest")

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        return self.forward(y, state)

    def first_invalid(self, y, state, atol):
        """Noiseless low-resolution observations are constant on each block: A(y) = y."""
        if self.sigma_n > 0:
            return None
        bad = ((self.forward(y, state) - y).abs() > atol).flatten(1).any(1)
        return (int(bad.nonzero()[0]), f"observation is not constant on {self.factor}x{self.factor} blocks") \
            if bad.any() else None
