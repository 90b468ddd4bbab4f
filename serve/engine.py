"""The generation engine: continuous (iteration-level) batching of concurrent requests.

One engine per worker owns the LM through a :class:`serve.step_lm.StepLM` and runs it
in a thread of its own. Each iteration it

1. frees the slots of aborted sequences (client gone, waiting or running; stop sequence
   seen) and drops the aborted ones still waiting,
2. refuses waiting requests whose queue deadline has passed (the route answers 503
   before any response header),
3. admits waiting requests in arrival order (FIFO: the head is never overtaken) while
   the running sequences stay within ``max_running`` and ``max_kv_tokens`` (prompt +
   max new tokens of every running sequence), prefilling each (its first token),
4. decodes one token for every running sequence in one batched step.

A greedy answer does not depend on the other requests in the batch: the step LMs decode
each row exactly as alone (left padding masked, own positions); for dynamic-int8 graphs,
whose activation scale spans the whole batch, that means one forward per sequence
(:func:`serve.step_lm.decode_per_row`).

So a request joins the running batch at the next step and never waits for another
request's whole generation. Tokens go to each request's asyncio queue (one thread hop
per step for all of them). Token counts and ``finish_reason`` come from the engine's
token ids. There is no lock around generation: only this thread touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from serve.llm_metrics import LLMMetrics, llm_metrics
from serve.logprobs import TokenLogprob
from serve.runtimes import GenerationParams
from serve.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Scheduling limits of one engine (one worker).

    Attributes:
        max_running: Sequences decoded together (vLLM's ``max_num_seqs``).
        max_kv_tokens: Budget over running sequences of prompt + max new tokens.
        max_waiting: Requests queued for admission; more are refused at once (503).
        queue_timeout_s: Longest wait for admission before a 503 with ``Retry-After``.
        max_prefill_tokens: Prompt tokens prefilled in one step before the running
            sequences decode again (as vLLM's ``max_num_batched_tokens`` bounds a step): a
            burst of long prompts does not stall every running stream until all are in.
            One prompt per step is always admitted, however long.
    """

    max_running: int = 32
    max_kv_tokens: int = 32_768
    max_waiting: int = 256
    queue_timeout_s: float = 30.0
    max_prefill_tokens: int = 2048


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

    @property
    def need(self) -> int:
        """KV tokens this sequence may use: prompt + max new tokens."""
        return len(self.prompt_ids) + self.params.max_new_tokens


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


class Engine:
    """Continuous-batching scheduler over a step-level LM (see the module docstring).

    Args:
        lm: The step-level model (only the engine thread calls it).
        eos_ids: Token ids that end a sequence (not emitted, not counted).
        config: Scheduling limits.
        metrics: Prometheus metrics (defaults to the process's).
    """

    def __init__(self, lm: Any, eos_ids: set[int], config: EngineConfig,
                 metrics: LLMMetrics | None = None) -> None:
        self.lm = lm
        self.eos_ids = set(eos_ids)
        self.config = config
        self.metrics = metrics or llm_metrics()
        self.context = int(lm.max_length)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._aborts: list[Sequence] = []
        self._running: list[Sequence] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="modelpress-engine",
                                        daemon=True)
        self._thread.start()

    # --- the event-loop side --------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Sequence:
        """Queue a request; its tokens arrive on ``sequence.queue`` as :class:`Event`.

        Raises:
            EngineRefused: 400 if it can never fit, 503 if the waiting queue is full.
        """
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.context:
            raise EngineRefused(f"max_new_tokens: {params.max_new_tokens} plus the "
                                f"{len(prompt_ids)} prompt tokens exceed the model's "
                                f"context of {self.context} tokens", 400)
        if need > self.config.max_kv_tokens:
            raise EngineRefused(f"max_new_tokens: {need} prompt + completion tokens exceed "
                                f"the server's max_kv_tokens of {self.config.max_kv_tokens}",
                                400)
        seq = Sequence(id=next(self._ids), prompt_ids=list(prompt_ids), params=params,
                       queue=asyncio.Queue(), loop=asyncio.get_running_loop(),
                       arrived=time.monotonic(), sampler=Sampler(params))
        with self._cond:
            if self._closed:
                raise EngineRefused("server is shutting down", 503)
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineRefused(f"server overloaded: {len(self._waiting)} requests "
                                    "waiting; retry later", 503)
            self._waiting.append(seq)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()
        return seq

    def abort(self, seq: Sequence, reason: str | None = None) -> None:
        """Stop ``seq`` (client gone, or ``reason="stop"``: its stop sequence was seen);
        its slot is freed at the start of the next engine iteration."""
        with self._cond:
            if seq.aborted or seq.finished:
                return
            seq.aborted, seq.abort_reason = True, reason
            self._aborts.append(seq)
            self._cond.notify()

    def close(self) -> None:
        """Stop the engine thread (running requests end with an error)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- the engine thread ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._aborts or self._running):
                    self._cond.wait()
                if self._closed:
                    break
                aborts, self._aborts = self._aborts, []
            step: Events = []
            try:
                self._free_aborted(aborts)
                self._expire(step)
                self._admit(step)
                self._decode(step)
            except Exception as exc:  # a model failure ends the running requests, not us
                log.exception("engine step failed")
                error = EngineRefused(f"internal error while running the model ({exc})", 500)
                for seq in list(self._running):
                    self._finish(seq, step, error=error)
            self._deliver(step)
        step: Events = []
        error = EngineRefused("server is shutting down", 503)
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, step, error=error)
        self._deliver(step)

    def _free_aborted(self, aborts: list[Sequence]) -> None:
        for seq in aborts:
            if seq in self._running:
                self._running.remove(seq)
                self.lm.free(seq.id)
            with self._cond:  # a waiting one leaves the queue now, not when it is the head
                if seq in self._waiting:
                    self._waiting.remove(seq)
            seq.finished = True
            if seq.abort_reason == "stop":
                self.metrics.request_success.labels(finished_reason="stop").inc()
            else:
                self.metrics.request_aborted.inc()
        self.metrics.running.set(len(self._running))
        with self._cond:
            self.metrics.waiting.set(len(self._waiting))

    def _expire(self, step: Events) -> None:
        now, timeout = time.monotonic(), self.config.queue_timeout_s
        with self._cond:
            while self._waiting and (self._waiting[0].aborted
                                     or now - self._waiting[0].arrived > timeout):
                seq = self._waiting.popleft()
                if seq.aborted:
                    continue
                self.metrics.request_queue_timeout.inc()
                self._finish(seq, step, error=EngineRefused(
                    f"server overloaded: not scheduled within {timeout:g} s; retry later"))
            self.metrics.waiting.set(len(self._waiting))

    def _admit(self, step: Events) -> None:
        prefilled = 0
        while True:
            with self._cond:
                used = sum(s.need for s in self._running)
                head = self._waiting[0] if self._waiting else None
                if (head is None or len(self._running) >= self.config.max_running
                        or used + head.need > self.config.max_kv_tokens
                        or (prefilled and prefilled + len(head.prompt_ids)
                            > self.config.max_prefill_tokens)):
                    self.metrics.waiting.set(len(self._waiting))
                    return
                self._waiting.popleft()
                if head.aborted:
                    continue
            now = time.monotonic()
            self.metrics.queue_time.observe(now - head.arrived)
            self._running.append(head)  # before prefill: a failure there ends it too
            logits = self.lm.prefill(head.id, head.prompt_ids)
            prefilled += len(head.prompt_ids)
            self.metrics.prompt_tokens.inc(len(head.prompt_ids))
            self.metrics.running.set(len(self._running))
            self._emit(head, head.sampler(logits), step)
            # its first token goes out now, not after the other admissions' prefills
            self._deliver(step)
            step.clear()

    def _decode(self, step: Events) -> None:
        batch = [s for s in self._running if not s.finished]
        if not batch:
            return
        self.metrics.step_sequences.observe(len(batch))
        logits = self.lm.decode([s.id for s in batch], [s.last_token for s in batch])
        for seq, row in zip(batch, logits, strict=True):
            self._emit(seq, seq.sampler(row), step)

    def _emit(self, seq: Sequence, token: int, step: Events) -> None:
        """Record one sampled token: deliver it, or end the sequence (EOS, length)."""
        if token in self.eos_ids:
            self._finish(seq, step, reason="stop", last=seq.sampler.last)
            return
        now = time.monotonic()
        if seq.generated == 0:
            self.metrics.time_to_first_token.observe(now - seq.arrived)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_time)
        seq.generated += 1
        seq.last_token, seq.last_time = token, now
        self.metrics.generation_tokens.inc()
        step.append((seq, Event(token=token, logprob=seq.sampler.last)))
        if (seq.generated >= seq.params.max_new_tokens
                or len(seq.prompt_ids) + seq.generated >= self.context):
            self._finish(seq, step, reason="length")

    def _finish(self, seq: Sequence, step: Events, reason: str | None = None,
                error: EngineRefused | None = None, last: TokenLogprob | None = None) -> None:
        if seq in self._running:
            self._running.remove(seq)
            try:
                self.lm.free(seq.id)
            except Exception:  # its prefill failed before it had a cache
                log.debug("no cache to free for sequence %d", seq.id)
            self.metrics.running.set(len(self._running))
        seq.finished = True
        if reason is not None:
            self.metrics.request_success.labels(finished_reason=reason).inc()
            self.metrics.e2e_request_latency.observe(time.monotonic() - seq.arrived)
        step.append((seq, Event(finish_reason=reason, error=error, logprob=last)))

    @staticmethod
    def _deliver(step: Events) -> None:
        """Hand a step's events to their event loops: one thread hop per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, Events] = {}
        for seq, event in step:
            by_loop.setdefault(seq.loop, []).append((seq, event))
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens
                loop.call_soon_threadsafe(_put_all, events)


def _put_all(events: Events) -> None:
    for seq, event in events:
        seq.queue.put_nowait(event)

