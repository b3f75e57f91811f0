# The two commands a newcomer needs. Both set up .venv/ on first use (scripts/bootstrap.sh).
SHELL := /bin/bash
VENV ?= .venv
export GIST_DIST_CACHE ?= $(CURDIR)/.cache
export HF_HOME ?= $(CURDIR)/.cache/hf
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast lint format setup setup-test

setup:
	@./scripts/bootstrap.sh

setup-test:
	@WITH_TEST_SYSTEM_PACKAGES=1 ./scripts/bootstrap.sh

## make demo: train SmolLM2-135M-Instruct with 1 gist token on 2 CPU ranks (ZeRO-3, packed rows), evaluate
## on held-out generated tasks, then summarise.
demo: setup
	@rm -rf runs/demo  # the demo always starts fresh (a kept output_dir would resume)
	@EVAL=1 ./launchers/local.sh 2 configs/smollm2.yaml output_dir=runs/demo $(ARGS)

## make test: the whole test suite (unit, 2-rank ZeRO-3, launchers, real Slurm); runs on after a failure.
## Two pytest-xdist workers: the suite's processes leave about half the 2-core box idle when run one test
## at a time (ranks waiting on each other, on Slurm, on imports). Each file runs whole on one worker
## (tests/conftest.py says why). TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 2
test: setup-test lint
	@$(VENV)/bin/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

## make test-fast: the unit tests alone (no process launches, no multi-rank runs): the inner loop, under 2 minutes.
test-fast: setup-test
	@GIST_DIST_TEST_FAST=1 $(VENV)/bin/python -m pytest -q -n 2 -m "not slow and not gpu" $(PYTEST_ARGS)

## make lint: ruff's lint and format checks (120 columns, pyproject.toml); make format rewrites in place.
lint: setup-test
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup-test
	@$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
