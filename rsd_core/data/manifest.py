"""The corrupted-dataset format: what a manifest holds and how it is validated.

A dataset is a directory (local path or URL such as ``s3://bucket/prefix``) holding
``part-00000.parquet``... and ``manifest.json``. Each row is one observation y = A(x) + noise
with the per-sample operator state needed to re-apply A (e.g. the inpainting mask), because
training only ever sees corrupted data and must know which A produced each y. Every shard carries a
sha256 in the manifest, checked before its first read; every validation failure raises
:class:`DatasetError`, whose message names the file, row or field, so the CLI prints it as one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rsd_core.config import OperatorSpec, OperatorSpecBase
from rsd_core.kinds import build_operator
from rsd_core.operators import Operator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = r"^part-\d{5}\.parquet$"

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

    file: str = Field(pattern=SHARD_PATTERN)
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


def head_rows(batch: Batch, n: int) -> Batch:
    """The first ``n`` rows of ``batch``."""
    label = None if batch.label is None else batch.label[:n]
    return Batch(batch.index[:n], batch.observation[:n], {k: v[:n] for k, v in batch.state.items()}, label)


# --------------------------------------------------------------------------- specs and errors


def format_validation_error(err: ValidationError, where: str) -> str:
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
        raise DatasetError(format_validation_error(err, where)) from None


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


def check_values(values: np.ndarray, where: str, index: np.ndarray, bounds: tuple[float, float] | None) -> None:
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


def arrow_schema(manifest: Manifest) -> pa.Schema:
    fields = [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("observation", pa.binary(), nullable=False),
    ]
    fields += [pa.field(key, pa.binary(), nullable=False) for key in manifest.state_keys]
    if manifest.has_labels:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    return pa.schema(fields)
