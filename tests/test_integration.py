"""The whole pipeline against real servers: the dataset and Flyte's task outputs on S3 (seaweedfs),
tracking and the model registry on an ``mlflow server`` whose artifacts are proxied to that S3.

This is the cluster's data path on one machine: every task output is uploaded to the raw-output
prefix and downloaded by the next task, and every MLflow artifact goes through the server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import pytest
from mlflow import MlflowClient

from tests.cli import rsd

# A re-run on an existing dataset registers under a name derived from the dataset (the preset's is cpu-smoke's).
MODEL = "rsd-fashion-mnist-train-inpaint"


@pytest.fixture(scope="module")
def cluster_like(s3_server, mlflow_server, tmp_path_factory):
    """Environment of a client process: credentials and endpoints only, no local tracking store."""
    root = tmp_path_factory.mktemp("integration")
    for sub in ("home", "tmp"):
        (root / sub).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYTE_", "RSD_", "AWS_"))}
    from rsd_core.select.frechet import default_cache_dir

    env.update(s3_server.env(), MLFLOW_TRACKING_URI=mlflow_server.tracking_uri, HOME=str(root / "home"),
               TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1", RSD_CACHE_DIR=str(default_cache_dir()))
    prefix = f"s3://{s3_server.bucket}/integration-{uuid.uuid4().hex[:8]}"
    return root, env, prefix


@pytest.fixture(scope="module")
def pipeline_run(cluster_like):
    root, env, prefix = cluster_like
    rsd(env, "data", "corrupt", "--source", "fashion-mnist", "--operator", "inpaint", "--p", "0.6", "--limit", "256",
        "--clean-eval", "64", "--out", f"{prefix}/dataset")
    stdout = rsd(env, "run", "--preset", "cpu-smoke", "--dataset", f"{prefix}/dataset", "--raw-output-prefix",
                 f"{prefix}/raw", "--out", str(root / "out"), "--no-cache", timeout=600)
    return stdout


def s3_files(s3_server, uri: str) -> list[str]:
    fs = fsspec.filesystem("s3", key=s3_server.access_key, secret=s3_server.secret_key,
                           client_kwargs={"endpoint_url": s3_server.endpoint_url})
    return fs.find(uri)


def test_pipeline_on_s3_registers_a_champion_on_the_mlflow_server(pipeline_run, cluster_like, s3_server,
                                                                    mlflow_server):
    root, env, prefix = cluster_like
    assert f"registered model  {MODEL} version 1 alias @champion" in pipeline_run
    assert f"MLflow UI         {mlflow_server.tracking_uri}" in pipeline_run
    assert "View run" not in pipeline_run  # MLflow's per-run URL lines are suppressed; the summary names the run
    assert not (root / "out" / "mlflow.db").exists() and not (root / "out" / "mlartifacts").exists()

    client = MlflowClient(mlflow_server.tracking_uri, registry_uri=mlflow_server.tracking_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied: clients hold no artifact store
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith("rsd_rerun")]
    assert parent.info.status == "FINISHED" and "proximal_fd" in parent.data.metrics
    assert "selection_grid.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # Artifacts (grids, the logged model) were written through the server into its S3 destination.
    stored = s3_files(s3_server, mlflow_server.artifacts_destination)
    assert any(p.endswith("selection_grid.png") for p in stored)
    assert any(p.endswith("/MLmodel") for p in stored)


def test_task_outputs_went_through_the_raw_output_prefix(pipeline_run, cluster_like, s3_server):
    _, _, prefix = cluster_like
    raw = s3_files(s3_server, f"{prefix}/raw")
    names = {Path(p).name for p in raw}
    assert {"model.safetensors", "card.json", "generator.onnx", "weights.safetensors"} <= names
    assert any("/checkpoints/step-" in p for p in raw)  # distillation checkpoints travel to selection via S3


def test_sampling_the_champion_downloads_it_through_the_server(pipeline_run, cluster_like):
    root, env, _ = cluster_like
    grid = root / "champion.png"
    rsd(env, "sample", "--model", f"models:/{MODEL}@champion", "-n", "8", "--out", str(grid))
    assert grid.stat().st_size > 0


def test_no_credential_reaches_the_tracking_server(pipeline_run, cluster_like, s3_server, mlflow_server):
    client = MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("rsd-smoke")
    for run in client.search_runs([exp.experiment_id]):
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(s3_server.secret_key in v or s3_server.access_key in v for v in values), run.info.run_name
