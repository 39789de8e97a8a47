"""The benchmarks' common ending: the result as benchmarks/results/<name>.json and as the last stdout line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def emit(name: str, result: dict) -> dict:
    """Write ``result`` to ``benchmarks/results/<name>.json`` and print it as one JSON line."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def add_work_args(parser: argparse.ArgumentParser, out: Path, publishes: str) -> None:
    """The options of a resumable benchmark: seed, work folder, quiet, torch threads, --no-publish (which
    leaves ``publishes`` alone)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(out), help="work folder (resumable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help=f"write into the work folder only (not {publishes})")


def replace_block(doc: Path, begin: str, end: str, lines: list[str], heading: str) -> None:
    """Put ``lines`` between the markers ``begin`` and ``end`` of ``doc`` (kept: everything outside them), or
    append them under ``heading`` where the markers are missing."""
    block = "\n".join([begin, *lines, end])
    text = doc.read_text()
    if begin in text and end in text:
        text = text.split(begin)[0] + block + text.split(end, 1)[1]
    else:
        text += f"\n{heading}\n\n{block}\n"
    doc.write_text(text)
