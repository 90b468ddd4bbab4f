"""OpenAI-compatible routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, so the ``openai`` Python client works against the service unchanged.

Every request runs on the generation engine, as ``/generate``'s do (usage and
``finish_reason`` are its token counts); ``stream: true`` answers server-sent events in
OpenAI's chunk format and ends with ``data: [DONE]``. Chat messages are rendered with the
model's chat template (:mod:`serve.api.chat`: ``developer``/``tool`` roles, text content
parts, special-token strings kept as text); a conversation over ``max_input_tokens`` or
the model's context is a 400 naming ``messages`` (never cut). As vLLM's server: unknown
fields are ignored with a logged warning, ``null`` means the default, errors are OpenAI's
error object. Fields this server cannot honour (``n > 1``, penalties, ``logit_bias``,
tools) get a 400 naming the field rather than being ignored silently.

Log-probabilities (:mod:`serve.runtime.logprobs`): ``logprobs``/``top_logprobs`` on chat,
``logprobs`` (alternatives per token) and ``echo`` on completions, streamed or not.
``echo`` with ``max_tokens: 0`` scores the prompt only, as lm-eval-harness's
``local-completions`` model asks; a completion prompt may be token ids (OpenAI's
``list[int]`` / ``list[list[int]]``), as that model sends it.

``response_format`` ``json_object``/``json_schema`` (and vLLM's ``guided_json``) constrain
the answer with a grammar (:mod:`serve.engine.grammar`); a schema the compiler cannot honour is a
400 naming the field. A ``max_tokens`` cut ends with ``finish_reason: "length"`` and may
leave the JSON incomplete, as OpenAI's does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.api.backend import Backend
from serve.api.chat import chat_prompt_ids, plain_messages
from serve.api.completion_prompts import completion_prompts
from serve.api.http_api import endpoint
from serve.api.openai_requests import ChatRequest, CompletionRequest, OpenAIParams
from serve.api.openapi import DocumentedRoute, RouteDoc
from serve.api.schemas import GenerateItem, check_max_new_tokens
from serve.api.sse import sse, streaming_response
from serve.api.token_limits import check_room_count, context_length
from serve.engine.grammar import Grammar, compiler_for
from serve.errors import RequestError
from serve.runtime.logprobs import (
    TextOffsets,
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    token_namer,
)

R = TypeVar("R", bound=OpenAIParams)


async def _grammar(backend: Backend, req: OpenAIParams) -> Grammar | None:
    """The request's structured-output grammar (400 naming the field if unsupported)."""
    spec = req.json_schema()
    if spec is None:
        return None
    runtime = backend.runtime
    compiler = await backend.run_locked(compiler_for, runtime.tokenizer, runtime.eos_ids)
    return await backend.run_locked(compiler.json_schema, *spec)


def _item(backend: Backend, prompt: str, req: OpenAIParams, max_tokens: int,
          field: str = "max_tokens", prompt_ids: list[int] | None = None,
          grammar: Grammar | None = None) -> GenerateItem:
    check_max_new_tokens(field, max_tokens, backend.limits)
    seed = None if req.seed is None else req.seed % 2**63  # the sampler wants >= 0
    return GenerateItem(prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_tokens,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        stop=req.stops(), seed=seed, grammar=grammar)


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
        out = sse(make_chunk(None, completion.finish_reason))
        if include_usage:
            out += sse(make_chunk(None, None, usage=_usage(completion.prompt_tokens,
                                                           completion.completion_tokens)))
        return out
    return chunk


async def _scored_prompt(backend: Backend, ids: list[int], top: int) -> list[Any]:
    """Prompt-token entries of ``echo`` (first ``None``), from one forward over ``ids`` in
    a worker thread (outside the engine; the runtime serialises its own calls)."""
    logits = await anyio.to_thread.run_sync(backend.runtime.prompt_logits, ids)
    return prompt_logprobs(logits, ids, top)


def _no_eos(backend: Backend, entries: list[TokenLogprob]) -> list[TokenLogprob]:
    """Chat shows the answer's tokens only: an ending EOS's entry is left out."""
    eos = getattr(backend.service.engine, "eos_ids", set())
    return [e for e in entries if e.token not in eos]


def _choice(index: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _one_chunk_stream(chunk: dict, usage: dict | None) -> Response:
    """A stream of one chunk (``echo`` with ``max_tokens: 0``), its usage, ``[DONE]``."""
    async def events() -> Any:
        yield sse(chunk)
        if usage is not None:
            yield sse(usage)
        yield sse("[DONE]")
    return streaming_response(events())


def build_openai_routes(get_backend: Callable[[], Backend]) -> list:
    """Routes under ``/v1``."""
    guard = endpoint(get_backend)

    def model_name(backend: Backend) -> str:
        return backend.runtime.manifest.name

    async def parsed(request: Request, model: type[R], path: str) -> tuple[Backend, R]:
        """The backend and the request's body as ``model``, checked for ``path``."""
        backend = get_backend()
        req = await backend.parse(request, model, path, "text-generation", "/classify")
        req.check(path)
        return backend, req

    @guard
    async def completions(request: Request) -> Response:
        backend, req = await parsed(request, CompletionRequest, "/v1/completions")
        max_tokens = req.max_tokens  # OpenAI's default: 16
        if max_tokens is None:
            max_tokens = min(16, backend.limits.max_new_tokens)
        fitted = await completion_prompts(backend, req, max_tokens)
        grammar = await _grammar(backend, req)
        items = [_item(backend, p.text, req, max_tokens, grammar=grammar) for p in fitted]
        for item, prompt in zip(items, fitted, strict=True):  # ids counted by either check
            item.prompt_ids, item.logprobs = prompt.ids, req.logprobs
        top, echo = req.logprobs, bool(req.echo)
        name_of = token_namer(backend.service.detokenizer)
        heads = [p.text if echo else "" for p in fitted]
        scored = [await _scored_prompt(backend, p.ids, top) if echo and top is not None
                  else [] for p in fitted]
        head_ids = [p.ids if echo and top is not None else [] for p in fitted]

        detok = backend.service.detokenizer
        after_head = [TextOffsets(detok, len(head)) for head in heads]

        def choice_logprobs(i: int, entries: list[TokenLogprob]) -> Any:
            if top is None:
                return None
            ids = [e.token for e in entries]
            offsets = TextOffsets(detok)(head_ids[i]) + after_head[i](ids)
            return completion_logprobs(scored[i] + entries, name_of, head_ids[i] + ids,
                                       offsets)

        ident, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name(backend)

        def body(choices: list[dict], usage: dict | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created,
                    "model": name, "choices": choices, "usage": usage}

        if req.stream:
            if len(items) != 1:
                raise RequestError("prompt: streaming needs exactly one prompt")
            if max_tokens == 0:
                return _one_chunk_stream(body([_choice(0, heads[0], choice_logprobs(0, []),
                                                       "length")], None),
                                         body([], _usage(len(fitted[0].ids or []), 0))
                                         if req.include_usage() else None)
            opened: list[Any] = []

            def chunk(delta: str | None, reason: str | None, usage: dict | None = None) -> dict:
                if usage:
                    return body([], usage)
                text, entries = delta or "", opened[0].take_logprobs() if opened else []
                lp = choice_logprobs(0, entries)
                if heads[0] or scored[0]:  # echo goes out with the first chunk
                    text, heads[0], scored[0], head_ids[0] = heads[0] + text, "", [], []
                return body([_choice(0, text, lp, reason)], None)
            return await backend.stream_response(items[0],
                                                 _final_chunks(chunk, req.include_usage()),
                                                 opened=opened.append)
        if max_tokens == 0:
            rows = [{"text": "", "prompt_tokens": len(p.ids or []), "completion_tokens": 0,
                     "finish_reason": "length", "logprobs": []} for p in fitted]
        else:
            rows = await backend.generate(items)
        choices = [_choice(i, heads[i] + r["text"], choice_logprobs(i, r["logprobs"]),
                           r["finish_reason"]) for i, r in enumerate(rows)]
        usage = _usage(sum(r["prompt_tokens"] for r in rows),
                       sum(r["completion_tokens"] for r in rows))
        return JSONResponse(body(choices, usage))

    @guard
    async def chat_completions(request: Request) -> Response:
        backend, req = await parsed(request, ChatRequest, "/v1/chat/completions")
        messages = plain_messages(req.messages, backend.limits.max_text_chars)
        ids = await backend.run_locked(chat_prompt_ids, backend.runtime.tokenizer, messages)
        n, limits = len(ids), backend.limits
        if n > limits.max_input_tokens:  # as OpenAI: refused, never cut
            raise RequestError(f"messages: {n} tokens (chat template included), more than "
                               f"the limit of {limits.max_input_tokens} (max_input_tokens); "
                               "shorten the conversation", code="context_length_exceeded")
        context = context_length(backend.runtime)
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:  # as OpenAI: as long as the context allows (within the cap)
            if context and context - n < 1:
                raise RequestError(f"messages: {n} tokens fill the model's context of "
                                   f"{context} tokens; shorten the conversation",
                                   code="context_length_exceeded")
            asked = min(limits.max_new_tokens, context - n) if context else (
                limits.max_new_tokens)
        item = _item(backend, "", req, asked, field, prompt_ids=ids,
                     grammar=await _grammar(backend, req))
        if req.logprobs:
            item.logprobs = req.top_logprobs or 0
        name_of = token_namer(backend.service.detokenizer)

        def logprobs_of(entries: list[TokenLogprob]) -> Any:
            entries = _no_eos(backend, entries)
            return chat_logprobs(entries, name_of) if req.logprobs and entries else None
        check_room_count(context, field, "messages", n, asked)
        ident, created, name = (f"chatcmpl-{uuid.uuid4().hex}", int(time.time()),
                                model_name(backend))
        if req.stream:
            first = [True]
            opened: list[Any] = []

            def chunk(delta: str | None, reason: str | None, usage: dict | None = None) -> dict:
                body: dict[str, Any] = {}
                if delta is not None:
                    body = {"role": "assistant", "content": delta} if first[0] else {
                        "content": delta}
                    first[0] = False
                lp = logprobs_of(opened[0].take_logprobs()) if opened and not usage else None
                choices = [] if usage else [{"index": 0, "delta": body, "logprobs": lp,
                                             "finish_reason": reason}]
                return {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": name, "choices": choices, "usage": usage}
            return await backend.stream_response(item, _final_chunks(chunk,
                                                                     req.include_usage()),
                                                 opened=opened.append)
        [row] = await backend.generate([item])
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": row["text"]},
                         "logprobs": chat_logprobs(_no_eos(backend, row["logprobs"]), name_of)
                         if req.logprobs else None,
                         "finish_reason": row["finish_reason"]}],
            "usage": _usage(row["prompt_tokens"], row["completion_tokens"])})

    async def models(request: Request) -> Response:
        name = model_name(get_backend())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "modelpress"}]})

    return [
        DocumentedRoute("/v1/completions", completions, "POST", RouteDoc(
            "OpenAI-compatible text completion.", CompletionRequest, streams=True,
            example={"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0})),
        DocumentedRoute("/v1/chat/completions", chat_completions, "POST", RouteDoc(
            "OpenAI-compatible chat completion.", ChatRequest, streams=True,
            example={"messages": [{"role": "user", "content": "Say hello."}],
                     "max_tokens": 16, "temperature": 0})),
        DocumentedRoute("/v1/models", models, "GET", RouteDoc(
            "The served model, OpenAI's list format."))]
