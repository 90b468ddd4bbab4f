"""Which engine delivery each token event came in: the engine's own order, whatever the
event loop's consumers do (a consumer drains a queue that holds several tokens without
yielding, so the times at which tests *read* tokens do not say when they were made)."""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from collections.abc import Iterator


@contextlib.contextmanager
def delivery_steps() -> Iterator[dict[int, list[int]]]:
    """Record, per sequence id, the numbers of the deliveries carrying its tokens."""
    from serve.engine import core

    steps: dict[int, list[int]] = defaultdict(list)
    counter = itertools.count()
    original = core._put_all

    def put_all(events) -> None:
        number = next(counter)
        for seq, event in events:
            if event.token is not None:
                steps[seq.id].append(number)
        original(events)

    core._put_all = put_all
    try:
        yield steps
    finally:
        core._put_all = original


def interleaved(steps: dict[int, list[int]], ids: list[int]) -> bool:
    """Every one of ``ids`` got its first token before any of them got its last."""
    return max(steps[i][0] for i in ids) < min(steps[i][-1] for i in ids)
