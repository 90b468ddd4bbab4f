"""Step pacing: while streams decode, a long prompt's chunks are sized from measured step
times (a virtual clock here, so the sizes do not depend on this machine's speed), the
streams' step stretches by at most the ratio, and the outputs equal each request alone."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from serve.engine.core import Engine, EngineConfig
from serve.engine.pacing import MIN_CHUNK, StepPacer
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from serve.settings import ServeSettings
from tests.unit.variant_fixtures import build_lm_variants

FORMATS = ["merge", "genai-fp32"]
DECODE_S, PREFILL_S, TOKEN_S = 0.020, 0.002, 0.001  # the virtual clock's costs
LONG = 32  # prompts over this many tokens are paced (the tiny LM's context is 128)


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacing-lm")
    out = build_lm_variants(tiny, root, [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return {name: load_runtime(out / name) for name in FORMATS}


class _ClockedLM:
    """A real step LM on a virtual clock: a prefill costs 2 ms + 1 ms per token, a decode
    step 20 ms; records ("prefill", tokens, seconds) / ("decode", rows, seconds)."""

    def __init__(self, lm) -> None:
        self.lm, self.now, self.calls = lm, 0.0, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def clock(self) -> float:
        return self.now

    def prefill(self, slot, ids, start=0):
        cost = PREFILL_S + TOKEN_S * len(ids)
        self.now += cost
        self.calls.append(("prefill", len(ids), cost))
        return self.lm.prefill(slot, ids, start)

    def decode(self, slots, tokens):
        self.now += DECODE_S
        self.calls.append(("decode", len(slots), DECODE_S))
        return self.lm.decode(slots, tokens)


def _ids(vocab: int, n: int, seed: int) -> list[int]:
    return [2, *np.random.default_rng(seed).integers(4, vocab - 1, size=n - 1).tolist()]


async def _tokens(seq) -> list[int]:
    out = []
    while (event := await seq.queue.get()).token is not None:
        out.append(event.token)
    assert event.error is None
    return out


def _serve(lm: _ClockedLM, short: list[list[int]], long: list[int], ratio: float
           ) -> list[list[int]]:
    """The short prompts decode; once each has 2 tokens (a decode step measured) the long
    prompt arrives; every sequence's greedy tokens."""
    streams, once = GenerationParams(max_new_tokens=100), GenerationParams(max_new_tokens=5)

    async def main():
        engine = Engine(lm, set(), EngineConfig(max_gap_ratio=ratio, prefix_cache=False,
                                                long_prefill_tokens=LONG), clock=lm.clock)
        try:
            seqs = [engine.submit(p, streams) for p in short]
            heads = [[(await s.queue.get()).token, (await s.queue.get()).token] for s in seqs]
            lm.calls.clear()
            seqs.append(engine.submit(long, once))
            outs = [await _tokens(s) for s in seqs]
            return [h + o for h, o in zip(heads, outs, strict=False)] + outs[len(short):]
        finally:
            engine.close()

    return asyncio.run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunks_while_streams_decode_are_sized_to_the_gap_ratio(lms, fmt):
    lm = _ClockedLM(lms[fmt].step_lm())
    short = [_ids(lm.vocab_size, n, s) for n, s in ((6, 1), (9, 2))]
    long = _ids(lm.vocab_size, 90, 3)
    paced = _serve(lm, short, long, ratio=2.0)
    calls = lm.calls
    assert sum(n for kind, n, _ in calls if kind == "prefill") == 90
    # chunks while the two streams decode (a decode of both follows); the streams have 98
    # tokens to go when it arrives, so nearly all of the 90 tokens go this way
    beside = [n for (kind, n, _), after in itertools.pairwise(calls)
              if kind == "prefill" and after[0] == "decode" and after[1] >= 2]
    assert len(beside) >= 90 // 18
    # a chunk costs at most (ratio - 1) decode steps = 20 ms, i.e. 2 ms + 18 tokens on
    # this clock, and never fewer than MIN_CHUNK tokens (the last one excepted)
    assert max(beside) <= 18 and min(beside[:-1]) >= MIN_CHUNK

    lm_off = _ClockedLM(lms[fmt].step_lm())
    unpaced = _serve(lm_off, short, long, ratio=0)
    assert [n for kind, n, _ in lm_off.calls if kind == "prefill"] == [90]  # one chunk
    assert paced == unpaced  # pacing changes when tokens come, not which

    lm_short = _ClockedLM(lms[fmt].step_lm())
    short_prompt = _ids(lm.vocab_size, LONG, 4)  # not over the threshold: not paced
    _serve(lm_short, short, short_prompt, ratio=2.0)
    assert [n for kind, n, _ in lm_short.calls if kind == "prefill"] == [LONG]


def test_pacer_cap_from_measured_costs():
    pacer = StepPacer(3.0)
    assert pacer.chunk_cap(decoding=4) is None  # nothing measured yet: the budget rules
    pacer.observe(0, 0.0, 4, 0.030)
    assert pacer.chunk_cap(decoding=4) == MIN_CHUNK  # token cost unknown: probe
    assert pacer.chunk_cap(decoding=0) is None  # nobody waits on a lone prompt
    pacer.observe(32, 0.032, 4, 0.030)
    assert pacer.chunk_cap(decoding=4) == 60  # (3 - 1) × 30 ms / 1 ms
    pacer.observe(32, 0.064, 4, 0.030)  # tokens got dearer: 2 ms, moving average 1.25 ms
    assert pacer.chunk_cap(decoding=4) == 48
    assert StepPacer(0).chunk_cap(decoding=4) is None


def test_gap_ratio_below_one_is_refused():
    with pytest.raises(ValueError, match=r"max_gap_ratio: 0\.5 is below 1"):
        ServeSettings(max_gap_ratio=0.5)
    assert ServeSettings(max_gap_ratio=0).engine.max_gap_ratio == 0
