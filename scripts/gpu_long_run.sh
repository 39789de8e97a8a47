#!/usr/bin/env bash
# The long run on one GPU: inpainting p = 0.8 and MRI R = 4 (per-scan estimated coil maps), each task's
# corruption-aware teacher and one-step student, and the clean-data reference teacher, as four processes sharing
# the GPU (benchmarks/long_run.py --profile gpu: 4x the CPU batches). Training only: the FD extractors (the Fashion-MNIST classifier's cache,
# the Inception weights) stay where the points are scored, so the points travel back as fp16 tar archives.
#
#   bash scripts/gpu_long_run.sh OUT_DIR          # on the GPU machine, from the repository root
#
# Then, where the extractors are:
#   python -m benchmarks.long_run --profile gpu --unpack OUT_DIR
#   python -m benchmarks.long_run --profile gpu --task inpaint-0.8 --variant corrupted --teacher-minutes ...
#   ... (the same four commands without --no-score: training is skipped, the points are scored), and
#   python -m benchmarks.long_run --profile gpu --assemble-only
#
# Settings (environment): TASKS (default "inpaint-0.8 mri-r4-estimated"; mri-r4 is the 2-calibration-line MRI
# task); TEACHER_MINUTES (default 1,3.5), DISTILL_MINUTES (default 1,3): training-time points of
# each process; RSD_GPU_CARRY (default .gpu): a folder that may hold whl/ (pydantic and its needs, installed
# where python3 lacks them), fmnist/ (Fashion-MNIST's four idx files, where the system has none) and
# long_run_gpu/<mri task>/<variant>/data (the MRI datasets, written here beforehand with --prepare-only: the brain
# source needs nilearn); RSD_GPU_WORK (default /tmp/long_run_gpu): the work folder; PYTHON (default python3);
# DEADLINE_S (default 480): training processes still running then are stopped, and the points kept so far packed.
# Exit codes: 0 ok, 1 a process failed (its log is printed), 2 missing packages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_long_run.sh OUT_DIR}
PY=${PYTHON:-python3}
CARRY=${RSD_GPU_CARRY:-.gpu}
WORK=${RSD_GPU_WORK:-/tmp/long_run_gpu}
TEACHER_MINUTES=${TEACHER_MINUTES:-1,3.5}
DISTILL_MINUTES=${DISTILL_MINUTES:-1,3}
DEADLINE_S=${DEADLINE_S:-480}
read -ra TASK_LIST <<<"${TASKS:-inpaint-0.8 mri-r4-estimated}"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  [[ -d "$CARRY/whl" ]] || { echo "error: $PY lacks pydantic and $CARRY/whl holds no wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, pydantic, safetensors, pyarrow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 2
[[ -d "$CARRY/fmnist" ]] && export RSD_FASHION_MNIST_DIR="$CARRY/fmnist"
[[ -d "$CARRY/long_run_gpu" ]] && cp -rn "$CARRY/long_run_gpu/." "$WORK/"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 >"$LOGS/gpu-usage.csv" 2>&1 &
fi

common=(--profile gpu --out "$WORK" --quiet --threads 3 --no-score --teacher-minutes "$TEACHER_MINUTES")
names=() pids=()
start=$SECONDS
for task in "${TASK_LIST[@]}"; do
  for variant in corrupted clean; do
    distill=$([[ $variant == corrupted ]] && echo "$DISTILL_MINUTES" || echo "")
    "$PY" -m benchmarks.long_run "${common[@]}" --task "$task" --variant "$variant" --distill-minutes "$distill" \
      >"$LOGS/$task-$variant.log" 2>&1 &
    names+=("$task-$variant") pids+=($!)
  done
done
echo "started ${names[*]}; teacher points $TEACHER_MINUTES min, distillation points $DISTILL_MINUTES min"

# A process that fails in its first two minutes (an import, a device mismatch) stops them all: the time left is
# better spent on a fixed rerun. A later failure leaves the others running.
failed=0
running=${#pids[@]}
while ((running)); do
  sleep 5
  if ((SECONDS - start > DEADLINE_S)); then
    echo "$(date +%T) deadline of $DEADLINE_S s: stopping what still runs, packing the points kept so far"
    for other in "${pids[@]}"; do [[ $other != done ]] && kill "$other" 2>/dev/null || true; done
    failed=1
    break
  fi
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ $pid == done ]] && continue
    if kill -0 "$pid" 2>/dev/null; then running=$((running + 1)); continue; fi
    if wait "$pid"; then
      echo "$(date +%T) ${names[$i]} finished"
    else
      failed=1
      echo "$(date +%T) ${names[$i]} FAILED; its log:"
      tail -n 40 "$LOGS/${names[$i]}.log"
      if ((SECONDS - start < 120)); then
        for other in "${pids[@]}"; do [[ $other != done ]] && kill "$other" 2>/dev/null || true; done
        exit 1
      fi
    fi
    pids[$i]=done
  done
done
echo "training done in $((SECONDS - start)) s"

"$PY" -m benchmarks.long_run --profile gpu --out "$WORK" --pack "$OUT"
for name in "${names[@]}"; do echo "== $name"; grep -v "^\s*$" "$LOGS/$name.log" | tail -n 30; done >"$OUT/logs.txt"
[[ -f "$LOGS/gpu-usage.csv" ]] && { echo "== gpu usage"; cat "$LOGS/gpu-usage.csv"; } >>"$OUT/logs.txt"
grep -h "kept" "$LOGS"/*.log || true
ls -la "$OUT"
exit $failed
