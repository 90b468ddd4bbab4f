"""Tiny, randomly initialised models built from configs (no network).

Used by the tests and by the tiny recipes (`make tiny`): a 2-layer BERT classifier and a
2-layer Llama, each with a word-level tokenizer made by the ``tokenizers`` library, plus
LoRA adapters created with ``init_lora_weights=False`` so merging visibly changes outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

WORDS = [
    "the", "a", "an", "this", "that", "movie", "film", "story", "plot", "actor", "actress",
    "scene", "music", "great", "good", "bad", "terrible", "awful", "wonderful", "boring", "fun",
    "funny", "sad", "dull", "brilliant", "best", "worst", "love", "hate", "is", "was", "not",
    "very", "really", "quite", "so", "and", "but", "or", "it", "i", "you", "we", "they", "of",
    "to", "in", "on", "for", "with", "what", "who", "where", "when", "capital", "france",
    "paris", "answer", "question", "yes", "no", "positive", "negative", "review", "one", "two",
    "three", "red", "blue", "green", "cat", "dog", "city", "country",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + [":", "?", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", model_input_names=["input_ids", "attention_mask"],
            model_max_length=64)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", model_input_names=["input_ids", "attention_mask"],
        padding_side="left", model_max_length=128)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bert(dst: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a 2-layer BERT sequence classifier (hidden 32) with its tokenizer to ``dst``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = _tokenizer("bert")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=num_labels,
                        id2label={0: "negative", 1: "positive"} if num_labels == 2 else None,
                        label2id={"negative": 0, "positive": 1} if num_labels == 2 else None,
                        pad_token_id=0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return dst


def build_llama(dst: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama causal LM (hidden 32) with its tokenizer to ``dst``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    # head size 16: onnxruntime-genai's GroupQueryAttention needs a multiple of 16.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return dst


def build_llama_bytes(dst: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 32, context 1024) whose tokenizer is byte-level BPE
    with no merges: one token per byte, so any text (JSON included) can be generated."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", model_input_names=["input_ids", "attention_mask"],
        padding_side="left", model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=1024, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(dst, safe_serialization=True)
    fast.save_pretrained(dst)
    return dst


def build_adapter(base: Path, dst: Path, task: str, seed: int = 1, rank: int = 4,
                  target_modules: list[str] | None = None) -> Path:
    """Save a randomly initialised LoRA adapter for ``base`` to ``dst``.

    Args:
        base: A folder made by :func:`build_bert` or :func:`build_llama`.
        dst: Where to save the adapter.
        task: ``text-classification`` (the head is saved via ``modules_to_save``) or
            ``text-generation``.
        seed: Seed for the adapter weights.
        rank: LoRA rank.
        target_modules: Modules to adapt (defaults per architecture).
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "text-classification":
        model = AutoModelForSequenceClassification.from_pretrained(base)
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank,
                            target_modules=target_modules or ["query", "value"],
                            init_lora_weights=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank,
                            target_modules=target_modules or ["q_proj", "v_proj"],
                            init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if task == "text-classification":
        # A fine-tuned head differs from the base head: perturb the saved copy.
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.data.add_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(dst, safe_serialization=True)
    return dst


def build_all(root: Path) -> dict[str, Path]:
    """Build every tiny model and adapter used by the tiny recipes under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "bert": build_bert(root / "bert"),
        "llama": build_llama(root / "llama"),
        "llama-bytes": build_llama_bytes(root / "llama-bytes"),
    }
    paths["bert-lora"] = build_adapter(paths["bert"], root / "bert-lora", "text-classification")
    paths["llama-lora"] = build_adapter(paths["llama"], root / "llama-lora", "text-generation")
    paths["llama-lora-b"] = build_adapter(paths["llama"], root / "llama-lora-b",
                                          "text-generation", seed=2,
                                          target_modules=["q_proj", "o_proj"])
    log.info("tiny models written to %s", root)
    return paths


def random_gguf_blocks(qtype: str, rows: int, cols: int, seed: int = 0):
    """Random but well-formed GGUF blocks [rows, bytes] of ``qtype`` (any integers, small
    positive fp16 scales), for the k-quants ``gguf`` cannot quantize (Q4_K, Q5_K, Q6_K)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType[qtype]
    values, size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)

    def f16(n: int):
        return rng.uniform(1e-3, 2e-2, (rows, cols // values, n)).astype(np.float16) \
            .view(np.uint8)

    if qtype in ("Q4_K", "Q5_K"):  # d, dmin first
        raw[..., :4] = f16(2)
    elif qtype == "Q6_K":  # d last
        raw[..., -2:] = f16(1)
    else:  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: d (and m) first
        n = 2 if qtype in ("Q4_1", "Q5_1") else 1
        raw[..., :2 * n] = f16(n)
    return raw.reshape(rows, -1)


def spm_vocab(texts: list[str], merges: int = 120) -> tuple[list[str], list[float], list[int]]:
    """A Gemma-style SentencePiece BPE vocabulary learnt on ``texts`` (no network).

    (tokens, scores, token types) as a GGUF stores them: control tokens, 256 byte tokens,
    the characters, then merged pieces scored by minus their merge rank (as Gemma 3's
    GGUF is), so merge order lives only in the scores.
    """
    from collections import Counter
    from itertools import pairwise

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    words = [list(w) for t in texts for w in t.replace(" ", " ▁").split(" ") if w]
    chars = sorted({c for w in words for c in w})
    pieces: list[str] = []
    for _ in range(merges):
        pairs = Counter((a, b) for w in words for a, b in pairwise(w))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        pieces.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    tokens = specials + byte_tokens + chars + pieces
    scores = [-1000.0] * 4 + [0.0] * 256 + [-1e6] * len(chars) \
        + [-float(r) for r in range(len(pieces))]
    types = [3] * 4 + [6] * 256 + [1] * (len(chars) + len(pieces))
    return tokens, scores, types


def write_vocab_gguf(path: Path, texts: list[str], arch: str = "gemma3") -> Path:
    """Write a vocabulary-only GGUF (``tokenizer.ggml.model`` ``llama``) learnt on ``texts``."""
    from gguf import GGUFWriter

    tokens, scores, types = spm_vocab(texts)
    writer = GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
