"""Incremental detokenization: streamed text equals the one-shot decode (multi-byte
characters split over byte-level tokens, SentencePiece-style leading spaces, special
tokens), and the tokens decoded per step stay bounded however long the stream."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serve.engine.completion import Completion
from serve.engine.core import Event
from serve.runtime.detokenize import MAX_PENDING, IncrementalDetokenizer

CORPUS = ["héllo wörld, ça va? naïve café", "日本語のテキスト and more text", "emoji 🙂🚀 test",
          "the quick brown fox jumps over the lazy dog"] * 4
TEXT = ("Ünïcödé 日本語 🙂 mixed with ascii words, and 🚀 rockets; " * 40).strip()


def _byte_level() -> PreTrainedTokenizerFast:
    """A byte-level BPE (as GPT-2/SmolLM2): rare characters split over byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def _metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with byte fallback (as Llama): ``▁`` marks spaces, and a
    character outside the vocabulary is spelt as ``<0xNN>`` byte tokens."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS[:2], trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "</s>"]))
    data = json.loads(trained.to_str())["model"]
    vocab = dict(data["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return _byte_level() if request.param == "byte-level" else _metaspace()


def _stream(tokenizer, ids: list[int]) -> tuple[str, int]:
    detok = IncrementalDetokenizer(tokenizer)
    text, most = "", 0
    for token in ids:
        text += detok.push(token)
        most = max(most, detok.decoded_tokens)
    return text + detok.flush(), most


def test_streamed_text_equals_the_one_shot_decode(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces), "no character was split over tokens"
    assert len(ids) > 500
    text, most = _stream(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    # O(1) a token: each step decodes a window of a few tokens, never the whole output
    assert most <= 2 * (MAX_PENDING + 2)


def test_special_tokens_and_random_ids(tokenizer):
    rng = np.random.default_rng(0)
    ids = tokenizer(TEXT[:200], add_special_tokens=False)["input_ids"]
    ids = ids[:20] + [tokenizer.eos_token_id] * 3 + ids[20:]  # skipped, as the answer's text
    assert _stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)
    # any token sequence; byte-fallback tokens aside (a run of invalid UTF-8 may become
    # more or fewer U+FFFD when a window splits it, as in TGI and vLLM)
    pool = [i for i in range(len(tokenizer))
            if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(20):
        ids = rng.choice(pool, size=60).tolist()
        assert _stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)


class _Engine:
    def abort(self, seq, reason=None) -> None:
        seq.aborted = reason or "client"


def _completion(tokenizer, ids: list[int], stops: list[str]) -> Completion:
    queue: asyncio.Queue = asyncio.Queue()
    for token in ids:
        queue.put_nowait(Event(token=token))
    queue.put_nowait(Event(finish_reason="length"))
    seq = SimpleNamespace(prompt_ids=[1], queue=queue, aborted=None)
    return Completion(_Engine(), seq, tokenizer, stops)


def test_completion_deltas_equal_the_one_shot_decode_with_bounded_work(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]

    async def run(stops: list[str]) -> tuple[list[str], Completion, int]:
        completion = _completion(tokenizer, ids, stops)
        deltas, most = [], 0
        async for delta in completion.deltas():
            deltas.append(delta)
            most = max(most, completion.detok.decoded_tokens)
        return deltas, completion, most

    deltas, completion, most = asyncio.run(run([]))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == whole and len(deltas) > 100
    assert "\ufffd" not in "".join(deltas)
    assert most <= 2 * (MAX_PENDING + 2)
    assert (completion.completion_tokens, completion.finish_reason) == (len(ids), "length")

    # a stop sequence far into the stream cuts the text where the one-shot search would
    stop = "rockets; Ünïcödé 日本語"
    deltas, completion, _ = asyncio.run(run([stop]))
    assert "".join(deltas) == whole[:whole.index(stop)]
    assert completion.finish_reason == "stop" and completion.seq.aborted == "stop"
