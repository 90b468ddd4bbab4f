"""Prefix caching behind the live HTTP service (tiny onnx-genai LM): requests sharing a
long prompt prefix answer as without the cache, with hit tokens on /metrics; the setting
turns it off."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.app.launcher import start_server
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.unit.variant_fixtures import build_lm_variants

pytestmark = pytest.mark.integration

SHARED = ("the movie was long and the story was slow but the music was good and the actor "
          "was fun in the city of paris with a cat and a dog ")
PROMPTS = [SHARED + q for q in ("what is the capital of france ?", "i love", "a dull scene")]


@pytest.fixture(scope="module")
def genai(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-http")
    out = build_lm_variants(tiny, root, [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return out / "genai-fp32"


def _hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "modelpress:prefix_cache_hits" for s in f.samples
               if s.name.endswith("_total"))


@pytest.mark.parametrize("cache", [True, False])
def test_shared_prefix_hits_the_cache_and_answers_as_without_it(genai, bentoml_env, cache):
    offline = load_runtime(genai)
    lone = [offline.generate([p], GenerationParams(max_new_tokens=20))[0].text
            for p in PROMPTS]
    with start_server(genai, env=bentoml_env, access_log=False,
                      prefix_cache=cache) as server:
        texts = []
        for prompt in PROMPTS:  # one after another: later ones find the shared prefix
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert r.status_code == 200
            texts.append(r.json()["choices"][0]["text"])
        hits = _hits(server.url)
    assert texts == lone
    assert (hits > 0) if cache else (hits == 0)
