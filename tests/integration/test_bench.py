"""A short real sweep: two tiny artifacts served by `modelpress serve`, loaded by a Locust
subprocess, scored through HTTP — and a server that answers errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_recipe

pytestmark = pytest.mark.integration

LABELS = ("negative", "positive")
WORDS = ("good", "bad", "film", "plot", "great", "dull", "actors", "story", "boring", "fun")


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    """BentoML home in a temp dir, modest threads (the CPU is shared)."""
    home = tmp_path_factory.mktemp("bentoml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(home))
        mp.setenv("BENTOML_DO_NOT_TRACK", "true")
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def bench_artifacts(tiny, tmp_path_factory) -> list[Path]:
    """The tiny classification merge output, the same artifact under a second name, and a
    copy whose weights were changed after hashing (the server must refuse it)."""
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    root = tmp_path_factory.mktemp("bench-artifacts")
    recipe = write_recipe(root / "recipe.yaml", f"""
name: tiny-bench
task: text-classification
base: {{path: {tiny['bert']}}}
adapters: [{{path: {tiny['bert-lora']}}}]
stages: [{{kind: merge, tolerance: 1.0e-4}}]
""")
    run_recipe(load_recipe(recipe, []), root / "out", lambda message: None)
    first = root / "out" / "merge"
    second = root / "merge-copy"
    shutil.copytree(first, second)
    broken = root / "merge-broken"
    shutil.copytree(first, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    return [first, second, broken]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-data") / "eval.jsonl"
    lines = []
    for i in range(40):
        text = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 4 + i % 5))
        lines.append(json.dumps({"text": text, "label": LABELS[(i * 7) % 3 % 2]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sweep(bench_env, bench_artifacts, eval_data, tmp_path_factory) -> tuple[Path, dict]:
    # the accuracy pass scores with the evaluation API (compress.data / compress.evaluate)
    pytest.importorskip("compress.evaluate", reason="evaluation API not in this tree yet")
    out = tmp_path_factory.mktemp("bench-out")
    result = run_cli("bench", *map(str, bench_artifacts), "--data", str(eval_data),
                     "--users", "2", "--rate", "4", "--duration", "3s", "--warmup", "1s",
                     "--repeats", "1", "--slo", "p95<60s", "--max-accuracy-drop", "0.01",
                     "--out", str(out), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_sweep_writes_all_outputs(sweep):
    out, results = sweep
    for name in ("results.json", "results.csv", "report.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(out / "pareto.png").shape[:2]
    assert (height, width) == (400, 900)  # one panel per load level: 2 users, 4 req/s
    report = (out / "report.md").read_text()
    assert f"**Deploy `{results['recommendation']['recommended']}`**" in report


def test_sweep_load_numbers(sweep):
    _, results = sweep
    assert [a["name"] for a in results["artifacts"]] == ["merge", "merge-copy", "merge-broken"]
    broken = results["artifacts"][2]
    assert broken["status"] == "failed" and broken["loads"] == [] and broken["error"]
    assert results["recommendation"]["rejected"]["merge-broken"].startswith("server failed")
    for art in results["artifacts"][:2]:
        assert art["status"] == "ok", art["error"]
        assert art["peak_rss_bytes"] > 50_000_000  # a Python server with torch loaded
        assert [lv["label"] for lv in art["loads"]] == ["2 users", "4 req/s"]
        for lv in art["loads"]:
            lat = lv["latency_ms"]
            assert lv["requests"] > 0 and lv["failures"] == 0
            # Locust rounds histogram values above 100 ms to 2 significant digits
            assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] * 1.05 + 1
        open_loop = art["loads"][1]
        assert open_loop["schedule_latency_ms"]["p50"] >= open_loop["latency_ms"]["p50"] - 1
        # 4 req/s for 3 s, on a schedule: about 12 requests whatever the latency
        assert 6 <= open_loop["requests"] <= 14
    assert results["recommendation"]["recommended"] in ("merge", "merge-copy")


def test_http_accuracy_equals_offline_eval(sweep, bench_artifacts, eval_data):
    from compress.data import load_examples
    from compress.evaluate import evaluate
    from compress.recipe import DataFile
    from serve.runtime.loader import load_runtime

    _, results = sweep
    examples = load_examples(DataFile(path=eval_data), limit=200)
    offline = evaluate(load_runtime(bench_artifacts[0], device="cpu"), examples, progress=False)
    served = results["artifacts"][0]["accuracy"]
    assert served["n"] == offline["n"] == 40
    assert served["metric"] == offline["metric"]
    assert served["value"] == pytest.approx(offline["value"], abs=1e-12)
    # the copy serves the same weights: no drop, full agreement with the reference
    copy = results["artifacts"][1]["accuracy"]
    assert copy["value"] == served["value"] and copy["drop"] == 0 and copy["agreement"] == 1


def test_server_errors_are_counted_as_failures(bench_env, bench_artifacts, tmp_path):
    from bench.loadgen import LoadSpec, run_locust
    from bench.locust_stats import summarize
    from bench.server import ServerProcess

    # every other input is over the server's 20,000-character limit → HTTP 4xx
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": "a fine film"}) + "\n"
                      + json.dumps({"text": "x" * 25_000}) + "\n")
    server = ServerProcess(bench_artifacts[0], tmp_path / "server.log")
    try:
        server.wait_ready(120)
        entries = run_locust(LoadSpec("closed", 2, 3), server.url, inputs,
                             "text-classification", tmp_path / "load")
    finally:
        assert server.stop() is not None
    total = summarize([entries])
    assert total["requests"] > 4
    # inputs alternate good/bad; requests cut off at the end are not counted
    assert abs(total["failures"] - total["requests"] / 2) <= 2
    assert not os.path.exists(f"/proc/{server.pid}")


# --- decode-bound chat load -----------------------------------------------------------

@pytest.fixture(scope="module")
def lm_artifact(tiny, tmp_path_factory) -> Path:
    """The tiny Llama with its LoRA merged: a torch fp32 text-generation artifact."""
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    root = tmp_path_factory.mktemp("bench-lm")
    recipe = write_recipe(root / "recipe.yaml", f"""
name: tiny-bench-lm
task: text-generation
base: {{path: {tiny['llama']}}}
adapters: [{{path: {tiny['llama-lora']}}}]
stages: [{{kind: merge, tolerance: 1.0e-4}}]
""")
    run_recipe(load_recipe(recipe, []), root / "out", lambda message: None)
    return root / "out" / "merge"


def test_decode_profile_reports_tokens_ttft_and_itl(bench_env, lm_artifact, tmp_path):
    out = tmp_path / "out"
    result = run_cli("bench", str(lm_artifact), "--users", "", "--decode-users", "1,3",
                     "--decode-max-tokens", "16", "--duration", "6s", "--warmup", "1s",
                     "--repeats", "1", "--out", str(out), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decode-bound chat load" in result.stdout
    [art] = json.loads((out / "results.json").read_text())["artifacts"]
    assert art["status"] == "ok" and art["loads"] == []
    assert [lv["label"] for lv in art["decode"]] == ["1 stream", "3 streams"]
    for lv in art["decode"]:
        done = lv["outcomes"]["200 done"]
        assert done == lv["requests"] > 0 and lv["outcomes"]["open at stop"] == 0
        assert lv["failures"] == lv["failures_503"] == lv["failures_other"] == 0
        assert lv["max_tokens"] == 16
        assert 0 < lv["tokens_per_request"] <= 16  # usage.completion_tokens of each stream
        assert 0 < lv["window_tokens"] <= done * 16
        assert lv["output_tokens_per_s"] == pytest.approx(lv["window_tokens"] / lv["window_s"])
        assert 5.5 <= lv["window_s"] <= 7.0  # measured from run start to Locust's stop
        ttft, itl = lv["ttft_ms"], lv["itl_ms"]
        # Locust rounds histogram values above 100 ms to 2 significant digits
        assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["p99"] <= ttft["max"] * 1.05 + 1
        assert itl["p50"] <= itl["p95"] <= itl["p99"]
        # a stream's latency covers its first token
        assert lv["latency_ms"]["max"] >= ttft["p50"]
    assert "## Decode-bound chat load" in (out / "report.md").read_text()


def test_decode_against_running_server_splits_overload_answers(bench_env, lm_artifact,
                                                               tmp_path):
    from bench.server import ServerProcess

    # One request in flight at most: of 4 streams, the excess is refused (overload answer).
    server = ServerProcess(lm_artifact, tmp_path / "server.log", ["--max-concurrency", "1"])
    try:
        server.wait_ready(120)
        out = tmp_path / "out"
        result = run_cli("bench", "--host", server.url, "--name", "peer", "--users", "",
                         "--decode-users", "4", "--decode-max-tokens", "16", "--duration",
                         "3s", "--warmup", "1s", "--repeats", "1", "--out", str(out),
                         timeout=400)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    [art] = json.loads((out / "results.json").read_text())["artifacts"]
    assert (art["name"], art["format"], art["path"]) == ("peer", "external", None)
    [lv] = art["decode"]
    out_counts = lv["outcomes"]
    assert out_counts["200 done"] > 0 and out_counts["open at stop"] == 0
    assert out_counts.get("200 lost", 0) == 0
    refused = lv["failures"]
    assert refused > 0 and lv["failures_503"] + lv["failures_other"] == refused
    # every refusal is a deliberate overload answer: 503, or the concurrency cap's 429
    assert lv["failures_503"] + (lv["errors"] or {}).get("HTTP 429", 0) == refused
