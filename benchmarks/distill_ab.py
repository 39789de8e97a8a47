"""Distillation A/B: this project's two deviations from the RSD reference loops, at equal budget.

    python -m benchmarks.distill_ab [--models DIR] [--tasks inpaint-0.6,inpaint-0.8] [--steps 40] [--seeds 0,1]

For every task (random inpainting: the only operator where the two settings act), the task's teacher
(``DIR/<task>/teacher``, the layout of benchmarks/restoration.py and benchmarks/restore.py) is distilled
``--steps`` steps from scratch once per variant and seed, with the same batch and learning rates:
- ``observed``: the fake-score loss masked by A (the teacher's objective), the generator loss normaliser over
  visible pixels (this project's choices before the A/B);
- ``further``: ``DistillConfig.fake_loss_mask="further"`` (the reference's A~-masked train_loss; the default
  for random inpainting since this A/B);
- ``observed-all``: ``DistillConfig.generator_loss_mean="all"`` (the reference sid_loss.py's mean);
- ``reference``: both of the reference's choices.
Each EMA generator is scored by its FD to the first ``--n-eval`` clean Fashion-MNIST *test* images with the
clean-trained classifier's features: an evaluation of a design choice, which needs clean images (model
selection never does). The ``observed`` generator is also scored with a second sample seed, so the table shows
how much FD moves with the samples alone; ``summary`` has each variant's mean FD over the seeds and its ratio to
``observed``'s. Runs resume (Trainer checkpoints; finished runs are kept in ``OUT/<task>/<variant>/seed-<s>``).
Writes OUT/distill_ab.json and, unless ``--no-publish``, benchmarks/results/distill_ab.json; the result is also
the last stdout line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.restoration import write_result
from rsd_core.config import DistillConfig, DistillTrainConfig
from rsd_core.data.sources import fashion_mnist
from rsd_core.presets import CPU_DISTILL_EMA_HALFLIFE_NIMG, CPU_DISTILL_EMA_RAMPUP_RATIO
from rsd_core.restore.estimate import load_generator
from rsd_core.select.classifier import ClassifierExtractor
from rsd_core.select.frechet import compute_stats, frechet_distance
from rsd_core.select.selection import feature_images, quantise
from rsd_core.stages import distill_stage

VARIANTS = {  # explicit settings: the comparison must not move when a default does
    "observed": {"fake_loss_mask": "observed", "generator_loss_mean": "visible"},
    "further": {"fake_loss_mask": "further", "generator_loss_mean": "visible"},
    "observed-all": {"fake_loss_mask": "observed", "generator_loss_mean": "all"},
    "reference": {"fake_loss_mask": "further", "generator_loss_mean": "all"},
}
BASELINE = "observed"
EXTRACTOR = "classifier (clean Fashion-MNIST, evaluation only)"


def distil_variant(teacher_dir: Path, out: Path, variant: str, steps: int, seed: int, progress: bool) -> dict:
    """Distil (or resume) one variant; returns its wall time and steps."""
    timing = out / "timing.json"
    if (out / "generator" / "model.json").exists() and timing.exists():
        return json.loads(timing.read_text())
    train = DistillTrainConfig(steps=steps, batch_size=32, ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                        ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO, lr_rampup_steps=0,
                        checkpoint_every=max(1, steps // 4), keep_checkpoints=1, seed=seed)
    dcfg = DistillConfig(lr_fake=5e-5, lr_generator=5e-5, **VARIANTS[variant])
    start = time.perf_counter()
    _, result, _ = distill_stage(teacher_dir, train, dcfg, out, progress=progress)
    info = {"seconds": time.perf_counter() - start, "steps": result.steps, "distill": dcfg.model_dump()}
    timing.write_text(json.dumps(info))
    return info


def true_fd(generator_dir: Path, clean_stats, n: int, seed: int) -> float:
    generator = load_generator(generator_dir)
    samples = generator.sample(n, seed=seed)
    return frechet_distance(compute_stats(ClassifierExtractor(), quantise(feature_images(samples))), clean_stats)


def summarise(rows: list[dict]) -> list[dict]:
    """Per task and variant: the mean FD over seeds and its ratio to the ``observed`` variant's mean."""
    means: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        means.setdefault((r["task"], r["variant"]), []).append(r["true_fd"])
    out = []
    for (task, variant), fds in means.items():
        base = means.get((task, BASELINE))
        mean = sum(fds) / len(fds)
        out.append({"task": task, "variant": variant, "seeds": len(fds), "mean_true_fd": mean,
                    "over_observed": mean / (sum(base) / len(base)) if base else None})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("outputs/restore-models"),
                        help="folder with <task>/teacher (default: outputs/restore-models)")
    parser.add_argument("--tasks", default="inpaint-0.6,inpaint-0.8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps per variant (equal budget)")
    parser.add_argument("--n-eval", type=int, default=2000, help="generated and clean images per FD")
    parser.add_argument("--seeds", default="0", help="distillation seeds, comma-separated (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/distill-ab"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="write OUT/distill_ab.json only, not benchmarks/results/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    clean = fashion_mnist("test").load(0, args.n_eval)[0]
    clean_stats = compute_stats(ClassifierExtractor(), quantise(feature_images(clean)))
    rows = []
    for task in args.tasks.split(","):
        teacher_dir = args.models / task / "teacher"
        if not (teacher_dir / "model.json").exists():
            sys.exit(f"{teacher_dir}: no teacher (train it with `python -m benchmarks.restore --train`)")
        for seed in seeds:
            for variant in variants:
                out = args.out / task / variant / f"seed-{seed}"
                info = distil_variant(teacher_dir, out, variant, args.steps, seed, not args.quiet)
                fds = [true_fd(out / "generator", clean_stats, args.n_eval, s)
                       for s in ((seed, seed + 1000) if variant == BASELINE else (seed,))]
                rows.append({"task": task, "variant": variant, "seed": seed, "true_fd": fds[0],
                             "true_fd_other_samples": fds[1:], "steps": info["steps"], "seconds": info["seconds"],
                             **{k: info["distill"][k] for k in ("fake_loss_mask", "generator_loss_mean")}})
                print(f"{task:12} {variant:13} seed {seed}  FD {fds[0]:7.2f}  ({info['steps']} steps, "
                      f"{info['seconds']:.0f} s)", flush=True)
    result = {"rows": rows, "summary": summarise(rows), "extractor": EXTRACTOR, "n_eval": args.n_eval,
              "steps": args.steps, "seeds": seeds,
              "models": str(args.models), "machine": f"{platform.machine()}, Python {platform.python_version()}",
              "date": datetime.date.today().isoformat()}
    return write_result(args, "distill_ab", result)


if __name__ == "__main__":
    main()
