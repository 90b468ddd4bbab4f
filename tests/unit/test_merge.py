"""Merge stage on tiny models: merged weights and logits against independent references."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.pipeline import run_recipe
from compress.recipe import load_recipe
from serve.artifact import load_artifact

TEXTS = ["the movie was great", "what is the capital of france ?", "i hate this dull film"]


def _recipe(tmp_path: Path, task: str, base: Path, adapters: list[tuple[Path, float]],
            base_extra: str = "") -> Path:
    lines = ["name: t", f"task: {task}", f"base: {{path: {base}{base_extra}}}",
             "adapters:" if adapters else "adapters: []"]
    lines += [f"  - {{path: {p}, weight: {w}}}" for p, w in adapters]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_state(base: Path, adapters: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i, computed from the files alone."""
    state = load_file(base / "model.safetensors")
    for path, weight in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        tensors = load_file(path / "adapter_model.safetensors")
        for key, value in tensors.items():
            name = key.removeprefix("base_model.model.")
            if ".lora_A." in key:
                lora_b = tensors[key.replace("lora_A", "lora_B")]
                target = name.replace(".lora_A.weight", ".weight")
                state[target] = state[target] + weight * scale * (lora_b @ value)
            elif "lora_" not in key:
                state[name] = value  # modules_to_save: replaced whole
    return state


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("task,base_key,adapter_key", [
    ("text-classification", "bert", "bert-lora"),
    ("text-generation", "llama", "llama-lora"),
])
def test_single_adapter_merge_matches_base_plus_adapter(tmp_path, tiny, task, base_key,
                                                        adapter_key):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if task == "text-classification" else \
        AutoModelForCausalLM
    base, adapter = tiny[base_key], tiny[adapter_key]
    recipe = load_recipe(_recipe(tmp_path, task, base, [(adapter, 1.0)]))
    run_recipe(recipe, tmp_path / "out")
    merged_dir = tmp_path / "out" / "merge"
    manifest = load_artifact(merged_dir).manifest

    merged_state = load_file(merged_dir / "model.safetensors")
    for key, value in expected_state(base, [(adapter, 1.0)]).items():
        torch.testing.assert_close(merged_state[key], value, atol=1e-6, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = cls.from_pretrained(merged_dir).eval()
    unmerged = PeftModel.from_pretrained(cls.from_pretrained(base), adapter).eval()
    plain = cls.from_pretrained(base).eval()
    merged_logits = _logits(merged, tokenizer)
    assert (merged_logits - _logits(unmerged, tokenizer)).abs().max() < 1e-5
    assert (merged_logits - _logits(plain, tokenizer)).abs().max() > 1e-2
    assert manifest.metrics["max_abs_diff"] < 1e-5
    assert manifest.metrics["top1_agreement"] == 1.0
    assert manifest.lineage["stages"][0]["details"]["delta_vs_base_max_abs"] > 1e-2
    assert {f.path for f in manifest.files} >= {"model.safetensors", "config.json",
                                                 "tokenizer.json"}


def test_weighted_multi_adapter_merge_is_weighted_sum(tmp_path, tiny):
    adapters = [(tiny["llama-lora"], 0.7), (tiny["llama-lora-b"], 0.3)]
    recipe = load_recipe(_recipe(tmp_path, "text-generation", tiny["llama"], adapters))
    run_recipe(recipe, tmp_path / "out")
    merged_state = load_file(tmp_path / "out" / "merge" / "model.safetensors")
    expected = expected_state(tiny["llama"], adapters)
    base_state = load_file(tiny["llama"] / "model.safetensors")
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(merged_state[key], value, atol=1e-6, rtol=0)
        changed += not torch.equal(value, base_state[key])
    assert changed == 6  # q_proj in 2 layers from both, v_proj and o_proj from one each
    manifest = load_artifact(tmp_path / "out" / "merge").manifest
    assert len(manifest.metrics["per_adapter"]) == 2
    weights = [a["weight"] for a in manifest.lineage["inputs"] if a["role"] == "adapter"]
    assert weights == [0.7, 0.3]


def test_qlora_adapter_merges_onto_dequantized_base(tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, "text-generation", tiny["llama"],
                                 [(tiny["llama-lora"], 1.0)],
                                 base_extra=", trained_quantization: nf4"))
    run_recipe(recipe, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "merge" / "model.safetensors")
    original = load_file(tiny["llama"] / "model.safetensors")
    # An untouched-by-LoRA Linear weight now holds 4-bit values: at most 16 distinct levels
    # per block of 64, the block's absmax preserved, and close to the original.
    w = merged["model.layers.0.mlp.up_proj.weight"].flatten().view(-1, 64)
    o = original["model.layers.0.mlp.up_proj.weight"].flatten().view(-1, 64)
    assert max(len(torch.unique(block)) for block in w) <= 16
    torch.testing.assert_close(w.abs().amax(1), o.abs().amax(1))
    assert 0 < (w - o).abs().mean() < 0.1 * o.abs().mean()
    # lm_head is not quantized by bitsandbytes, so it is unchanged.
    assert torch.equal(merged["lm_head.weight"], original["lm_head.weight"])
    details = load_artifact(tmp_path / "out" / "merge").manifest.lineage["stages"][0]["details"]
    assert details["base_weights"].startswith("nf4 quantize/dequantize round trip")


def test_full_finetune_passes_through_unchanged(tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, "text-classification", tiny["bert"], []))
    run_recipe(recipe, tmp_path / "out")
    manifest = load_artifact(tmp_path / "out" / "merge").manifest
    from serve.artifact import sha256_file
    assert {f.path: f.sha256 for f in manifest.files}["model.safetensors"] == \
        sha256_file(tiny["bert"] / "model.safetensors")
    assert manifest.metrics == {"adapters": 0}
