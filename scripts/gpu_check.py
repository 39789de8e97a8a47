"""GPU path check: pretraining, distillation and DDP at 64x64x3 in bf16 on whatever CUDA GPUs are here.

    python scripts/gpu_check.py                       # all phases on every visible GPU
    python scripts/gpu_check.py --device cpu --steps 2  # the same code path, tiny, on CPU (CI-safe)
    python scripts/gpu_check.py --dry-run              # check packages and imports only

Needs only: torch (a CUDA build), numpy, pydantic, safetensors, tqdm -- the GPU machine need
not hold the pipeline's requirements (flytekit, mlflow, pyarrow...), so this imports nothing
from rsd_core beyond config/operators/objectives/networks/sampling/training/pretrain/distill,
and verifies in a fresh interpreter that those pull in nothing heavier.

Prints images/s per phase (steady state, after warm-up steps) and the model FLOPs utilisation:
FLOPs of one training step counted by ``torch.utils.flop_counter`` (matmuls and convolutions,
forward + backward), times steps/s, over the GPU's dense bf16 peak (from a table by device
name; otherwise measured with a large bf16 matmul, which understates the datasheet peak).
Last stdout line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("torch", "numpy", "pydantic", "safetensors", "tqdm")
LIGHT_MODULES = ("rsd_core.config", "rsd_core.operators", "rsd_core.train.objectives", "rsd_core.train.networks",
                 "rsd_core.train.sampling", "rsd_core.train.loop", "rsd_core.train.pretrain", "rsd_core.train.distill")
# What the GPU machine may lack: none of these may be imported by the modules above.
HEAVY = ("pyarrow", "pandas", "fsspec", "s3fs", "mlflow", "flytekit", "PIL", "yaml", "scipy", "sklearn", "nibabel",
         "nilearn", "onnx", "onnxruntime", "boto3", "botocore", "matplotlib")
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12))
INPAINT = {"kind": "inpaint", "p": 0.6, "delta": 0.1}


def check_packages() -> list[str]:
    """Names in REQUIRED that this interpreter cannot import."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def check_light_imports() -> list[str]:
    """Heavy modules the training modules import, checked in a fresh interpreter (this one may
    have imported anything)."""
    code = ("import sys, json\n" + "".join(f"import {m}\n" for m in LIGHT_MODULES)
            + "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"error: importing rsd_core's training modules failed:\n{out.stderr.strip()[-2000:]}")
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    return sorted(loaded & set(HEAVY))


def peak_flops(device) -> tuple[float, str]:
    """(dense bf16 FLOP/s, where the number comes from) for ``device``."""
    import torch

    if device.type != "cuda":
        return measured_matmul_peak(device, 1024, torch.float32), "measured fp32 matmul (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK:
        if key in name:
            return value, f"datasheet dense bf16 for {key}"
    return measured_matmul_peak(device, 8192, torch.bfloat16), f"measured 8192^3 bf16 matmul on {name}"


def measured_matmul_peak(device, n: int, dtype) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_config(small: bool):
    """The celeba64 preset's U-Net (num_blocks 2 to keep the check short); a toy one for CPU runs."""
    from rsd_core.config import NetworkConfig

    if small:
        return NetworkConfig(img_resolution=64, img_channels=3, model_channels=8, channel_mult=(1, 2, 2, 2),
                             num_blocks=1, attn_resolutions=())
    return NetworkConfig(img_resolution=64, img_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                         num_blocks=2, attn_resolutions=(16,))


def synthetic_source(n: int, device, seed: int = 0):
    """``n`` smooth random 3x64x64 images in [-1, 1], inpainted, held on ``device`` (no data
    loading in the timed loop: this measures the model, not the input pipeline)."""
    import torch
    import torch.nn.functional as F

    from rsd_core.kinds import build_operator
    from rsd_core.train.pretrain import TensorSource

    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 8, 8, generator=gen), size=64, mode="bilinear", align_corners=False)
    x = torch.tanh(x)
    op = build_operator(INPAINT)
    state = op.sample_state(n, (3, 64, 64), gen)
    y = op.observe(x, state, gen)
    return TensorSource(y.to(device), {k: v.to(device) for k, v in state.items()})


class StepClock:
    """A metrics callback that timestamps every step (the phase's float(loss) already syncs)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.times.append(time.perf_counter())

    def steps_per_s(self, warmup: int) -> float:
        t = self.times[min(warmup, len(self.times) - 2):]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan")


def step_flops(phase, device, bf16: bool) -> float:
    """FLOPs of one training step of ``phase`` (on a deep copy, so training is not disturbed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rsd_core.train.loop import StepContext

    clone = copy.deepcopy(phase)
    ctx = StepContext(torch.Generator(device=device).manual_seed(1), device, bf16, device.type == "cuda")
    with FlopCounterMode(display=False) as counter:
        clone.step(ctx)
    return float(counter.get_total_flops())


def train_config(args, steps: int, batch: int, teacher: bool = True):
    """The loop settings; the teacher's optimiser settings only for pretraining (distillation has its own)."""
    from rsd_core.config import TrainConfig

    optimiser = {"lr": 2e-4} if teacher else {}
    return TrainConfig(steps=steps, batch_size=batch, lr_rampup_steps=min(50, steps), grad_clip=1.0,
                       ema_halflife_nimg=50_000.0, checkpoint_every=steps, precision="bf16" if args.bf16 else "fp32",
                       device=args.device, seed=0, **optimiser)


def phase_report(name: str, clock: StepClock, batch: int, flops: float, peak: float, warmup: int) -> dict:
    sps = clock.steps_per_s(warmup)
    return {"phase": name, "steps": len(clock.times), "batch": batch, "images_per_s": sps * batch,
            "step_tflops": flops / 1e12, "achieved_tflops_per_s": flops * sps / 1e12, "mfu": flops * sps / peak}


def run_single(args, device, peak: float, out: Path) -> tuple[list[dict], object, object]:
    """Pretrain, then distil, on one device; returns the reports, the teacher and its objective."""
    from rsd_core.config import DistillConfig
    from rsd_core.kinds import build_operator, objective_for
    from rsd_core.train.distill import distill
    from rsd_core.train.pretrain import build_teacher, pretrain_teacher

    small = device.type != "cuda"
    objective = objective_for(build_operator(INPAINT))
    source = synthetic_source(max(4 * args.batch, 64), device)
    import torch

    torch.manual_seed(0)
    net = build_teacher(network_config(small), objective)
    params = sum(p.numel() for p in net.parameters())
    print(f"network: {params / 1e6:.2f} M parameters, images 3x64x64, operator {INPAINT}", flush=True)
    reports = []
    clock = StepClock()
    phase, result = pretrain_teacher(net, objective, source, train_config(args, args.steps, args.batch), out / "pre",
                                     callback=clock, progress=False)
    reports.append(phase_report("pretrain", clock, args.batch, step_flops(phase, device, args.bf16), peak,
                                args.warmup))
    print(_line(reports[-1]), flush=True)

    clock = StepClock()
    dcfg = DistillConfig(lr_fake=1e-5, lr_generator=1e-5)
    loop = train_config(args, args.distill_steps, args.batch, teacher=False)
    dphase, _ = distill(phase.ema, objective, (3, 64, 64), loop, dcfg, out / "distill", callback=clock, progress=False)
    reports.append(phase_report("distill", clock, args.batch, step_flops(dphase, device, args.bf16), peak,
                                args.warmup))
    print(_line(reports[-1]), flush=True)
    return reports, phase, result


def _line(r: dict) -> str:
    return (f"{r['phase']:<9} {r['steps']:>4} steps x {r['batch']:>4} images: {r['images_per_s']:>9.1f} images/s, "
            f"{r['step_tflops']:.3f} TFLOP/step, {r['achieved_tflops_per_s']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}%")


def _ddp_worker(rank: int, world: int, args_dict: dict, rendezvous: str, result_file: str, peak: float) -> None:
    """One rank of the DDP check: same pretraining code, gradients all-reduced by the Trainer."""
    import torch
    import torch.distributed as dist

    args = argparse.Namespace(**args_dict)
    cuda = args.device != "cpu"
    if cuda:
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        from rsd_core.kinds import build_operator, objective_for
        from rsd_core.train.pretrain import build_teacher, pretrain_teacher

        device = torch.device(args.device)
        objective = objective_for(build_operator(INPAINT))
        source = synthetic_source(max(4 * args.batch, 64), device, seed=rank)
        torch.manual_seed(0)
        net = build_teacher(network_config(not cuda), objective)
        clock = StepClock()
        global_batch = args.batch * world
        phase, _ = pretrain_teacher(net, objective, source, train_config(args, args.ddp_steps, global_batch),
                                    Path(args.out) / "ddp", callback=clock if rank == 0 else None, progress=False)
        flops = step_flops(phase, device, args.bf16) * world  # every rank: the step's all-reduces are collective
        flat = torch.cat([p.detach().flatten() for p in phase.net.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        in_sync = all(torch.equal(gathered[0], g) for g in gathered)
        if rank == 0:
            report = phase_report(f"ddp x{world}", clock, global_batch, flops, peak * world, args.warmup)
            report.update(world_size=world, backend=dist.get_backend(), replicas_in_sync=in_sync)
            Path(result_file).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def run_ddp(args, peak: float, out: Path) -> dict:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if args.device != "cpu" else 2
    rendezvous, result = out / "rdzv", out / "ddp.json"
    args_dict = {**vars(args), "out": str(out)}
    mp.spawn(_ddp_worker, args=(world, args_dict, str(rendezvous), str(result), peak), nprocs=world, join=True)
    report = json.loads(result.read_text())
    print(_line(report) + f"  ({report['backend']}, replicas in sync: {report['replicas_in_sync']})", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (all visible GPUs for DDP) or cpu (a tiny smoke run)")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default: --steps)")
    parser.add_argument("--ddp-steps", type=int, default=None, help="DDP pretraining steps (default: --steps / 3)")
    parser.add_argument("--batch", type=int, default=None, help="images per GPU per step (default 64; CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the images/s (default 20)")
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    parser.add_argument("--skip-ddp", action="store_true", help="leave out the DDP phase")
    parser.add_argument("--dry-run", action="store_true", help="check packages, imports and the device; no training")
    parser.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.distill_steps = args.distill_steps or args.steps
    args.ddp_steps = args.ddp_steps or max(args.steps // 3, 2)
    args.batch = args.batch or (2 if cpu else 64)
    args.warmup = args.warmup if args.warmup is not None else (0 if cpu else 20)

    print(f"gpu_check needs: {', '.join(REQUIRED)} (nothing else; flytekit, mlflow, pyarrow are not used)")
    missing = check_packages()
    if missing:
        print(f"error: missing packages {missing}: pip install --user {' '.join(missing)} "
              "(scripts/gpu_check.sh does this)", file=sys.stderr)
        return 2
    heavy = check_light_imports()
    if heavy:
        print(f"error: rsd_core's training modules import {heavy}; they must need only {REQUIRED}", file=sys.stderr)
        return 2
    print(f"imports ok: {', '.join(LIGHT_MODULES)} load without {', '.join(HEAVY[:6])}, ...")
    sys.path.insert(0, str(ROOT))
    import torch

    if not cpu and not torch.cuda.is_available():
        print(f"error: no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run on a GPU machine, or use --device cpu for the smoke path", file=sys.stderr)
        return 3
    device = torch.device("cpu" if cpu else "cuda:0")
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"devices: {names}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 {'autocast' if args.bf16 else 'off'}")
    if args.dry_run:
        print("dry run: packages, imports and device checked; no training")
        return 0
    peak, peak_source = peak_flops(device)
    print(f"peak: {peak / 1e12:.3g} TFLOP/s per device ({peak_source})", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rsd-gpu-check-") as tmp:
        reports, _, _ = run_single(args, device, peak, Path(tmp))
        if not args.skip_ddp:
            reports.append(run_ddp(args, peak, Path(tmp)))
    result = {"device": str(device) if cpu else torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "bf16": args.bf16, "peak_tflops": peak / 1e12, "peak_source": peak_source,
              "phases": reports, "seconds": time.perf_counter() - t0}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
