"""Reading a dataset: the manifest checked field by field and against its operator, shards hashed before
their first read, rows decoded in record batches."""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from rsd_core.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Batch,
    DatasetError,
    Manifest,
    ShardInfo,
    arrow_schema,
    check_values,
    expected_state,
    format_validation_error,
    head_rows,
)
from rsd_core.data.storage import filesystem, resolve_relative
from rsd_core.kinds import build_operator
from rsd_core.operators import POOL_SIZE, Operator

_HASH_CHUNK = 1 << 22  # bytes hashed per read when a shard is verified


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
        raise DatasetError(format_validation_error(err, MANIFEST_NAME)) from None
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
        expected = set(arrow_schema(self.manifest).names)
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
        check_values(obs, f"{file}: observation", index, m.observation_range)
        state = {}
        for key, info in m.state_keys.items():
            values = _decode_binary(record.column(key), info.shape, info.dtype, f"{file}: state '{key}'", index)
            check_values(values, f"{file}: state '{key}'", index, None)
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
            batches = [head_rows(b, limit - sum(len(x.index) for x in batches[:i])) for i, b in enumerate(batches)]
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
    fs, root = filesystem(uri, storage_options)
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
