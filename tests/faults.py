"""Fault builders and scenarios: does the pipeline recover, or fail clearly without losing anything?

Shared by the fault benchmark (``python -m benchmarks.faults``, which runs every scenario and writes
benchmarks/results/faults.json) and the tests (tests/test_faults.py runs the fast subset; other tests use the
tiny dataset, the NaN batches and the pod-kill builders). Each scenario is tiny (8x8 images, a ~20 k-parameter
U-Net). Outcomes:

* ``recovered``: the fault happened and a rerun (or the guard) finished the job correctly;
* ``clear error, nothing lost``: the run stopped with a one-line error naming what to fix, and
  nothing incomplete was left looking complete;
* ``FAILED``: anything else, with the reason in ``detail``.

``python -m tests.faults --child-train DATASET OUT STEPS EVERY SLEEP`` is the training process the kill
scenario starts and kills.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECOVERED = "recovered"
CLEAR = "clear error, nothing lost"
FAILED = "FAILED"

# A deliberately tiny teacher so a step costs milliseconds on one core.
TINY_NETWORK = {"img_resolution": 8, "img_channels": 1, "model_channels": 8, "channel_mult": (1, 2),
                "attn_resolutions": ()}
KILL_STEPS, KILL_EVERY = 60, 10


@dataclass
class Row:
    fault: str
    outcome: str
    detail: str


# --------------------------------------------------------------------------- tiny data


def tiny_arrays(n: int = 40, seed: int = 0, spec: dict | None = None):
    """(spec, observations, state) of ``n`` random 1x8x8 images under inpainting."""
    import torch

    from rsd_core.kinds import build_operator

    spec = spec or {"kind": "inpaint", "p": 0.5}
    op = build_operator(spec)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 8, 8), generator=gen) * 2 - 1
    state = op.sample_state(n, (1, 8, 8), gen)
    return spec, op.observe(x, state, gen), state


def write_tiny_dataset(uri: str, n: int = 40, storage_options: dict | None = None, rows_per_shard: int = 16):
    """A valid 3-shard dataset (16 + 16 + 8 rows) at ``uri``; returns its manifest."""
    import torch

    from rsd_core.data.writer import write_dataset

    spec, y, state = tiny_arrays(n)
    return write_dataset(uri, y, state, torch.arange(n) % 10, name="tiny", image_shape=(1, 8, 8), operator=spec,
                         rows_per_shard=rows_per_shard, rows_per_group=8, storage_options=storage_options)


# --------------------------------------------------------------------------- malformed inputs for the CLI


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _save_manifest(ds: Path, data: dict) -> None:
    (ds / "manifest.json").write_text(json.dumps(data, indent=1))


def _rehash_shard(ds: Path, index: int = 0) -> None:
    """Make the manifest agree with a rewritten shard, so only the content itself is wrong."""
    import pyarrow.parquet as pq

    data = _manifest(ds)
    shard = data["shards"][index]
    raw = (ds / shard["file"]).read_bytes()
    shard["bytes"], shard["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    try:
        meta = pq.ParquetFile(ds / shard["file"]).metadata
        shard["rows"], shard["row_groups"] = meta.num_rows, meta.num_row_groups
    except Exception:  # not parquet at all: keep the rows the manifest had
        pass
    _save_manifest(ds, data)


def _rewrite_shard(ds: Path, change: Callable[[Any], Any]) -> None:
    """Rewrite shard 0 through ``change(table) -> table`` with its row groups, then re-hash it."""
    import pyarrow.parquet as pq

    path = ds / "part-00000.parquet"
    table = change(pq.read_table(path))
    pq.write_table(table, path, row_group_size=8)
    _rehash_shard(ds)


def _replace_observation(table, row: int, payload: bytes):
    import pyarrow as pa

    values = table.column("observation").to_pylist()
    values[row] = payload
    i = table.schema.get_field_index("observation")
    return table.set_column(i, table.schema.field(i), pa.array(values, pa.binary()))


def _nan_observation(ds: Path) -> None:
    import numpy as np

    _rewrite_shard(ds, lambda t: _replace_observation(t, 3, np.full(64, np.nan, np.float32).tobytes()))


def _short_observation(ds: Path) -> None:
    import numpy as np

    _rewrite_shard(ds, lambda t: _replace_observation(t, 2, np.zeros(48, np.float32).tobytes()))


def _extra_column(ds: Path) -> None:
    import pyarrow as pa

    _rewrite_shard(ds, lambda t: t.append_column("comment", pa.array(["x"] * t.num_rows)))


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(ds: Path) -> None:
        data = _manifest(ds)
        change(data)
        _save_manifest(ds, data)

    return apply


def _flip_byte(ds: Path) -> None:
    path = ds / "part-00001.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(ds: Path) -> None:
    path = ds / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:-100])


def _not_parquet(ds: Path) -> None:
    (ds / "part-00000.parquet").write_text("observation,state\n1,2\n" * 20)
    _rehash_shard(ds)


def _empty(ds: Path) -> None:
    data = _manifest(ds)
    data.update(count=0, shards=[])
    _save_manifest(ds, data)


@dataclass(frozen=True)
class CliCase:
    """One malformed dataset or argument list; ``expect`` must appear in the one error line."""

    name: str
    expect: str
    prepare: Callable[[Path], None] | None = None  # breaks a valid dataset in place (inspect cases)
    argv: tuple[str, ...] = ()  # extra `rsd data corrupt` arguments (corrupt cases)
    spec_text: str | None = None  # content of a --spec file for corrupt cases


CLI_CASES: tuple[CliCase, ...] = (
    CliCase("inspect: manifest field 'count' missing", "count", _edit(lambda d: d.pop("count"))),
    CliCase("inspect: manifest 'image_shape' wrong type", "image_shape",
            _edit(lambda d: d.update(image_shape="8x8"))),
    CliCase("inspect: manifest 'count' disagrees with shards", "count", _edit(lambda d: d.update(count=41))),
    CliCase("inspect: manifest unknown operator kind", "unknown operator kind",
            _edit(lambda d: d["operator"].update(kind="deblur"))),
    CliCase("inspect: manifest format_version 2", "format_version", _edit(lambda d: d.update(format_version=2))),
    CliCase("inspect: manifest not valid JSON", "manifest.json",
            lambda ds: (ds / "manifest.json").write_text('{"name": "tiny", ')),
    CliCase("inspect: no manifest.json", "manifest.json", lambda ds: (ds / "manifest.json").unlink()),
    CliCase("inspect: empty dataset", "empty dataset", _empty),
    CliCase("inspect: shard checksum corrupted", "part-00001.parquet: checksum mismatch", _flip_byte),
    CliCase("inspect: shard truncated", "part-00001.parquet: truncated", _truncate),
    CliCase("inspect: shard missing", "part-00002.parquet", lambda ds: (ds / "part-00002.parquet").unlink()),
    CliCase("inspect: shard is not parquet", "part-00000.parquet: not a valid parquet file", _not_parquet),
    CliCase("inspect: NaN observation", "contains NaN", _nan_observation),
    CliCase("inspect: extra column", "unexpected column(s) ['comment']", _extra_column),
    CliCase("inspect: observation of wrong shape", "shape mismatch", _short_observation),
    CliCase("corrupt: --p 1.5", "'p'", argv=("--operator", "inpaint", "--p", "1.5")),
    CliCase("corrupt: mri --R 0.5", "'R'", argv=("--operator", "mri", "--R", "0.5")),
    CliCase("corrupt: blur --kernel-size 4", "kernel_size", argv=("--operator", "blur", "--kernel-size", "4")),
    CliCase("corrupt: unknown --source", "unknown source 'mnist-typo'",
            argv=("--operator", "inpaint", "--source", "mnist-typo")),
    CliCase("corrupt: --spec with unknown kind", "unknown operator kind", spec_text='{"kind": "deblur"}'),
    CliCase("corrupt: --spec not valid JSON/YAML", "not valid JSON/YAML", spec_text='{"kind": "inpaint", "p": [}'),
    CliCase("corrupt: --spec with unknown field", "pp", spec_text='{"kind": "inpaint", "pp": 0.3}'),
)


def cli_argv(case: CliCase, work: Path) -> list[str]:
    """Set up ``case`` under ``work`` (a fresh folder) and return its `rsd` arguments."""
    if case.prepare is not None:
        ds = work / "ds"
        write_tiny_dataset(str(ds))
        case.prepare(ds)
        return ["data", "inspect", str(ds), "--grid", str(work / "grid.png")]
    argv = list(case.argv)
    if case.spec_text is not None:
        spec = work / "spec.json"
        spec.write_text(case.spec_text)
        argv += ["--spec", str(spec)]
    if "--source" not in argv:
        argv += ["--source", "fashion-mnist"]
    return ["data", "corrupt", *argv, "--limit", "4", "--out", str(work / "out")]


def check_cli_output(case: CliCase, code: int, stderr: str, out_dir: Path | None) -> str | None:
    """Why the CLI's answer to ``case`` is not a clean one-line error, or None when it is."""
    lines = stderr.strip().splitlines()
    if code != 2:
        return f"exit code {code}, expected 2; stderr: {stderr.strip()[-300:]}"
    if "Traceback" in stderr:
        return "traceback on stderr"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"expected one 'error: ...' line, got {len(lines)}: {stderr.strip()[-300:]}"
    if case.expect not in lines[0]:
        return f"error does not name {case.expect!r}: {lines[0]}"
    if out_dir is not None and (out_dir / "manifest.json").exists():
        return "a manifest was written despite the error"
    return None


def cli_scenarios(work: Path) -> Iterator[Row]:
    """Every malformed input through a real `rsd` process: one line, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for i, case in enumerate(CLI_CASES):
        folder = work / f"cli-{i:02d}"
        folder.mkdir(parents=True)
        argv = cli_argv(case, folder)
        proc = subprocess.run([sys.executable, "-m", "rsd_cli.main", *argv], capture_output=True, text=True,
                              env=env, cwd=folder, timeout=120)
        problem = check_cli_output(case, proc.returncode, proc.stderr, folder / "out")
        line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        yield Row(f"CLI {case.name}", FAILED if problem else CLEAR, problem or line[:200])


# --------------------------------------------------------------------------- kill -9 during training


def _child_train(dataset: str, out: str, steps: int, every: int, sleep_s: float) -> None:
    """The training process that gets killed: a tiny pretrain_stage that reports each step done."""
    import torch

    from rsd_core.config import NetworkConfig, TrainConfig
    from rsd_core.stages import pretrain_stage

    torch.set_num_threads(1)
    progress = Path(out) / "progress"
    Path(out).mkdir(parents=True, exist_ok=True)

    def callback(step: int, metrics: dict[str, float]) -> None:
        progress.write_text(str(step))
        if sleep_s:
            time.sleep(sleep_s)  # paces the run so the kill lands between checkpoints, not after the end

    train = TrainConfig(steps=steps, batch_size=16, lr=2e-3, lr_rampup_steps=5, checkpoint_every=every,
                        precision="fp32", ema_halflife_nimg=200, device="cpu")
    _, result = pretrain_stage(dataset, NetworkConfig(**TINY_NETWORK), train, out, callback=callback, progress=False)
    print(json.dumps({"steps": result.steps, "checkpoints": [Path(c).name for c in result.checkpoints]}))


def _train_process(dataset: Path, out: Path, sleep_s: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.faults", "--child-train", str(dataset), str(out),
           str(KILL_STEPS), str(KILL_EVERY), str(sleep_s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"training process exited {proc.returncode}: {err.strip()[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def kill_and_resume(work: Path) -> dict:
    """SIGKILL a training process between checkpoints, rerun it, compare with an uninterrupted run.

    Returns what was measured: the step reached at the kill, the checkpoint resumed from, the
    final step counts and whether the final teachers are bit-identical.
    """
    import torch
    from safetensors.torch import load_file

    from rsd_core.train.loop import list_checkpoints

    dataset = work / "data"
    write_tiny_dataset(str(dataset))
    killed_dir, straight_dir = work / "killed", work / "straight"
    proc = _train_process(dataset, killed_dir, sleep_s=0.05)
    ckpts = killed_dir / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while len(list_checkpoints(ckpts)) < 2:  # kill after the second checkpoint, mid-interval
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training ended or stalled before 2 checkpoints: {proc.communicate()[1][-500:]}")
            time.sleep(0.02)
        time.sleep(KILL_EVERY * 0.05 / 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    reached = int((killed_dir / "progress").read_text() or 0)
    resumed_from = int(list_checkpoints(ckpts)[-1].name.split("-")[1])
    resumed = _finish(_train_process(dataset, killed_dir))
    straight = _finish(_train_process(dataset, straight_dir))
    a = load_file(str(killed_dir / "teacher" / "model.safetensors"))
    b = load_file(str(straight_dir / "teacher" / "model.safetensors"))
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"killed_at": reached, "resumed_from": resumed_from, "lost": reached - resumed_from,
            "resumed_steps": resumed["steps"], "straight_steps": straight["steps"], "identical": identical,
            "returncode": proc.returncode}


def kill_scenario(work: Path) -> Iterator[Row]:
    r = kill_and_resume(work)
    ok = (r["returncode"] == -signal.SIGKILL and r["lost"] <= KILL_EVERY
          and r["resumed_steps"] == r["straight_steps"] == KILL_STEPS)
    detail = (f"killed at step {r['killed_at']}/{KILL_STEPS}, resumed from step-{r['resumed_from']:07d} "
              f"(lost {r['lost']} <= {KILL_EVERY} steps), ended at {r['resumed_steps']} like the uninterrupted "
              f"run ({r['straight_steps']}); final teacher {'bit-identical' if r['identical'] else 'DIFFERS'}")
    yield Row("kill -9 of a training process mid-run", RECOVERED if ok and r["identical"] else FAILED, detail)


# --------------------------------------------------------------------------- NaN batches


class NaNBatches:
    """Wraps a batch source: batches ``start+1 .. start+count`` (or all after ``start``) are NaN."""

    def __init__(self, source: Any, start: int, count: int | None = None):
        self.source, self.start, self.count, self.calls = source, start, count, 0

    def next_batch(self, batch_size: int, generator: Any):
        import torch

        y, state = self.source.next_batch(batch_size, generator)
        self.calls += 1
        end = float("inf") if self.count is None else self.start + self.count
        if self.start < self.calls <= end:
            y = torch.full_like(y, float("nan"))
        return y, state

    def seek(self, batches_done: int) -> None:
        self.source.seek(batches_done)


def nan_scenarios(work: Path) -> Iterator[Row]:
    import torch

    from rsd_core.config import NetworkConfig, TrainConfig
    from rsd_core.kinds import build_operator, objective_for
    from rsd_core.train.loop import TrainingDivergedError, list_checkpoints, load_checkpoint
    from rsd_core.train.pretrain import PretrainPhase, TensorSource, build_teacher, pretrain_teacher

    spec, y, state = tiny_arrays(64)
    objective = objective_for(build_operator(spec))
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-3, lr_rampup_steps=5, checkpoint_every=10, precision="fp32",
                      ema_halflife_nimg=200, max_nonfinite_in_row=5, device="cpu")

    def teacher():
        torch.manual_seed(0)
        return build_teacher(NetworkConfig(**TINY_NETWORK), objective)

    phase, result = pretrain_teacher(teacher(), objective, NaNBatches(TensorSource(y, state), 12, count=3), cfg,
                                     work / "transient", progress=False)
    finite = all(torch.isfinite(p).all() for p in phase.net.parameters())
    ok = result.nonfinite_skipped == 3 and result.steps == 30 and finite
    yield Row("NaN in 3 batches", RECOVERED if ok else FAILED,
              f"{result.nonfinite_skipped} steps skipped and counted, run ended at step {result.steps}, "
              f"weights {'finite' if finite else 'NOT finite'}")

    out = work / "persistent"
    try:
        pretrain_teacher(teacher(), objective, NaNBatches(TensorSource(y, state), 15), cfg, out, progress=False)
        yield Row("NaN in every batch from step 16", FAILED, "training did not stop")
        return
    except TrainingDivergedError as err:
        message = str(err)
    last = list_checkpoints(out / "checkpoints")
    named = bool(last) and str(last[-1]) in message
    fresh = PretrainPhase(teacher(), objective, TensorSource(y, state), cfg, {})
    meta = load_checkpoint(last[-1], fresh, None)
    loadable = all(torch.isfinite(p).all() for m in fresh.modules.values() for p in m.parameters())
    ok = named and loadable and meta["step"] == 10
    yield Row("NaN in every batch from step 16", CLEAR if ok else FAILED,
              f"TrainingDivergedError: {message.replace(str(out), '<out>')}; "
              f"{last[-1].name} (step {meta['step']}) loads with finite weights")


# --------------------------------------------------------------------------- S3 faults on a real server


class PodKilled(RuntimeError):
    """Stands in for a pod dying mid-training: raised from the metrics callback after a checkpoint."""


RETRY_TRAIN = {"steps": 12, "batch_size": 16, "lr": 2e-3, "lr_rampup_steps": 2, "checkpoint_every": 4,
               "keep_checkpoints": 1, "precision": "fp32", "ema_halflife_nimg": 200, "device": "cpu"}


def train_attempt(dataset: str, work: Path, checkpoint: Any, die_at: int | None = None) -> dict:
    """One Flyte attempt of the pretraining task on a fresh pod (``work`` is its empty disk).

    ``checkpoint`` is the attempt's flytekit ``Checkpoint`` (None: no retries); training dies with
    :class:`PodKilled` at step ``die_at``. Returns the restored checkpoints, the steps this attempt
    ran, the final step count and the saved teacher folder.
    """
    from rsd_core.config import NetworkConfig, TrainConfig
    from rsd_core.stages import PRETRAIN_DIR, pretrain_stage
    from tasks.checkpoints import AttemptCheckpoints

    steps: list[int] = []

    def callback(step: int, metrics: dict) -> None:
        steps.append(step)
        if step == die_at:
            raise PodKilled(f"pod lost at step {step}")

    attempt = AttemptCheckpoints(checkpoint, work / PRETRAIN_DIR / "checkpoints")
    restored = attempt.restore()
    teacher_dir, result = pretrain_stage(dataset, NetworkConfig(**TINY_NETWORK), TrainConfig(**RETRY_TRAIN), work,
                                         callback=callback, progress=False, on_checkpoint=attempt)
    return {"restored": restored, "steps": steps, "final_step": result.steps, "teacher": teacher_dir}


@contextlib.contextmanager
def flyte_s3_access(server: Any) -> Iterator[Any]:
    """flytekit's file access pointed at ``server`` (an S3Server), as a pod's would be."""
    from flytekit.configuration import DataConfig, S3Config
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider

    s3 = S3Config(endpoint=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key)
    ctx = FlyteContextManager.current_context()
    access = FileAccessProvider(ctx.file_access.local_sandbox_dir, f"s3://{server.bucket}/raw", DataConfig(s3=s3))
    with FlyteContextManager.with_context(ctx.with_file_access(access)):
        yield access


def retry_on_new_pod(work: Path, server: Any) -> Row:
    """The pod dies between checkpoints; Flyte's retry runs on a new pod with an empty disk."""
    from flytekit.core.checkpointer import SyncCheckpoint

    dataset = str(work / "data")
    write_tiny_dataset(dataset)
    prefix = f"s3://{server.bucket}/retry-{uuid.uuid4().hex[:8]}"
    die_at = 10
    with flyte_s3_access(server):
        try:
            train_attempt(dataset, work / "pod-0", SyncCheckpoint(f"{prefix}/attempt-0"), die_at=die_at)
            return Row("pod lost mid-training (Flyte retry, new pod)", FAILED, "the first attempt was not killed")
        except PodKilled:
            pass
        second = train_attempt(dataset, work / "pod-1", SyncCheckpoint(f"{prefix}/attempt-1", f"{prefix}/attempt-0"))
    resumed_from = second["steps"][0] - 1
    lost = die_at - resumed_from
    ok = (second["restored"] == [f"step-{resumed_from:07d}"] and lost <= RETRY_TRAIN["checkpoint_every"]
          and second["final_step"] == RETRY_TRAIN["steps"])
    return Row("pod lost mid-training (Flyte retry, new pod)", RECOVERED if ok else FAILED,
               f"died at step {die_at}; the retry's empty disk restored {second['restored']} from the previous "
               f"attempt's checkpoint location on S3, lost {lost} <= {RETRY_TRAIN['checkpoint_every']} steps, "
               f"ended at {second['final_step']}/{RETRY_TRAIN['steps']}")


def s3_scenarios(work: Path) -> Iterator[Row]:
    """Wrong credentials, a missing bucket, a shard deleted mid-read, an interrupted write."""
    import fsspec

    from rsd_core.data.manifest import DatasetError
    from rsd_core.data.reader import open_dataset

    sys.path.insert(0, str(ROOT))
    from tests.servers import start_seaweedfs, stop_process

    proc, server = start_seaweedfs(work / "seaweedfs")
    try:
        good = {"key": server.access_key, "secret": server.secret_key,
                "client_kwargs": {"endpoint_url": server.endpoint_url}}
        uri = f"s3://{server.bucket}/{uuid.uuid4().hex[:8]}"
        write_tiny_dataset(uri, storage_options=good)
        yield s3_wrong_credentials(uri, {**good, "secret": "not-the-secret"})
        missing = f"s3://rsd-missing-{uuid.uuid4().hex[:8]}/data"
        try:
            open_dataset(missing, good)
            yield Row("S3 missing bucket", FAILED, "opened without error")
        except (DatasetError, OSError) as err:
            named = missing in str(err)
            yield Row("S3 missing bucket", CLEAR if named else FAILED, f"{type(err).__name__}: {err}"[:200])

        fs = fsspec.filesystem("s3", **good)
        ds = open_dataset(uri, good)
        seen = 0
        try:
            for batch in ds.iter_batches(batch_size=8):
                seen += len(batch.index)
                if seen == 8:  # first row group of shard 0 read: delete a later shard under the reader
                    fs.rm(posixpath.join(uri.removeprefix("s3://"), "part-00002.parquet"))
            yield Row("S3 shard deleted mid-read", FAILED, f"read {seen} rows without error")
        except (DatasetError, OSError) as err:
            ok = uri in str(err) and "part-00002.parquet" in str(err)
            yield Row("S3 shard deleted mid-read", CLEAR if ok else FAILED,
                      f"after {seen} rows: {type(err).__name__}: {err}"[:200])
        yield s3_interrupted_write(f"s3://{server.bucket}/{uuid.uuid4().hex[:8]}", good, fs)
        yield retry_on_new_pod(work / "retry", server)
    finally:
        stop_process(proc)


def s3_wrong_credentials(uri: str, bad_options: dict) -> Row:
    """Reading with a wrong secret must fail with an error that names the URI."""
    from rsd_core.data.manifest import DatasetError
    from rsd_core.data.reader import open_dataset

    try:
        open_dataset(uri, bad_options).read_all()
        return Row("S3 wrong credentials", FAILED, "read without error")
    except (DatasetError, OSError) as err:
        text = f"{type(err).__name__}: {err}"
        if uri in str(err):
            return Row("S3 wrong credentials", CLEAR, text[:200])
        return Row("S3 wrong credentials", FAILED, f"error does not name the URI: {text[:150]} "
                   "(needs rsd_core/data.py to wrap OSError from the filesystem with the URI)")


def s3_interrupted_write(uri: str, options: dict, fs: Any) -> Row:
    """A producer that dies after 2 of 5 batches: shards may exist, a manifest must not."""
    from rsd_core.data.manifest import DatasetError
    from rsd_core.data.reader import open_dataset
    from rsd_core.data.writer import write_dataset

    spec, y, state = tiny_arrays(40)

    def batches():
        for start in range(0, 40, 8):
            if start == 16:
                raise ConnectionError("producer died mid-write (injected)")
            yield y[start:start + 8], {k: v[start:start + 8] for k, v in state.items()}, None

    try:
        write_dataset(uri, batches(), name="tiny", image_shape=(1, 8, 8), operator=spec, rows_per_shard=8,
                      rows_per_group=8, storage_options=options)
        return Row("S3 write interrupted", FAILED, "write_dataset returned")
    except ConnectionError:
        pass
    root = uri.removeprefix("s3://")
    fs.invalidate_cache()
    left = sorted(posixpath.basename(p) for p in fs.ls(root)) if fs.exists(root) else []
    try:
        open_dataset(uri, options)
        return Row("S3 write interrupted", FAILED, f"the partial dataset opens ({left})")
    except DatasetError as err:
        ok = "manifest.json" not in left and uri in str(err)
        return Row("S3 write interrupted", CLEAR if ok else FAILED,
                   f"left {left} and no manifest.json; open_dataset: {err}"[:200])


# --------------------------------------------------------------------------- MLflow registration


def _register_fake(client, name: str, execution: str, fingerprint: str, fd: float, log_model):
    """Register an inpainting generator scored "x/n1" (the registry faults only vary these)."""
    from tasks import registry

    return registry.register_generator(client, name=name, execution_run_id=execution, fingerprint=fingerprint,
                                       scoring="x/n1", operator_kind="inpaint", proximal_fd=fd, log_model=log_model)


def _fake_model_info(client: Any, experiment_id: str) -> Callable[[], Any]:
    """A ``log_model`` stand-in: a run with no artifacts, so a registration costs milliseconds."""

    def log_model():
        run = client.create_run(experiment_id)
        uri = f"runs:/{run.info.run_id}/generator"
        return SimpleNamespace(model_uri=uri, run_id=run.info.run_id, model_id=None)

    return log_model


def mlflow_down_scenario(work: Path) -> Row:
    """A real ``mlflow server`` killed (SIGKILL) just before registration, then brought back.

    Registration must fail after bounded retries with an error naming the server, leave the
    exported model untouched, and succeed when re-run alone once the server is back (same
    SQLite backend, same port), registering exactly one version.
    """
    sys.path.insert(0, str(ROOT))
    from tests.servers import start_mlflow, start_seaweedfs, stop_process

    fault = "MLflow server down at registration"
    export = work / "export"
    export.mkdir(parents=True)
    for name, content in {"generator.onnx": b"onnx", "card.json": b"{}", "model.safetensors": b"w"}.items():
        (export / name).write_bytes(content)
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    s3_proc, s3 = start_seaweedfs(work / "seaweedfs")
    procs = [s3_proc]
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_URI"]}
    try:
        server_proc, server = start_mlflow(work / "mlflow", s3)
        procs.append(server_proc)
        os.environ.update(env, MLFLOW_TRACKING_URI=server.tracking_uri)
        from tasks import registry, tracking

        client = tracking.client()
        experiment = tracking.experiment_id(client, "faults-down")
        log_model = _fake_model_info(client, experiment)
        os.killpg(server_proc.pid, signal.SIGKILL)  # server and its uvicorn workers die before registration
        server_proc.wait()
        t0 = time.perf_counter()
        try:
            _register_fake(client, "rsd-faults", "exec-down", "f" * 64, 1.0, log_model)
            return Row(fault, FAILED, "registration succeeded while the server was down")
        except Exception as err:  # MlflowException; anything else is reported as it is
            seconds, kind = time.perf_counter() - t0, type(err).__name__
            text = " ".join(str(err).split())
        kept = {p.name: p.read_bytes() for p in export.iterdir()} == before
        named = server.tracking_uri.removeprefix("http://") in text
        port = int(server.tracking_uri.rsplit(":", 1)[1])
        server_proc, server = start_mlflow(work / "mlflow", s3, port=port)
        procs.append(server_proc)
        again = _register_fake(client, "rsd-faults", "exec-down", "f" * 64, 1.0, log_model)
        versions = client.search_model_versions("name='rsd-faults'")
        ok = kept and named and seconds < 60 and again.alias == registry.CHAMPION and len(versions) == 1
        return Row(fault, CLEAR if ok else FAILED,
                   f"real server SIGKILLed: {kind} after {seconds:.1f} s (3 HTTP retries, backoff "
                   f"1-2-4 s; the task has Flyte retries=2): {text[:90]}...; export {'intact' if kept else 'CHANGED'};"
                   f" server restarted, registration re-run alone: version {again.version} @{again.alias}, "
                   f"{len(versions)} version(s)")
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def race_once(client: Any, experiment_id: str, name: str, scores: dict[str, float]) -> tuple[Any, list]:
    """Register one version per entry of ``scores`` concurrently (threads released together just
    before registration), on one dataset; returns the final champion and what each thread saw."""
    from tasks import registry

    barrier = threading.Barrier(len(scores))
    out: list = []
    log = _fake_model_info(client, experiment_id)

    def run(execution: str, fd: float) -> None:
        def log_model():
            info = log()
            barrier.wait(timeout=30)  # both versions exist; both now read the champion and promote
            return info

        try:
            out.append(_register_fake(client, name, execution, "d" * 64, fd, log_model))
        except Exception as err:
            out.append(err)

    with contextlib.suppress(Exception):  # up front, so the race is over the alias, not the model
        client.create_registered_model(name)
    threads = [threading.Thread(target=run, args=item) for item in scores.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return registry.current_champion(client, name), out


def mlflow_race_scenario(work: Path, trials: int = 6) -> Row:
    """Two registrations racing for ``champion`` on one SQLite store: the better must win."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    try:
        from tasks import tracking

        client = tracking.client()
        exp = tracking.experiment_id(client, "faults-race")
        wrong, errors = 0, []
        for i in range(trials):
            scores = {f"exec-worse-{i}": 12.0, f"exec-better-{i}": 7.0}
            champion, results = race_once(client, exp, f"rsd-race-{i}", scores)
            errors += [r for r in results if isinstance(r, Exception)]
            fd = None if champion is None else float(champion.tags.get("rsd.proximal_fd", "nan"))
            wrong += fd != 7.0
        ok = wrong == 0 and not errors
        detail = f"{trials} races of 2 threads (Proximal FD 12.0 vs 7.0): the better is champion in " \
                 f"{trials - wrong}/{trials}"
        if errors:
            detail += f"; {len(errors)} registrations raised: {type(errors[0]).__name__}: {errors[0]}"[:150]
        if wrong:
            detail += " (tasks/registry.py reads the champion and sets the alias without re-checking)"
        return Row("two registrations racing for champion", RECOVERED if ok else FAILED, detail)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def mlflow_scenarios(work: Path) -> Iterator[Row]:
    if not (ROOT / "tasks" / "registry.py").exists():
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return
    sys.path.insert(0, str(ROOT))
    yield mlflow_down_scenario(work / "down")
    yield mlflow_race_scenario(work / "race")


if __name__ == "__main__":  # the kill scenario's child: python -m tests.faults --child-train ...
    if sys.argv[1:2] != ["--child-train"] or len(sys.argv) != 7:
        sys.exit("usage: python -m tests.faults --child-train DATASET OUT STEPS EVERY SLEEP")
    _dataset, _out, _steps, _every, _sleep = sys.argv[2:]
    _child_train(_dataset, _out, int(_steps), int(_every), float(_sleep))
