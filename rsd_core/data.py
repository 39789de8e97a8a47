"""The corrupted-dataset format: parquet shards plus a JSON manifest on any fsspec path.

A dataset is a directory (local path or URL such as ``s3://bucket/prefix``) holding
``part-00000.parquet``... and ``manifest.json``. Each row is one observation y = A(x) + noise
with the per-sample operator state needed to re-apply A (e.g. the inpainting mask), because
training only ever sees corrupted data and must know which A produced each y.

Why this shape:
- Shards are written and read in record batches, so memory does not grow with dataset size.
- The manifest is written last: an interrupted write leaves no manifest and never looks
  complete; a re-run overwrites the partial shards.
- Every shard carries a sha256 in the manifest, checked before its first read, so a truncated
  upload or a silently altered file fails loudly instead of training on garbage.
- All validation failures raise one type, :class:`DatasetError`, whose message names the
  file, row or field and what was expected, so the CLI can print it as one line.
- S3 credentials come from the environment only, never from a file that could be committed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rsd_core.config import OperatorSpec, OperatorSpecBase
from rsd_core.kinds import build_operator
from rsd_core.operators import POOL_SIZE, Operator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_PATTERN = r"^part-\d{5}\.parquet$"
_HASH_CHUNK = 1 << 22

StateDType = Literal["float32", "float64", "int64", "int32", "uint8", "bool"]
ArrayLike = np.ndarray | torch.Tensor
WriteBatch = tuple[ArrayLike, Mapping[str, ArrayLike], ArrayLike | None]


class DatasetError(ValueError):
    """Any invalid, incomplete or corrupted dataset; the message names the file/row/field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateKeyInfo(_Model):
    """Per-sample shape and dtype of one operator state column."""

    shape: tuple[int, ...]
    dtype: StateDType


class ShardInfo(_Model):
    """One parquet shard; ``bytes`` lets a truncated shard be named before hashing it."""

    file: str = Field(pattern=_SHARD_PATTERN)
    rows: int = Field(ge=1)
    row_groups: int = Field(ge=1)
    bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Model):
    """Everything needed to interpret the shards; written after the shards, so it marks completion.

    ``value_range`` is the range of the clean images (what a generator should output);
    ``observation_range`` bounds the stored observations (noise and k-space exceed the image range).
    ``clean_eval_uri`` names an optional clean split used only for true-FID reporting; a relative
    path is resolved against this dataset's directory.
    """

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1)
    image_shape: tuple[int, int, int]
    observation_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    observation_range: tuple[float, float]
    count: int = Field(ge=0)
    operator: OperatorSpec
    state_keys: dict[str, StateKeyInfo]
    has_labels: bool
    seed: int | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    shards: list[ShardInfo]
    clean_eval_uri: str | None = None


@dataclass(frozen=True)
class Batch:
    """Rows read from a dataset: ``index`` (B,), ``observation`` (B, C, H, W) float32,
    ``state`` {key: (B, *shape)}, ``label`` (B,) int64 or None."""

    index: torch.Tensor
    observation: torch.Tensor
    state: dict[str, torch.Tensor]
    label: torch.Tensor | None


def _head(batch: Batch, n: int) -> Batch:
    """The first ``n`` rows of ``batch``."""
    label = None if batch.label is None else batch.label[:n]
    return Batch(batch.index[:n], batch.observation[:n], {k: v[:n] for k, v in batch.state.items()}, label)


# --------------------------------------------------------------------------- specs and errors


def _format_validation_error(err: ValidationError, where: str) -> str:
    """One line per pydantic error: the field path and what was wrong (an unknown or missing
    operator kind comes with the registered kinds)."""
    parts = []
    for e in err.errors():
        if e["type"].startswith("operator_kind"):
            parts.append(e["msg"])
            continue
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        got = e.get("input")
        shown = f" (got {got!r})" if isinstance(got, (int, float, str, bool)) else ""
        parts.append(f"field '{loc}': {e['msg']}{shown}")
    return f"{where}: " + "; ".join(parts)


def parse_spec(data: OperatorSpec | Mapping[str, Any], where: str = "operator spec") -> OperatorSpec:
    """Validate an operator spec, turning pydantic errors into a :class:`DatasetError`."""
    if not isinstance(data, Mapping):
        return data
    try:
        return OperatorSpecBase.model_validate(dict(data))
    except ValidationError as err:
        raise DatasetError(_format_validation_error(err, where)) from None


def expected_state(operator: Operator, image_shape: Sequence[int]) -> dict[str, StateKeyInfo]:
    """Per-sample state columns this operator needs for images of ``image_shape``."""
    return {
        key: StateKeyInfo(shape=shape, dtype=str(dtype).removeprefix("torch."))
        for key, (shape, dtype) in operator.state_shapes(tuple(image_shape)).items()
    }


def default_observation_range(
    spec: OperatorSpec, image_shape: Sequence[int], value_range: tuple[float, float]
) -> tuple[float, float]:
    """A provable bound on observations, so out-of-range values flag a wrong scale or corruption:
    the operator's bound on noiseless observations, plus a margin of 8 sigma_n for Gaussian
    noise (exceeded with probability ~1e-15 per value)."""
    lo, hi = build_operator(spec).observation_bound(image_shape, value_range)
    margin = 8.0 * spec.sigma_n
    return (lo - margin, hi + margin)


# --------------------------------------------------------------------------- storage


def storage_options_from_env(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the environment (never from config files or the manifest).

    S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and an endpoint from RSD_S3_ENDPOINT_URL or
    AWS_ENDPOINT_URL (for seaweedfs/MinIO); unset values fall through to botocore's defaults.
    """
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, Any] = {}
    if key := os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = key
    if secret := os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["secret"] = secret
    if endpoint := os.environ.get("RSD_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    options = storage_options if storage_options is not None else storage_options_from_env(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def _is_local(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def resolve_relative(uri: str, reference: str) -> str:
    """``reference`` as given if absolute (URL or absolute path), else relative to ``uri``."""
    if "://" in reference or reference.startswith("/"):
        return reference
    if "://" in uri:
        return f"{uri.rstrip('/')}/{reference}"
    return os.path.join(uri, reference)


class _HashingSink:
    """A write-only file wrapper that hashes and counts bytes as pyarrow streams them out."""

    def __init__(self, raw: Any):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.sha256.update(chunk)
        self.size += len(chunk)
        self._raw.write(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


# --------------------------------------------------------------------------- writing


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


def _check_values(values: np.ndarray, where: str, index: np.ndarray, bounds: tuple[float, float] | None) -> None:
    """NaN/Inf anywhere, or values outside ``bounds``: name the first offending row."""
    flat = values.reshape(len(values), -1)
    if not np.issubdtype(flat.dtype, np.floating):
        return
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DatasetError(f"{where}: row with index {int(index[row])} contains NaN or Inf")
    if bounds is None or flat.size == 0:
        return
    lo, hi = bounds
    outside = (flat.min(axis=1) < lo) | (flat.max(axis=1) > hi)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DatasetError(
            f"{where}: row with index {int(index[row])} has values in "
            f"[{flat[row].min():.4g}, {flat[row].max():.4g}], outside the declared range [{lo:.4g}, {hi:.4g}]"
        )


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
    _check_values(obs, "observation", index, manifest.observation_range)
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
        _check_values(values, f"state '{key}'", index, None)
        columns[key] = _binary_column(values)
    if "label" in chunk:
        labels = chunk["label"]
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        columns["label"] = pa.array(labels.astype(np.int64))
    return pa.RecordBatch.from_pydict(columns, schema=_schema(manifest))


def _binary_column(values: np.ndarray) -> pa.Array:
    """Rows of a C-contiguous array as one binary value each, without a Python loop."""
    n = len(values)
    width = values[0].nbytes if n else 0
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * width)
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(values.tobytes())])


def _schema(manifest: Manifest) -> pa.Schema:
    fields = [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("observation", pa.binary(), nullable=False),
    ]
    fields += [pa.field(key, pa.binary(), nullable=False) for key in manifest.state_keys]
    if manifest.has_labels:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    return pa.schema(fields)


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _write_manifest(fs: Any, root: str, manifest: Manifest) -> None:
    """Atomic where the filesystem allows it: rename on local disks; an S3 PUT is atomic already."""
    text = manifest.model_dump_json(indent=2)
    final = posixpath.join(root, MANIFEST_NAME)
    if _is_local(fs):
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

    fs, root = _filesystem(uri, storage_options)
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
                sink = _HashingSink(raw)
                writer = pq.ParquetWriter(sink, _schema(draft), compression="zstd")
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


# --------------------------------------------------------------------------- reading


def _load_manifest(fs: Any, root: str, uri: str) -> Manifest:
    path = posixpath.join(root, MANIFEST_NAME)
    fs.invalidate_cache(root)
    if not fs.exists(path):
        raise DatasetError(f"{uri}: no {MANIFEST_NAME} (not a dataset, or its write did not finish)")
    try:
        data = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{MANIFEST_NAME}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{MANIFEST_NAME}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(
            f"{MANIFEST_NAME}: field 'format_version' is {version!r}, this reader understands {FORMAT_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise DatasetError(_format_validation_error(err, MANIFEST_NAME)) from None
    _check_manifest(manifest)
    return manifest


def _check_manifest(manifest: Manifest) -> None:
    """Cross-field consistency that the field types alone cannot express."""
    where = MANIFEST_NAME
    if manifest.count == 0 or not manifest.shards:
        raise DatasetError(f"{where}: empty dataset (count {manifest.count}, {len(manifest.shards)} shards)")
    total = sum(s.rows for s in manifest.shards)
    if total != manifest.count:
        raise DatasetError(f"{where}: field 'count' is {manifest.count} but the shards hold {total} rows")
    files = [s.file for s in manifest.shards]
    if len(set(files)) != len(files):
        raise DatasetError(f"{where}: field 'shards' lists a file twice")
    for field in ("value_range", "observation_range"):
        lo, hi = getattr(manifest, field)
        if not lo < hi:
            raise DatasetError(f"{where}: field '{field}' must be [low, high] with low < high, got [{lo}, {hi}]")
    if min(manifest.image_shape) < 1:
        raise DatasetError(f"{where}: field 'image_shape' must be positive, got {manifest.image_shape}")
    op = build_operator(manifest.operator)
    try:
        expected_obs = op.observation_shape(manifest.image_shape)
    except ValueError as err:
        raise DatasetError(f"{where}: field 'image_shape': {err}") from None
    if tuple(manifest.observation_shape) != tuple(expected_obs):
        raise DatasetError(
            f"{where}: field 'observation_shape' is {manifest.observation_shape}, operator "
            f"'{manifest.operator.kind}' on images {manifest.image_shape} gives {expected_obs}"
        )
    needed = expected_state(op, manifest.image_shape)
    missing = sorted(set(needed) - set(manifest.state_keys))
    if missing:
        raise DatasetError(
            f"{where}: field 'state_keys' lacks per-sample state {missing} that operator "
            f"'{manifest.operator.kind}' needs"
        )
    for key, info in manifest.state_keys.items():
        if key not in needed:
            raise DatasetError(
                f"{where}: field 'state_keys' has '{key}', which operator '{manifest.operator.kind}' does not use"
            )
        if info != needed[key]:
            raise DatasetError(
                f"{where}: field 'state_keys.{key}' is {info.shape} {info.dtype}, expected "
                f"{needed[key].shape} {needed[key].dtype}"
            )


def _decode_binary(column: pa.Array, shape: tuple[int, ...], dtype: str, where: str, index: np.ndarray) -> np.ndarray:
    """A binary column of fixed-size rows -> array (n, *shape); a wrong byte length names the row."""
    n = len(column)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{where}: row with index {int(index[row])} is null")
    width = math.prod(shape) * np.dtype(dtype).itemsize
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type, count=n + 1, offset=column.offset * offset_type().itemsize)
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = int(bad[0])
        raise DatasetError(
            f"{where}: row with index {int(index[row])} holds {int(lengths[row])} bytes, expected {width} "
            f"({dtype} of shape {shape}): shape mismatch"
        )
    if n == 0:
        return np.empty((0, *shape), dtype=dtype)
    data = np.frombuffer(data_buf, dtype=np.uint8, count=n * width, offset=int(offsets[0]))
    return data.view(dtype).reshape((n, *shape)).copy()


class CorruptedDataset:
    """An opened, validated dataset. Shards are read lazily; each is hashed before its first read."""

    def __init__(self, uri: str, manifest: Manifest, fs: Any, root: str, storage_options: Mapping | None):
        self.uri = uri
        self.manifest = manifest
        self._fs = fs
        self._root = root
        self._storage_options = storage_options
        self._verified: set[str] = set()
        self._operator: Operator | None = None

    def __len__(self) -> int:
        return self.manifest.count

    def __repr__(self) -> str:
        m = self.manifest
        return f"CorruptedDataset({self.uri!r}, name={m.name!r}, count={m.count}, operator={m.operator.kind!r})"

    @property
    def operator(self) -> Operator:
        """The operator that produced the observations, built from the manifest spec (with the observed
        states of the first rows attached, where its fresh states are drawn from observed ones)."""
        if self._operator is None:
            operator = build_operator(self.manifest.operator)
            if operator.pool_keys:
                operator.attach_pool(self.read_all(limit=POOL_SIZE)[1])
            self._operator = operator
        return self._operator

    @property
    def fingerprint(self) -> str:
        """sha256 over the shard checksums: equal fingerprints mean byte-identical data."""
        text = "\n".join(f"{s.file}:{s.sha256}" for s in self.manifest.shards)
        return hashlib.sha256(f"rsd-dataset-v{self.manifest.format_version}\n{text}".encode()).hexdigest()

    def _path(self, shard: ShardInfo) -> str:
        return posixpath.join(self._root, shard.file)

    def check_files(self) -> None:
        """Every shard exists with the size the manifest records (one listing, no reads)."""
        self._fs.invalidate_cache(self._root)  # another process may have rewritten it
        listing = {posixpath.basename(e["name"]): e for e in self._fs.ls(self._root, detail=True)}
        for shard in self.manifest.shards:
            entry = listing.get(shard.file)
            if entry is None:
                raise DatasetError(f"{shard.file}: listed in {MANIFEST_NAME} but missing from {self.uri}")
            size = int(entry.get("size") or 0)
            if size < shard.bytes:
                raise DatasetError(f"{shard.file}: truncated, {size} bytes, {MANIFEST_NAME} says {shard.bytes}")
            if size != shard.bytes:
                raise DatasetError(f"{shard.file}: {size} bytes, {MANIFEST_NAME} says {shard.bytes}")

    def verify_shard(self, i: int) -> None:
        """Stream shard ``i`` through sha256 (constant memory) and compare with the manifest."""
        shard = self.manifest.shards[i]
        if shard.file in self._verified:
            return
        digest = hashlib.sha256()
        size = 0
        try:
            with self._fs.open(self._path(shard), "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise DatasetError(f"{shard.file}: listed in {MANIFEST_NAME} but missing from {self.uri}") from None
        if size < shard.bytes:
            raise DatasetError(f"{shard.file}: truncated, {size} bytes, {MANIFEST_NAME} says {shard.bytes}")
        if digest.hexdigest() != shard.sha256:
            raise DatasetError(
                f"{shard.file}: checksum mismatch, sha256 {digest.hexdigest()[:16]}..., "
                f"{MANIFEST_NAME} says {shard.sha256[:16]}..."
            )
        self._verified.add(shard.file)

    def verify(self) -> None:
        """Check every shard's checksum now rather than on first read."""
        for i in range(len(self.manifest.shards)):
            self.verify_shard(i)

    def units(self) -> list[tuple[int, int]]:
        """(shard, row group) pairs: the unit of work that streaming splits across workers."""
        return [(i, g) for i, s in enumerate(self.manifest.shards) for g in range(s.row_groups)]

    def units_rows(self) -> dict[tuple[int, int], int]:
        """Rows in each (shard, row group), from the shards' parquet footers (no data is read)."""
        out = {}
        for i, shard in enumerate(self.manifest.shards):
            with self._fs.open(self._path(shard), "rb") as handle:
                try:
                    meta = pq.read_metadata(handle)
                except (pa.ArrowException, OSError) as err:
                    raise DatasetError(f"{shard.file}: not a valid parquet file ({err})") from None
            if meta.num_row_groups != shard.row_groups:
                raise DatasetError(f"{shard.file}: {meta.num_row_groups} row groups, {MANIFEST_NAME} says "
                                   f"{shard.row_groups}")
            out.update({(i, g): meta.row_group(g).num_rows for g in range(shard.row_groups)})
        return out

    def _open_shard(self, i: int, stack: ExitStack) -> pq.ParquetFile:
        """Open shard ``i`` (closed with ``stack``) after its checksum and schema checks."""
        shard = self.manifest.shards[i]
        self.verify_shard(i)
        handle = stack.enter_context(self._fs.open(self._path(shard), "rb"))
        try:
            pf = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"{shard.file}: not a valid parquet file ({err})") from None
        stack.callback(pf.close)
        names = set(pf.schema_arrow.names)
        expected = set(_schema(self.manifest).names)
        if missing := sorted(expected - names):
            raise DatasetError(f"{shard.file}: missing column(s) {missing}, expected {sorted(expected)}")
        if extra := sorted(names - expected):
            raise DatasetError(f"{shard.file}: unexpected column(s) {extra}, expected {sorted(expected)}")
        if pf.metadata.num_rows != shard.rows or pf.num_row_groups != shard.row_groups:
            raise DatasetError(
                f"{shard.file}: {pf.metadata.num_rows} rows in {pf.num_row_groups} row groups, "
                f"{MANIFEST_NAME} says {shard.rows} rows in {shard.row_groups}"
            )
        return pf

    def _decode(self, record: pa.RecordBatch, file: str) -> Batch:
        m = self.manifest
        index_col = record.column("index")
        if index_col.null_count:
            raise DatasetError(f"{file}: column 'index' has nulls")
        index = index_col.to_numpy()
        obs = _decode_binary(
            record.column("observation"), m.observation_shape, "float32", f"{file}: observation", index
        )
        _check_values(obs, f"{file}: observation", index, m.observation_range)
        state = {}
        for key, info in m.state_keys.items():
            values = _decode_binary(record.column(key), info.shape, info.dtype, f"{file}: state '{key}'", index)
            _check_values(values, f"{file}: state '{key}'", index, None)
            state[key] = torch.from_numpy(values)
        label = None
        if m.has_labels:
            column = record.column("label")
            if column.null_count:
                raise DatasetError(f"{file}: column 'label' has nulls")
            label = torch.from_numpy(column.to_numpy().astype(np.int64))
        return Batch(torch.from_numpy(index.astype(np.int64)), torch.from_numpy(obs), state, label)

    def iter_batches(self, batch_size: int = 1024, units: Sequence[tuple[int, int]] | None = None) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` rows, row group by row group (bounded memory).

        ``units`` restricts and orders the (shard, row group) pairs read; default: all, in order.
        """
        current: int | None = None
        with ExitStack() as stack:
            for shard_i, group in self.units() if units is None else units:
                if shard_i != current:  # consecutive units of one shard share its open file
                    stack.close()
                    pf = self._open_shard(shard_i, stack)
                    current = shard_i
                file = self.manifest.shards[shard_i].file
                try:
                    for record in pf.iter_batches(batch_size=batch_size, row_groups=[group]):
                        yield self._decode(record, file)
                except pa.ArrowException as err:
                    raise DatasetError(f"{file}: unreadable row group {group} ({err})") from None

    def read_all(self, limit: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(observations, state, labels) of the first ``limit`` rows (default: all, for small data only) in
        index order; only the row groups holding them are read."""
        batches = []
        for batch in self.iter_batches():
            batches.append(batch)
            if limit is not None and sum(len(b.index) for b in batches) >= limit:
                break
        if limit is not None:
            batches = [_head(b, limit - sum(len(x.index) for x in batches[:i])) for i, b in enumerate(batches)]
        obs = torch.cat([b.observation for b in batches])
        state = {k: torch.cat([b.state[k] for b in batches]) for k in self.manifest.state_keys}
        labels = torch.cat([b.label for b in batches]) if self.manifest.has_labels else None
        return obs, state, labels

    def clean_eval(self) -> CorruptedDataset | None:
        """The clean evaluation split named by the manifest (for true FID only), if any."""
        if self.manifest.clean_eval_uri is None:
            return None
        return open_dataset(resolve_relative(self.uri, self.manifest.clean_eval_uri), self._storage_options)


def open_dataset(uri: str, storage_options: Mapping[str, Any] | None = None, verify: bool = False) -> CorruptedDataset:
    """Open and validate the dataset at ``uri`` (manifest fields, operator, shard presence and sizes).

    Shard checksums are verified before each shard's first read, or all at once with ``verify``.
    ``storage_options`` default to :func:`storage_options_from_env`.
    """
    fs, root = _filesystem(uri, storage_options)
    try:
        dataset = CorruptedDataset(uri, _load_manifest(fs, root, uri), fs, root, storage_options)
        dataset.check_files()
        if verify:
            dataset.verify()
    except (FileNotFoundError, DatasetError):
        raise
    except OSError as err:  # e.g. s3fs's bare PermissionError('Forbidden'): say which URI and why
        raise DatasetError(
            f"{uri}: cannot access ({type(err).__name__}: {err}); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and the endpoint (AWS_ENDPOINT_URL)"
        ) from None
    return dataset
