"""The long run: how quality grows with compute, for a teacher, its one-step student and the clean reference.

    python -m benchmarks.long_run --task inpaint-0.8 [--variant corrupted|clean] [--teacher-minutes 10,30,60]
                                  [--distill-minutes 10,30,60] [--out DIR] [--threads 1]

One *variant* per process: ``corrupted`` trains the task's corruption-aware teacher on its corrupted data and
distils the one-step student from the last teacher point; ``clean`` trains the same network with the same
budgets and schedules on the clean images (identity operator, no noise: for MRI the fully sampled slices), the
reference a corrupted-data method aims at. Run the two variants as two one-core processes into one ``--out``.

Training is cut into segments that end at the given minutes of cumulative training wall time (checkpoints
record it, so a killed run resumes from its last checkpoint with the time it had spent). At each point the
EMA model is kept and scored on ``--n-eval`` samples against the clean evaluation images:
- the teacher by its full 35-NFE Heun sampler and by the truncation level that Proximal FD chose (features
  learnt from the variant's own observations; no clean data), ``teacher_fd`` being the better of the two as in
  the restoration benchmark;
- the student (EMA generator, one network evaluation);
- every score as FD and as KID (unbiased, mean and std over subsets of half the samples): FD with a few hundred
  samples is mostly bias, KID is not.
The floor is the FD / KID between the clean evaluation images and a disjoint set of clean images.

Writes OUT/<task>/<variant>/points.json as each point is scored, then OUT/long_run.json, and unless
``--no-publish`` benchmarks/results/long_run.json, docs/figures/long_run_<task>.png (FD and KID against minutes)
and one sample grid per point in docs/figures/long_run/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.scoring import Scorer, floor_distances, score_student, score_teacher
from rsd_core.config import DistillConfig, NetworkConfig, OperatorSpec, TrainConfig
from rsd_core.operators import IdentitySpec, InpaintSpec
from rsd_core.presets import (
    CPU_DISTILL_EMA_HALFLIFE_NIMG,
    CPU_DISTILL_EMA_RAMPUP_RATIO,
    CPU_MRI_DISTILL,
    CPU_MRI_DISTILL_TRAIN,
    CPU_MRI_NETWORK,
    CPU_MRI_TEACHER,
    cpu_mri_operator,
)
from rsd_core.sources import corrupt
from rsd_core.stages import (
    DISTILL_DIR,
    PRETRAIN_DIR,
    distill_stage,
    pretrain_stage,
    read_card,
)
from rsd_core.training import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("corrupted", "clean")


@dataclass(frozen=True)
class Task:
    """A long-run task: its data, the corruption, and the training settings both variants share."""

    source: str
    operator: OperatorSpec
    network: NetworkConfig
    teacher: TrainConfig
    distill_train: TrainConfig
    distill: DistillConfig
    n_eval: int
    floor_split: str  # the clean images set beside the evaluation images for the floor
    corrupt_kwargs: dict = field(default_factory=dict)


# The restoration benchmark's settings (inpainting) and the cpu-mri preset's (MRI), with two changes a run cut
# into segments needs: no time-based lr drop (it is measured per segment, so it would fire in the first one),
# and frequent checkpoints (a kill loses at most one interval).
_FMNIST_TEACHER = TrainConfig(steps=10_000_000, batch_size=64, lr=7e-4, lr_rampup_steps=200, grad_clip=1.0,
                              ema_halflife_nimg=10_000, checkpoint_every=100, keep_checkpoints=1)
_FMNIST_DISTILL_TRAIN = TrainConfig(steps=10_000_000, batch_size=32, ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                                    ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO, lr_rampup_steps=0,
                                    checkpoint_every=50, keep_checkpoints=1)
TASKS = {
    "inpaint-0.8": Task(source="fashion-mnist", operator=InpaintSpec(p=0.8, delta=0.1), network=NetworkConfig(),
                        teacher=_FMNIST_TEACHER, distill_train=_FMNIST_DISTILL_TRAIN,
                        distill=DistillConfig(lr_fake=5e-5, lr_generator=5e-5), n_eval=1000, floor_split="test"),
    "mri-r4": Task(source="brain-mri", operator=cpu_mri_operator(4.0), network=CPU_MRI_NETWORK,
                   teacher=CPU_MRI_TEACHER.updated(steps=10_000_000, checkpoint_every=100, keep_checkpoints=1,
                                                   time_budget_s=None),
                   distill_train=CPU_MRI_DISTILL_TRAIN.updated(steps=10_000_000, checkpoint_every=50,
                                                               keep_checkpoints=1, lr_drop_at=None,
                                                               time_budget_s=None),
                   distill=CPU_MRI_DISTILL, n_eval=419, floor_split="train",
                   corrupt_kwargs={"image_size": 32, "clean_eval_split": "test"}),
}


class WallClock:
    """Cumulative training seconds of one phase, recorded at every checkpoint in ``<dir>/clock.json``.

    A resumed run starts from the seconds recorded for the checkpoint it resumes from, so the time between
    that checkpoint and a kill (whose steps are lost too) is not counted."""

    def __init__(self, phase_dir: Path):
        self.file = phase_dir / "clock.json"
        self.checkpoints = phase_dir / "checkpoints"
        self.record: dict[str, float] = json.loads(self.file.read_text()) if self.file.exists() else {}

    def seconds(self) -> float:
        """Seconds trained up to the latest checkpoint on disk (0 when there is none)."""
        last = list_checkpoints(self.checkpoints)[-1:]
        if not last:
            return 0.0
        return self.record.get(str(int(last[0].name.split("-")[1])), max(self.record.values(), default=0.0))

    def start(self) -> None:
        self.base, self.t0 = self.seconds(), time.perf_counter()

    def __call__(self, checkpoint_dir: Path) -> None:
        step = int(list_checkpoints(checkpoint_dir)[-1].name.split("-")[1])
        self.record[str(step)] = self.base + time.perf_counter() - self.t0
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.record, indent=1))


def train_to(minutes: float, phase_dir: Path, model_dir: Path, run) -> float:
    """Resume a phase until ``minutes`` of cumulative training time; returns the seconds it has trained.

    A phase killed after its last checkpoint but before it wrote its model folder gets one more step, so
    the folder is always the model of the latest checkpoint."""
    clock = WallClock(phase_dir)
    remaining = minutes * 60 - clock.seconds()
    last = list_checkpoints(phase_dir / "checkpoints")[-1:]
    current = (model_dir / "model.json").exists() and last and read_card(model_dir).steps == int(
        last[0].name.split("-")[1])
    if remaining > 0 or not current:
        clock.start()
        run(max(remaining, 1e-3), clock)
    return WallClock(phase_dir).seconds()


def run_variant(name: str, task: Task, variant: str, args, root: Path) -> None:
    """Corrupt (or copy clean), then train, keep and score every point of the variant's schedule in ``root``."""
    data = root / "data"
    if not (data / "manifest.json").exists():
        spec = task.operator if variant == "corrupted" else IdentitySpec()
        print(f"[long_run] {name}/{variant}: writing the dataset ({spec.kind})", flush=True)
        corrupt(task.source, spec, seed=args.seed, out_uri=str(data), limit=args.limit, clean_eval_count=task.n_eval,
                **task.corrupt_kwargs)
    points_file = root / "points.json"
    points = json.loads(points_file.read_text()) if points_file.exists() else {}
    scorer: Scorer | None = None

    def scored(key: str, folder: Path, score) -> None:
        nonlocal scorer
        if key in points:
            return
        scorer = scorer or Scorer(str(data), task.n_eval, args.seed, root)
        t = time.perf_counter()
        points[key] = {**score(folder, scorer, root / "grids" / f"{key}.png"), "eval_s": time.perf_counter() - t}
        points_file.write_text(json.dumps(points, indent=1))
        print(f"[long_run] {name}/{variant} {key}: FD {points[key]['fd']:.1f}, KID {points[key]['kid']:.4f} "
              f"+- {points[key]['kid_std']:.4f}", flush=True)
        assemble(args)

    progress = not args.quiet
    seed = {"seed": args.seed}
    for minutes in args.teacher_minutes:
        point = root / "points" / f"teacher-{minutes:g}min"
        if not (point / "model.json").exists():
            def run(remaining, clock):
                pretrain_stage(str(data), task.network, task.teacher.updated(time_budget_s=remaining, **seed), root,
                               progress=progress, on_checkpoint=clock)
            trained = train_to(minutes, root / PRETRAIN_DIR, root / "teacher", run)
            shutil.copytree(root / "teacher", point, dirs_exist_ok=True)
            (point / "trained_s.json").write_text(json.dumps({"seconds": trained}))
        scored(f"teacher@{minutes:g}", point, score_teacher)
    if not args.distill_minutes:
        return
    teacher = root / "points" / f"teacher-{max(args.teacher_minutes):g}min"
    for minutes in args.distill_minutes:
        point = root / "points" / f"student-{minutes:g}min"
        if not (point / "model.json").exists():
            def run(remaining, clock):
                distill_stage(teacher, task.distill_train.updated(time_budget_s=remaining, **seed), task.distill,
                              root, progress=progress, on_checkpoint=clock)
            trained = train_to(minutes, root / DISTILL_DIR, root / "generator", run)
            shutil.copytree(root / "generator", point, dirs_exist_ok=True)
            (point / "trained_s.json").write_text(json.dumps({"seconds": trained}))
        scored(f"student@{minutes:g}", point, score_student)


def floor(name: str, task: Task, args, root: Path) -> dict:
    """The task's floor (cached in ``root``): Fashion-MNIST's test split against the evaluation images, the
    first training images; for MRI the training subject's slices against the held-out subject's."""
    file = root / "floor.json"
    if file.exists():
        return json.loads(file.read_text())
    data = next(root / v / "data" for v in VARIANTS if (root / v / "data" / "manifest.json").exists())
    result = floor_distances(str(data), task.source, task.floor_split, args.seed, data.parent,
                             task.corrupt_kwargs.get("image_size"))
    file.write_text(json.dumps(result, indent=1))
    return result


def assemble(args) -> dict:
    """Rows per task from every variant's points under OUT; the JSON, plot and grids (unless --no-publish)."""
    out = Path(args.out)
    tasks = {}
    for name, task in TASKS.items():
        root = out / name
        points = {v: json.loads((root / v / "points.json").read_text()) for v in VARIANTS
                  if (root / v / "points.json").exists()}
        if not points:
            continue
        minutes = sorted({float(k.split("@")[1]) for p in points.values() for k in p})
        rows = []
        for m in minutes:
            row = {"minutes": m}
            for prefix, variant, key in (("teacher", "corrupted", "teacher"), ("student", "corrupted", "student"),
                                         ("clean", "clean", "teacher"), ("clean_student", "clean", "student")):
                p = points.get(variant, {}).get(f"{key}@{m:g}")
                if p is None:
                    continue
                row |= {f"{prefix}_fd": p["fd"], f"{prefix}_kid": p["kid"], f"{prefix}_kid_std": p["kid_std"],
                        f"{prefix}_steps": p["steps"]}
                if "sampler" in p:
                    row[f"{prefix}_sampler"] = p["sampler"]
            if "teacher_fd" in row and "student_fd" in row:
                row["student_over_teacher"] = row["student_fd"] / row["teacher_fd"]
            if "clean_fd" in row and "student_fd" in row:
                row["student_over_clean"] = row["student_fd"] / row["clean_fd"]
            rows.append(row)
        task_floor = floor(name, task, args, root)
        tasks[name] = {"operator": task.operator.model_dump(mode="json"), "n_eval": task_floor["n"],
                       "floor_fd": task_floor["fd"], "floor_kid": task_floor["kid"],
                       "floor_kid_std": task_floor["kid_std"], "floor_against": task_floor["against"],
                       "extractor": task_floor["extractor"], "rows": rows, "points": points}
        if args.publish:
            plot(name, tasks[name], FIGURES / f"long_run_{name}.png")
            for variant in points:
                for grid in (root / variant / "grids").glob("*.png"):
                    dest = FIGURES / "long_run" / f"{name}_{variant}_{grid.stem.replace('@', '-')}min.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(grid, dest)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "command": "python -m benchmarks.long_run " + " ".join(sys.argv[1:]),
        "minutes": "cumulative training wall time of the phase: teacher_* and clean_* after that many minutes of "
        "teacher training; student_* after that many minutes of distillation from the last teacher point",
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "long_run.json", result)
    if args.publish:
        write_atomic(RESULTS / "long_run.json", result)
    return result


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def plot(name: str, task: dict, path: Path) -> None:
    """FD and KID (with its std) against minutes, the floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("teacher", "teacher (best sampler)"), ("student", "one-step student"),
                          ("clean", "clean-data teacher"), ("clean_student", "clean-data student")):
        rows = [r for r in task["rows"] if f"{prefix}_fd" in r]
        if not rows:
            continue
        x = [r["minutes"] for r in rows]
        axes[0].plot(x, [r[f"{prefix}_fd"] for r in rows], "o-", label=label)
        axes[1].errorbar(x, [r[f"{prefix}_kid"] for r in rows], yerr=[r[f"{prefix}_kid_std"] for r in rows],
                         fmt="o-", capsize=3, label=label)
    for ax, key, what in ((axes[0], "floor_fd", "FD"), (axes[1], "floor_kid", "KID")):
        ax.axhline(task[key], color="grey", linestyle="--", label="floor (clean vs clean)")
        ax.set_xlabel("minutes of training (teacher) / distillation (student), one core")
        ax.set_ylabel(what)
        ax.set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"long run, {name}: {task['extractor'][:60]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def minutes_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(v <= 0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"expected increasing positive minutes, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), help="the task to train and score (required unless "
                        "--assemble-only)")
    parser.add_argument("--assemble-only", action="store_true",
                        help="train nothing: rebuild long_run.json, the plots and grids from the points under OUT")
    parser.add_argument("--variant", choices=VARIANTS, default="corrupted",
                        help="corrupted: the task's teacher and student; clean: the same network and schedule on "
                        "the clean images (the reference)")
    parser.add_argument("--teacher-minutes", type=minutes_list, default=[10.0, 30.0, 60.0],
                        help="points of the teacher's training time (default: 10,30,60)")
    parser.add_argument("--distill-minutes", type=minutes_list, default=[10.0, 30.0, 60.0],
                        help="points of the distillation's time, from the last teacher point; empty for none "
                        "(default: 10,30,60)")
    parser.add_argument("--limit", type=int, default=20_000,
                        help="training images (default: 20000, the restoration benchmark's; MRI has 1,345 slices)")
    parser.add_argument("--n-eval", type=int, default=None,
                        help="samples per score (default: the task's; 1000 for inpainting, 419 test slices for MRI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "long_run"), help="work folder (resumable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (a line per point)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="write OUT/long_run.json only (not benchmarks/results, docs/figures)")
    args = parser.parse_args(argv)
    if args.assemble_only:
        return assemble(args)
    if args.task is None:
        parser.error("--task is required (or --assemble-only)")
    if not args.teacher_minutes:
        parser.error("--teacher-minutes needs at least one point")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    if args.n_eval is not None:
        task = dataclasses.replace(task, n_eval=args.n_eval)
    root = Path(args.out) / args.task
    run_variant(args.task, task, args.variant, args, root / args.variant)
    result = assemble(args)
    print(json.dumps(result["tasks"][args.task]["rows"]))
    return result


if __name__ == "__main__":
    main()
