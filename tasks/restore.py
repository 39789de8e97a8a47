"""The ``rsd_restore`` tasks: clean versions of a data team's own observations, from a registered generator.

``plan_restoration`` resolves ``models:/name@alias``, checks that the model fits the dataset
(:func:`check_inputs`, also run by ``rsd restore`` before Flyte starts) and opens the MLflow run;
``restore_shard`` restores one parquet shard (a map task, one element per shard, on a GPU when the
deployment has one); ``write_restoration`` streams the shard results into the restored dataset
(format in :mod:`rsd_core.restore.dataset`) and logs the metrics and the grid. Nothing is cached:
the run id is part of every input, and a restoration is cheap next to training.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from rsd_core.data.manifest import MANIFEST_NAME, DatasetError
from rsd_core.data.reader import CorruptedDataset, open_dataset
from rsd_core.data.storage import storage_options_from_env
from rsd_core.restore.dataset import (
    check_restorable,
    fit_dataset_encoder,
    restoration_grid,
    restore_shard,
    write_restored,
)
from rsd_core.restore.estimate import RestoreConfig
from rsd_core.restore.methods import get_method
from rsd_core.stages import read_card
from tasks import decks, tracking
from tasks.deploy import DEPLOYMENT, image, requests
from tasks.registry import TAG_FINGERPRINT, TAG_OPERATOR
from tasks.restorer import (
    ENCODER_FILE,
    download_restorer,
    example_inputs,
    find_restorer,
    register_restorer,
    resolve_restorer,
    restorer_name,
    restorer_tags,
)
from tasks.serving import EXTRA_FILES
from tasks.task_io import execution_name, out_dir, out_file, workdir

_RES = DEPLOYMENT.resources
DEFAULT_EXPERIMENT = "rsd-restore"


@dataclass
class RestorePlan:
    """What every shard needs: the generator folder, the data, the MLflow run, and the provenance (JSON)."""

    model: FlyteDirectory
    dataset_uri: str
    out_uri: str
    shards: list[int]
    run_id: str
    provenance: str


@dataclass
class RestoreResult:
    """Where the restored dataset and its spread are, and what the restoration measured."""

    uri: str
    spread_uri: str
    count: int
    run_id: str
    tracking_uri: str
    grid: FlyteFile
    metrics: dict[str, float]


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version, downloaded: ``folder`` is its saved generator (model.json + model.safetensors)."""

    uri: str
    name: str
    version: int
    run_id: str
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.uri} (version {self.version})"


def resolve_model(uri: str, dst: Path) -> ResolvedModel:
    """Download a registered generator, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    name, alias = ref.split("@", 1) if "@" in ref else (ref.rsplit("/", 1)[0], None)
    if not uri.startswith("models:/") or not name or not (alias or ref.rsplit("/", 1)[-1].isdigit()):
        raise ValueError(f"model {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = tracking.client()
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, ref.rsplit("/", 1)[-1]))
        mlflow.set_tracking_uri(tracking.tracking_uri())
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                    dst_path=str(dst))
    except MlflowException as err:
        raise ValueError(f"model {uri}: {' '.join(err.message.split())} (tracking store "
                         f"{tracking.tracking_uri()})") from None
    return ResolvedModel(uri, name, int(version.version), version.run_id or "", Path(local) / EXTRA_FILES)


def check_inputs(model_uri: str, dataset_uri: str, out_uri: str, dst: Path) -> tuple[ResolvedModel, CorruptedDataset]:
    """Everything that can be refused before any restoration, each as a one-line ``ValueError``:
    an unreadable dataset (or one without the state its operator needs), an output that would
    overwrite a dataset, a model that does not fit the data."""
    try:
        ds = open_dataset(dataset_uri)
    except DatasetError as err:
        raise DatasetError(f"dataset {dataset_uri}: {err}") from None
    if out_uri.rstrip("/") == dataset_uri.rstrip("/"):
        raise ValueError(f"--out {out_uri} is the input dataset; write the restoration elsewhere")
    fs, root = fsspec.core.url_to_fs(out_uri, **storage_options_from_env(out_uri))
    if fs.exists(posixpath.join(root.rstrip("/"), MANIFEST_NAME)):
        raise ValueError(f"--out {out_uri} already holds a dataset; remove it or choose another location")
    model = resolve_model(model_uri, dst)
    check_restorable(read_card(model.folder), model.label, ds)
    return model, ds


def check_method(config: RestoreConfig) -> None:
    """Refuse a method that cannot restore with a registered model: the registry holds generators, and DPS needs
    the teacher."""
    if get_method(config.method).model == "teacher":
        raise ValueError(f"method {config.method!r} restores with the teacher, and registered models are one-step "
                         "generators: run it on a teacher folder with rsd_core.restore.methods.restore_with_model")


def _provenance(model: ResolvedModel, ds: CorruptedDataset, config: RestoreConfig, run_id: str) -> dict:
    card = read_card(model.folder)
    return {
        "role": "restored: posterior means of the source's observations (identity operator = clean estimates)",
        "model": {"uri": model.uri, "name": model.name, "version": model.version, "run_id": model.run_id,
                  "operator": card.operator.model_dump(), "trained_on_fingerprint": card.dataset_fingerprint,
                  "code_version": card.code_version},
        "source": {"uri": ds.uri, "name": ds.manifest.name, "fingerprint": ds.fingerprint,
                   "operator": ds.manifest.operator.model_dump(), "count": len(ds)},
        "settings": config.model_dump(),
        "mlflow_run_id": run_id,
        "code_version": tracking.code_version(),
    }


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default))
def plan_restoration(model_uri: str, dataset_uri: str, out_uri: str, config: RestoreConfig,
                     experiment: str) -> RestorePlan:
    """Check the inputs (one-line errors before any work), then open the restoration's MLflow run."""
    check_method(config)
    model, ds = check_inputs(model_uri, dataset_uri, out_uri, workdir("restore-model"))
    run_id = tracking.start_parent_run(
        experiment, run_name=f"rsd_restore-{execution_name()}",
        params={"model": model_uri, "model_version": model.version, "dataset": dataset_uri, "out": out_uri,
                **config.model_dump()},
        tags={"rsd.code_version": tracking.code_version(), "rsd.workflow": "rsd_restore",
              "rsd.model_name": model.name, "rsd.model_version": str(model.version),
              TAG_FINGERPRINT: ds.fingerprint, TAG_OPERATOR: ds.manifest.operator.kind},
    )
    return RestorePlan(model=out_dir(model.folder), dataset_uri=dataset_uri, out_uri=out_uri,
                       shards=list(range(len(ds.manifest.shards))), run_id=run_id,
                       provenance=json.dumps(_provenance(model, ds, config, run_id)))


def _generator_ref(plan: RestorePlan) -> tuple[str, dict]:
    """``<name>/<version>`` of the plan's generator and the provenance of its source dataset."""
    provenance = json.loads(plan.provenance)
    return f"{provenance['model']['name']}/{provenance['model']['version']}", provenance["source"]


@task(cache=False, retries=1, container_image=image(gpu=True), requests=requests(_RES.distill))
def fit_encoder(plan: RestorePlan, config: RestoreConfig, restorer: str = "", refit: bool = False) -> FlyteFile | None:
    """The restorer network when the settings have one (else None): ``restorer`` (a registered one) if given,
    else the registered one fitted for this generator, dataset and settings unless ``refit``, else a new fit,
    registered as a model version of its own (its loss curve ends and its time go to the run)."""
    if config.encoder is None:
        return None
    generator, source = _generator_ref(plan)
    client = tracking.client()
    name = restorer_name(generator.rsplit("/", 1)[0], source["name"])
    found = (resolve_restorer(client, restorer) if restorer
             else None if refit else find_restorer(client, name, generator, source["fingerprint"], config))
    if found is not None:
        if found.generator != generator:
            raise ValueError(f"restorer {found.uri} was fitted for generator {found.generator}, not {generator}")
        folder = download_restorer(found, workdir("restorer"))
        client.set_tag(plan.run_id, "rsd.restorer", found.uri)
        print(f"restorer {found.uri} reused (fitted for {found.generator} on dataset {found.fingerprint[:12]}, "
              f"{found.fitted_on}): no fit", flush=True)
        return out_file(folder / ENCODER_FILE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = workdir("restore-encoder") / "encoder.safetensors"
    model_dir = plan.model.download()
    with tracking.child_run(plan.run_id, "fit_encoder", {"device": device, **config.encoder.model_dump()}) as (
            client, child):
        meta = fit_dataset_encoder(model_dir, plan.dataset_uri, config, out, device, progress=True)
        for key in ("seconds", "observations", "loss_first", "loss_last"):
            client.log_metric(child, f"encoder/{key}", meta[key])
        client.log_metric(plan.run_id, "encoder_seconds", meta["seconds"])
        client.set_tag(child, "rsd.encoder_fitted_on", meta["fitted_on"])
        y, state, _ = open_dataset(plan.dataset_uri).read_all(limit=1)
        example = example_inputs(model_dir, y.numpy(), {k: v.numpy() for k, v in state.items()})
        tags = restorer_tags(generator, source["fingerprint"], config, meta["fitted_on"],
                             source["operator"]["kind"])
        registered = register_restorer(client, name, tags, lambda: _log_restorer(
            child, model_dir, out, config, example))
        client.set_tag(plan.run_id, "rsd.restorer", registered.uri)
    print(f"encoder fitted on {meta['observations']} observations (pairs: {meta['fitted_on']}) in "
          f"{meta['seconds']:.1f} s on {device} "
          f"(loss {meta['loss_first']:.4g} -> {meta['loss_last']:.4g}); registered as {registered.uri}", flush=True)
    return out_file(out)


def _log_restorer(run_id: str, model_dir: str, encoder_file: Path, config: RestoreConfig, example: dict):
    """Log the restorer as an MLflow model (python_function flavour, :mod:`tasks.restorer`) in ``run_id``."""
    import mlflow
    from mlflow.models import Model

    from tasks import restorer

    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(run_id=run_id):
        return Model.log(None, flavor=restorer, name="restorer", generator_dir=model_dir, encoder_file=encoder_file,
                         config=config, example=example)


@task(cache=False, retries=1, container_image=image(gpu=True), requests=requests(_RES.distill))
def restore_one_shard(plan: RestorePlan, config: RestoreConfig, encoder: FlyteFile | None, shard: int) -> FlyteFile:
    """Restore one shard of the dataset (one map-task element) by ``config.method`` into a safetensors file of
    results."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = workdir("restore") / f"shard-{shard:05d}.safetensors"
    with tracking.child_run(plan.run_id, f"restore_shard-{shard:05d}", {"shard": shard, "device": device}) as (
            client, child):
        summary = restore_shard(plan.model.download(), plan.dataset_uri, shard, config, out, device,
                                encoder_file=None if encoder is None else encoder.download())
        client.log_metric(child, "images", summary.rows)
        client.log_metric(child, "seconds", summary.seconds)
        client.log_metric(child, "misfit", summary.misfit_sum / summary.rows)
    print(f"shard {shard + 1}/{len(plan.shards)}: {summary.rows} observations restored in {summary.seconds:.1f} s "
          f"on {device}", flush=True)
    return out_file(out)


@task(cache=False, retries=2, container_image=image(), requests=requests(_RES.default), enable_deck=True)
def write_restoration(plan: RestorePlan, parts: list[FlyteFile]) -> RestoreResult:
    """Write the restored dataset and its spread; log time, misfit, spread (and PSNR/SSIM against a clean
    split, as evaluation) and the grid to the run."""
    grid = workdir("restore-grid") / "restoration.png"
    with tracking.child_run(plan.run_id, "write_restoration") as (client, _):
        source = open_dataset(plan.dataset_uri)
        result = write_restored(plan.out_uri, [p.download() for p in parts], source, json.loads(plan.provenance))
        restoration_grid(source, plan.out_uri, grid)
        metrics = {**result.metrics, "seconds_per_image": result.metrics["seconds"] / result.metrics["images"]}
        for key, value in metrics.items():
            client.log_metric(plan.run_id, key, value)
        client.log_artifact(plan.run_id, str(grid))
        tracking.set_tags(client, plan.run_id, {"rsd.restored_uri": plan.out_uri})
    client.set_terminated(plan.run_id, "FINISHED")
    caption = "observation / restoration / spread" + (" / clean" if "eval/images" in metrics else "")
    decks.show("restoration", decks.png_html(grid, caption), decks.table_html([metrics]))
    return RestoreResult(uri=result.uri, spread_uri=result.spread_uri, count=len(source), run_id=plan.run_id,
                         tracking_uri=tracking.tracking_uri(), grid=out_file(grid), metrics=metrics)
