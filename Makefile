# One way to run each task, the same locally and in CI.
#   make train   set up (if needed) and train the demo on an embedded local Ray, 2 workers
#   make test    set up (if needed) and run unit + integration tests (+ offline KubeRay checks)
#   make lint    ruff (+ shell, Dockerfile, workflow and YAML linters)
#   make image   build the project image (docker/build-image.sh)
#   make e2e     end-to-end tests with a real Docker engine (Compose cluster, KubeRay pod contract)
#   make e2e-compare  the head-loss measurement without GCS fault tolerance (README; not in CI)
#   make bench   benchmarks (BENCH_ARGS=--quick for a smoke run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup train demo-data test unit integration lint image e2e e2e-compare bench clean

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

clean:
	rm -rf runs .pytest_cache .ruff_cache
