"""A GGUF's tokenizer, checked against one rebuilt from the GGUF's own vocabulary.

transformers converts a GGUF's vocabulary into a fast tokenizer, and for some vocabularies
that conversion has been silently wrong: transformers 4.57 made Gemma 3's SentencePiece
vocabulary (``tokenizer.ggml.model`` ``llama``) a Unigram model whose scores are BPE merge
ranks, so words fell into fragments ("What" -> "Wh", "at"), and every stage was compared
against a broken reference (5.x converts it to a BPE that agrees; the check stays).
llama.cpp's tokenization of the same file is the reference; this module rebuilds
it with the ``tokenizers`` library from the GGUF metadata (tokens, scores, token types,
merges, BOS/EOS flags), as llama.cpp reads them:

* ``llama`` (SentencePiece BPE): pieces merge by the score of the merged piece, highest
  first (llama.cpp's ``llm_tokenizer_spm``) -- a BPE whose merge ranks are those scores,
  spaces escaped to ``▁``, bytes falling back to ``<0xXX>``; user-defined tokens (runs of
  spaces, newlines, HTML tags) are matched in the raw text first.
* ``gpt2`` (byte-level BPE): the GGUF's merges, after llama.cpp's pre-tokenizer regexes for
  the ``tokenizer.ggml.pre`` values in ``PRE_SPLITS``; other values are not checked.

``checked_tokenizer`` compares the converted tokenizer with that rebuild on
``SAMPLE_TEXTS``; where a SentencePiece conversion differs it uses the rebuild instead,
otherwise it refuses with one line naming the first differing text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import InputError

log = logging.getLogger(__name__)

SAMPLE_TEXTS = (
    "What is the capital of France? Answer in one word.",
    "The capital of France is",
    "To be, or not to be, that is the question:",
    "Numbers: 3.14159, 2026-12-04 and 1,000,000 items.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))",
    "  leading spaces,\ttabs\tand   runs   of spaces  ",
    "Ünïcödé: naïve café, 東京, emoji 🙂 and <b>bold</b>",
    "don't can't we'll it's I'M",
)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) by ``tokenizer.ggml.pre``.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (GPT2_SPLIT,),
    "gpt2": (GPT2_SPLIT,),
    "smollm": (r"\p{N}", GPT2_SPLIT),
    "starcoder": (r"\p{N}", GPT2_SPLIT),
    "llama-bpe": (LLAMA3_SPLIT,),
}
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


@dataclass
class GgufVocab:
    """The tokenizer metadata of a GGUF file (``tokenizer.ggml.*``)."""

    model: str
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True


def read_vocab(gguf_path: Path) -> GgufVocab:
    """Read ``tokenizer.ggml.*`` from a GGUF file (tensors are not loaded)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get("tokenizer.ggml." + key)
        return default if f is None else f.contents()

    special = {name: get(f"{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    tokens = get("tokens", [])
    return GgufVocab(
        model=get("model", ""), pre=get("pre", "default"), tokens=tokens,
        scores=get("scores", [0.0] * len(tokens)), types=get("token_type", [1] * len(tokens)),
        merges=get("merges", []), special={k: v for k, v in special.items() if v is not None},
        add_bos=bool(get("add_bos_token", False)), add_eos=bool(get("add_eos_token", False)),
        add_space_prefix=bool(get("add_space_prefix", True)))


def _added_tokens(vocab: GgufVocab) -> list:
    from tokenizers import AddedToken

    return [AddedToken(tok, normalized=False, special=kind == CONTROL)
            for tok, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind in (CONTROL, USER_DEFINED)]


def _spm(vocab: GgufVocab):
    """llama.cpp's SentencePiece BPE as a ``tokenizers`` BPE ranked by piece scores."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    ranked = []
    for i, (tok, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        if kind in (CONTROL, USER_DEFINED, BYTE) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            if tok[:cut] in ids and tok[cut:] in ids:
                ranked.append((-vocab.scores[i], i, tok[:cut], tok[cut:]))
    ranked.sort()
    unk = vocab.special.get("unknown")
    model = BPE(ids, [(a, b) for _, _, a, b in ranked], byte_fallback=True, fuse_unk=True,
                unk_token=None if unk is None else vocab.tokens[unk])
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "),
                                           decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)]
                                             if vocab.add_space_prefix else []))
    tokenizer.add_tokens(_added_tokens(vocab))
    return tokenizer


def _gpt2(vocab: GgufVocab):
    """llama.cpp's byte-level BPE for a known ``tokenizer.ggml.pre``, else None."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    splits = PRE_SPLITS.get(vocab.pre)
    if splits is None or not vocab.merges:
        return None
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tokenizer = Tokenizer(BPE(ids, merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(_added_tokens(vocab))
    return tokenizer


def reference_tokenizer(vocab: GgufVocab):
    """The GGUF's own tokenization as a ``tokenizers.Tokenizer`` (no BOS/EOS), or None."""
    if vocab.model == "llama":
        return _spm(vocab)
    if vocab.model == "gpt2":
        return _gpt2(vocab)
    return None


def reference_ids(reference, vocab: GgufVocab, text: str) -> list[int]:
    """Token ids llama.cpp makes of ``text`` (BOS/EOS as the GGUF's flags say)."""
    ids = reference.encode(text, add_special_tokens=False).ids
    if vocab.add_bos and "bos" in vocab.special:
        ids = [vocab.special["bos"], *ids]
    if vocab.add_eos and "eos" in vocab.special:
        ids = [*ids, vocab.special["eos"]]
    return ids


def first_difference(tokenizer, reference, texts: tuple[str, ...] = SAMPLE_TEXTS
                     ) -> tuple[str, list, list] | None:
    """(text, tokenizer's ids, reference ids) of the first text they tokenize differently.

    Without BOS/EOS: those are compared by ``checked_tokenizer`` (a warning only).
    """
    for text in texts:
        got = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        want = reference.encode(text, add_special_tokens=False).ids
        if got != want:
            return text, got, want
    return None


def rebuilt_tokenizer(reference, vocab: GgufVocab, converted):
    """A transformers fast tokenizer around the reference, with the converted one's extras.

    Special tokens come from the GGUF ids; the chat template from the conversion.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token",
             "padding": "pad_token"}
    special = {names[k]: vocab.tokens[i] for k, i in vocab.special.items()}
    ends = [(k, vocab.tokens[vocab.special[k]], vocab.special[k]) for k, on in
            (("bos", vocab.add_bos), ("eos", vocab.add_eos)) if on and k in vocab.special]
    bos = [t for k, t, _ in ends if k == "bos"]
    eos = [t for k, t, _ in ends if k == "eos"]
    reference.post_processor = processors.TemplateProcessing(
        single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
        special_tokens=[(t, i) for _, t, i in ends])
    return PreTrainedTokenizerFast(tokenizer_object=reference, **special,
                                   chat_template=getattr(converted, "chat_template", None),
                                   padding_side=converted.padding_side,
                                   model_input_names=converted.model_input_names,
                                   model_max_length=converted.model_max_length)


def checked_tokenizer(converted, gguf_path: Path, texts: tuple[str, ...] = SAMPLE_TEXTS):
    """The GGUF's tokenizer, checked against the GGUF's own tokenization.

    Args:
        converted: The tokenizer transformers converted from the GGUF.
        gguf_path: The GGUF file.
        texts: Sample texts both must tokenize identically.

    Returns:
        ``converted`` when it agrees with the rebuild (or no rebuild exists for this
        vocabulary type: logged), else the rebuilt SentencePiece tokenizer.

    Raises:
        InputError: The conversion differs and the vocabulary cannot be rebuilt (one line
            naming the first differing text).
    """
    vocab = read_vocab(gguf_path)
    reference = reference_tokenizer(vocab)
    if reference is None:
        log.warning("%s: no reference for tokenizer %s/%s: its conversion is not checked",
                    gguf_path.name, vocab.model, vocab.pre)
        return converted
    diff = first_difference(converted, reference, texts)
    if diff is None:
        got, want = converted(texts[0])["input_ids"], reference_ids(reference, vocab, texts[0])
        if list(got) != want:  # e.g. SmolLM2's: a BOS although add_bos_token is false
            log.warning("%s: the converted tokenizer adds BOS/EOS otherwise than the GGUF's "
                        "flags (add_bos_token %s, add_eos_token %s): %s vs %s around the same "
                        "text ids; kept as converted", gguf_path.name, vocab.add_bos,
                        vocab.add_eos, [*got[:1], "…", *got[-1:]], [*want[:1], "…", *want[-1:]])
        return converted
    text, got, want = diff
    if vocab.model == "llama":
        log.warning("%s: transformers' conversion of its SentencePiece vocabulary tokenizes "
                    "%r into %d ids, the GGUF's own tokenization into %d: using a tokenizer "
                    "rebuilt from the GGUF vocabulary", gguf_path.name, text, len(got),
                    len(want))
        rebuilt = rebuilt_tokenizer(reference, vocab, converted)
        if first_difference(rebuilt, reference, texts) is None:
            return rebuilt
    raise InputError(f"{gguf_path.name}: the converted tokenizer does not reproduce the "
                     f"GGUF's own tokenization of {text!r} ({len(got)} ids, GGUF "
                     f"{len(want)}): refusing a broken reference")
