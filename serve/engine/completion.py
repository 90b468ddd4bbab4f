"""One completion running in the engine, as text: the bridge between the engine's token
ids and what the routes send (streamed deltas or one text, usage, finish reason)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from serve.engine.core import Engine, EngineRefused, Event, Sequence
from serve.errors import RequestError
from serve.runtime.detokenize import IncrementalDetokenizer
from serve.runtime.logprobs import TokenLogprob
from serve.runtime.text import safe_prefix, stop_index


class Completion:
    """Text deltas of one request; after the last one, its usage and finish reason.

    Call :meth:`start` first: it waits for admission and the first token, so a request
    the engine refuses (queue deadline, overload) becomes a :class:`RequestError` before
    the route sends any header. Stop sequences are matched on the decoded text; the text
    is cut before the first one, and the engine stops the sequence at once. The text is
    decoded incrementally (:class:`serve.runtime.detokenize.IncrementalDetokenizer`) and stop
    sequences are searched only where a new one can end, so each token costs O(1).

    When the request asked for log-probabilities, :attr:`logprobs` collects one entry per
    token the engine scored (an ending EOS included); :meth:`take_logprobs` hands a
    stream the entries behind the delta it just received.

    Args:
        engine: The engine running the request.
        seq: The request, as submitted.
        detokenizer: A tokenizer used only by this event loop (for ``decode``).
        stops: Stop sequences.
    """

    def __init__(self, engine: Engine, seq: Sequence, detokenizer: Any,
                 stops: list[str]) -> None:
        self.engine, self.seq, self.detokenizer = engine, seq, detokenizer
        self.stops = [s for s in stops if s]
        self.prompt_tokens = len(seq.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._first: Event | None = None
        self._ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self._unsent = 0  # entries of ``logprobs`` not yet taken by a stream
        #: The detokenizer of the last :meth:`deltas` (its window size is observable).
        self.detok = IncrementalDetokenizer(detokenizer)

    async def _next(self) -> Event:
        event = await self.seq.queue.get()
        if event.error is not None:
            raise RequestError(str(event.error), event.error.status)
        return event

    async def start(self) -> None:
        """Wait for the first token (or the end).

        Raises:
            RequestError: 503 (queue deadline passed, shutting down) or 500 (model failed).
        """
        try:
            self._first = await self._next()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abort the request in the engine unless it has ended (client gone)."""
        if self.finish_reason is None:
            self.engine.abort(self.seq)

    def take_logprobs(self) -> list[TokenLogprob]:
        """Entries scored since the last call (for the delta just yielded, or the end)."""
        out = self.logprobs[self._unsent:]
        self._unsent = len(self.logprobs)
        return out

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas; stop sequences and incomplete UTF-8 are held back."""
        if self._first is None:
            await self.start()
        event, sent, text = self._first, 0, ""
        longest = max((len(s) for s in self.stops), default=0)
        stopped = False
        try:
            while True:
                if event.logprob is not None:
                    self.logprobs.append(event.logprob)
                if event.token is None:
                    self.finish_reason = event.finish_reason
                    break
                self._ids.append(event.token)
                piece = self.detok.push(event.token)
                if piece:
                    # a stop not in the text before can only end inside the new piece
                    start = max(0, len(text) - longest + 1)
                    text += piece
                    cut = stop_index(text, self.stops, start)
                    if cut is not None:
                        self.finish_reason, stopped = "stop", True
                        self.engine.abort(self.seq, reason="stop")
                        text = text[:cut]
                        break
                    safe = safe_prefix(text, self.stops)
                    if safe > sent:
                        yield text[sent:safe]
                        sent = safe
                event = await self._next()
            self.completion_tokens = len(self._ids)
            if not stopped:
                text += self.detok.flush()
            if len(text) > sent:
                yield text[sent:]
        finally:
            self.close()

    async def text(self) -> str:
        """The whole completion."""
        return "".join([d async for d in self.deltas()])


def refused(exc: EngineRefused) -> RequestError:
    """The HTTP error for a request the engine would not take."""
    return RequestError(str(exc), exc.status)
