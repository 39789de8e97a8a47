"""Scoring trained models against clean evaluation images, shared by the long run and the restoration
benchmark's references: FD and KID on the evaluation features, the teacher's best sampler, the floor.

Clean images only *evaluate* here. The one choice made on the way, the teacher's truncation level, is made by
Proximal FD on features learnt from the dataset's own observations (no clean data), as selection makes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rsd_core.data.sources import get_source
from rsd_core.select.frechet import FeatureExtractor, FeatureStats, frechet_distance
from rsd_core.select.kid import kernel_distance
from rsd_core.select.selection import (
    corrupted_view,
    evaluation_extractor,
    feature_images,
    make_extractors,
    proximal_reference,
    quantise,
    teacher_truncation_samples,
)
from rsd_core.stages import load_model, read_card, sampler_for
from rsd_core.train.sampling import truncation_nfe
from rsd_core.viz import save_grid


@dataclass
class Scorer:
    """Scores samples of the models trained on one dataset against its clean evaluation images: FD and KID on
    the evaluation features, Proximal FD (for the teacher's truncation choice) on features learnt from the
    dataset's own observations. ``cache`` keeps the reference features."""

    dataset: str
    n_eval: int
    seed: int
    cache: Path

    def __post_init__(self):
        from rsd_core.data.reader import open_dataset

        ds = open_dataset(self.dataset)
        self.operator = ds.operator
        self.proximal, self.true = make_extractors("self-supervised", ds.operator, ds)
        self.prox_ref = proximal_reference(self.dataset, self.proximal, min(len(ds), self.n_eval))
        clean = ds.clean_eval().read_all(limit=self.n_eval)[0]
        self.ref_features = cached_features(self.cache / f"ref-{self.true.id}-n{len(clean)}.npy", self.true, clean)

    def proximal_fd(self, samples: torch.Tensor) -> float:
        view = corrupted_view(samples, self.operator, torch.Generator().manual_seed(self.seed + 1))
        return frechet_distance(FeatureStats.from_features(self.proximal.features(view), self.proximal.id),
                                self.prox_ref)

    def true_scores(self, samples: torch.Tensor) -> dict:
        feats = self.true.features(quantise(feature_images(samples)))
        return distances(feats, self.ref_features, self.true.id, self.seed)


def distances(features: np.ndarray, reference: np.ndarray, extractor_id: str, seed: int) -> dict:
    """FD and KID (its subsets: half of the smaller set, 100 of them) of two feature sets."""
    fd = frechet_distance(FeatureStats.from_features(features, extractor_id),
                          FeatureStats.from_features(reference, extractor_id))
    kid = kernel_distance(features, reference, subset_size=min(len(features), len(reference)) // 2, seed=seed)
    return {"fd": fd, "kid": kid.mean, "kid_std": kid.std}


def cached_features(path: Path, extractor: FeatureExtractor, images: torch.Tensor) -> np.ndarray:
    """Features of fixed reference images, kept as .npy beside the run (no pickles)."""
    if path.exists():
        return np.load(path, allow_pickle=False)
    feats = extractor.features(quantise(feature_images(images)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def score_teacher(folder: Path, scorer: Scorer, grid: Path) -> dict:
    """The teacher's full sampler and the truncation level Proximal FD picks (no clean data), both scored; the
    better of the two by FD is the teacher's score, as in the restoration benchmark. Writes 32 of its samples."""
    net, objective, card = load_model(folder)
    by_level = teacher_truncation_samples(net, objective, card.image_shape, scorer.n_eval, scorer.seed)
    proximal = {level: scorer.proximal_fd(s) for level, s in by_level.items() if level}
    level = min(proximal, key=proximal.get)
    full, truncated = scorer.true_scores(by_level[0.0]), scorer.true_scores(by_level[level])
    best_is_truncated = truncated["fd"] < full["fd"]
    best = truncated if best_is_truncated else full
    save_grid(feature_images(by_level[level if best_is_truncated else 0.0][:32]), str(grid), nrow=8)
    return {"fd": best["fd"], "kid": best["kid"], "kid_std": best["kid_std"],
            "sampler": f"truncated at sigma {level} ({truncation_nfe(level)} NFE)" if best_is_truncated
            else "full Heun (35 NFE)",
            "fd_full": full["fd"], "kid_full": full["kid"], "fd_truncated": truncated["fd"],
            "kid_truncated": truncated["kid"], "truncation_level": level, "proximal_fd_truncated": proximal[level],
            "steps": card.steps}


def score_student(folder: Path, scorer: Scorer, grid: Path) -> dict:
    """A saved one-step generator's samples, scored; writes 32 of them."""
    samples = sampler_for(folder).sample(scorer.n_eval, seed=scorer.seed)
    save_grid(feature_images(samples[:32]), str(grid), nrow=8)
    return {**scorer.true_scores(samples), "proximal_fd": scorer.proximal_fd(samples), "steps": read_card(folder).steps}


def floor_distances(dataset: str, source: str, split: str, seed: int, cache: Path,
                    image_size: int | None = None, n: int | None = None) -> dict:
    """The floor: FD / KID between a dataset's clean evaluation images (the first ``n``, as a :class:`Scorer`
    with ``n_eval`` = ``n`` reads them; default all) and as many clean images of ``split`` of its ``source``
    (disjoint from them: another split, or another subject), on the evaluation features."""
    from rsd_core.data.reader import open_dataset

    ds = open_dataset(dataset)
    true = evaluation_extractor(ds.manifest.image_shape[0])
    clean = ds.clean_eval().read_all(limit=n)[0]
    ref = cached_features(cache / f"ref-{true.id}-n{len(clean)}.npy", true, clean)
    src = get_source(source, split, image_size)
    other = src.load(0, min(src.count, len(clean)))[0]
    result = distances(true.features(quantise(feature_images(other))), ref, true.id, seed)
    return {**result, "extractor": true.label, "against": f"{source} {split} split, first {len(other)} images",
            "n": len(clean)}
