"""``projection``: the learnt methods' data-consistency step alone, from a zero image: the minimum-norm image
that reproduces the measurements, noisy ones as they are; what the projection gives before any prior does."""

from __future__ import annotations

import torch

from rsd_core.restore.estimate import Restoration, data_consistency
from rsd_core.restore.methods.registry import register_method


@register_method("projection", "the minimum-norm image that reproduces the measurements (the data-consistency "
                 "step alone, from a zero image): the floor every prior must beat; no spread", model=None)
def projection(models, y, state, config):
    y, state = y.cpu().float(), {k: v.cpu() for k, v in state.items()}
    zero = torch.zeros((len(y), *models.card.image_shape))
    return Restoration(data_consistency(models.operator, zero, y, state, config.consistency_iters,
                                        keep_noise=True).clamp(-1.0, 1.0), None)
