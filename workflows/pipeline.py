"""The RSD workflows: wiring only. Each stage gets just its own config section, so changing one
section re-runs that stage and what follows, while earlier results come from the cache.

* ``rsd_pipeline(config)``: clean source -> corrupt -> teacher -> distil -> select -> export -> register;
* ``rsd_rerun(dataset_uri, config)``: the same from an already-corrupted dataset (a data team's);
* ``rsd_sweep(config, operators)``: corruption kinds/levels side by side, one map-task element each;
* launch plans: a nightly schedule (declared inactive) and the data team's re-run plan.
"""

from __future__ import annotations

import functools

from flytekit import CronSchedule, LaunchPlan, map_task, workflow
from flytekit.types.directory import FlyteDirectory

from rsd_core.config import PipelineConfig
from tasks.deploy import DEPLOYMENT, RERUN_DEPLOYMENT
from tasks.pipeline_tasks import (
    RegisteredModel,
    SelectedGenerator,
    check_dataset,
    corrupt_dataset,
    distill,
    export_model,
    open_run,
    pretrain_teacher,
    register_model,
    select_checkpoint,
    sweep_items,
)


@workflow
def train_and_register(dataset: FlyteDirectory, config: PipelineConfig, run_id: str) -> RegisteredModel:
    """Everything after the corrupted dataset exists; shared by the full pipeline and the re-run."""
    # Attribute promises are resolved in place, so each use reads `config...` afresh (not a shared variable).
    teacher = pretrain_teacher(dataset=dataset, network=config.network, train=config.teacher_train,
                               log_every=config.tracking.log_every, run_id=run_id)
    distilled = distill(teacher=teacher, train=config.distill_train, rsd=config.distill,
                        log_every=config.tracking.log_every, run_id=run_id)
    selected = select_checkpoint(dataset=dataset, teacher=teacher, distilled=distilled, selection=config.selection,
                                 run_id=run_id)
    exported = export_model(selected=selected, export=config.export, run_id=run_id)
    return register_model(exported=exported, selected=selected, tracking_settings=config.tracking, run_id=run_id)


@workflow
def rsd_pipeline(config: PipelineConfig) -> RegisteredModel:
    """The whole DAG from a clean source named in ``config.data``."""
    run_id = open_run(config=config, workflow_name="rsd_pipeline")
    dataset = corrupt_dataset(data=config.data, run_id=run_id)
    return train_and_register(dataset=dataset, config=config, run_id=run_id)


@workflow
def rsd_rerun(dataset_uri: str, config: PipelineConfig) -> RegisteredModel:
    """Train, select and register on an already-corrupted dataset; ``config.data`` is not used."""
    run_id = open_run(config=config, workflow_name="rsd_rerun", dataset_uri=dataset_uri)
    dataset = check_dataset(dataset_uri=dataset_uri, export=config.export)
    return train_and_register(dataset=dataset, config=config, run_id=run_id)


@workflow
def rsd_sweep(config: PipelineConfig, operators: list[dict]) -> list[SelectedGenerator]:
    """Corrupt, pretrain, distil and select once per operator spec (e.g. inpainting p in {0.6, 0.8, 0.9})."""
    run_id = open_run(config=config, workflow_name="rsd_sweep")
    items = sweep_items(data=config.data, operators=operators)
    datasets = map_task(functools.partial(corrupt_dataset, run_id=run_id))(data=items)
    teachers = map_task(functools.partial(pretrain_teacher, network=config.network, train=config.teacher_train,
                                          log_every=config.tracking.log_every, run_id=run_id))(dataset=datasets)
    distilled = map_task(functools.partial(distill, train=config.distill_train, rsd=config.distill,
                                           log_every=config.tracking.log_every, run_id=run_id))(teacher=teachers)
    return map_task(functools.partial(select_checkpoint, selection=config.selection, run_id=run_id))(
        dataset=datasets, teacher=teachers, distilled=distilled)


nightly = LaunchPlan.get_or_create(
    workflow=rsd_pipeline,
    name="rsd_pipeline_nightly",
    default_inputs={"config": DEPLOYMENT},
    schedule=CronSchedule(schedule="0 3 * * *"),
    auto_activate=False,  # declared here, switched on deliberately with `flytectl update launchplan --activate`
)

data_team_rerun = LaunchPlan.get_or_create(
    workflow=rsd_rerun,
    name="rsd_rerun_data_team",
    default_inputs={"config": RERUN_DEPLOYMENT},
)
