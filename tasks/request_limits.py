"""How much one request to a served model may ask for: settings read from the server's environment.

A served model answers ``{"count": n}`` or ``n`` observations; without a bound one request could
take the server's memory. ``rsd serve --max-rows/--max-batch`` sets these variables; the defaults fit
a 24 GiB machine with room to spare (a batch of 64 32x32 or 64x64 images through the generator or the
restorer needs well under 1 GiB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_ROWS_ENV = "RSD_SERVE_MAX_ROWS"
MAX_BATCH_ENV = "RSD_SERVE_MAX_BATCH"
DEFAULT_MAX_ROWS = 1024
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class RequestLimits:
    """``max_rows`` samples or observations per request, computed ``max_batch`` at a time."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_batch: int = DEFAULT_MAX_BATCH

    @classmethod
    def from_env(cls) -> RequestLimits:
        values = {}
        for field, name, default in (("max_rows", MAX_ROWS_ENV, DEFAULT_MAX_ROWS),
                                     ("max_batch", MAX_BATCH_ENV, DEFAULT_MAX_BATCH)):
            raw = os.environ.get(name, str(default))
            try:
                values[field] = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            if values[field] < 1:
                raise ValueError(f"{name} must be >= 1, got {values[field]}")
        return cls(**values)

    def check_rows(self, rows: int, what: str) -> None:
        """A ValueError naming the limit when a request asks for more than ``max_rows``."""
        if rows > self.max_rows:
            raise ValueError(f"{rows} {what} exceed this server's limit of {self.max_rows} per request "
                             f"({MAX_ROWS_ENV}); split the request")

    def chunks(self, rows: int) -> list[slice]:
        """Slices of at most ``max_batch`` rows covering ``range(rows)``."""
        return [slice(start, min(start + self.max_batch, rows)) for start in range(0, rows, self.max_batch)]
