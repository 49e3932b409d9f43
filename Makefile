# Two commands do everything on a fresh machine:
#   make run    set up, then start the studio (tiny offline models unless PRESET=default; ARGS="..." runs any command)
#   make test   set up, then ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch first: installing the project first would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PRESET ?= tiny
PORT ?= 8501

.PHONY: setup run demo test lint browser fuzz bench bench-int8-full bench-scaling clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
ifeq ($(strip $(ARGS)),)
	$(BIN)/muselab ui --preset $(PRESET) --port $(PORT)
else
	$(BIN)/muselab $(ARGS)
endif

demo: setup
	./scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The browser test drives Debian's chromium (Playwright's own browser download needs the network).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed: the browser test will be skipped (sudo apt-get install chromium)"; fi; }

# The Ray Serve workers' extra (about a minute to install): the tests start a Ray cluster on
# 127.0.0.1; `make run` does without it.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	touch $@

test: lint browser $(VENV)/.installed-ray
	$(BIN)/python -m pytest

# The API fuzzed harder than `make test` does: 500 examples an operation (about half an hour).
fuzz: setup
	MUSELAB_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest tests/test_fuzz.py

bench: setup
	mkdir -p bench/results
	$(BIN)/muselab bench --quick --json bench/results/quick.json --docs docs/PERFORMANCE.md

# int8 activations (--quantize int8-full) for SD 1.x against the same baseline, and for the sd-turbo
# fast path against PyTorch float: their calibration takes minutes,
# so they have a run (and a docs section) of their own.
bench-int8-full: setup
	mkdir -p bench/results
	$(BIN)/muselab bench --quick --only int8-full,fast-int8-full --json bench/results/int8-full.json --docs docs/PERFORMANCE.md

# Jobs per minute in-process against Ray Serve (1 and 2 replicas), tiny and full-size random
# models, on a Ray cluster it starts on 127.0.0.1 (a quarter of an hour here): docs/SCALING.md.
bench-scaling: $(VENV)/.installed-ray
	mkdir -p bench/results
	$(BIN)/python -m muselab.bench.scaling --full --json bench/results/scaling.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output
