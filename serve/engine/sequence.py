"""The engine's request records: its limits, a sequence's state, the events it emits.

(Kept apart from :mod:`serve.engine.core`, which re-exports them, so the scheduler and the
runner share them without importing each other.)
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field

from serve.runtime.logprobs import TokenLogprob
from serve.runtime.protocol import GenerationParams
from serve.runtime.sampling import Sampler


@dataclass
class EngineConfig:
    """Scheduling limits of one engine (one worker).

    Attributes:
        max_running: Sequences decoded together (vLLM's ``max_num_seqs``).
        max_kv_tokens: KV budget in tokens: every running sequence's prompt and generated
            tokens, plus the prefix cache's blocks. A request needing more than this alone
            (prompt + max new tokens) is refused.
        max_waiting: Requests queued for admission; more are refused at once (503).
        queue_timeout_s: Longest wait for admission before a 503 with ``Retry-After``.
        max_num_batched_tokens: Tokens fed to the model in one step (vLLM's name): one per
            decoding sequence plus prompt chunks up to the rest, so a long prompt or a
            burst of them is prefilled over several steps, between the running streams'
            decode steps. A step LM that cannot prefill in chunks gets whole prompts, at
            least one per step.
        max_prefill_tokens: Deprecated: a budget of prompt tokens per step alone (decode
            tokens not counted); when set it replaces ``max_num_batched_tokens``.
        prefix_cache: Reuse the KV of prompt prefixes across requests
            (:mod:`serve.engine.prefix_cache`) where the step LM can copy KV rows.
    """

    max_running: int = 32
    max_kv_tokens: int = 32_768
    max_waiting: int = 256
    queue_timeout_s: float = 30.0
    max_num_batched_tokens: int = 2048
    max_prefill_tokens: int | None = None
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_prefill_tokens is not None:
            warnings.warn("max_prefill_tokens is deprecated: use max_num_batched_tokens",
                          DeprecationWarning, stacklevel=3)


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
