"""Images per second of one teacher training step: fp32 eager against the default fast path.

Both paths run the real pretraining step (``PretrainPhase.step``: Ambient Diffusion loss,
backward, clipped Adam step) on the same model and batch, interleaved repetition by repetition
so that machine noise hits both alike. The achieved FLOP/s (forward + backward FLOPs counted by
``torch.utils.flop_counter``) is compared with a square matmul of the same dtype timed in the
same run.

    python -m benchmarks.train_throughput [--quick] [--compile]

Last stdout line: one JSON object (also written to benchmarks/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import emit
from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.train.loop import StepContext, cpu_supports_bf16, resolve_device, use_bf16
from rsd_core.train.networks import count_parameters
from rsd_core.train.pretrain import PretrainPhase, TensorSource, build_teacher

MODELS = {
    "cpu-default-32": (NetworkConfig(), 64),
    "unet-64": (
        NetworkConfig(img_resolution=64, img_channels=3, model_channels=64, channel_mult=(1, 2, 2, 2),
                      num_blocks=2, attn_resolutions=(16,)),
        8,
    ),
}


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


class Path_:
    """One way of running the step: precision, memory format, compilation."""

    def __init__(self, name: str, cfg: NetworkConfig, batch: int, device, bf16: bool, compiled: bool):
        torch.manual_seed(0)
        op = build_operator({"kind": "inpaint", "p": 0.6})
        self.objective = objective_for(op)
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        gen = torch.Generator().manual_seed(0)
        state = op.sample_state(4 * batch, shape, gen)
        y = op.observe(torch.rand(4 * batch, *shape) * 2 - 1, state, gen)
        net = build_teacher(cfg, self.objective).to(device)
        self.params = count_parameters(net)
        train = TrainConfig(batch_size=batch, precision="bf16" if bf16 else "fp32")
        self.phase = PretrainPhase(net, self.objective, TensorSource(y, state), train, {})
        if compiled:
            self.phase.net = torch.compile(net)
        self.ctx = StepContext(torch.Generator(device=device).manual_seed(0), device, bf16, False)
        self.name, self.batch, self.device = name, batch, device

    def run(self) -> float:
        t = time.perf_counter()
        self.phase.step(self.ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.phase.step(self.ctx)
        return counter.get_total_flops()


def bench_model(name, cfg, batch, device, reps, with_compile) -> dict:
    fast_bf16 = use_bf16("auto", device)
    paths = [Path_("fp32-eager", cfg, batch, device, False, False),
             Path_("default", cfg, batch, device, fast_bf16, False)]
    if with_compile:
        paths.append(Path_("default+compile", cfg, batch, device, fast_bf16, True))
    for p in paths:  # warm-up (and compilation)
        p.run()
        p.run()
    times = {p.name: [] for p in paths}
    for _ in range(reps):
        for p in paths:
            times[p.name].append(p.run())
    flops = paths[0].flops()
    row = {"model": name, "params": paths[0].params, "batch": batch, "flops_per_step": flops,
           "default_precision": "bf16" if fast_bf16 else "fp32"}
    for p in paths:
        med = statistics.median(times[p.name])
        row[f"{p.name}_s_per_step"] = med
        row[f"{p.name}_img_per_s"] = batch / med
        row[f"{p.name}_flops_per_s"] = flops / med
    row["speedup_vs_fp32_eager"] = row["fp32-eager_s_per_step"] / row["default_s_per_step"]
    if with_compile:
        row["compile_speedup_vs_default"] = row["default_s_per_step"] / row["default+compile_s_per_step"]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, default model only")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per path (default: 7)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compile on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    reps = 3 if args.quick else args.reps
    models = {"cpu-default-32": MODELS["cpu-default-32"]} if args.quick else MODELS
    rows = [bench_model(name, cfg, batch, device, reps if name == "cpu-default-32" else max(2, reps // 2),
                        args.compile) for name, (cfg, batch) in models.items()]
    fast_dtype = torch.bfloat16 if use_bf16("auto", device) else torch.float32
    peak = {"fp32": matmul_flops_per_s(torch.float32, device), "default": matmul_flops_per_s(fast_dtype, device)}

    print(f"device {device} ({platform.processor() or platform.machine()}), native bf16: {cpu_supports_bf16()}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"matmul 2048^2: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, default dtype {peak['default'] / 1e9:.1f} GFLOP/s")
    print(f"{'model':16} {'params':>9} {'batch':>5} {'fp32 img/s':>11} {'default img/s':>14} {'speedup':>8} "
          f"{'of matmul peak':>15}")
    for r in rows:
        r["fraction_of_matmul_peak"] = r["default_flops_per_s"] / peak["default"]
        print(f"{r['model']:16} {r['params']:>9} {r['batch']:>5} {r['fp32-eager_img_per_s']:>11.1f} "
              f"{r['default_img_per_s']:>14.1f} {r['speedup_vs_fp32_eager']:>7.2f}x "
              f"{r['fraction_of_matmul_peak']:>14.1%}")
    head = rows[0]
    result = {
        "speedup_vs_fp32_eager": head["speedup_vs_fp32_eager"],
        "fraction_of_matmul_peak": head["fraction_of_matmul_peak"],
        "device": str(device),
        "matmul_flops_per_s": peak,
        "rows": rows,
    }
    return emit("train_throughput", result)


if __name__ == "__main__":
    main()
