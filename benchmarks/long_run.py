"""The long run: how quality grows with compute, for a teacher, its one-step student and the clean reference.

    python -m benchmarks.long_run --task inpaint-0.8 [--variant corrupted|clean] [--teacher-minutes 10,30,60]
                                  [--distill-minutes 10,30,60] [--out DIR] [--threads 1] [--profile cpu|gpu]
                                  [--distill-variant NAME:distill.FIELD=VALUE;...]

``--profile gpu`` is the same run with a GPU's batch sizes and EMA lengths (``scripts/gpu_long_run.sh`` runs it
on one GPU, training only: ``--no-score``; ``--pack`` / ``--unpack`` carry the points back, where the FD
extractors are, to be scored by the same command).

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

``--distill-variant NAME:distill.FIELD=VALUE;train.FIELD=VALUE`` distils from the same last teacher point with
changed distillation settings into OUT/<task>/<variant>/distill-variants/NAME: an A/B arm at equal minutes of
distillation, whose rows (``distill_variants``) sit beside the task's own student in the JSON and the table.

Writes OUT/<task>/<variant>/points.json as each point is scored, then OUT/long_run.json, and unless
``--no-publish`` benchmarks/results/long_run.json, docs/figures/long_run_<task>.png (FD and KID against minutes)
and one sample grid per point in docs/figures/long_run/ (``long_run_gpu`` in each name for the GPU profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import io
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from benchmarks.mri import benchmark_operator
from benchmarks.report import add_work_args, replace_block
from benchmarks.restoration import DISTILL, DISTILL_TRAIN, TEACHER_TRAIN
from benchmarks.scoring import Scorer, floor_distances, score_student, score_teacher
from benchmarks.variants import Changes, parse_variant
from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, OperatorSpec, TrainConfig
from rsd_core.data.sources import corrupt
from rsd_core.operators import IdentitySpec, InpaintSpec
from rsd_core.presets import (
    CPU_MRI_DISTILL,
    CPU_MRI_DISTILL_TRAIN,
    CPU_MRI_NETWORK,
    CPU_MRI_TEACHER,
    cpu_mri_operator,
)
from rsd_core.stages import (
    DISTILL_DIR,
    PRETRAIN_DIR,
    distill_stage,
    pretrain_stage,
    read_card,
)
from rsd_core.train.loop import list_checkpoints, resolve_device

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
DOC = ROOT / "docs" / "results.md"
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("corrupted", "clean")
ARMS_DIR = "distill-variants"  # <variant>/distill-variants/<name>: students distilled with --distill-variant


@dataclass(frozen=True)
class Task:
    """A long-run task: its data, the corruption, and the training settings both variants share."""

    source: str
    operator: OperatorSpec
    network: NetworkConfig
    teacher: TrainConfig
    distill_train: DistillTrainConfig
    distill: DistillConfig
    n_eval: int
    floor_split: str  # the clean images set beside the evaluation images for the floor
    corrupt_kwargs: dict = field(default_factory=dict)


# The restoration benchmark's settings (inpainting: the default network, the held-out weight floor) and the
# cpu-mri preset's (MRI), with two changes a run cut into segments needs: no time-based lr drop (it is measured
# per segment, so it would fire in the first one), and frequent checkpoints (a kill loses at most one interval).
FMNIST_TEACHER = TEACHER_TRAIN.updated(steps=10_000_000, checkpoint_every=100)
FMNIST_DISTILL_TRAIN = DISTILL_TRAIN.updated(steps=10_000_000, checkpoint_every=50, keep_checkpoints=1)
MRI_R4 = Task(source="brain-mri", operator=cpu_mri_operator(4.0), network=CPU_MRI_NETWORK,
              teacher=CPU_MRI_TEACHER.updated(steps=10_000_000, checkpoint_every=100, keep_checkpoints=1,
                                              time_budget_s=None),
              distill_train=CPU_MRI_DISTILL_TRAIN.updated(steps=10_000_000, checkpoint_every=50, keep_checkpoints=1,
                                                          lr_drop_at=None, time_budget_s=None),
              distill=CPU_MRI_DISTILL, n_eval=419, floor_split="train",
              corrupt_kwargs={"image_size": 32, "clean_eval_split": "test"})
TASKS = {
    "inpaint-0.8": Task(source="fashion-mnist", operator=InpaintSpec(p=0.8, delta=0.1), network=NetworkConfig(),
                        teacher=FMNIST_TEACHER, distill_train=FMNIST_DISTILL_TRAIN,
                        distill=DISTILL, n_eval=1000, floor_split="test"),
    "mri-r4": MRI_R4,
    # The same task with each scan's own coil maps, estimated by ESPIRiT from 6 calibration lines (a team's own
    # k-space; the MRI benchmark's "estimated" row): its 8 lines hold every frequency up to +-3 cycles per view
    "mri-r4-estimated": dataclasses.replace(MRI_R4, operator=benchmark_operator(4.0, "estimated")),
    # With 6 ACS lines of 8, delta_R = 1 makes the further mask M~ the ACS block alone in every draw: the networks
    # never see a line above +-3 cycles. delta_R = 0.5 keeps floor(32 / 4.5) = 7 lines, the ACS block and one of the
    # two random ones: an experiment on the student's speckle that did not remove it (docs/results.md, "Where the
    # MRI student's speckle sits").
    "mri-r4-estimated-delta0.5": dataclasses.replace(
        MRI_R4, operator=benchmark_operator(4.0, "estimated").model_copy(update={"delta_R": 0.5})),
}


def gpu_task(task: Task) -> Task:
    """The task at a GPU's scale: 4x the batches, EMA lengths for millions of images (EDM's rule: a half-life of
    at most 5% of the images seen), fewer checkpoints, and more data workers to feed the larger batches."""
    return dataclasses.replace(
        task,
        teacher=task.teacher.updated(batch_size=4 * task.teacher.batch_size, ema_halflife_nimg=50_000,
                                     ema_rampup_ratio=0.05, checkpoint_every=1000, data_workers=2),
        distill_train=task.distill_train.updated(batch_size=4 * task.distill_train.batch_size,
                                                 ema_halflife_nimg=20_000, checkpoint_every=500),
    )


@dataclass(frozen=True)
class Profile:
    """Where the long run trains, and the names its results publish under."""

    name: str
    tasks: dict[str, Task]
    stem: str  # benchmarks/results/<stem>.json, docs/figures/<stem>_<task>.png and docs/figures/<stem>/
    heading: str

    @property
    def doc_markers(self) -> tuple[str, str]:
        return (f"<!-- {self.stem}: generated by benchmarks/long_run.py from here -->",
                f"<!-- {self.stem}: generated part ends; the text below is kept when it reruns -->")


PROFILES = {
    "cpu": Profile("cpu", TASKS, "long_run", "# Long run: quality against compute (CPU)"),
    "gpu": Profile("gpu", {name: gpu_task(task) for name, task in TASKS.items()}, "long_run_gpu",
                   "# Long run on one GPU: quality against compute"),
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


class Points:
    """The kept and scored points of one training folder: ``points/<key>-<m>min``, ``grids/<key>@<m>.png`` and
    ``points.json`` (each point scored once; a rerun skips what the file holds)."""

    def __init__(self, folder: Path, label: str, scorer, args, device: str):
        self.folder, self.label, self.scorer, self.args, self.device = folder, label, scorer, args, device
        self.file = folder / "points.json"
        self.scores = json.loads(self.file.read_text()) if self.file.exists() else {}

    def keep(self, phase_model: Path, point: Path, trained: float, batch: int) -> None:
        shutil.copytree(phase_model, point, dirs_exist_ok=True)
        (point / "trained_s.json").write_text(json.dumps({"seconds": trained, "batch_size": batch,
                                                          "device": self.device}))
        steps = read_card(point).steps
        print(f"[long_run] {self.label}: kept {point.name}: {steps} steps of batch {batch} in {trained:.0f} s "
              f"({steps * batch / max(trained, 1e-9):.0f} images/s)", flush=True)

    def score(self, key: str, point: Path, score) -> None:
        if key in self.scores or self.args.no_score:
            return
        t = time.perf_counter()
        self.scores[key] = {**score(point, self.scorer(), self.folder / "grids" / f"{key}.png"),
                            "eval_s": time.perf_counter() - t}
        self.file.write_text(json.dumps(self.scores, indent=1))
        print(f"[long_run] {self.label} {key}: FD {self.scores[key]['fd']:.1f}, KID {self.scores[key]['kid']:.4f} "
              f"+- {self.scores[key]['kid_std']:.4f}", flush=True)
        assemble(self.args)


def with_distill_changes(task: Task, changes: Changes) -> Task:
    """The task with a distillation variant's changes (pydantic validates them)."""
    return dataclasses.replace(task, distill=task.distill.updated(**changes.get("distill", {})),
                               distill_train=task.distill_train.updated(**changes.get("train", {})))


def arm_folder(root: Path, name: str, changes: Changes) -> Path:
    """Where a distillation variant's student points live, beside the variant's own; an existing folder must
    have been run with the same changes (a name reused for other settings would mix two arms in one curve)."""
    folder = root / ARMS_DIR / name
    record = folder / "changes.json"
    if record.exists() and json.loads(record.read_text()) != changes:
        raise SystemExit(f"--distill-variant {name}: {folder} was distilled with {record.read_text().strip()}, "
                         f"not {json.dumps(changes)}; give the variant another name")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(changes))
    return folder


def run_variant(name: str, task: Task, variant: str, args, root: Path) -> None:
    """Corrupt (or copy clean), then train, keep and score every point of the variant's schedule in ``root``;
    with ``--distill-variant`` the students are distilled with its changes into their own folder."""
    data = root / "data"
    if not (data / "manifest.json").exists():
        spec = task.operator if variant == "corrupted" else IdentitySpec()
        print(f"[long_run] {name}/{variant}: writing the dataset ({spec.kind})", flush=True)
        corrupt(task.source, spec, seed=args.seed, out_uri=str(data), limit=args.limit, clean_eval_count=task.n_eval,
                **task.corrupt_kwargs)
    if args.prepare_only:
        return
    scorer = functools.cache(lambda: Scorer(str(data), task.n_eval, args.seed, root))
    device = device_name(task.teacher.device)
    teachers = Points(root, f"{name}/{variant}", scorer, args, device)
    progress = not args.quiet
    seed = {"seed": args.seed}
    for minutes in args.teacher_minutes:
        point = root / "points" / f"teacher-{minutes:g}min"
        if not (point / "model.json").exists():
            def run(remaining, clock):
                pretrain_stage(str(data), task.network, task.teacher.updated(time_budget_s=remaining, **seed), root,
                               progress=progress, on_checkpoint=clock)
            teachers.keep(root / "teacher", point, train_to(minutes, root / PRETRAIN_DIR, root / "teacher", run),
                          task.teacher.batch_size)
        teachers.score(f"teacher@{minutes:g}", point, score_teacher)
    if not args.distill_minutes:
        return
    teacher = root / "points" / f"teacher-{max(args.teacher_minutes):g}min"
    students = teachers
    if args.distill_variant is not None:
        arm, changes = args.distill_variant  # main applied the changes to task.distill / task.distill_train
        students = Points(arm_folder(root, arm, changes), f"{name}/{variant}/{arm}", scorer, args, device)
    out = students.folder
    for minutes in args.distill_minutes:
        point = out / "points" / f"student-{minutes:g}min"
        if not (point / "model.json").exists():
            def run(remaining, clock):
                distill_stage(teacher, task.distill_train.updated(time_budget_s=remaining, **seed), task.distill,
                              out, progress=progress, on_checkpoint=clock)
            students.keep(out / "generator", point, train_to(minutes, out / DISTILL_DIR, out / "generator", run),
                          task.distill_train.batch_size)
        students.score(f"student@{minutes:g}", point, score_student)


def device_name(setting: str) -> str:
    """What trains: the GPU's name, or the CPU's architecture and the torch threads."""
    device = resolve_device(setting)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}"


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
    out, profile = Path(args.out), PROFILES[args.profile]
    tasks = {}
    for name, task in profile.tasks.items():
        root = out / name
        points = {v: json.loads((root / v / "points.json").read_text()) for v in VARIANTS
                  if (root / v / "points.json").exists()}
        if not points:
            continue
        minutes = sorted({float(k.split("@")[1]) for p in points.values() for k in p})
        # Students are distilled from the last teacher point: their ratios are against that teacher, and against
        # the clean teacher at the same training time (or the clean run's last point)
        last = {v: max((float(k.split("@")[1]) for k in points.get(v, {}) if k.startswith("teacher@")), default=None)
                for v in VARIANTS}
        teacher_ref = points["corrupted"][f"teacher@{last['corrupted']:g}"] if last["corrupted"] else None
        matched = last["corrupted"] is not None and f"teacher@{last['corrupted']:g}" in points.get("clean", {})
        clean_at = last["corrupted"] if matched else last["clean"]
        clean_ref = points["clean"][f"teacher@{clean_at:g}"] if clean_at else None
        rows = []
        for m in minutes:
            row = {"minutes": m}
            for prefix, variant, key in (("teacher", "corrupted", "teacher"), ("student", "corrupted", "student"),
                                         ("clean", "clean", "teacher"), ("clean_student", "clean", "student")):
                p = points.get(variant, {}).get(f"{key}@{m:g}")
                if p is None:
                    continue
                batch = trained_record(root / variant, key, m).get(
                    "batch_size", (task.teacher if key == "teacher" else task.distill_train).batch_size)
                row |= cell(prefix, p, batch)
            if teacher_ref is not None and "student_fd" in row:
                row["student_over_teacher"] = row["student_fd"] / teacher_ref["fd"]
            if clean_ref is not None and "student_fd" in row:
                row["student_over_clean"] = row["student_fd"] / clean_ref["fd"]
            rows.append(row)
        arms = [distill_variant(arm.parent, variant, points[variant],
                                teacher_ref if variant == "corrupted" else clean_ref, task.distill_train.batch_size)
                for variant in points for arm in sorted((root / variant / ARMS_DIR).glob("*/points.json"))]
        task_floor = floor(name, task, args, root)
        first = root / next(iter(points))  # the device of the first variant's first teacher point that has one
        trained_on = next((r["device"] for m in minutes if "device" in (r := trained_record(first, "teacher", m))),
                          "unrecorded")
        tasks[name] = {"date": datetime.date.today().isoformat(),
                       "command": "python -m benchmarks.long_run " + " ".join(sys.argv[1:]),
                       "operator": task.operator.model_dump(mode="json"),
                       "teacher_heldout_sigma_floor": task.teacher.heldout_sigma_floor, "n_eval": task_floor["n"],
                       "floor_fd": task_floor["fd"], "floor_kid": task_floor["kid"],
                       "floor_kid_std": task_floor["kid_std"], "floor_against": task_floor["against"],
                       "extractor": task_floor["extractor"], "distilled_from_teacher_minutes": last["corrupted"],
                       "clean_reference_minutes": clean_at, "trained_on": trained_on,
                       "batch_sizes": {"teacher": task.teacher.batch_size, "student": task.distill_train.batch_size},
                       "rows": rows, "points": points}
        if arms:
            tasks[name]["distill_variants"] = arms
        if args.publish:
            plot(name, tasks[name], FIGURES / f"{profile.stem}_{name}.png", trained_on)
            for variant in points:
                arms_here = sorted((root / variant / ARMS_DIR).glob("*"))
                for folder, arm in [(root / variant, None)] + [(f, f.name) for f in arms_here]:
                    for grid in (folder / "grids").glob("*.png"):
                        dest = FIGURES / grid_name(profile, name, variant, grid.stem, arm)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(grid, dest)
    if args.publish:
        merged = carried_tasks(profile, tasks) | tasks
        tasks = {name: merged[name] for name in profile.tasks if name in merged}
    result = {
        "date": datetime.date.today().isoformat(),
        # not this process's torch threads: --assemble-only scores nothing, and each point was scored by the run
        # that trained it (or unpacked it)
        "machine": f"assembled on {platform.machine()}, {os.cpu_count()} CPU cores; each point was scored by the "
                   "run that trained or unpacked it, and each task's trained_on says where it trained",
        "profile": profile.name,
        "command": "python -m benchmarks.long_run " + " ".join(sys.argv[1:]),
        "minutes": "cumulative training wall time of the phase: teacher_* and clean_* after that many minutes of "
        "teacher training; student_* after that many minutes of distillation from the last teacher point, and its "
        "ratios against that teacher and the clean teacher at the same training time",
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "long_run.json", result)
    if args.publish:
        write_atomic(RESULTS / f"{profile.stem}.json", result)
        write_doc(result, profile)
    return result


def grid_name(profile: Profile, task: str, variant: str, key: str, arm: str | None = None) -> str:
    """Where a point's grid (``key`` as in points.json, e.g. ``student@30``) is published, under docs/figures/."""
    return f"{profile.stem}/{task}_{variant}{f'_{arm}' if arm else ''}_{key.replace('@', '-')}min.png"


def cell(prefix: str, point: dict, batch: int) -> dict:
    """A scored point as a row's ``<prefix>_*`` fields."""
    fields = {f"{prefix}_fd": point["fd"], f"{prefix}_kid": point["kid"], f"{prefix}_kid_std": point["kid_std"],
              f"{prefix}_steps": point["steps"], f"{prefix}_images": point["steps"] * batch}
    if "sampler" in point:
        fields[f"{prefix}_sampler"] = point["sampler"]
    return fields


def distill_variant(folder: Path, variant: str, base: dict, teacher_ref: dict | None, batch: int) -> dict:
    """A distillation variant's rows: its students beside the variant's own (``student_over_base``, at the same
    minutes of distillation from the same teacher) and against the teacher they were distilled from."""
    scores = json.loads((folder / "points.json").read_text())
    rows = []
    for key in sorted(scores, key=lambda k: float(k.split("@")[1])):
        m = float(key.split("@")[1])
        row = {"minutes": m} | cell("student", scores[key], trained_record(folder, "student", m).get("batch_size",
                                                                                                   batch))
        if teacher_ref is not None:
            row["student_over_teacher"] = row["student_fd"] / teacher_ref["fd"]
        if key in base:
            row["student_over_base"] = row["student_fd"] / base[key]["fd"]
        rows.append(row)
    return {"name": folder.name, "variant": variant, "changes": json.loads((folder / "changes.json").read_text()),
            "rows": rows, "points": scores}


def carried_tasks(profile: Profile, fresh: dict) -> dict:
    """The published tasks that OUT does not hold, kept as they were (with their own date and command), so that
    rerunning one task does not drop the others' rows from the published file."""
    published = RESULTS / f"{profile.stem}.json"
    if not published.exists():
        return {}
    old = json.loads(published.read_text())
    return {name: {"date": old["date"], "command": old["command"], **task}
            for name, task in old["tasks"].items() if name not in fresh and name in profile.tasks}


def trained_record(variant_dir: Path, key: str, minutes: float) -> dict:
    """What ``keep`` recorded beside a point: its training seconds, batch size and device ({} before it did)."""
    file = variant_dir / "points" / f"{key}-{minutes:g}min" / "trained_s.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _cell(row: dict, prefix: str) -> str:
    """FD (KID +- std; steps, images seen); rows published before they recorded images seen show steps only."""
    if f"{prefix}_fd" not in row:
        return "-"
    images = row.get(f"{prefix}_images")
    seen = "" if images is None else f", {images / 1e3:.0f}k images"
    return (f"{row[f'{prefix}_fd']:.1f} ({row[f'{prefix}_kid']:.3g} +- {row[f'{prefix}_kid_std']:.2g}; "
            f"{row[f'{prefix}_steps']} steps{seen})")


def _trained(task: dict) -> str:
    """Where and with what batches a task trained; a task published before it recorded them says so."""
    if "batch_sizes" not in task:
        return "Device and batch sizes unrecorded (published before the file held them)."
    return (f"Trained on {task['trained_on']}, batch {task['batch_sizes']['teacher']} (teacher) "
            f"and {task['batch_sizes']['student']} (distillation).")


def _minutes(value: float | None) -> str:
    """A reference point's minutes; a run still without that point (the other variant not yet scored) has none."""
    return "none yet" if value is None else f"{value:g} min"


def write_doc(result: dict, profile: Profile) -> None:
    """The generated table of docs/results.md's long-run section (between its markers; the rest is kept)."""
    lines = ["", f"Command: `{result['command']}`  ", f"Date: {result['date']}; {result['machine']}  ",
             f"Minutes: {result['minutes']}.", ""]
    for name, task in result["tasks"].items():
        floor = task.get("teacher_heldout_sigma_floor", 0.0)
        # the student distilled from the clean teacher (what distillation reaches without corruption), where run
        models = ["teacher", "student", "clean"] + (["clean_student"] if any("clean_student_fd" in r
                                                                             for r in task["rows"]) else [])
        header = ["minutes", "teacher (best sampler)", "one-step student", "clean-data teacher", "clean-data student"]
        header = header[:1 + len(models)] + [
            f"student / teacher ({_minutes(task['distilled_from_teacher_minutes'])})",
            f"student / clean ({_minutes(task['clean_reference_minutes'])})"]
        lines += [f"**{name}**: `{task.get('command', result['command'])}` ({task.get('date', result['date'])}; "
                  f"teacher's held-out weight floor {floor:g}).", "",
                  f"{task['n_eval']} samples; {task['extractor']}. Cells: FD (KID +- its std over "
                  f"subsets; steps and images seen). {_trained(task)} "
                  f"Floor ({task['floor_against']}): FD {task['floor_fd']:.1f}, KID "
                  f"{task['floor_kid']:.3g} +- {task['floor_kid_std']:.2g}.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in task["rows"]:
            ratios = [f"{r[k]:.2f}" if k in r else "-" for k in ("student_over_teacher", "student_over_clean")]
            cells = [f"{r['minutes']:g}", *(_cell(r, m) for m in models), *ratios]
            lines.append("| " + " | ".join(cells) + " |")
        if task.get("distill_variants"):
            lines += ["", "Distillation variants (`--distill-variant`: the same teacher point, the same minutes of "
                      "distillation; student / base is against the table's student at those minutes):", "",
                      "| variant | changes | minutes | one-step student | student / teacher | student / base | grid |",
                      "|---|---|---|---|---|---|---|"]
            for arm in task["distill_variants"]:
                changes = "; ".join(f"{section}.{k}={v}" for section, fields in arm["changes"].items()
                                    for k, v in fields.items())
                for r in arm["rows"]:
                    ratios = [f"{r[k]:.2f}" if k in r else "-" for k in ("student_over_teacher", "student_over_base")]
                    grid = grid_name(profile, name, arm["variant"], f"student@{r['minutes']:g}", arm["name"])
                    lines.append(f"| {arm['name']} ({arm['variant']}) | `{changes}` | {r['minutes']:g} | "
                                 f"{_cell(r, 'student')} | {ratios[0]} | {ratios[1]} | [grid](figures/{grid}) |")
        lines += ["", f"![long run {name}](figures/{profile.stem}_{name}.png)", ""]
    replace_block(DOC, *profile.doc_markers, lines, profile.heading)


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def plot(name: str, task: dict, path: Path, trained_on: str) -> None:
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
        ax.set_ylabel(what)
        ax.set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.supxlabel(f"minutes of training (teacher) / distillation (student); {trained_on}", fontsize=9)
    fig.suptitle(f"long run, {name}: {task['extractor'].split(':')[0].split(' (')[0]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


PACK_LIMIT = 16 * 2**20 - 2**17  # bytes per archive: the GPU machine's tool brings back files of at most 16 MiB


def pack(out: Path, dest: Path) -> list[Path]:
    """Every point's model under ``out`` (the distillation variants' too, with their changes) into tar archives of
    at most PACK_LIMIT bytes in ``dest``, its weights as fp16 (a model is 10 MiB in fp32), so the points of a GPU
    run travel back to where they are scored."""
    from safetensors.torch import load_file, save

    entries = []
    points = sorted([*out.glob("*/*/points/*"), *out.glob(f"*/*/{ARMS_DIR}/*/points/*")])
    arms = sorted(out.glob(f"*/*/{ARMS_DIR}/*/changes.json"))  # the changes an arm's name stands for
    for file in [f for point in points for f in sorted(point.iterdir())] + arms:
        if file.suffix == ".safetensors":
            weights = load_file(file)
            too_large = [k for k, v in weights.items() if v.is_floating_point() and v.abs().max() > 65504]
            if too_large:
                raise ValueError(f"{file}: {too_large[0]} exceeds fp16's range; cannot pack it as fp16")
            data = save({k: v.half() if v.dtype == torch.float32 else v for k, v in weights.items()})
        else:
            data = file.read_bytes()
        entries.append((str(file.relative_to(out)), data))
    archives: list[list[tuple[str, bytes]]] = [[]]
    for name, data in entries:
        if archives[-1] and sum(len(d) for _, d in archives[-1]) + len(data) > PACK_LIMIT:
            archives.append([])
        archives[-1].append((name, data))
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, archive in enumerate(archives):
        path = dest / f"points-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in archive:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def unpack(source: Path, out: Path) -> int:
    """The archives ``pack`` wrote, into ``out``, the weights back in fp32 (the precision every loader expects);
    returns the number of points."""
    from safetensors.torch import load, save_file

    points = set()
    for path in sorted(source.glob("points-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                target = (out / member.name).resolve()
                if not member.isfile() or out.resolve() not in target.parents:
                    raise ValueError(f"{path}: refusing member {member.name!r} outside {out}")
                data = tar.extractfile(member).read()
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.suffix == ".safetensors":
                    save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in load(data).items()},
                              target)
                else:
                    target.write_bytes(data)
                if target.parent.parent.name == "points":
                    points.add(target.parent)
    return len(points)


def distill_variant_arg(text: str) -> tuple[str, Changes]:
    """``NAME:distill.FIELD=VALUE;...``, NAME a folder name."""
    name, changes = parse_variant(text, {}, ("distill", "train"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise argparse.ArgumentTypeError(f"variant name {name!r}: letters, digits, '.', '_' and '-' only")
    if not changes:
        raise argparse.ArgumentTypeError(f"variant {name!r} changes nothing")
    return name, changes


def minutes_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(v <= 0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"expected increasing positive minutes, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), help="the task to train and score (required unless "
                        "--assemble-only, --pack or --unpack)")
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu",
                        help="cpu: one core's settings; gpu: 4x the batches and EMA lengths for a GPU (its own "
                        "results file, figures and doc section; default work folder outputs/long_run_gpu)")
    parser.add_argument("--assemble-only", action="store_true",
                        help="train nothing: rebuild the JSON, the plots and grids from the points under OUT")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the variant's dataset under OUT and stop (to carry it where it trains)")
    parser.add_argument("--no-score", action="store_true",
                        help="train and keep the points, score nothing (where the FD extractors are not installed); "
                        "the same command without it later scores the points it finds")
    parser.add_argument("--pack", metavar="DIR", help="write every point under OUT into fp16 tar archives in DIR")
    parser.add_argument("--unpack", metavar="DIR", help="extract the archives --pack wrote in DIR into OUT")
    parser.add_argument("--variant", choices=VARIANTS, default="corrupted",
                        help="corrupted: the task's teacher and student; clean: the same network and schedule on "
                        "the clean images (the reference)")
    parser.add_argument("--teacher-minutes", type=minutes_list, default=[10.0, 30.0, 60.0],
                        help="points of the teacher's training time (default: 10,30,60)")
    parser.add_argument("--distill-minutes", type=minutes_list, default=[10.0, 30.0, 60.0],
                        help="points of the distillation's time, from the last teacher point; empty for none "
                        "(default: 10,30,60)")
    parser.add_argument("--distill-variant", type=distill_variant_arg, default=None,
                        metavar="NAME:distill.FIELD=VALUE;train.FIELD=VALUE",
                        help="distil from the same last teacher point with these DistillConfig / DistillTrainConfig "
                        "changes into <variant>/distill-variants/NAME (an A/B arm at equal minutes; its rows are "
                        "the task's distill_variants), e.g. 'lr1e-4:distill.lr_generator=1e-4;distill.lr_fake=1e-4'")
    parser.add_argument("--limit", type=int, default=20_000,
                        help="training images (default: 20000, the restoration benchmark's; MRI has 1,345 slices)")
    parser.add_argument("--n-eval", type=int, default=None,
                        help="samples per score (default: the task's; 1000 for inpainting, 419 test slices for MRI)")
    add_work_args(parser, ROOT / "outputs" / "long_run<_gpu>", "benchmarks/results, docs/figures, docs/results.md")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.out == str(ROOT / "outputs" / "long_run<_gpu>"):
        args.out = str(ROOT / "outputs" / profile.stem)
    if args.pack:
        archives = pack(Path(args.out), Path(args.pack))
        print(f"[long_run] packed {len(archives)} archive(s) into {args.pack}")
        return {"archives": [str(a) for a in archives]}
    if args.unpack:
        n = unpack(Path(args.unpack), Path(args.out))
        print(f"[long_run] unpacked {n} point(s) into {args.out}")
        return {"points": n}
    if args.assemble_only:
        return assemble(args)
    if args.task is None:
        parser.error("--task is required (or --assemble-only, --pack, --unpack)")
    if not args.teacher_minutes:
        parser.error("--teacher-minutes needs at least one point")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = profile.tasks[args.task]
    if args.distill_variant is not None:
        try:  # the arm's settings, validated before anything trains
            task = with_distill_changes(task, args.distill_variant[1])
        except ValidationError as err:
            parser.error(f"--distill-variant {args.distill_variant[0]}: {err}")
    if args.n_eval is not None:
        task = dataclasses.replace(task, n_eval=args.n_eval)
    root = Path(args.out) / args.task
    run_variant(args.task, task, args.variant, args, root / args.variant)
    if args.prepare_only or args.no_score:
        return {}
    result = assemble(args)
    print(json.dumps(result["tasks"][args.task]["rows"]))
    return result


if __name__ == "__main__":
    main()
