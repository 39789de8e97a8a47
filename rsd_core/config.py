"""Validated configuration for every stage of RSD.

All configuration enters through these pydantic models, validated once at the edge; the
code below them trusts its inputs. Operator specs are a union discriminated by ``kind`` so a
manifest or YAML file names the corruption and its parameters in one place; the concrete specs live
beside their operators (:mod:`rsd_core.operators`) and are found through the operator registry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rsd_core.kinds import EXPORT_FORMATS, check_export
from rsd_core.operators import InpaintSpec
from rsd_core.operators.spec import OperatorSpec, OperatorSpecBase
from rsd_core.spec import Spec
from rsd_core.train.sampling import SIGMA_MIN, rho_sigma

__all__ = ["EXPORT_FORMATS", "OperatorSpec", "OperatorSpecBase", "Spec"]  # re-exported: config is their front door


class NetworkConfig(Spec):
    """EDM-preconditioned U-Net. The defaults are the ~1.9 M-parameter CPU model."""

    # Informational in the pipeline: pretraining takes the image shape from the dataset (a model must fit its
    # data) and the saved model card records it; they act where a network is rebuilt from a card.
    img_resolution: int = 32
    img_channels: int = 1
    model_channels: int = 32
    # Lists, not tuples: Flyte types list fields of the configs its tasks pass, and warns about tuple ones.
    channel_mult: list[int] = Field([1, 2, 4], min_length=1)
    num_blocks: int = 1
    # No self-attention by default: at 32x32 on a CPU core, attention at 8x8 slows every step and never won an
    # equal-wall-time A/B (docs/results.md, "Teacher A/B").
    attn_resolutions: list[int] = []
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


class LoopConfig(Spec):
    """What every training loop reads: length, batch, learning-rate schedule, EMA, guards, checkpoints,
    precision. Each loop adds what only it reads (:class:`TrainConfig`, :class:`DistillTrainConfig`), so a
    setting the loop would ignore is refused by validation instead."""

    steps: int = 1000
    batch_size: int = 64
    adam_eps: float = 1e-8
    lr_rampup_steps: int = 200
    # One step decay late in the run: once this fraction of the run is done (of `steps`, or of
    # `time_budget_s` when the budget ends the run first), every learning rate is multiplied by
    # `lr_drop_factor` for the rest of it: short CPU distillations oscillate at their starting step
    # size. None = constant lr.
    lr_drop_at: float | None = None
    lr_drop_factor: float = 0.25
    ema_halflife_nimg: float = 50_000.0
    ema_rampup_ratio: float | None = 0.05
    # Power-function EMAs kept beside the EMA above, one per relative standard deviation, saved with every
    # checkpoint, so that any other EMA length can be reconstructed after training (EDM2's post-hoc EMA,
    # rsd_core.train.posthoc_ema). Empty = none; EDM2 keeps [0.05, 0.10].
    power_ema_sigma_rels: list[float] = []
    checkpoint_every: int = 250
    keep_checkpoints: int = 0
    max_nonfinite_in_row: int = 20
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # None = auto: on for CUDA; off on CPU, where GroupNorm in channels_last is slower
    # (benchmarks/train_throughput.py; docs/benchmarks.md).
    channels_last: bool | None = None
    time_budget_s: float | None = None

    @field_validator("steps", "batch_size", "checkpoint_every", "max_nonfinite_in_row")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("lr_drop_at")
    @classmethod
    def _check_lr_drop_at(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"lr_drop_at is a fraction of the run and must be in (0, 1), got {value}")
        return value

    @field_validator("power_ema_sigma_rels")
    @classmethod
    def _check_sigma_rels(cls, value: list[float]) -> list[float]:
        for sigma_rel in value:
            if not 0.0 < sigma_rel < 12 ** -0.5:
                raise ValueError(f"power_ema_sigma_rels: each must be in (0, 0.288), got {sigma_rel}")
        if len(set(value)) != len(value):
            raise ValueError(f"power_ema_sigma_rels has repeated values: {value}")
        return value

    @field_validator("lr_drop_factor")
    @classmethod
    def _check_lr_drop_factor(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"lr_drop_factor must be in (0, 1), got {value}")
        return value


class TrainConfig(LoopConfig):
    """Teacher pretraining's loop: one Adam optimiser, and the observations streamed from the dataset."""

    lr: float = 7e-4
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2)
    grad_clip: float | None = 1.0
    # The training noise levels, ln sigma ~ N(P_mean, P_std^2) (EDM's defaults). A teacher whose sampler stops
    # at a truncation level learns nothing it uses below it; a larger P_mean spends its steps above.
    P_mean: float = -1.2
    P_std: float = Field(1.2, gt=0.0)
    # Ambient objectives: below this noise level the loss on the held-out observations (hidden from the network)
    # keeps the weight it has at the level (0 = EDM's weight everywhere). See Objective.heldout_floored.
    heldout_sigma_floor: float = Field(0.0, ge=0.0)
    # Streaming from a dataset's shards: DataLoader worker processes that read and prefetch (0 = read in
    # the training process) and the rows each reader shuffles at a time.
    data_workers: int = 1
    shuffle_buffer: int = 4096

    @field_validator("data_workers")
    @classmethod
    def _check_workers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"data_workers must be >= 0 (0 reads in the training process), got {value}")
        return value

    @field_validator("shuffle_buffer")
    @classmethod
    def _check_shuffle_buffer(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {value}")
        return value

    @field_validator("lr")
    @classmethod
    def _check_lr(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        return value


class DistillTrainConfig(LoopConfig):
    """The distillation's loop. Its two optimisers (fake score, generator) are set in :class:`DistillConfig`
    (``lr_fake``, ``betas_generator``, ``grad_clip_fake``, ...) and it reads no dataset (it trains on the
    generator's own samples), so ``lr``, ``betas``, ``grad_clip``, ``data_workers`` and ``shuffle_buffer``
    do not exist here."""

    batch_size: int = 32
    lr_rampup_steps: int = 0
    checkpoint_every: int = 50


class DistillConfig(Spec):
    """RSD / SiD distillation hyperparameters (docs/algorithms.md §7)."""

    alpha: float = 1.2
    sigma_init: float = 2.5
    t_max: float = 800.0
    # The generator step's lowest noise level s: None keeps SiD's whole schedule (down to sigma_min = 0.002);
    # a value truncates it there, like the teacher's truncated sampler, so that the generator is not scored
    # by a teacher below the levels it denoises well (an Ambient teacher's samples are best truncated:
    # docs/algorithms.md §7). Tried on MRI, not adopted: docs/results.md, "On MRI R = 4".
    generator_sigma_min: float | None = None
    loss_scaling_g: float = 100.0
    # Fake-score updates per generator update. SiD alternates one of each; DMD2 (Yin et al., 2024) takes five
    # so that the fake score keeps up with a generator that moves (its two time-scale rule). Each update draws
    # its own batch, so at equal wall time a larger value buys fewer generator updates. Tried on MRI (2), not
    # adopted: docs/results.md, "On MRI R = 4".
    fake_updates: int = Field(1, ge=1)
    lr_fake: float = 5e-5
    lr_generator: float = 5e-5
    betas_fake: list[float] = Field([0.0, 0.999], min_length=2, max_length=2)
    betas_generator: list[float] = Field([0.0, 0.999], min_length=2, max_length=2)
    grad_clip_fake: float | None = 1.0
    grad_clip_generator: float | None = None
    # Two choices where the RSD reference loops differ from Ambient Diffusion's objective (docs/algorithms.md §7,
    # the Distillation A/B of docs/results.md). Which pixels the fake score's random-inpainting loss is
    # taken on: "observed" = the re-corruption's mask A (the teacher's objective: the network also learns to
    # fill pixels it did not see); "further" = the further mask A~ the network sees (the reference's
    # train_loss), the only pixels the generator step scores; for MRI, P_M~ in place of P_M (the reference MRI
    # loop's). None: "further" for random inpainting (the better of the two in that A/B), the objective's own
    # loss elsewhere (MRI was not compared; its GPU preset follows the reference).
    fake_loss_mask: Literal["observed", "further"] | None = None
    # What the generator loss's normaliser w = 1 / mean|y_g - f_phi| averages over: the "visible" pixels of
    # the input mask (this project) or "all" pixels (the reference sid_loss.py), which scales the loss by
    # 1 / (visible fraction) and so changes what Adam's eps and grad_clip_generator see.
    generator_loss_mean: Literal["visible", "all"] = "visible"

    @field_validator("t_max")
    @classmethod
    def _check_t_max(cls, value: float) -> float:
        if not 0 < value <= 1000:
            raise ValueError(f"t_max must be in (0, 1000], got {value}")
        return value

    @model_validator(mode="after")
    def _check_generator_sigma_min(self) -> DistillConfig:
        floor, top = self.generator_sigma_min, rho_sigma(1 - self.t_max / 1000.0)
        if floor is not None and not SIGMA_MIN <= floor < top:
            raise ValueError(f"generator_sigma_min must be in [{SIGMA_MIN}, {top:.3g}) (the noise level at t_max "
                             f"{self.t_max:g}), got {floor}")
        return self


# --------------------------------------------------------------------------- the pipeline


class DataSettings(Spec):
    """Where the clean images come from and how they are corrupted (the ``corrupt_dataset`` task)."""

    source: str = "fashion-mnist"
    split: Literal["train", "test"] = "train"
    operator: OperatorSpec = Field(default_factory=InpaintSpec)
    limit: int | None = None
    clean_eval: int = 0
    # None: the clean evaluation images are the first corrupted ones; "test": that many of the source's test
    # split instead (brain-mri: a held-out subject), so the true FD also measures generalisation.
    clean_eval_split: Literal["train", "test"] | None = None
    image_size: int | None = None
    channels: Literal[1, 3] = 1
    seed: int = 0

    @field_validator("limit")
    @classmethod
    def _check_limit(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"limit must be >= 1 or null (all images), got {value}")
        return value

    @field_validator("clean_eval")
    @classmethod
    def _check_clean_eval(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"clean_eval must be >= 0, got {value}")
        return value


class SelectionSettings(Spec):
    """Proximal-FID checkpoint selection (the ``select_checkpoint`` task)."""

    n_samples: int = 1000
    # self-supervised: Proximal FD features learnt from this dataset's own corrupted observations (no labels, no
    # clean images; a few CPU minutes once per dataset, cached), the CPU default. inception: the GPU default.
    # classifier, classifier-corrupted: Fashion-MNIST CNNs trained with clean labels, for evaluation only
    # (rsd_core.select.selection.EXTRACTORS). The true FD, where a clean split exists, uses the clean classifier
    # (Inception on magnitudes for complex MRI images): evaluation only.
    extractor: Literal["self-supervised", "inception", "classifier", "classifier-corrupted"] = "self-supervised"
    seed: int = 0

    @field_validator("n_samples")
    @classmethod
    def _check_n(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"n_samples must be >= 2 (a covariance needs two samples), got {value}")
        return value


class TaskResources(Spec):
    """Kubernetes requests for one task; ``gpu`` > 0 asks the scheduler for a GPU node."""

    cpu: str = "2"
    mem: str = "4Gi"
    gpu: int = 0
    # Data-parallel training (torch elastic via flytekitplugins-kfpytorch): processes per node and
    # nodes. The global batch stays TrainConfig.batch_size; each process takes batch / world size.
    nproc_per_node: int = 1
    nnodes: int = 1

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"gpu must be >= 0, got {value}")
        return value

    @field_validator("nproc_per_node", "nnodes")
    @classmethod
    def _check_processes(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value


class ResourceSettings(Spec):
    """Per-task requests. Flyte fixes them when a workflow is registered (see docs/pipeline.md)."""

    default: TaskResources = TaskResources()
    pretrain: TaskResources = TaskResources()
    distill: TaskResources = TaskResources()


class TrackingSettings(Spec):
    """MLflow: experiment, registered model name, and how often per-step metrics are logged."""

    experiment: str = "rsd"
    # None: named after the dataset's manifest name when the model is registered (tasks.registry), as a run
    # on an already-corrupted dataset is unless a name is given (for_existing_dataset).
    model_name: str | None = "rsd-generator"
    log_every: int = 10

    @field_validator("log_every")
    @classmethod
    def _check_every(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"log_every must be >= 1 (steps between logged metrics), got {value}")
        return value

    @field_validator("model_name", "experiment")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty name")
        return value


class ExportSettings(Spec):
    """Portable formats the selected generator is exported to (the ``export_model`` task); each
    operator kind declares the formats it supports (rsd_core.kinds), checked before training."""

    formats: list[Literal["onnx", "pt2"]] = Field(default_factory=lambda: list(EXPORT_FORMATS))


class PipelineConfig(Spec):
    """Everything one pipeline execution needs, from the clean source to the registered model."""

    data: DataSettings = Field(default_factory=DataSettings)  # built lazily: its operator default is an InpaintSpec
    network: NetworkConfig = NetworkConfig()
    teacher_train: TrainConfig = TrainConfig()
    distill_train: DistillTrainConfig = DistillTrainConfig()
    distill: DistillConfig = DistillConfig()
    selection: SelectionSettings = SelectionSettings()
    tracking: TrackingSettings = TrackingSettings()
    resources: ResourceSettings = ResourceSettings()
    export: ExportSettings = ExportSettings()
    description: str = Field(default="", description="free text, logged as the run description")

    @model_validator(mode="after")
    def _check_consistent(self) -> PipelineConfig:
        check_export(self.data.operator, self.export.formats)
        return self
