"""Bench report logic on fixed result tables: SLO parsing, recommendation, Pareto front,
Locust histogram totals, and the four output files."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from bench.locust_stats import percentile, summarize
from bench.recommend import SLOError, pareto_front, parse_slo, recommend
from bench.report import write_report


def level(label: str, p95: float, rps: float, failures: int = 0, requests: int = 100,
          users: int = 8) -> dict:
    return {"mode": "closed", "label": label, "users": users, "rate": None,
            "requests": requests, "failures": failures, "failure_rate": failures / requests,
            "duration_s": requests / rps, "rps": rps,
            "latency_ms": {"p50": p95 / 2, "p90": p95 * 0.9, "p95": p95, "p99": p95 * 1.5,
                           "max": p95 * 2, "mean": p95 / 2},
            "ttft_ms": None, "itl_ms": None, "tokens_per_s": None, "schedule_latency_ms": None,
            "spread": {"rps": {"min": rps * 0.9, "max": rps * 1.1, "n": 2},
                       "p95_ms": {"min": p95 * 0.9, "max": p95 * 1.1, "n": 2}},
            "repeats": []}


def artifact(name: str, drop: float | None, loads: list[dict], size: int = 1000,
             status: str = "ok", acc: float = 0.9) -> dict:
    return {"name": name, "path": f"/a/{name}", "task": "text-classification",
            "format": "onnx", "precision": "fp32", "bytes": size, "manifest_sha256": "0" * 64,
            "status": status, "error": None if status == "ok" else "exited with code 1",
            "ready_s": 2.0, "peak_rss_bytes": 5_000_000,
            "accuracy": None if drop is None else {
                "metric": "accuracy", "value": acc, "ci95": [acc - 0.02, acc + 0.02], "n": 200,
                "higher_is_better": True, "metrics": {}, "drop": drop, "drop_ci95": None,
                "agreement": 0.99},
            "loads": loads}


# --- SLO parsing ---------------------------------------------------------------------

def test_parse_slo_units_and_clauses():
    conds = parse_slo("p95<200ms, p99<=1.5s and failures<1%")
    assert [(c.metric, c.op, c.threshold) for c in conds] == [
        ("p95", "<", 200.0), ("p99", "<=", 1500.0), ("failures", "<", 0.01)]
    assert parse_slo("ttft_p95 < 300")[0].threshold == 300.0
    assert parse_slo("rps>=50")[0].op == ">="
    assert parse_slo("") == [] and parse_slo(None) == []


@pytest.mark.parametrize("bad", ["p95 under 200ms", "p42<200ms", "p95<200%", "rps>5ms", "<"])
def test_parse_slo_rejects_bad_clauses(bad):
    with pytest.raises(SLOError, match="--slo"):
        parse_slo(bad)


def test_condition_on_level():
    cond = parse_slo("p95<200ms")[0]
    assert cond.holds(level("8 users", 150, 10))
    assert not cond.holds(level("8 users", 200, 10))  # strict
    assert not parse_slo("ttft_p95<100")[0].holds(level("x", 10, 10))  # not measured


# --- recommendation ------------------------------------------------------------------

def test_recommends_fastest_variant_meeting_slo_and_accuracy():
    arts = [
        artifact("fp32", 0.0, [level("1 user", 80, 12), level("8 users", 260, 30)], 4000),
        artifact("int8", 0.004, [level("1 user", 40, 25), level("8 users", 150, 55)], 1000),
        artifact("int4", 0.03, [level("1 user", 20, 50), level("8 users", 90, 90)], 500),
        artifact("slow", 0.0, [level("1 user", 300, 3)], 4000),
    ]
    rec = recommend(arts, parse_slo("p95<200ms"), max_accuracy_drop=0.01)
    assert rec["recommended"] == "int8"
    assert "55.0 req/s at 8 users" in rec["reason"]
    assert "accuracy drop 0.0300 > allowed 0.0100" in rec["rejected"]["int4"]
    assert "12.0 req/s (1 user)" in rec["rejected"]["fp32"]  # eligible, but less throughput
    assert "misses the SLO at every load level" in rec["rejected"]["slow"]
    assert "p95 300 ms" in rec["rejected"]["slow"]


def test_without_accuracy_gate_the_fastest_wins():
    arts = [artifact("int8", 0.004, [level("8 users", 150, 55)]),
            artifact("int4", 0.03, [level("8 users", 90, 90)])]
    assert recommend(arts, parse_slo("p95<200ms"), None)["recommended"] == "int4"


def test_no_variant_meets_slo():
    arts = [artifact("a", 0.0, [level("8 users", 500, 10)]),
            artifact("b", 0.0, [level("8 users", 400, 12)])]
    rec = recommend(arts, parse_slo("p95<200ms"), 0.01)
    assert rec["recommended"] is None and set(rec["rejected"]) == {"a", "b"}


def test_failed_server_and_failures_reject():
    arts = [artifact("down", None, [], status="failed"),
            artifact("errs", 0.0, [level("8 users", 50, 80, failures=10)]),
            artifact("ok", 0.0, [level("8 users", 120, 20)])]
    rec = recommend(arts, parse_slo("p95<200ms"), 0.01)
    assert rec["recommended"] == "ok"
    assert rec["rejected"]["down"].startswith("server failed")
    assert "failures 10.0% > 1.0%" in rec["rejected"]["errs"]


def test_unmeasured_accuracy_is_rejected_when_others_were_measured():
    arts = [artifact("measured", 0.0, [level("1 user", 100, 10)]),
            artifact("unmeasured", None, [level("1 user", 50, 20)])]
    rec = recommend(arts, parse_slo("p95<200ms"), 0.01)
    assert rec["recommended"] == "measured"
    assert rec["rejected"]["unmeasured"] == "accuracy not measured"


def test_equal_throughput_prefers_smaller_drop_then_fewer_bytes():
    arts = [artifact("big", 0.002, [level("1 user", 100, 10)], size=9000),
            artifact("small", 0.002, [level("1 user", 100, 10)], size=1000),
            artifact("worse", 0.005, [level("1 user", 100, 10)], size=10)]
    assert recommend(arts, [], 0.01)["recommended"] == "small"


# --- Pareto front and percentiles ---------------------------------------------------

def test_pareto_front():
    # (latency, accuracy): C is dominated by B (faster, as accurate); E equals nobody.
    points = [(100, 0.90), (50, 0.88), (60, 0.88), (200, 0.91), (30, 0.70)]
    assert pareto_front(points) == [4, 1, 0, 3]


def test_percentile_nearest_rank():
    hist = Counter({10: 50, 20: 45, 300: 4, 900: 1})  # 100 samples
    assert percentile(hist, 0.50) == 10
    assert percentile(hist, 0.95) == 20
    assert percentile(hist, 0.99) == 300
    assert percentile(hist, 1.0) == 900
    assert percentile(Counter(), 0.5) is None


def _entry(method, name, times: dict, failures=0, start=0.0, end=10.0, length=0):
    n = sum(times.values())
    return {"method": method, "name": name, "num_requests": n, "num_failures": failures,
            "num_none_requests": 0, "response_times": times,
            "total_response_time": sum(k * v for k, v in times.items()),
            "max_response_time": max(times), "min_response_time": min(times),
            "total_content_length": length, "start_time": start,
            "last_request_timestamp": end}


def test_summarize_merges_repeats_exactly():
    run1 = [_entry("POST", "/generate [stream]", {100: 9, 400: 1}, failures=1, end=5.0),
            _entry("SSE", "TTFT", {20: 10}, end=5.0),
            _entry("SSE", "tokens", {100: 10}, end=5.0, length=80)]
    run2 = [_entry("POST", "/generate [stream]", {100: 10}, end=5.0),
            _entry("SSE", "TTFT", {30: 10}, end=5.0),
            _entry("SSE", "tokens", {100: 10}, end=5.0, length=120)]
    total = summarize([run1, run2])
    assert total["requests"] == 20 and total["failures"] == 1  # TTFT/tokens not counted
    assert total["duration_s"] == 10.0 and total["rps"] == 2.0
    assert total["latency_ms"]["p95"] == 100 and total["latency_ms"]["max"] == 400
    assert total["ttft_ms"]["p50"] == 20 and total["ttft_ms"]["p99"] == 30
    assert total["tokens_per_s"] == 20.0  # (80 + 120) tokens / 10 s



def test_throughput_window_opens_at_run_start_not_first_response():
    # Two slow requests: the first completes 3 s into the run, the last at 5 s. Measured
    # from the first response (2 s) this would read 1 req/s; the run really did 2 in 5 s.
    run = [_entry("RUN", "start", {0: 1}, start=100.0, end=100.0),
           _entry("POST", "/generate [stream]", {3000: 1, 2000: 1}, start=103.0, end=105.0)]
    total = summarize([run])
    assert total["requests"] == 2  # the marker is not a request
    assert total["duration_s"] == 5.0 and total["rps"] == 0.4
    # Runs written without the marker fall back to the first response.
    assert summarize([run[1:]])["duration_s"] == 2.0

# --- output files --------------------------------------------------------------------

def test_write_report_outputs(tmp_path):
    arts = [artifact("fp32", 0.0, [level("1 user", 80, 12), level("8 users", 260, 30)], 4000),
            artifact("int8", 0.004, [level("1 user", 40, 25), level("8 users", 150, 55)],
                     1000, acc=0.896),
            artifact("down", None, [], status="failed")]
    results = {"schema_version": 1, "created_at": "2025-01-01T00:00:00Z", "environment": {},
               "config": {"slo": "p95<200ms", "max_accuracy_drop": 0.01, "reference": "fp32",
                          "duration_s": 30.0, "warmup_s": 10.0, "repeats": 2},
               "artifacts": arts,
               "recommendation": recommend(arts, parse_slo("p95<200ms"), 0.01)}
    paths = write_report(results, tmp_path)
    assert json.loads(paths["results.json"].read_text())["recommendation"]["recommended"] == (
        "int8")
    with open(paths["results.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [(r["artifact"], r["level"]) for r in table] == [
        ("fp32", "1 user"), ("fp32", "8 users"), ("int8", "1 user"), ("int8", "8 users"),
        ("down", "")]
    assert float(table[3]["p95_ms"]) == 150.0 and float(table[3]["rps"]) == 55.0
    text = paths["report.md"].read_text()
    assert "**Deploy `int8`**" in text and "`down` not chosen: server failed" in text
    png = paths["pareto.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(paths["pareto.png"])
    assert image.shape[0] == 400 and image.shape[1] == 900  # 2 panels × 4.5 in × 100 dpi


def test_throughput_within_noise_goes_to_smaller_drop():
    arts = [artifact("fast-lossy", 0.008, [level("8 users", 100, 100)], size=500),
            artifact("near-exact", 0.001, [level("8 users", 100, 97)], size=4000),
            artifact("slower", 0.0, [level("8 users", 100, 80)], size=4000)]
    rec = recommend(arts, parse_slo("p95<200ms"), 0.01)
    assert rec["recommended"] == "near-exact"
    assert "within 5%" in rec["rejected"]["fast-lossy"]
    assert "serves less: 80.0 req/s" in rec["rejected"]["slower"]


def test_pareto_labels_join_coincident_points_and_move_crowded_ones():
    from bench.report import _labels

    labels = _labels([(12.0, 0.74), (12.0, 0.74), (12.2, 0.7401), (40.0, 0.70)],
                     ["distill", "onnx-fp32", "torch-nf4", "onnx-int8-static"])
    by_name = {name: offset for _, name, offset in labels}
    assert set(by_name) == {"distill, onnx-fp32", "torch-nf4", "onnx-int8-static"}
    assert by_name["distill, onnx-fp32"] != by_name["torch-nf4"]  # crowded: moved apart
    assert by_name["onnx-int8-static"] == (6, 6)


# --- decode-bound chat levels ----------------------------------------------------------

def _chat_run(window_s: float = 10.0) -> list[dict]:
    """One chat run: 6 sent, 3 streams done (128 tokens each), 2 × 503, 1 × 429."""
    return [_entry("RUN", "start", {0: 1}, start=100.0, end=100.0),
            _entry("RUN", "window", {round(window_s * 1000): 1}, start=110.0, end=110.0),
            _entry("POST", "/v1/chat/completions [stream]", {5: 3, 4000: 3}, failures=3,
                   start=100.5, end=112.0),
            _entry("OUTCOME", "sent", {0: 6}), _entry("OUTCOME", "200 done", {0: 3}),
            _entry("OUTCOME", "503", {0: 2}), _entry("OUTCOME", "error", {0: 1}),
            _entry("ERROR", "HTTP 429", {0: 1}),
            _entry("SSE", "TTFT", {150: 2, 900: 1}),
            _entry("SSE", "ITL", {30: 300, 60: 81}),
            _entry("SSE", "tokens", {4000: 3}, length=384),
            _entry("SSE", "window tokens", {0: 6}, length=300)]


def test_summarize_chat_splits_503_from_other_failures_and_counts_window_tokens():
    total = summarize([_chat_run()])
    assert total["requests"] == 6  # outcome, error, window and marker entries are not requests
    assert total["failures"] == 3
    assert (total["failures_503"], total["failures_other"]) == (2, 1)
    assert total["errors"] == {"HTTP 429": 1}
    assert total["outcomes"] == {"sent": 6, "200 done": 3, "503": 2, "error": 1,
                                 "open at stop": 0}
    assert total["tokens_per_request"] == 128.0
    # tokens that arrived inside the 10 s window, not the 384 of the finished streams
    assert total["window_s"] == 10.0 and total["output_tokens_per_s"] == 30.0
    assert total["ttft_ms"]["p50"] == 150 and total["ttft_ms"]["p99"] == 900
    assert total["itl_ms"]["p50"] == 30 and total["itl_ms"]["p99"] == 60
    # two repeats: window tokens and windows add up
    assert summarize([_chat_run(), _chat_run(20.0)])["output_tokens_per_s"] == 20.0


def test_summarize_without_outcomes_leaves_split_unmeasured():
    run = [_entry("POST", "/classify", {10: 5}, failures=1)]
    total = summarize([run])
    assert total["failures"] == 1 and total["failures_503"] is None
    assert total["outcomes"] is None and total["output_tokens_per_s"] is None


def test_summarize_counts_streams_open_at_stop():
    run = [_entry("OUTCOME", "sent", {0: 5}), _entry("OUTCOME", "200 done", {0: 3}),
           _entry("OUTCOME", "200 lost", {0: 1})]
    assert summarize([run])["outcomes"]["open at stop"] == 1


def test_report_has_decode_table_and_csv_rows(tmp_path):
    chat = {"mode": "closed", "profile": "chat", "label": "8 streams", "users": 8,
            "rate": None, "max_tokens": 128, **summarize([_chat_run()]),
            "spread": {}, "repeats": []}
    art = artifact("genai-int4", 0.0, [level("1 user", 80, 12)])
    art["decode"] = [chat]
    results = {"schema_version": 1, "created_at": "2025-01-01T00:00:00Z", "environment": {},
               "config": {"slo": "p95<2000ms", "max_accuracy_drop": 0.05,
                          "reference": "genai-int4", "duration_s": 10.0, "warmup_s": 1.0,
                          "repeats": 1},
               "artifacts": [art], "recommendation": recommend([art], [], None)}
    paths = write_report(results, tmp_path)
    text = paths["report.md"].read_text()
    assert "## Decode-bound chat load" in text and "`max_tokens` 128" in text
    assert ("| genai-int4 | 8 | 3 | 128.0 | 30.0 | 3.8 | 150 / 900 / 900 | 30 / 60 / 60 "
            "| 2 / 1 |") in text
    with open(paths["results.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [(r["profile"], r["level"]) for r in table] == [("eval", "1 user"),
                                                           ("chat", "8 streams")]
    chat_row = table[1]
    assert float(chat_row["output_tokens_per_s"]) == 30.0
    assert (chat_row["failures_503"], chat_row["failures_other"]) == ("2", "1")
    assert float(chat_row["ttft_p99_ms"]) == 900.0


# --- soak verdicts ---------------------------------------------------------------------

def test_soak_rss_growth_compares_settled_and_final_windows():
    from bench.soak import rss_growth

    # 600 s at 1 Hz: 1.0 GB up to minute 2 (warming), then 1.00 → 1.03 GB linearly
    samples = [(float(t), 900_000_000 if t < 120 else int(1e9 + 3e7 * (t - 120) / 480))
               for t in range(601)]
    rss = rss_growth(samples, start=0.0, end=600.0, settle_s=120.0)
    assert rss["settled_bytes"] == pytest.approx(1e9, rel=2e-3)
    assert rss["growth"] == pytest.approx(0.03, abs=2e-3)
    assert rss_growth([], 0.0, 600.0, 120.0)["growth"] is None


def test_soak_verdicts():
    from bench.soak import verdicts

    level = {"outcomes": {"sent": 10, "200 done": 6, "503": 4, "open at stop": 0},
             "errors": None}
    ok = verdicts(level, {"growth": 0.01, "settled_bytes": 1e9, "end_bytes": 1.01e9}, 0.05)
    assert all(v["ok"] for v in ok.values())
    bad = verdicts({"outcomes": {"sent": 10, "200 done": 6, "200 lost": 1, "error": 3,
                                 "open at stop": 0}, "errors": {"HTTP 429": 3}},
                   {"growth": 0.08, "settled_bytes": 1e9, "end_bytes": 1.08e9}, 0.05)
    assert not any(v["ok"] for v in bad.values())
    assert "HTTP 429" in bad["excess answered 503"]["detail"]
