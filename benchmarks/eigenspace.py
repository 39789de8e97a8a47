"""Eigenspace recovery in the linear regime (the RSD paper's Theorem 1): does RSD find col(U) from corrupted data?

Clean x = U z in R^64 (rank 4, scales 3, 2, 1.5, 1) is seen only through random masks (80 % erased,
Ambient Diffusion teacher) or a fixed [0.2, 0.6, 0.2] blur with noise (Ambient Tweedie teacher).
A linear rank-4 generator is distilled by the unchanged RSD loop, once from the exact Gaussian
teacher ("analytic-teacher") and once from an MLP teacher pretrained on the corrupted data
("mlp-teacher"); PCA of the back-projected data and PCA of the teacher's own samples are the
baselines that should fail.

The fake score models the generator's distribution. With the analytic teacher it is the
learnable rank-4 Gaussian denoiser started at the teacher. With the MLP teacher it depends on the
objective (``mlp_fake``): for the Tweedie (blur) teacher a copy of the teacher, as in the image
pipeline, so that the teacher's own approximation errors cancel in teacher - fake; for the
Ambient (mask) teacher the Gaussian fake started at the generator, because a copy of a
mask-conditioned MLP cannot re-learn the moving generator's posterior fast enough and theta's scale
grows without rotating. ``--cross-fakes`` also runs the other choice, to show that each fails
where the other works (docs/benchmarks.md). Prints a table, then one JSON object as the last stdout line (also
written to benchmarks/results/eigenspace.json).

    python -m benchmarks.eigenspace            # ~9 minutes on one core (--cross-fakes: ~12)
    python -m benchmarks.eigenspace --quick    # smoke run, numbers meaningless
    python -m benchmarks.eigenspace --sweep    # analytic teacher, 36 subspaces x 2 corruptions: ~37 min on one core
                                               # (benchmarks/results/eigenspace_sweep.json; --sweep --quick: smoke)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import emit
from benchmarks.synthetic import (
    ANALYTIC_SCHEDULE,
    BLUR_TAPS,
    ILL_CONDITIONED_TAPS,
    SCALES,
    Corruption,
    GaussianDenoiser,
    LinearGenerator,
    Stage,
    blur_corruption,
    condition_number,
    distill_linear,
    low_rank_basis,
    mask_corruption,
    sample_clean,
    scaled_components,
    subspace_report,
    teacher_samples,
    train_mlp_teacher,
)

RESULTS = Path(__file__).parent / "results" / "eigenspace.json"
D, R = 64, 4


def _scaled(schedule: tuple[Stage, ...], steps: float, lr_fake: float = 1.0) -> tuple[Stage, ...]:
    """The schedule with every stage's steps times ``steps`` and fake lr times ``lr_fake``."""
    return tuple(Stage(max(1, round(s.steps * steps)), s.lr_generator, s.lr_fake * lr_fake) for s in schedule)


def _row(method: str, corruption: Corruption, theta: torch.Tensor, u: torch.Tensor, **extra) -> dict:
    report = subspace_report(theta, u)
    return {"method": method, "corruption": corruption.name, "sigma_n": corruption.sigma_n, **asdict(report), **extra}


def _distill(teacher, fake, corruption: Corruption, schedule, batch: int, seed: int) -> torch.Tensor:
    generator = LinearGenerator(D, R, seed=seed)
    return distill_linear(teacher, fake, generator, corruption.objective, schedule, batch, seed)


PROFILES = ("decreasing", "flat", "steep")
SWEEP_DS, SWEEP_RS = (16, 32, 64, 128), (2, 4, 8)
FAILURE_DEG = 5.0


def profile_scales(profile: str, r: int) -> tuple[float, ...]:
    """The r scales of a profile: ``decreasing`` interpolates (3, 2, 1.5, 1) (exactly it at r = 4),
    ``flat`` is all ones, ``steep`` is geometric from 3 down to 0.5."""
    t = [i / (r - 1) for i in range(r)] if r > 1 else [0.0]
    if profile == "decreasing":
        knots = [0.0, 1 / 3, 2 / 3, 1.0]
        return tuple(float(np.interp(ti, knots, SCALES)) for ti in t)
    if profile == "flat":
        return (1.0,) * r
    if profile == "steep":
        return tuple(3.0 * (0.5 / 3.0) ** ti for ti in t)
    raise ValueError(f"unknown profile {profile!r}")


def coherence(u: torch.Tensor) -> float:
    """max_i ||Q_i||^2 * d / r for an orthonormal basis Q of col(U): 1 when spread evenly, d / r when one
    coordinate carries a whole direction (what a random mask then almost never observes)."""
    q, _ = torch.linalg.qr(u.double())
    d, r = q.shape
    return float((q**2).sum(1).max() * d / r)


def analytic_run(d: int, r: int, scales, corruption_name: str, seed: int, schedule, batch: int = 256,
                 generator_seed: int | None = None, delta: float = 0.1, generator_scale: float = 0.25) -> dict:
    """One analytic-teacher distillation at (d, r, scales) on the subspace ``low_rank_basis(d, scales, seed)``."""
    torch.manual_seed(seed)
    u = low_rank_basis(d, scales, seed=seed)
    corruption = mask_corruption(u, p=0.8, delta=delta) if corruption_name == "mask" else blur_corruption(u, 0.3)
    t0 = time.perf_counter()
    teacher = GaussianDenoiser.from_covariance(corruption.teacher_covariance)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    generator = LinearGenerator(d, r, seed=seed if generator_seed is None else generator_seed, scale=generator_scale)
    theta = distill_linear(teacher, fake, generator, corruption.objective, schedule, batch, seed)
    report = subspace_report(theta, u)
    return {"d": d, "r": r, "scales": [round(s, 4) for s in scales], "corruption": corruption.name,
            "sigma_n": corruption.sigma_n, "seed": seed, **asdict(report), "coherence": coherence(u),
            "theta_norm": float(theta.norm()), "seconds": time.perf_counter() - t0}


def sweep_grid(quick: bool) -> list[tuple[int, int, str, int]]:
    """(d, r, profile, seed) per subspace: the full grid, one fresh seed each (quick: 2 small configs)."""
    if quick:
        return [(16, 2, "decreasing", 100), (32, 4, "flat", 101)]
    grid = [(d, r, prof) for d in SWEEP_DS for r in SWEEP_RS for prof in PROFILES]
    return [(d, r, prof, 100 + i) for i, (d, r, prof) in enumerate(grid)]


def sweep(args: argparse.Namespace) -> dict:
    """Analytic-teacher runs over random subspaces (d, r, scale profile), both corruptions."""
    step_scale = 0.01 if args.quick else args.sweep_steps
    schedule = _scaled(ANALYTIC_SCHEDULE, step_scale)
    partial = RESULTS.with_name("eigenspace_sweep.partial.jsonl")
    if not args.quick:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    rows = []
    for d, r, prof, seed in sweep_grid(args.quick):
        for name in ("mask", "blur"):
            row = analytic_run(d, r, profile_scales(prof, r), name, seed, schedule, args.batch, delta=args.delta,
                               generator_scale=args.generator_scale)
            row["profile"] = prof
            row["failed"] = row["max_angle_deg"] > FAILURE_DEG
            rows.append(row)
            if not args.quick:  # a killed sweep keeps what it measured
                with partial.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"d={d:4d} r={r} {prof:10s} {name:5s} seed={seed} angle={row['max_angle_deg']:7.2f} "
                  f"cov={row['covariance_error']:.3f} coh={row['coherence']:.2f} {row['seconds']:.0f}s", flush=True)
    worst = max(rows, key=lambda row: row["max_angle_deg"])
    return {
        "runs": len(rows),
        "subspaces": len(rows) // 2,
        "failures": sum(row["failed"] for row in rows),
        "failure_deg": FAILURE_DEG,
        "worst_deg": worst["max_angle_deg"],
        "worst": {k: worst[k] for k in ("d", "r", "profile", "corruption", "seed", "max_angle_deg",
                                         "covariance_error")},
        "settings": {"teacher": "analytic", "p": 0.8, "delta": args.delta, "blur_sigma_n": 0.3,
                     "blur_taps": list(BLUR_TAPS), "batch": args.batch, "alpha": 1.2,
                     "step_scale": step_scale, "generator_init_scale": args.generator_scale,
                     "schedule": [asdict(s) for s in schedule], "quick": args.quick},
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    u = low_rank_basis(D, seed=args.seed)
    step_scale = 0.05 if args.quick else 1.0
    n_data = 2_000 if args.quick else args.n
    analytic_schedule = _scaled(ANALYTIC_SCHEDULE, step_scale)
    # An MLP fake's weights move ~10x faster per Adam step than the covariance factor's entries matter.
    teacher_copy_schedule = _scaled(ANALYTIC_SCHEDULE, step_scale, lr_fake=0.1)
    mlp_steps = max(20, round(args.mlp_steps * step_scale))
    corruptions = [mask_corruption(u, p=0.8, delta=args.delta), blur_corruption(u, 0.3), blur_corruption(u, 0.1)]
    rows, seconds = [], {}
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    for corruption in corruptions:
        key = f"{corruption.name}@{corruption.sigma_n}"
        x = sample_clean(u, n_data, data_gen)
        y, state = corruption.observe(x, data_gen)
        rows.append(_row("pca-baseline", corruption, scaled_components(corruption.backproject(y), R), u))

        t0 = time.perf_counter()
        teacher = GaussianDenoiser.from_covariance(corruption.teacher_covariance)
        fake = copy.deepcopy(teacher).requires_grad_(True)
        theta = _distill(teacher, fake, corruption, analytic_schedule, args.batch, args.seed)
        seconds[f"analytic-teacher {key}"] = time.perf_counter() - t0
        rows.append(_row("analytic-teacher", corruption, theta, u))
        samples = _teacher_samples(teacher, corruption, args)
        rows.append(_row("teacher-samples", corruption, scaled_components(samples, R), u, teacher="analytic"))

        if corruption.sigma_n == 0.1 and not args.mlp_all:
            continue  # the MLP runs cost ~2 min each; sigma_n = 0.1 is covered by the analytic teacher
        t0 = time.perf_counter()
        mlp = train_mlp_teacher(corruption, y, state, mlp_steps, seed=args.seed)
        seconds[f"mlp pretrain {key}"] = time.perf_counter() - t0
        rows.append(_row("teacher-samples", corruption, scaled_components(_teacher_samples(mlp, corruption, args), R),
                         u, teacher="mlp"))
        t0 = time.perf_counter()
        chosen = mlp_fake(corruption)
        for kind in [chosen, *([k for k in FAKES if k != chosen] if args.cross_fakes else [])]:
            fake = _generator_fake(args.seed) if kind == "gaussian" else copy.deepcopy(mlp).requires_grad_(True)
            schedule = analytic_schedule if kind == "gaussian" else teacher_copy_schedule
            t0 = time.perf_counter()
            theta = _distill(mlp, fake, corruption, schedule, args.batch, args.seed)
            seconds[f"mlp-teacher {kind} fake distill {key}"] = time.perf_counter() - t0
            rows.append(_row("mlp-teacher", corruption, theta, u, fake=kind, chosen_fake=kind == chosen,
                             teacher_steps=mlp_steps, n_data=n_data))

    # The ill-conditioned blur (condition ~1,700): a short run, to show how much slower it converges.
    ill = blur_corruption(u, 0.3, ILL_CONDITIONED_TAPS)
    teacher = GaussianDenoiser.from_covariance(ill.teacher_covariance)
    t0 = time.perf_counter()
    fake = copy.deepcopy(teacher).requires_grad_(True)
    theta = _distill(teacher, fake, ill, analytic_schedule, args.batch, args.seed)
    seconds["analytic-teacher ill-conditioned blur"] = time.perf_counter() - t0
    ill_row = _row("analytic-teacher", ill, theta, u, taps=list(ILL_CONDITIONED_TAPS),
                   condition_number=condition_number(ill.operator.matrix))
    return {
        "rows": rows,
        "ill_conditioned": ill_row,
        "settings": {
            "d": D, "r": R, "scales": [3.0, 2.0, 1.5, 1.0], "p": 0.8, "delta": args.delta,
            "blur_taps": [0.2, 0.6, 0.2],
            "blur_condition_number": condition_number(corruptions[1].operator.matrix),
            "batch": args.batch, "alpha": 1.2, "t_max": 800, "loss_scaling_g": 100, "seed": args.seed,
            "analytic_schedule": [asdict(s) for s in analytic_schedule],
            "teacher_copy_schedule": [asdict(s) for s in teacher_copy_schedule],
            "fake": "analytic teacher: learnable Gaussian started at the teacher; MLP teacher: " +
                    ", ".join(f"{c} -> {mlp_fake(corr)}" for c, corr in (("mask", corruptions[0]),
                                                                        ("blur", corruptions[1]))),
            "cross_fakes": args.cross_fakes,
            "n_data": n_data, "mlp_teacher_steps": mlp_steps, "mlp": {"hidden": 256, "depth": 3},
            "teacher_sample_count": args.samples, "quick": args.quick,
            "reported_theta": "generator EMA after the last stage",
            "seconds": seconds,
        },
    }


FAKES = ("gaussian", "teacher-copy")


def mlp_fake(corruption: Corruption) -> str:
    """Which fake distils the MLP teacher: a copy of it (errors cancel), unless it is mask-conditioned."""
    return "gaussian" if corruption.name == "mask" else "teacher-copy"


def _generator_fake(seed: int) -> GaussianDenoiser:
    """The exact fake of the generator at its start: N(0, theta_0 theta_0^T), learnable."""
    return GaussianDenoiser(LinearGenerator(D, R, seed=seed).theta.detach(), learnable=True)


def _teacher_samples(net, corruption: Corruption, args: argparse.Namespace) -> torch.Tensor:
    return teacher_samples(net, corruption, 500 if args.quick else args.samples, seed=args.seed)


def _table(result: dict) -> str:
    header = ("method", "corruption", "sigma_n", "teacher", "fake", "angle", "proj", "cov")
    lines = ["{:18s} {:10s} {:>7s} {:>8s} {:>12s} {:>7s} {:>6s} {:>6s}".format(*header)]
    for row in [*result["rows"], result["ill_conditioned"]]:
        name = row["corruption"] + (" (ill)" if "taps" in row else "")
        lines.append(
            f"{row['method']:18s} {name:10s} {row['sigma_n']:7.2f} {row.get('teacher', ''):>8s} "
            f"{row.get('fake', ''):>12s} {row['max_angle_deg']:7.2f} {row['projection_distance']:6.3f} "
            f"{row['covariance_error']:6.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5%% of the steps, 2k data points")
    parser.add_argument("--batch", type=int, default=256, help="distillation batch size")
    parser.add_argument("--n", type=int, default=30_000, help="corrupted observations for the MLP teacher and PCA")
    parser.add_argument("--mlp-steps", type=int, default=12_000, help="MLP teacher pretraining steps")
    parser.add_argument("--mlp-all", action="store_true", help="also run the MLP teacher at sigma_n = 0.1")
    parser.add_argument("--cross-fakes", action="store_true",
                        help="also distil each MLP teacher with the other fake (it fails there)")
    parser.add_argument("--delta", type=float, default=0.1, help="Ambient Diffusion further-corruption probability")
    parser.add_argument("--samples", type=int, default=4_000, help="teacher samples for the teacher-samples baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sweep", action="store_true",
                        help="analytic teacher only, over random subspaces of a (d, r, scale profile) grid")
    parser.add_argument("--sweep-steps", type=float, default=0.5,
                        help="--sweep: step multiplier of the analytic schedule")
    parser.add_argument("--generator-scale", type=float, default=0.05,
                        help="--sweep: std of the generator's initial entries (the main run uses 0.25)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.sweep:
        result = sweep(args)
        result["total_seconds"] = time.perf_counter() - t0
        print(f"{result['runs']} runs, {result['failures']} failures (> {FAILURE_DEG} deg), worst "
              f"{result['worst_deg']:.2f} deg, total {result['total_seconds']:.0f} s")
        if args.quick:
            print(json.dumps({"sweep": result}))
        else:
            emit("eigenspace_sweep", {"sweep": result})
        return
    result = run(args)
    result["settings"]["total_seconds"] = time.perf_counter() - t0
    print(_table(result))
    print(f"total {result['settings']['total_seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
