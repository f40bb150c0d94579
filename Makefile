# Quick start:  make demo   (serve the tiny pipeline, write one PNG)   |   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options, e.g. PIP_OPTIONS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_OPTIONS ?=
TINY_SD := build/tiny-sd

.PHONY: install demo test lint test-gpu bench-gpu bench-families serve-tiny load-test perf load-report soak docker-smoke clean
# Against a running server (e.g. `make serve-tiny` in another terminal):
HOST ?= localhost
DURATION ?= 60s
USERS ?= 8
# make soak serves the tiny pipeline itself, e.g. make soak SOAK_DURATION=2h
SOAK_DURATION ?= 10m
SOAK_USERS ?= 5

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_OPTIONS) -e ".[test,load]"
	touch $@

$(TINY_SD)/model_index.json: $(VENV)/.installed src/stepdiff/tiny.py
	$(PY) -m stepdiff make-tiny sd $(TINY_SD)

demo: $(TINY_SD)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) -m stepdiff demo --pipeline $(TINY_SD) --out outputs

serve-tiny: $(TINY_SD)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) -m stepdiff serve --pipeline $(TINY_SD)

load-test: $(VENV)/.installed
	mkdir -p results/locust
	$(VENV)/bin/locust -f load_tests/locustfile.py --headless -u $(USERS) -r $(USERS) -t $(DURATION) \
		--host http://$(HOST):8000 --grpc-url $(HOST):8001 --csv results/locust/locust --html results/locust/report.html

perf: $(VENV)/.installed
	$(PY) load_tests/perf_analyzer.py --url $(HOST):8001 --out results/perf_analyzer

load-report: $(VENV)/.installed
	$(PY) load_tests/report.py --perf results/perf_analyzer --locust results/locust/locust --out results/load

soak: $(TINY_SD)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) load_tests/soak.py --pipeline $(TINY_SD) --duration $(SOAK_DURATION) --users $(SOAK_USERS) --out results/soak

# Build the Docker image and serve the tiny pipeline from a container; needs a running dockerd (README: Docker).
# Not part of `make test` (.ci/run runs it after). E.g. make docker-smoke DOCKER_SMOKE_OPTIONS="--out results/x"
DOCKER_SMOKE_OPTIONS ?=
docker-smoke: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) deploy/docker_smoke.py $(DOCKER_SMOKE_OPTIONS)

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not gpu"

# ruff's rules and line length are in pyproject.toml; `ruff format .` fixes the formatting
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a CUDA machine: the side-by-side benchmark (SD-1.5 size, random weights) into BENCH_OUT, then bench-families
BENCH_OUT ?= results/bench-$(shell date +%Y-%m-%d)
bench-gpu: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m stepdiff make-tiny sd15-size build/sd15-size --dtype float16
	HF_HUB_OFFLINE=1 $(PY) load_tests/bench_batching.py --pipeline build/sd15-size --out $(BENCH_OUT) --clear-compile-cache --cold-start
	$(MAKE) bench-families BENCH_OUT=$(BENCH_OUT)

# On a CUDA machine: per-step time in-process vs Triton (concurrency 1 and 8) of each family's `*-size` build
# (random weights), each in its dtype, into BENCH_OUT/families (one table per build + results.md over all)
BENCH_FAMILIES ?= sd15-size:float16 sdxl-size:float16 sd3-size:float16 flux-size:bfloat16 qwenimage-size:bfloat16
bench-families: $(VENV)/.installed
	set -e; for build in $(BENCH_FAMILIES); do \
		name=$${build%%:*}; dtype=$${build##*:}; \
		HF_HUB_OFFLINE=1 $(PY) -m stepdiff make-tiny $$name build/$$name --dtype $$dtype; \
		HF_HUB_OFFLINE=1 $(PY) load_tests/bench_families.py --pipeline build/$$name --dtype $$dtype \
			--out $(BENCH_OUT)/families; \
	done

# On a CUDA machine: host syncs per step, graph replay vs stock diffusers (tests/test_gpu.py)
test-gpu: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m gpu tests/test_gpu.py

clean:
	rm -rf build outputs .pytest_cache
