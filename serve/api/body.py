"""Reading a request body under the service's deadline (408) and size cap (413).

One reader for the raw ASGI ``/classify`` route and the Starlette routes, so every route
refuses a slow or oversized body the same way.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import Receive, Scope

from serve.api.schemas import Limits
from serve.errors import RequestError


async def read_raw_body(scope: Scope, receive: Receive, limits: Limits) -> bytes:
    """The request body, read within ``body_timeout_s`` and ``max_body_bytes``.

    Raises:
        RequestError: 413 past the size cap (declared or sent), 408 past the deadline,
            400 when the client disconnected while sending it.
    """
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limits.max_body_bytes:
                raise RequestError(f"body: {int(value)} bytes, more than the limit of "
                                   f"{limits.max_body_bytes}", 413)
            break
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RequestError("body: the client disconnected while sending it")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise RequestError(f"body: more than the limit of "
                                       f"{limits.max_body_bytes} bytes", 413)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestError(f"body: not received within body_timeout_s "
                           f"({limits.body_timeout_s:g} s)", 408) from None


async def read_body(request: Request, limits: Limits) -> bytes:
    """Read the body within ``body_timeout_s`` (408), stopping early (413) once it passes
    ``max_body_bytes`` (:func:`read_raw_body` on the request's
    ASGI receive channel)."""
    return await read_raw_body(request.scope, request.receive, limits)
