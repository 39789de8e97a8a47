"""The training loop that teacher pretraining and distillation share.

A *phase* owns its networks, optimisers and the math of one step; the :class:`Trainer` owns
everything around it: device and precision, seeding and the RNG stream, lr ramp-up, EMAs (rsd_core.train.ema),
gradient clipping and the non-finite guard (through :meth:`StepContext.optimizer_step`),
checkpoints (safetensors + JSON, atomic) with exact resume, progress reports (rsd_core.train.progress), a time budget,
and a metrics callback (no tracking library is imported here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from rsd_core.config import LoopConfig
from rsd_core.train.ema import add_power_emas, ema_beta, ema_update
from rsd_core.train.posthoc_ema import SNAPSHOT_DIR, power_ema_beta, save_snapshot
from rsd_core.train.progress import TrainingProgress

MetricsCallback = Callable[[int, dict[str, float]], None]
# Called on rank 0 with the checkpoints folder after each save (e.g. to copy it off the machine).
CheckpointCallback = Callable[[Path], None]


class TrainingDivergedError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last checkpoint stays intact."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> None:
    """Join the process group a launcher (torchrun, Flyte's Elastic) describes in the environment.

    No-op for a single process or an already initialised group. NCCL where CUDA is present, gloo
    otherwise; each process binds to its LOCAL_RANK GPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 (avx512_bf16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve the ``precision`` setting: bf16 autocast by default wherever the hardware has it."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


@dataclass
class StepContext:
    """What a phase's step may use: the RNG stream, the device, precision and the guarded step."""

    rng: torch.Generator
    device: torch.device
    bf16: bool
    channels_last: bool
    skipped: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def optimizer_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: float | None
    ) -> float:
        """Backward, then step unless the loss or the gradient is non-finite (then skip and flag).

        Under torch.distributed the gradients are averaged over ranks and every rank takes the
        same decision (a non-finite loss anywhere skips the step everywhere), so replicas never
        drift apart. Returns the gradient norm before clipping (NaN when skipped).
        """
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        _, world_size = world()
        if world_size > 1:
            flag = torch.tensor([0.0 if finite else 1.0], device=loss.device)
            dist.all_reduce(flag)
            finite = flag.item() == 0
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped = True
            return float("nan")
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            self.skipped = True
            return float("nan")
        optimizer.step()
        return float(norm)


class Phase:
    """One kind of training (pretraining, distillation). Subclasses fill in the fields and ``step``."""

    name: str = "phase"
    batch_size: int
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    ema_pairs: list[tuple[nn.Module, nn.Module]]
    config: dict

    def step(self, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def resume(self, step: int) -> None:
        """Called once before the first step with the step the run starts from (0 for a new run), so a
        phase whose data stream has a position can continue exactly where the checkpoint left it."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    metrics: dict[str, float]
    nonfinite_skipped: int
    checkpoints: list[str] = field(default_factory=list)
    stopped_by_budget: bool = False


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, phase: Phase, step: int, gen: torch.Generator, extra: dict) -> None:
    """Write ``path`` atomically: a temporary folder renamed into place once complete."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in phase.modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().cpu().contiguous()
    optim_meta = {}
    for name, opt in phase.optimizers.items():
        t, m = _flatten_optimizer(f"optim.{name}", opt)
        tensors.update(t)
        optim_meta[name] = m
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    tensors["rng.generator"] = gen.get_state().cpu()
    if torch.cuda.is_available():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "phase": phase.name, "config": phase.config, "optimizers": optim_meta, **extra}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "weights.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_checkpoint(path: Path, phase: Phase, gen: torch.Generator | None) -> dict:
    """Restore modules, optimisers and RNG from ``path``; returns its metadata."""
    weights, meta_file = path / "weights.safetensors", path / "meta.json"
    if not weights.exists() or not meta_file.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (needs weights.safetensors and meta.json)")
    tensors = load_file(str(weights))
    meta = json.loads(meta_file.read_text())
    for name, module in phase.modules.items():
        prefix = f"module.{name}."
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sd)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: module '{name}' does not match: {err}") from None
    for name, opt in phase.optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(f"optim.{name}", tensors, meta["optimizers"][name]))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if gen is not None:
        gen.set_state(tensors["rng.generator"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return meta


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-NNNNNNN`` folders), oldest first.

    A folder counts once its ``meta.json`` exists: it is written last, locally (inside the
    temporary folder that is then renamed) and when a copy is uploaded or restored.
    """
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if (p / "meta.json").is_file() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_module_weights(path: Path, name: str, module: nn.Module) -> nn.Module:
    """Load one module (e.g. ``ema``) from a checkpoint folder or a bare safetensors file."""
    file = path / "weights.safetensors" if path.is_dir() else path
    tensors = load_file(str(file))
    prefix = f"module.{name}."
    sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{file} holds no module named '{name}'")
    module.load_state_dict(sd)
    return module


class Trainer:
    """Runs a :class:`Phase` for ``cfg.steps`` steps, resuming from ``out_dir`` when it holds checkpoints."""

    def __init__(
        self,
        phase: Phase,
        cfg: LoopConfig,
        out_dir: str | Path | None = None,
        *,
        callback: MetricsCallback | None = None,
        progress: bool = True,
        on_checkpoint: CheckpointCallback | None = None,
    ):
        self.phase = phase
        self.on_checkpoint = on_checkpoint
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callback = callback
        self.progress = progress
        self.power_emas = add_power_emas(phase.modules, phase.ema_pairs, cfg.power_ema_sigma_rels)
        init_distributed_from_env()
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        for module in [*phase.modules.values(), *getattr(phase, "frozen_modules", {}).values()]:
            module.to(self.device)
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
        for opt in phase.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        self.rank, self.world_size = world()
        if cfg.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (global) must be divisible by the world size {self.world_size}"
            )
        phase.batch_size = cfg.batch_size // self.world_size  # cfg.batch_size is the global batch

    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    def _set_lr(self, step: int) -> None:
        ramp = min(1.0, (step + 1) / self.cfg.lr_rampup_steps) if self.cfg.lr_rampup_steps > 0 else 1.0
        for opt in self.phase.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * ramp * self.lr_scale

    def _progress(self, done: int, elapsed: float) -> float:
        """Fraction of the run done: of the steps, or of the time budget when that ends the run first."""
        by_time = elapsed / self.cfg.time_budget_s if self.cfg.time_budget_s else 0.0
        return max(done / self.cfg.steps, by_time)

    def _save(self, step: int, result: TrainResult, metrics: dict) -> None:
        if self.checkpoint_dir is None:
            return
        path = self.checkpoint_dir / f"step-{step:07d}"
        if self.rank != 0:  # replicas are identical: one writer, the others wait for it
            dist.barrier()
            result.checkpoints.append(str(path))
            return
        extra = {"metrics": metrics, "nonfinite_skipped": result.nonfinite_skipped, "lr_scale": self.lr_scale}
        if self.power_emas:  # before the checkpoint: a run resumed from it has every snapshot up to its step
            save_snapshot(self.out_dir / SNAPSHOT_DIR, step, {n: m for n, (_, m, _) in self.power_emas.items()})
        save_checkpoint(path, self.phase, step, self.rng, extra)
        result.checkpoints.append(str(path))
        if self.cfg.keep_checkpoints > 0:
            for old in list_checkpoints(self.checkpoint_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint_dir)
        if self.world_size > 1:
            dist.barrier()

    def run(self) -> TrainResult:
        cfg = self.cfg
        # Each rank draws its own data and noise; rank 0's stream is the single-process stream.
        seed = cfg.seed + 1_000_003 * self.rank
        torch.manual_seed(seed)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        start_step, result = 0, TrainResult(0, 0.0, {}, 0)
        self.lr_scale = 1.0  # becomes cfg.lr_drop_factor once; checkpoints keep it across resumes
        existing = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        if existing:
            meta = load_checkpoint(existing[-1], self.phase, self.rng if self.rank == 0 else None)
            start_step = int(meta["step"])
            if self.rank != 0:  # checkpoints hold rank 0's RNG; other ranks re-derive theirs
                self.rng.manual_seed(seed + start_step)
                torch.manual_seed(seed + start_step)
            result.nonfinite_skipped = int(meta.get("nonfinite_skipped", 0))
            self.lr_scale = float(meta.get("lr_scale", 1.0))
            result.checkpoints = [str(p) for p in existing]
        self.phase.resume(start_step)
        ctx = StepContext(self.rng, self.device, self.bf16, self.channels_last)
        in_row, metrics = 0, {}
        t0 = time.perf_counter()
        report = TrainingProgress(self.phase.name, start_step, cfg.steps, cfg.batch_size, cfg.time_budget_s,
                                  enabled=self.progress and self.rank == 0)
        emas = {id(e) for _, e in self.phase.ema_pairs} | {id(e) for _, e, _ in self.power_emas.values()}
        for module in self.phase.modules.values():
            module.train(id(module) not in emas)
        done = start_step
        for step in range(start_step, cfg.steps):
            self._set_lr(step)
            ctx.skipped = False
            metrics = self.phase.step(ctx)
            if ctx.skipped:
                in_row += 1
                result.nonfinite_skipped += 1
                if in_row >= cfg.max_nonfinite_in_row:
                    report.close()
                    last = list_checkpoints(self.checkpoint_dir)[-1:] if self.checkpoint_dir else []
                    raise TrainingDivergedError(
                        f"{self.phase.name}: {in_row} non-finite steps in a row at step {step}; "
                        f"stopped. Last good checkpoint: {last[0] if last else 'none'}"
                    )
            else:
                in_row = 0
                seen = (step + 1) * cfg.batch_size
                beta = ema_beta(cfg.batch_size, seen, cfg.ema_halflife_nimg, cfg.ema_rampup_ratio)
                for net, ema in self.phase.ema_pairs:
                    ema_update(ema, net, beta)
                for net, power, gamma in self.power_emas.values():  # t counts steps, skipped ones included
                    ema_update(power, net, power_ema_beta(step + 1, gamma))
            metrics = {**metrics, "nonfinite_skipped": float(result.nonfinite_skipped), "lr_scale": self.lr_scale}
            if self.callback is not None and self.rank == 0:
                self.callback(step + 1, metrics)
            done = step + 1
            elapsed = time.perf_counter() - t0
            over_budget = cfg.time_budget_s is not None and elapsed > cfg.time_budget_s
            if cfg.lr_drop_at is not None and self.lr_scale == 1.0:
                drop = self._progress(done, elapsed) >= cfg.lr_drop_at
                if self.world_size > 1 and cfg.time_budget_s is not None:  # the time test differs per rank
                    flag = torch.tensor([float(drop)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    drop = bool(flag.item())
                if drop:
                    self.lr_scale = cfg.lr_drop_factor
            if self.world_size > 1 and cfg.time_budget_s is not None:  # all ranks stop at the same step
                flag = torch.tensor([float(over_budget)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over_budget = bool(flag.item())
            report.update(done, metrics, last=done == cfg.steps or over_budget)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or over_budget:
                self._save(done, result, metrics)
            if over_budget:
                result.stopped_by_budget = True
                break
        report.close()
        result.steps = done
        result.seconds = time.perf_counter() - t0
        result.metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        return result
