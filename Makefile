# chameleon-sglang: one pin (sglang.pin), one virtualenv (.venv), the patch set, the built-in assets.
include sglang.pin

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-$(SGLANG_VERSION)
PRESET ?= tiny
PORT   ?= 30000
PYTEST_ARGS ?=

.PHONY: setup apply-patches revert-patches check-patches assets serve lint test test-fast gpu-check clean

## setup: build .venv (CPU torch, sglang==$(SGLANG_VERSION) --no-deps, pinned deps; GPU deps on NVIDIA machines)
setup: $(STAMP)

$(STAMP): sglang.pin requirements/cpu.txt requirements/cpu-constraints.txt requirements/dev.txt requirements/gateway.txt pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	@touch $@

## apply-patches / revert-patches / check-patches: the patch set on the installed sglang
apply-patches: setup
	$(PY) tools/patchset.py apply

revert-patches: setup
	$(PY) tools/patchset.py revert

check-patches: setup
	$(PY) tools/patchset.py check

## assets: the built-in model and adapters of $(PRESET) (cached under .cache/assets)
assets: setup
	$(PY) -m chameleon_sglang.dev.assets --preset $(PRESET)

## serve: everything needed, then the server with --chameleon on 127.0.0.1:$(PORT)
serve: apply-patches assets
	$(PY) -m chameleon_sglang.dev.serve --preset $(PRESET) --port $(PORT)

## gpu-check: the GPU LoRA path on one NVIDIA GPU with torch + triton only (no SGLang, no .venv)
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) kernels/gpu_check.py --out gpu-check.json

## lint: ruff (lint and format check) over the whole tree
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## test-fast: the tests that start no server and no long subprocess (core, integration, kernels, eval)
test-fast: apply-patches
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## test: everything needed, lint, then the whole test suite (slow tests included)
test: apply-patches assets lint
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
