"""The BentoML service, live on loopback: batching, answers equal offline runtimes,
OpenAI client, bad input → 4xx (server keeps serving), overload → 429, tampered artifact
refuses to start, `modelpress serve` in the foreground, `bentoml build`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.app.launcher import ROOT, ServerStartError, free_port, start_server, wait_ready
from tests.conftest import run_cli, write_recipe

pytestmark = pytest.mark.integration

SENTENCES = ["the movie is great", "this film was really boring", "i love the music",
             "awful plot and bad actors", "a good story", "the actress is brilliant",
             "what a dull scene", "not funny at all", "best film of the year",
             "the worst movie", "quite sad but good", "fun and wonderful"]
PROMPTS = ["the movie is", "what is the capital of france ?", "i love", "the cat and the dog"]
CHAT = [{"role": "user", "content": "what is the capital of france ?"}]


def _build(tiny, tmp_path_factory, name: str, task: str, base: str, adapter: str):
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    root = tmp_path_factory.mktemp(name)
    recipe = write_recipe(root / "recipe.yaml", f"""
name: {name}
task: {task}
base: {{path: {tiny[base]}}}
adapters: [{{path: {tiny[adapter]}, weight: 1.0}}]
stages: [{{kind: merge, tolerance: 1.0e-4}}]
""")
    run_recipe(load_recipe(recipe, []), root / "out")
    return root / "out" / "merge"


@pytest.fixture(scope="module")
def classifier(tiny, tmp_path_factory):
    return _build(tiny, tmp_path_factory, "svc-cls", "text-classification", "bert", "bert-lora")


@pytest.fixture(scope="module")
def generator(tiny, tmp_path_factory):
    return _build(tiny, tmp_path_factory, "svc-gen", "text-generation", "llama", "llama-lora")


@pytest.fixture(scope="module")
def cls_server(classifier, bentoml_env):
    handle = start_server(classifier, env=bentoml_env, max_batch_size=16, max_latency_ms=20_000,
                          max_items=8, max_text_chars=2000, max_input_tokens=32,
                          long_input="truncate", max_body_bytes=65536, access_log=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gen_server(generator, bentoml_env):
    # max_new_tokens: the default cap (256), twice the tiny Llama's context (128)
    handle = start_server(generator, env=bentoml_env, max_batch_size=8, max_latency_ms=20_000,
                          max_new_tokens=256, max_input_tokens=32, long_input="reject",
                          max_concurrency=4, access_log=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def offline_cls(classifier):
    from serve.runtime.loader import load_runtime

    return load_runtime(classifier, device="cpu")


@pytest.fixture(scope="module")
def offline_gen(generator):
    from serve.runtime.loader import load_runtime

    return load_runtime(generator, device="cpu")


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def _batch_sizes(url: str, method: str) -> tuple[float, float, float]:
    """(batches, requests, batches of one request) from the adaptive batch size histogram."""
    count = total = ones = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name != "bentoml_service_adaptive_batch_size":
            continue
        for s in family.samples:
            if s.labels.get("method_name") != method:
                continue
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0:
                ones += s.value
    return count, total, ones


def test_concurrent_classify_is_batched_and_equals_offline(cls_server, offline_cls):
    bodies = [{"texts": [SENTENCES[i % len(SENTENCES)], SENTENCES[(i * 5 + 1) % 12]]}
              for i in range(48)]
    responses = asyncio.run(_post_all(f"{cls_server.url}/classify", bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    # BentoML's histogram observes requests per dispatched batch
    batches, requests, ones = _batch_sizes(cls_server.url, "classify_batch")
    assert requests >= len(bodies)  # every request went through the batching dispatcher
    assert batches - ones >= 1  # at least one batch held several requests
    assert requests / batches > 1.5
    for body, response in zip(bodies, responses, strict=True):
        offline = offline_cls.classify(body["texts"])
        for got, want in zip(response.json()["results"], offline, strict=True):
            assert got["label"] == want.label
            assert got["score"] == pytest.approx(want.score, abs=1e-5)
            assert got["scores"] is None


def test_classify_all_scores(cls_server, offline_cls):
    r = httpx.post(f"{cls_server.url}/classify", json={"texts": SENTENCES[:3],
                                                       "all_scores": True})
    assert r.status_code == 200
    want = offline_cls.classify(SENTENCES[:3])
    for got, w in zip(r.json()["results"], want, strict=True):
        assert set(got["scores"]) == set(offline_cls.labels)
        assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        for label, p in w.scores.items():
            assert got["scores"][label] == pytest.approx(p, abs=1e-5)


def test_long_text_is_truncated_to_max_input_tokens(cls_server, offline_cls):
    words = (SENTENCES[3] + " " + SENTENCES[0] + " ") * 8  # 64 word tokens, limit is 32
    r = httpx.post(f"{cls_server.url}/classify", json={"texts": [words], "all_scores": True})
    assert r.status_code == 200
    # the word-level tokenizer gives one token per word, plus [CLS] and [SEP]
    head = " ".join(words.split()[:30])
    want = offline_cls.classify([head])[0]
    assert r.json()["results"][0]["scores"]["positive"] == pytest.approx(
        want.scores["positive"], abs=1e-5)


def test_metadata(cls_server, classifier):
    from serve.api.http_api import without_paths
    from serve.artifact import read_manifest

    manifest = read_manifest(classifier)
    meta = httpx.get(f"{cls_server.url}/metadata").json()
    assert {k: meta[k] for k in ("name", "task", "format", "precision", "bytes")} == {
        "name": manifest.name, "task": "text-classification", "format": manifest.format,
        "precision": manifest.precision, "bytes": manifest.total_bytes}
    assert meta["labels"] == ["negative", "positive"]
    # the contract's fields, as stored in the manifest, absolute paths cut to their names
    assert {k: meta[k] for k in ("metrics", "eval", "gate")} == without_paths({
        "metrics": manifest.metrics, "eval": manifest.eval, "gate": manifest.gate})
    assert meta["serving"]["max_batch_size"] == 16
    assert httpx.get(f"{cls_server.url}/livez").status_code == 200


BAD_CLASSIFY = [
    (b'{"texts": ["a", ', 400, "malformed JSON"),
    (b'{"texts": "just a string"}', 400, "texts:"),
    (b'{"texts": ["ok", 3]}', 400, "texts[1]:"),
    (b'{"texts": ["ok", ""]}', 400, "texts[1]: must not be empty"),
    (b'{"texts": ["ok", "   "]}', 400, "texts[1]: must not be empty"),
    (b'{"texts": []}', 400, "texts: must contain at least one"),
    (json.dumps({"texts": ["good"] * 9}).encode(), 413, "texts: 9 items"),
    (json.dumps({"texts": ["x" * 2001]}).encode(), 413, "texts[0]: 2001 characters"),
    (b'{"texts": ["ok"], "temperature": 1}', 400, "temperature: unknown field"),
    (b'{"texts": ["ok"], "all_scores": "yes"}', 400, "all_scores:"),
    (b'{"texts": ["caf\xff\xfe"]}', 400, "invalid UTF-8"),
    (b'{"texts": ["\\ud800"]}', 400, "texts[0]: invalid UTF-8"),
    (b'[1, 2]', 400, "body: expected a JSON object"),
    (b'', 400, "body: empty"),
    (b'{"texts": ["' + b"a " * 40000 + b'"]}', 413, "body:"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_CLASSIFY)
def test_bad_classify_input_gets_4xx_then_server_serves(cls_server, body, status, message):
    r = httpx.post(f"{cls_server.url}/classify", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(f"{cls_server.url}/classify", json={"texts": ["a good story"]})
    assert ok.status_code == 200 and ok.json()["results"][0]["label"] in ("negative", "positive")


def test_generate_on_a_classifier_names_the_endpoint(cls_server):
    r = httpx.post(f"{cls_server.url}/generate", json={"prompts": ["the movie is"]})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "/generate" in message and "text-classification" in message


def test_generate_equals_offline_greedy(gen_server, offline_gen):
    from serve.runtime.protocol import GenerationParams

    r = httpx.post(f"{gen_server.url}/generate", json={"prompts": PROMPTS, "max_new_tokens": 12},
                   timeout=120)
    assert r.status_code == 200
    want = offline_gen.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    got = r.json()["results"]
    assert [g["text"] for g in got] == [w.text for w in want]
    assert [g["completion_tokens"] for g in got] == [w.completion_tokens for w in want]
    assert [g["prompt_tokens"] for g in got] == [w.prompt_tokens for w in want]
    assert [g["finish_reason"] for g in got] == [w.finish_reason for w in want]


def test_concurrent_generate_requests_equal_offline(gen_server, offline_gen):
    from serve.runtime.protocol import GenerationParams

    bodies = [{"prompts": [p], "max_new_tokens": 10} for p in PROMPTS]  # 4 = max_concurrency
    responses = asyncio.run(_post_all(f"{gen_server.url}/generate", bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for p, r in zip(PROMPTS, responses, strict=True):
        want = offline_gen.generate([p], GenerationParams(max_new_tokens=10))[0]
        assert r.json()["results"][0]["text"] == want.text


def test_generate_stream_sse(gen_server, offline_gen):
    from serve.runtime.protocol import GenerationParams

    body = {"prompts": [PROMPTS[1]], "max_new_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{gen_server.url}/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["text"] for e in events[:-1]]
    assert len(deltas) > 1
    want = offline_gen.generate([PROMPTS[1]], GenerationParams(max_new_tokens=12))[0]
    assert "".join(deltas) == want.text


def _chat_prompt(runtime, messages: list[dict]) -> str:
    """The chat prompt as the server tokenizes it: the template starts with BOS, so the
    tokenizer adds none (offline ``generate`` adds it back to this text)."""
    prompt = runtime.tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
    return prompt.removeprefix(runtime.tokenizer.bos_token)


def test_openai_client_completion_and_streaming_chat(gen_server, offline_gen):
    import openai

    from serve.runtime.protocol import GenerationParams

    client = openai.OpenAI(base_url=f"{gen_server.url}/v1", api_key="unused", timeout=120)
    done = client.completions.create(model="any", prompt=PROMPTS[0], max_tokens=10,
                                     temperature=0)
    want = offline_gen.generate([PROMPTS[0]], GenerationParams(max_new_tokens=10))[0]
    assert done.choices[0].text == want.text
    assert done.usage.prompt_tokens == want.prompt_tokens
    assert done.usage.completion_tokens == want.completion_tokens

    messages = [{"role": "system", "content": "answer the question"},
                {"role": "user", "content": "what is the capital of france ?"}]
    whole = client.chat.completions.create(model="any", messages=messages, max_tokens=10,
                                           temperature=0)
    prompt = _chat_prompt(offline_gen, messages)
    want = offline_gen.generate([prompt], GenerationParams(max_new_tokens=10))[0]
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == want.completion_tokens

    chunks = list(client.chat.completions.create(
        model="any", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens


def test_generation_may_fill_the_context_and_keeps_the_prompt(gen_server, offline_gen):
    from serve.runtime.protocol import GenerationParams

    context = offline_gen.model.config.max_position_embeddings
    n = len(offline_gen.tokenizer(PROMPTS[1])["input_ids"])
    r = httpx.post(f"{gen_server.url}/generate", json={"prompts": [PROMPTS[1]],
                                                       "max_new_tokens": context - n},
                   timeout=120)
    assert r.status_code == 200, r.text
    want = offline_gen.generate([PROMPTS[1]], GenerationParams(max_new_tokens=context - n))[0]
    assert r.json()["results"][0] == {"text": want.text, "prompt_tokens": n,
                                      "completion_tokens": want.completion_tokens,
                                      "finish_reason": want.finish_reason}

    # chat without max_tokens (OpenAI: as long as the context allows), under a 256 cap
    prompt = _chat_prompt(offline_gen, CHAT)
    m = len(offline_gen.tokenizer(prompt)["input_ids"])
    r = httpx.post(f"{gen_server.url}/v1/chat/completions",
                   json={"messages": CHAT, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    want = offline_gen.generate([prompt], GenerationParams(max_new_tokens=context - m))[0]
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"]["prompt_tokens"] == m
    assert body["usage"]["completion_tokens"] == want.completion_tokens <= context - m


BAD_GENERATE = [
    ("/classify", {"texts": ["the movie"]}, 400, "/classify: this artifact is a text-generation"),
    ("/generate", {"prompts": ["a"], "max_new_tokens": 257}, 400, "max_new_tokens: 257"),
    # within the cap but not within the model's context (128 tokens): 400, never cut
    ("/generate", {"prompts": ["a"], "max_new_tokens": 256}, 400,
     "max_new_tokens: 256 leaves no room for the prompt in the model's context of 128"),
    ("/generate", {"prompts": ["i love", PROMPTS[1]], "max_new_tokens": 125}, 400,
     "max_new_tokens: 125 plus the 8 tokens of prompts[1] exceed the model's context of 128"),
    ("/generate", {"prompts": ["i love"], "max_new_tokens": 128, "stream": True}, 400,
     "max_new_tokens: 128 leaves no room"),
    ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 121}, 400,
     "max_tokens: 121 plus the 8 tokens of prompt exceed"),
    ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 200, "stream": True}, 400,
     "max_tokens: 200 leaves no room"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "max_tokens": 128}, 400, "max_tokens: 128 leaves no room"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": 126}, 400,
     "max_completion_tokens: 126 plus the"),
    ("/generate", {"prompts": ["a"], "max_new_tokens": 0}, 400, "max_new_tokens:"),
    ("/generate", {"prompts": ["a"], "temperature": -1}, 400, "temperature:"),
    ("/generate", {"prompts": ["a", "b"], "stream": True}, 400, "prompts: streaming"),
    ("/generate", {"prompts": ["the " * 40]}, 413, "prompts[0]:"),
    ("/generate", {"prompt": ["a"]}, 400, "prompt: unknown field"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n:"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1000}, 400, "max_tokens: 1000"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, 400,
     "messages[0].role:"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tools: tool calling is not"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_GENERATE)
def test_bad_generate_input_gets_4xx_then_server_serves(gen_server, path, body, status, message):
    r = httpx.post(f"{gen_server.url}{path}", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(f"{gen_server.url}/generate", json={"prompts": ["i love"],
                                                        "max_new_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["results"][0]["completion_tokens"] >= 1


def test_overload_gets_429_then_server_serves(gen_server):
    bodies = [{"prompts": [PROMPTS[i % 4]], "max_new_tokens": 64} for i in range(24)]
    responses = asyncio.run(_post_all(f"{gen_server.url}/generate", bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}
    assert codes.count(429) >= 1 and codes.count(200) >= 1
    busy = next(r for r in responses if r.status_code == 429)
    assert "max_concurrency" in busy.json()["error"]["message"]
    assert busy.json()["error"]["type"] == "rate_limit_error"
    ok = httpx.post(f"{gen_server.url}/generate", json={"prompts": ["i love"]}, timeout=60)
    assert ok.status_code == 200


STREAMS = [("/generate", {"prompts": [PROMPTS[0]], "max_new_tokens": 100, "stream": True}),
           ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 100, "temperature": 0,
                                     "stream": True}),
           ("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0,
                                "stream": True})]


def _content_events(path: str, lines) -> list[str]:
    """Text deltas of SSE lines, stopping at [DONE]."""
    deltas = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        assert "error" not in event, event
        if path == "/generate":
            deltas.append(event["text"])
        elif event["choices"]:
            choice = event["choices"][0]
            text = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if text:
                deltas.append(text)
    return deltas


def _read_then_disconnect(url: str, path: str, body: dict, events: int = 2) -> list[str]:
    """Open a stream, read ``events`` content events, then close the connection."""
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}{path}",
                                                           json=body) as r:
        assert r.status_code == 200, r.read()
        got = []
        for delta in _content_events(path, r.iter_lines()):
            got.append(delta)
            if len(got) == events:
                break
    return got  # leaving both blocks closes the socket mid-stream


async def _overlapping_disconnects(url: str) -> None:
    """Streams at once (queued behind one another), all dropped early."""
    async def one(path: str, body: dict) -> None:
        async with httpx.AsyncClient(timeout=60) as client, client.stream(
                "POST", f"{url}{path}", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
    await asyncio.gather(*(one(path, body) for path, body in STREAMS))


def test_clients_disconnecting_mid_stream_do_not_wedge_the_server(generator, bentoml_env,
                                                                  offline_gen):
    from serve.runtime.protocol import GenerationParams

    # max_concurrency=3: a stream that kept its slot after its client left would turn the
    # requests below into 429s; one that kept the model lock would make them hang.
    handle = start_server(generator, env=bentoml_env, max_batch_size=4, max_latency_ms=20_000,
                          max_new_tokens=100, max_concurrency=3, access_log=False)
    try:
        for _ in range(3):
            for path, body in STREAMS:
                assert len(_read_then_disconnect(handle.url, path, body)) == 2
        asyncio.run(_overlapping_disconnects(handle.url))

        r = httpx.post(f"{handle.url}/generate", json={"prompts": [PROMPTS[1]],
                                                       "max_new_tokens": 12}, timeout=60)
        assert r.status_code == 200, r.text
        want = offline_gen.generate([PROMPTS[1]], GenerationParams(max_new_tokens=12))[0]
        assert r.json()["results"][0]["text"] == want.text
        for path, body in STREAMS:  # a whole stream still works and equals offline greedy
            body = {**body, "max_new_tokens" if path == "/generate" else "max_tokens": 12}
            with httpx.stream("POST", f"{handle.url}{path}", json=body, timeout=60) as r:
                assert r.status_code == 200
                lines = list(r.iter_lines())
            assert "data: [DONE]" in lines
            prompt = body.get("prompt") or (body["prompts"][0] if "prompts" in body else
                                            _chat_prompt(offline_gen, CHAT))
            want = offline_gen.generate([prompt], GenerationParams(max_new_tokens=12))[0]
            assert "".join(_content_events(path, lines)) == want.text
    finally:
        code = handle.stop(timeout=30)
    assert code == 0  # it stopped on SIGTERM (stop() returns None when it had to kill)
    assert not handle.alive()


def _tampered(classifier, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(classifier, copy)
    with open(copy / "config.json", "a") as fh:
        fh.write(" ")
    return copy


def test_tampered_artifact_refuses_to_start(classifier, bentoml_env, tmp_path):
    bad = _tampered(classifier, tmp_path)
    with pytest.raises(ServerStartError) as info:
        start_server(bad, env=bentoml_env, ready_timeout=120)
    assert "config.json: sha256 does not match the manifest" in str(info.value)
    result = run_cli("serve", str(bad), "--port", str(free_port()), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sha256" in lines[0]


def test_cli_serves_in_foreground_and_stops_on_sigterm(classifier, bentoml_env):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from compress.cli import main; main()", "serve",
         str(classifier), "--port", str(port), "--no-batching", "--max-batch-size", "4",
         "--max-items", "3", "--max-input-tokens", "40", "--long-input", "reject",
         "--max-new-tokens", "16", "--max-concurrency", "7", "--no-access-log"],
        cwd=ROOT, env=bentoml_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout=120)
        serving = httpx.get(f"{url}/metadata").json()["serving"]
        assert serving["batching"] is False
        assert {k: serving["limits"][k] for k in ("max_items", "max_input_tokens", "long_input",
                                                  "max_new_tokens", "max_concurrency")} == {
            "max_items": 3, "max_input_tokens": 40, "long_input": "reject",
            "max_new_tokens": 16, "max_concurrency": 7}
        r = httpx.post(f"{url}/classify", json={"texts": ["a good story"]})
        assert r.status_code == 200
        r = httpx.post(f"{url}/classify", json={"texts": ["a good story"] * 4})
        assert r.status_code == 413 and "texts: 4 items" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/classify", json={"texts": ["good " * 45]})
        assert r.status_code == 413 and "texts[0]: 47 tokens" in r.json()["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/livez", timeout=2)


def test_cli_body_limits(classifier, bentoml_env):
    result = run_cli("serve", str(classifier), "--body-timeout-s", "0", timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: --body-timeout-s: "), lines
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from compress.cli import main; main()", "serve",
         str(classifier), "--port", str(port), "--max-body-bytes", "200",
         "--body-timeout-s", "7.5", "--no-access-log"],
        cwd=ROOT, env=bentoml_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout=120)
        limits = httpx.get(f"{url}/metadata").json()["serving"]["limits"]
        assert (limits["max_body_bytes"], limits["body_timeout_s"]) == (200, 7.5)
        assert httpx.post(f"{url}/classify", json={"texts": ["a good story"]}).status_code == 200
        r = httpx.post(f"{url}/classify", json={"texts": ["a good story " * 20]})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("body: ")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_import_service_pulls_in_neither_compress_nor_peft(bentoml_env):
    code = ("import sys, serve.app.service; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('compress', 'peft')); "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {k: v for k, v in bentoml_env.items() if k != "MODELPRESS_ARTIFACT"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bentoml_build(bentoml_env):
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"],
                            cwd=ROOT, env=bentoml_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("modelpress:")
    bento = os.path.join(bentoml_env["BENTOML_HOME"], "bentos", *tag.split(":"))
    assert os.path.isfile(os.path.join(bento, "src", "serve", "app", "service.py"))
    assert not os.path.exists(os.path.join(bento, "src", "compress"))
    with open(os.path.join(bento, "env", "python", "requirements.txt")) as fh:
        assert "bentoml==" in fh.read()
