"""Two serving-path costs, on a real tiny onnx-genai LM: a /generate or /v1/completions
prompt is tokenized once per request (the ids counted for the token limits are the
engine's), and a runtime that only serves (``step_lm``) never loads onnxruntime-genai's
``og.Model``; the offline path loads it on first use."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bench.serve_overheads import CountingTokenizer, inprocess_app
from serve.api.schemas import Limits
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.unit.variant_fixtures import build_lm_variants

# 3 tokens a sentence (+ BOS): over max_input_tokens=64 by UTF-8 length, so counted
COUNTED = " ".join(["the movie is"] * 14)  # 43 tokens: kept
TRUNCATED = " ".join(["what a dull scene"] * 30)  # 121 tokens: cut to 64
SHORT = "the cat and the dog"  # provably short: never counted, tokenized for the engine


@pytest.fixture(scope="module")
def genai(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-overheads")
    out = build_lm_variants(tiny, root, [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return out / "genai-fp32"


def _serve(runtime, requests: list[tuple[str, dict]], **limits) -> list[tuple[httpx.Response,
                                                                            list[str]]]:
    """Each request on the in-process routes; its answer and the texts it tokenized."""
    app, service = inprocess_app(runtime, Limits(**limits))
    counter = CountingTokenizer(runtime.tokenizer)
    runtime.tokenizer = counter
    out = []

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path, body in requests:
                counter.calls.clear()
                answer = await client.post(path, json=body)
                out.append((answer, list(counter.calls)))
    try:
        asyncio.run(run())
    finally:
        service.engine.close()
        runtime.tokenizer = counter.inner
    return out


def test_a_prompt_is_tokenized_once_per_request(genai):
    runtime = load_runtime(genai)
    lone = {p: len(runtime.tokenizer(p)["input_ids"]) for p in (COUNTED, SHORT)}
    assert lone[COUNTED] == 43 and runtime.context_length == 128
    requests = [("/generate", {"prompts": [COUNTED], "max_new_tokens": 8}),
                ("/v1/completions", {"prompt": COUNTED, "max_tokens": 8, "temperature": 0}),
                ("/generate", {"prompts": [SHORT], "max_new_tokens": 8}),
                ("/generate", {"prompts": [COUNTED, SHORT], "max_new_tokens": 8}),
                ("/v1/completions", {"prompt": TRUNCATED, "max_tokens": 8, "temperature": 0})]
    answers = _serve(runtime, requests, max_input_tokens=64)
    assert [a.status_code for a, _ in answers] == [200] * len(requests)
    # the counted prompt: once (by max_input_tokens), not again for the room or the engine
    for _, calls in answers[:2]:
        assert calls == [COUNTED]
    assert answers[2][1] == [SHORT]
    assert sorted(answers[3][1]) == sorted([COUNTED, SHORT])
    # truncation slices the prompt's ids: one tokenization, plus "" for the special tokens
    assert answers[4][1] == [TRUNCATED, ""]
    assert answers[4][0].json()["usage"]["prompt_tokens"] == 64
    # same answers as the offline runtime (greedy), usage = the model's token counts
    offline = runtime.generate([COUNTED, SHORT], GenerationParams(max_new_tokens=8))
    generated = answers[3][0].json()["results"]
    assert [r["text"] for r in generated] == [g.text for g in offline]
    assert [r["prompt_tokens"] for r in generated] == [lone[COUNTED], lone[SHORT]]
    assert answers[0][0].json()["results"][0] == generated[0]
    assert answers[1][0].json()["choices"][0]["text"] == offline[0].text


def test_counted_prompts_keep_the_limit_errors(genai):
    runtime = load_runtime(genai)
    answers = _serve(runtime, [
        ("/generate", {"prompts": [SHORT, COUNTED], "max_new_tokens": 100}),
        ("/v1/completions", {"prompt": COUNTED, "max_tokens": 100}),
        ("/generate", {"prompts": [TRUNCATED], "max_new_tokens": 8}),
    ], max_input_tokens=64, long_input="reject")
    room, single, reject = (a.json()["error"] for a, _ in answers)
    assert [a.status_code for a, _ in answers] == [400, 400, 413]
    assert room["code"] == single["code"] == "context_length_exceeded"
    assert room["message"] == ("max_new_tokens: 100 plus the 43 tokens of prompts[1] exceed "
                               "the model's context of 128 tokens; lower max_new_tokens or "
                               "shorten the prompt")
    assert "100 plus the 43 tokens of prompt exceed" in single["message"]
    assert reject["message"] == "prompts[0]: 121 tokens, more than the limit of 64"
    # SHORT is counted for the room of 100 new tokens only; COUNTED's ids are reused
    assert [calls for _, calls in answers] == [[COUNTED, SHORT], [COUNTED], [TRUNCATED]]


def test_serving_never_loads_the_genai_generator_the_offline_path_does(genai):
    runtime = load_runtime(genai)
    assert runtime._model is None
    [(answer, _)] = _serve(runtime, [("/generate", {"prompts": [SHORT],
                                                    "max_new_tokens": 8})])
    assert answer.status_code == 200
    assert runtime._model is None  # the engine ran its own ORT session
    [offline] = runtime.generate([SHORT], GenerationParams(max_new_tokens=8))
    assert runtime._model is not None
    assert offline.text == answer.json()["results"][0]["text"]
