"""The public HTTP surface of the service: ``/classify``, ``/generate``, ``/metadata``.

The routes form a Starlette app mounted on the BentoML service. Each reads its body under
a deadline (408) and a size cap (413) before it takes a concurrency slot (429), then
validates it once (strict parsing, bounds on every number, task check → 4xx with
OpenAI's error object naming the field, :mod:`serve.api.http_errors`). ``/classify``
(:mod:`serve.api.classify_route`, a raw ASGI endpoint with the same checks) then hands the
model work to a :class:`serve.engine.batcher.MicroBatcher` on this event loop (every
request that queued while the model ran becomes the next batch, one thread hop per
batch), whose batch sizes show up in ``/metrics`` as
``bentoml_service_adaptive_batch_size``. The batch function is not a BentoML API: no
unchecked internal route exists. Nothing here reaches into BentoML's internals.

Generation (``/generate`` here, ``/v1/*`` in :mod:`serve.api.openai_api`) submits each
prompt to the worker's :class:`serve.engine.core.Engine` and waits for admission before any
header is sent (503 past the queue deadline). Until the handler has its response, the
route listens for the client's disconnect (:func:`until_disconnect`): a client that goes
while its request waits for admission or generates a non-streamed answer cancels the
handler, and its sequences are aborted in the engine. Streaming answers (SSE) are built
by :mod:`serve.api.sse`, which closes a stream as soon as its client goes; the request is
then aborted in the engine, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.api.backend import Backend
from serve.api.body import read_body
from serve.api.classify_route import ClassifyEndpoint
from serve.api.http_errors import error_response
from serve.api.openapi import DocumentedRoute, RouteDoc
from serve.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    GenerateItem,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    check_max_new_tokens,
    check_texts,
)
from serve.api.sse import EventStreamResponse, sse
from serve.api.token_limits import check_room, fit_prompts
from serve.errors import RequestError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> bool:
    """Wait for the next ASGI message once the body has been read: True if it says the
    client disconnected. (Anything else ends the watch rather than spinning on it.)"""
    return (await receive())["type"] == "http.disconnect"


async def until_disconnect(handler: Handler, request: Request) -> Response | None:
    """``handler(request)``, cancelled if the client disconnects before it returns.

    The handler's cancellation aborts its sequences in the engine (waiting or running),
    which frees their KV rows and counts them in ``request_aborted_total``; a returned
    streaming response watches its own client from then on.

    Returns:
        The handler's response, or None if the client went first.
    """
    task = asyncio.ensure_future(handler(request))
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not watch.result():
            await task
    except asyncio.CancelledError:  # the server itself cancelled the request
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def endpoint(get_backend: Callable[[], Backend]) -> Callable[[Handler], Handler]:
    """Wrap a route: body read first (408/413), then the concurrency cap (429),
    RequestError → 4xx, crash → 500, never down.

    A slow or huge upload never holds a slot. A streaming response keeps its slot until
    the stream ends or its client goes; a client that goes before the response cancels
    the handler (:func:`until_disconnect`).
    """
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            backend = get_backend()
            if request.method == "POST":
                try:
                    request.state.body = await read_body(request, backend.limits)
                except RequestError as exc:
                    return error_response(str(exc), exc.status, exc.param, exc.code)
            if backend.in_flight >= backend.cap:
                return error_response(f"too many requests in flight ({backend.cap}, "
                                      "max_concurrency); retry later", 429)
            backend.in_flight += 1
            streaming = False
            try:
                response = await until_disconnect(handler, request)
                if response is None:  # nobody reads it; the access log shows nginx's 499
                    return Response(status_code=499)
                if isinstance(response, EventStreamResponse):
                    streaming = True
                    response.on_close.append(backend.release_slot)
                return response
            except RequestError as exc:
                return error_response(str(exc), exc.status, exc.param, exc.code)
            except Exception:
                log.exception("unexpected error in %s", request.url.path)
                return error_response("internal error; see the server log", 500)
            finally:
                if not streaming:
                    backend.release_slot()
        return route
    return wrap


def without_paths(value: Any) -> Any:
    """``value`` with every absolute file path cut to its last part (no server layout
    in public answers: manifests record where adapters and data were)."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (
            len(value) > 2 and value[1] == ":" and value[2] in "\\/")):
        return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def build_routes(get_backend: Callable[[], Backend]) -> list:
    """Routes for ``/classify``, ``/generate`` and ``/metadata``."""
    guard = endpoint(get_backend)

    @guard
    async def generate(request: Request) -> Response:
        backend = get_backend()
        req = await backend.parse(request, GenerateRequest, "/generate", "text-generation",
                                  "/classify")
        check_texts("prompts", req.prompts, backend.limits)
        max_new = req.max_new_tokens
        if "max_new_tokens" not in req.model_fields_set:  # a default never exceeds the cap
            max_new = min(max_new, backend.limits.max_new_tokens)
        check_max_new_tokens("max_new_tokens", max_new, backend.limits)
        if req.stream and len(req.prompts) != 1:
            raise RequestError(f"prompts: streaming needs exactly one prompt, got "
                               f"{len(req.prompts)}")
        prompts = await fit_prompts(backend, "prompts", req.prompts, keep="tail")
        await check_room(backend, "max_new_tokens", "prompts", prompts, max_new)
        items = [GenerateItem(prompt=p.text, prompt_ids=p.ids, max_new_tokens=max_new,
                              temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                              seed=req.seed) for p in prompts]
        if req.stream:
            return await backend.stream_response(
                items[0], lambda delta, completion: sse({"text": delta}) if delta else None)
        rows = await backend.generate(items)
        return JSONResponse(GenerateResponse(
            results=[GenerateResult(**r) for r in rows]).model_dump())

    async def metadata(request: Request) -> Response:
        return JSONResponse(without_paths(get_backend().service.metadata()))

    return [
        DocumentedRoute("/classify", ClassifyEndpoint(get_backend), "POST", RouteDoc(
            "Classify texts (text-classification artifacts).", ClassifyRequest,
            ClassifyResponse, example={"texts": ["a fine, moving film"]})),
        DocumentedRoute("/generate", generate, "POST", RouteDoc(
            "Complete prompts; `stream: true` answers server-sent events (one prompt).",
            GenerateRequest, GenerateResponse, streams=True,
            example={"prompts": ["Once upon a time"], "max_new_tokens": 16})),
        DocumentedRoute("/metadata", metadata, "GET", RouteDoc(
            "The artifact's manifest summary and server limits."))]
