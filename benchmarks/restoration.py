"""The restoration benchmark: for each corruption of Fashion-MNIST 32x32, pretrain a teacher with
its objective, distil a one-step student, select by Proximal FID, and compare with the teacher.

    python -m benchmarks.restoration --budget 5 [--distill-budget 10] [--tasks inpaint-0.6,blur] [--out DIR]

``--budget`` is minutes of wall time per training phase (teacher, then distillation);
``--distill-budget`` overrides it for the distillation. Phases whose outputs exist are skipped
(their wall times are kept in the task's times.json), so an interrupted run resumes where it
stopped and independent tasks can run as separate processes into one ``--out`` (with
``--no-publish``; a last run over all tasks then only assembles the table). Writes OUT/restoration.json
and, unless ``--no-publish``, benchmarks/results/restoration.json (last stdout line too),
docs/results.md and one grid per task in docs/figures/ (rows: best teacher | student | student's
samples re-corrupted). ``--distill-lr-drop-at F`` drops the distillation's learning rates by
``--distill-lr-drop-factor`` after a fraction F of its budget.
True FDs use the in-domain Fashion-MNIST classifier features (evaluation only; not Inception FID); Proximal
FDs default to features learnt from each task's corrupted observations (``--proximal-extractor``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, emit
from benchmarks.scoring import Scorer, floor_distances, score_teacher
from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, TrainConfig
from rsd_core.data.sources import corrupt, fashion_mnist
from rsd_core.presets import CPU_DISTILL_EMA_HALFLIFE_NIMG, CPU_DISTILL_EMA_RAMPUP_RATIO
from rsd_core.select.selection import EXTRACTORS, CandidateScore, SelectionResult, select_stage
from rsd_core.stages import distill_stage, pretrain_stage, read_card

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "figures"
# docs/results.md: the benchmark rewrites what is above this line and keeps the analysis below it.
KEEP_BELOW = "<!-- generated above by benchmarks/restoration.py; the text below is kept when it reruns -->"

TASKS = {
    "inpaint-0.6": {"kind": "inpaint", "p": 0.6, "delta": 0.1},
    "inpaint-0.8": {"kind": "inpaint", "p": 0.8, "delta": 0.1},
    "blur-noise-0.2": {"kind": "blur", "kernel_size": 5, "std": 1.0, "sigma_n": 0.2},
    "superres-x2": {"kind": "superres", "factor": 2},
    "denoise-0.2": {"kind": "identity", "sigma_n": 0.2},
}
# A/B variants: run only when named in --tasks; each changes one setting of the task it is named after.
VARIANT_TASKS = {"blur-noise-0.2-reflect": {**TASKS["blur-noise-0.2"], "kernel": "scipy-reflect"}}


# The teacher's training settings of every Fashion-MNIST task (the time budget is set per run).
# heldout_sigma_floor 0.1: chosen by the teacher A/B (docs/results.md, "The held-out pixels' weight").
TEACHER_TRAIN = TrainConfig(steps=1_000_000, batch_size=64, lr=7e-4, lr_rampup_steps=200, grad_clip=1.0,
                            ema_halflife_nimg=10_000, checkpoint_every=500, keep_checkpoints=1, heldout_sigma_floor=0.1)
# The distillation's (time budget, checkpoint interval, lr drop and seed set per run).
DISTILL_TRAIN = DistillTrainConfig(steps=1_000_000, batch_size=32, ema_halflife_nimg=CPU_DISTILL_EMA_HALFLIFE_NIMG,
                                   ema_rampup_ratio=CPU_DISTILL_EMA_RAMPUP_RATIO, lr_rampup_steps=0)
DISTILL = DistillConfig(lr_fake=5e-5, lr_generator=5e-5)


def read_times(out: Path) -> dict:
    """The wall times of the phases already run in the task folder ``out``."""
    times_file = out / "times.json"
    return json.loads(times_file.read_text()) if times_file.exists() else {}


def timed_phase(out: Path, times: dict, key: str, done: bool, work) -> None:
    """Run ``work`` unless its output exists; record its wall time in ``out/times.json``, or keep the
    recorded one."""
    if not done:
        t = time.perf_counter()
        work()
        times[key] = time.perf_counter() - t
        out.mkdir(parents=True, exist_ok=True)
        (out / "times.json").write_text(json.dumps(times, indent=1))
    times.setdefault(key, None)  # reused from a work folder that predates times.json: unknown


def train_models(spec: dict, out: Path, *, budget: float, distill_budget: float | None, limit: int, n_eval: int,
                 seed: int, checkpoint_every: int = 50, lr_drop_at: float | None = None,
                 lr_drop_factor: float = 0.25, progress: bool = True,
                 teacher_train: TrainConfig = TEACHER_TRAIN) -> dict:
    """Corrupt Fashion-MNIST, pretrain the teacher and distil the student into ``out`` (budgets in
    minutes; no distillation when ``distill_budget`` is None); phases whose outputs exist are skipped.
    Returns the wall times recorded in ``out/times.json`` (shared by the restoration and restore benchmarks)."""
    data = out / "data"
    times = read_times(out)
    timed_phase(out, times, "corrupt_s", (data / "manifest.json").exists(),
                lambda: corrupt(fashion_mnist("train"), spec, seed=0, out_uri=str(data), limit=limit,
                                clean_eval_count=n_eval))

    teacher_dir = out / "teacher"
    teacher_train = teacher_train.updated(time_budget_s=budget * 60, seed=seed)
    timed_phase(out, times, "teacher_s", (teacher_dir / "model.json").exists(),
                lambda: pretrain_stage(str(data), NetworkConfig(), teacher_train, out, progress=progress))
    if distill_budget is None:
        return times
    distill_train = DISTILL_TRAIN.updated(checkpoint_every=checkpoint_every, time_budget_s=distill_budget * 60,
                                          lr_drop_at=lr_drop_at, lr_drop_factor=lr_drop_factor, seed=seed)
    timed_phase(out, times, "distill_s", (out / "generator" / "model.json").exists(),
                lambda: distill_stage(teacher_dir, distill_train, DISTILL, out, progress=progress))
    return times


def run_task(name: str, spec: dict, args, out: Path) -> dict:
    times = train_models(spec, out, budget=args.budget, distill_budget=args.distill_budget, limit=args.limit,
                         n_eval=args.n_eval, seed=args.seed, checkpoint_every=args.checkpoint_every,
                         lr_drop_at=args.distill_lr_drop_at, lr_drop_factor=args.distill_lr_drop_factor,
                         progress=not args.quiet)
    data = out / "data"
    teacher_dir = out / "teacher"
    # One folder per Proximal FD extractor, so that both can be compared on the same checkpoints.
    sel_dir = out / ("selection" if args.proximal_extractor == "classifier" else f"selection-{args.proximal_extractor}")
    select_key = "select_s" if sel_dir.name == "selection" else f"{sel_dir.name}_s"
    picked = select_and_pick(args, out, data, teacher_dir, times, sel_dir, select_key, f"restoration_{name}.png")
    sel, grid, full, truncated, teacher_best, chosen = picked
    return {
        "task": name,
        "operator": spec,
        "teacher_fd": teacher_best.true_fd,
        "teacher_sampler": f"truncated at sigma {truncated.sigma_stop} ({truncated.nfe} NFE)"
        if teacher_best is truncated else "full Heun (35 NFE)",
        "teacher_fd_full": full.true_fd,
        "teacher_fd_truncated": truncated.true_fd,
        "teacher_proximal_fd_truncated": truncated.proximal_fd,
        "student_fd": chosen.true_fd,
        "student_over_teacher": chosen.true_fd / teacher_best.true_fd,
        "proximal_fid": sel.proximal_fd,
        "proximal_extractor": sel.proximal_extractor_label or sel.extractor_label,
        **selection_summary(sel, teacher_dir),
        **{k: v for k, v in times.items() if not k.startswith("select")},
        "select_s": times[select_key],
        "grid": str(grid.relative_to(ROOT)) if args.publish else str(grid),
    }


# The compute-matched clean model: the same network, budget and teacher schedule trained on the clean images
# (A = I, no noise), what a corrupted-data method aims at. Its teacher is scored like the tasks' teachers.
CLEAN_REFERENCE = {"kind": "identity", "sigma_n": 0.0}


def references(args) -> dict:
    """The clean model's and the floor's FD and KID on the rows' evaluation images and features (cached in
    OUT/clean-reference/references.json). The floor is Fashion-MNIST's test split against the evaluation images,
    which are the first training images."""
    out = Path(args.out) / "clean-reference"
    file = out / "references.json"
    if file.exists():
        return json.loads(file.read_text())
    times = train_models(CLEAN_REFERENCE, out, budget=args.budget, distill_budget=None, limit=args.limit,
                         n_eval=args.n_eval, seed=args.seed, progress=not args.quiet)
    scorer = Scorer(str(out / "data"), args.n_eval, args.seed, out)
    clean = score_teacher(out / "teacher", scorer, out / "clean_teacher.png")
    floor = floor_distances(str(out / "data"), "fashion-mnist", "test", args.seed, out)
    result = {"clean": {**clean, "teacher_s": times["teacher_s"]}, "floor": floor}
    file.write_text(json.dumps(result, indent=1))
    return result


def with_references(rows: list[dict], refs: dict) -> list[dict]:
    """Each row with the clean model's and the floor's figures beside its own."""
    clean, floor = refs["clean"], refs["floor"]
    return [{**r, "clean_fd": clean["fd"], "clean_kid": clean["kid"], "clean_kid_std": clean["kid_std"],
             "student_over_clean": r["student_fd"] / clean["fd"], "teacher_over_clean": r["teacher_fd"] / clean["fd"],
             "floor_fd": floor["fd"], "floor_kid": floor["kid"], "floor_kid_std": floor["kid_std"]} for r in rows]


def references_sentence(refs: dict, trained_on: str, kid: Callable[[dict], str], date: str) -> str:
    """The line under a table that gives its clean model and floor (``kid`` formats a score's KID +- std)."""
    clean, floor = refs["clean"], refs["floor"]
    return (f"References, same evaluation images, features and sample count: the **clean model** (the same "
            f"network, teacher budget and schedule trained on {trained_on}, {clean['steps']} steps, "
            f"{clean['sampler']}) FD **{clean['fd']:.1f}** (KID {kid(clean)}); "
            f"the **floor** ({floor['against']} against the evaluation images) FD **{floor['fd']:.1f}** "
            f"(KID {kid(floor)}). Measured {date}.")


PROXIMAL_FEATURES = {
    "self-supervised": "a small encoder trained contrastively on each task's own corrupted observations (no labels, "
    "no clean images; one per dataset, cached), the CPU presets' default, on another scale than the true FD's.",
    "classifier": "the same clean-trained classifier as the true FD.",
    "classifier-corrupted": "the same CNN architecture trained on each task's corrupted views of the Fashion-MNIST "
    "training images (one per operator, cached), so its values are on another scale than the true FD's.",
    "inception": "Inception-v3 (FID weights).",
}


def write_doc(result: dict, command: str) -> None:
    lines = [
        "# Restoration benchmark (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}  ",
        f"Budget: {result['budget_minutes']} minutes of wall time for the teacher, "
        f"{result['distill_budget_minutes']} for the distillation"
        + (f" (its learning rates x{result['distill_lr_drop_factor']} after {result['distill_lr_drop_at']:.0%} of it)"
           if result.get("distill_lr_drop_at") else "")
        + "; "
        f"{result['limit']} corrupted training images; FD on {result['n_eval']} samples.",
        "",
        f"Metric: **{result['extractor']}**. Lower is better. 'Teacher' is the better of the full 35-NFE Heun "
        "sampler and the truncated sampler whose truncation level Proximal FID chose (no clean data); "
        "the student is the distillation checkpoint with the best Proximal FID.",
        "",
        f"Proximal FD features (`--proximal-extractor {result.get('proximal_extractor', 'classifier')}`): "
        + PROXIMAL_FEATURES[result.get("proximal_extractor", "classifier")],
        "",
        "| task | teacher FD (sampler) | full 35-NFE | truncated | student FD (1 NFE) | student / teacher | "
        "student / clean | Proximal FD | Spearman | chosen vs best true FD | teacher / distill steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reruns = {}
    for r in result["rows"]:
        if "rerun" in r:
            reruns.setdefault((r["rerun"]["date"], r["rerun"]["command"]), []).append(r["task"])
    for (date, rerun_command), tasks in reruns.items():
        lines[3:3] = [f"Rows {', '.join(tasks)} rerun {date} (the others and the references as above): "
                      f"`{rerun_command}`  "]
    for r in result["rows"]:
        sp = "n/a" if r["selection_spearman"] is None else f"{r['selection_spearman']:.2f}"
        over_clean = f"{r['student_over_clean']:.2f}" if "student_over_clean" in r else "n/a"
        lines.append(
            f"| {r['task']} | {r['teacher_fd']:.1f} ({r['teacher_sampler']}) | {r['teacher_fd_full']:.1f} | "
            f"{r['teacher_fd_truncated']:.1f} | {r['student_fd']:.1f} | {r['student_over_teacher']:.2f} | "
            f"{over_clean} | {r['proximal_fid']:.2f} | {sp} | {r['chosen_true_fd']:.1f} vs {r['best_true_fd']:.1f} | "
            f"{r['teacher_steps']} / {r['distill_steps']} |"
        )
    refs = result.get("references")
    if refs:
        lines += ["", references_sentence(refs, "the clean images", lambda s: f"{s['kid']:.2f} +- {s['kid_std']:.2f}",
                                          refs.get("date", result["date"]))]
    lines += ["", "Wall time per phase (s):", "", "| task | corrupt | teacher | distill | select |",
              "|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = ["n/a" if r[k] is None else f"{r[k]:.0f}" for k in ("corrupt_s", "teacher_s", "distill_s", "select_s")]
        lines.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    lines += ["", "Sample grids (rows 1-3: best teacher; 4-6: one-step student; 7-9: student samples re-corrupted):",
              ""]
    lines += [f"- {r['task']}: ![{r['task']}](../{r['grid']})" for r in result["rows"]]
    kept = DOC.read_text().partition(KEEP_BELOW)[2] if DOC.exists() else ""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n\n" + KEEP_BELOW + (kept or "\n"))


@dataclass(frozen=True)
class Picked:
    """A selection's outcome as the benchmarks report it."""

    sel: SelectionResult
    grid: Path
    full: CandidateScore  # the teacher's full 35-NFE sampler
    truncated: CandidateScore  # its truncation level chosen by Proximal FD
    teacher_best: CandidateScore  # the better of those two by true FD (evaluation only)
    chosen: CandidateScore  # the student checkpoint chosen by Proximal FD

    def __iter__(self):
        return iter((self.sel, self.grid, self.full, self.truncated, self.teacher_best, self.chosen))


def select_and_pick(args, out: Path, data: Path, teacher_dir: Path, times: dict, sel_dir: Path, select_key: str,
                    figure: str) -> Picked:
    """Run (or reuse) the selection into ``sel_dir``, publish its grid as docs/figures/``figure``, and pick the
    teacher samplers and the chosen checkpoint out of it."""
    selection_file = sel_dir / "selection.json"
    timed_phase(out, times, select_key, selection_file.exists(),
                lambda: select_stage(str(data), teacher_dir, out, sel_dir, n_samples=args.n_eval,
                                     extractor=args.proximal_extractor, seed=args.seed, progress=not args.quiet))
    sel = SelectionResult.model_validate_json(selection_file.read_text())
    grid = Path(sel.grid)
    if args.publish:
        FIGURES.mkdir(parents=True, exist_ok=True)
        grid = FIGURES / figure
        shutil.copyfile(sel.grid, grid)
    full = next(r for r in sel.teacher_rows if r.sigma_stop is None)
    truncated = min((r for r in sel.teacher_rows if r.sigma_stop is not None), key=lambda r: r.proximal_fd)
    teacher_best = min((full, truncated), key=lambda r: r.true_fd)
    chosen = next(r for r in sel.rows if r.step == sel.chosen_step)
    return Picked(sel, grid, full, truncated, teacher_best, chosen)


def write_result(args, name: str, result: dict) -> dict:
    """OUT/<name>.json always; benchmarks/results/<name>.json and the last stdout line unless --no-publish
    (then the JSON is printed only)."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=1))
    if not args.publish:
        print(json.dumps(result))
        return result
    return emit(name, result)


def selection_summary(sel: SelectionResult, teacher_dir: Path) -> dict:
    """The selection figures every benchmark row reports (agreement with the true FD, steps trained)."""
    return {
        "selection_spearman": sel.spearman,
        "chosen_true_fd": sel.chosen_true_fd,
        "best_true_fd": sel.best_true_fd,
        "chosen_step": sel.chosen_step,
        "checkpoints": len(sel.rows),
        "teacher_steps": read_card(teacher_dir).steps,
        "distill_steps": max(r.step for r in sel.rows),
    }


def add_run_args(parser: argparse.ArgumentParser, name: str, checkpoint_every: int) -> None:
    """The options every train-then-select benchmark shares (work folder, seed, publishing, threads)."""
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                        help=f"distillation steps between checkpoints (default: {checkpoint_every})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / name), help="work folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="leave docs/results.md, docs/figures and benchmarks/results alone; the results go "
                        f"only to OUT/{name}.json (for smoke runs, and for tasks run as parallel processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, default the distillation budget to the teacher's, and set the torch threads."""
    args = parser.parse_args(argv)
    if args.distill_budget is None:
        args.distill_budget = args.budget
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=5.0, help="minutes per training phase (default: 5)")
    parser.add_argument("--distill-budget", type=float, default=None,
                        help="minutes for the distillation phase (default: --budget)")
    parser.add_argument("--distill-lr-drop-at", type=float, default=None,
                        help="fraction of the distillation after which its learning rates drop (default: never)")
    parser.add_argument("--distill-lr-drop-factor", type=float, default=0.25,
                        help="factor of that drop (default: 0.25)")
    parser.add_argument("--proximal-extractor", choices=EXTRACTORS, default="self-supervised",
                        help="features of Proximal FD (default: learnt from each task's corrupted observations; "
                        "classifier and classifier-corrupted are clean-label tools, for comparison); true FD always "
                        "uses the clean in-domain classifier")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {', '.join(TASKS)}; A/B variants (not run by default): "
                        f"{', '.join(VARIANT_TASKS)}")
    parser.add_argument("--limit", type=int, default=20_000, help="corrupted training images (default: 20000)")
    parser.add_argument("--n-eval", type=int, default=1000, help="samples per FD (default: 1000)")
    parser.add_argument("--references-only", action="store_true",
                        help="train and score only the clean model and the floor (in OUT/clean-reference), then add "
                        "them to the published rows of benchmarks/results/restoration.json and docs/results.md")
    parser.add_argument("--replace-rows", action="store_true",
                        help="run only --tasks and put their rows in place of the same tasks' published rows of "
                        "benchmarks/results/restoration.json (which must have this call's budgets, training images, "
                        "samples and features; its clean model and floor stay), then republish the table")
    add_run_args(parser, "restoration", checkpoint_every=50)
    args = parse_run_args(parser, argv)
    if args.references_only:
        return add_references(args)
    command = "python -m benchmarks.restoration " + " ".join(argv if argv is not None else sys.argv[1:])
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    known = TASKS | VARIANT_TASKS
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(known)}")
    # refused before any training: a mismatch found after hours of it would lose them
    published = published_for_rows(args, names) if args.replace_rows else None

    rows = []
    for name in names:
        print(f"== {name}: {known[name]}", flush=True)
        rows.append(run_task(name, known[name], args, Path(args.out) / name))
        r = rows[-1]
        print(f"   teacher FD {r['teacher_fd']:.1f} ({r['teacher_sampler']}), full {r['teacher_fd_full']:.1f}; "
              f"student FD {r['student_fd']:.1f} ({r['student_over_teacher']:.2f}x); proximal {r['proximal_fid']:.2f}",
              flush=True)
    if published is not None:
        return replace_rows(args, published, rows, command)
    from rsd_core.select.classifier import ClassifierExtractor

    refs = {**references(args), "date": datetime.date.today().isoformat()}
    rows = with_references(rows, refs)
    result = {
        "budget_minutes": args.budget,
        "distill_budget_minutes": args.distill_budget,
        "distill_lr_drop_at": args.distill_lr_drop_at,
        "distill_lr_drop_factor": args.distill_lr_drop_factor,
        "extractor": ClassifierExtractor().label,
        "proximal_extractor": args.proximal_extractor,
        "limit": args.limit,
        "n_eval": args.n_eval,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "command": command,
        "references": refs,
        "rows": rows,
    }
    if args.publish:
        write_doc(result, result["command"])
    print(f"{'task':16} {'teacher':>8} {'full':>8} {'trunc':>8} {'student':>8} {'ratio':>6} {'prox':>7}")
    for r in rows:
        print(f"{r['task']:16} {r['teacher_fd']:>8.1f} {r['teacher_fd_full']:>8.1f} {r['teacher_fd_truncated']:>8.1f} "
              f"{r['student_fd']:>8.1f} {r['student_over_teacher']:>6.2f} {r['proximal_fid']:>7.2f}")
    return write_result(args, "restoration", result)


def published_matching(args) -> dict:
    """The published result, refused unless it was made with ``args``' budgets, training images, samples and
    features: rows and references are comparable (and the clean model compute-matched) only then."""
    published = json.loads((RESULTS_DIR / "restoration.json").read_text())
    settings = {"budget_minutes": ("--budget", args.budget), "distill_budget_minutes": ("--distill-budget",
                args.distill_budget), "distill_lr_drop_at": ("--distill-lr-drop-at", args.distill_lr_drop_at),
                "limit": ("--limit", args.limit), "n_eval": ("--n-eval", args.n_eval),
                "proximal_extractor": ("--proximal-extractor", args.proximal_extractor)}
    for key, (flag, value) in settings.items():
        if published.get(key) != value:
            raise SystemExit(f"benchmarks/results/restoration.json has {key} {published.get(key)}, this call "
                             f"{value}: pass {flag} {published.get(key)}")
    return published


def publish_published(args, published: dict) -> dict:
    """Print (``--no-publish``) or republish an updated published result under its own command."""
    if not args.publish:
        print(json.dumps(published))
        return published
    command = published.get("command") or DOC.read_text().split("Command: `", 1)[1].split("`", 1)[0]
    write_doc(published, command)
    return emit("restoration", published)


def add_references(args) -> dict:
    """The clean model and the floor, trained and scored with ``args``' budget, added to the published rows."""
    published = published_matching(args)
    refs = {**references(args), "date": datetime.date.today().isoformat()}
    published = {**published, "references": refs, "rows": with_references(published["rows"], refs)}
    return publish_published(args, published)


def published_for_rows(args, tasks: list[str]) -> dict:
    """The published result whose rows of ``tasks`` a ``--replace-rows`` call replaces."""
    published = published_matching(args)
    missing = sorted(set(tasks) - {r["task"] for r in published["rows"]})
    if missing:
        raise SystemExit(f"benchmarks/results/restoration.json has no rows for {missing}: --replace-rows only "
                         "replaces published rows")
    return published


def replace_rows(args, published: dict, rows: list[dict], command: str) -> dict:
    """``rows`` (this call's tasks) in place of the published rows of the same tasks, each marked with its date
    and command; the other rows, the clean model and the floor stay as published."""
    today = datetime.date.today().isoformat()
    fresh = {r["task"]: {**r, "rerun": {"date": today, "command": command}} for r in rows}
    merged = [fresh.get(r["task"], r) for r in published["rows"]]
    published = {**published, "rows": with_references(merged, published["references"])}
    return publish_published(args, published)


if __name__ == "__main__":
    main()
