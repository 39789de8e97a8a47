"""The registry of restoration methods: one name of ``RestoreConfig.method`` per registered function.

Every caller (``rsd restore``, the Flyte task's shards, the registered restorer, the served generator, the
benchmark) restores through :func:`restore`, so a method is added by one module that registers itself (the config
then accepts its name), and a module registering a name twice is refused at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch

from rsd_core.kinds import build_operator
from rsd_core.operators import Operator, State
from rsd_core.restore.encoder import AmortisedEncoder
from rsd_core.restore.estimate import (
    METHOD_NAMES,
    Restoration,
    RestoreConfig,
    check_observations,
    fit_restore_encoder,
    load_generator,
)
from rsd_core.stages import ModelCard, read_card
from rsd_core.train.sampling import OneStepSampler


@dataclass
class RestoreModels:
    """What a method restores with: a saved model folder (the one-step generator; DPS: the teacher), read on first
    use so that a method needing only the card's operator loads no network, and the network fitted for the
    dataset (``config.encoder``, by :func:`fit_restore_encoder`) where the method has one."""

    folder: Path
    device: str | torch.device = "cpu"
    encoder: AmortisedEncoder | None = None

    @cached_property
    def card(self) -> ModelCard:
        return read_card(self.folder)

    @cached_property
    def operator(self) -> Operator:
        return build_operator(self.card.operator)

    @cached_property
    def generator(self) -> OneStepSampler:
        return load_generator(self.folder, self.device)


RestoreFn = Callable[[RestoreModels, torch.Tensor, State, RestoreConfig], Restoration]


@dataclass(frozen=True)
class Method:
    """A registered restoration method: its name, what it does (the CLI's help) and the saved model it runs
    (``None``: only the card's forward model)."""

    name: str
    summary: str
    model: Literal["generator", "teacher"] | None
    restore: RestoreFn


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str,
                    model: Literal["generator", "teacher"] | None = "generator") -> Callable[[RestoreFn], RestoreFn]:
    """Register the decorated function as method ``name`` (once): from then on ``RestoreConfig.method`` accepts it."""

    def register(fn: RestoreFn) -> RestoreFn:
        if name in _METHODS:
            raise ValueError(f"restoration method {name!r} is registered twice: by {_METHODS[name].restore.__module__} "
                             f"and by {fn.__module__}")
        _METHODS[name] = Method(name, summary, model, fn)
        if name not in METHOD_NAMES:
            METHOD_NAMES.append(name)
        return fn

    return register


def registered_methods() -> dict[str, Method]:
    """Every registered method by name, the built-in ones first in ``METHOD_NAMES``'s order (the default first)."""
    return {name: _METHODS[name] for name in METHOD_NAMES if name in _METHODS}


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name is refused with the choices."""
    if name not in _METHODS:
        raise ValueError(f"unknown restoration method {name!r}: choose one of {', '.join(registered_methods())}")
    return _METHODS[name]


def restore(models: RestoreModels, y: torch.Tensor, state: State, config: RestoreConfig) -> Restoration:
    """Restore observations ``y`` with their ``state`` by ``config.method``, after checking they fit the model."""
    check_observations(models.operator, tuple(models.card.image_shape), y, state)
    return get_method(config.method).restore(models, y, state, config)


def restore_with_model(model_dir: str | Path, y: torch.Tensor, state: State, config: RestoreConfig,
                       device: str | torch.device = "cpu") -> Restoration:
    """Restore with a saved model folder; with ``config.encoder`` set, the network is fitted on ``y`` first."""
    models = RestoreModels(Path(model_dir), device)
    if config.encoder is not None:
        models.encoder = fit_restore_encoder(models.generator, y, state, config)[0]
    return restore(models, y, state, config)
