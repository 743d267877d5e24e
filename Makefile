# lion-local. `make demo` runs the smoke job; `make test` runs the whole suite. Both install first.
#   make install   creates .venv/ and installs lion-local with the serve and dev extras
#                  (torch pinned to the 2.13.0 CPU build on machines without CUDA)
#   make demo      the main job on the tiny CPU models (configs/tiny-cpu.yaml)
#   make test      every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= serve,dev
TORCH_CPU_PIN := torch==2.13.0
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "$(TORCH_CPU_PIN)"; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/lion-local run --config configs/tiny-cpu.yaml
	$(BIN)/lion-local status --config configs/tiny-cpu.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
