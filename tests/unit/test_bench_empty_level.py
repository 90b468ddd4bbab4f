"""A load level in which no request completed is failed, and so is its artifact (issue 20:
the torch merge once completed 0 requests per level and results.json still said ``ok``)."""

from __future__ import annotations

from bench import run as bench_run
from bench.loadgen import LoadSpec, level_result
from bench.recommend import parse_slo, recommend
from bench.run import BenchConfig, bench_artifact, load_specs
from serve.artifact import Manifest, write_manifest


def _entry(method: str, name: str, times: dict, start: float = 0.0, end: float = 3.0) -> dict:
    return {"method": method, "name": name, "num_requests": sum(times.values()),
            "num_failures": 0, "num_none_requests": 0, "response_times": times,
            "total_response_time": sum(k * v for k, v in times.items()),
            "max_response_time": max(times, default=0), "min_response_time": min(times,
                                                                                 default=0),
            "total_content_length": 0, "start_time": start, "last_request_timestamp": end}


EMPTY_RUN = [_entry("RUN", "start", {0: 1}, end=0.0)]  # the run started, nothing came back
GOOD_RUN = [_entry("RUN", "start", {0: 1}, end=0.0),
            _entry("POST", "/generate [stream]", {900: 12})]


def test_level_with_no_completed_request_is_failed():
    spec = LoadSpec("closed", 4, 3.0, min_requests=10, max_extend_s=60.0)
    level = level_result(spec, [EMPTY_RUN])
    assert level["requests"] == 0 and level["rps"] is None
    assert level["status"] == "failed"
    assert level["error"] == "4 users: no request completed in 1 of 1 runs (63 s each)"
    ok = level_result(spec, [GOOD_RUN, GOOD_RUN])
    assert ok["status"] == "ok" and ok["error"] is None and ok["requests"] == 24
    assert level_result(spec, [GOOD_RUN, EMPTY_RUN])["status"] == "failed"


def test_artifact_with_an_empty_level_is_failed_not_ok(tmp_path, monkeypatch):
    folder = tmp_path / "merge"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    write_manifest(folder, Manifest(name="merge", task="text-generation", format="torch",
                                    precision="fp32"))
    calls = []

    def fake_locust(spec, url, inputs, task, work, max_new_tokens=32):
        calls.append(spec)
        return EMPTY_RUN if spec.users == 4 else GOOD_RUN

    monkeypatch.setattr(bench_run, "run_locust", fake_locust)
    config = BenchConfig(artifacts=[folder], out=tmp_path / "out", users=[1, 4, 8],
                         duration_s=3, warmup_s=0, repeats=1, host="http://127.0.0.1:9",
                         slo=None)
    entry, _ = bench_artifact(config, folder, "merge", None, tmp_path / "inputs.jsonl", None,
                              lambda message, steps: None, is_reference=True)
    assert entry["status"] == "failed"
    assert entry["error"] == "4 users: no request completed in 1 of 1 runs (63 s each)"
    assert [lv["status"] for lv in entry["loads"]] == ["ok", "failed"]  # 8 users skipped
    assert [s.users for s in calls] == [1, 4]
    verdict = recommend([entry], parse_slo(None), None)
    assert verdict["recommended"] is None and "no request completed" in verdict["rejected"][
        "merge"]


def test_levels_wait_for_min_requests_within_a_cap():
    config = BenchConfig(artifacts=[], out=None, users=[1], rates=[2.0], duration_s=3,
                         min_requests=7, max_extend_s=20)
    for spec in load_specs(config):
        assert (spec.min_requests, spec.cap_s) == (7, 23)
    assert LoadSpec("closed", 1, 3.0).cap_s == 3.0  # no minimum: Locust's -t alone
