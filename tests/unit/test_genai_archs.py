"""onnx-genai (onnxruntime-genai 0.18's builder) on the architectures it builds beyond Llama:
built through the variant code, fp32 equals torch's greedy tokens, the serving engine's
step LM equals onnxruntime-genai's own generator, config rewrites are in the manifest,
and architectures it cannot build are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compress.stages.genai_build import GenaiBuildError, check_genai_supported
from compress.tiny_archs import build_decoder
from serve.artifact import load_artifact
from serve.runtime.loader import load_runtime
from tests.unit.engine_steps import check_together_equals_alone, lone_genai
from tests.unit.variant_fixtures import run, write_texts

# SmolLM3: layer 1 without RoPE; HunYuanDenseV1: a graph with position_ids input
# Qwen3_5: a hybrid (recurrent state per sequence)
ARCHS = ["Gemma3", "Gemma2", "Gemma", "Qwen3", "Qwen2", "Mistral", "Phi3", "Phi3LongRoPE",
         "SmolLM3", "Granite", "HunYuanDenseV1", "Qwen3_5"]
#: Quantized builds served too (int8: the per-row decode of dynamic-int8 graphs)
QUANTIZED = {"Gemma3": ["int4"], "Qwen3": ["int4"], "SmolLM3": ["int4"],
             "Qwen3_5": ["int4", "int8"]}
N_NEW = 20
# 2 layers, windows of 16 (shorter than a prompt plus N_NEW tokens), wide random weights
# (distinct greedy tokens); this path's Phi-3 has no window and an original context of 128
GENAI_SHAPE = {"layers": 2, "window": 16, "init_std": 0.5}
GENAI_FIELDS = {"phi3": {"sliding_window": None, "original_max_position_embeddings": 128}}
EOS = 3  # compress.tiny's </s>


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"genai-{arch}")
        base = _base(arch, root / "base")
        write_texts(root / "eval.jsonl", 6, labels=False)
        quantized = "".join(f"  - {{name: genai-{p}, kind: export, format: onnx-genai, "
                            f"precision: {p}, block_size: 16}}\n"
                            for p in QUANTIZED.get(arch, []))
        folder, records = run(f"""
name: {arch.lower()}
task: text-generation
base: {{path: {base}}}
data: {{eval: {{path: eval.jsonl, label: null}}}}
gates: {{min_agreement: 0.0, max_metric_drop: 100.0}}
variants:
  - {{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}}
{quantized}""", root)
        for record in records.values():
            assert record.status == "built", record.error
        out[arch] = (base, folder / "genai-fp32")
        for precision in QUANTIZED.get(arch, []):
            out[f"{arch}-{precision}"] = (base, folder / f"genai-{precision}")
    return out


def _base(arch: str, dst):
    """This module's tiny ``arch`` decoder (``ARCHS`` spelling) in ``dst``."""
    return build_decoder(arch.lower(), dst, **GENAI_SHAPE, fields=GENAI_FIELDS.get(arch.lower()))


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(4, vocab - 1, size=n - 1).tolist()] for n in (5, 9, 3, 12)]


def _torch_greedy(base, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_fp32_equals_torch_greedy(built, arch):
    base, folder = built[arch]
    runtime = load_runtime(folder)
    # Gemma3's sliding window (16) is shorter than 12 prompt + 20 new tokens
    for prompt in _prompts(runtime.step_lm().vocab_size):
        assert lone_genai(runtime, prompt, N_NEW, exact=True) == _torch_greedy(base, prompt, N_NEW)


def _greedy(logits) -> int:
    return int(np.where(np.arange(len(logits)) == EOS, -np.inf, logits).argmax())


@pytest.mark.parametrize("arch", [*ARCHS, *(f"{a}-{p}" for a, ps in QUANTIZED.items()
                                             for p in ps)])
def test_step_lm_interleaved_equals_lone_generator(built, arch):
    runtime = load_runtime(built[arch][1])
    lm = runtime.step_lm()
    prompts = _prompts(lm.vocab_size)
    lone = [lone_genai(runtime, p, N_NEW, exact=True) for p in prompts]
    joins = {0: 0, 1: 0, 2: 3, 3: 7}  # slot → step it joins at
    out: dict[int, list[int]] = {}
    for step in range(60):
        for slot, at in joins.items():
            if at == step:
                out[slot] = [_greedy(lm.prefill(slot, prompts[slot]))]
        live = [s for s in out if len(out[s]) < N_NEW]
        if not live:
            continue
        for slot, row in zip(live, lm.decode(live, [out[s][-1] for s in live]), strict=True):
            out[slot].append(_greedy(row))
            if len(out[slot]) == N_NEW:
                lm.free(slot)
    got = [out[s] for s in range(len(prompts))]
    if arch.endswith("int4"):  # batched MatMulNBits rows can flip a near-tie (test_engine.py)
        assert sum(g == w for g, w in zip(got, lone, strict=True)) >= len(lone) - 1
    else:
        assert got == lone


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_eight_streams_equal_each_alone(built, arch):
    runtime = load_runtime(built[arch][1])
    rng = np.random.default_rng(1)
    prompts = [[2, *rng.integers(4, 80, size=n).tolist()] for n in (4, 11, 2, 7, 15, 5, 9, 3)]
    check_together_equals_alone(runtime.step_lm(), prompts, N_NEW)


def test_hybrid_state_continues_across_prefill_chunks_and_is_not_prefix_copied(built):
    runtime = load_runtime(built["Qwen3_5"][1])
    prompt = _prompts(runtime.step_lm().vocab_size)[3]
    whole, chunked = runtime.step_lm(), runtime.step_lm()
    assert whole.chunked_prefill and not whole.copies_kv
    want = whole.prefill(0, prompt)
    chunked.prefill(0, prompt[:5])
    assert np.array_equal(chunked.prefill(0, prompt[5:], start=5), want)


def test_config_normalisations_are_in_the_manifest(built):
    def details(arch):
        stages = load_artifact(built[arch][1]).manifest.lineage["stages"]
        return stages[-1]["details"]

    gemma = details("Gemma3")
    assert gemma["config_normalisations"][0].startswith("rope_parameters: its full_attention")
    assert gemma["config_normalisations"][1].startswith("rope_local_base_freq: 10000.0")
    assert gemma["options"]["windowed_kv_cache"] is False
    assert details("Qwen3")["config_normalisations"] == []
    assert details("SmolLM3")["config_normalisations"] == [
        "no_rope_layers: built with RoPE in every layer, then GroupQueryAttention "
        "do_rotary=0 in layers [1]"]
    assert details("Phi3LongRoPE")["config_normalisations"] == [
        "rope_parameters.type: longrope (the transformers 4 name of rope_type)"]
    qwen35 = details("Qwen3_5")["config_normalisations"]
    assert qwen35[0].startswith("architectures: Qwen3_5ForConditionalGeneration")
    assert qwen35[1].startswith("rope_parameters.mrope_section: [2, 0, 0]")
    # the artifact keeps transformers' own config: only the builder saw the rewrite
    assert gemma["check"]["max_logprob_diff"] < 0.02


def _config(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("arch", "words"), [
    ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"),
    ("OlmoForCausalLM", "differ from transformers 5's"),
    ("FalconForCausalLM", "cannot build architecture FalconForCausalLM"),
])
def test_architectures_the_builder_cannot_take_are_refused_in_one_line(tmp_path, arch, words):
    with pytest.raises(GenaiBuildError) as info:
        check_genai_supported(_config(tmp_path, architectures=[arch], hidden_size=32,
                                      num_attention_heads=2))
    message = str(info.value)
    assert words in message and "use format: onnx" in message and "\n" not in message
