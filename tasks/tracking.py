"""MLflow plumbing for the tasks: where the store is, one parent run per execution with a child
run per task, flattened params within MLflow's limits, and a sub-sampling metrics callback.

Only the MLflow client API is used (no global active run), so tasks running in one process,
one after another, never log into each other's runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

import rsd_core
from rsd_core.train.progress import format_duration

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS_ENV = "RSD_OUTPUTS"
PARAM_VALUE_LIMIT = 6000  # MLflow's param value limit (characters)
PARAM_KEY_LIMIT = 250
BATCH_LIMIT = 100  # params per log_batch call; metrics are flushed in batches of this size too


def outputs_dir() -> Path:
    """Where local runs write: ``$RSD_OUTPUTS`` or ``<repo>/outputs`` (never the cwd)."""
    return Path(os.environ.get(OUTPUTS_ENV) or REPO_ROOT / "outputs").resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a server), else a SQLite file under :func:`outputs_dir`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{outputs_dir() / 'mlflow.db'}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def local_artifact_root() -> str | None:
    """Artifacts next to a local SQLite store (MLflow would default to ``./mlruns`` in the cwd)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = local_artifact_root()
    location = f"{root}/{name}" if root else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another task: use theirs
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def source_hash() -> str:
    """sha256 (16 hex) of the science and task code, so images without ``.git`` still name their code."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("rsd_core/**/*.py"), REPO_ROOT / "tasks" / "pipeline_tasks.py"]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The git commit of the checkout (``-dirty`` if modified), else the package version plus
    :func:`source_hash` (images carry no ``.git``, and fast registration replaces their code)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"rsd-{rsd_core.__version__}+{source_hash()}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}, values truncated to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name[:PARAM_KEY_LIMIT]] = str(value)[:PARAM_VALUE_LIMIT]
    return out


def log_params(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, v) for k, v in flatten(params).items()]
    for start in range(0, len(items), BATCH_LIMIT):
        mlflow_client.log_batch(run_id, params=items[start : start + BATCH_LIMIT])


def set_tags(mlflow_client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def start_parent_run(experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                     description: str = "") -> str:
    """The execution's run: the whole config as params; the tasks' runs nest under it."""
    c = client()
    run = c.create_run(experiment_id(c, experiment), run_name=run_name,
                       tags={**tags, MLFLOW_RUN_NOTE: description} if description else dict(tags))
    log_params(c, run.info.run_id, params)
    return run.info.run_id


class MetricLogger:
    """A training callback: every ``every``-th step (and the first) goes to MLflow in batches;
    every step is kept in memory for the loss-curve Deck."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str, every: int, prefix: str = ""):
        self.client = mlflow_client
        self.run_id = run_id
        self.every = every
        self.prefix = prefix
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._pending: list[Metric] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, value))
        if step != 1 and step % self.every != 0:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(self.prefix + k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        if len(self._pending) >= BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=self._pending[start : start + BATCH_LIMIT])
        self._pending = []


# The figures a stage's end-of-stage line shows, when the task logged them to its run.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "corrupt_dataset": ("observations",),
    "pretrain_teacher": ("steps", "loss"),
    "distill": ("steps", "loss_fake", "loss_generator"),
    "select_checkpoint": ("chosen_step", "chosen_proximal_fd", "teacher_proximal_fd"),
}


@contextlib.contextmanager
def child_run(parent_run_id: str, task_name: str, params: Mapping[str, Any] | None = None
              ) -> Iterator[tuple[MlflowClient, str]]:
    """A run nested under the execution's run for one task. If the task raises, both are marked
    FAILED (a successful retry's final task marks the execution's run FINISHED again).

    It also tells a person watching (a terminal or pod logs) that the task started, and when it
    ends, how long it took and its key figures (:data:`KEY_METRICS`, read back from the run)."""
    c = client()
    parent = c.get_run(parent_run_id)
    run = c.create_run(parent.info.experiment_id, run_name=task_name,
                       tags={MLFLOW_PARENT_RUN_ID: parent_run_id, "rsd.task": task_name})
    run_id = run.info.run_id
    if params:
        log_params(c, run_id, params)
    print(f"[{task_name}] started", flush=True)
    start = time.perf_counter()
    try:
        yield c, run_id
    except BaseException as err:
        c.set_terminated(run_id, "FAILED")
        c.set_terminated(parent_run_id, "FAILED")
        print(f"[{task_name}] failed after {format_duration(time.perf_counter() - start)}: "
              f"{type(err).__name__}", flush=True)
        raise
    c.set_terminated(run_id, "FINISHED")
    metrics = c.get_run(run_id).data.metrics
    figures = ", ".join(f"{key} {metrics[key]:.4g}" for key in KEY_METRICS.get(task_name, ()) if key in metrics)
    print(f"[{task_name}] done in {format_duration(time.perf_counter() - start)}" + (f": {figures}" if figures else ""),
          flush=True)


def log_text_artifact(mlflow_client: MlflowClient, run_id: str, text: str, file_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        path.write_text(text)
        mlflow_client.log_artifact(run_id, str(path))
