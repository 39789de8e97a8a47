# CPU image for the light tasks (corrupt, select, export, register) and for CPU-only clusters.
# Build from the repo root:  docker build -f containers/cpu.Dockerfile -t <registry>/rsd-cpu:<tag> .
# torch comes from the CPU wheel index (about 1 GB instead of 5.5 GB with the CUDA libraries).
FROM python:3.11.7-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RSD_CACHE_DIR=/home/rsd/.cache/rsd

# The bundled sources (as scripts/setup.sh installs them) and git for code-version tags.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends git dataset-fashion-mnist mricron-data \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.txt requirements-nodeps.txt /tmp/req/
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir -U pip \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir -r /tmp/req/requirements.txt \
 && pip install --no-cache-dir --no-deps -r /tmp/req/requirements-nodeps.txt

RUN useradd --create-home --uid 1000 rsd
WORKDIR /home/rsd/app
COPY --chown=rsd:rsd pyproject.toml README.md ./
COPY --chown=rsd:rsd rsd_core ./rsd_core
COPY --chown=rsd:rsd rsd_cli ./rsd_cli
COPY --chown=rsd:rsd tasks ./tasks
COPY --chown=rsd:rsd workflows ./workflows
RUN pip install --no-cache-dir --no-deps -e . && chown -R rsd:rsd /opt/venv
USER rsd
# Flyte's pyflyte-execute imports the tasks from here (fast registration replaces only the code).
ENV PYTHONPATH=/home/rsd/app
