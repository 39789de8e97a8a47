"""Writing a dataset: shards streamed in record batches (memory does not grow with the dataset), every row
validated before it is written, the manifest last, so an interrupted write never looks complete (a re-run
overwrites the partial shards)."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rsd_core.config import OperatorSpec
from rsd_core.data.manifest import (
    MANIFEST_NAME,
    ArrayLike,
    DatasetError,
    Manifest,
    ShardInfo,
    WriteBatch,
    arrow_schema,
    check_values,
    default_observation_range,
    expected_state,
    parse_spec,
)
from rsd_core.data.storage import HashingSink, filesystem, is_local
from rsd_core.kinds import build_operator


def _to_numpy(value: ArrayLike) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _split_arrays(
    observations: ArrayLike,
    state: Mapping[str, ArrayLike] | None,
    labels: ArrayLike | None,
    rows: int,
) -> Iterator[WriteBatch]:
    n = len(observations)
    for key, value in (state or {}).items():
        if len(value) != n:
            raise DatasetError(f"state '{key}' has {len(value)} rows, observations have {n}")
    if labels is not None and len(labels) != n:
        raise DatasetError(f"labels have {len(labels)} rows, observations have {n}")
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        yield (
            observations[start:stop],
            {k: v[start:stop] for k, v in (state or {}).items()},
            None if labels is None else labels[start:stop],
        )


def _rechunk(batches: Iterable[WriteBatch], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of any size -> numpy chunks of exactly ``rows`` rows (the last may be short),
    so every parquet row group has the same size whatever the producer's batch size."""
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for obs, state, labels in batches:
        chunk = {"observation": _to_numpy(obs)}
        chunk.update({f"state:{k}": _to_numpy(v) for k, v in state.items()})
        if labels is not None:
            chunk["label"] = _to_numpy(labels)
        if not pending or chunk.keys() == pending[0].keys():
            pending.append(chunk)
        else:
            raise DatasetError(f"batch columns changed mid-stream: {sorted(pending[0])} then {sorted(chunk)}")
        pending_rows += len(chunk["observation"])
        while pending_rows >= rows:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
            yield {k: v[:rows] for k, v in merged.items()}
            rest = {k: v[rows:] for k, v in merged.items()}
            pending, pending_rows = ([rest], pending_rows - rows) if pending_rows > rows else ([], 0)
    if pending_rows:
        yield {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}


def _cast_exact(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Cast to the declared dtype only when no value changes (a uint8 mask may become float32)."""
    if values.dtype == np.dtype(dtype):
        return values
    cast = values.astype(dtype)
    if not np.array_equal(cast.astype(values.dtype), values):
        raise DatasetError(f"{what}: dtype {values.dtype} does not convert exactly to {dtype}")
    return cast


def _encode_chunk(chunk: dict[str, np.ndarray], start: int, manifest: Manifest) -> pa.RecordBatch:
    """Validate one chunk against the manifest and turn it into a record batch of bytes columns."""
    obs = chunk["observation"]
    n = len(obs)
    index = np.arange(start, start + n, dtype=np.int64)
    if tuple(obs.shape[1:]) != manifest.observation_shape:
        raise DatasetError(
            f"observations have per-sample shape {tuple(obs.shape[1:])}, expected "
            f"{manifest.observation_shape} for operator '{manifest.operator.kind}' on images "
            f"{manifest.image_shape}"
        )
    if not np.issubdtype(obs.dtype, np.floating):
        raise DatasetError(f"observations have dtype {obs.dtype}, expected floating values")
    obs = np.ascontiguousarray(obs, dtype=np.float32)
    check_values(obs, "observation", index, manifest.observation_range)
    given = {k.removeprefix("state:") for k in chunk if k.startswith("state:")}
    missing = sorted(set(manifest.state_keys) - given)
    if missing:
        raise DatasetError(
            f"per-sample state {missing} missing: operator '{manifest.operator.kind}' needs "
            f"{sorted(manifest.state_keys)} for every observation"
        )
    extra = sorted(given - set(manifest.state_keys))
    if extra:
        raise DatasetError(
            f"state {extra} not used by operator '{manifest.operator.kind}' (expected {sorted(manifest.state_keys)})"
        )
    columns: dict[str, pa.Array] = {
        "index": pa.array(index),
        "observation": _binary_column(obs),
    }
    for key, info in manifest.state_keys.items():
        values = chunk[f"state:{key}"]
        if tuple(values.shape[1:]) != info.shape:
            raise DatasetError(f"state '{key}' has per-sample shape {tuple(values.shape[1:])}, expected {info.shape}")
        values = np.ascontiguousarray(_cast_exact(values, info.dtype, f"state '{key}'"))
        check_values(values, f"state '{key}'", index, None)
        columns[key] = _binary_column(values)
    if "label" in chunk:
        labels = chunk["label"]
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        columns["label"] = pa.array(labels.astype(np.int64))
    return pa.RecordBatch.from_pydict(columns, schema=arrow_schema(manifest))


def _binary_column(values: np.ndarray) -> pa.Array:
    """Rows of a C-contiguous array as one binary value each, without a Python loop."""
    n = len(values)
    width = values[0].nbytes if n else 0
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * width)
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(values.tobytes())])


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _write_manifest(fs: Any, root: str, manifest: Manifest) -> None:
    """Atomic where the filesystem allows it: rename on local disks; an S3 PUT is atomic already."""
    text = manifest.model_dump_json(indent=2)
    final = posixpath.join(root, MANIFEST_NAME)
    if is_local(fs):
        tmp = posixpath.join(root, f".{MANIFEST_NAME}.tmp")
        fs.pipe_file(tmp, text.encode())
        fs.mv(tmp, final)
    else:
        fs.pipe_file(final, text.encode())


def write_dataset(
    uri: str,
    observations: ArrayLike | Iterable[WriteBatch],
    state: Mapping[str, ArrayLike] | None = None,
    labels: ArrayLike | None = None,
    *,
    name: str,
    image_shape: Sequence[int],
    operator: OperatorSpec | Mapping[str, Any],
    value_range: tuple[float, float] = (-1.0, 1.0),
    observation_range: tuple[float, float] | None = None,
    seed: int | None = None,
    provenance: Mapping[str, Any] | None = None,
    clean_eval_uri: str | None = None,
    rows_per_shard: int = 16384,
    rows_per_group: int = 1024,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write a corrupted dataset to ``uri``: shards first, ``manifest.json`` last.

    ``observations`` is either one array (N, C, H, W) with ``state`` {key: (N, ...)} and
    ``labels`` (N,), or an iterable of ``(observations, state, labels)`` batches (so a
    producer never holds the whole dataset). Rows get indices 0..N-1 in order. Every row is
    validated before it is written. Returns the manifest that was written.
    """
    if rows_per_group < 1 or rows_per_shard < rows_per_group or rows_per_shard % rows_per_group:
        raise DatasetError(
            f"rows_per_shard ({rows_per_shard}) must be a positive multiple of rows_per_group ({rows_per_group})"
        )
    spec = parse_spec(operator)
    op = build_operator(spec)
    image_shape = tuple(int(s) for s in image_shape)
    try:
        obs_shape = op.observation_shape(image_shape)
    except ValueError as err:
        raise DatasetError(f"image_shape {image_shape}: {err}") from None
    draft = Manifest(
        name=name,
        image_shape=image_shape,
        observation_shape=obs_shape,
        value_range=value_range,
        observation_range=observation_range or default_observation_range(spec, image_shape, value_range),
        count=0,
        operator=spec,
        state_keys=expected_state(op, image_shape),
        has_labels=False,
        seed=seed,
        provenance=dict(provenance or {}),
        shards=[],
        clean_eval_uri=clean_eval_uri,
    )
    if isinstance(observations, (np.ndarray, torch.Tensor)):
        batches: Iterable[WriteBatch] = _split_arrays(observations, state, labels, rows_per_group)
    elif state is not None or labels is not None:
        raise DatasetError("pass state and labels inside the batches when observations is an iterable")
    else:
        batches = observations

    fs, root = filesystem(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    manifest_path = posixpath.join(root, MANIFEST_NAME)
    if fs.exists(manifest_path):
        fs.rm(manifest_path)  # from here on the old dataset no longer looks complete
    shards, count, has_labels = _write_shards(fs, root, batches, draft, rows_per_shard, rows_per_group)
    if count == 0:
        raise DatasetError(f"{uri}: empty dataset, no observations were given")
    stale = [
        p
        for p in fs.glob(posixpath.join(root, "part-*.parquet"))
        if posixpath.basename(p) not in {s.file for s in shards}
    ]
    if stale:
        fs.rm(stale)
    manifest = draft.model_copy(update={"count": count, "shards": shards, "has_labels": has_labels})
    _write_manifest(fs, root, manifest)
    return manifest


def _write_shards(
    fs: Any,
    root: str,
    batches: Iterable[WriteBatch],
    draft: Manifest,
    rows_per_shard: int,
    rows_per_group: int,
) -> tuple[list[ShardInfo], int, bool]:
    shards: list[ShardInfo] = []
    count = 0
    has_labels: bool | None = None
    writer = raw = sink = None
    shard_rows = 0

    def close_shard() -> None:
        writer.close()
        raw.close()
        groups = math.ceil(shard_rows / rows_per_group)
        shards.append(
            ShardInfo(
                file=_shard_name(len(shards)),
                rows=shard_rows,
                row_groups=groups,
                bytes=sink.size,
                sha256=sink.sha256.hexdigest(),
            )
        )

    try:
        for chunk in _rechunk(batches, rows_per_group):
            if has_labels is None:
                has_labels = "label" in chunk
                draft = draft.model_copy(update={"has_labels": has_labels})
            elif has_labels != ("label" in chunk):
                raise DatasetError("labels given for some batches but not others")
            record = _encode_chunk(chunk, count, draft)
            if writer is None:
                raw = fs.open(posixpath.join(root, _shard_name(len(shards))), "wb")
                sink = HashingSink(raw)
                writer = pq.ParquetWriter(sink, arrow_schema(draft), compression="zstd")
                shard_rows = 0
            writer.write_batch(record, row_group_size=rows_per_group)
            shard_rows += record.num_rows
            count += record.num_rows
            if shard_rows >= rows_per_shard:
                close_shard()
                writer = None
        if writer is not None:
            close_shard()
            writer = None
    finally:
        if writer is not None:  # interrupted: close the file handle; the missing manifest marks it partial
            writer.close()
            raw.close()
    return shards, count, bool(has_labels)
