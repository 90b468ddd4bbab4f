"""Streamed OpenAI requests against a running server, timed per chunk (bench helpers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from bench.server import ServerProcess


async def stream(client: httpx.AsyncClient, url: str, route: str, body: dict) -> dict:
    """POST a ``stream: true`` request; its text, chunk arrival times and TTFT.

    Args:
        client: The HTTP client.
        url: Server base URL.
        route: ``/v1/chat/completions`` or ``/v1/completions``.
        body: The request body (``stream`` is set here; greedy unless it says otherwise).

    Returns:
        ``{"text", "times", "ttft_s", "sent"}`` (times are ``time.monotonic()`` values).
    """
    body = {"temperature": 0, **body, "stream": True}
    sent, times, parts = time.monotonic(), [], []
    async with client.stream("POST", url + route, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if piece:
                times.append(time.monotonic())
                parts.append(piece)
    return {"text": "".join(parts), "times": times, "sent": sent,
            "ttft_s": (times[0] - sent) if times else float("nan")}


def start(artifact: Path, work: Path, name: str, args: list[str]) -> ServerProcess:
    """Start ``modelpress serve`` (its log under ``work``) and wait until it is ready;
    prompts up to 8,192 tokens are taken whole (the default truncates past 512) and a
    request may wait 10 minutes for admission (a slow baseline is measured, not refused)."""
    server = ServerProcess(artifact, work / f"{name}.log",
                           ["--max-input-tokens", "8192", "--queue-timeout-s", "600", *args])
    try:
        server.wait_ready(300)
    except Exception:
        server.stop()
        raise
    return server
