"""/classify's micro-batcher on a live server (``--no-batching`` baseline, BentoML's own
routes beside the mounted app) and the lean reference server of ``make bench-serve``,
loaded by a real ``hey`` when it is installed."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest

from bench.serve_capacity import batch_counts, reference_counts, running
from serve.app.launcher import start_server
from tests.conftest import write_recipe

pytestmark = pytest.mark.integration

TEXTS = ["the movie is great", "awful plot and bad actors", "a good story", "not funny"]


@pytest.fixture(scope="module")
def onnx_classifier(tiny, tmp_path_factory) -> Path:
    """The tiny BERT classifier, merged, exported to ONNX and int8-quantized (dynamic)."""
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    root = tmp_path_factory.mktemp("cls-onnx")
    recipe = write_recipe(root / "recipe.yaml", f"""
name: cls-onnx
task: text-classification
base: {{path: {tiny['bert']}}}
adapters: [{{path: {tiny['bert-lora']}, weight: 1.0}}]
stages: [{{kind: merge, tolerance: 1.0e-4}}]
variants: [{{name: onnx-int8-dynamic, kind: quantize, method: int8-dynamic}}]
""")
    run_recipe(load_recipe(recipe, []), root / "out", lambda message: None)
    return root / "out" / "onnx-int8-dynamic"


@pytest.fixture(scope="module")
def offline(onnx_classifier):
    from serve.runtime.loader import load_runtime

    return load_runtime(onnx_classifier, device="cpu")


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def test_no_batching_runs_each_request_alone_and_keeps_bentoml_routes(onnx_classifier,
                                                                      bentoml_env, offline):
    handle = start_server(onnx_classifier, env=bentoml_env, batching=False, access_log=False,
                          max_batch_size=16)
    try:
        bodies = [{"texts": [TEXTS[i % 4], TEXTS[(i + 1) % 4]]} for i in range(24)]
        responses = asyncio.run(_post_all(f"{handle.url}/classify", bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies)
        for body, r in zip(bodies, responses, strict=True):
            want = offline.classify(body["texts"])
            assert [g["label"] for g in r.json()["results"]] == [w.label for w in want]
        batches, requests = batch_counts(handle.url)
        assert batches == requests == len(bodies)  # one request per model call
        # the mounted app is still a Starlette app, so BentoML's own routes still answer
        assert httpx.get(f"{handle.url}/docs.json").status_code == 200
        assert httpx.get(f"{handle.url}/nowhere").status_code == 404
        metrics = httpx.get(f"{handle.url}/metrics").text  # BentoML's request metrics stay
        assert 'bentoml_service_request_total{' in metrics and 'endpoint="/classify"' in metrics
    finally:
        handle.stop()


def _classify_series(metrics: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.labels.get("endpoint") == "/classify" and sample.name in (
                    "bentoml_service_request_total",
                    "bentoml_service_request_duration_seconds_count",
                    "bentoml_service_request_in_progress"):
                key = (sample.name, sample.labels.get("http_response_code", ""))
                found[key] = found.get(key, 0.0) + sample.value
    return found


def test_classify_request_metrics_count_every_answer_by_status(onnx_classifier, bentoml_env):
    # /classify is answered before BentoML's middleware (serve.app.asgi.DirectRoutesFront):
    # BentoML's request series must still count each answer once, by status.
    handle = start_server(onnx_classifier, env=bentoml_env, access_log=False)
    try:
        good = [{"texts": [t]} for t in TEXTS] * 2
        bad = [{"texts": []}, {"texts": ["a"], "extra": 1}, {"text": "a"}]
        responses = asyncio.run(_post_all(f"{handle.url}/classify", good + bad))
        assert [r.status_code for r in responses] == [200] * len(good) + [400] * len(bad)
        series = _classify_series(httpx.get(f"{handle.url}/metrics").text)
        total, count = "bentoml_service_request_total", (
            "bentoml_service_request_duration_seconds_count")
        assert series[(total, "200")] == series[(count, "200")] == len(good)
        assert series[(total, "400")] == series[(count, "400")] == len(bad)
        assert series[("bentoml_service_request_in_progress", "")] == 0
    finally:
        handle.stop()


def test_reference_server_answers_like_the_runtime(onnx_classifier, offline, tmp_path):
    with running("reference", onnx_classifier, 8, tmp_path) as url:
        r = httpx.post(f"{url}/classify", json={"texts": TEXTS})
        assert r.status_code == 200
        want = offline.classify(TEXTS)
        for got, w in zip(r.json()["results"], want, strict=True):
            assert got["label"] == w.label
            assert got["score"] == pytest.approx(w.score, abs=1e-5)
            assert got["scores"] is None
        responses = asyncio.run(_post_all(f"{url}/classify",
                                          [{"texts": [t]} for t in TEXTS * 4]))
        assert [x.status_code for x in responses] == [200] * 16
        batches, requests = reference_counts(url)
        assert requests == 17 and 1 <= batches <= requests
        if shutil.which("hey") is None:
            pytest.skip("hey is not installed (apt-get install hey): load part skipped")
        from bench.hey import run_hey

        body = tmp_path / "body.json"
        body.write_text(json.dumps({"texts": [TEXTS[0]]}))
        result = run_hey(f"{url}/classify", body, connections=4, duration_s=1)
        assert result.ok and result.requests > 0 and result.p99_ms >= result.p50_ms > 0
        assert reference_counts(url)[1] >= requests + result.requests
