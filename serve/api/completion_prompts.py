"""The prompts of ``POST /v1/completions``: text or token ids, within the token limits.

OpenAI's ``prompt`` is a string, a list of strings, a list of token ids or a list of such
lists; lm-eval-harness's ``local-completions`` model sends token ids. Text prompts go
through :func:`serve.api.token_limits.fit_prompts` as everywhere; id prompts are checked as
they are (never cut, as OpenAI): each non-empty, within ``max_input_tokens`` and the
vocabulary, and with room for ``max_tokens`` in the model's context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve.api.schemas import check_texts
from serve.api.token_limits import Prompt, check_room, check_room_count, context_length, fit_prompts
from serve.errors import RequestError

if TYPE_CHECKING:
    from serve.api.backend import Backend


def token_prompts(backend: Backend, prompt: Any) -> list[list[int]] | None:
    """A completion prompt sent as token ids, one list per prompt (None: text).

    Raises:
        RequestError: No prompt, an empty one, one over ``max_input_tokens`` (never cut,
            as OpenAI) or a token id outside the vocabulary, naming ``prompt[i]``.
    """
    if isinstance(prompt, str):
        return None
    if not prompt:
        raise RequestError("prompt: must contain at least one prompt")
    if isinstance(prompt[0], str):
        return None
    rows, listed = ([prompt], False) if isinstance(prompt[0], int) else (prompt, True)
    if len(rows) > backend.limits.max_items:
        raise RequestError(f"prompt: {len(rows)} items, more than the limit of "
                           f"{backend.limits.max_items} per request", status=413)
    vocab, limit = len(backend.runtime.tokenizer), backend.limits.max_input_tokens
    for i, ids in enumerate(rows):
        name = f"prompt[{i}]" if listed else "prompt"
        if not ids:
            raise RequestError(f"{name}: no tokens")
        if len(ids) > limit:
            raise RequestError(f"{name}: {len(ids)} tokens, more than the limit of {limit} "
                               "(max_input_tokens)", code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"{name}: token id {bad} is outside the vocabulary "
                               f"(0 to {vocab - 1})")
    return [list(ids) for ids in rows]


async def completion_prompts(backend: Backend, req: Any,
                              max_tokens: int) -> list[Prompt]:
    """The prompts of a ``CompletionRequest`` within the token limits, with their ids
    when ``echo`` needs them (the prompt is scored).

    Raises:
        RequestError: 400/413 naming ``prompt`` or ``max_tokens``.
    """
    token_rows = token_prompts(backend, req.prompt)
    if token_rows is None:
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        check_texts("prompt", texts, backend.limits)
        fitted = await fit_prompts(backend, "prompt", texts, keep="tail")
        await check_room(backend, "max_tokens", "prompt", fitted, max_tokens,
                         listed=not isinstance(req.prompt, str))
    else:
        context = context_length(backend.runtime)
        listed = isinstance(req.prompt[0], list)
        for i, ids in enumerate(token_rows):
            check_room_count(context, "max_tokens", f"prompt[{i}]" if listed else "prompt",
                             len(ids), max_tokens)
        detok = backend.service.detokenizer
        fitted = [Prompt(detok.decode(ids, skip_special_tokens=True), ids)
                  for ids in token_rows]
    if req.echo:
        for prompt in fitted:
            if prompt.ids is None:
                prompt.ids = await backend.run_locked(backend.encode, prompt.text)
    return fitted
