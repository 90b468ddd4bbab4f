"""Issue 20 #4: dynamic-int8 artifacts (ONNX ``int8-dynamic``, onnx-genai ``int8``) quantize
activations with one scale over the whole batched tensor, so a batched greedy answer
depended on its neighbours. Their steps now run one sequence at a time: the same answer
alone or batched, token for token (the batched decode, kept for the other formats,
changes answers on these very artifacts)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.unit.variant_fixtures import build_lm_variants

FORMATS = ["onnx-int8", "genai-int8"]


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-int8")
    out = build_lm_variants(tiny, root, [
        "{name: onnx-int8, kind: quantize, method: int8-dynamic}",
        "{name: genai-int8, kind: export, format: onnx-genai, precision: int8}"])
    return {name: load_runtime(out / name) for name in FORMATS}


def _prompts(vocab: int, n: int = 16) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(4, vocab - 1, size=int(k)).tolist()]
            for k in rng.integers(3, 30, size=n)]


async def _tokens(seq) -> list[int]:
    out = []
    while (event := await seq.queue.get()).token is not None:
        out.append(event.token)
    assert event.finish_reason == "length"
    return out


def _alone_and_batched(lm, prompts) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each prompt alone, then all together in two arrival orders (30 greedy tokens)."""
    params = GenerationParams(max_new_tokens=30)

    async def main():
        engine = Engine(lm, set(), EngineConfig(max_running=32))  # no EOS: full length
        try:
            alone = [await _tokens(engine.submit(p, params)) for p in prompts]
            rounds = []
            for order in (range(len(prompts)), reversed(range(len(prompts)))):
                seqs = {i: engine.submit(prompts[i], params) for i in order}
                rounds.append([await _tokens(seqs[i]) for i in range(len(prompts))])
            return alone, rounds
        finally:
            engine.close()
    return asyncio.run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_dynamic_int8_greedy_answer_is_the_same_alone_or_batched(lms, fmt):
    lm = lms[fmt].step_lm()
    assert lm.per_row  # chosen from the manifest's format and precision
    prompts = _prompts(lm.vocab_size)
    _, rounds = _alone_and_batched(lm, prompts)
    # the reference: each prompt alone through the batched decode (a batch of one row)
    reference = lms[fmt].step_lm()
    reference.per_row = False
    alone, _ = _alone_and_batched(reference, prompts)
    for batched in rounds:
        assert batched == alone


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_batched_decode_changes_these_artifacts_answers(lms, fmt):
    """What per-row decoding prevents: batched, some answers change with the neighbours."""
    lm = lms[fmt].step_lm()
    lm.per_row = False
    prompts = _prompts(lm.vocab_size)
    alone, rounds = _alone_and_batched(lm, prompts)
    assert sum(b != a for batched in rounds for b, a in zip(batched, alone, strict=True)) > 0
