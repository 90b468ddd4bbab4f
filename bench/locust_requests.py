"""The requests the Locust users of ``bench/locustfile.py`` send, and what they record.

Imported by the locustfile as a sibling module (Locust puts the locustfile's folder on
``sys.path``); like it, this imports nothing from modelpress and reads its settings from
the ``MODELPRESS_BENCH_*`` variables listed there.

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

from locust import events

MAX_NEW_TOKENS = int(os.environ.get("MODELPRESS_BENCH_MAX_NEW_TOKENS", "32"))
PROFILE = os.environ.get("MODELPRESS_BENCH_PROFILE", "eval")
MODEL = os.environ.get("MODELPRESS_BENCH_MODEL") or None
EXTRA_BODY = json.loads(os.environ.get("MODELPRESS_BENCH_EXTRA_BODY") or "{}")
#: Request types of the entries fired here and by the locustfile (not HTTP requests).
NOT_REQUESTS = {"SSE", "RUN", "OUTCOME", "ERROR", "SCHEDULE"}
#: The measured window, [run start, stop]: set by the locustfile's test events.
WINDOW: list[float | None] = [time.perf_counter(), None]


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


def fire(name: str, response_time_ms: float, length: int = 0, kind: str = "SSE") -> None:
    """Record one entry that is not an HTTP request (a timing, a count, a marker)."""
    events.request.fire(request_type=kind, name=name, response_time=response_time_ms,
                        response_length=length, exception=None, context={})


def _outcome(name: str) -> None:
    fire(name, 0.0, kind="OUTCOME")


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
    fire(detail, 0.0, kind="ERROR")


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
        fire("TTFT", (arrivals[0] - start) * 1000)
    for prev, cur in itertools.pairwise(arrivals):
        fire("ITL", (cur - prev) * 1000)
    fire("tokens", total_ms, tokens)


def window_tokens(arrivals: list[float], tokens: int) -> int:
    """Tokens of a stream that arrived inside the measured window (chunks scaled to the
    stream's token count, for servers that send several tokens in one chunk)."""
    if not arrivals:
        return 0
    end = WINDOW[1] if WINDOW[1] is not None else arrivals[-1]
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
        fire("window tokens", 0.0, window_tokens(arrivals, tokens))

