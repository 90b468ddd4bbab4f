"""Batch-invariant decoding and one-token chunks on real tiny LMs.

int4 MatMulNBits runs a lone row through a kernel of its own, so an int4 onnx-genai row
decoded alone and the same row among others give different logits (SmolLM2: 0.48), and a
near-tie can flip between a request alone and under load, paced or from the prefix cache.
With ``batch_invariant`` a lone decoding row is padded to two: the bits are then the same
whatever decodes beside it. A one-token prompt chunk runs the same decode path, so the
scheduler never plans one (nor a cache hit that leaves one token to prefill)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from compress.tiny_archs import build_decoder
from serve.artifact import load_artifact
from serve.engine.core import Engine, EngineConfig
from serve.errors import ArtifactError
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from serve.runtime.step_lm import check_batch_invariant
from tests.unit.engine_steps import CountingLM, check_together_equals_alone, collect_tokens
from tests.unit.variant_fixtures import run, write_texts

LENGTHS = (5, 9, 3, 12, 7, 20)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    # hidden 64 with blocks of 32: MatMulNBits' one-row kernel differs here (~1e-6 on
    # random weights); compress.tiny's hidden 32 with blocks of 16 does not
    root = tmp_path_factory.mktemp("batch-invariant-lm")
    base = build_decoder("llama", root / "base", layers=2, init_std=0.5, fields={
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2})
    write_texts(root / "eval.jsonl", 6, labels=False)
    folder, records = run(f"""
name: batch-invariant
task: text-generation
base: {{path: {base}}}
data: {{eval: {{path: eval.jsonl, label: null}}}}
gates: {{min_agreement: 0.0, max_metric_drop: 100.0}}
variants:
  - {{name: genai-int4, kind: export, format: onnx-genai, precision: int4, block_size: 32}}
""", root)
    assert all(r.status == "built" for r in records.values())
    return folder


@pytest.fixture(scope="module")
def int4(variants):
    return load_runtime(variants / "genai-int4")


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(4, vocab - 1, size=n - 1).tolist()] for n in lengths]


def _decode_row0(runtime, prompts, rows: int, min_rows: int) -> np.ndarray:
    """Logits of prompt 0's first decode step with ``rows`` of ``prompts`` decoding."""
    lm = runtime.step_lm()
    lm.min_decode_rows = min_rows
    first = [int(lm.prefill(slot, p).argmax()) for slot, p in enumerate(prompts[:rows])]
    return lm.decode(list(range(rows)), first)[0]


def test_a_padded_lone_row_gives_the_bits_of_a_batched_row(int4):
    prompts = _prompts(int4.step_lm().vocab_size)
    batched = [_decode_row0(int4, prompts, rows, 1) for rows in (2, 3, 6)]
    for other in batched[1:]:
        np.testing.assert_array_equal(other, batched[0])
    np.testing.assert_array_equal(_decode_row0(int4, prompts, 1, 2), batched[0])


def test_batch_invariant_engine_greedy_equals_alone_exactly(int4):
    lm = int4.step_lm()
    check_together_equals_alone(lm, _prompts(lm.vocab_size), 30, batch_invariant=True)


def _greedy(lm, prompts, params, together: bool, **config) -> list[list[int]]:
    async def one(engine, prompt):
        return (await collect_tokens(engine.submit(prompt, params)))[0]

    async def main():
        engine = Engine(lm, set(), EngineConfig(**config))
        try:
            if together:
                return await asyncio.gather(*(one(engine, p) for p in prompts))
            return [await one(engine, p) for p in prompts]
        finally:
            engine.close()
    return asyncio.run(main())


def test_paced_chunked_and_cached_prompts_give_the_answers_alone(int4):
    """A shared prefix, prompts chunked by a small budget and paced beside decoding
    streams: every greedy answer equals the prompt alone (whatever chunk sizes the
    measured step times give, so the outcome does not depend on this machine's speed)."""
    lm = int4.step_lm()
    system = _prompts(lm.vocab_size, (40,), seed=1)[0]
    prompts = [system + p for p in _prompts(lm.vocab_size, (5, 9, 3, 12, 7, 6), seed=2)]
    params = GenerationParams(max_new_tokens=24)
    alone = _greedy(lm, prompts, params, together=False, batch_invariant=True,
                    prefix_cache=False)
    for cache in (False, True):
        got = _greedy(lm, [*prompts, *prompts], params, together=True, batch_invariant=True,
                      prefix_cache=cache, max_gap_ratio=2, long_prefill_tokens=16,
                      max_num_batched_tokens=21)
        assert got == alone + alone


def _widths(lm: CountingLM) -> list[int]:
    return [n for kind, n in lm.calls if kind == "prefill"]


def test_prompt_chunks_and_cache_hits_never_leave_one_token(int4):
    lm = CountingLM(int4.step_lm())
    params = GenerationParams(max_new_tokens=4)
    prompt = _prompts(lm.vocab_size, (21,), seed=3)[0]  # a budget of 10: not 10 + 10 + 1
    want = _greedy(int4.step_lm(), [prompt], params, together=False, prefix_cache=False)
    assert _greedy(lm, [prompt], params, together=False, prefix_cache=False,
                   max_num_batched_tokens=10) == want
    assert _widths(lm) == [10, 9, 2]
    # 33 tokens sharing 32 (two blocks) with the one before: one block is reused, not two
    first, second = (_prompts(lm.vocab_size, (32,), seed=4)[0] + [t] for t in (7, 8))
    lm.calls.clear()
    outs = _greedy(lm, [first, second], params, together=False)
    assert _widths(lm) == [33, 17]
    assert outs[1] == _greedy(int4.step_lm(), [second], params, together=False,
                              prefix_cache=False)[0]


def test_formats_that_cannot_are_refused(variants):
    check_batch_invariant(load_artifact(variants / "genai-int4").manifest)  # no error
    merge = load_artifact(variants / "merge").manifest
    with pytest.raises(ArtifactError, match=rf"batch_invariant: a {merge.format} artifact"):
        check_batch_invariant(merge)
    with pytest.raises(ValueError, match=r"batch_invariant: .* cannot decode"):
        Engine(load_runtime(variants / "merge").step_lm(), set(),
               EngineConfig(batch_invariant=True))
