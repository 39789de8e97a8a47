"""Which Proximal FD features select checkpoints best? Every extractor scores the same candidates.

    python -m benchmarks.extractors --work /work/bench/restore-models [--extractors A,B] [--n-eval 1000]

For each task folder of WORK (the restoration benchmark's layout: ``data/``, ``teacher/``,
``distill/checkpoints/`` and ``generator/`` once the distillation finished) every distillation
checkpoint's EMA generator draws ``--n-eval`` samples once (seed as in selection); each extractor
then scores those same samples by Proximal FD against the corrupted data, as ``select_stage``
does, and the true FD against the clean evaluation split (the clean-label classifier: evaluation
only; a dataset made without a clean split is compared with the first ``--n-eval`` clean images of
its source, which that split would have held). Per task and extractor it reports Spearman(Proximal
FD, true FD) over the checkpoints and the true FD of the checkpoint that extractor would choose
against the best one, and the same for the teacher's truncation levels (``--n-teacher`` samples of one
Heun trajectory, as ``select_stage`` scores them; Proximal FID also picks that level). Tasks whose
distillation has not finished only get their extractors and reference statistics built (cached),
so a first run while training goes on takes that cost off the final one; ``--resume`` keeps the
tasks already published with the same settings and checkpoints and scores only the others.

Writes benchmarks/results/extractors.json (also the last stdout line; ``--no-publish``: stdout only) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, emit
from benchmarks.restoration import TASKS
from rsd_core.data.reader import CorruptedDataset, open_dataset
from rsd_core.data.sources import get_source
from rsd_core.select.classifier import ClassifierExtractor
from rsd_core.select.frechet import FeatureStats, cached_reference_stats, spearman
from rsd_core.select.selection import (
    EXTRACTORS,
    clean_reference,
    feature_images,
    make_extractors,
    proximal_reference,
    quantise,
    score_samples,
    self_supervised_extractor,
    teacher_truncation_samples,
)
from rsd_core.select.ssl_features import SSLRecipe
from rsd_core.stages import DISTILL_DIR, generator_from_checkpoint, load_model
from rsd_core.train.loop import list_checkpoints

DEFAULT_EXTRACTORS = ("self-supervised", "classifier-corrupted", "classifier")


def true_fd_reference(ds: CorruptedDataset, n: int) -> tuple[ClassifierExtractor, FeatureStats]:
    """The clean classifier (evaluation only) and the statistics of the dataset's clean split or, for a dataset
    corrupted without one, of the first ``n`` clean images of its source split: what that split would hold."""
    true = ClassifierExtractor()
    ref = clean_reference(ds.uri, true, n)
    if ref is None:
        source, split = ds.manifest.provenance["source"], ds.manifest.provenance["split"]
        clean = get_source(source, split).load(0, n)[0]
        ref = cached_reference_stats(f"{source}-{split}-first{n}-clean", true, lambda: quantise(feature_images(clean)))
    return true, ref


def recipe_variant(name: str) -> SSLRecipe | None:
    """The SSL recipe of an extractor name ``self-supervised@field=value[;field=value]`` (the default recipe
    with those fields changed), None for a plain extractor name. Lets recipe A/Bs score the same samples as
    the shipped extractors."""
    base, _, overrides = name.partition("@")
    if not overrides:
        return None
    if base != "self-supervised":
        raise ValueError(f"only 'self-supervised' takes recipe settings after '@', got '{name}'")
    recipe = SSLRecipe()
    changes = {}
    for item in overrides.split(";"):
        field, _, value = item.partition("=")
        if not isinstance(getattr(recipe, field, None), int | float):
            raise ValueError(f"'{name}': SSLRecipe has no numeric field '{field}'")
        try:
            changes[field] = type(getattr(recipe, field))(value)
        except ValueError:
            raise ValueError(f"'{name}': '{value}' is not a value for SSLRecipe.{field}") from None
    return replace(recipe, **changes)


def prepare(task_dir: Path, names: list[str], n: int) -> tuple:
    """(operator, {name: (extractors, proximal reference, clean reference)}): trains or loads each extractor."""
    data = str(task_dir / "data")
    ds = open_dataset(data)
    true, clean_ref = true_fd_reference(ds, n)
    scorers = {}
    for name in names:
        t = time.perf_counter()
        recipe = recipe_variant(name)
        prox = self_supervised_extractor(ds, recipe) if recipe else make_extractors(name, ds.operator, ds)[0]
        scorers[name] = ((prox, true), proximal_reference(data, prox, min(len(ds), n)), clean_ref)
        print(f"   {name}: {prox.id} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return ds.operator, scorers


def score_task(task_dir: Path, operator, scorers: dict, n: int, n_teacher: int, seed: int) -> list[dict]:
    """One row per candidate (each distillation checkpoint, then each teacher truncation level): its true FD
    and each extractor's Proximal FD, all computed on one set of samples of that candidate."""

    def candidates():
        for ckpt in list_checkpoints(task_dir / DISTILL_DIR / "checkpoints"):
            yield "checkpoint", ckpt.name, generator_from_checkpoint(ckpt, task_dir / "teacher").sample(n, seed=seed)
        if n_teacher:
            teacher, objective, card = load_model(task_dir / "teacher")
            levels = teacher_truncation_samples(teacher, objective, card.image_shape, n_teacher, seed)
            for level, samples in levels.items():
                yield "teacher", f"teacher@{level}", samples

    rows = []
    for group, name, samples in candidates():
        row: dict = {"group": group, "candidate": name}
        for ext, (extractors, prox_ref, clean_ref) in scorers.items():
            row[ext], row["true_fd"] = score_samples(samples, operator, extractors, prox_ref, clean_ref, seed)
        rows.append(row)
        scores = ", ".join(f"{e} {row[e]:.3g}" for e in scorers)
        print(f"   {name}: true FD {row['true_fd']:.2f}; {scores}", flush=True)
    return rows


def agreement(rows: list[dict], name: str) -> dict:
    """How well ranking ``rows`` (one group of candidates) by ``name``'s Proximal FD agrees with the true FD."""
    chosen = min(rows, key=lambda r: r[name])
    best = min(rows, key=lambda r: r["true_fd"])
    return {
        "spearman": spearman([r[name] for r in rows], [r["true_fd"] for r in rows]) if len(rows) >= 3 else None,
        "chosen": chosen["candidate"],
        "chosen_true_fd": chosen["true_fd"],
        "best": best["candidate"],
        "best_true_fd": best["true_fd"],
        "gap": chosen["true_fd"] / best["true_fd"] - 1,
    }


def by_group(rows: list[dict], name: str) -> dict:
    """Agreement among the checkpoints, among the teacher's truncation levels, and Spearman over all of them."""
    out = {g: agreement([r for r in rows if r["group"] == g], name) for g in ("checkpoint", "teacher")
           if any(r["group"] == g for r in rows)}
    out["spearman_all"] = spearman([r[name] for r in rows], [r["true_fd"] for r in rows]) if len(rows) >= 3 else None
    return out


def _cell(a: dict) -> str:
    return f"{a['chosen_true_fd']:.1f} vs {a['best_true_fd']:.1f} ({100 * a['gap']:+.1f}%)"


def table(tasks: list[dict], names: list[str]) -> str:
    """Markdown, per task and extractor: Spearman within the checkpoints and within the truncation levels
    (each group's FDs share one sample count; "all" mixes two, whose FD biases differ), then the chosen
    candidate's true FD against the best one's, among the checkpoints and among the truncation levels."""
    head = " | ".join(f"{n}: Spearman ckpt / trunc; chosen vs best ckpt; trunc" for n in names)
    lines = [f"| task | ckpts | {head} |", "|---|---:|" + "---|" * len(names)]
    for t in tasks:
        cells = []
        for n in names:
            a = t["by_extractor"][n]
            rho = " / ".join("n/a" if a.get(g, {}).get("spearman") is None else f"{a[g]['spearman']:.2f}"
                             for g in ("checkpoint", "teacher"))
            cells.append("; ".join([rho] + [_cell(a[g]) for g in ("checkpoint", "teacher") if g in a]))
        n_ckpt = sum(r["group"] == "checkpoint" for r in t["rows"])
        lines.append(f"| {t['task']} | {n_ckpt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder of task folders (benchmarks/restoration.py layout)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task folder names")
    parser.add_argument("--extractors", default=",".join(DEFAULT_EXTRACTORS),
                        help=f"comma-separated Proximal FD extractors, of {', '.join(EXTRACTORS)}; "
                        "'self-supervised@erase=0.5;seed=1' scores a variant of the SSL recipe")
    parser.add_argument("--n-eval", type=int, default=1000, help="samples per FD, as the restoration benchmark")
    parser.add_argument("--n-teacher", type=int, default=None,
                        help="samples per teacher truncation level (default: --n-eval; 0: checkpoints only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="print the result only; leave benchmarks/results alone (smoke runs)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tasks of benchmarks/results/extractors.json scored with the same settings, "
                        "extractors and checkpoints; score only the others")
    args = parser.parse_args(argv)
    names = [e.strip() for e in args.extractors.split(",") if e.strip()]
    if unknown := [e for e in names if e.partition("@")[0] not in EXTRACTORS]:
        parser.error(f"unknown extractor(s) {unknown}; choose from {list(EXTRACTORS)}")
    torch.set_num_threads(args.threads)
    n_teacher = args.n_eval if args.n_teacher is None else args.n_teacher
    settings = {"n_eval": args.n_eval, "n_teacher": n_teacher, "seed": args.seed, "extractors": names}
    published = RESULTS_DIR / "extractors.json"
    previous = json.loads(published.read_text()) if args.resume and published.exists() else {}
    kept = {t["task"]: t for t in previous.get("tasks", [])
            if all(previous.get(k) == v for k, v in settings.items())}

    tasks, pending = [], []
    for task in (t.strip() for t in args.tasks.split(",") if t.strip()):
        task_dir = Path(args.work) / task
        if not (task_dir / "data" / "manifest.json").exists():
            pending.append(task)
            continue
        checkpoints = [c.name for c in list_checkpoints(task_dir / DISTILL_DIR / "checkpoints")]
        if task in kept and [r["candidate"] for r in kept[task]["rows"] if r["group"] == "checkpoint"] == checkpoints:
            print(f"== {task}: kept from {published}", flush=True)
            tasks.append(kept[task])
            continue
        print(f"== {task}", flush=True)
        t = time.perf_counter()
        operator, scorers = prepare(task_dir, names, args.n_eval)
        if not (task_dir / "generator" / "model.json").exists():  # still distilling: extractors are cached now
            pending.append(task)
            continue
        rows = score_task(task_dir, operator, scorers, args.n_eval, n_teacher, args.seed)
        tasks.append({"task": task, "operator": operator.spec.model_dump(mode="json"),
                      "features": {n: {"id": s[0][0].id, "label": s[0][0].label} for n, s in scorers.items()},
                      "true_fd_features": next(iter(scorers.values()))[0][1].label,
                      "rows": rows, "seconds": round(time.perf_counter() - t),
                      "by_extractor": {n: by_group(rows, n) for n in names}})

    summary = {n: {g: {"tasks": len(gaps), "chosen_within_5pct": sum(x <= 0.05 for x in gaps),
                       "mean_gap": sum(gaps) / len(gaps) if gaps else None}
                   for g in ("checkpoint", "teacher")
                   for gaps in [[t["by_extractor"][n][g]["gap"] for t in tasks if g in t["by_extractor"][n]]]}
               for n in names}
    result = {
        "work": str(args.work),
        **settings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "date": datetime.date.today().isoformat(),
        "tasks": tasks,
        "pending": pending,
        "summary": summary,
    }
    if tasks:
        print(table(tasks, names))
    if pending:
        print(f"not scored (no data, or distillation unfinished): {', '.join(pending)}")
    if not args.publish:
        print(json.dumps(result))
        return result
    return emit("extractors", result)


if __name__ == "__main__":
    main()
