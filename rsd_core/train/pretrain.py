"""Stage I: teacher pretraining on corrupted observations with the corruption-aware objective."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.operators import State
from rsd_core.train.ema import make_ema
from rsd_core.train.loop import CheckpointCallback, MetricsCallback, Phase, StepContext, Trainer, TrainResult
from rsd_core.train.networks import EDMPrecond, build_unet
from rsd_core.train.objectives import Objective


class BatchSource(Protocol):
    """Where observations come from: ``next_batch`` draws a batch (using the trainer's RNG if it
    samples); ``seek(n)`` continues after ``n`` batches (a resumed run). In memory:
    :class:`TensorSource`; streamed from a dataset's shards: :class:`rsd_core.data.streaming.StreamSource`."""

    def next_batch(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, State]: ...

    def seek(self, batches_done: int) -> None: ...


@dataclass
class TensorSource:
    """Observations and their per-sample operator state held in memory, sampled with replacement."""

    observations: torch.Tensor
    state: State

    def __post_init__(self):
        if len(self.observations) == 0:
            raise ValueError("TensorSource: no observations")
        for key, value in self.state.items():
            if len(value) != len(self.observations):
                raise ValueError(
                    f"TensorSource: state '{key}' has {len(value)} rows, observations {len(self.observations)}"
                )

    def next_batch(self, batch_size, rng):
        idx = torch.randint(len(self.observations), (batch_size,), generator=rng, device=rng.device)
        idx = idx.cpu()
        return self.observations[idx], {k: v[idx] for k, v in self.state.items()}

    def seek(self, batches_done: int) -> None:
        """Nothing to do: draws come from the trainer's RNG, which checkpoints restore."""


class PretrainPhase(Phase):
    """One network trained with ``objective`` on batches from ``source``, with an EMA copy."""

    name = "pretrain"

    def __init__(self, net: EDMPrecond, objective: Objective, source: BatchSource, cfg: TrainConfig, config: dict):
        self.net = net
        self.ema = make_ema(net)
        self.objective = objective
        self.source = source
        self.batch_size = cfg.batch_size
        self.clip = cfg.grad_clip
        self.opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        self.modules = {"net": net, "ema": self.ema}
        self.optimizers = {"net": self.opt}
        self.ema_pairs = [(net, self.ema)]
        self.config = config

    def resume(self, step: int) -> None:
        self.source.seek(step)

    def step(self, ctx: StepContext) -> dict[str, float]:
        y, state = self.source.next_batch(self.batch_size, ctx.rng)
        y = ctx.to_device(y)
        state = {k: v.to(ctx.device) for k, v in state.items()}
        with ctx.autocast():
            loss = self.objective.loss(self.net, y, state, ctx.rng).mean()
        grad_norm = ctx.optimizer_step(loss, self.opt, self.clip)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}


def build_teacher(net_cfg: NetworkConfig, objective: Objective) -> EDMPrecond:
    """The U-Net for this objective (with its conditioning channels)."""
    shape = (net_cfg.img_channels, net_cfg.img_resolution, net_cfg.img_resolution)
    return build_unet(net_cfg, objective.cond_channels(shape))


def pretrain_teacher(
    net: EDMPrecond,
    objective: Objective,
    source: BatchSource,
    cfg: TrainConfig,
    out_dir: str | Path | None,
    *,
    callback: MetricsCallback | None = None,
    config: dict | None = None,
    progress: bool = True,
    on_checkpoint: CheckpointCallback | None = None,
) -> tuple[PretrainPhase, TrainResult]:
    """Train (or resume training) a teacher; returns the phase (``.ema`` is the teacher) and the result."""
    phase = PretrainPhase(net, objective, source, cfg, config or {})
    result = Trainer(phase, cfg, out_dir, callback=callback, progress=progress, on_checkpoint=on_checkpoint).run()
    return phase, result
