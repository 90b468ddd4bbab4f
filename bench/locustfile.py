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

What each request records (SSE timings, outcomes, the measured window's tokens) is
written in :mod:`locust_requests` beside this file (``bench/locust_requests.py``).
"""

from __future__ import annotations

import itertools
import os
import time

import gevent
import gevent.pool
from locust import FastHttpUser, constant, events, task
from locust.runners import WorkerRunner
from locust.user.task import LOCUST_STATE_STOPPING
from locust_requests import (
    NOT_REQUESTS,
    PROFILE,
    WINDOW,
    chat_stream,
    classify,
    fire,
    generate_stream,
)

TASK = os.environ.get("MODELPRESS_BENCH_TASK", "text-classification")
USER_RATE = float(os.environ.get("MODELPRESS_BENCH_USER_RATE", "1") or 1)
CONNECTIONS = int(os.environ.get("MODELPRESS_BENCH_CONNECTIONS") or 256)
MIN_REQUESTS = int(os.environ.get("MODELPRESS_BENCH_MIN_REQUESTS") or 0)
MIN_S = float(os.environ.get("MODELPRESS_BENCH_MIN_S") or 0)


@events.init.add_listener
def _refresh_clock(environment, **_kwargs) -> None:
    # Locust schedules its -t stop with gevent's cached loop time, which is stale by the
    # whole start-up (seconds on a busy machine): a 4 s run then stopped after 2 s.
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _mark_run_start(environment, **_kwargs) -> None:
    WINDOW[0], WINDOW[1] = time.perf_counter(), None
    fire("start", 0.0, kind="RUN")


def responses(stats) -> int:
    """Responses received so far (successes and failures) to the requests themselves."""
    return sum(entry.num_requests for (_name, method), entry in stats.entries.items()
               if method not in NOT_REQUESTS)


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
    if PROFILE == "chat" and WINDOW[1] is None:
        WINDOW[1] = time.perf_counter()
        fire("window", (WINDOW[1] - WINDOW[0]) * 1000, kind="RUN")


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
        fire("from schedule", (time.perf_counter() - due) * 1000, kind="SCHEDULE")
