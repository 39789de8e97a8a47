"""The operator registry: one entry per corruption kind, and everything else derives from it.

A kind declares, in one :class:`OperatorKind`:

* its spec (a subclass of :class:`~rsd_core.operators.spec.OperatorSpecBase` with ``kind: Literal[...]``)
  and operator class (which also says how its observations look as images,
  :meth:`~rsd_core.operators.Operator.image_view`, and their provable range);
* its corruption-aware objective, for noiseless and for noisy measurements (``None`` = noisy
  data unsupported), so the teacher and the fake score share it by construction (RSD trains
  both with the same objective family);
* the teacher sampler's default truncation level when measurements are noiseless (noisy ones
  truncate at sigma_n, where the Ambient Tweedie teacher's training stops);
* the image channels it needs (``None`` = any), and the export formats its generator supports.

Adding a corruption is one operator class with its spec, plus one :func:`register_kind` call:
spec validation, the ``rsd data`` CLI flags and choices, the objective, selection's image view,
the truncation default and the export check all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rsd_core.operators import (
    Blur,
    BlurSpec,
    Identity,
    IdentitySpec,
    Inpaint,
    InpaintSpec,
    Operator,
    State,
    SuperRes,
    SuperResSpec,
)
from rsd_core.operators.mri import MRI, MRISpec
from rsd_core.operators.spec import OperatorSpecBase, use_registry
from rsd_core.restore.baselines import (
    blur_classical,
    inpaint_classical,
    least_squares_classical,
    superres_classical,
)
from rsd_core.train.objectives import (
    AmbientDiffusionObjective,
    AmbientTweedieObjective,
    FourierAmbientObjective,
    Objective,
)

EXPORT_FORMATS = ("onnx", "pt2")  # every format a generator can be exported to; a kind names its subset
Classical = Callable[[Operator, torch.Tensor, State], torch.Tensor]  # (operator, y, state) -> estimate


@dataclass(frozen=True)
class OperatorKind:
    """Everything the pipeline needs to know about one corruption kind."""

    spec: type[OperatorSpecBase]
    operator: type[Operator]
    objective: type[Objective]
    noisy_objective: type[Objective] | None
    sigma_stop: float | None = None
    image_channels: int | None = None
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    # The classical estimate restorations are compared with; None: regularised least squares (linear kinds).
    classical: Classical | None = None
    summary: str = ""

    @property
    def name(self) -> str:
        return self.spec.model_fields["kind"].default


_KINDS: dict[str, OperatorKind] = {}
use_registry(lambda: {name: kind.spec for name, kind in _KINDS.items()})  # spec validation dispatches on this table


def register_kind(kind: OperatorKind) -> OperatorKind:
    """Add a kind to the registry (its name is its spec's ``kind`` literal); names are unique."""
    name = kind.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind.spec.__name__} needs a default for 'kind' (kind: Literal['name'] = 'name')")
    if name in _KINDS and _KINDS[name] != kind:
        raise ValueError(f"operator kind '{name}' is already registered (by {_KINDS[name].operator.__name__})")
    unknown = set(kind.export_formats) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"operator kind '{name}': unknown export formats {sorted(unknown)} (known: {EXPORT_FORMATS})")
    _KINDS[name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (tests register toy kinds and take them away again)."""
    _KINDS.pop(name, None)


def registered_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def get_kind(name: str) -> OperatorKind:
    if name not in _KINDS:
        raise ValueError(f"unknown operator kind {name!r} (expected one of {', '.join(_KINDS)})")
    return _KINDS[name]


def build_operator(spec: OperatorSpecBase | dict) -> Operator:
    """The operator for a validated spec (or a dict that validates into one)."""
    if isinstance(spec, dict):
        spec = OperatorSpecBase.model_validate(spec)
    return get_kind(spec.kind).operator(spec)


def objective_for(operator: Operator, **loss_law: float) -> Objective:
    """The corruption-aware objective of ``operator``'s kind (the one teacher and fake share); ``loss_law``
    (P_mean, P_std, heldout_sigma_floor) sets its training noise levels and weights where they differ from EDM's."""
    kind = get_kind(operator.spec.kind)
    if operator.sigma_n == 0:
        return kind.objective(operator, **loss_law)
    if kind.noisy_objective is None:
        raise ValueError(f"operator kind '{kind.name}' with sigma_n > 0 is not supported (sigma_n must be 0)")
    return kind.noisy_objective(operator, **loss_law)


def default_sigma_stop(spec: OperatorSpecBase) -> float | None:
    """The teacher sampler's truncation level (see sampling.py): sigma_n for noisy data (the
    Ambient Tweedie teacher never trained below it), else the kind's own default."""
    if spec.sigma_n > 0:
        return spec.sigma_n
    return get_kind(spec.kind).sigma_stop


def check_export(spec: OperatorSpecBase, formats: tuple[str, ...] | list[str]) -> None:
    """Refuse, before any training, formats the kind's generator cannot be exported to."""
    kind = get_kind(spec.kind)
    missing = [f for f in formats if f not in kind.export_formats]
    if missing:
        can = ", ".join(kind.export_formats) or "none"
        raise ValueError(
            f"operator kind '{kind.name}' cannot be exported as {', '.join(missing)} (it exports to: {can}); "
            f"set export.formats to a subset of that"
        )


def classical_estimate(operator: Operator, y: torch.Tensor, state: State) -> torch.Tensor:
    """The kind's classical estimate (N, C, H, W) of observations y, on the CPU: its own, or least squares."""
    return (get_kind(operator.spec.kind).classical or least_squares_classical)(operator, y, state)


register_kind(OperatorKind(IdentitySpec, Identity, Objective, AmbientTweedieObjective,
                           summary="denoising only (A = I)"))
register_kind(OperatorKind(InpaintSpec, Inpaint, AmbientDiffusionObjective, None, sigma_stop=0.05,
                           classical=inpaint_classical, summary="random pixel erasure, Ambient Diffusion teacher"))
register_kind(OperatorKind(BlurSpec, Blur, Objective, AmbientTweedieObjective, classical=blur_classical,
                           summary="Gaussian blur"))
register_kind(OperatorKind(SuperResSpec, SuperRes, Objective, AmbientTweedieObjective, classical=superres_classical,
                           summary="block-average down-sampling kept at full size"))
# .pt2 only: the ONNX exporter cannot lower the projection's complex tensors (rsd_core.export.onestep).
register_kind(OperatorKind(MRISpec, MRI, FourierAmbientObjective, None, sigma_stop=0.05, image_channels=2,
                           export_formats=("pt2",), summary="multi-coil Cartesian k-space under-sampling"))
