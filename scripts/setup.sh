#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv with everything the project needs.
# RSD_VENV_CACHE=<dir>: keep venvs there keyed by a hash of the requirement files and link
# .venv to the matching one (CI reuses it across runs; a new machine builds it once).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_missing=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_missing+=(dataset-fashion-mnist)
[ -d /usr/share/mricron/templates ] || apt_missing+=(mricron-data)
if [ ${#apt_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages ${apt_missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  else
    echo "setup: please run: sudo apt-get install -y ${apt_missing[*]}" >&2
    exit 1
  fi
fi

hash=$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt | sha256sum | cut -c1-16)
if [ -n "${RSD_VENV_CACHE:-}" ]; then
  venv="$RSD_VENV_CACHE/$hash"
else
  venv="$PWD/.venv"
fi
if [ ! -f "$venv/.rsd-complete-$hash" ]; then
  echo "setup: building the virtual environment at $venv (a few minutes on a new machine)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install -q -r requirements.txt -r requirements-dev.txt
  "$venv/bin/pip" install -q --no-deps -r requirements-nodeps.txt
  touch "$venv/.rsd-complete-$hash"
fi
if [ "$venv" != "$PWD/.venv" ]; then
  rm -rf .venv
  ln -sfn "$venv" .venv
fi
# The project itself, editable and without dependencies: cheap, and always this checkout.
.venv/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "setup: pip install -e . failed" >&2; exit 1; }
echo "setup: ready (.venv -> $venv)"
