"""Incremental detokenization: a stream's text at O(1) cost per token.

Re-decoding a stream's whole output for every new token costs O(n) per token (O(n²) per
stream). As TGI and vLLM do, only a window of the last tokens is decoded: ``prefix`` is
the text of the tokens already emitted at the window's start, ``read`` marks the end of
what was emitted, and a new token's text is the decode of ``ids[prefix:]`` past the
decode of ``ids[prefix:read]``. The window moves on to the last emitted tokens after each
emission, so a tokenizer that merges or strips spaces at a piece's start still gives
exactly the text of the one-shot decode. Text that ends in an incomplete UTF-8 sequence
(a multi-byte character split over byte-fallback tokens) is held back until it completes.
"""

from __future__ import annotations

from typing import Any

#: Tokens held back while they add no text or their text ends in U+FFFD, before the
#: window moves on anyway (a character takes at most 4 bytes, so a longer run is a genuine
#: replacement character, or special tokens that decode to nothing): the bound on work.
MAX_PENDING = 8


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text deltas.

    Args:
        tokenizer: A Hugging Face tokenizer (``decode``), used from one thread only.
        skip_special_tokens: Passed to ``decode``.

    Attributes:
        decoded_tokens: Tokens passed to ``decode`` by the last :meth:`push` (bounded by
            the window, whatever the stream's length).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.decoded_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while it waits)."""
        self.ids.append(token)
        self.decoded_tokens = 0
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        waiting = len(text) <= len(before) or text.endswith("\ufffd")
        if waiting and len(self.ids) - self._read < MAX_PENDING:
            return ""  # no new text yet: the window grows, so no leading space is lost
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character at the end)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]
