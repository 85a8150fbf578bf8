# One way to run each task, the same locally and in CI.
#   make train   set up (if needed) and train the demo on an embedded local Ray, 2 workers
#   make test    set up (if needed) and run unit + integration tests (+ offline KubeRay checks)
#   make lint    ruff (+ shell, Dockerfile, workflow and YAML linters)
#   make image   build the project image (docker/build-image.sh)
#   make e2e     end-to-end tests with a real Docker engine (Compose cluster, KubeRay pod contract)
#   make e2e-compare  the head-loss measurement without GCS fault tolerance (README; not in CI)
#   make bench   benchmarks (BENCH_ARGS=--quick for a smoke run)
#   make gpu-check  on a host with one GPU: the GPU check table (~6 min; benchmarks/harness.py)
#   make gpu-wheels  the wheelhouse gpu-check installs Ray from on a host with no package index
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_ARGS ?=
# gpu-check runs on the host's own Python (its CUDA build of torch), not the CPU venv.
GPU_PYTHON ?= python3
GPU_WHEELS ?= .wheelhouse/gpu

.PHONY: setup train demo-data test unit integration lint image e2e e2e-compare bench gpu-check \
	gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e ".[dev]"
	touch $(STAMP)

train: setup
	$(BIN)/python -m training train --config training/configs/local.yaml $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest tests/unit tests/integration tests/kuberay $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest tests/unit tests/kuberay $(PYTEST_ARGS)

integration: setup
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/shellcheck $$(git ls-files '*.sh' .ci/run)
	$(BIN)/hadolint docker/Dockerfile docker/prometheus/Dockerfile
	$(BIN)/actionlint
	$(BIN)/yamllint -s cluster kuberay .github docker/prometheus

image: setup
	bash docker/build-image.sh

e2e: setup
	$(BIN)/python -m pytest tests/e2e -m "not comparison" $(PYTEST_ARGS)

e2e-compare: setup
	$(BIN)/python -m pytest tests/e2e -m comparison $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Ray from $(GPU_WHEELS) where it is missing, then the plan; BENCH_ARGS="--plan gpu-dry" is the
# same plan on the CPU at tiny sizes.
gpu-check:
	$(GPU_PYTHON) -m benchmarks.wheelhouse install $(GPU_WHEELS)
	$(GPU_PYTHON) -m benchmarks --plan gpu $(BENCH_ARGS)

gpu-wheels:
	$(PYTHON) -m benchmarks.wheelhouse build $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
