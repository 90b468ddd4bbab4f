"""An asyncio micro-batcher: one model call for every request that queued meanwhile.

The service's public routes hand their work to a :class:`MicroBatcher` instead of
BentoML's batching dispatcher. It needs no timer and no latency model: while the model
runs a batch (in one worker thread, so the event loop keeps reading requests), new
requests queue; as soon as the model is free, everything queued — up to
``max_batch_size`` items — becomes the next batch. Under light load a request runs at
once, alone; under heavy load batches grow by themselves. One thread hop per batch, not
per request, and the batch function does the tokenization itself.

``max_latency_ms`` keeps BentoML's meaning: a request that waited longer than that for
the model is refused (:class:`Overloaded`, answered 503) rather than run late.

With ``batching=False`` every request is a batch of its own (the ``--no-batching``
baseline), through the same queue and thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from serve.errors import ModelpressError

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Overloaded(ModelpressError):
    """A request waited longer than ``max_latency_ms`` for the model."""


@dataclass
class _Pending(Generic[Item, Result]):
    items: Sequence[Item]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Item, Result]):
    """Batches concurrent requests into one call of ``run`` per batch.

    Args:
        run: The batch function, called in a worker thread with the items of every
            request of the batch, concatenated; returns one result per item, in order.
        max_batch_size: Most items in one batch. A single request with more items runs
            alone (``run`` splits it as the model needs).
        max_latency_ms: A request still queued after this long is refused (503).
        batching: False: one request per call of ``run`` (the no-batching baseline).
        observe: Called on the event loop with the number of requests in each batch
            (the batch-size histogram of ``/metrics``).
        name: Names the worker thread and log lines.
    """

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], max_batch_size: int,
                 max_latency_ms: float, batching: bool = True,
                 observe: Callable[[int], None] | None = None, name: str = "batch") -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.batching = batching
        self.observe = observe
        self.name = name
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Queue one request's items; return their results once their batch ran.

        Raises:
            Overloaded: The request waited more than ``max_latency_ms`` for the model.
            Exception: Whatever ``run`` raised for the batch holding this request.
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name=f"{self.name}-loop")
        pending: _Pending[Item, Result] = _Pending(items, loop.create_future())
        self._queue.append(pending)
        self._wake.set()
        return await pending.future

    def _take(self) -> list[_Pending[Item, Result]]:
        """The next batch: queued requests in order, up to ``max_batch_size`` items."""
        batch: list[_Pending[Item, Result]] = []
        size = 0
        deadline = time.monotonic() - self.max_latency_s
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # its caller was cancelled
                self._queue.popleft()
                continue
            if head.queued_at < deadline:
                self._queue.popleft()
                head.future.set_exception(Overloaded(
                    f"not scheduled within max_latency_ms ({self.max_latency_s * 1000:.0f})"))
                continue
            if batch and (size + len(head.items) > self.max_batch_size or not self.batching):
                break
            batch.append(self._queue.popleft())
            size += len(head.items)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            if self.observe is not None:
                self.observe(len(batch))
            flat = [item for p in batch for item in p.items]
            try:
                results = await loop.run_in_executor(self._executor, self.run, flat)
                if len(results) != len(flat):
                    raise RuntimeError(f"{self.name}: {len(results)} results for "
                                       f"{len(flat)} items")
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                else:  # one request's failure must not fail the others: rerun each alone
                    log.warning("%s: a batch of %d requests failed (%s); running each alone",
                                self.name, len(batch), exc)
                    for p in batch:
                        await self._run_alone(p)
                continue
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(list(results[start:start + len(p.items)]))
                start += len(p.items)

    async def _run_alone(self, pending: _Pending[Item, Result]) -> None:
        if pending.future.done():
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.run,
                                                 list(pending.items))
            if len(results) != len(pending.items):
                raise RuntimeError(f"{self.name}: {len(results)} results for "
                                   f"{len(pending.items)} items")
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(list(results))

    def close(self) -> None:
        """Stop the batching task and the worker thread (queued requests are cancelled)."""
        if self._task is not None:
            self._task.cancel()
        while self._queue:
            self._queue.popleft().future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


BATCH_SIZE_METRIC = "bentoml_service_adaptive_batch_size"


def batch_size_observer(method: str, max_batch_size: int,
                        service: str = "modelpress") -> Callable[[int], None]:
    """Record requests per batch in ``/metrics`` as BentoML's adaptive-batching histogram.

    Same name, labels and power-of-two buckets as the histogram BentoML's own dispatcher
    keeps (``bentoml_service_adaptive_batch_size{method_name=...}``: requests per batch),
    so dashboards and the integration tests read it unchanged. It is created with
    ``prometheus_client`` directly, as BentoML documents for user metrics, and registered
    in no registry: in a BentoML worker ``PROMETHEUS_MULTIPROC_DIR`` is set, the values go
    to the multiprocess files and BentoML's ``/metrics`` collects them from there. Call
    this in the worker (service ``__init__``), not at import time.

    Args:
        method: The ``method_name`` label (the batch function's API name).
        max_batch_size: Largest batch; buckets are 1, 2, 4, ... up to it, then +Inf.
        service: The ``runner_name`` label.
    """
    import bentoml
    from prometheus_client import Histogram

    buckets, bound = [], 1.0
    while bound < max_batch_size:
        buckets.append(bound)
        bound *= 2
    buckets += [float(max_batch_size), float("inf")]
    ctx = bentoml.server_context
    histogram = Histogram(BATCH_SIZE_METRIC, "Service adaptive batch size",
                          labelnames=["runner_name", "worker_index", "method_name",
                                      "service_version", "service_name"],
                          buckets=buckets, registry=None)
    return histogram.labels(runner_name=service, worker_index=ctx.worker_index,
                            method_name=method, service_version=ctx.bento_version,
                            service_name=ctx.bento_name or service).observe
