"""The restore benchmark: held-out clean images seen through each operator, restored by every method.

    python -m benchmarks.restore [--models DIR] [--tasks inpaint-0.8,...] [--n-images 256] [--slow-images 32]
                                 [--train]

For every task, the first ``--n-images`` Fashion-MNIST *test* images (never seen in training;
brain-MRI test slices for ``mri-r4*``) are corrupted by the task's operator with a fixed seed,
then restored by each method, rows named for what they run; where a row is a registered restoration method
(rsd_core.restore.methods, ``RestoreConfig.method``) it runs through the registry, some rows finer-grained than
the method (which fit, how many restarts, whether projected):
- baselines (no learnt prior): ``classical`` (method ``classical`` without data consistency: the operator's
  classical estimate, rsd_core.restore.baselines; for MRI, SENSE with the weight the held-out k-space lines
  choose), ``classical-projected`` (noiseless operators: method ``classical`` as configured by default, the same
  estimate moved onto the measurements by the learnt methods' data-consistency step, e.g. bicubic +
  projection), ``compressed-sensing`` (MRI only: L1-wavelet, sigpy, its weight chosen likewise; not a method) and
  ``projection`` (method ``projection``: that data-consistency step alone from a zero image, the minimum-norm
  image reproducing y);
- ``dps``: diffusion posterior sampling with the teacher (rsd_core.restore.posterior; the ancestral schedule at
  DPS_STEPS levels), one posterior sample; ``dps-mean``: the mean of DPS_SAMPLES of them (the same run). These
  call posterior.dps_restore directly, not method ``dps``: they run the guidance and the truncation level tuned
  per task (dps_settings), which RestoreConfig does not carry; ``dps-1000``: one sample at DPS_LONG_STEPS levels (the
  reference's 1,000), only on tasks with a validation run at that many levels (its own zeta' and level);
- ``posterior-net-observations``: method ``posterior-net`` with ``encoder.fit_on`` "observations", the amortised
  posterior-mean network (rsd_core.restore.encoder, target "image")
  fitted once on the task's *training* observations (``DIR/<task>/data``: corrupted, no clean image), each
  split into an input and held-out measurements by the operator's further mask (operators that have one:
  inpainting, MRI), then one pass per image (mean and spread); its fit time is reported apart
  (``fit_seconds``), as it is paid once per dataset, not per image;
- ``posterior-net-generator``: method ``posterior-net`` with ``fit_on`` "generator", the same network fitted
  instead on the generator's samples seen through the
  operator with the states of the training observations;
- ``latent-encoder``: method ``latent`` with an encoder, the amortised latent encoder (target "latent"), fitted
  on the same training observations' misfit, then one generator pass per restart (4 restarts: mean and spread),
  plus ``--encoder-steps`` refinement steps (default 0); ``latent-encoder-1``: the same with one restart;
- ``latent``: method ``latent`` without an encoder, latent optimisation from noise through the one-step generator
  (``LATENT_OPTIMISATION``: 30 Adam steps x 4 restarts, the serving path).
``dps``, ``dps-mean``, ``dps-1000`` and ``latent`` run on the first ``--slow-images`` images. Scores: PSNR and SSIM
against the clean images ([0, 1] scale; MRI: magnitudes, range per image), and seconds per image (wall time of the
method on the same images, same run, batched, ``--threads`` torch threads). Each row carries ``n_images`` and,
against the best baseline of its task (``vs``: the highest mean PSNR among the baselines), the mean differences and
their paired bootstrap 95% intervals over the images both ran on (``psnr_diff`` / ``ci95``, ``ssim_diff`` /
``ssim_ci95``);
``default`` is true on the rows of the method ``rsd restore`` runs by default for the task's operator.
Models are read from ``DIR/<task>/{teacher,generator}`` (the layout of benchmarks/restoration.py's work
folder); with ``--train``, missing ones are trained there with
``--budget`` / ``--distill-budget`` minutes (``mri-r4``: benchmarks/mri.py's R = 4 training with
``--mri-budget`` / ``--mri-distill-budget``; a task without models is skipped and listed).
Each method's restorations are kept in ``OUT/<task>/<method>.safetensors`` with its timing, so an
interrupted run resumes. Writes benchmarks/results/restore.json (also the last stdout line),
docs/figures/restore_<task>.png (rows: observation, then each method, the default's spread (scaled to its
maximum), clean) and a section of docs/results.md; ``--no-publish`` writes only OUT/restore.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.mri import train_mri_models
from benchmarks.report import emit
from benchmarks.restoration import TASKS as TRAINING_TASKS
from benchmarks.restoration import TEACHER_TRAIN, train_models
from benchmarks.statistics import paired_bootstrap_ci
from rsd_core.data.reader import open_dataset
from rsd_core.data.sources import brain_mri, fashion_mnist
from rsd_core.kinds import build_operator
from rsd_core.operators import Operator
from rsd_core.operators.mri import MRI
from rsd_core.restore.baselines import (
    CS_ITERS,
    CS_LAMBDAS,
    LSQ_ITERS,
    LSQ_LAMBDA_FLOOR,
    LSQ_LAMBDA_PER_VARIANCE,
    WIENER_NSR_PER_VARIANCE,
    compressed_sensing_mri,
)
from rsd_core.restore.encoder import FIT_CHOICES, EncoderConfig, load_encoder, save_encoder
from rsd_core.restore.estimate import (
    CONSISTENCY_ITERS,
    LATENT_OPTIMISATION,
    LATENT_RESTARTS,
    RestoreConfig,
    fit_restore_encoder,
    load_generator,
)
from rsd_core.restore.image_metrics import psnr, ssim
from rsd_core.restore.methods import RestoreModels, get_method
from rsd_core.restore.posterior import DPSConfig, dps_restore
from rsd_core.stages import load_model, read_card
from rsd_core.viz import save_grid, to_display

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "figures"
SECTION_START = "<!-- benchmarks/restore.py: generated section start -->"
SECTION_END = "<!-- benchmarks/restore.py: generated section end -->"
TASKS = ("inpaint-0.6", "inpaint-0.8", "blur-noise-0.2", "superres-x2", "mri-r4", "mri-r4-estimated")
# MRI tasks and their coil maps (benchmarks/mri.py): mri-r4-estimated simulates each test scan through smooth
# random coils of its own and restores it with ESPIRiT's estimates of them, as a team's own scans are.
MRI_TASKS = {"mri-r4": "bank", "mri-r4-estimated": "estimated"}
# Rows named for what they run: the baselines (no learnt prior), DPS with the teacher, then the learnt restorers.
BASELINES = ("classical", "classical-projected", "compressed-sensing", "projection")  # intervals are against the best
DPS_METHODS = ("dps", "dps-mean", "dps-1000")
FAST_METHODS = ("posterior-net-observations", "posterior-net-generator", "latent-encoder", "latent-encoder-1",
                "latent")  # timed against DPS
METHODS = BASELINES + DPS_METHODS + FAST_METHODS
SLOW_METHODS = (*DPS_METHODS, "latent")  # run on the first --slow-images images only
LABELS = {"classical": "classical", "classical-projected": "classical + projection", "compressed-sensing":
          "L1-wavelet CS", "projection": "projection", "dps": "DPS, 1 sample",
          "dps-mean": "DPS, mean of samples", "dps-1000": "DPS, 1,000 levels",
          "posterior-net-observations": "net on observations", "posterior-net-generator": "net on generator",
          "latent-encoder": "latent encoder", "latent-encoder-1": "latent encoder, 1 pass", "latent": "latent opt."}
# The names the published rows had before the rows were named for what they run.
FORMER_NAMES = {"teacher-dps": "dps", "ambient-posterior-net": "posterior-net-observations",
                "generator-posterior-net": "posterior-net-generator", "generator-encoder": "latent-encoder",
                "generator-single-pass": "latent-encoder-1", "generator-latent-opt": "latent"}
OBSERVATION_SEED = 1234
# DPS: the ancestral schedule at DPS_STEPS levels, DPS_SAMPLES posterior samples per observation (the dps row is the
# first, dps-mean their mean), the guidance constant and the level whose x0 prediction it returns chosen per task
# on validation images (dps_settings).
DPS_STEPS = 100
DPS_SAMPLES = 4
DPS_LONG_STEPS = 1000
DPS_UNTUNED = {"zeta": 1.0, "sigma_stop": 1.0}

# The published restore table's teachers were trained without the restoration benchmark's held-out weight floor
# (adopted after them, docs/results.md "Teacher A/B"): --train keeps making the models the table was made with.
RESTORE_TEACHER = TEACHER_TRAIN.updated(heldout_sigma_floor=0.0)


def model_digest(folder: Path) -> str:
    """The first 16 hex digits of the sha256 of a model folder's weights: what a tuning record was tuned on."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:16]


def dps_settings(task: str, num_steps: int = DPS_STEPS, model: str | None = None) -> dict:
    """DPS's zeta' and truncation level for ``task``: those of the validation run of benchmarks/restore_tuning.py
    (ancestral schedule, ``num_steps`` levels) with the best PSNR of the samples' mean, with the run's size; without
    one, DPS_UNTUNED marked untuned. The test images never choose them. With ``model`` (a teacher's
    :func:`model_digest`), only runs on that teacher count: settings tuned on another model do not carry over."""
    path = ROOT / "benchmarks" / "results" / "restore_tuning.json"
    records = [r for r in (json.loads(path.read_text()) if path.exists() else [])
               if r["task"] == task and r["method"] == "dps" and r.get("split") == "validation"
               and r["settings"].get("schedule") == "ancestral" and r["settings"].get("num_steps") == num_steps
               and (model is None or r.get("model_sha256") == model)]
    if not records:
        return {**DPS_UNTUNED, "tuned_on": None}
    best = max(records, key=lambda r: r["psnr"])
    return {"zeta": best["settings"]["zeta"], "sigma_stop": best["settings"]["sigma_stop"],
            "tuned_on": f"{best['n_images']} validation images, {len(records)} settings"}


def default_method(operator) -> str:
    """The method that RestoreConfig() is for ``operator``, what rsd restore runs (its rows say ``default``)."""
    encoder = RestoreConfig().encoder
    if encoder.target == "latent":
        return "latent-encoder"
    return {"observations": "posterior-net-observations", "generator": "posterior-net-generator"}[
        encoder.image_pairs(operator)]


def cache_settings(config: RestoreConfig, operator: Operator) -> dict:
    """``config`` as the caches digest it: ``method`` is left out, and fit_on where it means what every fit did
    before the field existed (image target on the generator's samples; the latent target, which ignores it), and
    the fit choices added later (encoder.FIT_CHOICES) at their defaults, so those caches stay valid; a fit on
    ``operator``'s observations digests the split strength it resolves to, so an operator's default for restorers
    (``restorer_further``) keys its fits apart from those made with the operator's own."""
    dump = config.model_dump(exclude={"method"})  # named by the encoder in every cached config: nothing new
    encoder = dump.get("encoder")
    if encoder and (encoder["target"] == "latent" or encoder["fit_on"] == "generator"):
        del encoder["fit_on"]
    if encoder:  # fields added later, at the value every earlier fit had
        changed = config.encoder.changed_fit_choices()
        for name in FIT_CHOICES:
            if name not in changed:
                encoder.pop(name, None)
        if config.encoder.target == "image" and config.encoder.image_pairs(operator) == "observations" and \
                (strength := config.encoder.split_strength(operator)) is not None:
            encoder["holdout_delta"] = strength
    return dump


# Validation images, where settings are tuned (benchmarks/restore_tuning.py), never scored here: Fashion-MNIST
# training images from 59,000 on (the models saw the first 20,000); for MRI, no third subject ships, so the held-out
# subject's last slices (the test images are its first ones, at most MRI_TEST_MAX of them).
FMNIST_VALIDATION_START = 59_000
MRI_TEST_MAX = 256


def clean_images(task: str, n: int, image_shape: tuple[int, ...]) -> torch.Tensor:
    """The first ``n`` held-out clean test images of the task's source, in [-1, 1]."""
    if task in MRI_TASKS:
        source = brain_mri("test", image_shape[-1])
        return source.load(0, min(n, MRI_TEST_MAX))[0]
    source = fashion_mnist("test")
    return source.load(0, min(n, source.count))[0]


def validation_images(task: str, n: int, image_shape: tuple[int, ...]) -> torch.Tensor:
    """``n`` clean validation images of the task's source, disjoint from every test image, in [-1, 1]."""
    if task.startswith("mri"):
        source = brain_mri("test", image_shape[-1])
        n = min(n, source.count - MRI_TEST_MAX)
        return source.load(source.count - n, source.count)[0]
    return fashion_mnist("train").load(FMNIST_VALIDATION_START, FMNIST_VALIDATION_START + n)[0]


def observe(operator, clean: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """y = A(x) + sigma_n eps with per-sample state, from one fixed seed; the state returned is what the data's
    owner knows of it (with observed coil maps: ESPIRiT's estimates, not the simulating maps)."""
    rng = torch.Generator().manual_seed(OBSERVATION_SEED)
    state = operator.simulation_state(len(clean), tuple(clean.shape[1:]), rng)
    y = operator.observe(clean, state, rng)
    return y, operator.recorded_state(y, state)


def scores(restored: torch.Tensor, clean: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR and SSIM: [0, 1] images with range 1; complex (MRI) images as magnitudes, range per image."""
    if clean.shape[1] == 2:
        return psnr(restored, clean).values, ssim(restored, clean).values
    a, b = to_display(restored), to_display(clean)
    return psnr(a, b, 1.0).values, ssim(a, b, 1.0).values


def compared_rows(task: str, per_image: dict, seconds: dict, default: str) -> list[dict]:
    """One row per method: mean PSNR / SSIM on the images it ran on, and the paired bootstrap 95% interval of its
    difference to the best baseline (highest mean PSNR of BASELINES on all images) on those same images."""
    best = max((m for m in BASELINES if m in per_image), key=lambda m: per_image[m][0].mean())
    rows = []
    for method, (p, s) in per_image.items():
        n = len(p)
        row = {"task": task, "method": method, "default": method == default, "psnr": float(p.mean()),
               "ssim": float(s.mean()), "n_images": n, **seconds[method], "vs": best}
        if method != best:
            row |= {"psnr_diff": float((p - per_image[best][0][:n]).mean()),
                    "ci95": paired_bootstrap_ci(p, per_image[best][0][:n]),
                    "ssim_diff": float((s - per_image[best][1][:n]).mean()),
                    "ssim_ci95": paired_bootstrap_ci(s, per_image[best][1][:n])}
        rows.append(row)
    return rows


def run_method(folder: Path, method: str, settings: dict, work: Callable[[], tuple], n: int) -> dict:
    """Run ``work`` (-> restorations, spread or None[, {"seconds": its own timing, "fit": ...}]) and time it, unless
    ``folder`` holds the result of the same method with the same settings (the file name carries their
    digest). A method with a cached one-off fit (the encoder) measures its own per-image time."""
    digest = hashlib.sha256(json.dumps({**settings, "n": n}, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = folder / f"{method}-{digest}.safetensors"
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists()):
        start = time.perf_counter()
        restored, spread, *own = work()
        info = own[0] if own else {}
        seconds = info.get("seconds", time.perf_counter() - start)
        tensors = {"restored": restored.contiguous()}
        if spread is not None:
            tensors["spread"] = spread.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        meta_path.write_text(json.dumps({"seconds": seconds, "n": n, "threads": torch.get_num_threads(),
                                         "settings": settings, "fit": info.get("fit")}, default=str))
    meta = json.loads(meta_path.read_text())
    fit = {"fit_seconds": fit_meta["seconds"]} if (fit_meta := meta.get("fit")) else {}
    return {**load_file(str(path)), "seconds_per_image": meta["seconds"] / meta["n"], **fit}


def fitted_encoder(folder: Path, models: Path, task: str, config: RestoreConfig,
                   progress: bool = True) -> tuple[Path, dict]:
    """The task's encoder fitted on its training observations, cached in ``folder`` by settings digest."""
    generator_dir, data = models / task / "generator", open_dataset(str(models / task / "data"))
    card = read_card(generator_dir)
    fit = {"encoder": cache_settings(config, build_operator(card.operator))["encoder"],
           "prior_weight": config.prior_weight,
           "sigma_floor": config.sigma_floor}  # what the fit depends on: restoration settings may vary
    digest = hashlib.sha256(json.dumps({"model": card.model_dump(), "data": data.fingerprint,
                                        "config": fit}, sort_keys=True, default=str).encode())
    path = folder / f"encoder-{digest.hexdigest()[:12]}.safetensors"
    if not path.exists():
        y, state, _ = data.read_all(limit=config.encoder.max_observations)
        start = time.perf_counter()
        encoder, losses = fit_restore_encoder(load_generator(generator_dir), y, state, config, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        save_encoder(encoder, path, {"seconds": time.perf_counter() - start, "observations": len(y),
                                     "loss_first": losses[0], "loss_last": losses[-1]})
    return path, load_encoder(path)[1]


def run_task(task: str, models: Path, out: Path, args) -> tuple[list[dict], dict]:
    generator_dir, teacher_dir = models / task / "generator", models / task / "teacher"
    card = read_card(generator_dir)
    operator = build_operator(card.operator)
    clean = clean_images(task, args.n_images, card.image_shape)
    y, state = observe(operator, clean)
    restarts = {"restarts": args.restarts} if args.restarts is not None else {}
    fit = {k: v for k, v in (("steps", args.encoder_fit_steps), ("width", args.encoder_width)) if v is not None}
    encoder_config = RestoreConfig().updated(batch_size=args.batch_size, steps=args.encoder_steps,
                                              encoder=EncoderConfig(**fit, target="latent"), **restarts)
    steps = {"steps": args.steps} if args.steps is not None else {}
    image_net = RestoreConfig().updated(batch_size=args.batch_size, steps=0)
    configs = {**({"posterior-net-observations": image_net.updated(
                      encoder=EncoderConfig(**fit, target="image", fit_on="observations"))}
                  if operator.splits_observations else {}),
               "posterior-net-generator": image_net.updated(
                   encoder=EncoderConfig(**fit, target="image", fit_on="generator")),
               "latent-encoder": encoder_config,
               "latent-encoder-1": encoder_config.updated(restarts=1),
               "latent": LATENT_OPTIMISATION.updated(batch_size=args.batch_size, **restarts, **steps)}
    teacher = model_digest(teacher_dir)
    dps_tuned, long_tuned = dps_settings(task, model=teacher), dps_settings(task, DPS_LONG_STEPS, teacher)
    dps_config = DPSConfig(batch_size=args.batch_size, num_steps=DPS_STEPS, samples=DPS_SAMPLES,
                           zeta=dps_tuned["zeta"])
    long_config = DPSConfig(batch_size=args.batch_size, num_steps=DPS_LONG_STEPS, zeta=long_tuned["zeta"])

    def through_generator(method: str, y: torch.Tensor, state: dict):
        config = configs[method]
        encoder, fit = None, None
        if config.encoder is not None:  # the fit is cached apart: time only what each image costs
            path, fit = fitted_encoder(out / task, models, task, config, progress=not args.quiet)
            encoder = load_encoder(path)[0]
        restorer, loaded = get_method(config.method), RestoreModels(generator_dir, encoder=encoder)
        head = {k: v[:2] for k, v in state.items()}  # an untimed warm-up: first calls allocate and dispatch
        restorer.restore(loaded, y[:2], head, config)
        start = time.perf_counter()
        result = restorer.restore(loaded, y, state, config)
        return result.mean, result.spread, {"seconds": time.perf_counter() - start, "fit": fit}

    def baseline(config: RestoreConfig, y: torch.Tensor, state: dict):
        return get_method(config.method).restore(RestoreModels(generator_dir), y, state, config).mean, None

    @functools.cache
    def posterior_samples(n: int, long: bool = False) -> tuple:  # one DPS run serves dps and dps-mean
        net, objective, _ = load_model(teacher_dir)
        config, tuned = (long_config, long_tuned) if long else (dps_config, dps_tuned)
        start = time.perf_counter()
        samples = dps_restore(net, objective, card.image_shape, y[:n], {k: v[:n] for k, v in state.items()},
                              config, tuned["sigma_stop"], progress=not args.quiet)
        return samples, time.perf_counter() - start

    def teacher_dps(y: torch.Tensor, state: dict):
        samples, seconds = posterior_samples(len(y))
        return samples.sample, None, {"seconds": seconds / DPS_SAMPLES}

    def teacher_dps_mean(y: torch.Tensor, state: dict):
        samples, seconds = posterior_samples(len(y))
        return samples.mean, samples.spread, {"seconds": seconds}

    def teacher_dps_long(y: torch.Tensor, state: dict):
        samples, seconds = posterior_samples(len(y), long=True)
        return samples.sample, None, {"seconds": seconds}

    work = {"classical": functools.partial(baseline, RestoreConfig(method="classical", data_consistency=False)),
            "projection": functools.partial(baseline, RestoreConfig(method="projection")),
            "dps": teacher_dps, "dps-mean": teacher_dps_mean,
            **{m: functools.partial(through_generator, m) for m in configs}}
    if long_tuned["tuned_on"]:  # 1,000 levels cost 10x: run where validation has chosen their settings
        work["dps-1000"] = teacher_dps_long
    if operator.sigma_n == 0:  # noiseless: the classical estimate moved onto the measurements, as the nets are
        work["classical-projected"] = functools.partial(baseline, RestoreConfig(method="classical"))
    if isinstance(operator, MRI):  # the compressed-sensing baseline of the MRI literature
        work["compressed-sensing"] = lambda y, state: (compressed_sensing_mri(operator, y, state), None)
    classical = {"operator": card.operator.model_dump(),  # and the estimates' own constants
                 "constants": [WIENER_NSR_PER_VARIANCE, LSQ_LAMBDA_PER_VARIANCE, LSQ_LAMBDA_FLOOR, LSQ_ITERS]}
    settings = {"classical": classical, "classical-projected": {**classical, "iters": CONSISTENCY_ITERS},
                "projection": {"operator": card.operator.model_dump(), "iters": CONSISTENCY_ITERS},
                "compressed-sensing": {"operator": card.operator.model_dump(), "lambdas": list(CS_LAMBDAS),
                                       "iters": CS_ITERS},
                **{m: {"model": read_card(teacher_dir).model_dump(), "config": dps_config.model_dump(),
                       "sigma_stop": dps_tuned["sigma_stop"]} for m in ("dps", "dps-mean")},
                "dps-1000": {"model": read_card(teacher_dir).model_dump(), "config": long_config.model_dump(),
                             "sigma_stop": long_tuned["sigma_stop"]},
                **{m: {"model": card.model_dump(), "config": cache_settings(c, operator)} for m, c in configs.items()}}
    outputs, per_image, seconds, default = {}, {}, {}, default_method(operator)
    for method in [m for m in args.methods if m in work]:  # the ambient net only where the operator splits
        n = min(len(y), args.slow_images) if method in SLOW_METHODS else len(y)
        head = {k: v[:n] for k, v in state.items()}
        outputs[method] = run_method(out / task, method, settings[method],
                                     functools.partial(work[method], y[:n], head), n)
        per_image[method] = scores(outputs[method]["restored"], clean[:n])
        seconds[method] = {"seconds_per_image": outputs[method]["seconds_per_image"],
                           **({"fit_seconds": outputs[method]["fit_seconds"]} if "fit_seconds" in outputs[method]
                              else {})}
        print(f"   {method:28} PSNR {per_image[method][0].mean():6.2f} dB  SSIM {per_image[method][1].mean():.3f}  "
              f"{seconds[method]['seconds_per_image']:.3g} s/image ({n} images)", flush=True)
    rows = compared_rows(task, per_image, seconds, default)
    grid = save_task_grid(task, operator.image_view(y, state), outputs, default, clean, out, args.publish)
    return rows, {"task": task, "operator": card.operator.model_dump(), "grid": grid, "default": default,
                  **{f"{m}_config": c.model_dump() for m, c in configs.items()}, "dps_config": dps_config.model_dump(),
                  "dps_sigma_stop": dps_tuned["sigma_stop"], "dps_tuned_on": dps_tuned["tuned_on"], "n_images": len(y),
                  "slow_images": min(len(y), args.slow_images),
                  **({"dps_1000_config": long_config.model_dump(), "dps_1000_sigma_stop": long_tuned["sigma_stop"],
                      "dps_1000_tuned_on": long_tuned["tuned_on"]} if "dps-1000" in work else {})}


def save_task_grid(task: str, observed: torch.Tensor, outputs: dict, default: str, clean: torch.Tensor,
                   out: Path, publish: bool) -> str:
    """Eight columns; rows: observation, each method's restoration, the default's spread, clean."""
    k = min(8, len(clean))
    rows = [observed[:k]] + [outputs[m]["restored"][:k] for m in METHODS if m in outputs]
    if default in outputs:
        spread = outputs[default]["spread"][:k].norm(dim=1, keepdim=True)
        spread = spread / spread.amax().clamp_min(1e-12)
        rows.append((2 * spread - 1).expand(-1, clean.shape[1], -1, -1) if clean.shape[1] != 2
                    else torch.cat([spread, torch.zeros_like(spread)], dim=1))
    rows.append(clean[:k])
    path = (FIGURES if publish else out) / f"restore_{task}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(rows), str(path), nrow=k)
    return str(path.relative_to(ROOT)) if publish else str(path)


def with_published_tasks(result: dict) -> dict:
    """``result`` with the published rows and settings of the tasks it did not run (each task keeps its date; rows
    published under the former method names are renamed, their ``generator`` alias becomes ``default``), the tasks
    in :data:`TASKS`' order however they ran."""
    published = ROOT / "benchmarks" / "results" / "restore.json"
    old = json.loads(published.read_text()) if published.exists() else {"tasks": [], "task_settings": [], "rows": []}
    kept = [t for t in old["tasks"] if t not in result["tasks"]]
    dated = [{"date": old["date"], **s} for s in old["task_settings"] if s["task"] in kept]
    aliased = {(r["task"], FORMER_NAMES.get(r["alias_of"], r["alias_of"])) for r in old["rows"]
               if r["method"] == "generator"}
    rows = [{**r, "method": FORMER_NAMES.get(r["method"], r["method"])} for r in old["rows"]
            if r["task"] in kept and r["method"] != "generator"]
    rows = [{**r, "default": r.get("default", (r["task"], r["method"]) in aliased)} for r in rows]
    order = {task: i for i, task in enumerate(TASKS)}

    def by_task(items: list, task=lambda item: item) -> list:
        return sorted(items, key=lambda item: order.get(task(item), len(order)))

    return {**result, "rows": by_task(rows + result["rows"], lambda r: r["task"]),
            "tasks": by_task(kept + result["tasks"]),
            "task_settings": by_task(dated + result["task_settings"], lambda s: s["task"])}


def _interval(row: dict | None, key: str = "psnr") -> str:
    """A cell of the difference table: the mean difference to the task's best baseline and its 95% interval."""
    if row is None:
        return "n/a"
    if f"{key}_diff" not in row:
        return "(best)" if "vs" in row else "-"
    lo, hi = row["ci95" if key == "psnr" else f"{key}_ci95"]
    digits = 2 if key == "psnr" else 3
    return f"{row[f'{key}_diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def write_doc(result: dict, command: str) -> None:
    """Replace this benchmark's section of docs/results.md (appended at the end the first time)."""
    by = {(r["task"], r["method"]): r for r in result["rows"]}
    shown = [m for m in METHODS if any(method == m for _, method in by)]  # the grids hold only these rows
    timed = [m for m in FAST_METHODS if m in shown]
    dates = {s["task"]: s.get("date", result["date"]) for s in result["task_settings"]}
    lines = [SECTION_START, "", "# Restoring observations (CPU)", "",
             f"Command: `{command}`  ", f"Machine: {result['machine']}  ", f"Date: {result['date']}  ",
             f"Images: the first {result['n_images']} Fashion-MNIST test images per task (mri-r4*: brain-MRI test "
             "slices of the held-out subject; mri-r4-estimated: each slice through smooth random coils of its own, "
             "restored with ESPIRiT's estimates of them), never used in training, "
             f"corrupted with seed {OBSERVATION_SEED}; {', '.join(LABELS[m] for m in SLOW_METHODS)} on the first "
             f"{result['slow_images']} of them; models from `{result['models']}`.", "",
             "PSNR / SSIM on the [0, 1] scale against the clean images (mri-r4: magnitudes, peak = the clean "
             "image's maximum; higher is better); seconds per image on "
             f"{result['threads']} torch thread(s), batches of {result['batch_size']} observations.", "",
             "PSNR / SSIM per method (* marks what `rsd restore` runs by default for the task's operator, the rows "
             "with `default: true` in the JSON; n/a: the method does not apply), then seconds per image in the same "
             "order, then the DPS's time over each learnt method's. The net on observations is fitted on the "
             "training observations' own held-out measurements (operators with a further mask: inpainting, MRI), "
             "the net on generator on the generator's samples. Projection: the learnt methods' data-consistency "
             "step alone, from a zero image; classical + projection: the same step from the classical estimate "
             "(noiseless operators).", "",
             "| task | " + " | ".join(LABELS[m] for m in shown) + " | s/image | DPS time / "
             + " / ".join(LABELS[m] for m in timed) + " time | default's fit s | date |",
             "|---" * (len(shown) + 5) + "|"]
    for task in result["tasks"]:
        cells, speeds = [], []
        for method in shown:
            r = by.get((task, method))
            mark = "*" if r and r.get("default") else ""
            cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f}{mark}" if r else "n/a")
            speeds.append(f"{r['seconds_per_image']:.3g}" if r else "n/a")
        dps = by.get((task, "dps"))
        ratios = [f"{dps['seconds_per_image'] / r['seconds_per_image']:.3g}x" if dps and r else "n/a"
                  for r in (by.get((task, m)) for m in timed)]
        fit = next((r.get("fit_seconds") for r in result["rows"] if r["task"] == task and r.get("default")), None)
        fit_cell = f"{fit:.0f}" if fit is not None else "n/a"
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {' / '.join(speeds)} | " + " / ".join(ratios)
                     + f" | {fit_cell} | {dates.get(task, result['date'])} |")
    lines += ["", "Difference to the task's best baseline (the best mean PSNR of "
              + ", ".join(LABELS[m] for m in BASELINES) + "), PSNR dB then SSIM, with the paired bootstrap 95% "
              "interval over the images both ran on (rows published before the intervals existed show -):", "",
              "| task | best baseline | " + " | ".join(LABELS[m] for m in shown) + " |",
              "|---" * (len(shown) + 2) + "|"]
    for task in result["tasks"]:
        best = next((r["vs"] for r in result["rows"] if r["task"] == task and "vs" in r), "-")
        lines.append(f"| {task} | {LABELS.get(best, best)} | "
                     + " | ".join(f"{_interval(by.get((task, m)))}; {_interval(by.get((task, m)), 'ssim')}"
                                  for m in shown) + " |")
    dps = [f"{s['task']} zeta' {s['dps_config']['zeta']:g}, x0 at sigma {s['dps_sigma_stop']:g} "
           f"({s.get('dps_tuned_on') or 'untuned'})" for s in result["task_settings"] if "dps_config" in s]
    long = [f"{s['task']} zeta' {s['dps_1000_config']['zeta']:g}, x0 at sigma {s['dps_1000_sigma_stop']:g} "
            f"({s['dps_1000_tuned_on']})" for s in result["task_settings"] if "dps_1000_config" in s]
    lines += ["", f"DPS per task (ancestral schedule, {DPS_STEPS} levels; chosen on validation images, never on "
              "these): " + "; ".join(dps) + "."]
    if long:
        lines += ["", f"DPS at {DPS_LONG_STEPS} levels, one sample, where a validation run chose its settings: "
                  + "; ".join(long) + "; the other tasks have no such row."]
    if result["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{t} ({why})" for t, why in result["skipped"].items()) + "."]
    lines += ["", "Grids (rows: observation, " + ", ".join(LABELS[m] for m in shown) + " (those that apply), "
              "the default's per-pixel spread scaled to its maximum, clean):", ""]
    lines += [f"- {t['task']}: ![{t['task']}](../{t['grid']})" for t in result["task_settings"]]
    lines += ["", SECTION_END]
    text = DOC.read_text() if DOC.exists() else ""
    if SECTION_START in text and SECTION_END in text:
        before, _, rest = text.partition(SECTION_START)
        text = before + "\n".join(lines) + rest.partition(SECTION_END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(ROOT / "outputs" / "restore-models"),
                        help="folder with <task>/teacher and <task>/generator model folders")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--n-images", type=int, default=256, help="held-out test images per task (default: 256)")
    parser.add_argument("--slow-images", type=int, default=32,
                        help=f"{' and '.join(SLOW_METHODS)}: the first N of those images (default: 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="observations per batch (default: 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"latent: Adam steps (default: {LATENT_OPTIMISATION.steps})")
    parser.add_argument("--restarts", type=int, default=None,
                        help=f"latent-encoder, latent: restarts (default: {LATENT_RESTARTS})")
    parser.add_argument("--encoder-steps", type=int, default=RestoreConfig().steps,
                        help=f"latent-encoder, latent-encoder-1: refinement steps after the encoder "
                        f"(default: {RestoreConfig().steps})")
    parser.add_argument("--encoder-fit-steps", type=int, default=None,
                        help="posterior-net-*, latent-encoder*: the network's fit steps "
                        f"(default: EncoderConfig's, {EncoderConfig().steps})")
    parser.add_argument("--encoder-width", type=int, default=None,
                        help="posterior-net-*, latent-encoder*: channels of the "
                        f"encoder's first level (default: EncoderConfig's, {EncoderConfig().width})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, also for timing (default: 1)")
    parser.add_argument("--train", action="store_true",
                        help="train missing Fashion-MNIST models into --models (benchmarks/restoration.py's stages)")
    parser.add_argument("--budget", type=float, default=3.0, help="with --train: teacher minutes (default: 3)")
    parser.add_argument("--distill-budget", type=float, default=6.0,
                        help="with --train: distillation minutes (default: 6)")
    parser.add_argument("--mri-budget", type=float, default=8.0,
                        help="with --train: mri-r4 teacher minutes (cpu-mri preset settings; default: 8)")
    parser.add_argument("--mri-distill-budget", type=float, default=12.0,
                        help="with --train: mri-r4 distillation minutes (default: 12)")
    parser.add_argument("--limit", type=int, default=20_000, help="with --train: corrupted training images")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "restore"), help="work folder (resumable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="leave docs/ and benchmarks/results alone; results go to OUT/restore.json only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in TASKS] + [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown task(s) or method(s) {unknown}; tasks {list(TASKS)}, methods {list(METHODS)}")
    models, out = Path(args.models), Path(args.out)

    rows, settings, skipped = [], [], {}
    for task in names:
        if args.train and task in TRAINING_TASKS:
            train_models(TRAINING_TASKS[task], models / task, budget=args.budget, distill_budget=args.distill_budget,
                         limit=args.limit, n_eval=0, seed=0, progress=not args.quiet, teacher_train=RESTORE_TEACHER)
        elif args.train and task in MRI_TASKS:
            train_mri_models(4.0, models / task, budget=args.mri_budget, distill_budget=args.mri_distill_budget,
                             limit=args.limit, progress=not args.quiet, maps=MRI_TASKS[task])
        if not all((models / task / m / "model.json").exists() for m in ("teacher", "generator")):
            skipped[task] = f"no trained teacher and generator under {models / task}"
            print(f"== {task}: skipped ({skipped[task]})", flush=True)
            continue
        print(f"== {task}", flush=True)
        task_rows, task_settings = run_task(task, models, out, args)
        rows += task_rows
        settings.append(task_settings)

    result = {
        "rows": rows,
        "tasks": [s["task"] for s in settings],
        "skipped": skipped,
        "task_settings": settings,
        "n_images": args.n_images,
        "slow_images": args.slow_images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "models": str(models),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "restore.json").write_text(json.dumps(result, indent=1))
    if not args.publish:
        print(json.dumps(result))
        return result
    result = with_published_tasks(result)
    write_doc(result, "python -m benchmarks.restore " + " ".join(argv if argv is not None else sys.argv[1:]))
    return emit("restore", result)


if __name__ == "__main__":
    main()
