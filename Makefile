# The commands a person types. `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
SCRATCH := $(CURDIR)/.flyte-tmp

.PHONY: help setup demo test test-slow lint bench-throughput bench-sampling bench-frechet bench-eigenspace bench-restoration \
	bench-faults bench-streaming bench-restore bench-distill-ab teacher-smoke \
	bench-long-run bench-teacher-ab bench-posthoc-ema bench-references bench-serving bench-selection-domains

help:  ## list the commands
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

setup:  ## create .venv with all requirements (apt packages too, as root)
	@bash scripts/setup.sh

demo: setup  ## run the whole pipeline (cpu-demo preset) on bundled Fashion-MNIST, on CPU (~15 min)
	.venv/bin/rsd run --preset cpu-demo

test: setup  ## run the test suite (no GPU, no network needed)
	@mkdir -p $(SCRATCH)
	TMPDIR=$(SCRATCH) FLYTE_LOCAL_CACHE_ENABLED=false $(PY) -m pytest -q -m "not slow" --timeout 900 --durations=15

test-slow: setup  ## the slow tests (fault injection, servers)
	@mkdir -p $(SCRATCH)
	TMPDIR=$(SCRATCH) $(PY) -m pytest -q -m slow --timeout 1800

lint: setup  ## ruff
	.venv/bin/ruff check .

bench-throughput: setup  ## images/s of a teacher training step, fp32 eager vs the default fast path
	$(PY) -m benchmarks.train_throughput

teacher-smoke: setup  ## train a teacher for a few minutes on corrupted Fashion-MNIST, write a grid
	$(PY) -m benchmarks.teacher_smoke

bench-sampling: setup  ## one-step generation vs the 35-NFE and truncated teacher samplers
	$(PY) -m benchmarks.sampling_speed

bench-frechet: setup  ## the Frechet distance's eigenvalue form vs scipy sqrtm at dim 2048
	$(PY) -m benchmarks.frechet

bench-eigenspace: setup  ## the linear eigenspace-recovery experiment (a few minutes)
	$(PY) -m benchmarks.eigenspace

bench-restore: setup  ## restore held-out observations: generator (encoder), teacher DPS, classical; trains missing models
	$(PY) -m benchmarks.restore --train --n-images 32 --batch-size 32 --threads 1

bench-distill-ab: setup  ## the reference loops' distillation choices at equal steps (needs bench-restore's teachers)
	$(PY) -m benchmarks.distill_ab --seeds 0,1 --variants observed,further,observed-all --threads 1

bench-restoration: setup  ## five corruptions of Fashion-MNIST, teacher vs student: docs/results.md (~3.8 h)
	$(PY) -m benchmarks.restoration --budget 10 --distill-budget 30 --distill-lr-drop-at 0.667 --threads 1

bench-references: setup  ## the clean model and the floor beside the restoration table's rows (~20 min)
	$(PY) -m benchmarks.restoration --references-only --budget 10 --threads 1

bench-teacher-ab: setup  ## teacher variants at equal wall time (10 min each) on inpainting p = 0.8
	$(PY) -m benchmarks.teacher_ab --task inpaint-0.8 --minutes 10 --variants base,batch32-rampup50 --threads 1

bench-posthoc-ema: setup  ## the teacher's EMA length chosen after training by Proximal FD (10 min, then six teachers scored)
	$(PY) -m benchmarks.posthoc_ema --task inpaint-0.8 --minutes 10 --threads 1

bench-long-run: setup  ## inpainting p = 0.8 teacher + student and the clean reference, 10-60 min points (~2.5 h, 2 cores)
	$(PY) -m benchmarks.long_run --task inpaint-0.8 --variant clean --distill-minutes "" --threads 1 --quiet & \
	$(PY) -m benchmarks.long_run --task inpaint-0.8 --variant corrupted --threads 1 --quiet; wait

bench-serving: setup  ## load test of rsd serve: generator and restorer, 4 clients x 60 s each (~10 min)
	$(PY) -m benchmarks.serving

bench-selection-domains: setup  ## Proximal FD vs an independent FD on three datasets (~1 h, one core)
	$(PY) -m benchmarks.selection_domains --threads 1 --quiet

bench-faults: setup  ## the fault-injection table
	$(PY) -m benchmarks.faults

bench-streaming: setup  ## teacher training's peak memory on 10k vs 200k observations, streamed vs in-memory speed
	$(PY) -m benchmarks.data_streaming
