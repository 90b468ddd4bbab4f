"""THE MEASURING STICK for ``make bench-serve`` — not a server to deploy.

The leanest classifier server worth comparing against: bare uvicorn, one raw ASGI
callable, ``json.loads`` of the body, and a greedy asyncio micro-batcher (every request
that queued while the model ran becomes the next batch, up to ``max_batch_size`` texts,
one thread hop per batch) calling the same runtime as ``modelpress serve``
(:func:`serve.runtime.loader.load_runtime`, same ONNX Runtime session options). It has none of
the served product's validation, limits, error bodies, metrics, tracing or lifecycle;
served modelpress is measured as a fraction of its requests/s on the same artifact,
machine and load (:mod:`bench.serve_capacity`).

Run::

    python -m bench.reference_server ARTIFACT --port 8100 [--max-batch-size 32]

Endpoints: ``POST /classify`` (``{"texts": [...]}`` → ``{"results": [{label, score,
scores: null}]}``, the served response's shape) and ``GET /readyz``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ReferenceApp:
    """The raw ASGI app: ``/classify`` batched greedily, ``/readyz``."""

    def __init__(self, artifact: Path, max_batch_size: int) -> None:
        from serve.runtime.loader import load_runtime

        self.runtime = load_runtime(artifact, device="cpu")
        self.max_batch_size = max_batch_size
        self.queue: deque[tuple[list[str], asyncio.Future]] = deque()
        self.wake: asyncio.Event | None = None
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.batches = self.requests = 0

    def run_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        """Classify one batch (tokenization included), in the model thread."""
        return [{"label": r.label, "score": r.score, "scores": None}
                for r in self.runtime.classify(texts)]

    async def batch_loop(self) -> None:
        """Run whatever queued while the model was busy as the next batch."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            batch, size = [], 0
            while self.queue and (not batch or size + len(self.queue[0][0])
                                  <= self.max_batch_size):
                batch.append(self.queue.popleft())
                size += len(batch[-1][0])
            self.batches += 1
            self.requests += len(batch)
            texts = [t for item, _ in batch for t in item]
            try:
                rows = await loop.run_in_executor(self.executor, self.run_batch, texts)
            except Exception as exc:
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            start = 0
            for item, fut in batch:
                fut.set_result(rows[start:start + len(item)])
                start += len(item)

    async def classify(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Queue one request's texts and wait for their batch."""
        try:
            texts = json.loads(body)["texts"]
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "body: expected {\"texts\": [...]}"}
        if self.wake is None:
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self.batch_loop())
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((texts, fut))
        self.wake.set()
        return 200, {"results": await fut}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/classify" and scope["method"] == "POST":
            status, answer = await self.classify(body)
        elif scope["path"] == "/readyz":
            status, answer = 200, {"batches": self.batches, "requests": self.requests}
        else:
            status, answer = 404, {"error": "not found"}
        payload = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def main(argv: list[str] | None = None) -> None:
    """Serve ARTIFACT on 127.0.0.1 until SIGINT/SIGTERM."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = ReferenceApp(args.artifact, args.max_batch_size)
    gc.collect()
    gc.freeze()  # as the served worker does after loading (same process-level setting)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, server_header=False)


if __name__ == "__main__":
    main()
