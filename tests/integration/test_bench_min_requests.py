"""A real Locust run against a slow loopback server goes on past its duration until the
minimum number of responses arrived (issue 20: a slow server once gave 0-request levels)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import LoadSpec, level_result, run_locust

pytestmark = pytest.mark.integration

ANSWER_AFTER_S = 0.5  # one user, 1 s of load: 2-3 responses without the extension


class SlowClassifier(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(ANSWER_AFTER_S)
        body = json.dumps({"results": [{"label": "positive", "score": 0.9}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_level_runs_until_min_requests_arrived(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowClassifier)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": "a fine film"}) + "\n")
    spec = LoadSpec("closed", 1, 1.0, min_requests=6, max_extend_s=60.0)
    try:
        entries = run_locust(spec, f"http://127.0.0.1:{server.server_port}", inputs,
                             "text-classification", tmp_path / "load")
    finally:
        server.shutdown()
        server.server_close()
    level = level_result(spec, [entries])
    assert level["status"] == "ok"
    assert level["requests"] >= 6 and level["failures"] == 0
