"""``dps``: diffusion posterior sampling with the teacher (:mod:`rsd_core.restore.posterior`), the slow, strong
baseline; ``restarts`` posterior samples per observation (one by default), DPSConfig's schedule and guidance."""

from __future__ import annotations

from rsd_core.restore.estimate import Restoration
from rsd_core.restore.methods.registry import register_method
from rsd_core.restore.posterior import DPSConfig, dps_with_model


@register_method("dps", "diffusion posterior sampling with the teacher (the model folder must hold it): 100 "
                 "ancestral levels per sample, --restarts samples (their mean and, from 2, their std)", model="teacher")
def dps(models, y, state, config):
    dps_config = DPSConfig(samples=config.restarts or 1, data_consistency=config.data_consistency,
                           consistency_iters=config.consistency_iters, batch_size=config.batch_size, seed=config.seed)
    samples = dps_with_model(models.folder, y, state, dps_config, models.device)
    return Restoration(samples.mean, samples.spread if dps_config.samples > 1 else None)
