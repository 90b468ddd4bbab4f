"""Log-probabilities of tokens, in OpenAI's shapes.

Every figure is of the model's own distribution: the log-softmax of the raw logits,
before temperature and top-p (as vLLM's default ``raw_logprobs``). Generated tokens are
scored by the sampler inside the engine's batched step (:class:`serve.runtime.sampling.Sampler`);
prompt tokens (``echo``) by one forward over the prompt (:func:`prompt_logprobs`, the
runtime's ``prompt_logits``), outside the engine, so generation keeps its batching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve.runtime.detokenize import IncrementalDetokenizer

#: Most alternatives per token (OpenAI allows 20 on chat, 5 on completions).
MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens at its position.

    Attributes:
        token: The token id.
        logprob: Its log-probability.
        top: ``(token id, log-probability)`` of the most likely tokens, best first.
    """

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def _top(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of ``row``, largest first."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, row.shape[-1])
    best = np.argpartition(-row, k - 1)[:k]
    return best[np.argsort(-row[best], kind="stable")]


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s entry from next-token ``logits`` [vocab], with ``top`` alternatives.

    Only the log-normaliser is computed over the vocabulary (one ``exp`` pass, summed in
    float64), not the whole log-softmax row: about 10x cheaper a token at a 49k vocabulary.
    A token's figure is the same float wherever it appears (chosen or among the top).
    """
    x = np.asarray(logits, dtype=np.float32)
    high = float(x.max())
    log_z = high + float(np.log(np.exp(x - high).sum(dtype=np.float64)))
    return TokenLogprob(int(token), float(x[token]) - log_z,
                        [(int(i), float(x[i]) - log_z) for i in _top(x, top)])


def prompt_logprobs(logits: np.ndarray, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Entries for every prompt token: ``None`` for the first (nothing predicts it).

    Args:
        logits: The prompt's logits ``[len(ids), vocab]`` (row ``t`` predicts ``t + 1``).
        ids: The prompt's token ids.
        top: Alternatives per position.
    """
    out: list[TokenLogprob | None] = [None]
    for t in range(1, len(ids)):
        out.append(token_logprob(logits[t - 1], ids[t], top))
    return out


def _tops(entry: TokenLogprob, name: Callable[[int], str]) -> dict[str, float]:
    """``{token text: logprob}``: the alternatives plus the chosen token (as vLLM); where
    two ids decode alike the better one is kept."""
    out: dict[str, float] = {}
    for token, logprob in [*entry.top, (entry.token, entry.logprob)]:
        out.setdefault(name(token), logprob)
    return out


class TextOffsets:
    """Where each token's text starts in the decoded text (``text_offset``), token by
    token: incremental decoding, so a stream's chunks and the whole answer agree.

    Args:
        tokenizer: Decodes the tokens (skipping special tokens, as the answer's text).
        start: Offset of the first token (after an echoed prompt, its length).
    """

    def __init__(self, tokenizer: Any, start: int = 0) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self.at = start

    def __call__(self, ids: list[int]) -> list[int]:
        """The offsets of ``ids``, the next tokens of the text."""
        out = []
        for token in ids:
            out.append(self.at)
            self.at += len(self._detok.push(token))
        return out


def completion_logprobs(entries: list[TokenLogprob | None], name: Callable[[int], str],
                        ids: list[int], offsets: list[int]) -> dict[str, Any]:
    """``choices[].logprobs`` of ``/v1/completions``: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` and ``text_offset`` (``null`` where a token has no score).

    Args:
        entries: One per token (``None``: the first prompt token).
        name: A token id's text.
        ids: The tokens, in order (the entries' own ids where they have one).
        offsets: Each token's character offset in the choice's text (:class:`TextOffsets`).
    """
    return {"tokens": [name(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else _tops(e, name) for e in entries],
            "text_offset": offsets}


def _chat_token(token: int, logprob: float, name: Callable[[int], str]) -> dict[str, Any]:
    text = name(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], name: Callable[[int], str]) -> dict[str, Any]:
    """``choices[].logprobs`` of ``/v1/chat/completions``: ``content[]`` of ``{token,
    logprob, bytes, top_logprobs[]}``."""
    content = [{**_chat_token(e.token, e.logprob, name),
                "top_logprobs": [_chat_token(t, lp, name) for t, lp in e.top]}
               for e in entries]
    return {"content": content, "refusal": None}


def token_namer(tokenizer: Any) -> Callable[[int], str]:
    """A token id's text as OpenAI shows it: its own decode, special tokens included."""
    cache: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token], skip_special_tokens=False)
        return cache[token]
    return name
