"""The base of every configuration model: validated once, immutable, unknown keys refused."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updated(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new instance (``model_copy(update=...)`` is not)."""
        return type(self).model_validate({**self.model_dump(), **changes})
