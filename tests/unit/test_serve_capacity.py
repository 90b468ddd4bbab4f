"""bench.serve_capacity's summary, its docs section, and bench.hey's summary parser."""

from __future__ import annotations

import pytest

from bench.hey import HeyError, parse_summary
from bench.serve_capacity import BEGIN, END, summarize, write_doc

# hey 0.1.4's summary (Debian package), trimmed to the parts that are read
HEY_OUT = """
Summary:
  Total:\t10.0153 secs
  Slowest:\t0.2201 secs
  Fastest:\t0.0021 secs
  Average:\t0.0640 secs
  Requests/sec:\t498.7361

Latency distribution:
  10% in 0.0400 secs
  50% in 0.0601 secs
  99% in 0.1502 secs

Status code distribution:
  [200]\t4990 responses
  [503]\t5 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:1/classify": dial tcp 127.0.0.1:1: connect: connection refused
"""


def test_parse_hey_summary():
    r = parse_summary(HEY_OUT, connections=32)
    assert (r.connections, r.requests, r.errors) == (32, 4995, 3)
    assert r.rps == pytest.approx(498.7361)
    assert (r.p50_ms, r.p99_ms) == (pytest.approx(60.1), pytest.approx(150.2))
    assert r.statuses == {200: 4990, 503: 5} and not r.ok
    with pytest.raises(HeyError, match="Requests/sec"):
        parse_summary("Summary:\n  Total:\t1.0 secs\n", connections=1)


def _run(c1: float, c32: float, p50: float, p99: float, batch: float) -> dict:
    return {"c1": {"rps": c1}, "c32": {"rps": c32, "p50_ms": p50, "p99_ms": p99},
            "mean_batch_c32": batch}


def test_summary_ratios_and_verdicts():
    runs = {"reference": [_run(200, 500, 60, 90, 20), _run(210, 520, 60, 90, 20)],
            "served": [_run(180, 470, 65, 150, 12), _run(170, 450, 66, 250, 10)],
            "no-batching": [_run(170, 300, 100, 160, 1), _run(170, 290, 100, 160, 1)]}
    s = summarize(runs)
    assert s["table"]["reference"]["c32_rps"] == 510  # median of the rounds
    assert s["ratios"]["served_vs_reference"] == pytest.approx(460 / 510)
    assert s["ratios"]["batching_gain"] == pytest.approx(460 / 295)
    assert s["ratios"]["p99_over_p50"] == pytest.approx(200 / 65.5)
    assert s["met"] == {"served_vs_reference": True, "mean_batch": True,
                        "p99_over_p50": False, "batching_gain": True}


def test_write_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    write_doc(doc, f"{BEGIN}\nfirst\n{END}")
    write_doc(doc, f"{BEGIN}\nsecond\n{END}")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n## Served capacity")
    assert "second" in text and "first" not in text and text.count(BEGIN) == 1
    doc.write_text(text + "\n## Later section\n")
    write_doc(doc, f"{BEGIN}\nthird\n{END}")
    assert doc.read_text().endswith(f"third\n{END}\n\n## Later section\n")
