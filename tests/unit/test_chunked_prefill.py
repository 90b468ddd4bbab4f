"""Chunked prefill and prefix-KV copy-in on the torch, optimum-ONNX and onnx-genai step
LMs: a prompt prefilled in chunks (or after a copied prefix) gives the logits of one whole
prefill (1e-4) and the same greedy continuation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from serve.runtime.loader import load_runtime
from tests.unit.variant_fixtures import build_lm_variants

FORMATS = ["merge", "onnx-fp32", "genai-fp32"]


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk-lm")
    out = build_lm_variants(tiny, root, [
        "{name: onnx-fp32, kind: export}",
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return {name: load_runtime(out / name) for name in FORMATS}


def _prompt(vocab: int, n: int = 45) -> list[int]:
    rng = np.random.default_rng(1)
    return [2, *rng.integers(4, vocab - 1, size=n - 1).tolist()]


def _greedy(lm, slot: int, first: np.ndarray, n: int) -> list[int]:
    out = [int(first.argmax())]
    for _ in range(n - 1):
        out.append(int(lm.decode([slot], [out[-1]])[0].argmax()))
    lm.free(slot)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_prefill_equals_whole_prefill(lms, fmt):
    lm = lms[fmt].step_lm()
    assert lm.chunked_prefill and lm.copies_kv
    prompt = _prompt(lm.vocab_size)
    whole = lm.prefill(0, prompt)
    want = _greedy(lm, 0, whole, 12)
    for cuts in ([16], [7, 20, 33], [44]):
        bounds = [0, *cuts, len(prompt)]
        for start, stop in itertools.pairwise(bounds):
            logits = lm.prefill(1, prompt[start:stop], start)
        np.testing.assert_allclose(logits, whole, atol=1e-4)
        assert _greedy(lm, 1, logits, 12) == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_prefill_beside_running_rows_keeps_their_outputs(lms, fmt):
    # a slot prefilled in chunks while two others decode: nobody's tokens change
    lm = lms[fmt].step_lm()
    prompts = [_prompt(lm.vocab_size, n) for n in (9, 30, 14)]
    alone = []
    for p in prompts:
        alone.append(_greedy(lm, 5, lm.prefill(5, p), 10))
    out = {0: [int(lm.prefill(0, prompts[0]).argmax())],
           2: [int(lm.prefill(2, prompts[2]).argmax())]}
    chunks = [(0, 10), (10, 20), (20, 30)]
    for step in range(9):
        if step < 3:
            start, stop = chunks[step]
            logits = lm.prefill(1, prompts[1][start:stop], start)
            if stop == 30:
                out[1] = [int(logits.argmax())]
        live = list(out)
        rows = lm.decode(live, [out[s][-1] for s in live])
        for slot, row in zip(live, rows, strict=True):
            out[slot].append(int(row.argmax()))
    assert out[0] == alone[0][:10] and out[2] == alone[2][:10]
    assert out[1] == alone[1][:len(out[1])]


@pytest.mark.parametrize("fmt", FORMATS)
def test_copied_prefix_then_prefill_equals_whole_prefill(lms, fmt):
    lm = lms[fmt].step_lm()
    prompt = _prompt(lm.vocab_size)
    whole = lm.prefill(0, prompt)
    blocks = [lm.read_kv(0, 0, 16), lm.read_kv(0, 16, 32)]
    want = _greedy(lm, 0, whole, 12)  # slot 0 gone: the blocks are copies
    other = [*prompt[:32], *_prompt(lm.vocab_size, 20)[1:]]
    lm.prefill(3, other)  # another row beside it
    lm.load_prefix(1, blocks)
    logits = lm.prefill(1, prompt[32:], 32)
    np.testing.assert_allclose(logits, whole, atol=1e-4)
    assert _greedy(lm, 1, logits, 12) == want
