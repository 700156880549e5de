# Run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= dataset
SHARDS ?= data/shards
SHARD_FLAGS ?=
SYNTH_FLAGS ?=
DEMO_FLAGS ?=
GPU_BENCH_WHEELS ?= wheels

.DEFAULT_GOAL := help
.PHONY: help install test lint bench gpu-bench-dry-run gpu-bench-wheels synth-data shard-data demo clean

help: ## List the targets with what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the exact version keeps pip from pulling a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install --disable-pip-version-check -q "torch==2.13.0"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its pinned dependencies (idempotent)

test: install ## Run the test suite
	$(PY) -m pytest -q

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check vlm data_tools launch tests

bench: install ## Run every benchmark (prints tables; minutes; not part of the tests)
	OMP_NUM_THREADS=1 $(PY) tests/bench/model_bench.py
	$(PY) tests/bench/shard_bench.py
	OMP_NUM_THREADS=2 $(PY) tests/bench/loader_bench.py
	$(PY) tests/bench/train_bench.py

gpu-bench-dry-run: install ## The GPU benchmark's every path on the CPU at tiny sizes (~2 min; tests/bench/README.md)
	$(PY) tests/bench/gpu_bench.py --dry-run

gpu-bench-wheels: install ## Wheels for tests/bench/gpu_bench.sh on an offline GPU machine, into GPU_BENCH_WHEELS (default wheels/)
	tests/bench/gpu_bench.sh --build-wheels $(GPU_BENCH_WHEELS)

synth-data: install ## Write the built-in synthetic picture corpus to $(DATASET)/
	$(PY) -m data_tools.synth --out $(DATASET) $(SYNTH_FLAGS)

shard-data: install ## Shard $(DATASET)/{pretrain,sft}_* into $(SHARDS)/{pretrain,sft}
	$(PY) -m data_tools.shard --jsonl $(DATASET)/pretrain_data.jsonl --images $(DATASET)/pretrain_images --out $(SHARDS)/pretrain --prefix pretrain $(SHARD_FLAGS)
	$(PY) -m data_tools.shard --jsonl $(DATASET)/sft_data.jsonl --images $(DATASET)/sft_images --out $(SHARDS)/sft --prefix sft $(SHARD_FLAGS)

demo: install ## The whole job offline: synthetic corpus -> shards -> vision -> pretrain -> SFT -> export -> eval (out/demo/)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(PY) -m vlm.demo $(DEMO_FLAGS)

clean: ## Remove caches and build outputs (keeps .venv, dataset/ and data/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
