"""Server-sent events (``text/event-stream``) for the streaming routes.

Streams are closed deterministically: when a client disconnects mid-stream, Starlette
cancels the sending task and leaves the body's async generator suspended;
:class:`EventStreamResponse` then closes it (shielded from that cancellation), which
stops the generation, releases the model lock and frees the concurrency slot at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.api.http_errors import error_body

log = logging.getLogger(__name__)


def sse(payload: Any) -> str:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass events through (closing ``events`` when closed); a failure mid-stream becomes
    a final event holding OpenAI's error object (as vLLM sends)."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as exc:
        log.exception("stream failed")
        yield sse(error_body(f"stream failed: {type(exc).__name__}", 500))


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that always closes its event generator.

    When the client disconnects, Starlette cancels the task sending the body and leaves
    the body's async generator suspended, its ``finally`` blocks not run until garbage
    collection (if ever). Here it is closed as soon as the response ends, however it
    ended, shielded from the cancellation; then the ``on_close`` callbacks run (the
    route's concurrency slot).

    Args:
        events: The SSE events (each layer closes the one it iterates, via ``aclosing``).
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(sse_stream(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close: list[Callable[[], None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.body_iterator.aclose()
                finally:
                    for callback in self.on_close:
                        callback()


def streaming_response(events: AsyncIterator[str]) -> EventStreamResponse:
    """A ``text/event-stream`` response (see :class:`EventStreamResponse`)."""
    return EventStreamResponse(events)
