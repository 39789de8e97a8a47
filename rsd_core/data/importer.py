"""Importing observations a data team already has (they never had clean images): a folder of PNG/JPEG or a
``.npy`` array, the operator that produced them and its per-sample state, refused row by row where the
operator could not have produced them. Multi-coil k-space has its own importer (:mod:`.kspace_import`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from rsd_core.config import OperatorSpec
from rsd_core.data.manifest import DatasetError, Manifest, WriteBatch, parse_spec
from rsd_core.data.sources import image_files, to_tensor
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator

_IMPORT_BATCH = 256  # rows validated and written at a time


def load_spec_file(path: str | Path) -> OperatorSpec:
    """An operator spec from a JSON or YAML file (YAML is a superset of JSON)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DatasetError(f"{path}: not valid JSON/YAML ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'kind' and parameters, got {type(data).__name__}")
    return parse_spec(data, str(path))


def load_npy(path: str | Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read {what} as .npy ({err})") from None


def _infer_image_shape(spec: OperatorSpec, obs_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The image shape whose observation has ``obs_shape``: the same for image-space operators,
    complex 2-channel images for MRI k-space."""
    op = build_operator(spec)
    candidates = [obs_shape, (2, *obs_shape[1:])]
    for candidate in candidates:
        try:
            if tuple(op.observation_shape(candidate)) == tuple(obs_shape):
                return candidate
        except ValueError:
            continue
    raise DatasetError(f"observations of shape {obs_shape} cannot come from operator '{spec.kind}'")


def _check_consistent(operator, obs: np.ndarray, state: Mapping[str, np.ndarray], start: int, quantum: float,
                      path: Path) -> None:
    """Refuse observations their operator could not have produced (e.g. a non-binary mask, or a
    value where the mask says "erased"), naming the first bad row."""
    if not set(operator.state_keys) <= set(state):
        return  # write_dataset names the missing state columns
    tensors = {k: torch.from_numpy(np.array(state[k])) for k in operator.state_keys}
    found = operator.first_invalid(torch.from_numpy(np.array(obs, dtype=np.float32)), tensors, atol=quantum + 1e-5)
    if found is not None:
        row, reason = found
        raise DatasetError(f"{path}: row {start + row}: {reason} (operator '{operator.spec.kind}')")


def import_corrupted(
    observations: str | Path,
    spec: OperatorSpec | Mapping[str, Any] | str | Path,
    out_uri: str,
    *,
    state: Mapping[str, str | Path] | None = None,
    labels: str | Path | None = None,
    name: str | None = None,
    channels: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    observation_range: tuple[float, float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Package already-corrupted observations (no clean images exist) as a dataset.

    ``observations`` is a folder of PNG/JPEG files (sorted by name; all the same size, never
    resized since resizing would change the operator; mapped to [-1, 1]) or a ``.npy`` float
    array (N, C, H, W) or (N, H, W) on the dataset's scale. ``state`` maps each per-sample
    state key the operator needs (e.g. ``mask``) to a ``.npy`` array with one row per
    observation; ``labels`` is an optional ``.npy`` integer array.
    """
    if isinstance(spec, (str, Path)):
        spec = load_spec_file(spec)
    spec = parse_spec(spec)
    states = {key: load_npy(path, f"state '{key}'") for key, path in (state or {}).items()}
    label_array = None if labels is None else load_npy(labels, "labels")
    path = Path(observations)
    if path.is_dir():
        files = image_files(path)
        with Image.open(files[0]) as first:
            size = first.size
            n_channels = channels or (1 if first.mode in ("L", "LA", "I", "I;16", "1") else 3)
        count = len(files)

        def load(start: int, stop: int) -> np.ndarray:
            out = []
            for file in files[start:stop]:
                with Image.open(file) as img:
                    if img.size != size:
                        raise DatasetError(f"{file}: size {img.size}, expected {size} like {files[0].name}")
                    out.append(to_tensor(img, n_channels).numpy())
            return np.stack(out)

        obs_shape = (n_channels, size[1], size[0])
    else:
        array = load_npy(path, "observations")
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
            raise DatasetError(
                f"{path}: observations must be a float array (N, C, H, W) or (N, H, W), got {array.dtype} {array.shape}"
            )
        count, obs_shape = len(array), tuple(array.shape[1:])

        def load(start: int, stop: int) -> np.ndarray:
            return np.asarray(array[start:stop])

    for key, values in states.items():
        if len(values) != count:
            raise DatasetError(f"state '{key}': {len(values)} rows, but there are {count} observations")
    if label_array is not None and len(label_array) != count:
        raise DatasetError(f"labels: {len(label_array)} rows, but there are {count} observations")

    operator = build_operator(spec)
    image_shape = _infer_image_shape(spec, obs_shape)
    # Each state row must have the shape the operator draws for one image of this shape (a mask of another
    # size would otherwise surface as a tensor-size error from inside the consistency check).
    needed = {k: shape for k, (shape, _) in operator.state_shapes(image_shape).items()}
    for key, values in states.items():
        if key in needed and tuple(values.shape[1:]) != needed[key]:
            raise DatasetError(f"{(state or {})[key]}: state '{key}' has rows of shape {tuple(values.shape[1:])}; "
                               f"operator '{spec.kind}' needs {needed[key]} for observations of shape {obs_shape}")
    quantum = (value_range[1] - value_range[0]) / 255 if path.is_dir() else 0.0  # image files hold uint8

    def batches() -> Iterator[WriteBatch]:
        for start in range(0, count, _IMPORT_BATCH):
            stop = min(start + _IMPORT_BATCH, count)
            state_rows = {k: np.asarray(v[start:stop]) for k, v in states.items()}
            obs = load(start, stop)
            _check_consistent(operator, obs, state_rows, start, quantum, path)
            yield obs, state_rows, None if label_array is None else np.asarray(label_array[start:stop])

    return write_dataset(
        out_uri,
        batches(),
        name=name or path.stem,
        image_shape=image_shape,
        operator=spec,
        value_range=value_range,
        observation_range=observation_range,
        provenance={"imported_from": str(path), "state_files": {k: str(v) for k, v in (state or {}).items()}},
        storage_options=storage_options,
    )
