"""The public HTTP surface of the service: ``/classify``, ``/generate``, ``/metadata``.

The routes form a Starlette app mounted on the BentoML service. Each reads its body under
a deadline (408) and a size cap (413) before it takes a concurrency slot (429), then
validates it once (strict parsing, bounds on every number, task check → 4xx with
OpenAI's error object naming the field, :mod:`serve.http_errors`). ``/classify``
(:mod:`serve.classify_route`, a raw ASGI endpoint with the same checks) then hands the
model work to a :class:`serve.batcher.MicroBatcher` on this event loop (every
request that queued while the model ran becomes the next batch, one thread hop per
batch), whose batch sizes show up in ``/metrics`` as
``bentoml_service_adaptive_batch_size``. The batch function is not a BentoML API: no
unchecked internal route exists. Nothing here reaches into BentoML's internals.

Generation (``/generate`` here, ``/v1/*`` in :mod:`serve.openai_api`) submits each
prompt to the worker's :class:`serve.engine.Engine` and waits for admission before any
header is sent (503 past the queue deadline). Until the handler has its response, the
route listens for the client's disconnect (:func:`until_disconnect`): a client that goes
while its request waits for admission or generates a non-streamed answer cancels the
handler, and its sequences are aborted in the engine. Streaming answers (SSE) are built
by :mod:`serve.sse`, which closes a stream as soon as its client goes; the request is
then aborted in the engine, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.batcher import MicroBatcher, Overloaded
from serve.classify_route import ClassifyEndpoint, read_raw_body
from serve.completion import Completion, refused
from serve.engine import EngineRefused
from serve.http_errors import error_response
from serve.runtimes import GenerationParams, UnsupportedRequest
from serve.schemas import (
    GenerateItem,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    Limits,
    RequestError,
    check_max_new_tokens,
    check_texts,
    parse_body,
)
from serve.sse import EventStreamResponse, sse, streaming_response
from serve.token_limits import check_room, fit_prompts

if TYPE_CHECKING:
    from serve.service import Modelpress

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
Body = TypeVar("Body")  # the pydantic request model a route parses


class Backend:
    """What the routes need from the running service: limits, runtime, batched calls."""

    def __init__(self, service: Modelpress, limits: Limits, workers: int,
                 batchers: dict[str, MicroBatcher] | None = None) -> None:
        self.service = service
        self.limits = limits
        self.runtime = service.runtime
        self.task = service.runtime.manifest.task
        self.cap = math.ceil(limits.max_concurrency / workers)
        self.in_flight = 0
        self.batchers = dict(batchers or {})  # API name → its micro-batcher

    def release_slot(self) -> None:
        """A request counted in ``in_flight`` has finished (or its stream was closed)."""
        self.in_flight -= 1

    def require_task(self, endpoint: str, task: str, alternative: str) -> None:
        """Refuse an endpoint the artifact's task cannot serve (400 naming both)."""
        if self.task != task:
            raise RequestError(f"{endpoint}: this artifact is a {self.task} model; "
                               f"{endpoint} needs a {task} model (use {alternative})")

    async def parse(self, request: Request, schema: type[Body], endpoint: str, task: str,
                    alternative: str) -> Body:
        """Read and validate a request body, then check that this artifact serves ``task``.

        Raises:
            RequestError: A bad body (400/413/422 naming the field) or the wrong task.
        """
        raw = request.state.body if hasattr(request.state, "body") else (
            await read_body(request, self.limits))
        body = parse_body(schema, raw, self.limits)
        self.require_task(endpoint, task, alternative)
        return body

    async def call(self, name: str, **kwargs: Any) -> Any:
        """Run this request's items (one keyword argument) in the next batch of the
        micro-batcher ``name``; map its failures to HTTP codes."""
        try:
            [items] = kwargs.values()
            return await self.batchers[name].submit(items)
        except UnsupportedRequest as exc:
            raise RequestError(str(exc)) from None
        except Overloaded:
            raise RequestError("server overloaded: the request could not be scheduled "
                               "within max_latency_ms; retry later", 503) from None

    async def run_locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a runtime call in a thread, serialised with the batch calls."""
        def locked() -> Any:
            with self.service.lock:
                return fn(*args)
        return await anyio.to_thread.run_sync(locked)

    async def open_completion(self, item: GenerateItem) -> Completion:
        """Submit one prompt to the engine; return once it has its first token.

        Raises:
            RequestError: 503 (overloaded, queue deadline passed) before any header is
                sent, or 400 (does not fit).
        """
        engine = self.service.engine
        ids = (item.prompt_ids if item.prompt_ids is not None
               else await self.run_locked(self.encode, item.prompt))
        try:
            seq = engine.submit(ids, to_params(item))
        except EngineRefused as exc:
            raise refused(exc) from None
        completion = Completion(engine, seq, self.service.detokenizer, list(item.stop))
        await completion.start()
        return completion

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, as the model sees them (special tokens included)."""
        return list(self.runtime.tokenizer(prompt)["input_ids"])

    async def generate(self, items: list[GenerateItem]) -> list[dict[str, Any]]:
        """Complete every item (the engine batches them with everything else running)."""
        tasks = [asyncio.ensure_future(self._complete(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one failed (or the client went): the others abort in the engine
            for task in tasks:
                task.cancel()

    async def _complete(self, item: GenerateItem) -> dict[str, Any]:
        completion = await self.open_completion(item)
        text = await completion.text()
        return {"text": text, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason, "logprobs": completion.logprobs}

    async def stream_response(self, item: GenerateItem,
                              chunk: Callable[[str | None, Any], str | None],
                              opened: Callable[[Completion], None] | None = None
                              ) -> EventStreamResponse:
        """A streamed completion: ``chunk(delta, None)`` per text delta, then
        ``chunk(None, completion)`` once it ended (for the final chunk), then ``[DONE]``;
        ``opened(completion)`` first, once admitted (a route that reads more than text).

        Admission is awaited first, so an overloaded server answers 503 before any header.
        """
        completion = await self.open_completion(item)
        if opened is not None:
            opened(completion)

        async def events() -> AsyncIterator[str]:
            async with aclosing(completion.deltas()) as deltas:
                async for delta in deltas:
                    yield chunk(delta, None)
            if (tail := chunk(None, completion)) is not None:
                yield tail
            yield sse("[DONE]")

        response = streaming_response(events())
        response.on_close.append(completion.close)  # the client went before the end
        return response


# Below this temperature sampling is greedy (as vLLM's _SAMPLING_EPS): dividing logits
# by a subnormal temperature overflows to inf - inf = NaN probabilities.
MIN_TEMPERATURE = 1e-5


def to_params(item: GenerateItem) -> GenerationParams:
    """Decoding settings of a queued item."""
    temperature = 0.0 if item.temperature < MIN_TEMPERATURE else item.temperature
    return GenerationParams(max_new_tokens=item.max_new_tokens, temperature=temperature,
                            top_p=item.top_p, stop=list(item.stop), seed=item.seed,
                            logprobs=item.logprobs,
                            grammar=item.grammar)


async def read_body(request: Request, limits: Limits) -> bytes:
    """Read the body within ``body_timeout_s`` (408), stopping early (413) once it passes
    ``max_body_bytes`` (:func:`serve.classify_route.read_raw_body` on the request's
    ASGI receive channel)."""
    return await read_raw_body(request.scope, request.receive, limits)


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
    from starlette.routing import Route

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

    return [Route("/classify", ClassifyEndpoint(get_backend), methods=["POST"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/metadata", metadata, methods=["GET"])]
