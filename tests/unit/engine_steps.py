"""Which engine delivery each token event came in: the engine's own order, whatever the
event loop's consumers do (a consumer drains a queue that holds several tokens without
yielding, so the times at which tests *read* tokens do not say when they were made); and
the check every step LM passes in the engine: streams together equal each alone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from collections.abc import Iterator


@contextlib.contextmanager
def delivery_steps() -> Iterator[dict[int, list[int]]]:
    """Record, per sequence id, the numbers of the deliveries carrying its tokens."""
    from serve.engine import core

    steps: dict[int, list[int]] = defaultdict(list)
    counter = itertools.count()
    original = core._put_all

    def put_all(events) -> None:
        number = next(counter)
        for seq, event in events:
            if event.token is not None:
                steps[seq.id].append(number)
        original(events)

    core._put_all = put_all
    try:
        yield steps
    finally:
        core._put_all = original


def interleaved(steps: dict[int, list[int]], ids: list[int]) -> bool:
    """Every one of ``ids`` got its first token before any of them got its last."""
    return max(steps[i][0] for i in ids) < min(steps[i][-1] for i in ids)


async def collect_tokens(seq) -> tuple[list[int], str | None]:
    """A sequence's tokens and finish reason (its error raised)."""
    tokens = []
    while (event := await seq.queue.get()).token is not None:
        tokens.append(event.token)
    if event.error is not None:
        raise event.error
    return tokens, event.finish_reason


def check_together_equals_alone(lm, prompts: list[list[int]], max_new_tokens: int,
                                near_ties: bool = False, **config) -> None:
    """Run ``prompts`` through one engine (8 running), each alone, then all together.

    Asserts the tokens together equal those alone (``near_ties``: all streams but one,
    for kernels whose batched rows can flip a near-tie), every stream runs its full
    length (no EOS: outputs compare token for token) and every stream started before any
    ended (interleaved, in the engine's delivery order). ``config``: more
    :class:`serve.settings.EngineConfig` fields.
    """
    from serve.engine.core import Engine, EngineConfig
    from serve.runtime.protocol import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens)

    async def main():
        engine = Engine(lm, set(), EngineConfig(**{"max_running": 8, **config}))
        try:
            alone = [(await collect_tokens(engine.submit(p, params)))[0] for p in prompts]
            seqs = [engine.submit(p, params) for p in prompts]
            together = await asyncio.gather(*(collect_tokens(s) for s in seqs))
        finally:
            engine.close()
        return alone, together, [s.id for s in seqs]

    with delivery_steps() as steps:
        alone, together, ids = asyncio.run(main())
    if near_ties:
        assert sum(t[0] == a for t, a in zip(together, alone, strict=True)) >= len(alone) - 1
    else:
        assert [t[0] for t in together] == alone
    assert all(len(t[0]) == max_new_tokens and t[1] == "length" for t in together)
    assert interleaved(steps, ids)  # every stream started before any ended


def lone_genai(runtime, prompt: list[int], n: int, exact: bool = False) -> list[int]:
    """onnxruntime-genai's own generator, one prompt, greedy: the reference of the engine's
    genai step LM (``exact``: exactly ``n`` tokens, its ``min_length`` masking EOS as
    torch's ``min_new_tokens`` does; else up to ``n``)."""
    import numpy as np

    og = runtime._og
    params = og.GeneratorParams(runtime.model)
    length = len(prompt) + n
    params.set_search_options(max_length=length, do_sample=False,
                              **({"min_length": length} if exact else {}))
    generator = og.Generator(runtime.model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


class CountingLM:
    """A real step LM that records its calls: ("prefill", tokens) / ("decode", rows)."""

    def __init__(self, lm) -> None:
        self.lm, self.calls = lm, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def prefill(self, slot, ids, start=0):
        self.calls.append(("prefill", len(ids)))
        return self.lm.prefill(slot, ids, start)

    def decode(self, slots, tokens):
        self.calls.append(("decode", len(slots)))
        return self.lm.decode(slots, tokens)
