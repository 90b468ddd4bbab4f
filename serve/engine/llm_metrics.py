"""LLM serving metrics on ``/metrics``, named as vLLM names them (``modelpress:`` prefix).

Created with ``prometheus_client`` (what ``bentoml.metrics`` forwards to) on first use,
inside the worker process: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` when a worker
starts, and metrics made before that would never reach its ``/metrics``. Gauges sum over
live workers (``livesum``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# seconds; TTFT and end-to-end cover queueing, so they reach minutes under overload
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                      0.3, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


@dataclass
class LLMMetrics:
    """The engine's Prometheus metrics (see the module docstring for naming)."""

    time_to_first_token: Any
    inter_token_latency: Any
    e2e_request_latency: Any
    queue_time: Any
    running: Any
    waiting: Any
    prompt_tokens: Any
    generation_tokens: Any
    request_success: Any
    request_aborted: Any
    request_queue_timeout: Any
    step_sequences: Any
    prefix_cache_hits: Any
    prefix_cache_misses: Any


_CACHE: list[LLMMetrics] = []


def llm_metrics() -> LLMMetrics:
    """The process's metrics (made once; a second engine in one process shares them)."""
    if _CACHE:
        return _CACHE[0]
    import prometheus_client as prom

    def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Any:
        return prom.Histogram(f"modelpress:{name}", text, buckets=buckets)

    def gauge(name: str, text: str) -> Any:
        return prom.Gauge(f"modelpress:{name}", text, multiprocess_mode="livesum")

    def counter(name: str, text: str, *labels: str) -> Any:
        return prom.Counter(f"modelpress:{name}", text, labels)

    metrics = LLMMetrics(
        time_to_first_token=histogram("time_to_first_token_seconds",
                                      "Arrival at the engine to first token.", _LATENCY_BUCKETS),
        inter_token_latency=histogram("inter_token_latency_seconds",
                                      "Gap between consecutive output tokens.",
                                      _TOKEN_GAP_BUCKETS),
        e2e_request_latency=histogram("e2e_request_latency_seconds",
                                      "Arrival at the engine to last token.", _LATENCY_BUCKETS),
        queue_time=histogram("request_queue_time_seconds", "Time spent waiting for admission.",
                             _LATENCY_BUCKETS),
        running=gauge("num_requests_running", "Sequences in the running batch."),
        waiting=gauge("num_requests_waiting", "Requests waiting for admission."),
        prompt_tokens=counter("prompt_tokens", "Prefilled prompt tokens."),
        generation_tokens=counter("generation_tokens", "Generated tokens."),
        request_success=counter("request_success", "Finished requests.", "finished_reason"),
        request_aborted=counter("request_aborted",
                                "Requests aborted before their end (client gone)."),
        request_queue_timeout=counter("request_queue_timeout",
                                      "Requests refused (503) after waiting too long."),
        step_sequences=histogram("engine_step_sequences",
                                 "Sequences decoded together per engine step.", _BATCH_BUCKETS),
        prefix_cache_hits=counter("prefix_cache_hits",
                                  "Prompt tokens whose KV came from the prefix cache."),
        prefix_cache_misses=counter("prefix_cache_misses", "Prompt tokens prefilled with the "
                                    "prefix cache on (not found in it)."),
    )
    _CACHE.append(metrics)
    return metrics
