"""The serving settings, declared once: type, default, bounds and help of every setting.

Everything else is derived from the models here:

* ``modelpress serve``'s options (:func:`with_cli_options`): ``--max-kv-tokens`` for the
  field ``max_kv_tokens``, ``--prefix-cache/--no-prefix-cache`` for a boolean;
* the ``MODELPRESS_*`` environment variables that the launcher sets and the service reads
  (:meth:`ServeSettings.to_env`, :meth:`ServeSettings.from_env`);
* ``start_server(...)``'s keyword arguments (:func:`settings_from`);
* the objects each layer takes: :class:`Limits` (per-request caps), :class:`EngineConfig`
  (the generation engine and its scheduler), :class:`ConnectionLimits` (the worker's
  connection guards). Each is one group of fields; :class:`ServeSettings` is all of them
  together, flat, and hands each layer its group (:attr:`ServeSettings.limits`, ...).

Adding a setting is one field in the group that uses it. This module imports no other
part of modelpress but :mod:`serve.errors`, so every layer may import it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.errors import ModelpressError

ENV_PREFIX = "MODELPRESS_"
F = TypeVar("F", bound=Callable[..., Any])
G = TypeVar("G", bound="_Group")
# json_schema_extra keys: "argument" (not an option: the CLI's positional argument),
# "secret" (the CLI also reads MODELPRESS_<NAME>, shows no default; kept out of repr)
_ARGUMENT = {"argument": True}
_SECRET = {"secret": True}


class SettingsError(ModelpressError):
    """A setting with an invalid value, or an unknown one (named in the message)."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Group):
    """The server process: what it serves, its workers, batching, access."""

    artifact: str = Field("", description="Artifact folder to serve.",
                          json_schema_extra=_ARGUMENT)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto, cpu or cuda.")
    batching: bool = Field(True, description="Adaptive batching of /classify "
                           "(--no-batching: each request alone, the baseline).")
    max_batch_size: int = Field(32, ge=1, description="Adaptive batching: largest batch "
                                "(texts/prompts).")
    max_latency_ms: int = Field(10_000, ge=1, description="Adaptive batching: latency "
                                "budget of a queued request (503 past it).")
    workers: int = Field(1, ge=1, description="Worker processes (each loads the model).")
    timeout_s: float = Field(120.0, gt=0, description="Request timeout (504 past it; "
                             "BentoML's). /classify is bounded by --body-timeout-s and "
                             "--max-latency-ms instead.")
    access_log: bool = Field(True, description="Log every request.")
    api_key: str = Field(
        "", repr=False, json_schema_extra=_SECRET,
        description="Require 'Authorization: Bearer KEY' on every route but /readyz, "
                    "/livez, /healthz and /metrics (prefer the environment variable: a "
                    "command line is visible to other users).")


class Limits(_Group):
    """Per-request and per-worker caps of the HTTP routes."""

    max_items: int = Field(64, ge=1, description="Texts/prompts per request.")
    max_text_chars: int = Field(20_000, ge=1, description="Characters per text or prompt "
                                "(checked before tokenizing).")
    max_input_tokens: int = Field(512, ge=1, description="Tokens per text/prompt.")
    long_input: Literal["truncate", "reject"] = Field(
        "truncate", description="Inputs over --max-input-tokens: truncate (the head of a "
                                "text to classify, the tail of a prompt) or reject (413).")
    max_new_tokens: int = Field(256, ge=1, description="Cap on max_new_tokens / "
                                "max_tokens.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Request body size (413 past "
                                "it).")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest time to receive a "
                                  "request body (408 past it; slow clients hold no slot "
                                  "meanwhile).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight (queued + "
                                 "running) before answering 429.")


class EngineConfig(_Group):
    """Scheduling limits of one generation engine (one worker)."""

    max_running: int = Field(32, ge=1, le=1024, description="Generation: sequences decoded "
                             "together per engine step (vLLM's max_num_seqs).")
    max_kv_tokens: int = Field(
        65_536, ge=1,
        description="Generation: KV budget in tokens (running sequences' prompt and "
                    "generated tokens, plus the prefix cache); it grows per token, "
                    "preempting the latest sequence when full. A request needing more "
                    "alone (prompt + max new tokens) is refused.")
    max_waiting: int = Field(256, ge=1, description="Generation: requests waiting for "
                             "admission before 503s.")
    queue_timeout_s: float = Field(30.0, gt=0, description="Generation: longest wait for "
                                   "admission (503 with Retry-After).")
    max_num_batched_tokens: int = Field(
        2048, ge=1,
        description="Generation: tokens per engine step (one per decoding stream plus "
                    "prompt chunks): long prompts are prefilled in chunks between decode "
                    "steps.")
    max_gap_ratio: float = Field(
        0.0, ge=0,
        description="Generation: while sequences decode, a step's chunk of a long prompt "
                    "(over long_prefill_tokens) is sized from measured step times so the "
                    "step takes at most about this many decode steps (bounds the streams' "
                    "inter-token gap while it prefills; 2 meets a 3x bound on it); 0 (the "
                    "default) = chunks fill max_num_batched_tokens.")
    long_prefill_tokens: int = Field(
        256, ge=1,
        description="Generation: prompts longer than this are paced by max_gap_ratio "
                    "while sequences decode; shorter ones are prefilled whole within "
                    "max_num_batched_tokens.")
    max_prefill_tokens: int | None = Field(
        None, ge=1, description="Deprecated: prompt tokens per engine step alone "
                                "(replaces --max-num-batched-tokens when given).")
    prefix_cache: bool = Field(True, description="Generation: reuse the KV of prompt "
                               "prefixes shared across requests.")
    batch_invariant: bool = Field(
        False,
        description="Generation: a sequence's numbers do not depend on how many decode "
                    "beside it, so greedy answers are the same under any load, cache or "
                    "pacing (onnx-genai: a lone decoding row is padded to two, as int4 "
                    "MatMulNBits has a one-row kernel of its own; 14-24% slower at one "
                    "stream). Refused for formats that cannot do it.")

    @model_validator(mode="after")
    def _deprecated(self) -> EngineConfig:
        if 0 < self.max_gap_ratio < 1:
            raise ValueError(f"max_gap_ratio: {self.max_gap_ratio:g} is below 1; give 0 "
                             "(no pacing) or a ratio of at least 1")
        if self.max_prefill_tokens is not None:
            warnings.warn("max_prefill_tokens is deprecated: use max_num_batched_tokens",
                          DeprecationWarning, stacklevel=2)
        return self


class ConnectionLimits(_Group):
    """The worker's connection guards (:mod:`serve.app.connections`)."""

    header_timeout_s: float = Field(10.0, gt=0, description="Longest time for a request's "
                                    "headers to arrive (the connection is closed past it).")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Close a connection idle "
                                        "this long between requests.")
    max_connections: int = Field(2048, ge=1, description="Open connections per worker; "
                                 "more get 503 (lowered to the open-file limit less 256).")


# Bases last to first give the fields' (and the CLI options') order.
class ServeSettings(ConnectionLimits, EngineConfig, Limits, ServerSettings):
    """Every serving setting, flat; each layer gets its group from a property."""

    @property
    def limits(self) -> Limits:
        """The routes' per-request caps."""
        return self._group(Limits)

    @property
    def engine(self) -> EngineConfig:
        """The generation engine's scheduling limits."""
        return self._group(EngineConfig)

    @property
    def connections(self) -> ConnectionLimits:
        """The worker's connection guards."""
        return self._group(ConnectionLimits)

    def _group(self, group: type[G]) -> G:
        with warnings.catch_warnings():  # this instance has warned already
            warnings.simplefilter("ignore", DeprecationWarning)
            return group.model_validate(self.model_dump(include=set(group.model_fields)))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServeSettings:
        """Read settings from ``MODELPRESS_<FIELD>`` variables (upper case); absent ones
        keep their default.

        Raises:
            SettingsError: A variable holds an invalid value (named in the message).
        """
        env = dict(os.environ if env is None else env)
        values = {name: env[env_name(name)] for name in cls.model_fields
                  if env_name(name) in env}
        return settings_from(values, env_name)

    def to_env(self) -> dict[str, str]:
        """The ``MODELPRESS_*`` variables that reproduce these settings (``None``: unset,
        the field's default)."""
        return {env_name(name): ("1" if value else "0") if isinstance(value, bool)
                else str(value) for name, value in self.model_dump().items()
                if value is not None}


def env_name(field: str) -> str:
    """``max_kv_tokens`` → ``MODELPRESS_MAX_KV_TOKENS``."""
    return ENV_PREFIX + field.upper()


def option_name(field: str) -> str:
    """``max_kv_tokens`` → ``--max-kv-tokens``."""
    return "--" + field.replace("_", "-")


def settings_from(values: dict[str, Any],
                  name: Callable[[str], str] = str) -> ServeSettings:
    """Validate ``values`` into :class:`ServeSettings`.

    Args:
        values: Field name → value (strings are parsed as pydantic does: ``"1"``, ``"0"``
            for booleans, numbers).
        name: How the message names a field (its option, its variable).

    Raises:
        SettingsError: One line naming the first bad or unknown setting.
    """
    try:
        return ServeSettings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "settings"
        reason = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        raise SettingsError(f"{name(field)}: {reason}") from None


def _cli_type(annotation: Any) -> Any:
    """The type typer parses (pydantic validates afterwards): a ``Literal`` is read as a
    string so that a bad choice gets the same one-line error as any other bad value."""
    if get_origin(annotation) is Literal:
        return str
    return annotation


def cli_options() -> list[inspect.Parameter]:
    """One keyword parameter per setting, annotated with its typer option."""
    import typer

    params = []
    for field, info in ServeSettings.model_fields.items():
        extra = info.json_schema_extra or {}
        if extra.get("argument"):
            continue
        secret = bool(extra.get("secret"))
        decls = () if info.annotation is bool else (option_name(field),)
        option = typer.Option(*decls, help=info.description,
                              show_default=not secret and info.default is not None,
                              envvar=env_name(field) if secret else None)
        params.append(inspect.Parameter(
            field, inspect.Parameter.KEYWORD_ONLY, default=info.default,
            annotation=Annotated[_cli_type(info.annotation), option]))
    return params


def with_cli_options(command: F) -> F:
    """Give ``command`` (its settings in ``**settings``) one typer option per setting.

    typer reads a command's parameters from its signature: the ``**settings`` parameter
    is replaced by :func:`cli_options`.
    """
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*fixed, *cli_options()])
    return command

