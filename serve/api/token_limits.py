"""Token-level request limits: ``max_input_tokens`` (truncate or reject) and the room a
prompt leaves for ``max_new_tokens`` in the model's context.

Counting tokens takes the model lock (tokenizers are not safe to share across threads),
so texts that are provably short enough by their UTF-8 length are never tokenized. A
prompt that is counted keeps its token ids (:class:`Prompt`), which the engine then runs:
a generation prompt is tokenized at most once per request. A generation prompt over
``max_input_tokens`` is cut by slicing those ids (special tokens kept), not by searching
for the longest text that fits (which cost ~15 tokenizations of the whole prompt, even
for a prompt the context check then refused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve.errors import RequestError

if TYPE_CHECKING:
    from serve.api.backend import Backend

# Upper bound on special tokens a tokenizer adds (BOS, CLS/SEP): texts of fewer UTF-8 bytes
# than the token limit minus this cannot exceed it, so they are never tokenized here.
_SPECIALS = 4


@dataclass
class Prompt:
    """A prompt after the token limits: its text and, if it was tokenized to be counted,
    its token ids as the model sees them (special tokens included), for the engine."""

    text: str
    ids: list[int] | None = None


Tokenize = Callable[[str], Sequence[int]]


def _truncate(tokenize: Tokenize, text: str, limit: int,
              keep: str) -> tuple[str, Sequence[int]]:
    """Longest head (or tail) of ``text`` with at most ``limit`` tokens (binary search),
    with its tokens."""
    lo, hi, best = 0, len(text), None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = text[:mid] if keep == "head" else text[len(text) - mid:]
        ids = tokenize(part)
        if len(ids) <= limit:
            lo, best = mid, ids
        else:
            hi = mid - 1
    part = text[:lo] if keep == "head" else text[len(text) - lo:]
    return part, tokenize(part) if best is None else best


def _slice(encode: Tokenize, decode: Callable[[list[int]], str], ids: Sequence[int],
           limit: int, keep: str) -> tuple[str, list[int]]:
    """The head (or tail) of a prompt's ``ids`` cut to ``limit`` tokens, the special tokens
    the tokenizer adds around a text kept in place; with the text of the kept part."""
    marks = list(encode(""))  # what the tokenizer adds to any text (BOS, ...)
    lead = 0
    while lead < min(len(marks), len(ids)) and ids[lead] == marks[lead]:
        lead += 1
    trail = len(marks) - lead
    if trail and list(ids[len(ids) - trail:]) != marks[lead:]:
        trail = 0
    body = list(ids[lead:len(ids) - trail])
    room = max(limit - lead - trail, 0)
    body = body[:room] if keep == "head" else body[len(body) - room:]
    return decode(body), [*ids[:lead], *body, *ids[len(ids) - trail:]]


Cut = Callable[[str, Sequence[int], int, str], tuple[str, Sequence[int]]]


async def _fit(backend: Backend, field: str, texts: list[str], keep: str,
               tokenize: Tokenize, cut: Cut) -> list[tuple[str, Sequence[int] | None]]:
    limits = backend.limits
    limit = limits.max_input_tokens
    out: list[tuple[str, Sequence[int] | None]] = []
    for i, text in enumerate(texts):
        if len(text.encode("utf-8")) + _SPECIALS <= limit:
            out.append((text, None))
            continue
        ids = await backend.run_locked(tokenize, text)
        if len(ids) <= limit:
            out.append((text, ids))
            continue
        if limits.long_input == "reject":
            raise RequestError(f"{field}[{i}]: {len(ids)} tokens, more than the limit of "
                               f"{limit}", 413)
        out.append(await backend.run_locked(cut, text, ids, limit, keep))
    return out


def _count_only(runtime: Any) -> Tokenize:
    """``runtime.count_tokens`` as a stand-in token sequence of that length."""
    return lambda text: range(runtime.count_tokens(text))


async def fit_tokens(backend: Backend, field: str, texts: list[str], keep: str) -> list[str]:
    """Apply ``max_input_tokens`` to each text: truncate (head/tail) or reject (413).

    Raises:
        RequestError: 413 naming ``field[i]`` when the limits say ``long_input: reject``.
    """
    count = _count_only(backend.runtime)
    fitted = await _fit(backend, field, texts, keep, count,
                        lambda text, _ids, limit, keep: _truncate(count, text, limit, keep))
    return [text for text, _ in fitted]


async def fit_prompts(backend: Backend, field: str, texts: list[str],
                      keep: str) -> list[Prompt]:
    """:func:`fit_tokens` for generation prompts, tokenized with ``backend.encode`` (the
    engine's ids): each counted prompt keeps its ids; one over the limit is tokenized
    once and its ids sliced (see :func:`_slice`).

    Raises:
        RequestError: 413 naming ``field[i]`` when the limits say ``long_input: reject``.
    """
    def cut(text: str, ids: Sequence[int], limit: int, keep: str) -> tuple[str, list[int]]:
        return _slice(backend.encode, backend.runtime.tokenizer.decode, ids, limit, keep)

    fitted = await _fit(backend, field, texts, keep, backend.encode, cut)
    return [Prompt(text, None if ids is None else list(ids)) for text, ids in fitted]


def context_length(runtime: Any) -> int | None:
    """The model's context length in tokens (prompt + completion), if the runtime tells."""
    return getattr(runtime, "context_length", None) or getattr(runtime, "max_length", None)


async def check_room(backend: Backend, field: str, prompts_field: str,
                     prompts: list[Prompt], max_new_tokens: int, listed: bool = True) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` in the model's context.

    OpenAI answers such a request with a 400 too; the runtime would refuse it (never cut
    the prompt), and here it is refused before it can join a batch with other requests.

    Args:
        backend: The running service.
        field: The request's name for the completion length (``max_tokens``...).
        prompts_field: The request's name for the prompts, for the message.
        prompts: The prompts (after :func:`fit_prompts`); one tokenized here keeps its
            ids.
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
        if 2 * len(prompt.text.encode("utf-8")) + _SPECIALS + max_new_tokens <= context:
            continue
        if prompt.ids is None:
            prompt.ids = await backend.run_locked(backend.encode, prompt.text)
        check_room_count(context, field, f"{prompts_field}[{i}]" if listed else prompts_field,
                         len(prompt.ids), max_new_tokens)


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
