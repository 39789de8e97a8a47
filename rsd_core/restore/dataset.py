"""Restoring a whole corrupted dataset with a saved one-step generator, shard by shard.

The ``rsd_restore`` Flyte workflow (``tasks/restore.py``) wraps these functions: a compatibility check before
any work, one :func:`restore_shard` per parquet shard (a map task, seeded per row group so a shard's result does
not depend on its worker; results as safetensors, no pickle), and :func:`write_restored`, which streams them into
``OUT/`` (the posterior means as identity-operator observations: the format's clean images, with provenance)
and ``OUT/spread/`` (the per-pixel spread, where the method gives one). docs/pipeline.md, "Output format".
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rsd_core.data.manifest import Manifest, WriteBatch, expected_state
from rsd_core.data.reader import CorruptedDataset, open_dataset
from rsd_core.data.storage import resolve_relative
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator
from rsd_core.restore.encoder import load_encoder, save_encoder
from rsd_core.restore.estimate import RestoreConfig, fit_restore_encoder, load_generator
from rsd_core.restore.image_metrics import psnr, ssim
from rsd_core.restore.methods import RestoreModels, restore
from rsd_core.stages import ModelCard
from rsd_core.viz import observations_for_display, save_grid

SPREAD_DIR = "spread"
GRID_COLUMNS = 8
_SSIM_WINDOW = 11


class RestoreInputError(ValueError):
    """A model and a dataset that do not fit together; the message is one line naming both."""


def check_restorable(card: ModelCard, model: str, ds: CorruptedDataset) -> None:
    """Refuse, before any work, a model that cannot restore ``ds``.

    The generator must be a distilled one, trained on the same operator kind and image shape,
    and its forward model A must be the dataset's: restoration runs the *model's* operator on the
    dataset's per-sample state (a blur of another width or a different coil bank would fit the
    wrong A silently). Parameters that only shape the state's law or the noise (an inpainting
    rate, an MRI acceleration, sigma_n) may differ; both specs go to the provenance.
    """
    m = ds.manifest
    where = f"model {model} vs dataset {ds.uri}"
    if card.kind != "generator":
        raise RestoreInputError(f"{where}: the model is a {card.kind}; restoration needs a one-step generator")
    if card.operator.kind != m.operator.kind:
        raise RestoreInputError(f"{where}: the model was trained on '{card.operator.kind}' observations, the dataset "
                                f"holds '{m.operator.kind}' ones; use a model trained on '{m.operator.kind}' data")
    if tuple(card.image_shape) != tuple(m.image_shape):
        raise RestoreInputError(f"{where}: the model makes images of shape {tuple(card.image_shape)}, the dataset's "
                                f"images are {tuple(m.image_shape)}")
    model_op = build_operator(card.operator)
    if model_op.observation_shape(m.image_shape) != tuple(m.observation_shape) or expected_state(
            model_op, m.image_shape) != m.state_keys or not _same_forward(model_op, ds):
        raise RestoreInputError(f"{where}: the model's forward model {card.operator.model_dump()} differs from the "
                                f"dataset's {m.operator.model_dump()}")


def _same_forward(model_op, ds: CorruptedDataset) -> bool:
    """A(x) of both operators on random images and state drawn by the dataset's operator."""
    shape = tuple(ds.manifest.image_shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((2, *shape), generator=gen) * 2 - 1
    state = ds.operator.sample_state(2, shape, gen)
    try:
        return torch.allclose(model_op.forward(x, state), ds.operator.forward(x, state), atol=1e-5)
    except (IndexError, RuntimeError):  # e.g. a state index outside the model's coil-map bank
        return False


@dataclass(frozen=True)
class ShardSummary:
    """What one shard's restoration measured (sums, so shards add up)."""

    rows: int
    seconds: float
    misfit_sum: float
    spread_sum: float | None  # None: the method gives no spread


def fit_dataset_encoder(model_dir: str | Path, dataset_uri: str, config: RestoreConfig, out_file: str | Path,
                        device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Fit ``config.encoder`` on the dataset's first observations (no clean data) into ``out_file``.

    Returns what the fit measured (seconds, observations, first and last loss), also stored in the
    file's header with the dataset's fingerprint, so a restored dataset can name the encoder it used.
    """
    if config.encoder is None:
        raise ValueError("config.encoder is not set: nothing to fit")
    ds = open_dataset(dataset_uri)
    generator = load_generator(model_dir, device)
    y, state, _ = ds.read_all(limit=config.encoder.max_observations)
    start = time.perf_counter()
    encoder, losses = fit_restore_encoder(generator, y, state, config, progress=progress)
    meta = {"seconds": time.perf_counter() - start, "observations": len(y), "loss_first": losses[0],
            "loss_last": losses[-1], "dataset_fingerprint": ds.fingerprint,
            "settings": config.encoder.model_dump(),
            "fitted_on": ("observations' misfit through G" if config.encoder.target == "latent"
                          else config.encoder.image_pairs(generator.objective.operator))}
    save_encoder(encoder, out_file, meta)
    return meta


def restore_shard(model_dir: str | Path, dataset_uri: str, shard: int, config: RestoreConfig, out_file: str | Path,
                  device: str = "cpu", encoder_file: str | Path | None = None) -> ShardSummary:
    """Restore shard ``shard`` of the dataset by ``config.method``, one row group at a time, into ``out_file``
    (safetensors).

    Per row: ``mean``, ``spread`` (where the method gives one), ``misfit`` (the mean squared residual A(mean) - y
    over the observation's entries, with the dataset's operator and state) and the source ``label``.
    ``encoder_file`` (from :func:`fit_dataset_encoder`) is needed exactly when ``config.encoder`` is set.
    """
    ds = open_dataset(dataset_uri)
    encoder = None if encoder_file is None else load_encoder(encoder_file, device)[0]  # checked against config
    models = RestoreModels(Path(model_dir), device, encoder)
    units = [(shard, g) for g in range(ds.manifest.shards[shard].row_groups)]
    start = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {"index": [], "mean": [], "spread": [], "misfit": [], "label": []}
    for batch in ds.iter_batches(batch_size=ds.manifest.shards[shard].rows, units=units):
        seeded = config.model_copy(update={"seed": config.seed + int(batch.index[0])})
        restored = restore(models, batch.observation, batch.state, seeded)
        residual = ds.operator.forward(restored.mean, batch.state) - batch.observation
        parts["index"].append(batch.index)
        parts["mean"].append(restored.mean)
        if restored.spread is not None:
            parts["spread"].append(restored.spread)
        parts["misfit"].append(residual.square().flatten(1).mean(1))
        if batch.label is not None:
            parts["label"].append(batch.label)
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    save_file(tensors, str(out_file), metadata={"seconds": repr(time.perf_counter() - start)})
    return _summary(out_file)


def _summary(part: str | Path) -> ShardSummary:
    """The :class:`ShardSummary` of a shard's result file."""
    with safe_open(str(part), "pt") as f:
        misfit = f.get_tensor("misfit")
        spread = float(f.get_tensor("spread").mean(dim=(1, 2, 3)).sum()) if "spread" in f.keys() else None  # noqa: SIM118
        return ShardSummary(len(misfit), float(f.metadata()["seconds"]), float(misfit.sum()), spread)


def _load(part: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(part), "pt") as f:
        return {k: f.get_tensor(k) for k in keys if k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _batches(parts: Sequence[str | Path], column: str) -> Iterator[WriteBatch]:
    """(images, {}, labels) per shard result: what :func:`write_dataset` streams. The rows' indices
    must continue from part to part, so results can never land on another observation's row."""
    expected = 0
    for part in parts:
        loaded = _load(part, ("index", column, "label"))
        if not torch.equal(loaded["index"], torch.arange(expected, expected + len(loaded["index"]))):
            raise ValueError(f"{part}: shard results out of row order (expected rows from {expected})")
        expected += len(loaded["index"])
        yield loaded[column], {}, loaded.get("label")


class _Rows:
    """A dataset's rows in index order, handed out ``n`` at a time (the clean split, beside the results)."""

    def __init__(self, ds: CorruptedDataset | None):
        self._batches = iter(ds.iter_batches()) if ds is not None else iter(())
        self._pending: list[torch.Tensor] = []
        self._count = 0

    def take(self, n: int) -> torch.Tensor | None:
        while self._count < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch.observation)
            self._count += len(batch.observation)
        if not self._pending:
            return None
        rows = torch.cat(self._pending)
        taken, rest = rows[:n], rows[n:]
        self._pending, self._count = ([rest], len(rest)) if len(rest) else ([], 0)
        return taken


def quality(restored: torch.Tensor, clean: torch.Tensor, value_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Per-image PSNR (and SSIM where images hold an 11x11 window) of restorations against clean images.

    Grey images use the value range as the peak; RGB ones are compared over all channels for PSNR
    and channel-averaged for SSIM; complex (2-channel) images by magnitude with the reference's
    peak, as MRI metrics are.
    """
    n, c, h, w = clean.shape
    peak = None if c == 2 else value_range[1] - value_range[0]
    if c == 3:  # PSNR over all channels at once: the channels stacked into one tall grey image
        out = {"psnr": psnr(restored.reshape(n, 1, c * h, w), clean.reshape(n, 1, c * h, w), peak).values}
    else:
        out = {"psnr": psnr(restored, clean, peak).values}
    if min(h, w) >= _SSIM_WINDOW:  # RGB: the mean of the three channels' SSIMs
        grey = (-1, 1 if c == 3 else c, h, w)
        out["ssim"] = ssim(restored.reshape(grey), clean.reshape(grey), peak).values.reshape(n, -1).mean(1)
    return {k: torch.as_tensor(v) for k, v in out.items()}


@dataclass(frozen=True)
class RestoredDataset:
    """Where the restoration went and what it measured (``spread_uri`` empty: the method gives no spread)."""

    uri: str
    spread_uri: str
    manifest: Manifest
    metrics: dict[str, float]


def write_restored(out_uri: str, parts: Sequence[str | Path], source: CorruptedDataset,
                   provenance: Mapping[str, Any]) -> RestoredDataset:
    """Stream the shard results into ``out_uri`` (means) and ``out_uri/spread`` (where the method gives a spread),
    and measure them.

    ``metrics``: ``images``, ``seconds`` (summed over shards), ``misfit`` and ``spread`` (means
    over images; no ``spread`` without one), and, when the source has a clean split, ``eval/psnr``, ``eval/ssim`` and
    ``eval/images`` over the rows it covers.
    """
    m = source.manifest
    summaries = [_summary(p) for p in parts]
    has_spread = all(s.spread_sum is not None for s in summaries)
    spread_uri = resolve_relative(out_uri, SPREAD_DIR) if has_spread else ""
    clean_uri = resolve_relative(source.uri, m.clean_eval_uri) if m.clean_eval_uri else None
    common = {"image_shape": m.image_shape, "operator": {"kind": "identity"}, "value_range": m.value_range}
    manifest = write_dataset(out_uri, _batches(parts, "mean"), name=f"{m.name}-restored", seed=m.seed,
                              provenance={**provenance, **({"spread_uri": SPREAD_DIR} if has_spread else {})},
                              clean_eval_uri=clean_uri, **common)
    if has_spread:
        write_dataset(spread_uri, _batches(parts, "spread"), name=f"{m.name}-restored-spread",
                       provenance={"role": "per-pixel std over restarts", "of": f"{m.name}-restored"},
                       **{**common, "value_range": (0.0, 1.0)})
    count = sum(s.rows for s in summaries)
    metrics = {"images": float(count), "seconds": sum(s.seconds for s in summaries),
               "misfit": sum(s.misfit_sum for s in summaries) / count}
    if has_spread:
        metrics["spread"] = sum(s.spread_sum for s in summaries) / count
    metrics.update(_evaluate(parts, source, m.value_range))
    return RestoredDataset(out_uri, spread_uri, manifest, metrics)


def _evaluate(parts: Sequence[str | Path], source: CorruptedDataset, value_range) -> dict[str, float]:
    """Mean PSNR/SSIM of the rows the source's clean split covers (its first rows), and the spread's
    calibration there; none without a clean split.

    ``eval/coverage_2sd`` is the fraction of clean pixels inside mean +- 2 spread, over the pixels whose
    spread is not zero (measured pixels put back exactly have none, and would count as covered): about
    0.95 for a calibrated Gaussian posterior, lower when the spread is too small.
    """
    clean = _Rows(source.clean_eval())
    sums: dict[str, float] = {}
    covered, inside, uncertain = 0, 0, 0
    for part in parts:
        loaded = _load(part, ("mean", "spread"))
        reference = clean.take(len(loaded["mean"]))
        if reference is None:
            break
        mean = loaded["mean"][: len(reference)]
        for key, values in quality(mean, reference, value_range).items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
        covered += len(reference)
        if "spread" not in loaded:
            continue
        spread = loaded["spread"][: len(reference)]
        open_pixels = spread > 0
        inside += int(((reference - mean).abs() <= 2 * spread)[open_pixels].sum())
        uncertain += int(open_pixels.sum())
    if not covered:
        return {}
    calibration = {"eval/coverage_2sd": inside / uncertain} if uncertain else {}
    return {"eval/images": float(covered), **{f"eval/{k}": v / covered for k, v in sums.items()}, **calibration}


def restoration_grid(source: CorruptedDataset, restored_uri: str, path: str | Path, n: int = GRID_COLUMNS) -> Path:
    """A PNG of the first ``n`` rows: observation (as an image) / restoration / spread (where there is one) /
    clean when known.

    The spread row is scaled to its own maximum (black = no spread), so it shows where the
    restarts disagree whatever their scale.
    """
    batch = next(source.iter_batches(batch_size=n))
    restored = open_dataset(restored_uri)
    mean = next(restored.iter_batches(batch_size=n)).observation
    rows = [observations_for_display(batch.observation, source.operator, batch.state), mean]
    if "spread_uri" in restored.manifest.provenance:
        spread_uri = resolve_relative(restored_uri, restored.manifest.provenance["spread_uri"])
        rows.append(_spread_view(next(open_dataset(spread_uri).iter_batches(batch_size=n)).observation))
    clean = _Rows(source.clean_eval()).take(len(mean))
    if clean is not None and len(clean) == len(mean):
        rows.append(clean)
    save_grid(torch.cat(rows), str(path), nrow=len(mean))
    return Path(path)


def _spread_view(spread: torch.Tensor) -> torch.Tensor:
    """Spread scaled to [0, 1] by its maximum, encoded so :func:`save_grid` shows 0 as black."""
    scaled = spread / spread.abs().amax().clamp_min(1e-8)
    if spread.shape[1] == 2:  # complex images are shown as magnitude: put it in the real channel
        return torch.cat([scaled.square().sum(1, keepdim=True).sqrt() / 2**0.5, torch.zeros_like(scaled[:, :1])], 1)
    return scaled * 2 - 1
