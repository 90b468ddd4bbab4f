"""The BentoML service that serves one artifact.

Start it with ``modelpress serve ARTIFACT`` or directly::

    MODELPRESS_ARTIFACT=artifacts/merge bentoml serve serve.app.service:Modelpress

Settings come from ``MODELPRESS_*`` environment variables (see
:class:`serve.settings.ServeSettings`), read when this module is imported, because
BentoML fixes a service's batching and worker settings at decoration time.

Layout: the public routes (``/classify``, ``/generate``, ``/metadata`` and the
OpenAI-compatible ``/v1/...``) are a Starlette app mounted on the service; they validate
input. ``/classify`` is answered before BentoML's per-request layers (:mod:`serve.app.asgi`,
:mod:`serve.api.classify_route`; BentoML's request metrics are still recorded), then queues
its texts on a :class:`serve.engine.batcher.MicroBatcher` on the event loop, which runs
everything queued while the model was busy as one call of ``classify_batch``
(``max_batch_size`` texts at most; a request queued longer than ``max_latency_ms`` gets
503; ``--no-batching``: one request per call); its batch sizes
(requests per batch) appear in ``/metrics`` as ``bentoml_service_adaptive_batch_size``.
Generation routes submit each prompt to the worker's :class:`serve.engine.core.Engine`
(continuous batching; its ``modelpress:*`` metrics appear in ``/metrics`` too).
BentoML's ``/readyz``, ``/livez`` and ``/metrics`` stay as they are. The batch function
is a plain method, not a BentoML API: no internal route skips the routes' checks.
``GET /openapi.json`` describes the public routes (:mod:`serve.api.openapi`); errors on every
route are OpenAI's error object (:mod:`serve.api.http_errors`). With an API key
(``MODELPRESS_API_KEY``) every route but the health checks and ``/metrics`` needs it
(:mod:`serve.app.auth`), checked before BentoML's layers with the unknown paths and methods.

This module imports no deep-learning framework: the runtime chosen by
:func:`serve.runtime.loader.load_runtime` imports its own when the service starts.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import threading
from typing import Any

import bentoml

from serve.api.backend import Backend
from serve.api.http_api import build_routes
from serve.api.http_errors import EXCEPTION_HANDLERS, fallback_routes
from serve.api.openai_api import build_openai_routes
from serve.api.openapi import openapi_schema
from serve.app.asgi import DirectRoutesApp, direct_routes_service
from serve.app.start_failure import reported
from serve.artifact import load_artifact
from serve.engine.batcher import MicroBatcher, batch_size_observer
from serve.engine.core import Engine
from serve.errors import ModelpressError
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import LMRuntime
from serve.runtime.step_lm import check_batch_invariant
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

try:
    SETTINGS = ServeSettings.from_env()
except ModelpressError as exc:  # one line, not a traceback per worker
    raise SystemExit(f"error: {exc}") from None
if SETTINGS.artifact:
    # Verify hashes on import, so `bentoml serve` (which imports this module before it
    # starts workers) stops at once with one line instead of restarting failing workers.
    try:
        _manifest = load_artifact(SETTINGS.artifact, verify=True).manifest
        if SETTINGS.engine.batch_invariant:
            check_batch_invariant(_manifest)
    except ModelpressError as exc:
        raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
# BentoML's OpenTelemetry middleware opens four spans per request even at its default
# sample rate of 0 (nothing is recorded): on /classify they cost more CPU than the model
# (docs/benchmarks.md). So /classify is not traced, unless BentoML is configured
# (BENTOML_CONFIG / BENTOML_CONFIG_OPTIONS: where a tracing exporter would be set).
_BENTOML_CONFIGURED = bool(os.environ.get("BENTOML_CONFIG")
                           or os.environ.get("BENTOML_CONFIG_OPTIONS"))
_UNTRACED: dict[str, Any] = (
    {} if _BENTOML_CONFIGURED else {"tracing": {"excluded_urls": [r"://[^/]*/classify$"]}})


def start_engine(runtime: LMRuntime, settings: ServeSettings) -> Engine:
    """The continuous-batching engine over ``runtime``'s step-level model."""
    config = settings.engine
    engine = Engine(runtime.step_lm(), set(runtime.eos_ids), config)
    log.info("generation engine: max_running=%d max_kv_tokens=%d max_waiting=%d "
             "queue_timeout_s=%g max_num_batched_tokens=%d max_prefill_tokens=%s "
             "max_gap_ratio=%g batch_invariant=%s chunked_prefill=%s prefix_cache=%s",
             config.max_running,
             config.max_kv_tokens, config.max_waiting, config.queue_timeout_s,
             config.max_num_batched_tokens, config.max_prefill_tokens,
             config.max_gap_ratio, config.batch_invariant, engine.chunked,
             engine.cache is not None)
    return engine


def classify_batcher(run: Any) -> MicroBatcher:
    """``/classify``'s micro-batcher around ``run`` (the service's ``classify_batch``)."""
    return MicroBatcher(run, SETTINGS.max_batch_size, SETTINGS.max_latency_ms,
                        batching=SETTINGS.batching, name="classify_batch",
                        observe=batch_size_observer("classify_batch", SETTINGS.max_batch_size))


class _State:
    backend: Backend | None = None


_STATE = _State()


def _backend() -> Backend:
    if _STATE.backend is None:  # routes are only reachable after start-up
        raise ModelpressError("service is not initialised yet")
    return _STATE.backend


def _schema_route() -> Any:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    cache: dict[str, Any] = {}

    async def schema(request: Any) -> Any:
        if "doc" not in cache:
            cache["doc"] = openapi_schema(
                _ROUTES, title=f"modelpress: {_backend().runtime.manifest.name}",
                api_key=bool(SETTINGS.api_key), limits=SETTINGS.limits)
        return JSONResponse(cache["doc"])
    return Route("/openapi.json", schema, methods=["GET"])


_ROUTES = [*build_routes(_backend), *build_openai_routes(_backend), _schema_route()]
http_app = DirectRoutesApp([*_ROUTES, *fallback_routes(["/v1", "/_batch"], _ROUTES)],
                          direct=["/classify"], exception_handlers=EXCEPTION_HANDLERS)


@bentoml.service(
    name="modelpress",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    # The routes reach the batchable APIs through BentoML's in-process client, whose
    # session is by default recycled every 100 requests / 300 s while other requests are
    # still in flight on it (they fail): keep one session for the worker's lifetime.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # Refusals (API key, unknown path, method) answered before BentoML's layers record
    # them (serve.app.asgi); /classify too, unless BentoML is configured (tracing, CORS or
    # metrics settings would then apply to it too).
    service_class=direct_routes_service(
        http_app, SETTINGS.api_key, SETTINGS.access_log, direct=not _BENTOML_CONFIGURED,
        connections=SETTINGS.connections),
    **_UNTRACED,
)
@bentoml.asgi_app(http_app, path="/")
class Modelpress:
    """Serves the artifact named by ``MODELPRESS_ARTIFACT`` (hashes verified at start)."""

    @reported  # a launcher stops the server instead of BentoML restarting this forever
    def __init__(self) -> None:
        if not SETTINGS.artifact:
            raise ModelpressError("MODELPRESS_ARTIFACT is not set: point it at an artifact "
                                  "folder (or use `modelpress serve ARTIFACT`)")
        # hashes were verified when this process imported the module
        self.runtime = load_runtime(SETTINGS.artifact, device=SETTINGS.device, verify=False)
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.detokenizer: Any = None
        if self.runtime.manifest.task == "text-generation":
            self.engine = start_engine(self.runtime, SETTINGS)
            self.detokenizer = copy.deepcopy(self.runtime.tokenizer)  # event loop's own
        batchers = ({"classify_batch": classify_batcher(self.classify_batch)}
                    if self.runtime.manifest.task == "text-classification" else {})
        _STATE.backend = Backend(self, SETTINGS.limits, SETTINGS.workers, batchers)
        # Everything loaded so far (frameworks, model, tokenizer) lives as long as the
        # worker: out of the collector's reach, full collections stop pausing requests
        # (~250 ms each, every few seconds under load: p99 ~11x p50 at 32 connections).
        gc.collect()
        gc.freeze()
        m = self.runtime.manifest
        log.info("serving %s (%s, %s/%s) on %s; batching=%s max_batch_size=%d "
                 "max_latency_ms=%d", SETTINGS.artifact, m.task, m.format, m.precision,
                 self.runtime.device, SETTINGS.batching, SETTINGS.max_batch_size,
                 SETTINGS.max_latency_ms)

    def metadata(self) -> dict[str, Any]:
        """Manifest summary for ``GET /metadata``."""
        m = self.runtime.manifest
        return {"name": m.name, "task": m.task, "format": m.format, "precision": m.precision,
                "bytes": m.total_bytes, "labels": list(self.runtime.labels),
                "metrics": m.metrics, "eval": m.eval, "gate": m.gate,
                "device": self.runtime.device,
                "serving": {"batching": SETTINGS.batching,
                            "max_batch_size": SETTINGS.max_batch_size,
                            "max_latency_ms": SETTINGS.max_latency_ms,
                            "workers": SETTINGS.workers,
                            "engine": (SETTINGS.engine.model_dump()
                                       if self.engine is not None else None),
                            "limits": SETTINGS.limits.model_dump()}}

    # Not a BentoML API (no route): /classify validates, then batches on its own
    # micro-batcher, which calls this method directly.
    def classify_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        """Internal: classify the texts of one micro-batch (tokenization included)."""
        with self.lock:
            results = self.runtime.classify(texts)
        return [{"label": r.label, "score": r.score, "scores": r.scores} for r in results]
