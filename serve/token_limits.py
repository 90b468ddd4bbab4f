"""Token-level request limits: ``max_input_tokens`` (truncate or reject) and the room a
prompt leaves for ``max_new_tokens`` in the model's context.

Counting tokens takes the model lock (tokenizers are not safe to share across threads),
so texts that are provably short enough by their UTF-8 length are never tokenized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve.schemas import RequestError

if TYPE_CHECKING:
    from serve.http_api import Backend

# Upper bound on special tokens a tokenizer adds (BOS, CLS/SEP): texts of fewer UTF-8 bytes
# than the token limit minus this cannot exceed it, so they are never tokenized here.
_SPECIALS = 4


def _truncate(runtime: Any, text: str, limit: int, keep: str) -> str:
    """Longest head (or tail) of ``text`` with at most ``limit`` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = text[:mid] if keep == "head" else text[len(text) - mid:]
        if runtime.count_tokens(part) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] if keep == "head" else text[len(text) - lo:]


async def fit_tokens(backend: Backend, field: str, texts: list[str], keep: str) -> list[str]:
    """Apply ``max_input_tokens`` to each text: truncate (head/tail) or reject (413).

    Raises:
        RequestError: 413 naming ``field[i]`` when the limits say ``long_input: reject``.
    """
    limits, runtime = backend.limits, backend.runtime
    limit = limits.max_input_tokens
    out = list(texts)
    for i, text in enumerate(texts):
        if len(text.encode("utf-8")) + _SPECIALS <= limit:
            continue
        n = await backend.run_locked(runtime.count_tokens, text)
        if n <= limit:
            continue
        if limits.long_input == "reject":
            raise RequestError(f"{field}[{i}]: {n} tokens, more than the limit of {limit}", 413)
        out[i] = await backend.run_locked(_truncate, runtime, text, limit, keep)
    return out


def context_length(runtime: Any) -> int | None:
    """The model's context length in tokens (prompt + completion), if the runtime tells."""
    return getattr(runtime, "context_length", None) or getattr(runtime, "max_length", None)


async def prompt_room(backend: Backend, prompt: str) -> int | None:
    """Tokens left for the completion after ``prompt`` (None: context length unknown)."""
    context = context_length(backend.runtime)
    if not context:
        return None
    return context - await backend.run_locked(backend.runtime.count_tokens, prompt)


async def check_room(backend: Backend, field: str, prompts_field: str, prompts: list[str],
                     max_new_tokens: int, listed: bool = True) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` in the model's context.

    OpenAI answers such a request with a 400 too; the runtime would refuse it (never cut
    the prompt), and here it is refused before it can join a batch with other requests.

    Args:
        backend: The running service.
        field: The request's name for the completion length (``max_tokens``...).
        prompts_field: The request's name for the prompts, for the message.
        prompts: The prompts (after ``fit_tokens``).
        max_new_tokens: The requested completion length.
        listed: Name prompts ``prompts_field[i]`` (else just ``prompts_field``).

    Raises:
        RequestError: 400 naming ``field``, the prompt and the context length.
    """
    context = context_length(backend.runtime)
    if not context:
        return
    check_room_count(context, field, prompts_field, 0, max_new_tokens)
    for i, prompt in enumerate(prompts):
        # a token spans at least one UTF-8 byte, a SentencePiece word marker aside
        if 2 * len(prompt.encode("utf-8")) + _SPECIALS + max_new_tokens <= context:
            continue
        n = await backend.run_locked(backend.runtime.count_tokens, prompt)
        check_room_count(context, field, f"{prompts_field}[{i}]" if listed else prompts_field,
                         n, max_new_tokens)


def check_room_count(context: int | None, field: str, prompt_name: str, n: int,
                     max_new_tokens: int) -> None:
    """Refuse ``max_new_tokens`` that, after a prompt of ``n`` tokens, do not fit in
    ``context`` (None: unknown, nothing checked).

    Raises:
        RequestError: 400 naming ``field`` (code ``context_length_exceeded``).
    """
    if not context:
        return
    if max_new_tokens >= context:
        raise RequestError(f"{field}: {max_new_tokens} leaves no room for the prompt in the "
                           f"model's context of {context} tokens",
                           code="context_length_exceeded")
    if n + max_new_tokens > context:
        raise RequestError(f"{field}: {max_new_tokens} plus the {n} tokens of {prompt_name} "
                           f"exceed the model's context of {context} tokens; lower "
                           f"{field} or shorten the prompt", code="context_length_exceeded")
