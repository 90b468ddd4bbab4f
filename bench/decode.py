"""The decode-bound load: what a chat user sees.

Prompts ask for long answers, every request asks for the same ``max_tokens`` (default
128), and the users stream OpenAI chat completions (``POST /v1/chat/completions``), so the
same Locust users load ``modelpress serve`` and any OpenAI-compatible peer (vLLM's server).
Each level reports aggregate output tok/s inside the measured window, TTFT and inter-token
latency percentiles, tokens per stream, and failures split into deliberate 503s and others.
Every stream in flight at the end of the window is allowed to finish (``stop_timeout_s``):
a level never cuts a stream off, and the tokens counted are those that arrived inside the
window (see ``bench/locustfile.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import LoadSpec, level_result, run_locust

log = logging.getLogger(__name__)

DECODE_MAX_TOKENS = 128
DRAIN_S = 240.0  # time a level's last streams get to finish after the window
# Open-ended requests a small instruct model answers at length: with max_tokens 128 almost
# every stream runs to the limit, so the load is decode-bound rather than prompt-bound.
LONG_ANSWER_PROMPTS = [
    "Write a detailed essay about the history of the printing press and its effects on "
    "science, religion and politics in Europe.",
    "Explain step by step how to bake a loaf of sourdough bread at home, from feeding the "
    "starter to cooling the loaf.",
    "Describe in detail how a bill becomes a law, with every stage and who is involved.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how the human immune system fights a viral infection, in as much detail as "
    "you can.",
    "Write a complete guide for a beginner who wants to start running, week by week.",
    "Describe the water cycle in detail and explain how it affects the weather.",
    "Compare the economies of ancient Rome and ancient China at length.",
    "Explain how a computer runs a program, from the source code to the transistors.",
    "Write a long letter to a friend describing a trip through the mountains.",
    "Describe how to plan, plant and care for a vegetable garden through a whole year.",
    "Explain the causes and consequences of the French Revolution in detail.",
    "Write a detailed product review of a bicycle you have ridden for a year.",
    "Explain in detail how airplanes fly, covering lift, thrust, drag and weight.",
    "Describe a day in the life of a medieval blacksmith, hour by hour.",
    "Write a thorough explanation of how vaccines are developed and tested.",
]


def write_prompts(path: Path) -> Path:
    """Write the long-answer prompts as the ``{"text": ...}`` JSONL the locustfile replays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in LONG_ANSWER_PROMPTS))
    return path


def served_model(url: str) -> str | None:
    """The first model id of ``GET /v1/models`` (vLLM wants it in every request)."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=10)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        log.warning("%s/v1/models: %s; sending no model name", url, exc)
        return None


def decode_specs(users: list[int], duration_s: float, model: str | None,
                 extra_body: dict[str, Any] | None = None) -> list[LoadSpec]:
    """Closed-loop chat levels, one per stream count."""
    return [LoadSpec("closed", u, duration_s, profile="chat", stop_timeout_s=DRAIN_S,
                     model=model, extra_body=extra_body) for u in users]


def run_decode(url: str, users: list[int], duration_s: float, work: Path,
               max_tokens: int = DECODE_MAX_TOKENS, repeats: int = 1,
               warmup_s: float = 0.0, extra_body: dict[str, Any] | None = None,
               progress: Callable[[str, int], None] | None = None) -> list[dict[str, Any]]:
    """Run the decode-bound levels against a running server.

    Args:
        url: Base URL of an OpenAI-compatible server.
        users: Concurrent streams per level (closed loop).
        duration_s: Measured window per level and repeat.
        work: Folder for the prompts, Locust stats and logs.
        max_tokens: ``max_tokens`` of every request.
        repeats: Runs per level.
        warmup_s: One-stream warm-up before the first level (not counted).
        extra_body: Fields added to every request (a server's own options).
        progress: Called with a message and the number of runs just finished.

    Returns:
        One level dict per stream count (the ``loads`` schema of ``bench/run.py``, plus
        ``outcomes``, ``failures_503``, ``failures_other``, ``tokens_per_request`` and
        ``output_tokens_per_s``).
    """
    progress = progress or (lambda message, steps: log.info(message))
    prompts = write_prompts(work / "decode-prompts.jsonl")
    model = served_model(url)
    if warmup_s > 0:
        run_locust(LoadSpec("closed", 1, warmup_s, profile="chat", stop_timeout_s=DRAIN_S,
                            model=model, extra_body=extra_body), url, prompts,
                   "text-generation", work / "warmup", max_tokens)
    levels = []
    for spec in decode_specs(users, duration_s, model, extra_body):
        runs = []
        for i in range(repeats):
            progress(f"decode {spec.label}, run {i + 1}/{repeats}", 0)
            runs.append(run_locust(spec, url, prompts, "text-generation", work / "decode",
                                   max_tokens))
            progress(f"decode {spec.label}, run {i + 1}/{repeats}", 1)
        levels.append({**level_result(spec, runs), "max_tokens": max_tokens})
    return levels
