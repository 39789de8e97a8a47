"""Clean image sources that ship with the environment (no downloads), and the corruption step.

Clean images exist only here and in the optional clean evaluation split: :func:`corrupt` turns a source
into a corrupted dataset (observations a data team already has are imported instead:
:mod:`rsd_core.data.importer`). Sources are read in slices so corrupting a large source never holds it
all as float tensors.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsd_core.config import OperatorSpec
from rsd_core.data.manifest import DatasetError, Manifest, WriteBatch, parse_spec
from rsd_core.data.storage import resolve_relative
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator
from rsd_core.operators import IdentitySpec

# Debian's dataset-fashion-mnist package; RSD_FASHION_MNIST_DIR names another folder of the same four files.
FASHION_MNIST_DIR = Path(os.environ.get("RSD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SOURCE_NAMES = ("fashion-mnist", "brain-mri")
_CORRUPT_BATCH = 256  # fixed, so the per-sample state drawn for a seed never depends on the caller


@dataclass(frozen=True)
class CleanSource:
    """A clean image collection: ``load(start, stop)`` -> (images (n, C, H, W) in [-1, 1], labels or None)."""

    name: str
    image_shape: tuple[int, int, int]
    count: int
    load: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian header: magic, then one uint32 per dimension) as uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(f"{path}: IDX magic {found}, expected {magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DatasetError(f"{path}: {data.size} values after the header, expected {math.prod(dims)} ({dims})")
    return data.reshape(dims)


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> CleanSource:
    """Fashion-MNIST (60k train / 10k test) padded 28 -> 32 with background, values in [-1, 1]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist`"
            )
    images = _read_idx(images_path, 2051)
    labels = _read_idx(labels_path, 2049).astype(np.int64)

    def load(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images[start:stop].astype(np.float32) / 127.5 - 1.0)[:, None]
        return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(labels[start:stop])

    return CleanSource("fashion-mnist", (1, 32, 32), len(images), load, {"source": "fashion-mnist", "files": str(root)})


# --------------------------------------------------------------------------- brain MRI


def _mni152_path() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: pip install nilearn (it carries the MNI152 template)")
    path = Path(spec.submodule_search_locations[0]) / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall nilearn")
    return path


def brain_volumes(split: str) -> list[Path]:
    """Train: Colin27 (ch2, ch2better); test: MNI152. The subjects differ, so the test split is
    truly held out (ch2 and ch2better are the same person at two resolutions)."""
    if split == "test":
        return [_mni152_path()]
    if split != "train":
        raise DatasetError(f"brain-mri split must be 'train' or 'test', got {split!r}")
    paths = [MRICRON_TEMPLATES / "ch2.nii.gz", MRICRON_TEMPLATES / "ch2better.nii.gz"]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: install the MRIcron templates with `apt-get install mricron-data`"
            )
    return paths


def _volume_slices(path: Path, size: int, min_brain: float = 0.2) -> torch.Tensor:
    """Magnitude slices (n, size, size) in [0, 1] along all 3 axes, keeping slices that are
    mostly brain; each is padded to a square (aspect kept) and area-resized."""
    import nibabel

    volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
    volume = np.clip(volume / np.percentile(volume[volume > 0], 99.5), 0.0, 1.0)
    inside = np.nonzero(volume > 0.1)  # crop to the head's bounding box so slices are filled
    volume = volume[tuple(slice(int(i.min()), int(i.max()) + 1) for i in inside)]
    out = []
    for axis in range(3):
        vol = torch.from_numpy(np.moveaxis(volume, axis, 0).copy())
        keep = (vol > 0.1).float().mean(dim=(1, 2)) >= min_brain * (vol > 0.1).float().mean(dim=(1, 2)).max()
        vol = vol[keep]
        h, w = vol.shape[1:]
        side = max(h, w)
        vol = F.pad(vol, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
        vol = F.interpolate(vol[:, None], size=(size, size), mode="area")[:, 0]
        out.append(vol / vol.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6))
    return torch.cat(out)


def smooth_phase(n: int, size: int, rng: torch.Generator, grid: int = 4) -> torch.Tensor:
    """Random smooth phase maps (n, size, size): a bicubic-upsampled coarse Gaussian field plus a
    global offset, like the slowly varying phase of real MR images."""
    coarse = torch.randn((n, 1, grid, grid), generator=rng)
    field_ = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[:, 0]
    offset = (torch.rand((n, 1, 1), generator=rng) * 2 - 1) * math.pi
    return field_ + offset


@lru_cache(maxsize=4)
def _brain_images(split: str, size: int, seed: int) -> torch.Tensor:
    """Slices in a seeded random order: read in volume and axis order, any prefix (``limit``, a clean
    evaluation count, a reference of n images) would hold one axis of one volume only."""
    magnitude = torch.cat([_volume_slices(p, size) for p in brain_volumes(split)])
    rng = torch.Generator().manual_seed(seed)
    magnitude = magnitude[torch.randperm(len(magnitude), generator=rng)]
    phase = smooth_phase(len(magnitude), size, rng)
    z = torch.polar(magnitude, phase)
    return torch.stack([z.real, z.imag], dim=1).contiguous()


def brain_mri(split: str = "train", size: int = 32, seed: int = 0) -> CleanSource:
    """Complex brain slices (N, 2, size, size) [Re, Im], magnitude in [0, 1] with a smooth random
    phase. Coil sensitivities are not applied here: the MRI operator applies them per sample."""
    if size not in (32, 64):
        raise DatasetError(f"brain-mri image size must be 32 or 64, got {size}")
    images = _brain_images(split, size, seed)

    def load(start: int, stop: int) -> tuple[torch.Tensor, None]:
        return images[start:stop], None

    provenance = {
        "source": "brain-mri",
        "volumes": [str(p) for p in brain_volumes(split)],
        "phase_seed": seed,
    }
    return CleanSource("brain-mri", (2, size, size), len(images), load, provenance)


# --------------------------------------------------------------------------- image folders


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{folder}: no PNG/JPEG files")
    return files


def to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return torch.from_numpy(array / 127.5 - 1.0)


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` then a centred square crop, so no image is distorted."""
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_folder(folder: str | Path, size: int = 32, channels: int = 1) -> CleanSource:
    """PNG/JPEG files of any size, resized and centre-cropped to ``size``; loaded lazily per slice."""
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    folder = Path(folder)
    files = image_files(folder)

    def load(start: int, stop: int) -> tuple[torch.Tensor, None]:
        images = []
        for path in files[start:stop]:
            with Image.open(path) as img:
                images.append(to_tensor(_resize_crop(img, size), channels))
        return torch.stack(images), None

    return CleanSource(folder.name, (channels, size, size), len(files), load, {"source": str(folder)})


def get_source(name_or_folder: str, split: str = "train", image_size: int | None = None, channels: int = 1):
    """A bundled source by name (``fashion-mnist``, ``brain-mri``) or an image folder path."""
    if name_or_folder == "fashion-mnist":
        if image_size not in (None, 32):
            raise DatasetError(f"fashion-mnist images are 32x32, got image size {image_size}")
        return fashion_mnist(split)
    if name_or_folder == "brain-mri":
        return brain_mri(split, image_size or 32)
    if os.path.isdir(name_or_folder):
        return image_folder(name_or_folder, image_size or 32, channels)
    raise DatasetError(f"unknown source {name_or_folder!r}: expected one of {SOURCE_NAMES} or an image folder")


# --------------------------------------------------------------------------- corruption


def _clean_batches(source: CleanSource, count: int) -> Iterator[WriteBatch]:
    for start in range(0, count, _CORRUPT_BATCH):
        images, labels = source.load(start, min(start + _CORRUPT_BATCH, count))
        yield images, {}, labels


def corrupt(
    source: str | CleanSource,
    spec: OperatorSpec | Mapping[str, Any],
    seed: int,
    out_uri: str,
    split: str = "train",
    limit: int | None = None,
    clean_eval_count: int = 0,
    *,
    image_size: int | None = None,
    channels: int = 1,
    clean_eval_uri: str = "clean_eval",
    clean_eval_split: str | None = None,
    rows_per_shard: int = 16384,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Corrupt the first ``limit`` images of a source into a dataset at ``out_uri``.

    State and noise come from one ``torch.Generator`` seeded with ``seed`` and consumed in fixed
    batches, so the same arguments give byte-identical shards. With ``clean_eval_count`` > 0 the
    clean versions of rows 0..clean_eval_count-1 go to ``clean_eval_uri`` (relative to
    ``out_uri`` unless absolute), written before the main manifest so a finished dataset always
    has its clean split; it is for true-FID reporting only. With ``clean_eval_split`` (e.g. ``"test"``:
    brain-mri's held-out subject) the clean split is instead the first ``clean_eval_count`` images of
    that split of the same source, so the true FD measures generalisation beyond the corrupted images.
    """
    spec = parse_spec(spec)
    src = get_source(source, split, image_size, channels) if isinstance(source, str) else source
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    count = src.count if limit is None else min(limit, src.count)
    eval_src, eval_count = src, count
    if clean_eval_split is not None:
        if not isinstance(source, str):
            raise DatasetError("clean_eval_split needs a source given by name (to open its other split)")
        eval_src = get_source(source, clean_eval_split, image_size, channels)
        eval_count = eval_src.count
    if not 0 <= clean_eval_count <= eval_count:
        raise DatasetError(f"clean_eval_count must be in [0, {eval_count}] (the images corrupted, or of "
                           f"clean_eval_split), got {clean_eval_count}")
    op = build_operator(spec)
    name = f"{src.name}-{split}-{spec.kind}"
    provenance = {**src.provenance, "split": split, "limit": limit, "corrupt_batch": _CORRUPT_BATCH,
                  **op.simulation_provenance()}
    clean_ref = None
    if clean_eval_count:
        write_dataset(
            resolve_relative(out_uri, clean_eval_uri),
            _clean_batches(eval_src, clean_eval_count),
            name=f"{name}-clean-eval",
            image_shape=src.image_shape,
            operator=IdentitySpec(),
            seed=seed,
            provenance={**provenance, **eval_src.provenance, "split": clean_eval_split or split,
                        "role": "clean evaluation split (true FID only)", "of": name},
            storage_options=storage_options,
        )
        clean_ref = clean_eval_uri

    def observed() -> Iterator[WriteBatch]:
        rng = torch.Generator().manual_seed(seed)
        for images, _, labels in _clean_batches(src, count):
            state = op.simulation_state(len(images), src.image_shape, rng)
            y = op.observe(images, state, rng)
            yield y, op.recorded_state(y, state), labels

    return write_dataset(
        out_uri,
        observed(),
        name=name,
        image_shape=src.image_shape,
        operator=spec,
        seed=seed,
        provenance=provenance,
        clean_eval_uri=clean_ref,
        rows_per_shard=rows_per_shard,
        storage_options=storage_options,
    )
