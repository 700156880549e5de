# Run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= dataset
SHARDS ?= data/shards
# Each stage's corpus: the first of these names found in $(DATASET), as published: the seed guide's, MiniMind-V
# 623a130's JSONL (pictures in a folder), MiniMind-V 3v's parquet (pictures inside). Set *_INPUT to use another.
PRETRAIN_INPUT ?= $(firstword $(wildcard $(addprefix $(DATASET)/,pretrain_data.jsonl pretrain_vlm_data.jsonl pretrain_i2t.parquet)))
SFT_INPUT ?= $(firstword $(wildcard $(addprefix $(DATASET)/,sft_data.jsonl sft_vlm_data.jsonl sft_i2t.parquet)))
SFT_MULTI_INPUT ?= $(wildcard $(DATASET)/sft_vlm_data_multi.jsonl)
PRETRAIN_IMAGES ?= $(DATASET)/pretrain_images
SFT_IMAGES ?= $(DATASET)/sft_images
SFT_MULTI_IMAGES ?= $(DATASET)/sft_multi_images
SHARD_FLAGS ?=
SYNTH_FLAGS ?=
DEMO_FLAGS ?=
GPU_BENCH_WHEELS ?= wheels

.DEFAULT_GOAL := help

# $(call shard_stage,INPUT,IMAGES,NAME): shard INPUT into $(SHARDS)/NAME (nothing when INPUT is empty).
shard_stage = $(if $(1),$(PY) -m data_tools.shard --input $(1) $(if $(filter %.parquet,$(1)),,--images $(2)) --out $(SHARDS)/$(3) --prefix $(3) $(SHARD_FLAGS))
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
	$(PY) tests/bench/plan_bench.py
	$(PY) tests/bench/remote_bench.py

gpu-bench-dry-run: install ## The GPU benchmark's every path on the CPU at tiny sizes (~2 min; tests/bench/README.md)
	$(PY) tests/bench/gpu_bench.py --dry-run

gpu-bench-wheels: install ## Wheels for tests/bench/gpu_bench.sh on an offline GPU machine, into GPU_BENCH_WHEELS (default wheels/)
	tests/bench/gpu_bench.sh --build-wheels $(GPU_BENCH_WHEELS)

synth-data: install ## Write the built-in synthetic picture corpus to $(DATASET)/
	$(PY) -m data_tools.synth --out $(DATASET) $(SYNTH_FLAGS)

shard-data: install ## Shard the corpora found in $(DATASET)/ (JSONL + images, or parquet) into $(SHARDS)/{pretrain,sft,sft_multi}
	@test -n "$(PRETRAIN_INPUT)$(SFT_INPUT)$(SFT_MULTI_INPUT)" || { echo "error: no corpus in $(DATASET)/: expected pretrain_data.jsonl, pretrain_vlm_data.jsonl or pretrain_i2t.parquet (likewise sft_*); set DATASET=DIR or PRETRAIN_INPUT=/SFT_INPUT=FILE" >&2; exit 2; }
	$(call shard_stage,$(PRETRAIN_INPUT),$(PRETRAIN_IMAGES),pretrain)
	$(call shard_stage,$(SFT_INPUT),$(SFT_IMAGES),sft)
	$(call shard_stage,$(SFT_MULTI_INPUT),$(SFT_MULTI_IMAGES),sft_multi)

demo: install ## The whole job offline: synthetic corpus -> shards -> vision -> pretrain -> SFT -> export -> eval (out/demo/)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(PY) -m vlm.demo $(DEMO_FLAGS)

clean: ## Remove caches and build outputs (keeps .venv, dataset/ and data/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
