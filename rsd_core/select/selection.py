"""Proximal FID and model selection without clean data (docs/algorithms.md §8).

Proximal FID compares generated images *pushed through the same corruption* (fresh operator
state, fresh measurement noise, then uint8 re-quantisation) with the corrupted dataset itself,
so checkpoints and the teacher's truncation point are chosen from corrupted data alone. When the
dataset carries a clean evaluation split, the true Frechet distance of every candidate is
reported next to it, only to measure how well the proximal choice agrees with the oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from rsd_core.data.reader import CorruptedDataset, open_dataset
from rsd_core.kinds import get_kind
from rsd_core.operators import Operator
from rsd_core.operators.mri import to_complex
from rsd_core.select.classifier import ClassifierExtractor
from rsd_core.select.fd_interval import fd_interval, paired_difference_interval
from rsd_core.select.frechet import (
    FeatureExtractor,
    FeatureStats,
    cached_reference_stats,
    compute_stats,
    frechet_distance,
    spearman,
)
from rsd_core.select.inception import InceptionExtractor
from rsd_core.select.ssl_features import SelfSupervisedExtractor, SSLRecipe
from rsd_core.stages import (
    DISTILL_DIR,
    checkpoint_distill_config,
    generator_card,
    generator_from_checkpoint,
    load_model,
    read_card,
    save_model,
)
from rsd_core.train.loop import list_checkpoints, use_bf16
from rsd_core.train.objectives import Objective
from rsd_core.train.sampling import edm_time_steps, heun_sample, truncation_index, truncation_nfe
from rsd_core.viz import save_grid

# Truncation candidates, mapped to the grid levels 0.585, 0.296, 0.140, 0.060, 0.023; 0.0 = the full sampler.
TRUNCATION_LEVELS = (0.58, 0.29, 0.13, 0.05, 0.02, 0.0)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Round to the uint8 grid of [-1, 1] images, as saved images (and the FID protocol) are."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def feature_images(x: torch.Tensor) -> torch.Tensor:
    """What the extractor sees: complex 2-channel images as magnitudes mapped to [-1, 1]."""
    if x.shape[1] == 2:
        return (to_complex(x).abs()[:, None].clamp(0, 1) * 2 - 1).float()
    return x


def corrupted_view(x: torch.Tensor, operator: Operator, rng: torch.Generator) -> torch.Tensor:
    """A(x) + sigma_n eps with fresh state, as an image: the generated side of Proximal FID."""
    state = operator.sample_state(len(x), tuple(x.shape[1:]), rng, x.device)
    y = operator.image_view(operator.observe(x, state, rng), state)  # as the reference side sees it
    return quantise(feature_images(y))


# self-supervised: the default for selection, learnt from the dataset's own corrupted observations (ssl_features).
# inception: the standard FID network (GPU presets). classifier, classifier-corrupted: EVALUATION ONLY, CNNs
# trained with labels on clean Fashion-MNIST (the images the benchmark's corrupted datasets were made from);
# they assume clean labelled data from the same domain, which a data team does not have.
EXTRACTORS = ("self-supervised", "inception", "classifier", "classifier-corrupted")


def make_extractors(
    name: str, operator: Operator, dataset: CorruptedDataset | None = None
) -> tuple[FeatureExtractor, FeatureExtractor | None]:
    """(Proximal FD extractor, true FD extractor) for an extractor name.

    ``self-supervised`` learns Proximal FD features from ``dataset``'s corrupted observations only; its true
    FD, which exists only where the dataset has a clean evaluation split (None otherwise), uses the clean
    classifier, an evaluation tool (Inception on magnitudes for complex MRI images). ``classifier-corrupted``
    (evaluation only) scores Proximal FD with the Fashion-MNIST classifier trained on this operator's corrupted
    views, and the true FD with the clean one, so true FDs stay comparable across settings."""
    if name == "self-supervised":
        if dataset is None:
            raise ValueError("extractor 'self-supervised' learns from the dataset's observations: pass the dataset")
        ext = self_supervised_extractor(dataset, SSLRecipe())
        return ext, (None if dataset.manifest.clean_eval_uri is None
                     else evaluation_extractor(dataset.manifest.image_shape[0]))
    if name == "classifier":
        ext = ClassifierExtractor()
        return ext, ext
    if name == "classifier-corrupted":
        channels = get_kind(operator.spec.kind).image_channels
        if channels not in (None, 1):  # the classifier learns from corrupted Fashion-MNIST: 1-channel images
            raise ValueError(f"extractor 'classifier-corrupted' trains on 1-channel images; operator kind "
                             f"'{operator.spec.kind}' needs {channels}-channel images: use 'classifier' or 'inception'")
        view = ClassifierExtractor(
            view=lambda x, gen: corrupted_view(x, operator, gen),
            view_id=operator.spec.model_dump_json(),
            view_name=operator.spec.kind,
        )
        return view, ClassifierExtractor()
    if name == "inception":
        ext = InceptionExtractor()
        return ext, ext
    raise ValueError(f"extractor must be one of {EXTRACTORS}, got '{name}'")


def evaluation_extractor(image_channels: int) -> FeatureExtractor:
    """The true FD's features beside self-supervised selection (evaluation only), by the images' channels:
    complex (2-channel, MRI) images are scored as magnitudes with Inception, as the paper's MRI FIDs are,
    since the Fashion-MNIST classifier describes no such domain; everything else with the clean Fashion-MNIST
    classifier. By the images, not the operator: a clean-data reference of MRI (identity operator) is scored
    with the same features as its corrupted-data models."""
    return InceptionExtractor() if image_channels == 2 else ClassifierExtractor()


def self_supervised_extractor(dataset: CorruptedDataset, recipe: SSLRecipe) -> SelfSupervisedExtractor:
    """The encoder ``recipe`` learns from ``dataset``'s observations (trained once, then loaded from the cache)."""
    return SelfSupervisedExtractor(lambda: observation_images(dataset, recipe.max_images),
                                   dataset.fingerprint, dataset.manifest.name, recipe)


def observation_images(ds: CorruptedDataset, n: int) -> torch.Tensor:
    """The first ``n`` observations as every extractor sees them: the operator's image view, quantised."""
    obs, state, _ = ds.read_all(limit=n)
    return quantise(feature_images(ds.operator.image_view(obs, state)))


def proximal_reference(dataset_uri: str, extractor: FeatureExtractor, n: int) -> FeatureStats:
    """Statistics of the first ``n`` corrupted observations (cached by dataset fingerprint)."""
    ds = open_dataset(dataset_uri)
    return cached_reference_stats(f"{ds.fingerprint[:32]}-proximal-n{n}", extractor,
                                  lambda: observation_images(ds, n))


def clean_reference(dataset_uri: str, extractor: FeatureExtractor, n: int) -> FeatureStats | None:
    """Statistics of the clean evaluation split, if the dataset has one (true FD only)."""
    clean = open_dataset(dataset_uri).clean_eval()
    if clean is None:
        return None

    def images():
        return quantise(feature_images(clean.read_all(limit=n)[0]))

    return cached_reference_stats(f"{clean.fingerprint[:32]}-clean-n{n}", extractor, images)


class CandidateScore(BaseModel):
    name: str
    step: int | None = None
    sigma_stop: float | None = None
    nfe: int = 1
    proximal_fd: float
    proximal_fd_interval: tuple[float, float] | None = None  # 95% bootstrap interval (rsd_core.select.fd_interval)
    true_fd: float | None = None


SELECTION_RULE = ("the latest checkpoint whose Proximal FD interval overlaps the lowest one's (tied within "
                  "resampling noise, the one trained longest)")


def choose_checkpoint(rows: list[CandidateScore]) -> CandidateScore:
    """:data:`SELECTION_RULE`. Training moves a generator on; an earlier checkpoint is preferred only when its
    Proximal FD is lower beyond the estimates' noise. Rows without an interval compare by their FD alone."""
    lowest = min(rows, key=lambda r: r.proximal_fd)
    if lowest.proximal_fd_interval is None:
        return lowest
    top = lowest.proximal_fd_interval[1]
    tied = [r for r in rows if r.proximal_fd_interval is not None and r.proximal_fd_interval[0] <= top]
    return max(tied, key=lambda r: (r.step or 0, -r.proximal_fd))


def proximal_features(samples: torch.Tensor, operator: Operator, extractor: FeatureExtractor,
                      seed: int) -> np.ndarray:
    """Proximal features of generated ``samples``: seen through the operator (its state drawn from
    ``seed + 1``, the same for every candidate, so candidates sampled from one seed stay paired)."""
    return extractor.features(corrupted_view(samples, operator, torch.Generator().manual_seed(seed + 1)), 64)


def score_samples(samples, operator, extractors, prox_ref, clean_ref, seed) -> tuple[float, float | None]:
    """(Proximal FD, true FD or None) of generated ``samples``."""
    return score_samples_with_features(samples, operator, extractors, prox_ref, clean_ref, seed)[:2]


def score_samples_with_features(samples, operator, extractors, prox_ref, clean_ref,
                                seed) -> tuple[float, float | None, np.ndarray]:
    """(Proximal FD, true FD or None, the proximal features behind the first, for its interval)."""
    prox_ext, true_ext = extractors
    features = proximal_features(samples, operator, prox_ext, seed)
    prox = frechet_distance(FeatureStats.from_features(features, prox_ext.id), prox_ref)
    true = None
    if clean_ref is not None:
        true = frechet_distance(compute_stats(true_ext, quantise(feature_images(samples))), clean_ref)
    return prox, true, features


@torch.no_grad()
def teacher_truncation_samples(net, objective: Objective, shape, n: int, seed: int,
                               levels=TRUNCATION_LEVELS, batch_size: int = 250) -> dict[float, torch.Tensor]:
    """Samples of every truncation point from one Heun trajectory per batch (level -> images).

    Level L gives the x0 prediction at the lowest grid level >= L (the rule of ``heun_sample``);
    0.0 gives the full 35-NFE sample. One trajectory serves all levels.
    """
    grid = edm_time_steps()[:-1].tolist()
    picks = {lvl: None if (i := truncation_index(lvl)) is None else grid[i] for lvl in levels}
    outs: dict[float, list[torch.Tensor]] = {lvl: [] for lvl in levels}
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    bf16 = use_bf16("auto", device)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        latents = torch.randn((b, *shape), generator=gen)
        input_state = objective.draw_input_state(b, shape, gen, device)
        at_level: dict[float, torch.Tensor] = {}

        def denoise(x, t, input_state=input_state):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return objective.denoise(net, x.float(), t.float(), input_state).float()

        final, _ = heun_sample(denoise, latents, on_level=lambda t, d, at=at_level: at.__setitem__(t, d.float()))
        for lvl, t in picks.items():
            outs[lvl].append(final.float() if t is None else at_level[t])
    return {lvl: torch.cat(v) for lvl, v in outs.items()}


class SelectionResult(BaseModel):
    # Features of the true FD; None when the dataset has no clean evaluation split (no true FD at all).
    extractor_label: str | None
    extractor_id: str | None
    # The EXTRACTORS name of the Proximal FD features; None in selection.json files written before it was recorded.
    proximal_extractor: str | None = None
    # None in selection.json files written before Proximal FD could use its own extractor: the same one.
    proximal_extractor_label: str | None = None
    proximal_extractor_id: str | None = None
    n_samples: int
    rows: list[CandidateScore]
    teacher_rows: list[CandidateScore]
    chosen_checkpoint: str
    chosen_step: int
    proximal_fd: float
    true_fd: float | None = None
    teacher_proximal_fd: float
    teacher_best_sigma_stop: float | None
    teacher_true_fd: float | None = None
    teacher_true_fd_full: float | None = None
    teacher_true_fd_truncated: float | None = None
    spearman: float | None = None
    chosen_true_fd: float | None = None
    best_true_fd: float | None = None
    # Bootstrap intervals (rsd_core.select.fd_interval); None in selection.json files written before they existed.
    proximal_fd_interval: tuple[float, float] | None = None
    rule: str | None = None  # how the checkpoint was chosen (SELECTION_RULE)
    lowest_checkpoint: str | None = None  # the lowest Proximal FD, which the rule may pass over for a later tie
    runner_up_checkpoint: str | None = None
    runner_up_difference: tuple[float, float] | None = None  # FD(chosen) - FD(runner-up), paired resamples
    distinguishable: bool | None = None  # the whole difference interval below 0
    generator_dir: str
    grid: str

    @property
    def proximal_scoring(self) -> str:
        """How the Proximal FDs were measured (features and sample count): only equal ones compare."""
        return f"{self.proximal_extractor_id or self.extractor_id}/n{self.n_samples}"


def select_stage(
    dataset_uri: str,
    teacher_dir: str | Path,
    distill_dir: str | Path,
    out_dir: str | Path,
    *,
    n_samples: int = 1000,
    extractor: str = "self-supervised",
    seed: int = 0,
    progress: bool = True,
    n_teacher: int | None = None,
) -> SelectionResult:
    """Score every distillation checkpoint (EMA generator) and the teacher's truncation points by
    Proximal FID, pick the best checkpoint, save it as a model and report the agreement with the
    true FD where a clean evaluation split exists."""
    out_dir = Path(out_dir)
    ds = open_dataset(dataset_uri)
    operator = ds.operator
    extractors = make_extractors(extractor, operator, ds)
    prox_ext, true_ext = extractors
    n_ref = min(len(ds), n_samples)
    prox_ref = proximal_reference(dataset_uri, prox_ext, n_ref)
    clean_ref = None if true_ext is None else clean_reference(dataset_uri, true_ext, n_samples)

    checkpoints = list_checkpoints(Path(distill_dir) / DISTILL_DIR / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"no distillation checkpoints under {Path(distill_dir) / 'distill' / 'checkpoints'}")
    rows, features = [], {}
    for ckpt in checkpoints:
        sampler = generator_from_checkpoint(ckpt, teacher_dir, bf16=use_bf16("auto", torch.device("cpu")))
        samples = sampler.sample(n_samples, seed=seed)  # one seed: every checkpoint sees the same latents
        prox, true, features[ckpt.name] = score_samples_with_features(samples, operator, extractors, prox_ref,
                                                                      clean_ref, seed)
        rows.append(CandidateScore(name=ckpt.name, step=int(ckpt.name.split("-")[1]), proximal_fd=prox, true_fd=true,
                                   proximal_fd_interval=fd_interval(features[ckpt.name], prox_ref, seed=seed)))
        if progress:
            _report(ckpt.name, prox, true)

    teacher, objective, card = load_model(teacher_dir)
    n_t = n_teacher or n_samples
    teacher_rows = []
    if progress:
        print(f"[select] sampling the teacher ({n_t} trajectories of 35 NFE) for its truncation levels", flush=True)
    by_level = teacher_truncation_samples(teacher, objective, card.image_shape, n_t, seed)
    for level, samples in by_level.items():
        prox, true = score_samples(samples, operator, extractors, prox_ref, clean_ref, seed)
        teacher_rows.append(CandidateScore(name=f"teacher@{level}", sigma_stop=level or None,
                                           nfe=truncation_nfe(level), proximal_fd=prox, true_fd=true))
        if progress:
            _report(f"teacher@{level}", prox, true)
    best_teacher = min(teacher_rows, key=lambda r: r.proximal_fd)
    full = next(r for r in teacher_rows if r.sigma_stop is None)

    chosen = choose_checkpoint(rows)
    others = sorted((r for r in rows if r.name != chosen.name), key=lambda r: r.proximal_fd)
    runner_up = others[0] if others else None
    chosen_path = next(c for c in checkpoints if c.name == chosen.name)
    result_kwargs = {"proximal_fd_interval": chosen.proximal_fd_interval, "rule": SELECTION_RULE,
                     "lowest_checkpoint": min(rows, key=lambda r: r.proximal_fd).name}
    if runner_up is not None:
        difference = paired_difference_interval(features[chosen.name], features[runner_up.name], prox_ref, seed=seed)
        result_kwargs |= {"runner_up_checkpoint": runner_up.name, "runner_up_difference": difference,
                          "distinguishable": difference[1] < 0}
    if progress:
        _report_choice(chosen, runner_up, result_kwargs)
    if clean_ref is not None:
        truncated = [r for r in teacher_rows if r.sigma_stop is not None]
        result_kwargs |= {
            "true_fd": chosen.true_fd,
            "chosen_true_fd": chosen.true_fd,
            "best_true_fd": min(r.true_fd for r in rows),
            "spearman": spearman([r.proximal_fd for r in rows], [r.true_fd for r in rows]) if len(rows) >= 3 else None,
            "teacher_true_fd": best_teacher.true_fd,
            "teacher_true_fd_full": full.true_fd,
            "teacher_true_fd_truncated": min(truncated, key=lambda r: r.proximal_fd).true_fd,
        }

    sampler = generator_from_checkpoint(chosen_path, teacher_dir)
    gen_card = generator_card(read_card(teacher_dir), checkpoint_distill_config(chosen_path), chosen.step or 0,
                              {"proximal_fd": chosen.proximal_fd}, card.code_version)
    generator_dir = save_model(out_dir / "selected", sampler.net, gen_card, objective.operator)

    student = sampler.sample(24, seed=seed + 7)
    teacher_best = by_level[best_teacher.sigma_stop or 0.0][:24]
    obs_images = corrupted_view(student, operator, torch.Generator().manual_seed(seed + 3))
    grid = out_dir / "selection_grid.png"
    save_grid(torch.cat([feature_images(teacher_best), feature_images(student), obs_images]), str(grid), nrow=8)

    result = SelectionResult(
        extractor_label=None if true_ext is None else true_ext.label,
        extractor_id=None if true_ext is None else true_ext.id,
        proximal_extractor=extractor, proximal_extractor_label=prox_ext.label,
        proximal_extractor_id=prox_ext.id, n_samples=n_samples, rows=rows, teacher_rows=teacher_rows,
        chosen_checkpoint=str(chosen_path), chosen_step=chosen.step or 0, proximal_fd=chosen.proximal_fd,
        teacher_proximal_fd=best_teacher.proximal_fd, teacher_best_sigma_stop=best_teacher.sigma_stop,
        generator_dir=str(generator_dir), grid=str(grid), **result_kwargs,
    )
    (out_dir / "selection.json").write_text(result.model_dump_json(indent=1))
    return result


def _report_choice(chosen: CandidateScore, runner_up: CandidateScore | None, intervals: dict) -> None:
    """The choice with its interval, and whether it is told apart from the runner-up. The rule ties checkpoints
    by their own intervals, so the paired difference can still put a kept later checkpoint behind the lowest one:
    the line says so rather than calling them alike."""
    lo, hi = intervals["proximal_fd_interval"]
    line = f"[select] chosen {chosen.name}: proximal FD {chosen.proximal_fd:.2f} (95% interval [{lo:.2f}, {hi:.2f}])"
    if runner_up is not None:
        d_lo, d_hi = intervals["runner_up_difference"]
        if intervals["distinguishable"]:
            verdict = "better"
        elif d_lo > 0:
            verdict = "worse, kept by the rule (its own interval overlaps the lowest one's)"
        else:
            verdict = "cannot tell them apart"
        line += (f"; minus runner-up {runner_up.name} ({runner_up.proximal_fd:.2f}): [{d_lo:.2f}, {d_hi:.2f}], "
                 f"{verdict}")
    print(line, flush=True)


def _report(candidate: str, proximal_fd: float, true_fd: float | None) -> None:
    """One plain line per scored candidate (selection can take minutes on a CPU)."""
    true = f", true FD {true_fd:.2f} (evaluation only)" if true_fd is not None else ""
    print(f"[select] {candidate}: proximal FD {proximal_fd:.2f}{true}", flush=True)
