"""BentoML's per-request metrics, recorded for the routes answered outside its stack.

``/classify`` and the refused requests (no API key, unknown path, wrong method) are
answered before BentoML's middleware (:mod:`serve.app.asgi`), so BentoML's request-metrics
middleware never sees them. The ``endpoint`` label is the route's path, or ``other`` for
every unknown path (:mod:`serve.api.route_table`): the label set is bounded.
:class:`RequestMetrics` records the same series that middleware would
(``bentoml_service_request_total``, ``bentoml_service_request_duration_seconds``,
``bentoml_service_request_in_progress``,
``bentoml_service_last_request_timestamp_seconds``; same labels, BentoML's default
duration buckets), so ``/metrics``, dashboards and alerts read them unchanged. Like
:func:`serve.engine.batcher.batch_size_observer` they are ``prometheus_client`` metrics in no
registry: in a BentoML worker the values go to the multiprocess files that BentoML's
``/metrics`` collects. Labelled children are cached per status code: the hot path does
no label lookup.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "bentoml_service"
# BentoML's default (bentoml._internal.utils.metrics.DEFAULT_BUCKET) when its
# api_server.metrics.duration is not configured; the direct path is only installed then.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 180.0, float("inf"))
_LABELS = ["endpoint", "service_name", "service_version", "http_response_code",
           "runner_name"]


class RequestMetrics:
    """BentoML-named request metrics for one endpoint, created in the worker.

    Args:
        endpoint: The ``endpoint`` label: a route's path, or ``other``.
    """

    def __init__(self, endpoint: str) -> None:
        import bentoml
        from prometheus_client import Counter, Gauge, Histogram

        ctx = bentoml.server_context
        self.names = {"endpoint": endpoint, "service_name": ctx.bento_name,
                      "service_version": ctx.bento_version,
                      "runner_name": ctx.service_name}
        self.total = Counter(f"{NAMESPACE}_request_total", "Total number of runner RPC",
                             labelnames=_LABELS, registry=None)
        self.duration = Histogram(f"{NAMESPACE}_request_duration_seconds",
                                  "runner RPC duration in seconds", labelnames=_LABELS,
                                  buckets=DURATION_BUCKETS, registry=None)
        in_progress = Gauge(f"{NAMESPACE}_request_in_progress",
                            "Total number of runner RPC in progress now",
                            labelnames=[k for k in _LABELS if k != "http_response_code"],
                            multiprocess_mode="livesum", registry=None)
        last = Gauge(f"{NAMESPACE}_last_request_timestamp_seconds",
                     "Timestamp of the last received request",
                     labelnames=["service_name", "service_version", "runner_name"],
                     registry=None)
        self.in_progress = in_progress.labels(**self.names)
        self.last = last.labels(**{k: v for k, v in self.names.items() if k != "endpoint"})
        self.by_status: dict[int, tuple[Any, Any]] = {}

    def started(self) -> float:
        """Count a request in progress; returns its start time for :meth:`finished`."""
        self.in_progress.inc()
        now = time.time()
        self.last.set(now)
        return time.perf_counter()

    def finished(self, start: float, status: int) -> None:
        """Record one answered request with its HTTP status."""
        self.in_progress.dec()
        children = self.by_status.get(status)
        if children is None:
            labels = {**self.names, "http_response_code": str(status)}
            children = self.by_status[status] = (self.total.labels(**labels),
                                                 self.duration.labels(**labels))
        children[0].inc()
        children[1].observe(time.perf_counter() - start)
