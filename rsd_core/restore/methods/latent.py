"""``latent``: the one-step generator inverted over its latent, by a latent encoder fitted for the dataset
(``encoder`` target "latent") and/or ``steps`` Adam steps per observation (from noise with ``encoder`` None)."""

from __future__ import annotations

from rsd_core.restore.estimate import restore_observations
from rsd_core.restore.methods.registry import register_method


@register_method("latent", "the generator G inverted over its latent: a latent encoder fitted for the dataset starts "
                 "each of --restarts latents (one G pass each), --steps Adam steps refine them, or with "
                 "--encoder none they start from noise; their mean and std are the restoration and its spread")
def latent(models, y, state, config):
    return restore_observations(models.generator, y, state, config, encoder=models.encoder)
