"""Locust users that replay real eval inputs against a modelpress server.

Run only as a subprocess (``locust -f bench/locustfile.py --headless ...``): Locust
monkey-patches the process with gevent on import. This file imports nothing from
modelpress; the harness (``bench/run.py``) passes everything through environment variables:

* ``MODELPRESS_BENCH_INPUTS``: JSONL file, one ``{"text": ...}`` per line (the eval inputs).
* ``MODELPRESS_BENCH_TASK``: ``text-classification`` or ``text-generation``.
* ``MODELPRESS_BENCH_MAX_NEW_TOKENS``: generation length (default 32).
* ``MODELPRESS_BENCH_USER_RATE``: open loop only, arrival rate in requests/s of each user
  (the harness divides the total rate by the user count).
* ``MODELPRESS_BENCH_PROFILE``: ``eval`` (default: the task's own route with the eval
  inputs) or ``chat`` (decode-bound: streaming ``POST /v1/chat/completions`` in OpenAI's
  format, so the same users load any OpenAI-compatible server, e.g. vLLM's).
* ``MODELPRESS_BENCH_MODEL``: chat profile, the ``model`` field (vLLM checks it).
* ``MODELPRESS_BENCH_EXTRA_BODY``: chat profile, JSON object merged into each request body
  (a server's own options, e.g. vLLM's ``{"ignore_eos": true}``).
* ``MODELPRESS_BENCH_CONNECTIONS``: open loop, connections each user may hold open (default
  256). Above it requests wait in the client, so a soak sets it above what the server can
  hold (running + waiting): the server, not the client, must shed the excess.
* ``MODELPRESS_BENCH_MIN_REQUESTS`` and ``MODELPRESS_BENCH_MIN_S``: a run stops once
  ``MIN_S`` seconds have passed *and* at least ``MIN_REQUESTS`` responses have arrived
  (the harness passes Locust's ``-t`` as the cap), so a slow server or a busy machine
  still yields a level with requests to measure. Unset: Locust's ``-t`` alone.

User classes (pick one by name on the command line):

* ``ClosedLoopUser``: each user sends its next request as soon as the previous one
  returns (N users = N requests in flight). A slow server slows the senders down, so it
  is measured at the load it can take — the "coordinated omission" of closed loops.
* ``OpenLoopUser``: requests leave on a fixed schedule (``i / rate`` seconds after the
  start), each in its own greenlet, whether or not earlier ones have returned. A slow
  server then builds a queue and its latency grows, as it would with real clients.
  Each request's latency is also recorded from its *scheduled* send time
  (``... [from schedule]``), so a lagging load generator cannot hide queueing either.

The harness runs Locust with ``--stop-timeout``: at the end of a run every request in
flight completes (a client that drops a stream mid-response is not what is measured).

At test start a ``RUN start`` entry (response time 0) is recorded: its ``start_time``
marks the beginning of the measured window, so throughput is requests over [run start,
last response] rather than over [first response, last response] (which drops the first
request and overstates req/s when a run completes only a few slow requests).

Generation requests stream (SSE) and record extra Locust entries: ``TTFT`` (time to
first token), ``ITL`` (each inter-token gap) and ``tokens`` (response time = whole
stream, response length = number of streamed tokens, so tokens/s = length / time).
Chat streams count tokens from the server's ``usage`` (``stream_options.include_usage``)
when it sends one, else one per content chunk, and add ``window tokens``: tokens that
arrived inside the measured window, from the run start to the moment Locust starts
stopping the users (``RUN window``: its response time is the window's length). That is
the decode-bound throughput, unbiased by the drain after the stop, where fewer streams run.

Every request also records its outcome (``OUTCOME`` entries, counts only): ``sent``,
``200 done`` (stream ended with ``[DONE]``), ``200 lost`` (a 200 whose stream broke off
or was malformed), ``503`` (deliberate overload answer) and ``error`` (anything else).
Chat streams still open when Locust kills them at the end of ``--stop-timeout`` record
``200 cut off`` (a 200 whose stream had started) or ``no answer`` (still waiting for the
status line); ``sent`` minus all the others is what could not be told apart.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator

import gevent
import gevent.pool
from locust import FastHttpUser, constant, events, task
from locust.runners import WorkerRunner
from locust.user.task import LOCUST_STATE_STOPPING

TASK = os.environ.get("MODELPRESS_BENCH_TASK", "text-classification")
MAX_NEW_TOKENS = int(os.environ.get("MODELPRESS_BENCH_MAX_NEW_TOKENS", "32"))
USER_RATE = float(os.environ.get("MODELPRESS_BENCH_USER_RATE", "1") or 1)
PROFILE = os.environ.get("MODELPRESS_BENCH_PROFILE", "eval")
MODEL = os.environ.get("MODELPRESS_BENCH_MODEL") or None
EXTRA_BODY = json.loads(os.environ.get("MODELPRESS_BENCH_EXTRA_BODY") or "{}")
CONNECTIONS = int(os.environ.get("MODELPRESS_BENCH_CONNECTIONS") or 256)
MIN_REQUESTS = int(os.environ.get("MODELPRESS_BENCH_MIN_REQUESTS") or 0)
MIN_S = float(os.environ.get("MODELPRESS_BENCH_MIN_S") or 0)
_NOT_REQUESTS = {"SSE", "RUN", "OUTCOME", "ERROR", "SCHEDULE"}  # entries fired by this file
_window = [time.perf_counter(), None]  # [run start, stop]: set by the test events


def _load_inputs() -> list[str]:
    path = os.environ.get("MODELPRESS_BENCH_INPUTS")
    if not path:
        return ["a quiet, moving film", "the plot never comes together"]
    with open(path, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    if not texts:
        raise SystemExit(f"{path}: no inputs")
    return texts


INPUTS = _load_inputs()
_cursor = itertools.count()


def _next_input() -> str:
    return INPUTS[next(_cursor) % len(INPUTS)]


def _fire(name: str, response_time_ms: float, length: int = 0, kind: str = "SSE") -> None:
    events.request.fire(request_type=kind, name=name, response_time=response_time_ms,
                        response_length=length, exception=None, context={})


def _outcome(name: str) -> None:
    _fire(name, 0.0, kind="OUTCOME")


def _failed_status(resp) -> None:
    """Record a non-200 answer: ``503`` or ``error`` (with its status, or the exception of a
    request that got no answer, as an ``ERROR`` entry)."""
    status = resp.status_code
    resp.failure(f"HTTP {status}")
    if status == 503:
        _outcome("503")
        return
    _outcome("error")
    detail = f"HTTP {status}" if status else f"no answer: {type(resp.error).__name__}"
    _fire(detail, 0.0, kind="ERROR")


def _check_classify(resp) -> None:
    if resp.status_code != 200:
        _failed_status(resp)
        return
    try:
        results = resp.json()["results"]
        ok = (len(results) == 1 and isinstance(results[0]["label"], str) and results[0]["label"]
              and isinstance(results[0]["score"], float | int))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        resp.failure(f"bad response body: {exc!r}")
        _outcome("200 lost")
        return
    if not ok:
        resp.failure(f"bad response body: {resp.text[:200]}")
        _outcome("200 lost")
        return
    _outcome("200 done")


def classify(client, name: str = "/classify") -> None:
    """One ``POST /classify`` with a single eval text, checked for status and schema."""
    _outcome("sent")
    with client.post("/classify", json={"texts": [_next_input()]}, name=name,
                     catch_response=True) as resp:
        _check_classify(resp)


def _sse_data(resp) -> Iterator[str]:
    """The ``data:`` payloads of a streamed response, each as soon as its line lands."""
    raw = resp._response  # geventhttpclient response: readline returns each line as it lands
    while line := raw.readline(b"\n"):
        data = line.decode("utf-8").strip()
        if data.startswith("data:"):
            yield data.removeprefix("data:").strip()


def generate_stream(client, name: str = "/generate [stream]") -> None:
    """One streamed ``POST /generate``; records TTFT, ITL and tokens next to the request."""
    body = {"prompts": [_next_input()], "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0,
            "stream": True}
    start = time.perf_counter()
    _outcome("sent")
    with client.post("/generate", json=body, name=name, stream=True,
                     catch_response=True) as resp:
        if resp.status_code != 200:
            _failed_status(resp)
            return
        arrivals, done = [], False
        try:
            for data in _sse_data(resp):
                if data == "[DONE]":
                    done = True
                else:
                    json.loads(data)["text"]
                    arrivals.append(time.perf_counter())
        except (ValueError, KeyError, TypeError) as exc:
            resp.failure(f"bad SSE event: {exc!r}")
            _outcome("200 lost")
            return
        total_ms = (time.perf_counter() - start) * 1000
        resp.request_meta["response_time"] = total_ms
        if not done:
            resp.failure("stream ended without [DONE]")
            _outcome("200 lost")
            return
        _outcome("200 done")
        _record_stream(start, arrivals, total_ms, len(arrivals))


def _record_stream(start: float, arrivals: list[float], total_ms: float, tokens: int) -> None:
    # A model may answer with EOS straight away: an empty completion is a valid
    # response (0 tokens), it only has no first token to time.
    if arrivals:
        _fire("TTFT", (arrivals[0] - start) * 1000)
    for prev, cur in itertools.pairwise(arrivals):
        _fire("ITL", (cur - prev) * 1000)
    _fire("tokens", total_ms, tokens)


def _window_tokens(arrivals: list[float], tokens: int) -> int:
    """Tokens of a stream that arrived inside the measured window (chunks scaled to the
    stream's token count, for servers that send several tokens in one chunk)."""
    if not arrivals:
        return 0
    end = _window[1] if _window[1] is not None else arrivals[-1]
    inside = sum(1 for t in arrivals if t <= end)
    return round(tokens * inside / len(arrivals))


def _chat_body() -> dict:
    body = {"messages": [{"role": "user", "content": _next_input()}],
            "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if MODEL:
        body["model"] = MODEL
    return {**body, **EXTRA_BODY}


def chat_stream(client, name: str = "/v1/chat/completions [stream]") -> None:
    """One streamed OpenAI chat completion: TTFT, ITL, tokens, window tokens, outcome.

    Tokens that arrived before a stream broke off (or before Locust stopped it) still count
    in ``window tokens``: that is work the server did inside the window.
    """
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    phase = "no answer"  # → "200 cut off" once the stream starts, "" once an outcome is out
    _outcome("sent")
    try:
        with client.post("/v1/chat/completions", json=_chat_body(), name=name, stream=True,
                         catch_response=True) as resp:
            if resp.status_code != 200:
                phase = ""
                _failed_status(resp)
                return
            phase = "200 cut off"
            done = False
            try:
                for data in _sse_data(resp):
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ValueError(f"error event: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    if any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                        arrivals.append(time.perf_counter())
            except (ValueError, KeyError, TypeError) as exc:
                phase = ""
                resp.failure(f"bad SSE event: {exc!r}")
                _outcome("200 lost")
                return
            total_ms = (time.perf_counter() - start) * 1000
            resp.request_meta["response_time"] = total_ms
            phase = ""
            if not done:
                resp.failure("stream ended without [DONE]")
                _outcome("200 lost")
                return
            _outcome("200 done")
            tokens = int(usage["completion_tokens"]) if usage else len(arrivals)
            _record_stream(start, arrivals, total_ms, tokens)
    finally:
        if phase:  # killed by Locust's stop timeout (GreenletExit), or a client error
            _outcome(phase)
        tokens = int(usage["completion_tokens"]) if usage else len(arrivals)
        _fire("window tokens", 0.0, _window_tokens(arrivals, tokens))


@events.init.add_listener
def _refresh_clock(environment, **_kwargs) -> None:
    # Locust schedules its -t stop with gevent's cached loop time, which is stale by the
    # whole start-up (seconds on a busy machine): a 4 s run then stopped after 2 s.
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _mark_run_start(environment, **_kwargs) -> None:
    _window[0], _window[1] = time.perf_counter(), None
    _fire("start", 0.0, kind="RUN")


def responses(stats) -> int:
    """Responses received so far (successes and failures) to the requests themselves."""
    return sum(entry.num_requests for (_name, method), entry in stats.entries.items()
               if method not in _NOT_REQUESTS)


def _stop_when_measured(environment) -> None:
    gevent.sleep(MIN_S)
    while responses(environment.stats) < MIN_REQUESTS:
        gevent.sleep(0.1)
    environment.runner.quit()  # what Locust's own -t does in a headless run


@events.test_start.add_listener
def _extend_until_measured(environment, **_kwargs) -> None:
    # On the master (or the only process): workers' stats reach it every few seconds.
    if MIN_REQUESTS > 0 and not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(_stop_when_measured, environment)


@events.test_stopping.add_listener
def _mark_window_end(environment, **_kwargs) -> None:
    # Measured rather than taken from -t: the stop comes when Locust gets to it.
    if PROFILE == "chat" and _window[1] is None:
        _window[1] = time.perf_counter()
        _fire("window", (_window[1] - _window[0]) * 1000, kind="RUN")


if PROFILE == "chat":
    _REQUEST = chat_stream
else:
    _REQUEST = generate_stream if TASK == "text-generation" else classify


class ClosedLoopUser(FastHttpUser):
    """Back-to-back requests: each user waits for its response before sending again."""

    wait_time = constant(0)

    @task
    def request(self) -> None:
        """Send one request of the artifact's task."""
        _REQUEST(self.client)


class OpenLoopUser(FastHttpUser):
    """Requests on a fixed arrival schedule, independent of responses (open loop)."""

    wait_time = constant(0)
    concurrency = CONNECTIONS  # connections this user may hold open at once

    @task
    def request(self) -> None:
        """Send requests at ``USER_RATE`` per second until Locust stops the user.

        On stop (Locust's ``--stop-timeout``) no new request leaves and the ones in flight
        are awaited, so no stream is cut off mid-response.
        """
        interval = 1.0 / USER_RATE
        start = time.perf_counter()
        pending = gevent.pool.Group()
        for i in itertools.count():
            due = start + i * interval
            while (wait := due - time.perf_counter()) > 0 and not self._stopping():
                gevent.sleep(min(wait, 0.1))
            if self._stopping():
                break
            pending.spawn(self._scheduled, due)
        pending.join()

    def _stopping(self) -> bool:
        return self._state == LOCUST_STATE_STOPPING

    def _scheduled(self, due: float) -> None:
        _REQUEST(self.client)
        _fire("from schedule", (time.perf_counter() - due) * 1000, kind="SCHEDULE")
