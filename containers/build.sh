#!/usr/bin/env bash
# Build and push both images, tagged with the git commit, and print the variables that make the
# Flyte tasks use them at registration time (see docs/pipeline.md).
#   containers/build.sh ghcr.io/my-org        # registry prefix; needs `docker login` first
set -euo pipefail
cd "$(dirname "$0")/.."
registry="${1:?usage: containers/build.sh <registry prefix, e.g. ghcr.io/my-org>}"
tag="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- rsd_core tasks workflows rsd_cli || echo -dirty)"
docker build -f containers/cpu.Dockerfile -t "$registry/rsd-cpu:$tag" .
docker build -f Dockerfile -t "$registry/rsd-gpu:$tag" .
docker push "$registry/rsd-cpu:$tag"
docker push "$registry/rsd-gpu:$tag"
echo "export RSD_IMAGE=$registry/rsd-cpu:$tag RSD_GPU_IMAGE=$registry/rsd-gpu:$tag"
