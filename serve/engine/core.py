"""The generation engine: continuous (iteration-level) batching of concurrent requests.

One engine per worker owns the LM through a :class:`serve.runtime.step_lm.StepLM` and runs it
in a thread of its own. Each iteration it

1. frees the slots of aborted sequences (client gone, waiting or running; stop sequence
   seen) and drops the aborted ones still waiting,
2. refuses waiting requests whose queue deadline has passed (the route answers 503
   before any response header),
3. asks the :class:`serve.engine.scheduler.Scheduler` for the step's plan (FIFO admission, the
   prompt chunks to prefill and the sequences to decode under one token budget, KV that
   grows per token, preemption when it cannot) and runs it: preempted slots are freed,
   chunks prefilled (a prompt's last chunk gives its first token, delivered at once),
   then every decoding sequence gets one token from one batched step.

A greedy answer does not depend on the other requests in the batch as far as the kernels
allow: the step LMs decode each row with its own positions and mask (left padding
masked); dynamic-int8 graphs, whose activation scale spans the whole batch, run one
forward per sequence (:func:`serve.runtime.step_lm.decode_per_row`), whole-prompt
prefills and no prefix cache. Kernels can still differ by batch size: int4 MatMulNBits
runs a lone row through a kernel of its own (SmolLM2: 0.48 in a logit), so a near-tie can
flip between a request alone and under load. ``batch_invariant`` pads a lone decoding row
to two (onnx-genai; two rows and up are bitwise equal), and prompt chunks are never one
token (:data:`serve.engine.scheduler.SHORTEST_CHUNK`): then a greedy answer is the same
alone, batched, chunked, paced or from the prefix cache.

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
from collections.abc import Callable
from typing import Any

from serve.engine.llm_metrics import LLMMetrics, llm_metrics
from serve.engine.pacing import StepPacer
from serve.engine.prefix_cache import PrefixCache
from serve.engine.scheduler import Chunk, Scheduler, StepPlan
from serve.engine.sequence import EngineRefused, Event, Events, Sequence
from serve.runtime.logprobs import TokenLogprob
from serve.runtime.protocol import GenerationParams
from serve.runtime.sampling import Sampler
from serve.settings import EngineConfig

__all__ = ["Engine", "EngineConfig", "EngineRefused", "Event", "Events", "Sequence"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching runner over a step-level LM (see the module docstring).

    Args:
        lm: The step-level model (only the engine thread calls it).
        eos_ids: Token ids that end a sequence (not emitted, not counted).
        config: Scheduling limits.
        metrics: Prometheus metrics (defaults to the process's).
        clock: Seconds source of the step pacer's measurements.
    """

    def __init__(self, lm: Any, eos_ids: set[int], config: EngineConfig,
                 metrics: LLMMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lm = lm
        self._clock = clock
        self.eos_ids = set(eos_ids)
        self.config = config
        self.metrics = metrics or llm_metrics()
        self.context = int(lm.max_length)
        self.chunked = bool(getattr(lm, "chunked_prefill", False))
        # a cached prefix is continued by a chunk: both abilities are needed
        self.cache = (PrefixCache(on_counts=self._count_cache)
                      if config.prefix_cache and self.chunked
                      and getattr(lm, "copies_kv", False) else None)
        if config.batch_invariant and not getattr(lm, "per_row", False):
            # (a per-row LM decodes every sequence alone: invariant already)
            if not hasattr(lm, "min_decode_rows"):
                raise ValueError(f"batch_invariant: {type(lm).__name__} cannot decode "
                                 "batch-invariantly")
            lm.min_decode_rows = 2
        # KV room for every running sequence, before any request
        lm.reserve(config.max_running, min(self.context, config.max_kv_tokens))
        self.pacer = StepPacer(config.max_gap_ratio)
        self.scheduler = Scheduler(config, self.chunked, self.cache, self.pacer)
        self.steps = 0  # model steps run (plans with work)
        self.max_running_seen = 0
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._aborts: list[Sequence] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="modelpress-engine",
                                        daemon=True)
        self._thread.start()

    def _count_cache(self, hit: int, miss: int) -> None:
        self.metrics.prefix_cache_hits.inc(hit)
        self.metrics.prefix_cache_misses.inc(miss)

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
        waiting = self.scheduler.waiting
        with self._cond:
            if self._closed:
                raise EngineRefused("server is shutting down", 503)
            if len(waiting) >= self.config.max_waiting:
                raise EngineRefused(f"server overloaded: {len(waiting)} requests "
                                    "waiting; retry later", 503)
            waiting.append(seq)
            self.metrics.waiting.set(len(waiting))
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
        sched = self.scheduler
        while True:
            with self._cond:
                while not (self._closed or sched.waiting or self._aborts or sched.running):
                    self._cond.wait()
                if self._closed:
                    break
                aborts, self._aborts = self._aborts, []
            step: Events = []
            try:
                self._free_aborted(aborts)
                self._expire(step)
                with self._cond:
                    plan = sched.schedule()
                    self.metrics.waiting.set(len(sched.waiting))
                self._run(plan, step)
            except Exception as exc:  # a model failure ends the running requests, not us
                log.exception("engine step failed")
                error = EngineRefused(f"internal error while running the model ({exc})", 500)
                for seq in list(sched.running):
                    self._finish(seq, step, error=error)
            self._deliver(step)
        step: Events = []
        error = EngineRefused("server is shutting down", 503)
        for seq in [*sched.running, *sched.waiting]:
            self._finish(seq, step, error=error)
        self._deliver(step)

    def _free_slot(self, seq: Sequence) -> None:
        try:
            self.lm.free(seq.id)
        except Exception:  # its prefill failed (or never ran) before it had a cache
            log.debug("no cache to free for sequence %d", seq.id)

    def _free_aborted(self, aborts: list[Sequence]) -> None:
        for seq in aborts:
            with self._cond:  # a waiting one leaves the queue now, not when it is the head
                running = self.scheduler.remove(seq)
            if running:
                self._free_slot(seq)
            seq.finished = True
            if seq.abort_reason == "stop":
                self.metrics.request_success.labels(finished_reason="stop").inc()
            else:
                self.metrics.request_aborted.inc()
        self.metrics.running.set(len(self.scheduler.running))

    def _expire(self, step: Events) -> None:
        now, timeout = time.monotonic(), self.config.queue_timeout_s
        waiting = self.scheduler.waiting
        with self._cond:
            while waiting and (waiting[0].aborted or (
                    waiting[0].admitted_at is None and now - waiting[0].arrived > timeout)):
                seq = waiting.popleft()
                if seq.aborted:
                    continue
                self.metrics.request_queue_timeout.inc()
                self._finish(seq, step, error=EngineRefused(
                    f"server overloaded: not scheduled within {timeout:g} s; retry later"))
            self.metrics.waiting.set(len(waiting))

    def _run(self, plan: StepPlan, step: Events) -> None:
        """Execute one plan: free the preempted, prefill the chunks, decode the rest."""
        for seq in plan.preempted:
            self._free_slot(seq)
        running = len(self.scheduler.running)
        self.metrics.running.set(running)
        self.max_running_seen = max(self.max_running_seen, running)
        if plan.chunks or plan.decodes:
            self.steps += 1
        start = self._clock()
        for chunk in plan.chunks:
            self._prefill(chunk, step)
        prefilled = self._clock()
        batch = [s for s in plan.decodes if not s.finished]
        if batch:
            self.metrics.step_sequences.observe(len(batch))
            logits = self.lm.decode([s.id for s in batch], [s.last_token for s in batch])
            for seq, row in zip(batch, logits, strict=True):
                self._emit(seq, seq.sampler(row), step)
        self.pacer.observe(sum(c.stop - c.start for c in plan.chunks), prefilled - start,
                           len(batch), self._clock() - prefilled)

    def _prefill(self, chunk: Chunk, step: Events) -> None:
        seq = chunk.seq
        if seq.admitted_at is None:
            seq.admitted_at = time.monotonic()
            self.metrics.queue_time.observe(seq.admitted_at - seq.arrived)
        if chunk.cached:
            self.lm.load_prefix(seq.id, chunk.cached)
        ids = seq.prefill_ids[chunk.start:chunk.stop]
        logits = (self.lm.prefill(seq.id, ids, chunk.start) if self.chunked
                  else self.lm.prefill(seq.id, ids))
        self.scheduler.done(chunk)
        if not chunk.last:
            return
        if seq.generated == 0:
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if self.cache is not None:
            self.cache.insert(seq.prefill_ids, lambda a, b: self.lm.read_kv(seq.id, a, b),
                              lambda: self.config.max_kv_tokens - self.scheduler.kv_used())
        self._emit(seq, seq.sampler(logits), step)
        # its first token goes out now, not after the other admissions' prefills
        self._deliver(step)
        step.clear()

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
        seq.output.append(token)
        seq.last_token, seq.last_time = token, now
        self.metrics.generation_tokens.inc()
        step.append((seq, Event(token=token, logprob=seq.sampler.last)))
        if (seq.generated >= seq.params.max_new_tokens
                or len(seq.prompt_ids) + seq.generated >= self.context):
            self._finish(seq, step, reason="length")

    def _finish(self, seq: Sequence, step: Events, reason: str | None = None,
                error: EngineRefused | None = None, last: TokenLogprob | None = None) -> None:
        if self.scheduler.remove(seq):
            self._free_slot(seq)
            self.metrics.running.set(len(self.scheduler.running))
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
