"""A Flyte retry on a new pod resumes training from the previous attempt's checkpoints on S3.

Each attempt gets a fresh working directory (the old pod's disk is gone) and a real
``SyncCheckpoint`` whose locations are on the seaweedfs server, as flytekit's entrypoint builds it.
The attempt itself (``train_attempt``, tests/faults.py) is shared with the fault benchmark's table row.
"""

from __future__ import annotations

import contextlib
import types
import uuid
from pathlib import Path

import pytest
import torch
from flytekit.core.checkpointer import SyncCheckpoint
from flytekit.types.directory import FlyteDirectory
from safetensors.torch import load_file

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.stages import PRETRAIN_DIR
from rsd_core.train.loop import list_checkpoints
from tests import faults
from tests.faults import PodKilled, train_attempt

STEPS = faults.RETRY_TRAIN["steps"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("retry") / "data")
    faults.write_tiny_dataset(out)
    return out


@pytest.fixture
def s3_access(s3_server):
    """flytekit's file access on the real S3 server; yields a fresh checkpoint prefix and the access."""
    with faults.flyte_s3_access(s3_server) as access:
        yield f"s3://{s3_server.bucket}/retry-{uuid.uuid4().hex[:8]}", access


def _attempt(prefix: str, n: int) -> SyncCheckpoint:
    """The checkpoint object of attempt ``n``: flytekit hands attempt n-1's location as the source."""
    src = f"{prefix}/attempt-{n - 1}" if n > 0 else None
    return SyncCheckpoint(checkpoint_dest=f"{prefix}/attempt-{n}", checkpoint_src=src)


def _remote(access, uri: str) -> list[str]:
    """The complete checkpoints at ``uri`` (seaweedfs, unlike AWS, lists emptied prefixes: go by files)."""
    fs = access.get_filesystem_for_path(uri)
    fs.invalidate_cache()
    return sorted(Path(p).parent.name for p in fs.find(uri) if p.endswith("/meta.json"))


def test_a_retry_on_a_new_pod_resumes_from_the_last_checkpoint_and_matches_an_uninterrupted_run(
    dataset, s3_access, tmp_path
):
    prefix, access = s3_access
    with pytest.raises(PodKilled):
        train_attempt(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=10)
    assert _remote(access, f"{prefix}/attempt-0") == ["step-0000008"]  # step 4 pruned there too

    retry = train_attempt(dataset, tmp_path / "pod-1", _attempt(prefix, 1))
    assert retry["restored"] == ["step-0000008"]
    assert retry["steps"] == [9, 10, 11, 12]  # lost two steps (less than one checkpoint interval), not ten
    assert retry["final_step"] == STEPS
    # The restored checkpoint was re-published at once and later pruned like any other: a third
    # attempt would find this attempt's newest one.
    assert _remote(access, f"{prefix}/attempt-1") == ["step-0000012"]

    straight = train_attempt(dataset, tmp_path / "straight", None)
    assert straight["steps"] == list(range(1, STEPS + 1))
    resumed = load_file(str(retry["teacher"] / "model.safetensors"))
    expected = load_file(str(straight["teacher"] / "model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_cut_off_mid_upload_is_not_resumed_from(dataset, s3_access, tmp_path):
    prefix, access = s3_access
    with pytest.raises(PodKilled):
        train_attempt(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=6)
    fs = access.get_filesystem_for_path(prefix)
    good = f"{prefix}/attempt-0/step-0000004"
    fs.copy(f"{good}/weights.safetensors", f"{prefix}/attempt-0/step-0000008/weights.safetensors")  # no meta.json

    retry = train_attempt(dataset, tmp_path / "pod-1", _attempt(prefix, 1))
    assert retry["restored"] == ["step-0000004"]
    assert retry["steps"][0] == 5 and retry["final_step"] == STEPS
    assert [p.name for p in list_checkpoints(tmp_path / "pod-1" / PRETRAIN_DIR / "checkpoints")] == ["step-0000012"]
    assert _remote(access, f"{prefix}/attempt-1") == ["step-0000012"]


def test_the_fault_table_row_reads_recovered(s3_server, tmp_path):
    row = faults.retry_on_new_pod(tmp_path, s3_server)
    assert row.outcome == faults.RECOVERED, row.detail


def test_the_pretrain_task_restores_the_previous_attempt_and_tags_its_run(dataset, s3_access, tmp_path, monkeypatch):
    """The Flyte task itself, run as attempt 1 of a retried execution, resumes (wiring, not the loop)."""
    from tasks import pipeline_tasks, tracking

    prefix, _ = s3_access
    with pytest.raises(PodKilled):
        train_attempt(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=10)

    monkeypatch.setenv(tracking.OUTPUTS_ENV, str(tmp_path / "outputs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = types.SimpleNamespace(checkpoint=_attempt(prefix, 1), working_directory=str(tmp_path / "pod-1"),
                                    execution_id=types.SimpleNamespace(name="retry"))
    monkeypatch.setattr(pipeline_tasks, "current_context", lambda: context)
    parent = tracking.start_parent_run("rsd-retry-test", run_name="retry", params={}, tags={})
    with contextlib.chdir(tmp_path):
        pipeline_tasks.pretrain_teacher.task_function(
            dataset=FlyteDirectory(dataset), network=NetworkConfig(**faults.TINY_NETWORK),
            train=TrainConfig(**faults.RETRY_TRAIN), log_every=1, run_id=parent)
    client = tracking.client()
    exp = client.get_experiment_by_name("rsd-retry-test")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "pretrain_teacher"]
    assert child.data.tags["rsd.resumed_from"] == "step-0000008"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")][0] == 9
    assert child.data.metrics["steps"] == STEPS
