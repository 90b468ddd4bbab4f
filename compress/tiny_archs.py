"""Tiny random decoders of the current architectures, built from small configs (no network).

Beside :func:`compress.tiny.build_llama`: :func:`build_decoder` saves a small causal LM
(hidden 32, head size 16: onnxruntime-genai's GroupQueryAttention needs a multiple of 16)
with the tiny word-level tokenizer and chat template, as safetensors, so the stages, the
exporters and the engine can be tested per architecture. Its defaults are the torch path's
models: 4 layers (Gemma 4: 6, so each KV-shared layer type has a producer) and sliding
windows of 8 tokens, so that test prompts reach past them; a test of another path passes
its own layer count, window and config fields.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

SLIDING_WINDOW = 8
SLIDING, FULL, LINEAR = "sliding_attention", "full_attention", "linear_attention"

#: LoRA target modules per architecture (Phi-3 fuses q/k/v into one projection).
LORA_TARGETS: dict[str, list[str]] = {
    "qwen3": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gemma4": ["q_proj", "v_proj"],
    "qwen3_5": ["q_proj", "v_proj"],
}

# architecture → (transformers config class, fields of (vocab, layers, window))
_Spec = tuple[str, Callable[[int, int, int], dict[str, Any]]]
_ARCHS: dict[str, _Spec] = {
    "llama": ("LlamaConfig", lambda v, n, w: {}),
    "qwen2": ("Qwen2Config", lambda v, n, w: {}),
    "granite": ("GraniteConfig", lambda v, n, w: {}),
    "olmo": ("OlmoConfig", lambda v, n, w: {}),
    "qwen3": ("Qwen3Config", lambda v, n, w: {"head_dim": 16}),
    "mistral": ("MistralConfig", lambda v, n, w: {"head_dim": 16}),
    "gemma": ("GemmaConfig", lambda v, n, w: {"head_dim": 16}),
    # RoPE outside the attention op: a position_ids input in onnxruntime-genai's graph
    "hunyuandensev1": ("HunYuanDenseV1Config", lambda v, n, w: {"head_dim": 16}),
    "smollm3": ("SmolLM3Config", lambda v, n, w: {"no_rope_layer_interval": 2}),
    "phi3": ("Phi3Config", lambda v, n, w: {"sliding_window": w}),
    # Phi-3 128k / Phi-4-mini style: context 256, original 128
    "phi3longrope": ("Phi3Config", lambda v, n, w: {
        "max_position_embeddings": 256, "original_max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                            "original_max_position_embeddings": 128}}),
    "gemma2": ("Gemma2Config", lambda v, n, w: {
        "head_dim": 16, "sliding_window": w, "query_pre_attn_scalar": 16}),
    # sliding layers, the last one full
    "gemma3": ("Gemma3TextConfig", lambda v, n, w: {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": w,
        "layer_types": [SLIDING] * (n - 1) + [FULL]}),
    # As Gemma 4 E2B/E4B: per-layer input embeddings, and the second half of the layers
    # reuses the keys/values of the first (KV sharing), each half sliding then full.
    "gemma4": ("Gemma4TextConfig", lambda v, n, w: {
        "head_dim": 16, "global_head_dim": 16, "sliding_window": w,
        "layer_types": ([SLIDING] * (n // 2 - 1) + [FULL]) * 2,
        "vocab_size_per_layer_input": v, "hidden_size_per_layer_input": 8,
        "num_kv_shared_layers": n // 2}),
    # hybrid: Gated DeltaNet (linear attention) layers and one full-attention layer
    "qwen3_5": ("Qwen3_5TextConfig", lambda v, n, w: {
        "head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 2,
        "layer_types": [FULL if i == n // 2 else LINEAR for i in range(n)]}),
}
_TORCH_LAYERS = {"gemma4": 6}


def decoder_config(arch: str, vocab: int, layers: int | None = None,
                   window: int = SLIDING_WINDOW, tied: bool | None = False,
                   fields: dict[str, Any] | None = None) -> Any:
    """The transformers config of a tiny ``arch`` decoder.

    Args:
        arch: A key of ``_ARCHS`` (lower-case model type, e.g. ``gemma3``).
        vocab: Vocabulary size.
        layers: Hidden layers (None: 4; Gemma 4: 6).
        window: Sliding window of the architectures with sliding layers.
        tied: ``tie_word_embeddings`` (None: the architecture's default).
        fields: Config fields set over the architecture's own; a None value leaves the
            field at transformers' default.

    Raises:
        ValueError: Unknown architecture, naming the known ones.
    """
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r} (known: {', '.join(_ARCHS)})")
    layers = layers or _TORCH_LAYERS.get(arch, 4)
    name, own = _ARCHS[arch]
    values = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 128, "pad_token_id": 0,
              "bos_token_id": 2, "eos_token_id": 3, "tie_word_embeddings": tied,
              **own(vocab, layers, window), **(fields or {})}
    return getattr(transformers, name)(**{k: v for k, v in values.items() if v is not None})


def build_decoder(arch: str, dst: Path, seed: int = 0, *, init_std: float | None = None,
                  **shape: Any) -> Path:
    """Save a tiny random ``arch`` causal LM and the tiny tokenizer to ``dst``.

    Args:
        arch: A key of ``_ARCHS``.
        dst: Output folder.
        seed: Torch seed of the random weights.
        init_std: Redraw every weight from N(0, init_std) (wider than the default init:
            distinct greedy tokens); None keeps transformers' init.
        **shape: ``layers``, ``window``, ``tied``, ``fields`` of :func:`decoder_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compress.tiny import _tokenizer

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    model = AutoModelForCausalLM.from_config(decoder_config(arch, len(tok), **shape)).eval()
    if init_std is not None:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=init_std)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
