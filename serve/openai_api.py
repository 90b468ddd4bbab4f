"""OpenAI-compatible routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, so the ``openai`` Python client works against the service unchanged.

Every request runs on the generation engine, as ``/generate``'s do (usage and
``finish_reason`` are its token counts); ``stream: true`` answers server-sent events in
OpenAI's chunk format and ends with ``data: [DONE]``. Chat messages are rendered with the
model's chat template. Fields OpenAI defines that this server cannot honour (``n > 1``,
``logprobs``, penalties) get a 400 naming the field rather than being ignored silently.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.http_api import Backend, endpoint
from serve.schemas import (
    GenerateItem,
    RequestError,
    check_max_new_tokens,
    check_texts,
)
from serve.sse import sse
from serve.token_limits import check_room, context_length, fit_tokens, prompt_room


class _OpenAIParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    def check(self) -> None:
        """Refuse what this server does not implement (400 naming the field)."""
        if self.n != 1:
            raise RequestError("n: only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty/frequency_penalty: not supported (use 0)")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs: not supported")

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 8:
            raise RequestError("stop: at most 8 stop sequences")
        return stops


class CompletionRequest(_OpenAIParams):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_OpenAIParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)


def render_chat(runtime: Any, messages: list[ChatMessage]) -> str:
    """Apply the model's chat template (generation prompt added).

    Uses ``runtime.apply_chat_template`` if the runtime has one, else its transformers
    tokenizer's template, else a plain ``role: content`` transcript.
    """
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    if callable(fn := getattr(runtime, "apply_chat_template", None)):
        return fn(msgs)
    tok = getattr(runtime, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def _item(backend: Backend, prompt: str, req: _OpenAIParams, max_tokens: int,
          field: str = "max_tokens") -> GenerateItem:
    check_max_new_tokens(field, max_tokens, backend.limits)
    return GenerateItem(prompt=prompt, max_new_tokens=max_tokens, temperature=req.temperature,
                        top_p=req.top_p, stop=req.stops(), seed=req.seed)


async def _default_max_tokens(backend: Backend, prompt: str) -> int:
    """The server's cap, or the room the prompt leaves in the context if that is less."""
    cap = backend.limits.max_new_tokens
    room = await prompt_room(backend, prompt)
    if room is not None and room < 1:
        context = context_length(backend.runtime)
        raise RequestError(f"messages: {context - room} tokens fill the model's context of "
                           f"{context} tokens; shorten the conversation")
    return cap if room is None else min(cap, room)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _final_chunks(make_chunk: Callable, include_usage: bool) -> Callable:
    """``chunk(delta, completion)`` for :meth:`Backend.stream_response`: a content chunk
    per delta; at the end one chunk with ``finish_reason``, then usage if asked for
    (token counts are the engine's)."""
    def chunk(delta: str | None, completion: Any) -> str | None:
        if delta is not None:
            return sse(make_chunk(delta, None)) if delta else None
        if completion is None:  # a runtime without the engine: no counts to report
            return None
        out = sse(make_chunk(None, completion.finish_reason))
        if include_usage:
            out += sse(make_chunk(None, None, usage=_usage(completion.prompt_tokens,
                                                           completion.completion_tokens)))
        return out
    return chunk


def build_openai_routes(get_backend: Callable[[], Backend]) -> list:
    """Routes under ``/v1``."""
    from starlette.routing import Route

    guard = endpoint(get_backend)

    def model_name(backend: Backend) -> str:
        return backend.runtime.manifest.name

    @guard
    async def completions(request: Request) -> Response:
        backend = get_backend()
        req = await backend.parse(request, CompletionRequest, "/v1/completions",
                                  "text-generation", "/classify")
        req.check()
        if req.echo or req.suffix:
            raise RequestError("echo/suffix: not supported")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        check_texts("prompt", prompts, backend.limits)
        prompts = await fit_tokens(backend, "prompt", prompts, keep="tail")
        max_tokens = req.max_tokens or min(16, backend.limits.max_new_tokens)  # OpenAI: 16
        items = [_item(backend, p, req, max_tokens) for p in prompts]
        await check_room(backend, "max_tokens", "prompt", prompts, max_tokens,
                         listed=not isinstance(req.prompt, str))
        ident, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name(backend)
        if req.stream:
            if len(items) != 1:
                raise RequestError("prompt: streaming needs exactly one prompt")

            def chunk(delta: str | None, reason: str | None, usage: dict | None = None) -> dict:
                choices = [] if usage else [{"index": 0, "text": delta or "", "logprobs": None,
                                             "finish_reason": reason}]
                return {"id": ident, "object": "text_completion", "created": created,
                        "model": name, "choices": choices, "usage": usage}
            include = bool((req.stream_options or {}).get("include_usage"))
            return await backend.stream_response(items[0], _final_chunks(chunk, include))
        rows = await backend.generate(items)
        choices = [{"index": i, "text": r["text"], "logprobs": None,
                    "finish_reason": r["finish_reason"]} for i, r in enumerate(rows)]
        usage = _usage(sum(r["prompt_tokens"] for r in rows),
                       sum(r["completion_tokens"] for r in rows))
        return JSONResponse({"id": ident, "object": "text_completion", "created": created,
                             "model": name, "choices": choices, "usage": usage})

    @guard
    async def chat_completions(request: Request) -> Response:
        backend = get_backend()
        req = await backend.parse(request, ChatRequest, "/v1/chat/completions",
                                  "text-generation", "/classify")
        req.check()
        if not req.messages:
            raise RequestError("messages: must contain at least one message")
        check_texts("messages.content", [m.content or " " for m in req.messages],
                    backend.limits)
        prompt = await backend.run_locked(render_chat, backend.runtime, req.messages)
        [prompt] = await fit_tokens(backend, "messages", [prompt], keep="tail")
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:  # as OpenAI: as long as the context allows (within the cap)
            asked = await _default_max_tokens(backend, prompt)
        item = _item(backend, prompt, req, asked, field)
        await check_room(backend, field, "messages", [prompt], asked, listed=False)
        ident, created, name = (f"chatcmpl-{uuid.uuid4().hex}", int(time.time()),
                                model_name(backend))
        if req.stream:
            first = [True]

            def chunk(delta: str | None, reason: str | None, usage: dict | None = None) -> dict:
                body: dict[str, Any] = {}
                if delta is not None:
                    body = {"role": "assistant", "content": delta} if first[0] else {
                        "content": delta}
                    first[0] = False
                choices = [] if usage else [{"index": 0, "delta": body, "logprobs": None,
                                             "finish_reason": reason}]
                return {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": name, "choices": choices, "usage": usage}
            include = bool((req.stream_options or {}).get("include_usage"))
            return await backend.stream_response(item, _final_chunks(chunk, include))
        [row] = await backend.generate([item])
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": row["text"]},
                         "logprobs": None, "finish_reason": row["finish_reason"]}],
            "usage": _usage(row["prompt_tokens"], row["completion_tokens"])})

    async def models(request: Request) -> Response:
        name = model_name(get_backend())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "modelpress"}]})

    return [Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]
