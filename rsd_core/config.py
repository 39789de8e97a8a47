"""Validated configuration for every stage of RSD.

All configuration enters through these pydantic models, validated once at the edge; the
code below them trusts its inputs. Operator specs are a union discriminated by ``kind`` so a
manifest or YAML file names the corruption and its parameters in one place.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Spec(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_sigma_n(value: float) -> float:
    if not value >= 0.0:
        raise ValueError(f"sigma_n must be >= 0 (noise std on the [-1, 1] scale), got {value}")
    return value


class IdentitySpec(Spec):
    """A = I: pure denoising (the DSD case)."""

    kind: Literal["identity"] = "identity"
    sigma_n: float = 0.0

    _sigma = field_validator("sigma_n")(_check_sigma_n)


class InpaintSpec(Spec):
    """Random pixel erasure with probability ``p``, one mask shared across channels.

    ``delta`` is the Ambient Diffusion further-corruption probability: each surviving pixel is
    erased again with probability ``delta`` to form the network's input mask.
    """

    kind: Literal["inpaint"] = "inpaint"
    p: float = 0.6
    delta: float = 0.1
    sigma_n: float = 0.0

    _sigma = field_validator("sigma_n")(_check_sigma_n)

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


class BlurSpec(Spec):
    """Gaussian blur with reflection padding (shape preserving)."""

    kind: Literal["blur"] = "blur"
    kernel_size: int = 9
    std: float = 2.0
    sigma_n: float = 0.0

    _sigma = field_validator("sigma_n")(_check_sigma_n)

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


class SuperResSpec(Spec):
    """Down-sampling by ``factor`` (average pooling), kept at full size by nearest up-sampling."""

    kind: Literal["superres"] = "superres"
    factor: int = 2
    sigma_n: float = 0.0

    _sigma = field_validator("sigma_n")(_check_sigma_n)

    @field_validator("factor")
    @classmethod
    def _check_factor(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"factor (down-sampling factor) must be an integer >= 2, got {value}")
        return value


class MRISpec(Spec):
    """Multi-coil Cartesian k-space under-sampling (column masks, centred unitary FFT).

    ``R`` is the acceleration of the acquisition mask M; the further mask M~ has acceleration
    about ``R + delta_R`` (``delta_R = 1`` reproduces the code's "delta = R + 1").
    ``acs_fraction`` is the fraction of central phase-encode lines always sampled.
    Coil maps come from a deterministic bank of ``n_map_variants`` rotated birdcage maps.
    """

    kind: Literal["mri"] = "mri"
    R: float = 4.0
    delta_R: float = 1.0
    acs_fraction: float = 0.0625
    n_coils: int = 4
    n_map_variants: int = 8
    sigma_n: float = 0.0

    _sigma = field_validator("sigma_n")(_check_sigma_n)

    @field_validator("R")
    @classmethod
    def _check_R(cls, value: float) -> float:
        if not value >= 1.0:
            raise ValueError(f"R (acceleration) must be >= 1, got {value}")
        return value

    @field_validator("delta_R")
    @classmethod
    def _check_delta_R(cls, value: float) -> float:
        if not value > 0.0:
            raise ValueError(f"delta_R (extra acceleration of the further mask) must be > 0, got {value}")
        return value

    @field_validator("acs_fraction")
    @classmethod
    def _check_acs(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"acs_fraction must be in (0, 1], got {value}")
        return value

    @field_validator("n_coils", "n_map_variants")
    @classmethod
    def _check_counts(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value


OperatorSpec = Annotated[
    IdentitySpec | InpaintSpec | BlurSpec | SuperResSpec | MRISpec, Field(discriminator="kind")
]


class NetworkConfig(Spec):
    """EDM-preconditioned U-Net. The defaults are the ~1.9 M-parameter CPU model."""

    img_resolution: int = 32
    img_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    sigma_data: float = 0.5

    @model_validator(mode="after")
    def _check_resolution(self) -> NetworkConfig:
        levels = len(self.channel_mult)
        if self.img_resolution % (2 ** (levels - 1)) != 0:
            raise ValueError(
                f"img_resolution {self.img_resolution} must be divisible by 2**(len(channel_mult)-1) = "
                f"{2 ** (levels - 1)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


class TrainConfig(Spec):
    """The shared training loop: optimiser schedule, EMA, guards, checkpoints, precision."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 7e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_rampup_steps: int = 200
    # One step decay late in the run: once this fraction of the run is done (of `steps`, or of
    # `time_budget_s` when the budget ends the run first), every learning rate is multiplied by
    # `lr_drop_factor` for the rest of it. Short CPU distillations oscillate at their starting step
    # size; a quarter of it late in the run held the gains (docs/results.md). None = constant lr.
    lr_drop_at: float | None = None
    lr_drop_factor: float = 0.25
    grad_clip: float | None = 1.0
    ema_halflife_nimg: float = 50_000.0
    ema_rampup_ratio: float | None = 0.05
    checkpoint_every: int = 250
    keep_checkpoints: int = 0
    max_nonfinite_in_row: int = 20
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # None = auto: on for CUDA; off on CPU, where GroupNorm in channels_last measured 1.4-1.5x
    # slower (benchmarks/train_throughput.py on an avx512_bf16 Xeon without AMX).
    channels_last: bool | None = None
    time_budget_s: float | None = None

    @field_validator("steps", "batch_size", "checkpoint_every", "max_nonfinite_in_row")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("lr")
    @classmethod
    def _check_lr(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        return value

    @field_validator("lr_drop_at")
    @classmethod
    def _check_lr_drop_at(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"lr_drop_at is a fraction of the run and must be in (0, 1), got {value}")
        return value

    @field_validator("lr_drop_factor")
    @classmethod
    def _check_lr_drop_factor(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"lr_drop_factor must be in (0, 1), got {value}")
        return value


class DistillConfig(Spec):
    """RSD / SiD distillation hyperparameters (ALGORITHMS.md 1.3)."""

    alpha: float = 1.2
    sigma_init: float = 2.5
    t_max: float = 800.0
    loss_scaling_g: float = 100.0
    lr_fake: float = 5e-5
    lr_generator: float = 5e-5
    betas_fake: tuple[float, float] = (0.0, 0.999)
    betas_generator: tuple[float, float] = (0.0, 0.999)
    grad_clip_fake: float | None = 1.0
    grad_clip_generator: float | None = None

    @field_validator("t_max")
    @classmethod
    def _check_t_max(cls, value: float) -> float:
        if not 0 < value <= 1000:
            raise ValueError(f"t_max must be in (0, 1000], got {value}")
        return value
