"""The averages of the weights that training keeps: the EMA every run has (a half-life in images, with EDM's
ramp-up) and, optionally, the power-function EMAs of post-hoc EMA (rsd_core.train.posthoc_ema)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from rsd_core.train.posthoc_ema import gamma_of_sigma_rel, power_ema_name


def ema_beta(batch_size: int, images_seen: int, halflife_nimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per step for a half-life in images, with EDM's ramp-up (halflife <= ratio * seen)."""
    halflife = halflife_nimg
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)


def make_ema(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


def add_power_emas(modules: dict[str, nn.Module], ema_pairs: list[tuple[nn.Module, nn.Module]],
                   sigma_rels: list[float]) -> dict[str, tuple[nn.Module, nn.Module, float]]:
    """Beside each EMA of ``ema_pairs`` (net, EMA), one power-function EMA per ``sigma_rel``, added to
    ``modules`` (a phase's, so that checkpoints save and restore it); returns {name: (net, power EMA, gamma)}."""
    names = {id(module): name for name, module in modules.items()}
    added = {}
    for net, ema in ema_pairs:
        for sigma_rel in sigma_rels:
            name, power = power_ema_name(names[id(ema)], sigma_rel), make_ema(net)
            modules[name] = power
            added[name] = (net, power, gamma_of_sigma_rel(sigma_rel))
    return added
