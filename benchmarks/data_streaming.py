"""Does teacher training stream its data? Peak memory of 10k vs 200k observations, and its speed.

Two inpainting datasets of random 32x32 observations (10k and 200k rows; the large one is ~1.6 GB
of parquet, written in bounded batches) are made in a temp dir. Each measurement runs in a fresh
subprocess so its peak RSS is its own (the training process's plus its data reader's):

* ``stream-10k`` / ``stream-200k``: ``pretrain_stage`` (the training path every pipeline run takes:
  shards streamed through ``StreamSource``) for a fixed number of steps;
* ``memory-10k``: the same network and steps on the same 10k observations held in memory
  (``TensorSource``), the path training took before it streamed.

Targets: ``train_rss_ratio`` = RSS(200k) / RSS(10k) <= 1.2 and ``train_throughput_ratio`` =
images/s streaming / in memory >= 0.9, measured in the same run. Prints a table, then one JSON
line; writes benchmarks/results/data_streaming.json.

    python -m benchmarks.data_streaming [--steps 120] [--small 10000] [--large 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import emit

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"kind": "inpaint", "p": 0.6}
SHAPE = (1, 32, 32)
BATCH = 64


def make_dataset(uri: str, n: int, seed: int = 0) -> float:
    """Write ``n`` random observations in batches of 8192 (never all in memory); seconds taken."""
    import torch

    from rsd_core.data.writer import write_dataset
    from rsd_core.kinds import build_operator

    op = build_operator(SPEC)
    rng = torch.Generator().manual_seed(seed)

    def batches():
        for start in range(0, n, 8192):
            b = min(8192, n - start)
            x = torch.rand((b, *SHAPE), generator=rng) * 2 - 1
            state = op.sample_state(b, SHAPE, rng)
            yield op.forward(x, state).numpy(), {k: v.numpy() for k, v in state.items()}, None

    t0 = time.perf_counter()
    write_dataset(uri, batches(), name=f"random-{n}", image_shape=SHAPE, operator=SPEC)
    return time.perf_counter() - t0


def train(uri: str, mode: str, steps: int) -> dict:
    """Run in the child: ``steps`` teacher steps, streamed or in memory; peak RSS and images/s."""
    import torch

    from rsd_core.config import NetworkConfig, TrainConfig
    from rsd_core.data.reader import open_dataset
    from rsd_core.kinds import build_operator, objective_for
    from rsd_core.stages import pretrain_stage
    from rsd_core.train.pretrain import TensorSource, build_teacher, pretrain_teacher

    torch.set_num_threads(1)
    net_cfg = NetworkConfig(model_channels=16, channel_mult=(1, 2), attn_resolutions=())
    cfg = TrainConfig(steps=steps, batch_size=BATCH, checkpoint_every=10 * steps, precision="fp32",
                      lr_rampup_steps=0, data_workers=1)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        if mode == "stream":
            _, result = pretrain_stage(uri, net_cfg, cfg, out, progress=False)
        else:
            obs, state, _ = open_dataset(uri).read_all()
            objective = objective_for(build_operator(SPEC))
            torch.manual_seed(cfg.seed)
            pretrain_teacher(build_teacher(net_cfg, objective), objective, TensorSource(obs, state), cfg, None,
                             progress=False)
        seconds = time.perf_counter() - t0
    gc.collect()  # the DataLoader's reader process exits with its source; its peak then counts below
    usage = resource.getrusage
    peak_kib = usage(resource.RUSAGE_SELF).ru_maxrss + usage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rss_mb": peak_kib / 1024, "seconds": seconds,
            "img_per_s": steps * BATCH / seconds}


def measure(uri: str, mode: str, steps: int) -> dict:
    code = (f"import json; from benchmarks.data_streaming import train; "
            f"print(json.dumps(train({uri!r}, {mode!r}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} training on {uri} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps per measurement")
    parser.add_argument("--small", type=int, default=10_000, help="rows of the small dataset")
    parser.add_argument("--large", type=int, default=200_000, help="rows of the large dataset")
    args = parser.parse_args(argv)
    runs, writes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        small, large = str(Path(tmp) / "small"), str(Path(tmp) / "large")
        writes["small"] = make_dataset(small, args.small)
        writes["large"] = make_dataset(large, args.large, seed=1)
        runs["memory-small"] = measure(small, "memory", args.steps)
        runs["stream-small"] = measure(small, "stream", args.steps)
        runs["stream-large"] = measure(large, "stream", args.steps)
    print(f"{'run':>13} {'peak RSS MB':>12} {'img/s':>8}")
    for name, r in runs.items():
        print(f"{name:>13} {r['rss_mb']:>12.1f} {r['img_per_s']:>8.1f}")
    return emit("data_streaming", {
        "n_small": args.small,
        "n_large": args.large,
        "train_rss_small_mb": round(runs["stream-small"]["rss_mb"], 1),
        "train_rss_large_mb": round(runs["stream-large"]["rss_mb"], 1),
        "train_rss_ratio": round(runs["stream-large"]["rss_mb"] / runs["stream-small"]["rss_mb"], 3),
        "train_rss_memory_small_mb": round(runs["memory-small"]["rss_mb"], 1),
        "train_throughput_ratio": round(runs["stream-small"]["img_per_s"] / runs["memory-small"]["img_per_s"], 3),
        "img_per_s_stream": round(runs["stream-small"]["img_per_s"], 1),
        "img_per_s_memory": round(runs["memory-small"]["img_per_s"], 1),
        "write_seconds": {k: round(v, 1) for k, v in writes.items()},
        "setup": f"random 32x32 inpainting p=0.6, {args.steps} steps of batch {BATCH}, 1 thread, 1 data worker, "
                 "shuffle buffer 4096",
    })


if __name__ == "__main__":
    main()
