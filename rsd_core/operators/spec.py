"""Operator specs: what a corruption is called and its parameters, validated by ``kind``.

The spec classes live beside their operators (:mod:`rsd_core.operators`); which ``kind`` names which
class is the operator registry's (:mod:`rsd_core.kinds`) to say, and it says so through
:func:`use_registry` when it is imported. This module depends on nothing else of rsd_core, so the
operators, the registry and the configuration can all build on it without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field, SerializeAsAny, ValidatorFunctionWrapHandler, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rsd_core.spec import Spec

_registry: Callable[[], Mapping[str, type[OperatorSpecBase]]] | None = None


def use_registry(specs: Callable[[], Mapping[str, type[OperatorSpecBase]]]) -> None:
    """Where spec validation finds the class of a ``kind``: the operator registry calls this on import."""
    global _registry
    _registry = specs


def _registered_specs() -> Mapping[str, type[OperatorSpecBase]]:
    return _registry() if _registry is not None else {}


class OperatorSpecBase(Spec):
    """Base of every operator spec: a ``kind`` naming the registered corruption and its noise.

    Validating a mapping against this base dispatches on ``kind`` to the spec class that the
    operator registry (:mod:`rsd_core.kinds`) holds for it, so a model field typed
    :data:`OperatorSpec` accepts every registered kind, including ones registered after this
    module was imported, and serialises with the concrete kind's fields.
    """

    kind: str
    sigma_n: float = Field(0.0, description="measurement noise std on the [-1, 1] scale")

    @field_validator("sigma_n")
    @classmethod
    def _check_sigma_n(cls, value: float) -> float:
        if not value >= 0.0:
            raise ValueError(f"sigma_n must be >= 0 (noise std on the [-1, 1] scale), got {value}")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch_on_kind(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> OperatorSpecBase:
        if cls is not OperatorSpecBase or isinstance(data, OperatorSpecBase) or not isinstance(data, Mapping):
            return handler(data)
        specs = _registered_specs()
        if "kind" not in data:
            raise PydanticCustomError(
                "operator_kind_missing", "operator has no 'kind' (expected one of {kinds})",
                {"kinds": ", ".join(specs)},
            )
        kind = data["kind"]
        spec_cls = specs.get(kind) if isinstance(kind, str) else None
        if spec_cls is None:
            raise PydanticCustomError(
                "operator_kind_unknown", "unknown operator kind {kind} (expected one of {kinds})",
                {"kind": repr(kind), "kinds": ", ".join(specs)},
            )
        return spec_cls.model_validate(data)


# Any registered operator spec, validated by ``kind`` and serialised with all of its fields.
OperatorSpec = SerializeAsAny[OperatorSpecBase]
