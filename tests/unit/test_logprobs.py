"""Log-probabilities on the OpenAI routes (tiny LMs, torch and ONNX): the figures equal an
independent log-softmax of the torch model's logits, in OpenAI's shapes (parsed with the
``openai`` client), streamed or not; ``echo`` scores the prompt teacher-forced, as
lm-eval-harness's ``local-completions`` model reads it."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.testclient import TestClient

from serve.api.backend import Backend
from serve.api.chat import chat_prompt_ids
from serve.api.openai_api import build_openai_routes
from serve.api.schemas import Limits
from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from tests.unit.variant_fixtures import build_lm_variants

openai = pytest.importorskip("openai")

FORMATS = ["merge", "onnx-fp32", "genai-fp32"]  # torch, optimum ONNX, onnxruntime-genai
MESSAGES = [{"role": "user", "content": "the movie is good and the cat"}]
TOL = 1e-4


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs-lm")
    return build_lm_variants(tiny, root, [
        "{name: onnx-fp32, kind: export}",
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])


@pytest.fixture(scope="module")
def reference(lms):
    """The torch model itself (the merged artifact), scored outside the server."""
    return load_runtime(lms / "merge")


@pytest.fixture(scope="module", params=FORMATS)
def served(request, lms):
    """An in-process app with the OpenAI routes over the engine; ``openai`` client."""
    runtime = load_runtime(lms / request.param)
    engine = Engine(runtime.step_lm(), set(runtime.eos_ids), EngineConfig())
    import copy
    import threading

    service = SimpleNamespace(runtime=runtime, engine=engine, lock=threading.Lock(),
                              detokenizer=copy.deepcopy(runtime.tokenizer))
    backend = Backend(service, Limits(max_new_tokens=64), 1)
    app = Starlette(routes=build_openai_routes(lambda: backend))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none",
                               http_client=http, max_retries=0)
        yield SimpleNamespace(client=client, http=http, runtime=runtime)
    engine.close()


def _teacher_forced(reference, ids: list[int]) -> np.ndarray:
    """log-softmax of the torch model's logits over ``ids`` ([len(ids), vocab])."""
    with torch.inference_mode():
        logits = reference.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def _greedy(reference, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each one's log-softmax row, stopping at EOS (not included)."""
    out, rows = [], []
    for _ in range(n):
        row = _teacher_forced(reference, ids + out)[-1]
        token = int(row.argmax())
        if token in reference.eos_ids:
            break
        out.append(token)
        rows.append(row)
    return out, rows


def _name(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def test_chat_logprobs_equal_the_torch_models_log_softmax(served, reference):
    tok = reference.tokenizer
    ids = chat_prompt_ids(tok, MESSAGES)
    tokens, rows = _greedy(reference, ids, 12)
    assert tokens, "the tiny model answered EOS at once: pick another prompt"
    resp = served.client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == [_name(tok, t) for t in tokens]
    assert resp.choices[0].message.content == tok.decode(tokens, skip_special_tokens=True)
    for c, token, row in zip(content, tokens, rows, strict=True):
        assert abs(c.logprob - row[token]) < TOL
        assert c.bytes == list(c.token.encode("utf-8"))
        best = np.argsort(-row)[:3]
        assert [t.token for t in c.top_logprobs] == [_name(tok, int(b)) for b in best]
        assert np.allclose([t.logprob for t in c.top_logprobs], row[best], atol=TOL)
    assert resp.usage.completion_tokens == len(tokens)

    # streamed: the chunks' entries, joined, are the same
    chunks = list(served.client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.top_logprobs[0].token) for c in streamed] == [
        (c.token, c.top_logprobs[0].token) for c in content]
    assert np.allclose([c.logprob for c in streamed], [c.logprob for c in content],
                       atol=TOL)


@pytest.mark.parametrize("as_ids", [True, False])
def test_echo_scores_the_prompt_teacher_forced(served, reference, as_ids):
    tok = reference.tokenizer
    text = "the cat and the dog love the movie"
    ids = list(tok(text)["input_ids"])
    resp = served.client.completions.create(
        model="m", prompt=ids if as_ids else text, max_tokens=0, echo=True, logprobs=2)
    [choice] = resp.choices
    lp = choice.logprobs
    expected = _teacher_forced(reference, ids)
    assert lp.tokens == [_name(tok, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1:], [expected[t - 1, ids[t]]
                                               for t in range(1, len(ids))], atol=TOL)
    for t in range(1, len(ids)):
        best = int(expected[t - 1].argmax())
        assert abs(lp.top_logprobs[t][_name(tok, best)] - expected[t - 1, best]) < TOL
        assert _name(tok, ids[t]) in lp.top_logprobs[t]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert choice.text == tok.decode(ids, skip_special_tokens=True) if as_ids else text
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 0)
    assert choice.finish_reason == "length"


def test_lm_eval_loglikelihood_request(served, reference):
    """What lm-eval's ``local-completions`` sends for loglikelihood: token ids, echo,
    ``max_tokens: 1``, ``logprobs: 1``; it reads ``[ctxlen:-1]`` and compares each token's
    logprob with ``max(top.values())`` to decide greediness."""
    tok = reference.tokenizer
    context = list(tok("the movie is", add_special_tokens=False)["input_ids"])
    expected = _teacher_forced(reference, context)
    greedy = [int(expected[-1].argmax())]
    other = [int(np.argsort(-expected[-1])[5])]
    body = {"model": "m", "prompt": [context + greedy, context + other], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    found = []
    for choice, cont in zip(sorted(r.json()["choices"], key=lambda c: c["index"]),
                            [greedy, other], strict=True):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(context) + 2  # prompt + the one generated (EOS included)
        cut = choice["logprobs"]["token_logprobs"][len(context):-1]
        tops = choice["logprobs"]["top_logprobs"][len(context):-1]
        assert abs(sum(cut) - expected[-1, cont[0]]) < TOL
        found.append(all(t == max(top.values()) for t, top in zip(cut, tops, strict=True)))
    assert found == [True, False]


def test_completion_stream_with_logprobs_equals_the_answer(served):
    body = {"model": "m", "prompt": "the cat", "max_tokens": 10, "temperature": 0,
            "logprobs": 2, "echo": True}
    whole = served.http.post("/v1/completions", json=body).json()["choices"][0]
    with served.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines()
                 if x.startswith("data: ") and x != "data: [DONE]"]
    choices = [c["choices"][0] for c in lines if c["choices"]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [t for c in choices if c["logprobs"] for t in c["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]


def test_streamed_echo_only(served, reference):
    ids = list(reference.tokenizer("the cat and the dog")["input_ids"])
    body = {"model": "m", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunk, usage = json.loads(lines[0]), json.loads(lines[1])
    [choice] = chunk["choices"]
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["finish_reason"] == "length"
    assert usage["usage"]["prompt_tokens"] == len(ids) and len(lines) == 3


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 10**6], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 1}, "prompt[0]"),
    ("/v1/completions", {"prompt": "the cat", "logprobs": 21}, "logprobs"),
])
def test_bad_logprob_requests_are_400_naming_the_field(served, path, body, param):
    r = served.http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


class _ScriptLM:
    """A step-level LM whose logits are given in advance, one row per forward."""

    vocab_size, max_length = 5, 64

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = iter(np.asarray(rows, dtype=np.float32))

    def prefill(self, slot: int, prompt_ids: list[int]) -> np.ndarray:
        return next(self.rows)

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        return np.stack([next(self.rows) for _ in slots])

    def free(self, slot: int) -> None:
        pass

    def reserve(self, rows: int, length: int) -> None:
        pass


@pytest.mark.parametrize("top", [None, 2])
def test_engine_events_carry_logprobs_and_the_ending_eos_ones(top):
    from serve.runtime.protocol import GenerationParams

    rows = [[0.0, 1.0, 3.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 2.5]]  # token 2, then EOS (4)

    async def run():
        engine = Engine(_ScriptLM(rows), {4}, EngineConfig())
        try:
            seq = engine.submit([1, 2], GenerationParams(max_new_tokens=5, logprobs=top))
            events = [await seq.queue.get()]
            while events[-1].token is not None:
                events.append(await seq.queue.get())
            return events
        finally:
            engine.close()

    first, last = asyncio.run(run())
    assert (first.token, last.token, last.finish_reason) == (2, None, "stop")
    if top is None:
        assert first.logprob is None and last.logprob is None
        return
    expected = torch.log_softmax(torch.tensor(rows, dtype=torch.float64), dim=-1).numpy()
    assert first.logprob.token == 2 and abs(first.logprob.logprob - expected[0, 2]) < 1e-6
    assert [t for t, _ in first.logprob.top] == [2, 1]
    assert last.logprob.token == 4 and abs(last.logprob.logprob - expected[1, 4]) < 1e-6
