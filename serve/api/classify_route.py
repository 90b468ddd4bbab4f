"""``POST /classify`` as a raw ASGI endpoint: the service's hot path.

With a small classifier every microsecond of Python per request is taken from the model
on a CPU-bound server (docs/benchmarks.md, issue 14), so this route skips Starlette's
request and response objects and anyio's cancel scopes. It keeps every check of the
other routes (:func:`serve.api.http_api.endpoint`): body read under ``body_timeout_s`` (408)
and ``max_body_bytes`` (413) before a concurrency slot is taken (429), strict parsing
(400 naming the field), the task check, token limits, the micro-batcher's deadline (503
with ``Retry-After``), and OpenAI's error object on every failure; a crash is a logged
500, never a dropped connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from serve.api.body import read_raw_body
from serve.api.http_errors import error_body
from serve.api.schemas import ClassifyRequest, check_texts, parse_body
from serve.api.token_limits import fit_tokens
from serve.errors import ModelpressError, RequestError

if TYPE_CHECKING:
    from serve.api.backend import Backend

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")
# Starlette's JSONResponse settings; one encoder, not one per answer
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def send_json(send: Send, status: int, payload: Any) -> int:
    """Answer ``payload`` as JSON with ``status`` (``Retry-After: 1`` on 429/503)."""
    try:
        body = _ENCODER.encode(payload).encode()
    except ValueError:  # a NaN score: JSON has no such number
        log.exception("unserialisable /classify answer")
        status = 500
        body = json.dumps(error_body("internal error; see the server log", 500)).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if status in (429, 503):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


class ClassifyEndpoint:
    """``POST /classify``: validate, then one slot in the micro-batcher's next batch.

    An ASGI app (Starlette routes it as one) whose call returns the status it sent.

    Args:
        get_backend: The running service's :class:`serve.api.backend.Backend`.
    """

    def __init__(self, get_backend: Callable[[], Backend]) -> None:
        self.get_backend = get_backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        try:
            try:
                backend = self.get_backend()
            except ModelpressError as exc:  # not initialised yet: come back
                raise RequestError(f"service: {exc}; retry later", 503) from None
            body = await read_raw_body(scope, receive, backend.limits)
            if backend.in_flight >= backend.cap:
                raise RequestError(f"too many requests in flight ({backend.cap}, "
                                   "max_concurrency); retry later", 429)
        except RequestError as exc:
            return await send_json(send, exc.status,
                                   error_body(str(exc), exc.status, exc.param, exc.code))
        backend.in_flight += 1
        try:
            status, payload = 200, await self.classify(backend, body)
        except RequestError as exc:
            status, payload = exc.status, error_body(str(exc), exc.status, exc.param,
                                                     exc.code)
        except Exception:
            log.exception("unexpected error in /classify")
            status, payload = 500, error_body("internal error; see the server log", 500)
        finally:
            backend.in_flight -= 1
        return await send_json(send, status, payload)

    @staticmethod
    async def classify(backend: Backend, body: bytes) -> dict[str, Any]:
        """The answer to one valid body (``ClassifyResponse``'s fields as plain dicts)."""
        req = parse_body(ClassifyRequest, body, backend.limits)
        backend.require_task("/classify", "text-classification", "/generate")
        check_texts("texts", req.texts, backend.limits)
        texts = await fit_tokens(backend, "texts", req.texts, keep="head")
        rows = await backend.call("classify_batch", texts=texts)
        return {"results": [{"label": r["label"], "score": r["score"],
                             "scores": r["scores"] if req.all_scores else None}
                            for r in rows]}
