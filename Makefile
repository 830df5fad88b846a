# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint crds bench

setup: $(VENV)/.installed

# torch is pinned to the CPU build on purpose: a looser pin pulls a multi-GB CUDA build.
# Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where no local wheel is configured.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/loraplane demo

test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

crds: setup
	$(BIN)/loraplane crds --checkout

bench: setup
	$(BIN)/python benchmarks/bench_allocation.py --n 300
	$(BIN)/python benchmarks/bench_engine.py
