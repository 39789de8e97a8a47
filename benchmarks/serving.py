"""Load test of the served models on loopback: the generator's sampling and the registered restorer.

    python -m benchmarks.serving [--clients 4] [--seconds 60] [--model URI --restorer URI --out-dir DIR]

Without ``--model``, builds what a user of ``make demo`` has, at a small budget, in the work folder
(reused on a rerun): ``rsd run --preset cpu-demo`` on 2,000 observations with one-minute training
budgets, then ``rsd restore`` of that dataset with its default settings, which registers its restorer
(its evaluation and calibration lines go to ``restorer_fit``). Then, for each model, starts
``rsd serve`` and lets ``--clients`` concurrent clients send requests of ``--rows`` rows for ``--seconds``
(at most ``--max-requests`` each), recording every latency and every non-200 answer, while the server's
resident memory (its process tree, sampled every 0.2 s) is tracked. Finally it times latent optimisation
(the generator's restoration path, its default settings) and the restorer on the same observations, one
request at a time, for the per-observation speed-up.

Last stdout line (also benchmarks/results/serving.json): ``{"sampling": {...}, "restoration": {...},
"latent_optimisation": {...}, "restorer_speedup_vs_latent": x}``, each object with ``p50_ms``, ``p95_ms``,
``p99_ms``, ``requests``, ``errors`` and ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.report import emit

BIN = Path(sys.executable).parent
DEFAULT_WORK = Path("/tmp/rsd-bench-serving")
GENERATOR = "models:/rsd-serving-bench@champion"


def _rsd(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(BIN / "rsd"), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"rsd {' '.join(args[:1])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_models(work: Path, env: dict[str, str]) -> tuple[str, str, Path]:
    """A demo-sized generator and its restorer, registered in ``work/outputs`` (reused when present)."""
    out = work / "outputs"
    marker = work / "models.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        return saved["generator"], saved["restorer"], out
    print("[serving] building a generator (rsd run, 1-minute budgets) and its restorer (rsd restore)", flush=True)
    if not (work / "generator.done").exists():
        _rsd("run", "--preset", "cpu-demo", "--out", str(out), "--no-cache",
             "--set", "data.limit=2000", "--set", "teacher_train.time_budget_s=60",
             "--set", "distill_train.time_budget_s=60", "--set", "selection.n_samples=64",
             "--set", "tracking.model_name=rsd-serving-bench", env=env)
        (work / "generator.done").write_text(GENERATOR)
    dataset = _dataset_of(out)
    stdout = _rsd("restore", "--model", GENERATOR, "--dataset", dataset, "--out", str(work / "restored"),
                  "--out-dir", str(out), env=env)
    restorer = stdout.split("registered as ")[1].split()[0]
    (work / "restore.log").write_text(stdout)
    marker.write_text(json.dumps({"generator": GENERATOR, "restorer": restorer, "dataset": dataset,
                                  "restore": _restore_summary(stdout)}))
    return GENERATOR, restorer, out


def _restore_summary(stdout: str) -> dict[str, str]:
    """What `rsd restore` reported about the restorer it fitted: evaluation and calibration lines."""
    keep = ("restored ", "evaluation ", "calibration ", "data misfit ")
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.startswith(keep):
            found.setdefault(line.split()[0], line.strip())  # "restored N observations" before "restored dataset"
    return found


def _dataset_of(out: Path) -> str:
    """The corrupted dataset the pipeline run wrote (the one manifest under its sandbox)."""
    manifests = sorted((p for p in out.glob("flyte-sandbox/**/manifest.json") if p.parent.name == "dataset"),
                       key=lambda p: p.stat().st_mtime)
    if not manifests:
        sys.exit(f"no dataset manifest under {out}/flyte-sandbox")
    return str(manifests[0].parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@contextlib.contextmanager
def served(model: str, out: Path, env: dict[str, str], max_rows: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """``rsd serve`` of ``model``; yields its invocations URL and process once /ping answers."""
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "rsd"), "serve", "--model", model, "--port", str(port), "--out-dir", str(out),
                             "--max-rows", str(max_rows)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"rsd serve {model} did not start")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _post(url: str, body: bytes) -> tuple[float, int]:
    """(seconds, HTTP status) of one request."""
    start = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError):
        status = 0
    return time.perf_counter() - start, status


def load(url: str, proc: subprocess.Popen, body: bytes, clients: int, seconds: float,
         max_requests: int) -> dict[str, float]:
    """``clients`` threads posting ``body`` until ``seconds`` pass (or ``max_requests`` each)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        for _ in range(max_requests):
            if time.monotonic() >= stop_at:
                return
            took, status = _post(url, body)
            with lock:
                latencies.append(took)
                errors[0] += status != 200

    peak = [_tree_rss_mb(proc.pid)]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
        time.sleep(0.2)
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors[0], "clients": clients,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "peak_rss_mb": round(peak[0], 1)}


def _observations(dataset: str, rows: int) -> dict[str, list]:
    from rsd_core.data.reader import open_dataset

    y, state, _ = open_dataset(dataset).read_all(limit=rows)
    return {"observations": y.tolist(), **{k: v.tolist() for k, v in state.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration per served model")
    parser.add_argument("--max-requests", type=int, default=2000, help="most requests per client")
    parser.add_argument("--rows", type=int, default=8, help="samples or observations per request")
    parser.add_argument("--latent-requests", type=int, default=3, help="timed latent-optimisation requests")
    parser.add_argument("--model", default=None, help="a registered generator (default: build one)")
    parser.add_argument("--restorer", default=None, help="its registered restorer (with --model)")
    parser.add_argument("--dataset", default=None, help="observations to restore (with --model)")
    parser.add_argument("--out-dir", type=Path, default=None, help="outputs folder of --model's MLflow store")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder of the built models")
    parser.add_argument("--no-publish", dest="publish", action="store_false",
                        help="print only (not benchmarks/results/serving.json)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RSD_"))}
    bare = {**env, "PATH": "/usr/bin:/bin"}  # as a fresh shell has it: rsd serve must not need an activated venv
    if args.model:
        if not (args.restorer and args.dataset and args.out_dir):
            parser.error("--model needs --restorer, --dataset and --out-dir")
        generator, restorer, out, dataset = args.model, args.restorer, args.out_dir, args.dataset
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        generator, restorer, out = build_models(args.work, env)
        built = json.loads((args.work / "models.json").read_text())
        dataset = built["dataset"]
    observations = _observations(dataset, args.rows)
    sample_body = json.dumps({"inputs": {"count": [args.rows]}}).encode()
    restore_body = json.dumps({"inputs": observations}).encode()
    result: dict = {"rows_per_request": args.rows, "seconds": args.seconds, "generator": generator,
                    "restorer": restorer, "cpu_count": os.cpu_count(),
                    "restorer_fit": {} if args.model else built.get("restore", {})}
    with served(generator, out, bare, max_rows=max(args.rows, 1024)) as (url, proc):
        print(f"[serving] sampling: {args.clients} clients x {args.seconds:.0f} s", flush=True)
        result["sampling"] = load(url, proc, sample_body, args.clients, args.seconds, args.max_requests)
        print(f"[serving] latent optimisation: {args.latent_requests} requests, one at a time", flush=True)
        result["latent_optimisation"] = load(url, proc, restore_body, 1, float("inf"), args.latent_requests)
    with served(restorer, out, bare, max_rows=max(args.rows, 1024)) as (url, proc):
        print(f"[serving] restorer: {args.clients} clients x {args.seconds:.0f} s", flush=True)
        result["restoration"] = load(url, proc, restore_body, args.clients, args.seconds, args.max_requests)
        single = load(url, proc, restore_body, 1, float("inf"), max(args.latent_requests, 10))
    result["restoration_single_client_p50_ms"] = single["p50_ms"]
    result["restorer_speedup_vs_latent"] = result["latent_optimisation"]["p50_ms"] / single["p50_ms"]
    for key in ("sampling", "restoration", "latent_optimisation"):
        r = result[key]
        print(f"{key:<20} {r['requests']:>5} requests  p50 {r['p50_ms']:8.1f} ms  p95 {r['p95_ms']:8.1f} ms  "
              f"p99 {r['p99_ms']:8.1f} ms  errors {r['errors']}  peak RSS {r['peak_rss_mb']:.0f} MiB")
    print(f"restorer vs latent optimisation, one request of {args.rows} observations at a time: "
          f"{result['restorer_speedup_vs_latent']:.0f}x faster", flush=True)
    if args.publish:
        return emit("serving", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
