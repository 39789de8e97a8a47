"""Train a teacher for a few minutes on corrupted 32x32 Fashion-MNIST and write a sample grid.

    python -m benchmarks.teacher_smoke [--minutes 8] [--operator inpaint --p 0.6]

The dataset is corrupted from the bundled Debian Fashion-MNIST into the project's dataset
format, the teacher trains on the observations only, and the grid shows the truncated
teacher's samples (top rows) above observations (bottom rows). Last stdout line: one JSON
object with ``steps``, ``final_loss``, ``seconds`` and ``grid`` (also in
benchmarks/results/teacher_smoke.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR as RESULTS
from benchmarks.report import emit
from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.data.reader import open_dataset
from rsd_core.data.sources import corrupt, fashion_mnist
from rsd_core.stages import pretrain_stage, sampler_for
from rsd_core.viz import observations_for_display, save_grid


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget (default: 8)")
    parser.add_argument("--operator", default="inpaint", help="operator kind (default: inpaint)")
    parser.add_argument("--p", type=float, default=0.6, help="inpainting erasure probability (default: 0.6)")
    parser.add_argument("--limit", type=int, default=20_000, help="training images to corrupt (default: 20000)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--out", default="outputs/teacher_smoke", help="work folder (default: outputs/teacher_smoke)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    spec = {"kind": args.operator, **({"p": args.p} if args.operator == "inpaint" else {})}
    data_dir = out / "data"
    t0 = time.perf_counter()
    if not (data_dir / "manifest.json").exists():
        corrupt(fashion_mnist("train"), spec, seed=0, out_uri=str(data_dir), limit=args.limit)
    t_data = time.perf_counter() - t0

    train = TrainConfig(steps=100_000, batch_size=args.batch, lr=7e-4, lr_rampup_steps=200, checkpoint_every=500,
                        keep_checkpoints=1, ema_halflife_nimg=20_000, time_budget_s=args.minutes * 60)
    losses: list[float] = []
    teacher_dir, result = pretrain_stage(str(data_dir), NetworkConfig(), train, out,
                                         callback=lambda step, m: losses.append(m["loss"]))
    sampler = sampler_for(teacher_dir)
    samples = sampler.sample(32, seed=0)
    ds = open_dataset(str(data_dir))
    batch = next(ds.iter_batches(32))
    observed = observations_for_display(batch.observation, ds.operator, batch.state)
    grid = RESULTS / "teacher_smoke.png"
    save_grid(torch.cat([samples, observed]), grid, nrow=8)
    tail = losses[-100:]
    summary = {
        "steps": result.steps,
        "final_loss": sum(tail) / max(len(tail), 1),
        "seconds": result.seconds,
        "corrupt_seconds": t_data,
        "grid": str(grid),
        "teacher": str(teacher_dir),
        "sampler_nfe": sampler.nfe,
        "operator": spec,
        "images_per_second": result.steps * args.batch / result.seconds,
    }
    print(f"teacher: {result.steps} steps in {result.seconds:.0f} s, mean loss of the last 100 steps "
          f"{summary['final_loss']:.1f}; grid (samples above observations): {grid}")
    return emit("teacher_smoke", summary)


if __name__ == "__main__":
    main()
