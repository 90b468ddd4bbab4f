"""Issue 20 #10: a generation prompt over ``max_input_tokens`` is tokenized once and its
ids sliced (special tokens kept), so a prompt the context check refuses costs one
tokenization, not a binary search of ~15; the 400 names the field."""

from __future__ import annotations

import pytest

from serve.api.token_limits import _slice
from serve.runtime.loader import load_runtime
from tests.unit.test_serving_overheads import TRUNCATED, _serve
from tests.unit.variant_fixtures import build_lm_variants

HUGE = ("what a dull scene, " * 900)[:16_000]  # 16k characters, ~3,600 tokens


@pytest.fixture(scope="module")
def runtime(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("token-room")
    out = build_lm_variants(tiny, root, [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return load_runtime(out / "genai-fp32")


def test_a_refused_long_prompt_is_tokenized_at_most_twice(runtime):
    assert runtime.context_length == 128  # max_input_tokens 512 > context: refused
    requests = [("/v1/completions", {"prompt": HUGE, "max_tokens": 16}),
                ("/generate", {"prompts": [HUGE], "max_new_tokens": 16}),
                ("/v1/completions", {"prompt": [HUGE], "max_tokens": 16})]
    answers = _serve(runtime, requests, max_input_tokens=512, max_text_chars=20_000)
    assert [a.status_code for a, _ in answers] == [400, 400, 400]
    for (answer, calls), field in zip(answers, ["max_tokens", "max_new_tokens",
                                                "max_tokens"], strict=True):
        error = answer.json()["error"]
        assert error["param"] == field and error["code"] == "context_length_exceeded"
        assert "512 tokens of prompt" in error["message"]
        assert calls[0] == HUGE and len(calls) <= 2 and calls.count(HUGE) == 1


@pytest.mark.parametrize("keep", ["tail", "head"])
def test_slice_keeps_the_special_tokens_and_the_kept_end(runtime, keep):
    tok = runtime.tokenizer
    ids = tok(TRUNCATED)["input_ids"]
    bos = tok("")["input_ids"]
    assert bos == [ids[0]] and len(ids) == 121  # this tokenizer adds BOS only
    text, cut = _slice(lambda t: tok(t)["input_ids"], tok.decode, ids, 64, keep)
    body = ids[1:]
    assert cut == bos + (body[-63:] if keep == "tail" else body[:63])
    assert tok(text, add_special_tokens=False)["input_ids"] == cut[1:]
