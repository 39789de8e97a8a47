# The commands a person types. `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
SCRATCH := $(CURDIR)/.flyte-tmp

.PHONY: help setup demo test test-slow lint bench-throughput teacher-smoke

help:  ## list the commands
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

setup:  ## create .venv with all requirements (apt packages too, as root)
	@bash scripts/setup.sh

demo: setup  ## run the main job on the bundled dataset (CPU)
	@mkdir -p $(SCRATCH)
	TMPDIR=$(SCRATCH) $(PY) -m benchmarks.teacher_smoke

test: setup  ## run the test suite (no GPU, no network needed)
	@mkdir -p $(SCRATCH)
	TMPDIR=$(SCRATCH) FLYTE_LOCAL_CACHE_ENABLED=false $(PY) -m pytest -q -m "not slow" --timeout 900

test-slow: setup  ## the slow tests (fault injection, servers)
	@mkdir -p $(SCRATCH)
	TMPDIR=$(SCRATCH) $(PY) -m pytest -q -m slow --timeout 1800

lint: setup  ## ruff
	.venv/bin/ruff check .

bench-throughput: setup  ## images/s of a teacher training step, fp32 eager vs the default fast path
	$(PY) -m benchmarks.train_throughput

teacher-smoke: setup  ## train a teacher for a few minutes on corrupted Fashion-MNIST, write a grid
	$(PY) -m benchmarks.teacher_smoke
