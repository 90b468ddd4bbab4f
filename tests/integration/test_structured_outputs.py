"""Structured outputs through ``modelpress serve`` (tiny random-weight LM, byte-level
tokenizer): ``response_format`` json_schema / json_object on chat, ``guided_json`` on
completions, streamed or not; every finished answer validates; a free request batched
with constrained ones gives its lone answer; a bad schema is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

from bench.structured_outputs import SCHEMA
from serve.app.launcher import start_server
from tests.conftest import write_recipe

pytestmark = pytest.mark.integration

FORMAT = {"type": "json_schema",
          "json_schema": {"name": "profile", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, bentoml_env):
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    root = tmp_path_factory.mktemp("structured")
    recipe = write_recipe(root / "recipe.yaml", f"""
name: bytes-lm
task: text-generation
base: {{path: {tiny["llama-bytes"]}}}
stages: [{{kind: merge, tolerance: 1.0e-4}}]
""")
    run_recipe(load_recipe(recipe, []), root / "out")
    handle = start_server(root / "out" / "merge", env=bentoml_env, max_new_tokens=600,
                          access_log=False)
    yield handle
    handle.stop()


def _chat(i: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"profile number {i}"}],
            "max_tokens": 600, "temperature": 0 if i % 2 else 1.0, "seed": i, **extra}


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def test_twenty_json_schema_answers_validate(server):
    responses = asyncio.run(_post_all(f"{server.url}/v1/chat/completions",
                                      [_chat(i, response_format=FORMAT) for i in range(20)]))
    assert [r.status_code for r in responses] == [200] * 20
    choices = [r.json()["choices"][0] for r in responses]
    assert [c["finish_reason"] for c in choices] == ["stop"] * 20  # bounded schema
    for choice in choices:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_streamed_json_schema_answer_validates(server):
    text, reasons = "", []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=300,
                      json=_chat(3, response_format=FORMAT, stream=True)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                reasons.append(choice["finish_reason"])
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_guided_json_on_completions(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                   json=_chat(1, response_format={"type": "json_object"}, max_tokens=300))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")
    r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                   json={"prompt": "a profile:", "max_tokens": 600, "temperature": 0,
                         "guided_json": json.dumps(SCHEMA)})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


def test_free_request_batched_with_constrained_ones_gives_its_lone_answer(server):
    url = f"{server.url}/v1/chat/completions"
    free = _chat(7, max_tokens=60)
    [alone] = asyncio.run(_post_all(url, [free]))
    mixed = asyncio.run(_post_all(url, [_chat(i, response_format=FORMAT) for i in range(3)]
                                  + [free]))
    assert [r.status_code for r in mixed] == [200] * 4
    assert mixed[3].json()["choices"] == alone.json()["choices"]


def test_max_tokens_cut_is_length(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                   json=_chat(1, response_format=FORMAT, max_tokens=4))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == '{"na'
    assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {
            "a": {"type": "string", "format": "no-such-format"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
     "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
])
def test_bad_response_format_is_a_400_naming_the_field(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json=_chat(1, **extra))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ")
