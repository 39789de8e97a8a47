"""Fault injection: does the pipeline recover, or fail clearly without losing anything?

    python -m benchmarks.faults [--skip-s3] [--skip-mlflow] [--skip-cli]

Runs every scenario of tests/faults.py (tiny: 8x8 images, a ~20 k-parameter U-Net; the whole table takes about
two minutes on 2 CPU cores, most of it spent starting Python/torch for the ``kill -9`` runs and the CLI cases,
each a real ``rsd`` process, so a traceback cannot hide). Outcomes: ``recovered``, ``clear error, nothing
lost`` or ``FAILED`` (tests/faults.py says what each means). Prints a table, then (last stdout line) one JSON
object ``{"rows": [...]}``, also written to benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from tests.faults import (
    FAILED,
    ROOT,
    Row,
    cli_scenarios,
    kill_scenario,
    mlflow_scenarios,
    nan_scenarios,
    s3_scenarios,
)

RESULTS = ROOT / "benchmarks" / "results" / "faults.json"


def _guarded(name: str, scenario: Callable[[Path], Iterator[Row]], work: Path) -> Iterator[Row]:
    """A scenario that crashes becomes a FAILED row with its last traceback line, not a dead table."""
    folder = work / name
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        yield from scenario(folder)
    except Exception as err:
        tail = traceback.format_exception_only(type(err), err)[-1].strip()
        yield Row(f"{name} (scenario crashed)", FAILED, tail[:300])
    print(f"  [{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)


def print_table(rows: list[Row]) -> None:
    width = max(len(r.fault) for r in rows)
    print(f"{'fault':<{width}}  {'outcome':<26}  detail")
    print(f"{'-' * width}  {'-' * 26}  {'-' * 40}")
    for r in rows:
        print(f"{r.fault:<{width}}  {r.outcome:<26}  {r.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-s3", action="store_true", help="leave out the seaweedfs S3 scenarios")
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out the MLflow registration scenarios")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the malformed-input CLI cases")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and print where it is")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="rsd-faults-"))
    scenarios: list[tuple[str, Callable[[Path], Iterator[Row]]]] = [("kill", kill_scenario), ("nan", nan_scenarios)]
    if not args.skip_s3:
        scenarios.append(("s3", s3_scenarios))
    if not args.skip_mlflow:
        scenarios.append(("mlflow", mlflow_scenarios))
    if not args.skip_cli:
        scenarios.append(("cli", cli_scenarios))
    t0 = time.perf_counter()
    rows: list[Row] = []
    try:
        for name, scenario in scenarios:
            rows += list(_guarded(name, scenario, work))
    finally:
        if args.keep:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    failed = sum(r.outcome == FAILED for r in rows)
    print(f"\n{len(rows)} faults, {failed} FAILED, {time.perf_counter() - t0:.0f} s")
    result = {"rows": [asdict(r) for r in rows]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
