"""Does streaming memory stay flat as the dataset grows? Peak RSS of a full pass, 1k vs 50k rows.

Fashion-MNIST 32x32 inpainting datasets are written to a temp dir; each full pass (shuffle
buffer 2048, batches of 256) runs in a fresh subprocess so its ru_maxrss is its own.
Prints a table, then one JSON line (last line of stdout); also writes
benchmarks/results/data_streaming.json. Target: rss_50k / rss_1k <= 1.2.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"1k": 1_000, "50k": 50_000}
RESULTS = Path(__file__).parent / "results" / "data_streaming.json"


def full_pass(uri: str) -> dict:
    """Run in the child: one shuffled epoch through a DataLoader; report peak RSS and speed."""
    import torch
    from torch.utils.data import DataLoader

    from rsd_core.streaming import StreamingDataset

    torch.set_num_threads(1)
    loader = DataLoader(StreamingDataset(uri, shuffle_buffer=2048, seed=0), batch_size=256)
    start = time.perf_counter()
    rows = sum(len(obs) for obs, _, _ in loader)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"rows": rows, "seconds": seconds, "rss_mb": rss_mb}


def measure(uri: str) -> dict:
    code = f"import json; from benchmarks.data_streaming import full_pass; print(json.dumps(full_pass({uri!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from rsd_core.sources import corrupt

    spec = {"kind": "inpaint", "p": 0.6}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in SIZES.items():
            uri = str(Path(tmp) / label)
            t0 = time.perf_counter()
            corrupt("fashion-mnist", spec, 0, uri, limit=n)
            write_s = time.perf_counter() - t0
            runs[label] = {**measure(uri), "write_seconds": write_s}
    print(f"{'size':>6} {'rows':>7} {'peak RSS MB':>12} {'read obs/s':>11} {'write s':>8}")
    for label, r in runs.items():
        speed = r["rows"] / r["seconds"]
        print(f"{label:>6} {r['rows']:>7} {r['rss_mb']:>12.1f} {speed:>11.0f} {r['write_seconds']:>8.1f}")
    big = runs["50k"]
    result = {
        "rss_1k_mb": round(runs["1k"]["rss_mb"], 1),
        "rss_50k_mb": round(big["rss_mb"], 1),
        "rss_ratio": round(big["rss_mb"] / runs["1k"]["rss_mb"], 3),
        "obs_per_second": round(big["rows"] / big["seconds"]),
        "dataset": "fashion-mnist 32x32 inpaint p=0.6, shuffle buffer 2048, batch 256, 1 thread",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
