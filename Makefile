# Quick start: `make demo` (main job on the CPU preset) and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean gpu-check

# libtpu is installed for ahead-of-time TPU compiles; these targets run on the CPU.
export JAX_PLATFORMS ?= cpu

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.param_matched --preset cpu-demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# On a GPU machine, with its own Python and JAX (CUDA plugin), no venv and no network; not part of
# `make test`. Writes results/gpu_check.{json,md}; fails fast if no GPU is visible.
GPU_PYTHON ?= python3
gpu-check:
	JAX_PLATFORMS= PYTHONPATH=. timeout 480 $(GPU_PYTHON) -m experiments.gpu_check $(GPU_CHECK_ARGS)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
