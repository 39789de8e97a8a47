"""The pipeline's named presets (values of :class:`rsd_core.config.PipelineConfig`), and how a user
changes one: a preset, then a YAML file, then ``--set key.sub=value`` overrides, validated once at the
end so an error names the full dotted field.

Each stage receives only its own section, so a change to, say, the selection settings does not
invalidate the cached teacher (Flyte's cache key is the task's inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rsd_core.config import (
    DataSettings,
    DistillConfig,
    DistillTrainConfig,
    ExportSettings,
    NetworkConfig,
    PipelineConfig,
    ResourceSettings,
    SelectionSettings,
    TaskResources,
    TrackingSettings,
    TrainConfig,
)
from rsd_core.operators import InpaintSpec
from rsd_core.operators.mri import MRISpec


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the dotted field."""


# Generator EMA for CPU-length distillations. EDM's ramp-up (half-life <= 5% of the images seen)
# leaves a half-life of a few dozen iterations after 10 CPU minutes; a 3k-image half-life ramped up to
# at most 20% of the images seen makes consecutive checkpoints differ less at the same level, which is
# what Proximal FID selection needs (docs/pipeline.md, presets).
CPU_DISTILL_EMA_HALFLIFE_NIMG = 3_000.0
CPU_DISTILL_EMA_RAMPUP_RATIO = 0.2


def _cpu_smoke() -> PipelineConfig:
    """Seconds-scale run of every stage for tests: a few hundred images, a ~20k-parameter net."""
    return PipelineConfig(
        description="cpu-smoke: every stage on a tiny model (tests)",
        data=DataSettings(operator=InpaintSpec(p=0.6), limit=256, clean_eval=64),
        network=NetworkConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=()),
        teacher_train=TrainConfig(steps=30, batch_size=16, lr=1e-3, lr_rampup_steps=5, checkpoint_every=30,
                                  ema_halflife_nimg=200.0, precision="fp32"),
        distill_train=DistillTrainConfig(steps=12, batch_size=8, lr_rampup_steps=0,
                                  checkpoint_every=4, ema_halflife_nimg=100.0, precision="fp32"),
        selection=SelectionSettings(n_samples=64),
        tracking=TrackingSettings(experiment="rsd-smoke", model_name="rsd-smoke", log_every=2),
    )


def _cpu_demo() -> PipelineConfig:
    """Fashion-MNIST inpainting (p = 0.6) on 2 CPU cores in about a quarter of an hour."""
    return PipelineConfig(
        description="cpu-demo: Fashion-MNIST inpainting p=0.6, default CPU U-Net (32/64/128), 5 + 6 minute budgets",
        data=DataSettings(operator=InpaintSpec(p=0.6, delta=0.1), limit=20_000, clean_eval=1000),
        network=NetworkConfig(),  # 32/64/128 channels, no attention
        # The held-out pixels' weight floored at sigma 0.1, as the restoration benchmark's teachers (docs/results.md).
        teacher_train=TrainConfig(steps=100_000, batch_size=64, lr=7e-4, lr_rampup_steps=200,
                                  checkpoint_every=250, time_budget_s=300.0, heldout_sigma_floor=0.1),
        # lr 5e-5 (the paper's 1e-5 is far too slow at this budget), betas (0, 0.999), batch 32.
        distill_train=DistillTrainConfig(steps=100_000, batch_size=32, lr_rampup_steps=0,
                                  checkpoint_every=60, time_budget_s=360.0,
                                  ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                                  ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO),
        distill=DistillConfig(lr_fake=5e-5, lr_generator=5e-5, betas_fake=(0.0, 0.999),
                              betas_generator=(0.0, 0.999), grad_clip_fake=1.0, grad_clip_generator=1.0),
        # Proximal FD on features learnt from the corrupted observations alone; the 35-NFE teacher rows
        # dominate the cost.
        selection=SelectionSettings(n_samples=500, extractor="self-supervised"),
        tracking=TrackingSettings(experiment="rsd-demo", model_name="rsd-fmnist-inpaint", log_every=10),
    )


def cpu_mri_operator(R: float = 4.0) -> MRISpec:
    """The spec's mask rules at 32 px: ACS = 6.25% of the columns (2 of 32, as 20 of 320), M with floor(32 / R)
    lines, the further mask M~ with floor(32 / (R + 1)) (R = 4: 8 and 6 lines, ACS included); 4 coils, the
    reference code's virtual-coil count (at 32x32 their FFTs cost little next to the U-Net)."""
    return MRISpec(R=R, delta_R=1.0, acs_fraction=0.0625, n_coils=4)


# cpu-mri's training settings, shared with benchmarks/mri.py: the network, learning rates and EMA are cpu-demo's
# (the paper's MRI rates, 5e-6 / 1e-6, barely move a network in CPU minutes); the lr drop at 2/3 of the
# distillation is the restoration benchmark's.
# The MRI network keeps attention at 8x8: the no-attention A/B was run on Fashion-MNIST only.
CPU_MRI_NETWORK = NetworkConfig(img_channels=2, attn_resolutions=[8])  # 32/64/128 channels; + the M~ and ones channels
# The CPU network before the no-attention A/B; the published long run and selection-domains tables were made with it
# (and the long run resumes from its checkpoints).
CPU_NETWORK_ATTENTION_8 = NetworkConfig(attn_resolutions=[8])
CPU_MRI_TEACHER = TrainConfig(steps=100_000, batch_size=64, lr=7e-4, lr_rampup_steps=200, checkpoint_every=250,
                              time_budget_s=300.0)
CPU_MRI_DISTILL_TRAIN = DistillTrainConfig(steps=100_000, batch_size=32, lr_rampup_steps=0,
                                    checkpoint_every=60, time_budget_s=360.0, lr_drop_at=2 / 3,
                                    ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                                    ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO)
CPU_MRI_DISTILL = DistillConfig(lr_fake=5e-5, lr_generator=5e-5, betas_fake=(0.0, 0.999),
                                betas_generator=(0.0, 0.999), grad_clip_fake=1.0, grad_clip_generator=1.0)


def _cpu_mri() -> PipelineConfig:
    """Multi-coil brain MRI at R = 4 through the whole DAG on 2 CPU cores, budgeted for about 20 minutes.

    The training phases are wall-time budgets; selection is not, and Inception features of the true FD
    (evaluation only) are most of it: hence a checkpoint every 60 steps and 128 samples per candidate (the
    measured phases: docs/results.md, "The cpu-mri preset, run once").
    32x32 slices with 4 coils (:func:`cpu_mri_operator`): the 1,345 Colin27 training slices of ``brain-mri``;
    the true FD (evaluation only) is against the 419 held-out MNI152 slices. 32 px because a 64 px slice has 4x
    the pixels per network evaluation, and the teacher already gets only a few hundred steps at 32 px. Selection
    learns its Proximal FD features from the observations' zero-filled (A^H y) magnitudes alone
    (self-supervised: no clean images, no labels); Inception on magnitudes, the costliest part of selection on
    a CPU, scores only the true FD, on 128 samples per candidate. Export: .pt2 with the projection's FFTs
    inside (ONNX cannot hold complex tensors).
    """
    return PipelineConfig(
        description="cpu-mri: multi-coil brain MRI R=4, 32x32, 4 coils, default CPU U-Net, 5 + 6 minute budgets",
        data=DataSettings(source="brain-mri", operator=cpu_mri_operator(4.0), image_size=32, clean_eval=419,
                          clean_eval_split="test"),
        network=CPU_MRI_NETWORK,
        teacher_train=CPU_MRI_TEACHER,
        distill_train=CPU_MRI_DISTILL_TRAIN,
        distill=CPU_MRI_DISTILL,
        selection=SelectionSettings(n_samples=128, extractor="self-supervised"),
        export=ExportSettings(formats=("pt2",)),
        tracking=TrackingSettings(experiment="rsd-mri-cpu", model_name="rsd-mri-r4-cpu", log_every=10),
    )


_GPU = ResourceSettings(
    default=TaskResources(cpu="4", mem="16Gi"),
    pretrain=TaskResources(cpu="8", mem="48Gi", gpu=1),
    distill=TaskResources(cpu="8", mem="48Gi", gpu=1),
)


def _celeba64_inpaint_gpu() -> PipelineConfig:
    """CelebA-HQ 64 inpainting, p = 0.6 (the reference scripts' settings): ddpmpp-sized U-Net, fp16-era
    settings in bf16."""
    return PipelineConfig(
        description="celeba64-inpaint-gpu: the RSD reference's settings for CelebA-HQ 64 inpainting p=0.6, except: "
        "no EDM augmentation pipe (the reference trains the teacher with p=0.15), bf16 instead of fp16",
        data=DataSettings(source="/data/celeba-hq-64", operator=InpaintSpec(p=0.6, delta=0.1), image_size=64,
                          channels=3, clean_eval=10_000),
        network=NetworkConfig(img_resolution=64, img_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                              num_blocks=4, attn_resolutions=(16,), dropout=0.05),
        # Teacher: Adam(0.9, 0.999, 1e-8), lr 2e-4, batch 256, EMA half-life 0.5 Mimg, 200 Mimg, 10 Mimg ramp-up.
        teacher_train=TrainConfig(steps=781_250, batch_size=256, lr=2e-4, betas=(0.9, 0.999), adam_eps=1e-8,
                                  lr_rampup_steps=39_063, ema_halflife_nimg=500_000.0, checkpoint_every=5000),
        # Distillation: batch 512, Adam eps 1e-6, 100 Mimg, max_grad_norm 1.0 (fake score).
        distill_train=DistillTrainConfig(steps=195_313, batch_size=512, adam_eps=1e-6,
                                  lr_rampup_steps=0, ema_halflife_nimg=500_000.0, checkpoint_every=500),
        distill=DistillConfig(alpha=1.2, sigma_init=2.5, t_max=800.0, loss_scaling_g=100.0, lr_fake=1e-5,
                              lr_generator=1e-5, betas_fake=(0.0, 0.999), betas_generator=(0.9, 0.999),
                              grad_clip_fake=1.0, grad_clip_generator=None,
                              # the reference loop's choices (docs/algorithms.md §7): fake loss on A~, w over all pixels
                              fake_loss_mask="further", generator_loss_mean="all"),
        selection=SelectionSettings(n_samples=10_000, extractor="inception"),
        tracking=TrackingSettings(experiment="rsd-celeba64", model_name="rsd-celeba64-inpaint", log_every=100),
        resources=_GPU,
    )


def _mri_multicoil_gpu() -> PipelineConfig:
    """Multi-coil MRI, R = 4 (the reference MRI scripts' settings; docs/algorithms.md §5): Fourier-space
    Ambient teacher, then RSD."""
    return PipelineConfig(
        description="mri-multicoil-gpu: the RSD reference MRI scripts' optimisation settings, multi-coil brain "
        "MRI R=4 at 64x64",
        data=DataSettings(source="brain-mri", operator=MRISpec(R=4.0, delta_R=1.0), image_size=64, clean_eval=1000),
        network=NetworkConfig(img_resolution=64, img_channels=2, model_channels=128, channel_mult=(1, 1, 1, 1),
                              num_blocks=4, attn_resolutions=(16,), dropout=0.1),
        # Teacher: Adam(0.9, 0.999, 1e-8), lr 2e-4, batch 8, clip 1.0, EMA 0.5 Mimg, 10 Mimg ramp-up, 200 Mimg.
        teacher_train=TrainConfig(steps=25_000_000, batch_size=8, lr=2e-4, betas=(0.9, 0.999), adam_eps=1e-8,
                                  lr_rampup_steps=1_250_000, grad_clip=1.0, ema_halflife_nimg=500_000.0,
                                  checkpoint_every=50_000),
        # Distillation: batch 24, lr 5e-6 / glr 1e-6, betas (0, 0.999) both, eps 1e-6, snapshot every 100 kimg.
        distill_train=DistillTrainConfig(steps=8_333_333, batch_size=24, adam_eps=1e-6,
                                  lr_rampup_steps=0, ema_halflife_nimg=500_000.0, ema_rampup_ratio=0.05,
                                  checkpoint_every=4167, seed=42),
        distill=DistillConfig(alpha=1.2, sigma_init=2.5, t_max=800.0, loss_scaling_g=100.0, lr_fake=5e-6,
                              lr_generator=1e-6, betas_fake=(0.0, 0.999), betas_generator=(0.0, 0.999),
                              grad_clip_fake=1.0, grad_clip_generator=None,
                              # the reference's P_M~ train_loss; it collapsed a CPU student (docs/results.md)
                              fake_loss_mask="further"),
        selection=SelectionSettings(n_samples=5000, extractor="inception"),
        export=ExportSettings(formats=("pt2",)),  # ONNX cannot hold the projection's complex FFTs (export.onestep)
        tracking=TrackingSettings(experiment="rsd-mri", model_name="rsd-mri-r4", log_every=100),
        resources=_GPU,
    )


PRESETS = {
    "cpu-smoke": _cpu_smoke,
    "cpu-demo": _cpu_demo,
    "cpu-mri": _cpu_mri,
    "celeba64-inpaint-gpu": _celeba64_inpaint_gpu,
    "mri-multicoil-gpu": _mri_multicoil_gpu,
}


def _format_errors(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-after", "tagged-union")))
        parts.append(f"{loc or '<root>'}: {e['msg'].removeprefix('Value error, ')}")
    return f"{where}: " + "; ".join(parts)


def _merge(base: dict, update: Mapping[str, Any]) -> dict:
    """Recursive dict merge; a mapping replaces an operator spec whole when its ``kind`` changes."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, dict) and value.get("kind", old.get("kind")) == old.get(
            "kind"
        ):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _set_dotted(data: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"--set {path}: empty key in dotted path")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            sections = sorted(k for k, v in node.items() if isinstance(v, dict))
            raise ConfigError(f"--set {path}: '{'.'.join(keys[: i + 1])}' is not a section (sections: {sections})")
        node = child
    node.update(_merge(node, {keys[-1]: value}))


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings as (dotted path, value parsed as a YAML scalar or flow mapping)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY.SUB=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({err})") from None
        out.append((key.strip(), value))
    return out


# How build_config marks a preset's description whose config was changed (for_existing_dataset recognises it).
CHANGED = " (changed: "


def build_config(
    preset: str | None = "cpu-demo",
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> PipelineConfig:
    """Preset, then the YAML file on top, then ``--set`` overrides; validated once at the end.

    A preset's description names its settings (e.g. cpu-demo's "inpainting p=0.6"); where the file or the
    overrides change the config but not the description, it says what changed, so that the MLflow run of
    ``--set data.operator.p=0.8`` is not described as p=0.6."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    base = PRESETS[preset]() if preset else PipelineConfig()
    data = base.model_dump(mode="json")
    where = f"preset {preset}" if preset else "defaults"
    changed = []
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections, got {type(loaded).__name__}")
        data = _merge(data, loaded or {})
        where += f" + {path}"
        changed.append(str(path))
    overrides = list(overrides)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
        where += f" + --set {key}"
    changed += [item.strip() for item in overrides]
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, where)) from None
    if changed and base.description and config.description == base.description:
        config = config.model_copy(update={"description": f"{base.description}{CHANGED}{'; '.join(changed)})"})
    return config


def for_existing_dataset(config: PipelineConfig, preset: str | None) -> PipelineConfig:
    """The config of a run on an already-corrupted dataset (``rsd_rerun``).

    A preset's model name and description describe the data the preset corrupts itself (e.g. cpu-demo's
    Fashion-MNIST inpainting); on a data team's dataset they would register and describe the model under a
    dataset name it does not have. Unless the user changed them, the model name becomes None (named after the
    dataset's manifest at registration) and the description empty (the run describes its dataset instead).
    """
    base = PRESETS[preset]() if preset else PipelineConfig()
    tracking = config.tracking
    if tracking.model_name == base.tracking.model_name:
        tracking = tracking.model_copy(update={"model_name": None})
    preset_own = config.description == base.description or (
        bool(base.description) and config.description.startswith(base.description + CHANGED))
    description = "" if preset_own else config.description
    return config.model_copy(update={"tracking": tracking, "description": description})


def config_yaml(config: PipelineConfig) -> str:
    """The config as YAML, loadable again with ``build_config(preset=None, config_file=...)``."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
