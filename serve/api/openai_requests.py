"""Request bodies of the OpenAI-compatible routes (:mod:`serve.api.openai_api`): pydantic
models with OpenAI's fields and defaults, and the checks that refuse what the server cannot
honour (400 naming the field)."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve.api.chat import ChatMessage
from serve.api.log_text import names_for_log
from serve.api.schemas import INT64_MAX
from serve.errors import RequestError
from serve.runtime.logprobs import MAX_TOP_LOGPROBS

log = logging.getLogger(__name__)

INT64_MIN = -(2**63)

class _Lenient(BaseModel):
    """Unknown fields are kept aside (``model_extra``), logged and ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Lenient):
    """``stream_options``."""

    include_usage: bool | None = None


# What the published schema (``/openapi.json``) allows beyond the validation bounds: the
# values of OpenAI fields this server can honour. Other values pass validation and get a
# 400 that names the field and says it is not supported.
def _only(**schema: Any) -> Any:
    return {"json_schema_extra": schema}


class JsonSchemaFormat(_Lenient):
    """``response_format.json_schema``: the schema the answer must validate against
    (enforced whatever ``strict`` says, as vLLM does)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """``response_format``: ``text``, ``json_object`` (any JSON object) or
    ``json_schema`` (JSON valid against ``json_schema.schema``)."""

    type: str = Field(..., **_only(enum=["text", "json_object", "json_schema"]))
    json_schema: JsonSchemaFormat | None = None


class OpenAIParams(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=INT64_MAX, **_only(maximum=1))
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, **_only(maxItems=8))
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                           **_only(minimum=0, maximum=0))
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                            **_only(minimum=0, maximum=0))
    logit_bias: dict[str, float] | None = Field(None, **_only(maxProperties=0))
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's name for a JSON schema

    def check(self, path: str) -> None:
        """Refuse what this server cannot honour (400 naming the field); log ignored
        unknown fields."""
        if self.model_extra:
            log.warning("%s: ignored unknown fields: %s", path,
                        names_for_log(self.model_extra, len(self.model_extra)))
        if self.n not in (None, 1):
            raise RequestError("n: only n=1 is supported", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name}: not supported (use 0 or null)",
                                   code="unsupported_parameter")
        if self.logit_bias:
            raise RequestError("logit_bias: not supported (use {} or null)",
                               code="unsupported_parameter")
        fmt = self.response_format
        if fmt is not None and fmt.type not in ("text", "json_object", "json_schema"):
            raise RequestError("response_format.type: must be 'text', 'json_object' or "
                               f"'json_schema', got '{fmt.type}'", code="unsupported_value")
        if fmt is not None and fmt.type != "text" and self.guided_json is not None:
            raise RequestError("guided_json: give either guided_json or response_format")

    def json_schema(self) -> tuple[str, Any] | None:
        """``(field, schema)`` the answer must follow, or None for free text."""
        fmt = self.response_format
        if self.guided_json is not None:
            return "guided_json", _parsed("guided_json", self.guided_json)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return "response_format", {"type": "object"}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise RequestError("response_format.json_schema.schema: field required for "
                               "type 'json_schema'")
        return "response_format.json_schema.schema", fmt.json_schema.schema_

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 8:
            raise RequestError("stop: at most 8 stop sequences")
        return stops

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIParams):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=INT64_MAX)  # 0: echo only
    echo: bool | None = None
    suffix: str | None = Field(None, **_only(enum=["", None]))
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=INT64_MAX, **_only(maximum=1))

    def check(self, path: str) -> None:
        """See :meth:`OpenAIParams.check`; also ``suffix``, ``best_of`` and
        ``max_tokens: 0`` (echo only)."""
        super().check(path)
        if self.suffix:
            raise RequestError("suffix: not supported", code="unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens: 0 generates nothing; it needs echo: true (to "
                               "score the prompt)")
        if self.best_of not in (None, 1):
            raise RequestError("best_of: only best_of=1 is supported",
                               code="unsupported_value")


class ChatRequest(OpenAIParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., **_only(minItems=1))
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, **_only(maxItems=0))
    tool_choice: str | dict[str, Any] | None = Field(None,
                                                     **_only(enum=["none", "auto", None]))
    functions: list[dict[str, Any]] | None = Field(None, **_only(maxItems=0))
    function_call: str | dict[str, Any] | None = Field(
        None, **_only(enum=["none", "auto", None]))

    def check(self, path: str) -> None:
        """See :meth:`OpenAIParams.check`; also ``top_logprobs`` (needs ``logprobs``)
        and tools."""
        super().check(path)
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise RequestError(f"{name}: tool calling is not supported",
                                   code="unsupported_parameter")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise RequestError(f"{name}: tool calling is not supported",
                                   code="unsupported_parameter")


def _parsed(field: str, schema: Any) -> Any:
    """A schema given as a JSON string (as vLLM's ``guided_json`` allows), parsed."""
    if not isinstance(schema, str):
        return schema
    try:
        return json.loads(schema)
    except ValueError:
        raise RequestError(f"{field}: not valid JSON") from None
