"""Stop sequences over generated text: the one implementation every path uses.

:func:`finish_generation` cuts a finished generation (the offline ``generate`` of every
runtime); :func:`stop_index` and :func:`safe_prefix` let a stream
(:class:`serve.engine.completion.Completion`) hold back only the text that could still
become a stop sequence.
"""

from __future__ import annotations

from typing import Any

from serve.runtime.protocol import GenerationParams


def stop_index(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop sequence in ``text`` found from ``start``, or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def safe_prefix(text: str, stops: list[str]) -> int:
    """Length of the prefix of ``text`` that cannot be the start of a stop sequence."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return keep


def finish_generation(tokenizer: Any, eos: set[int], ids: list[int],
                      params: GenerationParams) -> tuple[str, int, str]:
    """Cut generated ids at EOS / a stop sequence; return (text, tokens, finish reason).

    Shared by every runtime that decodes token ids itself (torch, onnxruntime-genai).
    """
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    reason = "stop" if end is not None else "length"
    ids = ids if end is None else ids[:end]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = stop_index(text, params.stop)
    if cut is None:
        return text, len(ids), reason
    # tokens actually generated: the shortest prefix whose text holds the stop.
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_index(tokenizer.decode(ids[:mid], skip_special_tokens=True),
                       params.stop) is None:
            lo = mid + 1
        else:
            hi = mid
    return text[:cut], lo, "stop"
