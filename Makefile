# Two commands do everything on a fresh machine:
#   make run    set up, then run muselab (a demo on the tiny models; ARGS="..." runs any command)
#   make test   set up, then ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch first: installing the project first would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
ifeq ($(strip $(ARGS)),)
	./scripts/demo.sh
else
	$(BIN)/muselab $(ARGS)
endif

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output
