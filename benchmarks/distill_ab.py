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
- ``reference``: both of the reference's choices;
- ``default``: ``DistillConfig``'s defaults; any other variant is a change of them, as
  ``name:distill.FIELD=VALUE;train.FIELD=VALUE`` (``DistillConfig`` and ``DistillTrainConfig`` fields, e.g.
  ``lr1e-4:distill.lr_generator=1e-4``).
``--minutes`` gives every variant the same wall time instead of the same steps (an A/B of quality per CPU-minute).
Each EMA generator is scored by its FD to the first ``--n-eval`` clean Fashion-MNIST *test* images with the
clean-trained classifier's features: an evaluation of a design choice, which needs clean images (model
selection never does). The first variant (the base) is also scored with a second sample seed, so the table shows
how much FD moves with the samples alone; ``summary`` has each variant's mean FD over the seeds and its ratio to
the base's. Runs resume (Trainer checkpoints; finished runs are kept in ``OUT/<task>/<variant>/seed-<s>``).
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
from benchmarks.variants import Changes, parse_variants
from rsd_core.config import DistillConfig, DistillTrainConfig
from rsd_core.data.sources import fashion_mnist
from rsd_core.presets import CPU_DISTILL_EMA_HALFLIFE_NIMG, CPU_DISTILL_EMA_RAMPUP_RATIO
from rsd_core.restore.estimate import load_generator
from rsd_core.select.classifier import ClassifierExtractor
from rsd_core.select.frechet import compute_stats, frechet_distance
from rsd_core.select.selection import feature_images, quantise
from rsd_core.stages import distill_stage

VARIANTS: dict[str, Changes] = {  # explicit settings: the comparison must not move when a default does
    "observed": {"distill": {"fake_loss_mask": "observed", "generator_loss_mean": "visible"}},
    "further": {"distill": {"fake_loss_mask": "further", "generator_loss_mean": "visible"}},
    "observed-all": {"distill": {"fake_loss_mask": "observed", "generator_loss_mean": "all"}},
    "reference": {"distill": {"fake_loss_mask": "further", "generator_loss_mean": "all"}},
    "default": {},  # DistillConfig's defaults
}
SECTIONS = ("distill", "train")
EXTRACTOR = "classifier (clean Fashion-MNIST, evaluation only)"


def distil_variant(teacher_dir: Path, out: Path, changes: Changes, steps: int, minutes: float | None, seed: int,
                   progress: bool) -> dict:
    """Distil (or resume) one variant: the CPU settings (lr 5e-5, batch 32, the CPU EMA) and DistillConfig's
    defaults with ``changes``, for ``steps`` steps or, given, ``minutes`` of wall time; returns its wall time,
    steps and settings."""
    timing = out / "timing.json"
    if (out / "generator" / "model.json").exists() and timing.exists():
        return json.loads(timing.read_text())
    budget = {} if minutes is None else {"steps": 10_000_000, "time_budget_s": minutes * 60}
    every = max(1, steps // 4) if minutes is None else 50
    try:
        train = DistillTrainConfig(steps=steps, batch_size=32, ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                                   ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO, lr_rampup_steps=0,
                                   checkpoint_every=every, keep_checkpoints=1, seed=seed,
                                   ).updated(**budget, **changes.get("train", {}))
        dcfg = DistillConfig(**{"lr_fake": 5e-5, "lr_generator": 5e-5, **changes.get("distill", {})})
    except ValueError as err:
        raise SystemExit(f"{out}: {err}") from None
    start = time.perf_counter()
    _, result, _ = distill_stage(teacher_dir, train, dcfg, out, progress=progress)
    info = {"seconds": time.perf_counter() - start, "steps": result.steps, "distill": dcfg.model_dump(mode="json")}
    timing.write_text(json.dumps(info))
    return info


def true_fd(generator_dir: Path, clean_stats, n: int, seed: int) -> float:
    generator = load_generator(generator_dir)
    samples = generator.sample(n, seed=seed)
    return frechet_distance(compute_stats(ClassifierExtractor(), quantise(feature_images(samples))), clean_stats)


def summarise(rows: list[dict]) -> list[dict]:
    """Per task and variant: the mean FD over seeds and its ratio to the base's (the first variant's) mean."""
    means: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        means.setdefault((r["task"], r["variant"]), []).append(r["true_fd"])
    base_name = rows[0]["variant"] if rows else None
    out = []
    for (task, variant), fds in means.items():
        base = means.get((task, base_name))
        mean = sum(fds) / len(fds)
        out.append({"task": task, "variant": variant, "seeds": len(fds), "mean_true_fd": mean,
                    "over_base": mean / (sum(base) / len(base)) if base else None})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("outputs/restore-models"),
                        help="folder with <task>/teacher (default: outputs/restore-models)")
    parser.add_argument("--tasks", default="inpaint-0.6,inpaint-0.8")
    parser.add_argument("--variants", type=lambda text: parse_variants(text, VARIANTS, SECTIONS),
                        default="observed,further,observed-all,reference",
                        help=f"comma-separated; the first is the base. Named: {', '.join(VARIANTS)}; or "
                        "name:distill.FIELD=VALUE;train.FIELD=VALUE (changes of the defaults)")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps per variant (equal budget)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall time per variant instead of --steps (equal time)")
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
    seeds = [int(s) for s in args.seeds.split(",")]
    clean = fashion_mnist("test").load(0, args.n_eval)[0]
    clean_stats = compute_stats(ClassifierExtractor(), quantise(feature_images(clean)))
    rows = []
    for task in args.tasks.split(","):
        teacher_dir = args.models / task / "teacher"
        if not (teacher_dir / "model.json").exists():
            sys.exit(f"{teacher_dir}: no teacher (train it with `python -m benchmarks.restore --train`)")
        for seed in seeds:
            for i, (variant, changes) in enumerate(args.variants):
                out = args.out / task / variant / f"seed-{seed}"
                info = distil_variant(teacher_dir, out, changes, args.steps, args.minutes, seed, not args.quiet)
                fds = [true_fd(out / "generator", clean_stats, args.n_eval, s)
                       for s in ((seed, seed + 1000) if i == 0 else (seed,))]
                rows.append({"task": task, "variant": variant, "changes": changes, "seed": seed, "true_fd": fds[0],
                             "true_fd_other_samples": fds[1:], "steps": info["steps"], "seconds": info["seconds"],
                             **{k: info["distill"][k] for k in ("fake_loss_mask", "generator_loss_mean")}})
                print(f"{task:12} {variant:13} seed {seed}  FD {fds[0]:7.2f}  ({info['steps']} steps, "
                      f"{info['seconds']:.0f} s)", flush=True)
    result = {"rows": rows, "summary": summarise(rows), "extractor": EXTRACTOR, "n_eval": args.n_eval,
              "steps": args.steps, "minutes": args.minutes, "seeds": seeds,
              "models": str(args.models), "machine": f"{platform.machine()}, Python {platform.python_version()}",
              "date": datetime.date.today().isoformat()}
    return write_result(args, "distill_ab", result)


if __name__ == "__main__":
    main()
