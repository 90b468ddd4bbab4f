"""The engine's scheduler: which sequences decode and which prompt chunks prefill each step.

As vLLM's v1 engine separates its scheduler from its model runner, the scheduler here
only decides: each step it returns a plain-data :class:`StepPlan` (the running
sequences that decode one token, the prompt chunks to prefill, the sequences preempted to
make room) under one token budget, and the runner (:class:`serve.engine.core.Engine`) executes
it on the step-level LM and hands the sampled tokens back.

KV memory grows with each sequence: a sequence holds its prompt's tokens from admission
and one more per decoded token, not ``prompt + max_new_tokens`` reserved up front. When
the running sequences cannot all grow by one token within ``max_kv_tokens``, unreferenced
prefix-cache blocks are evicted first, then the latest admitted sequence is preempted: its
cache is freed and it goes back to the head of the waiting queue, to be prefilled again
from its prompt plus the tokens it has generated (recompute, as vLLM does); its stream
just pauses. A prompt longer than the step's token budget is prefilled in chunks over
several steps, between the running streams' decode steps (chunked prefill); while
sequences decode, a :class:`serve.engine.pacing.StepPacer` also caps the tokens a step
gives to long prompts (over ``long_prefill_tokens``) from measured step times, so a long
prompt stretches the streams' inter-token gap by a bounded ratio on any hardware, while a
burst of short prompts is still admitted whole within the budget (pacing those too would
cut prefill throughput: measured, a burst of queued chat requests then waited past the
30 s queue timeout on a loaded machine).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.engine.pacing import StepPacer
from serve.engine.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from serve.engine.sequence import Sequence
    from serve.settings import EngineConfig

log = logging.getLogger(__name__)

#: Fewest tokens in a prompt chunk (a one-token prompt excepted), and so the fewest a
#: prefix-cache hit leaves to prefill: a one-token prefill runs the attention and int4
#: kernels' decode path, whose numbers differ from a whole prompt's (SmolLM2 int4: 0.59 in
#: a logit), so a chunked or cached prompt would not give the whole prompt's tokens; two
#: tokens and up run the prompt path, bitwise equal to one whole prefill.
SHORTEST_CHUNK = 2


@dataclass
class Chunk:
    """Prefill ``seq.prefill_ids[start:stop]`` into ``seq``'s slot (which holds ``start``).

    Attributes:
        cached: Prefix-cache blocks to copy into the empty slot first (they hold the
            tokens ``[0, start)``); ``None`` when the slot already holds them.
    """

    seq: Sequence
    start: int
    stop: int
    cached: list[Any] | None = None

    @property
    def last(self) -> bool:
        """Whether this chunk ends the sequence's prefill (its logits give a token)."""
        return self.stop == len(self.seq.prefill_ids)


@dataclass
class StepPlan:
    """One step of work: the runner prefills ``chunks`` in order, then decodes ``decodes``."""

    chunks: list[Chunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens fed to the model in this step."""
        return len(self.decodes) + sum(c.stop - c.start for c in self.chunks)


class Scheduler:
    """FIFO admission, chunked prefill and KV growth/preemption over one token budget.

    Args:
        config: The engine's limits.
        chunked: Whether the step LM can prefill a chunk into a slot that holds tokens.
        cache: The prefix cache, or ``None`` (off, or the step LM cannot copy KV rows).
        pacer: Caps a step's tokens of long prompts from measured step times while
            sequences decode (``None``: the token budget alone).
    """

    def __init__(self, config: EngineConfig, chunked: bool,
                 cache: PrefixCache | None, pacer: StepPacer | None = None) -> None:
        self.config = config
        self.chunked = chunked
        self.cache = cache
        self.pacer = pacer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def kv_used(self) -> int:
        """KV tokens held: the running sequences' plus the prefix cache's blocks."""
        held = sum(s.kv_tokens for s in self.running)
        return held + (self.cache.tokens if self.cache is not None else 0)

    def _make_room(self, tokens: int) -> bool:
        """Evict cache blocks until ``tokens`` more fit in the budget; whether they do."""
        while self.kv_used() + tokens > self.config.max_kv_tokens:
            if self.cache is None or not self.cache.evict_one():
                return False
        return True

    def schedule(self) -> StepPlan:
        """The next step's plan (the caller holds the waiting queue's lock)."""
        plan = StepPlan()
        decoding = [s for s in self.running if s.prefilled]
        while decoding and not self._make_room(len(decoding)):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim in decoding:
                decoding.remove(victim)
        for seq in decoding:
            seq.kv_tokens += 1
        plan.decodes = decoding
        legacy = self.config.max_prefill_tokens
        budget = legacy if legacy is not None else max(
            self.config.max_num_batched_tokens - len(decoding), 1)
        # long prompts' tokens this step while sequences decode (None: the budget alone)
        paced = (self.pacer.chunk_cap(len(decoding))
                 if self.pacer is not None and self.chunked else None)
        for seq in self.running:  # prompts already partly prefilled go on first
            if not seq.prefilled:
                took = self._chunk(seq, seq.computed, None, self._room(seq, budget, paced),
                                   plan)
                budget -= took
                paced = self._spent(seq, paced, took)
        while self.waiting and len(self.running) < self.config.max_running and budget > 0:
            head = self.waiting[0]
            if head.aborted:
                self.waiting.popleft()
                continue
            if self._room(head, budget, paced) <= 0:
                break  # a long prompt waits for the next step's paced room (FIFO)
            hit, blocks = (self.cache.lookup(head.prefill_ids, SHORTEST_CHUNK)
                           if self.cache is not None else (0, []))
            whole = len(head.prefill_ids) - hit
            if not self.chunked and plan.chunks and whole > budget:
                break  # one whole prompt per step at least; the next waits for room
            if not self._make_room(len(head.prefill_ids)):
                break  # waits until running sequences finish (FIFO: never overtaken)
            self.waiting.popleft()
            if self.cache is not None:
                self.cache.record(hit, whole)
            head.kv_tokens = len(head.prefill_ids)
            self.running.append(head)
            took = self._chunk(head, hit, blocks if hit else None,
                               self._room(head, budget, paced), plan)
            budget -= took
            paced = self._spent(head, paced, took)
        return plan

    def _long(self, seq: Sequence) -> bool:
        return len(seq.prefill_ids) > self.config.long_prefill_tokens

    def _room(self, seq: Sequence, budget: int, paced: int | None) -> int:
        """Tokens ``seq`` may prefill now: the budget, and for a long prompt the paced room."""
        return budget if paced is None or not self._long(seq) else min(budget, paced)

    def _spent(self, seq: Sequence, paced: int | None, took: int) -> int | None:
        return paced - took if paced is not None and self._long(seq) else paced

    def _chunk(self, seq: Sequence, start: int, cached: list[Any] | None, budget: int,
               plan: StepPlan) -> int:
        """Plan ``seq``'s next prompt chunk within ``budget``; the tokens it takes."""
        total = len(seq.prefill_ids)
        if budget <= 0 and plan.chunks:
            return 0
        if not self.chunked:
            stop = total
        else:
            stop = min(total, start + max(budget, SHORTEST_CHUNK))
            if total - stop == 1:  # never leave a one-token chunk
                stop = stop - 1 if stop - start > SHORTEST_CHUNK else total
        plan.chunks.append(Chunk(seq, start, stop, cached))
        return stop - start

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Take ``seq`` out of the running batch; it is prefilled again later (recompute)."""
        self.running.remove(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        self.preemptions += 1
        log.info("sequence %d preempted: the KV budget of %d tokens is full; it resumes "
                 "after %d generated tokens", seq.id, self.config.max_kv_tokens,
                 seq.generated)

    def done(self, chunk: Chunk) -> None:
        """Record that ``chunk`` ran: its sequence's slot now holds ``chunk.stop`` tokens."""
        chunk.seq.computed = chunk.stop
        if chunk.last:
            chunk.seq.prefilled = True

    def remove(self, seq: Sequence) -> bool:
        """Drop ``seq`` from the running batch or the waiting queue; whether it was running."""
        if seq in self.running:
            self.running.remove(seq)
            return True
        if seq in self.waiting:
            self.waiting.remove(seq)
        return False
