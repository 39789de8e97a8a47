"""``classical``: the operator kind's estimate without a learnt prior (:func:`rsd_core.kinds.classical_estimate`:
biharmonic inpainting, Wiener deblurring, bicubic up-sampling, regularised least squares), moved onto the
measurements like the learnt methods' results where ``data_consistency`` is set (noiseless data)."""

from __future__ import annotations

from rsd_core.kinds import classical_estimate
from rsd_core.restore.estimate import Restoration, data_consistency
from rsd_core.restore.methods.registry import register_method


@register_method("classical", "the operator's classical estimate, no learnt prior (biharmonic inpainting, Wiener "
                 "deblurring, bicubic up-sampling, least squares / SENSE), projected onto the measurements with "
                 "--data-consistency (noiseless data); no spread", model=None)
def classical(models, y, state, config):
    y, state = y.cpu().float(), {k: v.cpu() for k, v in state.items()}
    x = classical_estimate(models.operator, y, state)
    if config.data_consistency:
        x = data_consistency(models.operator, x, y, state, config.consistency_iters).clamp(-1.0, 1.0)
    return Restoration(x, None)
