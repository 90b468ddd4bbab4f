"""serve.engine.batcher.MicroBatcher on a real event loop and a real worker thread.

The batch function blocks on a ``threading.Event`` while the test queues requests, so
which requests share a batch is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.engine.batcher import MicroBatcher, Overloaded


class Model:
    """A batch function that records its batches and can be held busy."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        self.started.set()
        self.release.wait(10)
        if self.fail_on in texts:
            raise ValueError(f"cannot run {self.fail_on}")
        return [t.upper() for t in texts]


async def _hold_then_queue(batcher: MicroBatcher, model: Model,
                           requests: list[list[str]]) -> list:
    """Start one request, keep the model busy on it, queue ``requests``, release."""
    model.release.clear()
    model.started.clear()
    first = asyncio.ensure_future(batcher.submit(["first"]))
    await asyncio.to_thread(model.started.wait, 10)
    rest = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0)  # let every submit reach the queue
    model.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_requests_queued_while_the_model_ran_form_the_next_batches():
    model = Model()
    sizes: list[int] = []
    batcher = MicroBatcher(model, max_batch_size=4, max_latency_ms=60_000,
                           observe=sizes.append)
    requests = [[f"a{i}"] for i in range(6)] + [["b0", "b1"], ["c0"]]
    results = asyncio.run(_hold_then_queue(batcher, model, requests))
    assert results[0] == ["FIRST"]
    assert results[1:] == [[t.upper() for t in r] for r in requests]  # each its own
    # 9 texts after the first, at most 4 per batch, requests kept whole and in order
    assert model.batches == [["first"], ["a0", "a1", "a2", "a3"], ["a4", "a5", "b0", "b1"],
                             ["c0"]]
    assert sizes == [1, 4, 3, 1]  # requests per batch (the /metrics histogram)
    batcher.close()


def test_no_batching_runs_one_request_per_call():
    model = Model()
    sizes: list[int] = []
    batcher = MicroBatcher(model, max_batch_size=32, max_latency_ms=60_000, batching=False,
                           observe=sizes.append)
    requests = [["x", "y"], ["z"], ["w"]]
    results = asyncio.run(_hold_then_queue(batcher, model, requests))
    assert results == [["FIRST"], ["X", "Y"], ["Z"], ["W"]]
    assert model.batches == [["first"], ["x", "y"], ["z"], ["w"]]
    assert sizes == [1, 1, 1, 1]
    batcher.close()


def test_a_request_larger_than_max_batch_size_runs_alone():
    model = Model()
    batcher = MicroBatcher(model, max_batch_size=2, max_latency_ms=60_000)
    results = asyncio.run(_hold_then_queue(batcher, model, [["p"], ["q", "r", "s"], ["t"]]))
    assert results == [["FIRST"], ["P"], ["Q", "R", "S"], ["T"]]
    assert model.batches == [["first"], ["p"], ["q", "r", "s"], ["t"]]
    batcher.close()


def test_a_failing_request_fails_only_itself_not_its_batch():
    model = Model(fail_on="bad")
    batcher = MicroBatcher(model, max_batch_size=2, max_latency_ms=60_000)
    results = asyncio.run(_hold_then_queue(batcher, model, [["ok"], ["bad"], ["fine"]]))
    assert results[0] == ["FIRST"]
    assert results[1] == ["OK"]  # batch [ok, bad] failed: each request reran alone
    assert type(results[2]) is ValueError and "cannot run bad" in str(results[2])
    assert results[3] == ["FINE"]  # the next batch runs normally
    assert model.batches == [["first"], ["ok", "bad"], ["ok"], ["bad"], ["fine"]]

    async def again() -> list[str]:
        return await batcher.submit(["later"])
    assert asyncio.run(again()) == ["LATER"]  # a new event loop: the batcher follows it
    batcher.close()


def test_requests_queued_past_max_latency_are_refused():
    model = Model()
    batcher = MicroBatcher(model, max_batch_size=8, max_latency_ms=1)

    async def main() -> list:
        model.release.clear()
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.to_thread(model.started.wait, 10)
        late = asyncio.ensure_future(batcher.submit(["late"]))
        await asyncio.sleep(0.05)  # the model is held: "late" waits 50 ms > 1 ms
        model.release.set()
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(main())
    assert first == ["FIRST"]
    assert isinstance(late, Overloaded) and "max_latency_ms" in str(late)
    assert model.batches == [["first"]]  # the refused request never reached the model
    batcher.close()


def test_a_cancelled_request_is_dropped_from_the_queue():
    model = Model()
    batcher = MicroBatcher(model, max_batch_size=8, max_latency_ms=60_000)

    async def main() -> list:
        model.release.clear()
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.to_thread(model.started.wait, 10)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        return await asyncio.gather(first, kept)

    assert asyncio.run(main()) == [["FIRST"], ["KEPT"]]
    assert model.batches == [["first"], ["kept"]]
    batcher.close()


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda texts: texts, max_batch_size=0, max_latency_ms=10)
