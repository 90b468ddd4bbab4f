"""Chat messages → the prompt's token ids, as OpenAI clients send them.

Messages are rendered with the model's chat template. Three things make the result safe
and exact:

- Roles: ``system``, ``developer`` (rendered as ``system``, as OpenAI treats it),
  ``user``, ``assistant`` (its ``content`` may be ``null``) and ``tool``.
- Content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined);
  other part types get a 400 naming the part.
- Special-token strings inside message content stay text: a user who writes
  ``<|im_start|>system`` gets those characters tokenized as text, never a forged turn.
  Only the template's own markup is tokenized with special tokens.
- One BOS: when the rendered template already starts with the tokenizer's BOS string,
  the tokenizer adds none of its own.

A template that refuses the messages (e.g. roles that do not alternate) is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from serve.errors import RequestError

# Private-use characters mark where each message's content goes in the rendered template.
_OPEN, _CLOSE = "\ue000", "\ue001"


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message (OpenAI's fields; others, e.g. ``tool_calls``, are ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


def plain_messages(messages: list[ChatMessage], max_chars: int) -> list[dict[str, str]]:
    """``{"role", "content"}`` dicts for the template, content as one string.

    Raises:
        RequestError: No messages, missing content, a non-text part, or a content over
            ``max_chars`` characters (413), naming ``messages[i]...``.
    """
    if not messages:
        raise RequestError("messages: must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        if m.content is None:
            if m.role != "assistant":
                raise RequestError(f"messages[{i}].content: field required for role "
                                   f"'{m.role}'")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise RequestError(f"messages[{i}].content[{j}].type: only text parts "
                                       f"are supported, got '{part.type}'")
            text = "".join(part.text or "" for part in m.content)
        if len(text) > max_chars:
            raise RequestError(f"messages[{i}].content: {len(text)} characters, more than "
                               f"the limit of {max_chars}", 413)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"messages[{i}].content: invalid UTF-8 (lone surrogate "
                               "escape)") from None
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return out


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template applied (generation prompt added); a plain ``role: content``
    transcript for a tokenizer without a template.

    Raises:
        RequestError: The template refused the messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or raise_exception() in a template
        raise RequestError(f"messages: the model's chat template refused them "
                           f"({' '.join(str(exc).split())[:200]})") from None


def special_strings(tokenizer: Any) -> list[str]:
    """The text forms of the tokenizer's special tokens."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return sorted(s for s in found if s)


def _encode(tokenizer: Any, text: str, first: bool) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    add = first and not (bos and text.startswith(bos))  # no double BOS
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: template markup with special tokens, content as text.

    Content without any special-token string is tokenized with the whole rendered prompt
    (exactly what the template gives); otherwise the prompt is rendered with a marker per
    content and each content is tokenized with its special-token strings kept as text.

    Raises:
        RequestError: The template refused the messages, or it does not place each
            content once in the prompt (so the content cannot be kept as text).
    """
    specials = special_strings(tokenizer)
    marked = [i for i, m in enumerate(messages)
              if any(s in m["content"] for s in specials)]
    if not marked:
        return _encode(tokenizer, render(tokenizer, messages), first=True)
    markers = {i: f"{_OPEN}{i}{_CLOSE}" for i in marked}
    text = render(tokenizer, [{**m, "content": markers.get(i, m["content"])}
                              for i, m in enumerate(messages)])
    for i, marker in markers.items():
        if text.count(marker) != 1:
            raise RequestError(f"messages[{i}].content: contains a special token of this "
                               "model, which its chat template cannot keep as text")
    ids: list[int] = []
    rest = text
    for i in sorted(markers, key=lambda k: text.index(markers[k])):
        head, _, rest = rest.partition(markers[i])
        if head:
            ids += _encode(tokenizer, head, first=not ids)
        ids += list(tokenizer(messages[i]["content"], add_special_tokens=False,
                              split_special_tokens=True)["input_ids"])
    if rest:
        ids += _encode(tokenizer, rest, first=not ids)
    return ids
