"""Tiny random decoders of the architectures onnxruntime-genai 0.18 builds (no network).

Each uses the word-level tokenizer of :mod:`compress.tiny` and a head size of 16 (the
builder's GroupQueryAttention needs a multiple of 16).
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)


def _config(arch: str, vocab: int):
    import transformers as tf

    if arch == "Llama":
        return tf.LlamaConfig(vocab_size=vocab, **COMMON)
    if arch == "Qwen3":
        return tf.Qwen3Config(vocab_size=vocab, head_dim=16, **COMMON)
    if arch == "Gemma3":
        # one sliding layer (window 16, shorter than a prompt plus 20 tokens) and one full
        return tf.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16, **COMMON)
    if arch == "SmolLM3":
        return tf.SmolLM3Config(vocab_size=vocab, no_rope_layer_interval=2, **COMMON)
    if arch == "Phi3":
        return tf.Phi3Config(vocab_size=vocab, original_max_position_embeddings=128,
                             **COMMON)
    if arch == "Phi3LongRoPE":  # Phi-3 128k / Phi-4-mini style (context 256, original 128)
        return tf.Phi3Config(vocab_size=vocab, original_max_position_embeddings=128, **{
            **COMMON, "max_position_embeddings": 256}, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 128})
    if arch == "Mistral":
        return tf.MistralConfig(vocab_size=vocab, head_dim=16, **COMMON)
    if arch == "Qwen2":
        return tf.Qwen2Config(vocab_size=vocab, **COMMON)
    if arch == "Gemma":
        return tf.GemmaConfig(vocab_size=vocab, head_dim=16, **COMMON)
    if arch == "Gemma2":
        return tf.Gemma2Config(vocab_size=vocab, head_dim=16, sliding_window=16,
                               query_pre_attn_scalar=16, **COMMON)
    if arch == "Granite":
        return tf.GraniteConfig(vocab_size=vocab, **COMMON)
    if arch == "Olmo":
        return tf.OlmoConfig(vocab_size=vocab, **COMMON)
    if arch == "Qwen3_5":  # hybrid: a linear-attention (Gated DeltaNet) and a full layer
        return tf.Qwen3_5TextConfig(
            vocab_size=vocab, head_dim=16, layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=2, **COMMON)
    if arch == "HunYuanDenseV1":  # RoPE outside the attention op: a position_ids input
        return tf.HunYuanDenseV1Config(vocab_size=vocab, head_dim=16, **COMMON)
    raise ValueError(f"no tiny config for {arch}")


def build_decoder(arch: str, dst: Path, seed: int = 0) -> Path:
    """Save a 2-layer random ``<arch>ForCausalLM`` (hidden 32) with its tokenizer to ``dst``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compress.tiny import _tokenizer

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok))).eval()
    for p in model.parameters():  # wider weights than the default init: distinct tokens
        torch.nn.init.normal_(p, std=0.5)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
