"""Request/response models of the HTTP service, its limits, and strict body parsing.

Every request body goes through :func:`parse_body`: bytes → UTF-8 → JSON → a pydantic
model with ``extra="forbid"``; any failure becomes a :class:`RequestError` whose message
names the offending field (``texts[2]: must not be empty``), answered as a 4xx JSON body
``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error object, see
:mod:`serve.api.http_errors`). The limits (:class:`serve.settings.Limits`) are settings.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.errors import RequestError
from serve.settings import Limits

M = TypeVar("M", bound=BaseModel)

INT64_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ClassifyRequest(_Strict):
    """``POST /classify``."""

    texts: list[str]
    all_scores: bool = False


class ClassifyResult(BaseModel):
    """One classified text; ``scores`` only when ``all_scores`` was asked for."""

    label: str
    score: float
    scores: dict[str, float] | None = None


class ClassifyResponse(BaseModel):
    """Answer of ``POST /classify``."""

    results: list[ClassifyResult]


class GenerateRequest(_Strict):
    """``POST /generate``; ``stream`` needs exactly one prompt."""

    prompts: list[str]
    max_new_tokens: int = Field(32, ge=1, le=INT64_MAX)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool = False


class GenerateItem(BaseModel):
    """One prompt with its decoding settings, the unit the engine runs.

    ``prompt_ids``: the prompt's token ids when the route tokenized it itself (chat, or a
    prompt counted for the token limits); otherwise the prompt is tokenized as the model
    sees it (special tokens included) when it is submitted.
    """

    prompt: str
    prompt_ids: list[int] | None = None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs
    grammar: Any = None  # a serve.engine.grammar.Grammar: structured outputs (engine only)

class GenerateResult(BaseModel):
    """One completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class GenerateResponse(BaseModel):
    """Answer of ``POST /generate``."""

    results: list[GenerateResult]


def field_name(loc: tuple[Any, ...]) -> str:
    """``("texts", 2)`` → ``texts[2]``; ``("messages", 0, "role")`` → ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union member's type (``str``,
    ``list[str]``, a model class), not a field: field names here are lower case."""
    return isinstance(part, str) and (
        "[" in part or part in _TYPE_TAGS or part[:1].isupper() or "-" in part)


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not _is_type_tag(p))
    if err["type"] == "extra_forbidden":
        return f"{field_name(loc)}: unknown field"
    if err["type"] == "missing":
        return f"{field_name(loc)}: field required"
    return f"{field_name(loc)}: {err['msg']}"


def parse_body(model: type[M], raw: bytes, limits: Limits) -> M:
    """Parse a request body strictly into ``model``.

    Raises:
        RequestError: too large (413), not UTF-8, not JSON, not an object, or invalid
            for the model (400), naming the field.
    """
    if len(raw) > limits.max_body_bytes:
        raise RequestError(f"body: {len(raw)} bytes, more than the limit of "
                           f"{limits.max_body_bytes}", status=413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"body: invalid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise RequestError("body: empty; expected a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"body: malformed JSON ({exc.msg} at line {exc.lineno} "
                           f"column {exc.colno})") from None
    except RecursionError:
        raise RequestError("body: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of over 4,300 digits
        raise RequestError(f"body: invalid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise RequestError(f"body: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # unknown fields first: a misspelt field also shows up as the missing one
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise RequestError("; ".join(_describe(e) for e in errors[:3])) from None


def check_texts(field: str, texts: list[str], limits: Limits) -> None:
    """Refuse an empty list, too many items, empty/over-long/non-encodable strings.

    Raises:
        RequestError: naming the field and item (``texts[2]: must not be empty``).
    """
    if not texts:
        raise RequestError(f"{field}: must contain at least one item")
    if len(texts) > limits.max_items:
        raise RequestError(f"{field}: {len(texts)} items, more than the limit of "
                           f"{limits.max_items} per request", status=413)
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(f"{field}[{i}]: must not be empty")
        if len(text) > limits.max_text_chars:
            raise RequestError(f"{field}[{i}]: {len(text)} characters, more than the limit "
                               f"of {limits.max_text_chars}", status=413)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{field}[{i}]: invalid UTF-8 (lone surrogate "
                               "escape)") from None


def check_max_new_tokens(field: str, value: int, limits: Limits) -> None:
    """Refuse a generation length over the server's cap.

    Raises:
        RequestError: naming the field and the cap.
    """
    if value > limits.max_new_tokens:
        raise RequestError(f"{field}: {value} is more than the limit of "
                           f"{limits.max_new_tokens}")
