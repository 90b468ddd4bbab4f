"""The BentoML service that serves one artifact.

Start it with ``modelpress serve ARTIFACT`` or directly::

    MODELPRESS_ARTIFACT=artifacts/merge bentoml serve serve.service:Modelpress

Settings come from ``MODELPRESS_*`` environment variables (see
:class:`serve.schemas.ServeSettings`), read when this module is imported, because
BentoML fixes a service's batching and worker settings at decoration time.

Layout: the public routes (``/classify``, ``/generate``, ``/metadata`` and the
OpenAI-compatible ``/v1/...``) are a Starlette app mounted on the service; they validate
input and then call the two batchable APIs below (``classify_batch``, ``generate_batch``)
through BentoML's own batching dispatcher (see ``serve.http_api.Backend``), so every
request goes through BentoML adaptive batching (``max_batch_size``/``max_latency_ms``)
and its batch sizes appear in ``/metrics`` as ``bentoml_service_adaptive_batch_size``.
BentoML's ``/readyz``, ``/livez`` and ``/metrics`` stay as they are.

This module imports no deep-learning framework: the runtime chosen by
:func:`serve.runtimes.load_runtime` imports its own when the service starts.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import defaultdict
from typing import Any

import bentoml
from starlette.applications import Starlette

from serve.artifact import load_artifact
from serve.engine import Engine, EngineConfig
from serve.errors import ModelpressError
from serve.http_api import Backend, build_routes, to_params
from serve.openai_api import build_openai_routes
from serve.runtimes import UnsupportedRequest, load_runtime
from serve.schemas import GenerateItem, ServeSettings

log = logging.getLogger(__name__)

SETTINGS = ServeSettings.from_env()
if SETTINGS.artifact:
    # Verify hashes on import, so `bentoml serve` (which imports this module before it
    # starts workers) stops at once with one line instead of restarting failing workers.
    try:
        load_artifact(SETTINGS.artifact, verify=True)
    except ModelpressError as exc:
        raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
_BATCHING: dict[str, Any] = {"batchable": SETTINGS.batching,
                             "max_batch_size": SETTINGS.max_batch_size,
                             "max_latency_ms": SETTINGS.max_latency_ms}


def start_engine(runtime: Any, settings: ServeSettings) -> Engine:
    """The continuous-batching engine over ``runtime``'s step-level model."""
    config = EngineConfig(max_running=settings.max_running,
                          max_kv_tokens=settings.max_kv_tokens,
                          max_waiting=settings.max_waiting,
                          queue_timeout_s=settings.queue_timeout_s)
    engine = Engine(runtime.step_lm(), set(runtime.eos_ids), config)
    log.info("generation engine: max_running=%d max_kv_tokens=%d max_waiting=%d "
             "queue_timeout_s=%g", config.max_running, config.max_kv_tokens,
             config.max_waiting, config.queue_timeout_s)
    return engine


class _State:
    backend: Backend | None = None


_STATE = _State()


def _backend() -> Backend:
    if _STATE.backend is None:  # routes are only reachable after start-up
        raise ModelpressError("service is not initialised yet")
    return _STATE.backend


http_app = Starlette(routes=[*build_routes(_backend), *build_openai_routes(_backend)])


@bentoml.service(
    name="modelpress",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    # The routes reach the batchable APIs through BentoML's in-process client, whose
    # session is by default recycled every 100 requests / 300 s while other requests are
    # still in flight on it (they fail): keep one session for the worker's lifetime.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(http_app, path="/")
class Modelpress:
    """Serves the artifact named by ``MODELPRESS_ARTIFACT`` (hashes verified at start)."""

    def __init__(self) -> None:
        if not SETTINGS.artifact:
            raise ModelpressError("MODELPRESS_ARTIFACT is not set: point it at an artifact "
                                  "folder (or use `modelpress serve ARTIFACT`)")
        # hashes were verified when this process imported the module
        self.runtime = load_runtime(SETTINGS.artifact, device=SETTINGS.device, verify=False)
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.detokenizer: Any = None
        if self.runtime.manifest.task == "text-generation" and hasattr(self.runtime, "step_lm"):
            self.engine = start_engine(self.runtime, SETTINGS)
            self.detokenizer = copy.deepcopy(self.runtime.tokenizer)  # event loop's own
        _STATE.backend = Backend(self, SETTINGS.limits, SETTINGS.workers)
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
                            "limits": SETTINGS.limits.model_dump()}}

    @bentoml.api(route="/_batch/classify", **_BATCHING)
    def classify_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        """Internal: classify the texts of one adaptive batch (called by ``/classify``)."""
        with self.lock:
            results = self.runtime.classify(texts)
        return [{"label": r.label, "score": r.score, "scores": r.scores} for r in results]

    @bentoml.api(route="/_batch/generate", **_BATCHING)
    def generate_batch(self, items: list[GenerateItem]) -> list[dict[str, Any]]:
        """Internal: complete the prompts of one adaptive batch.

        Items with the same decoding settings run as one left-padded batch. An item the
        runtime refuses (``UnsupportedRequest``, e.g. no room in the context) gets
        ``{"error": message}`` without failing the other requests of the batch.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.params_key()].append(i)
        out: list[dict[str, Any]] = [{}] * len(items)
        with self.lock:
            for indices in groups.values():
                params = to_params(items[indices[0]])
                prompts = [items[i].prompt for i in indices]
                try:
                    done = dict(zip(indices, self.runtime.generate(prompts, params),
                                    strict=True))
                except UnsupportedRequest:  # run them alone: only the refused ones fail
                    done = {}
                    for i in indices:
                        try:
                            [done[i]] = self.runtime.generate([items[i].prompt], params)
                        except UnsupportedRequest as exc:
                            out[i] = {"error": str(exc)}
                for i, g in done.items():
                    out[i] = {"text": g.text, "prompt_tokens": g.prompt_tokens,
                              "completion_tokens": g.completion_tokens,
                              "finish_reason": g.finish_reason}
        return out
