"""ONNX export and onnxruntime-genai variants: fidelity to torch, runtimes, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compress.models import sample_texts
from serve.artifact import load_artifact
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.conftest import run_cli
from tests.unit.variant_fixtures import run, run_lm_variants, write_texts

LM_VARIANTS = ["onnx-fp32", "onnx-int8", "onnx-int4", "genai-fp32", "genai-int8",
               "genai-int4", "torch-nf4"]


@pytest.fixture(scope="module")
def lm(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-lm")
    return run_lm_variants(tiny, root, [
        "{name: onnx-fp32, kind: export}",
        "{name: onnx-int8, kind: quantize, method: int8-dynamic}",
        "{name: onnx-int4, kind: quantize, method: int4-weight-only, block_size: 16}",
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}",
        "{name: genai-int8, kind: export, format: onnx-genai, precision: int8}",
        "{name: genai-int4, kind: export, format: onnx-genai, precision: int4, block_size: 16}",
        "{name: torch-nf4, kind: quantize, method: nf4}",
        "{name: static-lm, kind: quantize, method: int8-static}",
        "{name: genai-fp16-cpu, kind: export, format: onnx-genai, precision: fp16}",
    ], eval_texts=12)


@pytest.fixture(scope="module")
def cls(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-cls")
    write_texts(root / "eval.jsonl", 24, labels=True)
    return run(f"""
name: c
task: text-classification
base: {{path: {tiny["bert"]}}}
adapters: [{{path: {tiny["bert-lora"]}}}]
data: {{eval: {{path: eval.jsonl}}}}
variants:
  - {{name: onnx-fp32, kind: export}}
  - {{name: onnx-fp16, kind: export, precision: fp16}}
""", root)


def _torch_greedy(folder, prompt, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    rest = out[0, ids["input_ids"].shape[1]:].tolist()
    rest = rest[:rest.index(3)] if 3 in rest else rest  # 3 = </s>
    return tok.decode(rest, skip_special_tokens=True)


def test_lm_variants_build_load_and_are_measured(lm):
    out, records = lm
    for name in LM_VARIANTS:
        assert records[name].status == "built", (name, records[name].error)
        manifest = load_artifact(out / name).manifest
        assert manifest.metrics["metric"] == "perplexity"
        assert manifest.metrics["agreement"] is not None and manifest.metrics["kl"] >= -1e-6
        assert manifest.gate["verdict"] == "passed", (name, manifest.gate)
        runtime = load_runtime(out / name)
        result = runtime.generate(["the movie was"], GenerationParams(max_new_tokens=4))[0]
        assert 0 < result.completion_tokens <= 4
    assert load_artifact(out / "genai-int4").manifest.format == "onnx-genai"


def test_fp32_exports_match_torch_greedy(lm):
    out, _ = lm
    reference = out / "merge"
    for name in ("onnx-fp32", "genai-fp32"):
        runtime = load_runtime(out / name)
        for prompt in sample_texts(3):
            got = runtime.generate([prompt], GenerationParams(max_new_tokens=10))[0].text
            assert got == _torch_greedy(reference, prompt, 10), (name, prompt)
    assert load_artifact(out / "onnx-fp32").manifest.metrics["export_check"][
        "greedy_identical"] == 1.0


def test_genai_logprobs_and_batches_match_torch(lm):
    out, _ = lm
    torch_rt, genai = load_runtime(out / "merge"), load_runtime(out / "genai-fp32")
    texts = ["the movie was great and fun", "what is the capital of france ?"]
    for (ids_t, lp_t), (ids_g, lp_g) in zip(torch_rt.next_token_logprobs(texts),
                                            genai.next_token_logprobs(texts), strict=True):
        assert np.array_equal(ids_t, ids_g)
        assert np.abs(lp_t - lp_g).max() < 1e-3
    params = GenerationParams(max_new_tokens=6)
    batch = genai.generate([*texts, "i hate it"], params)
    alone = [genai.generate([t], params)[0].text for t in [*texts, "i hate it"]]
    assert [g.text for g in batch] == alone


def test_quantized_lm_files_are_smaller(lm):
    out, _ = lm
    size = {n: load_artifact(out / n).manifest.metrics["weight_bytes"] for n in LM_VARIANTS}
    assert size["onnx-int4"] < size["onnx-fp32"] and size["onnx-int8"] < size["onnx-fp32"]
    assert size["genai-int4"] < size["genai-fp32"] and size["genai-int8"] < size["genai-fp32"]


def test_lm_bad_inputs(lm):
    out, records = lm
    assert "int8-static is not available for text-generation" in records["static-lm"].error
    assert "GPU-only" in records["genai-fp16-cpu"].error
    assert "genai-fp16-cpu" in records["genai-fp16-cpu"].error
    assert not (out / "static-lm").exists()


def test_classifier_fp32_matches_torch(cls):
    out, _records = cls
    check = load_artifact(out / "onnx-fp32").manifest.metrics["export_check"]
    assert check["max_abs_diff"] <= check["allowed_abs_diff"]
    texts = sample_texts(8)
    ref = load_runtime(out / "merge").class_probabilities(texts)
    got = load_runtime(out / "onnx-fp32").class_probabilities(texts)
    assert np.abs(ref - got).max() < 1e-5
    half = load_runtime(out / "onnx-fp16").class_probabilities(texts)
    assert np.abs(ref - half).max() < 1e-2
    fp16 = load_artifact(out / "onnx-fp16").manifest
    assert "CUDA" in fp16.lineage["stages"][-1]["details"]["fp16"]["note"]
    # the tiny graph is mostly structure, so only "smaller" (real models: about half)
    assert fp16.metrics["weight_bytes"] < load_artifact(
        out / "onnx-fp32").manifest.metrics["weight_bytes"]


def test_cli_rerun_reuses_and_shows_gates(cls):
    out, _ = cls
    result = run_cli("compress", str(out.parent / "recipe.yaml"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "unchanged, reusing" in result.stdout
    assert "accuracy=" in result.stdout and "passed" in result.stdout
    statuses = {s["name"]: s["status"] for s in json.loads((out / "run.json").read_text())["steps"]}
    assert set(statuses.values()) == {"cached"}, statuses


def test_unexportable_architecture(tiny, tmp_path):
    from transformers import AutoTokenizer, FNetConfig, FNetForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    config = FNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    FNetForSequenceClassification(config).save_pretrained(tmp_path / "fnet")
    tok.save_pretrained(tmp_path / "fnet")
    write_texts(tmp_path / "eval.jsonl", 8, labels=True)
    _, records = run(f"""
name: fnet
task: text-classification
base: {{path: {tmp_path / "fnet"}}}
data: {{eval: {{path: eval.jsonl}}}}
variants: [{{name: onnx-fp32, kind: export}}]
""", tmp_path)
    error = records["onnx-fp32"].error
    assert "variant onnx-fp32" in error and "format onnx cannot export" in error
    assert "FNetForSequenceClassification" in error
