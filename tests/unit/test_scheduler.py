"""The scheduler on real tiny LMs: chunked prefill interleaves with decode steps (counted),
KV grows per token (more sequences admitted than worst-case reservation; preemption
recomputes and keeps greedy outputs), prefix caching gives the outputs of no cache, with
hits on the metrics and eviction under a small budget."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.unit.engine_steps import CountingLM
from tests.unit.variant_fixtures import build_lm_variants

FORMATS = ["merge", "onnx-fp32", "genai-fp32"]


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-lm")
    out = build_lm_variants(tiny, root, [
        "{name: onnx-fp32, kind: export}",
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return {name: load_runtime(out / name) for name in FORMATS}


def _ids(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(4, vocab - 1, size=n).tolist()


def _run(lm, prompts, params, **config):
    """Greedy outputs of ``prompts`` submitted together (no EOS), and the engine."""
    async def main():
        engine = Engine(lm, set(), EngineConfig(**config))
        try:
            seqs = [engine.submit(p, params) for p in prompts]
            out = []
            for seq in seqs:
                tokens = []
                while (event := await seq.queue.get()).token is not None:
                    tokens.append(event.token)
                assert event.error is None and event.finish_reason == "length"
                out.append(tokens)
            return out, engine
        finally:
            engine.close()
    return asyncio.run(main())


def _alone(lm, prompts, params):
    return [_run(lm, [p], params, prefix_cache=False)[0][0] for p in prompts]


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_prompt_is_chunked_between_the_running_streams_decode_steps(lms, fmt):
    lm = CountingLM(lms[fmt].step_lm())
    vocab = lm.vocab_size
    short = [[2, *_ids(vocab, 5, s)] for s in (1, 2)]
    long = [2, *_ids(vocab, 99, 3)]
    params, streams = GenerationParams(max_new_tokens=20), GenerationParams(max_new_tokens=60)
    want = _alone(lms[fmt].step_lm(), short, streams) + _alone(lms[fmt].step_lm(), [long],
                                                               params)

    async def main():
        engine = Engine(lm, set(), EngineConfig(max_num_batched_tokens=16))
        try:
            seqs = [engine.submit(p, streams) for p in short]
            for seq in seqs:
                await seq.queue.get()  # both decode now
            lm.calls.clear()
            seqs.append(engine.submit(long, params))
            out = [[] for _ in seqs]
            for i, seq in enumerate(seqs):
                while (event := await seq.queue.get()).token is not None:
                    out[i].append(event.token)
            return out
        finally:
            engine.close()

    out = asyncio.run(main())
    assert out[2] == want[2] and out[:2] == [w[1:] for w in want[:2]]
    prefills = [i for i, (kind, _) in enumerate(lm.calls) if kind == "prefill"]
    sizes = [lm.calls[i][1] for i in prefills]
    assert sum(sizes) == 100 and len(sizes) >= 7 and max(sizes) <= 14  # 16 less 2 decodes
    # every chunk is followed by a decode step of the running streams
    assert all(lm.calls[i + 1][0] == "decode" for i in prefills)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kv_grows_admitting_more_than_worst_case_and_preemption_keeps_outputs(lms, fmt):
    lm = lms[fmt].step_lm()
    prompts = [[2, *_ids(lm.vocab_size, 11, s)] for s in range(6)]
    params = GenerationParams(max_new_tokens=60)  # 72 tokens each at most
    want = _alone(lm, prompts, params)
    got, engine = _run(lm, prompts, params, max_kv_tokens=100, prefix_cache=False)
    assert got == want  # preempted sequences recompute and go on with the same tokens
    assert 100 // 72 == 1 and engine.max_running_seen == 6  # worst case: one at a time
    assert engine.scheduler.preemptions > 0
    assert engine.scheduler.running == [] and not engine.scheduler.waiting


def _hits() -> float:
    return REGISTRY.get_sample_value("modelpress:prefix_cache_hits_total") or 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefix_cache_hit_gives_the_outputs_of_no_cache(lms, fmt):
    lm = lms[fmt].step_lm()
    system = [2, *_ids(lm.vocab_size, 47, 7)]  # 3 full blocks
    prompts = [system + _ids(lm.vocab_size, 6, s) for s in (8, 9, 10)]
    params = GenerationParams(max_new_tokens=15)
    want = _alone(lm, prompts, params)
    before = _hits()
    engine = None

    async def main():
        nonlocal engine
        engine = Engine(lm, set(), EngineConfig())
        try:
            out = []
            for p in prompts:  # one after another: each later one finds the system prompt
                seq = engine.submit(p, params)
                tokens = []
                while (event := await seq.queue.get()).token is not None:
                    tokens.append(event.token)
                out.append(tokens)
            return out
        finally:
            engine.close()

    got = asyncio.run(main())
    assert got == want
    assert engine.cache.hits == 2 * 48 and engine.cache.misses == 54 + 2 * 6
    assert _hits() - before == 2 * 48


@pytest.mark.parametrize("fmt", ["genai-fp32", "merge"])
def test_prefix_cache_evicts_under_a_small_budget_and_outputs_stay_right(lms, fmt):
    lm = lms[fmt].step_lm()
    prompts = [[2, *_ids(lm.vocab_size, 40, s)] for s in range(5)]
    prompts += [p[:33] + _ids(lm.vocab_size, 4, 20 + i) for i, p in enumerate(prompts)]
    params = GenerationParams(max_new_tokens=20)
    want = _alone(lm, prompts, params)
    got, engine = _run(lm, prompts, params, max_kv_tokens=130, max_running=2)
    assert got == want
    assert engine.cache.evicted > 0 and engine.cache.tokens <= 130
