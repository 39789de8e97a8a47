#!/usr/bin/env bash
# GPU path check in one go: pretraining + distillation at 64x64x3 in bf16, then DDP on all visible
# GPUs (NCCL), printing images/s and MFU per phase. See scripts/gpu_check.py for the details.
#
# Needs: python3 with torch (a CUDA build) and numpy, plus pydantic, safetensors and tqdm, which
# this script installs with pip if they are missing (--user outside a virtualenv). Nothing else
# from requirements.txt: no flytekit, mlflow or pyarrow.
#
#   bash scripts/gpu_check.sh                      # defaults: 300 steps per phase, batch 64 per GPU
#   bash scripts/gpu_check.sh --steps 500 --batch 128
#   RSD_WHEELS=/path/to/wheels bash scripts/gpu_check.sh   # offline: install from a folder of wheels
#   bash scripts/gpu_check.sh --device cpu --steps 2       # smoke path without a GPU
#
# Exit codes: 0 ok, 2 missing packages or heavy imports, 3 no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NEEDED=(pydantic safetensors tqdm)
echo "gpu_check.sh needs: torch (CUDA), numpy; installs if missing: ${NEEDED[*]}"

for pkg in torch numpy; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    echo "error: $PY cannot import $pkg; install a CUDA build of torch and numpy first" >&2
    exit 2
  fi
done

missing=()
for pkg in "${NEEDED[@]}"; do
  "$PY" -c "import $pkg" 2>/dev/null || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  flags=()
  # --user is refused inside a virtualenv, whose site-packages is ours to write anyway.
  "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' || flags+=(--user)
  if [[ -n "${RSD_WHEELS:-}" ]]; then
    flags+=(--no-index --find-links "$RSD_WHEELS")
  fi
  "$PY" -m pip install -q "${flags[@]}" "${missing[@]}"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
