"""The pipeline's stages as plain functions over folders, shared by the Flyte tasks, the CLI and
the benchmarks: pretrain a teacher on a corrupted dataset, distil it, load any model for sampling.

A saved model is a folder with ``model.safetensors`` (the EMA network's weights) and
``model.json`` (a :class:`ModelCard`: network config, operator spec, image shape, kind and the
sampling settings), so a model can be rebuilt and sampled without the code that trained it
pickled anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, OperatorSpec, Spec, TrainConfig
from rsd_core.data.reader import open_dataset
from rsd_core.data.streaming import StreamSource
from rsd_core.kinds import build_operator, default_sigma_stop, objective_for
from rsd_core.operators import Operator
from rsd_core.train.distill import DistillPhase, OneStepGenerator, distill
from rsd_core.train.loop import (
    CheckpointCallback,
    MetricsCallback,
    TrainResult,
    load_module_weights,
    world,
)
from rsd_core.train.networks import EDMPrecond
from rsd_core.train.objectives import Objective
from rsd_core.train.posthoc_ema import SNAPSHOT_DIR, list_snapshots, reconstruct_ema
from rsd_core.train.pretrain import build_teacher, pretrain_teacher
from rsd_core.train.sampling import OneStepSampler, Sampler, TeacherSampler

POOL_FILE = "operator_pool.safetensors"
# A saved model folder's files (the pool only where the operator draws from observed states).
MODEL_FILES = ("model.json", "model.safetensors", POOL_FILE)
# Where each stage keeps its training state under its ``out_dir`` (checkpoints in ``<dir>/checkpoints``).
PRETRAIN_DIR = "pretrain"
DISTILL_DIR = "distill"


class ModelCard(Spec):
    """What is needed to rebuild and sample a saved model (and to trace where it came from)."""

    kind: Literal["teacher", "generator"]
    network: NetworkConfig
    operator: OperatorSpec
    image_shape: tuple[int, ...]
    objective: str
    sigma_init: float = 2.5
    sigma_stop: float | None = None
    dataset_fingerprint: str = ""
    steps: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    code_version: str = ""


def save_model(folder: str | Path, net: torch.nn.Module, card: ModelCard, operator: Operator | None = None) -> Path:
    """Write the model folder (rank 0 only under data parallelism: the replicas are identical), with the
    operator's pool of observed states where it draws fresh states from one (per-scan coil maps)."""
    folder = Path(folder)
    if world()[0] != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    if operator is not None and operator.pool is not None:
        save_file(operator.pool, str(folder / POOL_FILE))
    (folder / "model.json").write_text(card.model_dump_json(indent=1))
    return folder


def read_card(folder: str | Path) -> ModelCard:
    path = Path(folder) / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a model folder holds model.json and model.safetensors")
    return ModelCard.model_validate_json(path.read_text())


def build_network(card: ModelCard) -> tuple[EDMPrecond, Objective]:
    objective = objective_for(build_operator(card.operator))
    return build_teacher(card.network, objective), objective


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[EDMPrecond, Objective, ModelCard]:
    """Rebuild a saved model's network (weights from safetensors) with its objective (its operator's pool of
    observed states attached, where it has one) and card."""
    card = read_card(folder)
    net, objective = build_network(card)
    net.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    if objective.operator.pool_keys:
        pool = Path(folder) / POOL_FILE
        if not pool.exists():
            raise FileNotFoundError(f"{pool} not found: a '{card.operator.kind}' model with observed per-sample "
                                    "state keeps the observed states it draws from there")
        objective.operator.attach_pool(load_file(str(pool)))
    return net.to(device).eval().requires_grad_(False), objective, card


def sampler_for(folder: str | Path, device: str | torch.device = "cpu", bf16: bool = False,
                sigma_stop: float | None = None) -> Sampler:
    """One interface for any saved model: the one-step generator, or the teacher's (truncated) sampler."""
    net, objective, card = load_model(folder, device)
    if card.kind == "generator":
        return OneStepSampler(net, objective, card.image_shape, card.sigma_init, bf16=bf16)
    stop = sigma_stop if sigma_stop is not None else card.sigma_stop
    return TeacherSampler(net, objective, card.image_shape, sigma_stop=stop, bf16=bf16)


def pretrain_stage(
    dataset_uri: str,
    network: NetworkConfig,
    train: TrainConfig,
    out_dir: str | Path,
    *,
    callback: MetricsCallback | None = None,
    progress: bool = True,
    code_version: str = "",
    on_checkpoint: CheckpointCallback | None = None,
) -> tuple[Path, TrainResult]:
    """Train (or resume) a teacher on ``dataset_uri``; saves its EMA as a model under ``out_dir/teacher``."""

    ds = open_dataset(dataset_uri)
    spec, image_shape, fingerprint = ds.manifest.operator, tuple(ds.manifest.image_shape), ds.fingerprint
    # Streamed, never loaded whole: memory stays bounded for any dataset size (docs/benchmarks.md).
    source = StreamSource(ds, seed=train.seed, shuffle_buffer=train.shuffle_buffer, workers=train.data_workers)
    if network.img_channels != image_shape[0] or network.img_resolution != image_shape[-1]:
        network = network.model_copy(update={"img_channels": image_shape[0], "img_resolution": image_shape[-1]})
    objective = objective_for(ds.operator, P_mean=train.P_mean, P_std=train.P_std,
                              heldout_sigma_floor=train.heldout_sigma_floor)
    torch.manual_seed(train.seed)
    net = build_teacher(network, objective)
    config = {"network": network.model_dump(), "train": train.model_dump(), "dataset_uri": dataset_uri}
    phase, result = pretrain_teacher(net, objective, source, train, Path(out_dir) / PRETRAIN_DIR, callback=callback,
                                     config=config, progress=progress, on_checkpoint=on_checkpoint)
    card = ModelCard(kind="teacher", network=network, operator=spec, image_shape=image_shape,
                     objective=objective.name, sigma_stop=default_sigma_stop(spec), dataset_fingerprint=fingerprint,
                     steps=result.steps, metrics=result.metrics, code_version=code_version)
    return save_model(Path(out_dir) / "teacher", phase.ema, card, objective.operator), result


# What a post-hoc EMA of each saved model is made from: the stage's folder under ``out_dir``, the name of the EMA
# whose power-function EMAs the snapshots hold, and the prefix of the saved network's weights in that module.
POSTHOC_SOURCES = {"teacher": (PRETRAIN_DIR, "ema", ""), "generator": (DISTILL_DIR, "generator_ema", "net.")}


def posthoc_ema(out_dir: str | Path, sigma_rel: float, folder: str | Path, kind: Literal["teacher", "generator"]
                = "teacher", at_step: int | None = None) -> Path:
    """The teacher that :func:`pretrain_stage`, or the generator that :func:`distill_stage`, trained in ``out_dir``
    (with ``power_ema_sigma_rels``), averaged after training with another EMA length ``sigma_rel`` (EDM2's post-hoc
    EMA), saved as a model in ``folder``; its card's metrics record the length and the step."""
    stage_dir, ema_name, prefix = POSTHOC_SOURCES[kind]
    net, objective, card = load_model(Path(out_dir) / kind)
    snapshots = list_snapshots(Path(out_dir) / stage_dir / SNAPSHOT_DIR)
    state, made_from = reconstruct_ema(snapshots, ema_name, sigma_rel, at_step)
    net.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
    metrics = {**card.metrics, "posthoc_sigma_rel": sigma_rel, "posthoc_step": float(made_from["step"])}
    return save_model(folder, net, card.model_copy(update={"metrics": metrics}), objective.operator)


def distill_stage(
    teacher_dir: str | Path,
    train: DistillTrainConfig,
    dcfg: DistillConfig,
    out_dir: str | Path,
    *,
    callback: MetricsCallback | None = None,
    progress: bool = True,
    code_version: str = "",
    on_checkpoint: CheckpointCallback | None = None,
) -> tuple[Path, TrainResult, DistillPhase]:
    """Distil the saved teacher; checkpoints go to ``out_dir/distill/checkpoints``, the final EMA
    generator to ``out_dir/generator``."""
    teacher, objective, card = load_model(teacher_dir)
    config = {"train": train.model_dump(), "distill": dcfg.model_dump(), "teacher": str(teacher_dir)}
    phase, result = distill(teacher, objective, card.image_shape, train, dcfg, Path(out_dir) / DISTILL_DIR,
                            callback=callback, config=config, progress=progress, on_checkpoint=on_checkpoint)
    gen_card = generator_card(card, dcfg, result.steps, result.metrics, code_version)
    return (save_model(Path(out_dir) / "generator", phase.generator_ema.net, gen_card, objective.operator), result,
            phase)


def generator_card(teacher_card: ModelCard, dcfg: DistillConfig, steps: int, metrics: dict, code_version: str = ""):
    return teacher_card.model_copy(update={"kind": "generator", "sigma_init": dcfg.sigma_init, "sigma_stop": None,
                                           "steps": steps, "metrics": metrics, "code_version": code_version})


def checkpoint_distill_config(checkpoint: str | Path) -> DistillConfig:
    """The distillation settings a checkpoint was trained with (from its meta.json)."""
    meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    return DistillConfig(**meta.get("config", {}).get("distill", {}))


def generator_from_checkpoint(checkpoint: str | Path, teacher_dir: str | Path, device="cpu",
                              bf16: bool = False) -> OneStepSampler:
    """The EMA generator stored in a distillation checkpoint folder, as a sampler at the input scale
    ``sigma_init`` it was distilled with (not the teacher card's), as the exported model samples."""
    net, objective, card = load_model(teacher_dir, device)
    sigma_init = checkpoint_distill_config(checkpoint).sigma_init
    gen = OneStepGenerator(net, objective, card.image_shape, sigma_init)
    load_module_weights(Path(checkpoint), "generator_ema", gen)
    return OneStepSampler(gen.net.eval(), objective, card.image_shape, sigma_init, bf16=bf16)
