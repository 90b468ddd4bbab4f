"""CUDA paths, run only where a GPU is present (CI has none: every test here is skipped)."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEXTS = ["the movie was great", "i hate this dull film", "what is the capital of france ?"]


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory) -> dict[str, Path]:
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    out = {}
    root = tmp_path_factory.mktemp("gpu")
    for task, base, adapter in (("text-classification", "bert", "bert-lora"),
                                ("text-generation", "llama", "llama-lora")):
        recipe = root / f"{base}.yaml"
        recipe.write_text(f"name: g\ntask: {task}\nbase: {{path: {tiny[base]}}}\n"
                          f"adapters: [{{path: {tiny[adapter]}}}]\n")
        run_recipe(load_recipe(recipe), root / base)
        out[task] = root / base / "merge"
    return out


def test_torch_runtime_on_cuda_matches_cpu(merged):
    from serve.runtime.loader import load_runtime

    cpu = load_runtime(merged["text-classification"], device="cpu")
    gpu = load_runtime(merged["text-classification"], device="cuda")
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.class_probabilities(TEXTS), cpu.class_probabilities(TEXTS),
                               atol=1e-4)


def test_torch_runtime_greedy_generation_on_cuda_matches_cpu(merged):
    from serve.runtime.loader import load_runtime
    from serve.runtime.protocol import GenerationParams

    params = GenerationParams(max_new_tokens=8)
    cpu = load_runtime(merged["text-generation"], device="cpu").generate(TEXTS, params)
    gpu = load_runtime(merged["text-generation"], device="cuda").generate(TEXTS, params)
    assert [g.text for g in gpu] == [c.text for c in cpu]


def test_onnxruntime_lists_cuda_provider():
    ort = pytest.importorskip("onnxruntime")
    assert "CUDAExecutionProvider" in ort.get_available_providers(), \
        "install the gpu extra (onnxruntime-gpu) to use the CUDA EP"


def test_engine_on_cuda_interleaves_like_alone(merged):
    """8 concurrent greedy streams through the continuous-batching engine on CUDA give each
    request's tokens run alone."""
    from bench.gpu_check import alone_and_together
    from serve.runtime.loader import load_runtime

    runtime = load_runtime(merged["text-generation"], device="cuda")
    prompts = [list(runtime.tokenizer(t)["input_ids"]) for t in TEXTS * 3][:8]
    alone, together = alone_and_together(runtime, prompts, 24)
    assert sum(map(len, together)) > 0
    assert together == alone
