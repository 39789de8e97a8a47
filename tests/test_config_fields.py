"""Every configuration field changes what runs, or says here why a test cannot see it.

Training sections (``teacher_train``, ``distill_train``, ``distill``, ``network``): each leaf field is changed
alone from a tiny baseline, the stage (pretraining or distillation) runs for a few steps, and something it
produces must differ from the baseline run: the saved weights, the number of steps, the checkpoints kept, or
the post-hoc EMA snapshots saved.
A field whose effect a seconds-scale CPU run cannot show is listed in :data:`NOT_SEEN_IN_A_TINY_RUN` with
its reason and a cheaper check of what the loop does with it. A field in neither table fails.

The other sections act outside training: each field is changed alone and must change the call that acts on
it (the pipeline task that receives its section is run up to that call, which is recorded), the operator's
simulation, or, for ``resources``, the requests the tasks are registered with (refused by a local run).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rsd_cli.pipeline_cmd import check_local_resources
from rsd_core.config import (
    DistillConfig,
    DistillTrainConfig,
    NetworkConfig,
    OperatorSpecBase,
    PipelineConfig,
    Spec,
    TaskResources,
    TrainConfig,
)
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator, get_kind, objective_for, registered_kinds
from rsd_core.presets import ConfigError, build_config
from rsd_core.stages import DISTILL_DIR, PRETRAIN_DIR, distill_stage, pretrain_stage, read_card
from rsd_core.train.loop import Phase, StepContext, Trainer, TrainingDivergedError, list_checkpoints
from rsd_core.train.posthoc_ema import SNAPSHOT_DIR, list_snapshots

# --------------------------------------------------------------------------- training sections

IMAGE_SHAPE = (1, 8, 8)
# Each baseline switches on what its fields adjust (an lr ramp-up, the late lr drop, an EMA whose half-life and
# ramp-up both bind within three steps, a checkpoint every step, active gradient clipping), so that every
# field, changed alone, has something to change. CPU and fp32 so that two runs are identical to the bit.
BASE_NETWORK = NetworkConfig(img_resolution=8, model_channels=8, channel_mult=[1, 2], attn_resolutions=[])
BASE_TEACHER = TrainConfig(steps=3, batch_size=4, lr=1e-3, lr_rampup_steps=2, lr_drop_at=0.5, ema_halflife_nimg=6.0,
                           ema_rampup_ratio=1.0, checkpoint_every=1, device="cpu", precision="fp32", data_workers=0,
                           shuffle_buffer=64)
BASE_DISTILL_TRAIN = DistillTrainConfig(steps=3, batch_size=4, lr_rampup_steps=2, lr_drop_at=0.5,
                                        ema_halflife_nimg=6.0, ema_rampup_ratio=1.0, checkpoint_every=1, device="cpu",
                                        precision="fp32")
BASE_DISTILL = DistillConfig(lr_fake=1e-3, lr_generator=1e-3)
BASELINES: dict[str, Spec] = {"teacher_train": BASE_TEACHER, "distill_train": BASE_DISTILL_TRAIN,
                              "distill": BASE_DISTILL, "network": BASE_NETWORK}

# What every loop reads (LoopConfig): the changed value, and what in the run it changes.
LOOP_CHANGES: dict[str, tuple[Any, str]] = {
    "steps": (2, "steps"),
    "batch_size": (2, "weights"),
    "adam_eps": (1e-2, "weights"),
    "lr_rampup_steps": (0, "weights"),
    "lr_drop_at": (None, "weights"),
    "lr_drop_factor": (0.5, "weights"),
    "ema_halflife_nimg": (100.0, "weights"),
    "ema_rampup_ratio": (None, "weights"),
    "checkpoint_every": (2, "checkpoints"),
    "keep_checkpoints": (1, "checkpoints"),
    "seed": (1, "weights"),
    "precision": ("bf16", "weights"),  # emulated bf16 autocast on a CPU without it: slow, but it runs
    "time_budget_s": (1e-9, "steps"),  # over budget after the first step
    "power_ema_sigma_rels": ([0.1], "snapshots"),
}
CHANGES: dict[str, tuple[Any, str]] = {
    **{f"teacher_train.{name}": change for name, change in LOOP_CHANGES.items()},
    **{f"distill_train.{name}": change for name, change in LOOP_CHANGES.items()},
    "teacher_train.lr": (2e-3, "weights"),
    "teacher_train.betas": ([0.5, 0.9], "weights"),
    "teacher_train.grad_clip": (None, "weights"),
    "teacher_train.P_mean": (0.5, "weights"),
    "teacher_train.P_std": (0.5, "weights"),
    "teacher_train.heldout_sigma_floor": (5.0, "weights"),
    # Two readers deal the row groups between them: the batches come in another order (0 and 1 give one order).
    "teacher_train.data_workers": (2, "weights"),
    "teacher_train.shuffle_buffer": (1, "weights"),  # a buffer of one row does not shuffle
    "distill.alpha": (0.5, "weights"),
    "distill.sigma_init": (1.0, "weights"),
    "distill.t_max": (200.0, "weights"),
    "distill.generator_sigma_min": (0.02, "weights"),
    "distill.fake_updates": (2, "weights"),
    "distill.loss_scaling_g": (1.0, "weights"),
    "distill.lr_fake": (2e-3, "weights"),
    "distill.lr_generator": (2e-3, "weights"),
    "distill.betas_fake": ([0.5, 0.999], "weights"),
    "distill.betas_generator": ([0.5, 0.999], "weights"),
    "distill.grad_clip_fake": (None, "weights"),
    "distill.grad_clip_generator": (1.0, "weights"),
    "distill.fake_loss_mask": ("observed", "weights"),  # None resolves to "further" for random inpainting
    "distill.generator_loss_mean": ("all", "weights"),
    "network.model_channels": (4, "weights"),
    "network.channel_mult": ([1, 1], "weights"),
    "network.num_blocks": (2, "weights"),
    "network.attn_resolutions": ([4], "weights"),
    "network.dropout": (0.5, "weights"),
    "network.sigma_data": (1.0, "weights"),
}


@dataclass(frozen=True)
class Run:
    """What a stage produced: the saved model's weights, the steps it ran, the checkpoints it kept, the post-hoc
    EMA snapshots it saved."""

    weights: dict[str, torch.Tensor]
    steps: int
    checkpoints: tuple[str, ...]
    snapshots: tuple[str, ...]
    model_dir: Path


def _differs(a: object, b: object) -> bool:
    """Exact comparison (the baselines are bit-reproducible, so any difference is the changed field's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)
    return a != b


@dataclass
class Stages:
    """Runs one stage with one section changed; distillation starts from the baseline teacher."""

    dataset: str
    root: Path
    teacher: Run | None = None
    _runs: int = 0

    def _out(self) -> Path:
        self._runs += 1  # a fresh folder: a folder holding checkpoints would be resumed
        return self.root / f"run-{self._runs}"

    def pretrain(self, network: NetworkConfig = BASE_NETWORK, train: TrainConfig = BASE_TEACHER) -> Run:
        out = self._out()
        model_dir, result = pretrain_stage(self.dataset, network, train, out, progress=False)
        return _run(model_dir, result.steps, out / PRETRAIN_DIR)

    def distill(self, train: DistillTrainConfig = BASE_DISTILL_TRAIN, dcfg: DistillConfig = BASE_DISTILL) -> Run:
        out = self._out()
        model_dir, result, _ = distill_stage(self.teacher.model_dir, train, dcfg, out, progress=False)
        return _run(model_dir, result.steps, out / DISTILL_DIR)

    def run(self, section: str, changed: Spec) -> Run:
        if section == "teacher_train":
            return self.pretrain(train=changed)
        if section == "network":
            return self.pretrain(network=changed)
        if section == "distill_train":
            return self.distill(train=changed)
        return self.distill(dcfg=changed)


def _run(model_dir: Path, steps: int, stage_dir: Path) -> Run:
    weights = load_file(str(model_dir / "model.safetensors"))
    return Run(weights, steps, tuple(p.name for p in list_checkpoints(stage_dir / "checkpoints")),
               tuple(p.name for p in list_snapshots(stage_dir / SNAPSHOT_DIR)), model_dir)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Stages:
    """A dataset of 32 inpainted 8x8 observations in four row groups (so two readers can share them), and the
    baseline teacher every distillation starts from."""
    root = tmp_path_factory.mktemp("config-fields")
    spec = {"kind": "inpaint", "p": 0.5}
    operator, rng = build_operator(spec), torch.Generator().manual_seed(0)
    clean = torch.rand((32, *IMAGE_SHAPE), generator=rng) * 2 - 1
    state = operator.sample_state(32, IMAGE_SHAPE, rng)
    write_dataset(str(root / "dataset"), operator.observe(clean, state, rng), state, name="fields",
                  image_shape=IMAGE_SHAPE, operator=spec, rows_per_shard=16, rows_per_group=8)
    found = Stages(str(root / "dataset"), root)
    found.teacher = found.pretrain()
    return found


@pytest.fixture(scope="module")
def baselines(stages: Stages) -> dict[str, Run]:
    distilled = stages.distill()
    return {"teacher_train": stages.teacher, "network": stages.teacher, "distill_train": distilled,
            "distill": distilled}


class _NaNPhase(Phase):
    """One convolution to place and lay out, and a loss that is never finite."""

    name = "nan"

    def __init__(self):
        self.net = nn.Conv2d(2, 2, 3)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.modules, self.optimizers, self.ema_pairs, self.config = {"net": self.net}, {"net": self.opt}, [], {}

    def step(self, ctx: StepContext) -> dict[str, float]:
        loss = self.net(torch.zeros(1, 2, 3, 3, device=ctx.device)).sum() * float("nan")
        ctx.optimizer_step(loss, self.opt, None)
        return {"loss": float(loss.detach())}


def _places_modules_on_the_device(changed: Spec, stages: Stages) -> None:
    phase = _NaNPhase()
    Trainer(phase, changed, progress=False)
    assert phase.net.weight.device.type == changed.device


def _lays_out_modules_channels_last(changed: Spec, stages: Stages) -> None:
    laid_out = {}
    for value in (None, changed.channels_last):
        phase = _NaNPhase()
        Trainer(phase, changed.updated(channels_last=value), progress=False)
        laid_out[value] = phase.net.weight.is_contiguous(memory_format=torch.channels_last)
    assert laid_out == {None: False, True: True}  # None: channels_last on CUDA only


def _stops_after_that_many_nonfinite_steps(changed: Spec, stages: Stages) -> None:
    with pytest.raises(TrainingDivergedError, match=rf"{changed.max_nonfinite_in_row} non-finite steps in a row at "
                                                    rf"step {changed.max_nonfinite_in_row - 1};"):
        Trainer(_NaNPhase(), changed.updated(steps=10), progress=False).run()


def _replaced_by_the_datasets_shape(changed: Spec, stages: Stages) -> None:
    run = stages.pretrain(network=changed)
    assert read_card(run.model_dir).network == read_card(stages.teacher.model_dir).network
    assert not _differs(run.weights, stages.teacher.weights)


# path -> (changed value, why a tiny CPU run cannot show it, the cheaper check of what the loop does with it)
NOT_SEEN_IN_A_TINY_RUN: dict[str, tuple[Any, str, Callable[[Spec, Stages], None]]] = {
    **{f"{loop}.{name}": change for loop in ("teacher_train", "distill_train") for name, change in {
        "device": ("meta", "a test machine is only sure to have a CPU: the trainer places the modules on the "
                           "device named (meta: no memory, no compute)", _places_modules_on_the_device),
        "channels_last": (True, "a memory layout: the same numbers, and the saved weights are written "
                                "contiguous: the trainer lays the modules out channels-last",
                          _lays_out_modules_channels_last),
        "max_nonfinite_in_row": (2, "acts only on consecutive non-finite steps, which a healthy run never has: "
                                    "the shared trainer on a phase whose loss is never finite",
                                 _stops_after_that_many_nonfinite_steps),
    }.items()},
    **{f"network.{name}": (value, "informational in the pipeline: pretraining takes the image shape from the "
                                  "dataset (the saved model card records it), so the run is the baseline's",
                           _replaced_by_the_datasets_shape)
       for name, value in (("img_resolution", 16), ("img_channels", 3))},
}

TRAINING_FIELDS = [f"{section}.{name}" for section, base in BASELINES.items() for name in type(base).model_fields]


def test_the_baseline_runs_are_reproducible(stages: Stages, baselines: dict[str, Run]):
    """An exact comparison means something only if the same config gives the same run to the bit."""
    for again, first in ((stages.pretrain(), baselines["teacher_train"]), (stages.distill(), baselines["distill"])):
        for observed in ("weights", "steps", "checkpoints", "snapshots"):
            assert not _differs(getattr(again, observed), getattr(first, observed)), observed


@pytest.mark.parametrize("path", TRAINING_FIELDS)
def test_each_training_field_changes_what_runs(path: str, stages: Stages, baselines: dict[str, Run]):
    section, name = path.split(".")
    base = BASELINES[section]
    if path in NOT_SEEN_IN_A_TINY_RUN:
        value, _, check = NOT_SEEN_IN_A_TINY_RUN[path]
        assert getattr(base, name) != value, f"{path}: the change must differ from the baseline"
        check(base.updated(**{name: value}), stages)
        return
    assert path in CHANGES, f"{path}: add (changed value, what it changes) to CHANGES, or a reason and a cheaper " \
                            "check to NOT_SEEN_IN_A_TINY_RUN"
    value, observed = CHANGES[path]
    assert getattr(base, name) != value, f"{path}: the change must differ from the baseline"
    run = stages.run(section, base.updated(**{name: value}))
    assert _differs(getattr(run, observed), getattr(baselines[section], observed)), \
        f"{path}={value!r} left the run's {observed} as the baseline's: nothing reads it"


def test_every_training_field_has_one_check():
    listed = CHANGES.keys() | NOT_SEEN_IN_A_TINY_RUN.keys()
    assert not CHANGES.keys() & NOT_SEEN_IN_A_TINY_RUN.keys()
    assert listed == set(TRAINING_FIELDS), "entries for fields that no longer exist: " \
                                           f"{sorted(listed - set(TRAINING_FIELDS))}"


# --------------------------------------------------------------------------- the other sections


def _leaves(model: type[Spec], prefix: str = "") -> list[str]:
    """Dotted path of every leaf; an operator spec expands to every registered kind's fields."""
    out = []
    for name, info in model.model_fields.items():
        path, annotation = f"{prefix}{name}", info.annotation
        if isinstance(annotation, type) and issubclass(annotation, OperatorSpecBase):
            out += [f"{path}[{kind}].{field}" for kind in registered_kinds()
                    for field in get_kind(kind).spec.model_fields if field != "kind"]
        elif isinstance(annotation, type) and issubclass(annotation, Spec):
            out += _leaves(annotation, path + ".")
        else:
            out.append(path)
    return out


PIPELINE_FIELDS = [path for path in _leaves(PipelineConfig) if path.split(".")[0] not in BASELINES]


@dataclass(frozen=True)
class Call:
    """The arguments a recorded stand-in received."""

    args: tuple
    kwargs: dict[str, Any]


class _Reached(Exception):
    """Raised by a recording stand-in: the task got as far as the call that acts on its section."""


def _call_reached(monkeypatch: pytest.MonkeyPatch, module: ModuleType, target: str, task: Callable[[], object]) -> Call:
    """Run ``task`` with ``module.target`` replaced by a recorder; what the task passed it."""
    calls = []

    def record(*args: Any, **kwargs: Any) -> None:
        calls.append(Call(args, kwargs))
        raise _Reached

    monkeypatch.setattr(module, target, record)
    with pytest.raises(_Reached):
        task()
    return calls[0]


def _folder(path: str) -> SimpleNamespace:
    """A stand-in for a task's FlyteDirectory input: only its local path is read before the recorded call."""
    return SimpleNamespace(download=lambda: path)


@pytest.fixture
def pipeline_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """The pipeline's tasks, runnable outside Flyte and MLflow as far as the call that acts on their section."""
    from tasks import pipeline_tasks, tracking

    @contextlib.contextmanager
    def child_run(*args: Any, **kwargs: Any) -> Iterator[tuple[None, str]]:
        yield None, "child"

    monkeypatch.setattr(tracking, "child_run", child_run)
    monkeypatch.setattr(pipeline_tasks, "workdir", lambda name: tmp_path / name)
    monkeypatch.setattr(pipeline_tasks, "execution_name", lambda: "local")
    monkeypatch.setattr(pipeline_tasks, "open_dataset", lambda uri: None)
    monkeypatch.setattr(pipeline_tasks, "_resume_from_previous_attempt", lambda *args: None)
    return pipeline_tasks


SELECTED = SimpleNamespace(generator=_folder("generator"), proximal_fd=1.0, chosen_step=4, dataset_name="fields",
                           dataset_fingerprint="f", proximal_scoring="s", operator_kind="inpaint",
                           proximal_fd_low=0.5, proximal_fd_high=1.5)


def _passed_on(tasks: ModuleType, monkeypatch: pytest.MonkeyPatch, config: PipelineConfig, path: str) -> object:
    """What the task that receives ``path``'s section (as the workflow wires it) passes to the call acting on it."""
    t, section = tasks, path.split(".")[0]
    if section == "data":
        return _call_reached(monkeypatch, t, "corrupt", lambda: t.corrupt_dataset.task_function(
            data=config.data, run_id="run"))
    if section == "selection":
        return _call_reached(monkeypatch, t, "select_stage", lambda: t.select_checkpoint.task_function(
            dataset=_folder("dataset"), teacher=_folder("teacher"), distilled=_folder("distilled"),
            selection=config.selection, run_id="run"))
    if section == "export":
        return _call_reached(monkeypatch, t, "export_generator", lambda: t.export_model.task_function(
            selected=SELECTED, export=config.export, run_id="run"))
    if path == "tracking.model_name":
        return _call_reached(monkeypatch, t, "register_generator", lambda: t.register_model.task_function(
            exported=_folder("exported"), selected=SELECTED, tracking_settings=config.tracking,
            run_id="run")).kwargs["name"]
    if path == "tracking.log_every":
        call = _call_reached(monkeypatch, t, "pretrain_stage", lambda: t.pretrain_teacher.task_function(
            dataset=_folder("dataset"), network=config.network, train=config.teacher_train,
            log_every=config.tracking.log_every, run_id="run"))
        return call.kwargs["callback"].every
    # The execution's MLflow run: experiment, tags, description (its params hold every field, which proves nothing).
    call = _call_reached(monkeypatch, t.tracking, "start_parent_run", lambda: t.open_run.task_function(
        config=config, workflow_name="rsd_pipeline"))
    return call.args, {k: v for k, v in call.kwargs.items() if k != "params"}


PIPELINE_CHANGES: dict[str, Any] = {
    "data.source": "brain-mri",
    "data.split": "test",
    "data.limit": 8,
    "data.clean_eval": 2,
    "data.clean_eval_split": "test",
    "data.image_size": 16,
    "data.channels": 3,
    "data.seed": 1,
    "selection.n_samples": 32,
    "selection.extractor": "inception",
    "selection.seed": 1,
    "tracking.experiment": "elsewhere",
    "tracking.model_name": "another-name",
    "tracking.log_every": 3,
    "export.formats": ["pt2"],
    "description": "another description",
}
# Operator fields act in the simulation that writes a dataset and in the draws of the objective that trains on it.
# kind.field -> (the spec's other settings where the field acts only in one mode, changed value)
OPERATOR_SHAPES = {"mri": (2, 32, 32), "blur": (1, 16, 16)}
OPERATOR_CHANGES: dict[str, tuple[dict[str, Any], Any]] = {
    **{f"{kind}.sigma_n": ({}, 0.1) for kind in registered_kinds()},
    "inpaint.p": ({}, 0.3),
    "inpaint.delta": ({}, 0.3),  # the further mask of the training objective
    "blur.kernel_size": ({}, 5),
    "blur.std": ({}, 1.0),
    "blur.kernel": ({}, "scipy-reflect"),
    "superres.factor": ({}, 4),
    "mri.R": ({}, 2.0),
    "mri.delta_R": ({}, 2.0),
    "mri.acs_fraction": ({}, 0.25),
    "mri.n_coils": ({}, 2),
    "mri.n_map_variants": ({}, 2),  # variants of the simulated bank
    "mri.coil_maps": ({"acs_fraction": 0.25}, "observed"),  # maps estimated from 8 of 32 centre lines
    "mri.maps_size": ({"coil_maps": "observed", "acs_fraction": 0.25}, 8),  # the side of observed maps
}


def _operator_effect(spec: OperatorSpecBase) -> list[torch.Tensor]:
    """A simulated dataset row (observation, recorded state) and a training draw (the objective's input state
    and its measurement of an image), from one seed."""
    shape = OPERATOR_SHAPES.get(spec.kind, IMAGE_SHAPE)
    operator, rng = build_operator(spec), torch.Generator().manual_seed(0)
    clean = torch.rand((4, *shape), generator=rng) * 2 - 1
    state = operator.simulation_state(4, shape, rng)
    observation = operator.observe(clean, state, rng)
    recorded = operator.recorded_state(observation, state)
    if operator.sigma_n > 0 and get_kind(spec.kind).noisy_objective is None:
        return [observation, *recorded.values()]  # refused for training: the dataset is what it changes
    objective = objective_for(operator)
    if operator.pool_keys:
        operator.attach_pool(recorded)
    drawn = objective.draw_input_state(4, shape, rng, "cpu")
    return [observation, *recorded.values(), *drawn.values(), objective.measure(clean, drawn)]


def _tensors_differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("path", PIPELINE_FIELDS)
def test_each_pipeline_field_reaches_what_acts_on_it(path: str, pipeline_tasks: ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch):
    base = build_config("cpu-smoke")
    if path.startswith("resources."):
        _check_resources(base, path)
        return
    if path.startswith("data.operator["):
        kind, field = path.removeprefix("data.operator[").split("].")
        assert f"{kind}.{field}" in OPERATOR_CHANGES, f"{path}: add (context, changed value) to OPERATOR_CHANGES"
        context, value = OPERATOR_CHANGES[f"{kind}.{field}"]
        spec = get_kind(kind).spec(**context)
        assert getattr(spec, field) != value, f"{path}: the change must differ from the baseline"
        assert _tensors_differ(_operator_effect(spec.updated(**{field: value})), _operator_effect(spec)), \
            f"{path}={value!r} changed neither the simulated data nor the objective's draws"
        return
    assert path in PIPELINE_CHANGES, f"{path}: add a changed value to PIPELINE_CHANGES"
    changed = build_config("cpu-smoke", overrides=[f"{path}={json.dumps(PIPELINE_CHANGES[path])}"])
    assert changed != base, f"{path}: the change must differ from the baseline"
    assert _passed_on(pipeline_tasks, monkeypatch, changed, path) != _passed_on(pipeline_tasks, monkeypatch, base,
                                                                               path), \
        f"{path}: the task receiving its section passes on the same call either way"


def _check_resources(base: PipelineConfig, path: str) -> None:
    """Resources are fixed when the workflows are registered: they change the tasks' requests (or their torch
    elastic layout) there, and a local run, which cannot honour them, refuses them by name."""
    from tasks.deploy import elastic, requests

    task, field = path.split(".")[1:]
    spec: TaskResources = getattr(base.resources, task)
    value = getattr(spec, field)
    changed_spec = spec.updated(**{field: value + 1 if isinstance(value, int) else f"{value}0"})
    registered = (requests, elastic)
    assert any(make(changed_spec) != make(spec) for make in registered), f"{path}: the registered task is the same"
    changed = base.model_copy(update={"resources": base.resources.model_copy(update={task: changed_spec})})
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        check_local_resources(changed, "cpu-smoke")


def test_every_pipeline_field_has_one_check():
    operator_paths = {f"data.operator[{key.replace('.', '].', 1)}" for key in OPERATOR_CHANGES}
    listed = PIPELINE_CHANGES.keys() | operator_paths | {p for p in PIPELINE_FIELDS if p.startswith("resources.")}
    assert listed == set(PIPELINE_FIELDS)
    assert {path.split(".")[0] for path in PIPELINE_FIELDS} | BASELINES.keys() == set(PipelineConfig.model_fields)


@pytest.mark.parametrize("name", ["lr", "betas", "grad_clip", "data_workers", "shuffle_buffer"])
def test_a_teacher_loop_setting_in_the_distillations_loop_is_refused_by_name(name: str):
    """Distillation has two optimisers (set in distill) and reads no dataset: these would be ignored there."""
    value = {"lr": 0.123, "betas": [0.5, 0.9], "grad_clip": 3.0, "data_workers": 2, "shuffle_buffer": 16}[name]
    with pytest.raises(ConfigError, match=rf"distill_train\.{name}"):
        build_config("cpu-smoke", overrides=[f"distill_train.{name}={value}"])
