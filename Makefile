# Quick start: `make demo` (main job on the CPU preset) and `make test`. Both build the venv first.
#
# Which Python and which pins (docs/versions.md): with a Python 3.12 on the machine, make uses it and
# constraints.txt (the newest supported set, jax 0.12); otherwise `python3` (3.11) and
# constraints-oldest.txt (the oldest supported set, jax 0.10.2). CONSTRAINTS follows PYTHON's version.
# Both sets, as CI runs them: `make test` and `make test PYTHON=python3.11 VENV=.venv-oldest`.
PY312 := $(firstword $(foreach py,python3.12 $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(py) -c "" >/dev/null 2>&1 && echo $(py))))
PYTHON ?= $(or $(PY312),python3)
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
CONSTRAINTS ?= $(if $(filter 3.10 3.11,$(PY_VERSION)),constraints-oldest.txt,constraints.txt)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(basename $(notdir $(CONSTRAINTS)))
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint format install versions clean gpu-check

# libtpu is installed for ahead-of-time TPU compiles; these targets run on the CPU. The venv also
# gets scripts/cpu_platform_default.py, which sets JAX_PLATFORMS=cpu on machines with no
# accelerator, so `.venv/bin/python` is quiet there without this variable.
export JAX_PLATFORMS ?= cpu

$(STAMP): setup.cfg $(CONSTRAINTS) pyproject.toml scripts/cpu_platform_default.py
	@test -n "$(PY_VERSION)" || { echo "no Python found: set PYTHON=/path/to/python3.12 (or 3.11)"; exit 1; }
	@if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(PY_VERSION)" ]; then \
		echo "$(VENV) holds another Python than $(PYTHON) ($(PY_VERSION)): rebuilding it"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	SITE=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		cp scripts/cpu_platform_default.py $$SITE/_rt_jax_cpu_default.py && \
		echo "import _rt_jax_cpu_default" > $$SITE/_rt_jax_cpu_default.pth
	rm -f $(VENV)/.installed*
	touch $(STAMP)

install: $(STAMP)

versions: $(STAMP)
	@$(BIN)/python -c 'import sys, jax, jaxlib, flax, optax, orbax.checkpoint as ocp; print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__)'

demo: $(STAMP)
	$(BIN)/python -m experiments.param_matched --preset cpu-demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite without the `slow` marker (README: time on 2 cores); `make test-slow` runs the rest.
test: lint versions
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# On a GPU machine, with its own Python and JAX (CUDA plugin), no venv and no network; not part of
# `make test`. Writes results/gpu_check.{json,md}; fails fast if no GPU is visible.
GPU_PYTHON ?= python3
gpu-check:
	JAX_PLATFORMS= PYTHONPATH=. timeout 480 $(GPU_PYTHON) -m experiments.gpu_check $(GPU_CHECK_ARGS)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .venv .venv-oldest *.egg-info .pytest_cache .ruff_cache
