"""A Flyte retry on a new pod resumes training from the previous attempt's checkpoints on S3.

Each attempt gets a fresh working directory (the old pod's disk is gone) and a real
``SyncCheckpoint`` whose locations are on the seaweedfs server, as flytekit's entrypoint builds it.
"""

from __future__ import annotations

import contextlib
import types
import uuid
from pathlib import Path

import pytest
import torch
from flytekit.configuration import DataConfig, S3Config
from flytekit.core.checkpointer import SyncCheckpoint
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.types.directory import FlyteDirectory
from safetensors.torch import load_file

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.data import write_dataset
from rsd_core.operators import build_operator
from rsd_core.stages import PRETRAIN_DIR, pretrain_stage
from rsd_core.training import list_checkpoints
from tasks.checkpoints import AttemptCheckpoints

TINY = NetworkConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=())
TRAIN = TrainConfig(steps=12, batch_size=16, lr=2e-3, lr_rampup_steps=2, checkpoint_every=4, keep_checkpoints=1,
                    precision="fp32", ema_halflife_nimg=200)


class PodKilled(RuntimeError):
    """Stands in for the pod dying: raised from the metrics callback, after a checkpoint."""


@pytest.fixture(scope="module")
def dataset(digits8, tmp_path_factory) -> str:
    spec = {"kind": "inpaint", "p": 0.5}
    op, g = build_operator(spec), torch.Generator().manual_seed(0)
    x = digits8[:256]
    state = op.sample_state(len(x), (1, 8, 8), g)
    out = str(tmp_path_factory.mktemp("retry") / "data")
    write_dataset(out, op.observe(x, state, g), state, name="digits", image_shape=(1, 8, 8), operator=spec)
    return out


@pytest.fixture
def s3_access(s3_server):
    """flytekit's file access pointed at the real S3 server; yields a fresh checkpoint prefix."""
    s3 = S3Config(endpoint=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                  secret_access_key=s3_server.secret_key)
    ctx = FlyteContextManager.current_context()
    prefix = f"s3://{s3_server.bucket}/retry-{uuid.uuid4().hex[:8]}"
    access = FileAccessProvider(ctx.file_access.local_sandbox_dir, f"{prefix}/raw", DataConfig(s3=s3))
    with FlyteContextManager.with_context(ctx.with_file_access(access)):
        yield prefix, access


def _attempt(prefix: str, n: int) -> SyncCheckpoint:
    """The checkpoint object of attempt ``n``: flytekit hands attempt n-1's location as the source."""
    src = f"{prefix}/attempt-{n - 1}" if n > 0 else None
    return SyncCheckpoint(checkpoint_dest=f"{prefix}/attempt-{n}", checkpoint_src=src)


def _train(dataset: str, work: Path, checkpoint: SyncCheckpoint, die_at: int | None = None):
    steps: list[int] = []

    def callback(step: int, metrics: dict) -> None:
        steps.append(step)
        if step == die_at:
            raise PodKilled(f"killed at step {step}")

    attempt = AttemptCheckpoints(checkpoint, work / PRETRAIN_DIR / "checkpoints")
    restored = attempt.restore()
    teacher_dir, result = pretrain_stage(dataset, TINY, TRAIN, work, callback, progress=False, on_checkpoint=attempt)
    return restored, steps, result, teacher_dir


def _remote(access: FileAccessProvider, uri: str) -> list[str]:
    """The complete checkpoints at ``uri`` (seaweedfs, unlike AWS, lists emptied prefixes: go by files)."""
    fs = access.get_filesystem_for_path(uri)
    fs.invalidate_cache()
    return sorted(Path(p).parent.name for p in fs.find(uri) if p.endswith("/meta.json"))


def test_a_retry_on_a_new_pod_resumes_from_the_last_checkpoint_and_matches_an_uninterrupted_run(
    dataset, s3_access, tmp_path
):
    prefix, access = s3_access
    with pytest.raises(PodKilled):
        _train(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=10)
    assert _remote(access, f"{prefix}/attempt-0") == ["step-0000008"]  # step 4 pruned there too

    restored, steps, result, teacher_dir = _train(dataset, tmp_path / "pod-1", _attempt(prefix, 1))
    assert restored == ["step-0000008"]
    assert steps == [9, 10, 11, 12]  # lost two steps (less than one checkpoint interval), not ten
    assert result.steps == TRAIN.steps
    # The restored checkpoint was re-published at once and then pruned like any other: attempt 2 would
    # find this attempt's newest one.
    assert _remote(access, f"{prefix}/attempt-1") == ["step-0000012"]

    _, straight_steps, _, straight_dir = _train(dataset, tmp_path / "straight", None)
    assert straight_steps == list(range(1, 13))
    resumed = load_file(str(teacher_dir / "model.safetensors"))
    straight = load_file(str(straight_dir / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_cut_off_mid_upload_is_not_resumed_from(dataset, s3_access, tmp_path):
    prefix, access = s3_access
    with pytest.raises(PodKilled):
        _train(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=6)
    fs = access.get_filesystem_for_path(prefix)
    good = f"{prefix}/attempt-0/step-0000004"
    fs.copy(f"{good}/weights.safetensors", f"{prefix}/attempt-0/step-0000008/weights.safetensors")  # no meta.json

    restored, steps, result, _ = _train(dataset, tmp_path / "pod-1", _attempt(prefix, 1))
    assert restored == ["step-0000004"]
    assert steps[0] == 5 and result.steps == TRAIN.steps
    assert [p.name for p in list_checkpoints(tmp_path / "pod-1" / PRETRAIN_DIR / "checkpoints")] == ["step-0000012"]
    assert _remote(access, f"{prefix}/attempt-1") == ["step-0000012"]


def test_the_pretrain_task_restores_the_previous_attempt_and_tags_its_run(dataset, s3_access, tmp_path, monkeypatch):
    """The Flyte task itself, run as attempt 1 of a retried execution, resumes (wiring, not the loop)."""
    import tasks.stages as stages
    from tasks import tracking

    prefix, access = s3_access
    with pytest.raises(PodKilled):
        _train(dataset, tmp_path / "pod-0", _attempt(prefix, 0), die_at=10)

    monkeypatch.setenv(tracking.OUTPUTS_ENV, str(tmp_path / "outputs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = types.SimpleNamespace(checkpoint=_attempt(prefix, 1), working_directory=str(tmp_path / "pod-1"),
                                    execution_id=types.SimpleNamespace(name="retry"))
    monkeypatch.setattr(stages, "current_context", lambda: context)
    parent = tracking.start_parent_run("rsd-retry-test", run_name="retry", params={}, tags={})
    with contextlib.chdir(tmp_path):
        stages.pretrain_teacher.task_function(dataset=FlyteDirectory(dataset), network=TINY, train=TRAIN,
                                              log_every=1, run_id=parent)
    client = tracking.client()
    exp = client.get_experiment_by_name("rsd-retry-test")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "pretrain_teacher"]
    assert child.data.tags["rsd.resumed_from"] == "step-0000008"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")][0] == 9
    assert child.data.metrics["steps"] == TRAIN.steps
