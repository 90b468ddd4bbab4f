"""What the routes need from the running service, typed without importing the service.

:class:`ServedModel` is the part of the BentoML service (``serve.app.service``) the routes
read; :class:`Backend` wraps it with the limits, the concurrency cap and the batched and
engine calls every route shares. The app layer builds one per worker and hands the routes
a getter for it, so the API layer never imports the app layer.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request

from serve.api.body import read_body
from serve.api.schemas import GenerateItem, Limits, parse_body
from serve.api.sse import EventStreamResponse, sse, streaming_response
from serve.engine.batcher import MicroBatcher, Overloaded
from serve.engine.completion import Completion, refused
from serve.engine.core import Engine, EngineRefused
from serve.errors import RequestError
from serve.runtime.protocol import GenerationParams, Runtime, UnsupportedRequest

Body = TypeVar("Body")  # the pydantic request model a route parses


class ServedModel(Protocol):
    """The running service as the routes see it.

    Attributes:
        runtime: The loaded artifact's runtime.
        lock: Serialises runtime calls made outside the engine.
        engine: The LLM engine (generation artifacts), else None.
        detokenizer: The tokenizer the engine's streams decode with.
    """

    runtime: Runtime
    lock: threading.Lock
    engine: Engine | None
    detokenizer: Any

    def metadata(self) -> dict[str, Any]:
        """The artifact's manifest facts for ``/metadata``."""
        ...


class Backend:
    """What the routes need from the running service: limits, runtime, batched calls."""

    def __init__(self, service: ServedModel, limits: Limits, workers: int,
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
