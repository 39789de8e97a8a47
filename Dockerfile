# GPU image for the RSD pipeline (Flyte tasks, both training stages on CUDA).
# Build from the repo root:  docker build -t <registry>/rsd-gpu:<tag> .
# The torch wheel pinned in requirements.txt carries its own CUDA 13 libraries; the base image
# supplies the CUDA runtime layout and driver hooks the NVIDIA container toolkit expects.
ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ghcr.io/astral-sh/uv:0.9.5 AS uv
FROM ${CUDA_BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RSD_CACHE_DIR=/home/rsd/.cache/rsd
COPY --from=uv /uv /usr/local/bin/uv

# git: code version tags; mricron-data: the bundled brain-MRI source (Fashion-MNIST is read from
# /usr/share/datasets when present; clusters normally read corrupted datasets from S3).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates git mricron-data \
 && rm -rf /var/lib/apt/lists/*

# Python 3.11 (the version the pinned set was verified with) and the pinned requirements,
# in their own layer so code changes do not reinstall torch.
COPY requirements.txt requirements-nodeps.txt /tmp/req/
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/venv \
 && uv pip install --no-cache -r /tmp/req/requirements.txt \
 && uv pip install --no-cache --no-deps -r /tmp/req/requirements-nodeps.txt

RUN useradd --create-home --uid 1000 rsd
WORKDIR /home/rsd/app
COPY --chown=rsd:rsd pyproject.toml README.md ./
COPY --chown=rsd:rsd rsd_core ./rsd_core
COPY --chown=rsd:rsd rsd_cli ./rsd_cli
COPY --chown=rsd:rsd tasks ./tasks
COPY --chown=rsd:rsd workflows ./workflows
RUN uv pip install --no-cache --no-deps -e . && chown -R rsd:rsd /opt/venv
USER rsd
# Flyte's pyflyte-execute imports the tasks from here (fast registration replaces only the code).
ENV PYTHONPATH=/home/rsd/app
