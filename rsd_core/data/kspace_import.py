"""A team's own multi-coil k-space as a dataset: its sampling masks, and each scan's coil maps, given or
estimated from the scan's fully sampled centre (ESPIRiT).

The import refuses what the ``mri`` operator could not have produced, one line naming the file and row:
k-space that is not finite, masks that are not 0/1 Cartesian column masks, masks without the ACS block,
values on lines a mask says were not sampled, maps of the wrong shape, all zero or not finite. Each scan
is scaled so that the 99th percentile of its zero-filled coil combination A^H y is :data:`TARGET_LEVEL`
(the networks work on images of magnitude about 1; the RSD reference normalises each slice likewise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd_core.data.importer import load_npy
from rsd_core.data.manifest import DatasetError, Manifest, WriteBatch, parse_spec
from rsd_core.data.writer import write_dataset
from rsd_core.operators.coil_maps import ESPIRIT_KERNEL_WIDTH, espirit_maps, pack_maps
from rsd_core.operators.mri import MRI, MRISpec

TARGET_LEVEL = 0.8  # leaves room above the 99th percentile inside the images' [-1, 1] range
_BATCH = 256


def _as_complex(array: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """A complex (N, C, H, W) array, from complex values or real/imag pairs on a last axis of 2."""
    if np.iscomplexobj(array) and array.ndim == 4:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.ndim == 5 and array.shape[-1] == 2:
        return array[..., 0] + 1j * array[..., 1]
    raise DatasetError(f"{path}: {what} must be complex (N, coils, H, W) or real/imag pairs (N, coils, H, W, 2), "
                       f"got {array.dtype} {array.shape}")


def _first(bad: np.ndarray) -> int | None:
    rows = np.flatnonzero(bad)
    return int(rows[0]) if len(rows) else None


def _column_masks(mask: np.ndarray, path: str | Path, count: int, width: int) -> np.ndarray:
    """(N, W), (N, H, W) or (N, 1, 1, W) 0/1 masks constant along the read-out axis -> (N, W) float32."""
    if len(mask) != count:
        raise DatasetError(f"{path}: {len(mask)} masks, but there are {count} scans")
    rows = np.asarray(mask, dtype=np.float64).reshape(count, -1, mask.shape[-1])
    if rows.shape[-1] != width:
        raise DatasetError(f"{path}: masks are {rows.shape[-1]} columns wide, the k-space {width}")
    if (row := _first(~np.isin(rows, (0.0, 1.0)).reshape(count, -1).all(1))) is not None:
        raise DatasetError(f"{path}: row {row}: mask values must be 0 or 1")
    if (row := _first((rows != rows[:, :1]).reshape(count, -1).any(1))) is not None:
        raise DatasetError(f"{path}: row {row}: the mask varies along the read-out axis; the mri operator takes "
                           "Cartesian column masks (one 0/1 value per phase-encode line)")
    return rows[:, 0].astype(np.float32)


def _spec(spec: MRISpec | Mapping[str, Any] | None, masks: np.ndarray, n_coils: int, maps_size: int | None,
          where: str) -> MRISpec:
    """The operator: the given parameters, observed coil maps, the data's coils; R, where not given, the
    data's acceleration (width / mean sampled lines)."""
    given = dict(spec.model_dump(exclude_defaults=True) if isinstance(spec, MRISpec) else spec or {})
    if given.get("kind", "mri") != "mri":
        raise DatasetError(f"{where}: k-space imports need the 'mri' operator, got '{given['kind']}'")
    if given.get("n_coils", n_coils) != n_coils:
        raise DatasetError(f"{where}: the k-space has {n_coils} coils, the operator spec says {given['n_coils']}")
    width = masks.shape[-1]
    given.setdefault("R", round(width / float(masks.sum(1).mean()), 3))
    full = {**given, "kind": "mri", "n_coils": n_coils, "coil_maps": "observed", "maps_size": maps_size}
    return parse_spec(full, f"{where}: operator")


def _check_masks(masks: np.ndarray, operator: MRI, path: str | Path) -> None:
    width = masks.shape[-1]
    n_acs = operator.n_acs(width)
    start = width // 2 - n_acs // 2
    if (row := _first(masks[:, start:start + n_acs].min(1) < 1)) is not None:
        raise DatasetError(f"{path}: row {row}: the {n_acs} central ACS lines (columns {start}-{start + n_acs - 1}, "
                           f"acs_fraction {operator.acs_fraction}) are not all sampled")
    keep = max(n_acs, math.floor(width / (operator.R + operator.delta_R)))
    if (row := _first(masks.sum(1) <= keep)) is not None:
        raise DatasetError(f"{path}: row {row}: {int(masks[row].sum())} sampled lines, and the further mask keeps "
                           f"{keep} (R + delta_R = {operator.R + operator.delta_R:g}), so none would be held out: "
                           "give a lower R")


def _maps_array(path: str | Path, count: int, n_coils: int) -> np.ndarray:
    maps = _as_complex(load_npy(path, "coil maps"), path, "coil maps")
    if len(maps) != count or maps.shape[1] != n_coils or maps.shape[2] != maps.shape[3]:
        raise DatasetError(f"{path}: coil maps must be (N, coils, m, m) = ({count}, {n_coils}, m, m), got "
                           f"{tuple(maps.shape)}")
    return maps


def import_kspace(
    kspace: str | Path,
    mask: str | Path,
    out_uri: str,
    *,
    spec: MRISpec | Mapping[str, Any] | None = None,
    maps: str | Path | None = None,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Package multi-coil k-space ``kspace`` (N, coils, H, W), its sampling masks ``mask`` and, where given,
    each scan's coil ``maps`` (N, coils, m, m; m may be below H, the maps are interpolated) as an ``mri``
    dataset with observed coil maps; without ``maps`` they are estimated per scan by ESPIRiT from the ACS
    lines. ``spec`` holds the operator's other parameters (R defaults to the data's acceleration)."""
    raw = load_npy(kspace, "k-space")
    data = _as_complex(raw, kspace, "k-space")
    count, n_coils, height, width = data.shape
    masks = _column_masks(load_npy(mask, "masks"), mask, count, width)
    maps_given = None if maps is None else _maps_array(maps, count, n_coils)
    maps_size = None if maps_given is None or maps_given.shape[-1] == width else maps_given.shape[-1]
    operator_spec = _spec(spec, masks, n_coils, maps_size, str(kspace))
    operator = MRI(operator_spec)
    _check_masks(masks, operator, mask)
    n_acs = operator.n_acs(width)
    if maps_given is None and n_acs < 2 * ESPIRIT_KERNEL_WIDTH:
        raise DatasetError(f"{kspace}: ESPIRiT needs at least {2 * ESPIRIT_KERNEL_WIDTH} ACS lines to estimate the "
                           f"coil maps and acs_fraction {operator.acs_fraction} gives {n_acs}: give the maps "
                           "(--maps) or a larger acs_fraction")

    def batches() -> Iterator[WriteBatch]:
        for start in range(0, count, _BATCH):
            stop = min(start + _BATCH, count)
            k = torch.from_numpy(np.array(data[start:stop], dtype=np.complex64))
            m = torch.from_numpy(masks[start:stop]).view(-1, 1, 1, width)
            finite = torch.isfinite(torch.view_as_real(k)).flatten(1).all(1)
            if (row := _first(~finite.numpy())) is not None:
                raise DatasetError(f"{kspace}: row {start + row}: k-space is not finite")
            outside = (k.abs() * (1 - m)).flatten(2).amax(2) > 0
            if (row := _first(outside.any(1).numpy())) is not None:
                line = int(torch.nonzero((k[row].abs() * (1 - m[row])).amax((0, 1)) > 0)[0])
                raise DatasetError(f"{kspace}: row {start + row}: values on line {line}, which the mask says was "
                                   "not sampled")
            if maps_given is None:
                packed = pack_maps(espirit_maps(k, n_acs), maps_size)
            else:
                given = torch.from_numpy(np.array(maps_given[start:stop], dtype=np.complex64))
                finite_maps = torch.isfinite(torch.view_as_real(given)).flatten(1).all(1)
                bad = ~finite_maps | (given.abs().flatten(1).amax(1) == 0)
                if (row := _first(bad.numpy())) is not None:
                    raise DatasetError(f"{maps}: row {start + row}: the coil maps are all zero or not finite")
                packed = pack_maps(given)
            y = torch.view_as_real(k).permute(0, 1, 4, 2, 3).reshape(len(k), 2 * n_coils, height, width)
            state = {"mask": m.float(), "maps": packed}
            level = operator.adjoint(y, state).pow(2).sum(1).sqrt().flatten(1).quantile(0.99, dim=1)
            if (row := _first((level == 0).numpy())) is not None:
                raise DatasetError(f"{kspace}: row {start + row}: the scan's zero-filled image is empty")
            scale = TARGET_LEVEL / level
            yield (y * scale.view(-1, 1, 1, 1)).numpy(), {k_: v.numpy() for k_, v in state.items()}, None

    return write_dataset(
        out_uri,
        batches(),
        name=name or Path(kspace).stem,
        image_shape=(2, height, width),
        operator=operator_spec,
        provenance={
            "imported_from": str(kspace),
            "mask_file": str(mask),
            "coil_maps": (f"given: {maps}" if maps is not None else
                          f"estimated per scan by ESPIRiT (sigpy EspiritCalib, calibration {n_acs}x{n_acs}, "
                          f"kernel {ESPIRIT_KERNEL_WIDTH}, crop 0)"),
            "scaling": f"per scan: 99th percentile of |A^H y| -> {TARGET_LEVEL}",
        },
        storage_options=storage_options,
    )
