"""``posterior-net``: the posterior-mean network, an image-target :class:`~rsd_core.restore.encoder.AmortisedEncoder`
fitted for the dataset (on its own held-out measurements, or on the generator's samples: ``encoder.fit_on``)."""

from __future__ import annotations

from rsd_core.restore.estimate import restore_observations
from rsd_core.restore.methods.registry import register_method


@register_method("posterior-net", "the posterior-mean network fitted for the dataset (no clean images): E[x | y] "
                 "and a per-pixel std in one pass per observation; fitted on the observations with measurements "
                 "held out (inpaint, mri) or on the generator's samples seen through the operator (encoder fit_on)")
def posterior_net(models, y, state, config):
    return restore_observations(models.generator, y, state, config, encoder=models.encoder)
