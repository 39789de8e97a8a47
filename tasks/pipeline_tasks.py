"""The pipeline's Flyte tasks: thin typed wrappers around ``rsd_core`` stages.

Each task downloads its inputs, calls one ``rsd_core`` function, logs to a child MLflow run of
the execution's run (``run_id``), renders Decks, and returns typed folders/files. Caching keys
on each task's own config section; ``run_id`` and ``log_every`` are ignored by the cache so a
new execution with the same data and settings reuses earlier results (the hit is visible as a
missing child run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flytekit import Cache, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from rsd_core.config import (
    DataSettings,
    DistillConfig,
    DistillTrainConfig,
    ExportSettings,
    NetworkConfig,
    PipelineConfig,
    SelectionSettings,
    TrackingSettings,
    TrainConfig,
)
from rsd_core.data.reader import open_dataset
from rsd_core.data.sources import corrupt
from rsd_core.export.onestep import CARD_FILE, ONNX_FILE, export_generator
from rsd_core.kinds import check_export
from rsd_core.operators import parse_operator_spec
from rsd_core.presets import config_yaml
from rsd_core.select.selection import select_stage
from rsd_core.stages import DISTILL_DIR, PRETRAIN_DIR, distill_stage, pretrain_stage, sampler_for
from rsd_core.viz import observations_for_display, save_grid
from tasks import decks, tracking
from tasks.checkpoints import AttemptCheckpoints
from tasks.deploy import CACHE_VERSION, DEPLOYMENT, elastic, image, requests
from tasks.registry import (
    TAG_FINGERPRINT,
    TAG_OPERATOR,
    TAG_SCORING,
    dataset_model_name,
    logged_model_id,
    register_generator,
)
from tasks.task_io import execution_name, out_dir, out_file, workdir

_RES = DEPLOYMENT.resources
_CACHE = Cache(version=CACHE_VERSION, ignored_inputs=("run_id", "log_every"))
GRID_SAMPLES = 64


@dataclass
class SelectedGenerator:
    """The checkpoint Proximal FID chose, saved as a model, with what promotion needs to know."""

    generator: FlyteDirectory
    grid: FlyteFile
    table: FlyteFile
    chosen_step: int
    proximal_fd: float
    proximal_fd_low: float  # 95% bootstrap interval of proximal_fd (rsd_core.select.fd_interval)
    proximal_fd_high: float
    teacher_proximal_fd: float
    dataset_fingerprint: str
    dataset_name: str
    proximal_scoring: str
    proximal_features: str  # the label of the Proximal FD features: every report names them
    operator_kind: str
    told_apart: bool | None = None  # the chosen checkpoint beats the runner-up beyond resampling noise


@dataclass
class RegisteredModel:
    """Where the execution's model ended up: registry name, version and alias, and its files."""

    name: str
    version: int
    alias: str
    reason: str
    proximal_fd: float
    proximal_features: str
    run_id: str
    tracking_uri: str
    grid: FlyteFile
    exported: FlyteDirectory


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default))
def open_run(config: PipelineConfig, workflow_name: str, dataset_uri: str = "") -> str:
    """Create the execution's parent MLflow run (the config as params) and return its id.

    With ``dataset_uri`` (a run on an already-corrupted dataset) the unused ``data`` section is left out of
    the params, and an empty description names that dataset: the preset's would describe other data."""
    params = config.model_dump(mode="json")
    tags = {"rsd.code_version": tracking.code_version(), "rsd.workflow": workflow_name,
            "rsd.flyte_execution": execution_name(),
            "rsd.model_name": config.tracking.model_name or "named after the dataset"}
    description = config.description
    if dataset_uri:
        del params["data"]
        name = open_dataset(dataset_uri).manifest.name
        tags |= {"rsd.dataset_name": name, "rsd.dataset_uri": dataset_uri}
        description = description or f"{workflow_name} on dataset '{name}' ({dataset_uri})"
    run_id = tracking.start_parent_run(
        config.tracking.experiment,
        run_name=f"{workflow_name}-{execution_name()}",
        params=params,
        tags=tags,
        description=description,
    )
    tracking.log_text_artifact(tracking.client(), run_id, config_yaml(config), "config.yaml")
    return run_id


@task(cache=_CACHE, retries=2, container_image=image(), requests=requests(_RES.default), enable_deck=True)
def corrupt_dataset(data: DataSettings, run_id: str) -> FlyteDirectory:
    """Corrupt the clean source into the parquet + manifest dataset; clean images stop here."""
    work = workdir("corrupt")
    out, grid = work / "dataset", work / "observations.png"
    with tracking.child_run(run_id, "corrupt_dataset", data.model_dump(mode="json")) as (client, child):
        manifest = corrupt(data.source, data.operator, data.seed, str(out), split=data.split, limit=data.limit,
                           clean_eval_count=data.clean_eval, image_size=data.image_size, channels=data.channels,
                           clean_eval_split=data.clean_eval_split)
        ds = open_dataset(str(out))
        tracking.set_tags(client, child, {TAG_FINGERPRINT: ds.fingerprint, TAG_OPERATOR: data.operator.kind})
        client.log_metric(child, "observations", manifest.count)
        _observation_grid(ds, grid)
        client.log_artifact(child, str(grid))
    decks.show("observations", decks.png_html(grid, f"{manifest.name}: first 32"))
    return out_dir(str(out))


def _observation_grid(ds, path: Path) -> None:
    batch = next(ds.iter_batches(batch_size=32))
    save_grid(observations_for_display(batch.observation, ds.operator, batch.state), str(path))


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default), enable_deck=True)
def check_dataset(dataset_uri: str, export: ExportSettings) -> FlyteDirectory:
    """An already-corrupted dataset (local path or s3://), checksums verified and its operator's export
    formats checked before any GPU time is spent."""
    ds = open_dataset(dataset_uri, verify=True)
    check_export(ds.manifest.operator, export.formats)
    grid = workdir("inspect") / "observations.png"
    _observation_grid(ds, grid)
    decks.show("observations", decks.png_html(grid, f"{ds.manifest.name}: {len(ds)} observations"))
    return FlyteDirectory(dataset_uri) if "://" in dataset_uri else out_dir(Path(dataset_uri).resolve())


def _training_report(logger: tracking.MetricLogger, client, child: str, model_dir: Path, title: str) -> None:
    """Loss curves and a sample grid of the saved model, as MLflow artifacts and Decks."""
    logger.flush()
    curves = decks.loss_curves(logger.history, model_dir.parent / f"{title}_losses.png", title)
    grid = model_dir.parent / f"{title}_samples.png"
    save_grid(sampler_for(model_dir).sample(GRID_SAMPLES, seed=0), str(grid))
    client.log_artifact(child, str(curves))
    client.log_artifact(child, str(grid))
    decks.show(f"{title} losses", decks.png_html(curves))
    decks.show(f"{title} samples", decks.png_html(grid, f"{GRID_SAMPLES} samples, seed 0"))


def _resume_from_previous_attempt(checkpoints: Path, client, child: str) -> AttemptCheckpoints:
    """Restore a failed earlier attempt's checkpoints (a retry on a new pod) and mirror new ones."""
    attempt = AttemptCheckpoints(current_context().checkpoint, checkpoints)
    restored = attempt.restore()
    if restored:
        client.set_tag(child, "rsd.resumed_from", restored[-1])
    return attempt


def _log_result(client, child: str, result) -> None:
    client.log_metric(child, "steps", result.steps)
    client.log_metric(child, "seconds", result.seconds)
    client.log_metric(child, "nonfinite_skipped", result.nonfinite_skipped)
    client.set_tag(child, "rsd.stopped_by_budget", str(result.stopped_by_budget))


@task(cache=_CACHE, retries=1, container_image=image(gpu=True), requests=requests(_RES.pretrain), enable_deck=True,
      task_config=elastic(_RES.pretrain))
def pretrain_teacher(dataset: FlyteDirectory, network: NetworkConfig, train: TrainConfig, log_every: int,
                     run_id: str) -> FlyteDirectory:
    """Stage I: the corruption-aware teacher; returns its saved EMA model folder."""
    params = {"network": network.model_dump(mode="json"), "train": train.model_dump(mode="json")}
    with tracking.child_run(run_id, "pretrain_teacher", params) as (client, child):
        logger = tracking.MetricLogger(client, child, log_every)
        work = workdir("pretrain")
        mirror = _resume_from_previous_attempt(work / PRETRAIN_DIR / "checkpoints", client, child)
        teacher_dir, result = pretrain_stage(dataset.download(), network, train, work, callback=logger, progress=True,
                                             code_version=tracking.code_version(), on_checkpoint=mirror)
        _log_result(client, child, result)
        _training_report(logger, client, child, teacher_dir, "teacher")
    return out_dir(str(teacher_dir))


@task(cache=_CACHE, retries=1, container_image=image(gpu=True), requests=requests(_RES.distill), enable_deck=True,
      task_config=elastic(_RES.distill))
def distill(teacher: FlyteDirectory, train: DistillTrainConfig, rsd: DistillConfig, log_every: int,
            run_id: str) -> FlyteDirectory:
    """Stage II: RSD into a one-step generator; returns the folder with all checkpoints and the final EMA."""
    params = {"train": train.model_dump(mode="json"), "distill": rsd.model_dump(mode="json")}
    out = workdir("distill")
    with tracking.child_run(run_id, "distill", params) as (client, child):
        logger = tracking.MetricLogger(client, child, log_every)
        mirror = _resume_from_previous_attempt(out / DISTILL_DIR / "checkpoints", client, child)
        generator_dir, result, _ = distill_stage(teacher.download(), train, rsd, out, callback=logger, progress=True,
                                                 code_version=tracking.code_version(), on_checkpoint=mirror)
        _log_result(client, child, result)
        _training_report(logger, client, child, generator_dir, "generator")
    return out_dir(str(out))


@task(cache=_CACHE, retries=1, container_image=image(gpu=True), requests=requests(_RES.default), enable_deck=True)
def select_checkpoint(dataset: FlyteDirectory, teacher: FlyteDirectory, distilled: FlyteDirectory,
                      selection: SelectionSettings, run_id: str) -> SelectedGenerator:
    """Proximal FID over the saved checkpoints (no clean data); the winner is saved as a model."""
    dataset_dir = dataset.download()
    ds = open_dataset(dataset_dir)
    with tracking.child_run(run_id, "select_checkpoint", selection.model_dump(mode="json")) as (client, child):
        result = select_stage(dataset_dir, teacher.download(), distilled.download(), workdir("selection"),
                              n_samples=selection.n_samples, extractor=selection.extractor, seed=selection.seed,
                              progress=True)
        for row in result.rows:
            client.log_metric(child, "proximal_fd", row.proximal_fd, step=row.step or 0)
            if row.true_fd is not None:
                client.log_metric(child, "true_fd", row.true_fd, step=row.step or 0)
        summary = {"chosen_step": result.chosen_step, "chosen_proximal_fd": result.proximal_fd,
                   "teacher_proximal_fd": result.teacher_proximal_fd, "spearman": result.spearman,
                   "chosen_true_fd": result.chosen_true_fd, "best_true_fd": result.best_true_fd,
                   "chosen_proximal_fd_low": result.proximal_fd_interval[0],
                   "chosen_proximal_fd_high": result.proximal_fd_interval[1]}
        if result.runner_up_difference is not None:
            summary |= {"runner_up_difference_low": result.runner_up_difference[0],
                        "runner_up_difference_high": result.runner_up_difference[1]}
            client.set_tag(child, "rsd.told_apart_from_runner_up", str(result.distinguishable).lower())
        for key, value in summary.items():
            if value is not None:
                client.log_metric(child, key, value)
        if result.extractor_label is not None:  # no clean split, no true FD
            client.set_tag(child, "rsd.extractor", result.extractor_label)
        client.set_tag(child, "rsd.proximal_extractor", result.proximal_extractor_label)
        table = Path(result.grid).parent / "selection.json"
        client.log_artifact(child, str(table))
        client.log_artifact(child, result.grid)
    rows = [r.model_dump() for r in [*result.rows, *result.teacher_rows]]
    decks.show("selection", decks.png_html(result.grid, "teacher (best truncation) / student / student re-corrupted"),
               decks.table_html(rows))
    return SelectedGenerator(
        generator=out_dir(result.generator_dir), grid=out_file(result.grid), table=out_file(str(table)),
        chosen_step=result.chosen_step, proximal_fd=result.proximal_fd,
        proximal_fd_low=result.proximal_fd_interval[0], proximal_fd_high=result.proximal_fd_interval[1],
        told_apart=result.distinguishable,
        teacher_proximal_fd=result.teacher_proximal_fd, dataset_fingerprint=ds.fingerprint,
        proximal_scoring=result.proximal_scoring, dataset_name=ds.manifest.name,
        proximal_features=result.proximal_extractor_label or result.extractor_label or "",
        operator_kind=ds.manifest.operator.kind,
    )


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default))
def export_model(selected: SelectedGenerator, export: ExportSettings, run_id: str) -> FlyteDirectory:
    """The requested formats (ONNX, .pt2) + safetensors + card.json of the chosen generator."""
    with tracking.child_run(run_id, "export_model") as (client, child):
        out = export_generator(selected.generator.download(), workdir("export"),
                               {"proximal_fd": selected.proximal_fd, "chosen_step": float(selected.chosen_step)},
                               formats=export.formats)
        client.log_artifact(child, str(out / CARD_FILE))
        if "onnx" in export.formats:
            client.log_artifact(child, str(out / ONNX_FILE))
    return out_dir(str(out))


def _log_generator_model(export_dir: Path, run_id: str):
    """Log the exported generator as one MLflow model with the ``pytorch`` flavour (torch.export, no
    pickle) and a ``python_function`` one, so ``mlflow models serve`` works (tasks/serving.py)."""
    import mlflow
    from mlflow.models import Model

    from tasks import serving

    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(run_id=run_id):
        return Model.log(None, flavor=serving, name="generator", export_dir=str(export_dir))


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default))
def register_model(exported: FlyteDirectory, selected: SelectedGenerator, tracking_settings: TrackingSettings,
                   run_id: str) -> RegisteredModel:
    """Log the model, register it once per execution, and promote it by Proximal FID."""
    export_dir = Path(exported.download())
    with tracking.child_run(run_id, "register_model") as (client, child):
        name = tracking_settings.model_name or dataset_model_name(selected.dataset_name)
        registration = register_generator(
            client, name=name, execution_run_id=run_id, fingerprint=selected.dataset_fingerprint,
            scoring=selected.proximal_scoring, operator_kind=selected.operator_kind,
            proximal_fd=selected.proximal_fd, log_model=lambda: _log_generator_model(export_dir, child),
            proximal_fd_interval=(selected.proximal_fd_low, selected.proximal_fd_high),
        )
        grid = selected.grid.download()
        client.log_artifact(run_id, grid)
        client.log_artifact(run_id, selected.table.download())
        for key in ("proximal_fd", "teacher_proximal_fd", "chosen_step"):
            client.log_metric(run_id, key, float(getattr(selected, key)))
        tracking.set_tags(client, run_id, {
            TAG_FINGERPRINT: selected.dataset_fingerprint, TAG_SCORING: selected.proximal_scoring,
            TAG_OPERATOR: selected.operator_kind,
            "rsd.registered_model": f"{registration.name}/{registration.version}", "rsd.alias": registration.alias,
            "rsd.logged_model_id": logged_model_id(client.get_model_version(registration.name, registration.version)),
        })
        client.log_text(child, json.dumps(registration.__dict__, indent=1), "registration.json")
    client.set_terminated(run_id, "FINISHED")
    return RegisteredModel(
        name=registration.name, version=registration.version, alias=registration.alias, reason=registration.reason,
        proximal_fd=registration.proximal_fd, proximal_features=selected.proximal_features, run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        grid=out_file(grid), exported=out_dir(str(export_dir)),
    )


@task(cache=False, container_image=image(), requests=requests(_RES.default))
def sweep_items(data: DataSettings, operators: list[dict]) -> list[DataSettings]:
    """One data section per operator spec of a sweep (validated here, before anything runs)."""
    items = []
    for i, spec in enumerate(operators):
        try:
            items.append(data.model_copy(update={"operator": parse_operator_spec(spec)}))
        except ValueError as err:
            raise ValueError(f"operators[{i}] = {spec}: {err}") from None
    return items
