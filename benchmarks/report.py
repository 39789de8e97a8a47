"""The benchmarks' common ending: the result as benchmarks/results/<name>.json and as the last stdout line."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def emit(name: str, result: dict) -> dict:
    """Write ``result`` to ``benchmarks/results/<name>.json`` and print it as one JSON line."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result
