"""Sampling speed: one-step generation against the 35-NFE Heun teacher and the truncated teacher.

Same network (the default CPU U-Net, Ambient inpainting conditioning), same batch, same
precision, warm-up first, then repetitions interleaved across the three samplers so that
machine noise hits all alike. Untrained weights suffice: speed does not depend on them.

    python -m benchmarks.sampling_speed [--batch 64] [--reps 3] [--device cpu|cuda]

Last stdout line: one JSON object (also written to benchmarks/results/sampling_speed.json).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import emit
from rsd_core.config import NetworkConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.train.loop import resolve_device, use_bf16
from rsd_core.train.pretrain import build_teacher
from rsd_core.train.sampling import OneStepSampler, TeacherSampler


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per call (default: 64)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (default: 3)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    bf16 = use_bf16("auto", device)
    torch.manual_seed(0)
    objective = objective_for(build_operator({"kind": "inpaint", "p": 0.6}))
    cfg = NetworkConfig()
    net = build_teacher(cfg, objective).to(device).eval()
    shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    samplers = {
        "one-step": OneStepSampler(net, objective, shape, bf16=bf16),
        "heun-35": TeacherSampler(net, objective, shape, bf16=bf16),
        "truncated": TeacherSampler(net, objective, shape, sigma_stop=0.05, bf16=bf16),
    }

    def timed(sampler) -> float:
        t = time.perf_counter()
        sampler.sample(args.batch, seed=0, batch_size=args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for s in samplers.values():
        timed(s)
    times = {name: [] for name in samplers}
    for _ in range(args.reps):
        for name, s in samplers.items():
            times[name].append(timed(s))
    ips = {name: args.batch / statistics.median(t) for name, t in times.items()}
    result = {
        "device": str(device),
        "batch": args.batch,
        "precision": "bf16" if bf16 else "fp32",
        "nfe": {name: s.nfe for name, s in samplers.items()},
        "images_per_second": ips,
        "speedup_vs_heun35": ips["one-step"] / ips["heun-35"],
        "speedup_vs_truncated": ips["one-step"] / ips["truncated"],
    }
    print(f"{'sampler':10} {'NFE':>4} {'img/s':>9}   (batch {args.batch}, {device}, {result['precision']})")
    for name in samplers:
        print(f"{name:10} {samplers[name].nfe:>4} {ips[name]:>9.1f}")
    print(f"one-step is {result['speedup_vs_heun35']:.1f}x faster than Heun-35 and "
          f"{result['speedup_vs_truncated']:.1f}x faster than the truncated teacher")
    return emit("sampling_speed", result)


if __name__ == "__main__":
    main()
