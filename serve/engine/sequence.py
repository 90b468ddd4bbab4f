"""The engine's request records: a sequence's state, the events it emits.

(Kept apart from :mod:`serve.engine.core`, which re-exports them, so the scheduler and the
runner share them without importing each other.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from serve.runtime.logprobs import TokenLogprob
from serve.runtime.protocol import GenerationParams
from serve.runtime.sampling import Sampler


class EngineRefused(Exception):
    """The engine cannot take or keep a request.

    Attributes:
        status: HTTP status to answer (503 overload / queue timeout, 400 too large).
    """

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Sequence:
    """One request inside the engine (its fields belong to the engine thread)."""

    id: int
    prompt_ids: list[int]
    params: GenerationParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float
    sampler: Sampler
    generated: int = 0
    last_token: int = -1
    last_time: float = 0.0
    aborted: bool = False
    finished: bool = False
    abort_reason: str | None = None  # "stop": ended by its consumer (a stop sequence)
    output: list[int] = field(default_factory=list)
    prefill_ids: list[int] = field(default_factory=list)  # what its slot must hold first
    computed: int = 0  # tokens of prefill_ids in its slot
    prefilled: bool = False  # decoding (its prefill done)
    kv_tokens: int = 0  # KV tokens it holds in the budget
    admitted_at: float | None = None

    def __post_init__(self) -> None:
        self.prefill_ids = list(self.prompt_ids)

    @property
    def need(self) -> int:
        """KV tokens this sequence may use at most: prompt + max new tokens."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    def preempt(self) -> None:
        """Forget the slot: it is prefilled again from its prompt and generated tokens."""
        self.prefill_ids = self.prompt_ids + self.output
        self.computed, self.prefilled, self.kv_tokens = 0, False, 0


@dataclass
class Event:
    """What a request's queue receives: a token, or its end (``finish_reason``/error).

    ``logprob``: the token's log-probability when the request asked for them; on an end
    by EOS, the EOS token's (not emitted as text, but scored, as vLLM reports it).
    """

    token: int | None = None
    finish_reason: str | None = None
    error: EngineRefused | None = None
    logprob: TokenLogprob | None = None


# What one engine iteration hands to the event loops, in order.
Events = list[tuple[Sequence, Event]]
