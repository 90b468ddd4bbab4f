"""Request/response models of the HTTP service, its limits, and strict body parsing.

Every request body goes through :func:`parse_body`: bytes → UTF-8 → JSON → a pydantic
model with ``extra="forbid"``; any failure becomes a :class:`RequestError` whose message
names the offending field (``texts[2]: must not be empty``), answered as a 4xx JSON body
``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error object, see
:mod:`serve.api.http_errors`). Limits come from ``MODELPRESS_*`` environment variables (set by
``modelpress serve``) so the same service also starts with plain ``bentoml serve``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.errors import ModelpressError, RequestError

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "MODELPRESS_"


INT64_MAX = 2**63 - 1


class Limits(BaseModel):
    """Per-request and per-worker caps.

    Attributes:
        max_items: Texts/prompts per request.
        max_text_chars: Characters per text or prompt (checked before tokenizing).
        max_input_tokens: Tokens per text or prompt.
        long_input: What to do with inputs over ``max_input_tokens``: ``truncate`` (keep the
            head of a text to classify, the tail of a prompt) or ``reject`` (413).
        max_new_tokens: Upper bound on ``max_new_tokens`` / ``max_tokens``.
        max_body_bytes: Request body size.
        body_timeout_s: Longest time to receive a request body (408 past it); the body
            is read before the request takes a concurrency slot.
        max_concurrency: Requests in flight per server (queued + running); more get 429.
    """

    model_config = ConfigDict(extra="forbid")

    max_items: int = Field(64, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_input_tokens: int = Field(512, ge=1)
    long_input: Literal["truncate", "reject"] = "truncate"
    max_new_tokens: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1)
    body_timeout_s: float = Field(30.0, gt=0)
    max_concurrency: int = Field(64, ge=1)


class ServeSettings(BaseModel):
    """How the service runs; read from ``MODELPRESS_*`` environment variables.

    Attributes:
        artifact: Artifact folder to serve (``MODELPRESS_ARTIFACT``).
        device: ``auto``, ``cpu`` or ``cuda``.
        batching: Adaptive batching on (``MODELPRESS_BATCHING=0`` for the baseline).
        max_batch_size: Largest batch the dispatcher forms (items, not requests).
        max_latency_ms: Latency budget of a queued request; 503 past it.
        workers: Server worker processes (each loads the model).
        timeout_s: Request timeout (504 past it; BentoML's). ``/classify`` is bounded by
            ``body_timeout_s`` and ``max_latency_ms`` instead (it bypasses BentoML's layers).
        access_log: Log every request (BentoML's access log).
        max_running: Generation: sequences decoded together per engine step.
        max_kv_tokens: Generation: KV budget in tokens (running sequences' prompt and
            generated tokens, plus the prefix cache); it grows per token, with preemption.
        max_waiting: Generation: requests queued for admission before 503s.
        queue_timeout_s: Generation: longest wait for admission (503 with Retry-After).
        max_num_batched_tokens: Generation: tokens per engine step (one per decoding
            sequence plus prompt chunks): long prompts are prefilled in chunks.
        max_prefill_tokens: Generation, deprecated: prompt tokens per step alone; when set
            it replaces ``max_num_batched_tokens``.
        prefix_cache: Generation: reuse the KV of shared prompt prefixes.
        api_key: When set, every route but the health checks and ``/metrics`` needs
            ``Authorization: Bearer <api_key>`` (``MODELPRESS_API_KEY``).
        header_timeout_s: Longest time for a request's headers to arrive, from its first
            byte or the connection's opening; the connection is closed past it.
        keep_alive_timeout_s: An idle connection between requests is closed after this.
        max_connections: Open connections per worker; more get 503 and are closed
            (lowered to the open-file limit less 256).
        limits: Per-request caps.
    """

    model_config = ConfigDict(extra="forbid")

    artifact: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batching: bool = True
    max_batch_size: int = Field(32, ge=1)
    max_latency_ms: int = Field(10_000, ge=1)
    workers: int = Field(1, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    access_log: bool = True
    max_running: int = Field(32, ge=1, le=1024)
    max_kv_tokens: int = Field(65_536, ge=1)
    max_waiting: int = Field(256, ge=1)
    queue_timeout_s: float = Field(30.0, gt=0)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_prefill_tokens: int | None = Field(None, ge=1)
    prefix_cache: bool = True
    api_key: str = Field("", repr=False)
    header_timeout_s: float = Field(10.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(2048, ge=1)
    limits: Limits = Field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServeSettings:
        """Read settings from ``MODELPRESS_<FIELD>`` variables (upper case).

        Raises:
            ModelpressError: A variable holds an invalid value (named in the message).
        """
        env = dict(os.environ if env is None else env)
        top = {k: env[ENV_PREFIX + k.upper()] for k in cls.model_fields
               if k != "limits" and ENV_PREFIX + k.upper() in env}
        limits = {k: env[ENV_PREFIX + k.upper()] for k in Limits.model_fields
                  if ENV_PREFIX + k.upper() in env}
        try:
            return cls.model_validate({**top, "limits": limits})
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ENV_PREFIX + str(err["loc"][-1]).upper()
            raise ModelpressError(f"{name}: {err['msg']}") from None

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings."""
        out = {ENV_PREFIX + k.upper(): str(v) for k, v in self.model_dump().items()
               if k != "limits" and v is not None}  # None: the field's default
        out[ENV_PREFIX + "BATCHING"] = "1" if self.batching else "0"
        out[ENV_PREFIX + "ACCESS_LOG"] = "1" if self.access_log else "0"
        out.update({ENV_PREFIX + k.upper(): str(v) for k, v in self.limits.model_dump().items()})
        return out


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
