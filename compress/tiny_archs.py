"""Tiny random decoders of the current architectures, built from small configs (no network).

Beside :func:`compress.tiny.build_llama`: :func:`build_decoder` saves a 4-layer (Gemma 4:
6-layer) causal LM (hidden 32, head size 16) with the tiny word-level tokenizer and chat
template, as safetensors, so the stages and the engine can be tested per architecture.
Sliding windows are 8 tokens so that test prompts reach past them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SLIDING_WINDOW = 8

#: LoRA target modules per architecture (Phi-3 fuses q/k/v into one projection).
LORA_TARGETS: dict[str, list[str]] = {
    "qwen3": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gemma4": ["q_proj", "v_proj"],
    "qwen3_5": ["q_proj", "v_proj"],
}


def _common(vocab: int) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 2,
            "eos_token_id": 3, "tie_word_embeddings": False}


def _config(arch: str, vocab: int):
    import transformers

    common = _common(vocab)
    sliding = ["sliding_attention"] * 3 + ["full_attention"]  # Gemma 4: the last is full
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=SLIDING_WINDOW, layer_types=sliding)
    if arch == "smollm3":
        return transformers.SmolLM3Config(**common, no_rope_layer_interval=2)
    if arch == "phi3":
        return transformers.Phi3Config(**common, sliding_window=SLIDING_WINDOW)
    if arch == "gemma4":
        # As Gemma 4 E2B/E4B: per-layer input embeddings, and the last layers reuse the
        # keys/values of earlier ones (KV sharing); 6 layers so each type has a producer.
        return transformers.Gemma4TextConfig(
            **{**common, "num_hidden_layers": 6}, head_dim=16, global_head_dim=16,
            sliding_window=SLIDING_WINDOW, layer_types=(sliding[1:] * 2),
            vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=8,
            num_kv_shared_layers=3)
    if arch == "qwen3_5":
        return transformers.Qwen3_5TextConfig(
            **common, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=2,
            layer_types=["linear_attention", "linear_attention", "full_attention",
                         "linear_attention"])
    raise ValueError(f"unknown tiny architecture {arch!r} (known: {', '.join(LORA_TARGETS)})")


def build_decoder(arch: str, dst: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` causal LM (a key of :data:`LORA_TARGETS`) to ``dst``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compress.tiny import _tokenizer

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok))).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
