"""Structured outputs against ``modelpress serve``: validity and cost of the grammar.

For each artifact a server is started (and stopped) by PID, then

1. validity: ``--requests`` chat requests with ``response_format: json_schema``
   (:data:`SCHEMA`) and room to finish (``--max-tokens``), through ``--streams``
   closed-loop clients; every answer is parsed and validated with ``jsonschema``;
2. cost: rounds alternate an unconstrained and a constrained phase of
   ``--speed-requests`` requests each, same prompts (which also ask for a long story),
   greedy, at ``--streams`` streams, with ``max_tokens`` (``--speed-tokens``) below the
   JSON's length, so both phases
   generate the same number of tokens per request and their aggregate tok/s (completion
   tokens over wall time) compares the per-token cost alone. The validity phase's own
   tok/s, with answers of their natural lengths, is reported beside it.

Run::

    python -m bench.structured_outputs build/bench/artifacts-smollm2/genai-int4 \\
        build/bench/artifacts-smollm2/int4-gguf --out build/bench/structured.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

# Nested objects, enums, arrays and required fields; bounded strings and arrays so that
# every answer can end within max_tokens.
SCHEMA: dict = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "JP"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "address", "tags", "active"],
    "additionalProperties": False,
}

FORMAT = {"type": "json_schema",
          "json_schema": {"name": "profile", "schema": SCHEMA, "strict": True}}
CITIES = ["Paris", "Berlin", "Boston", "Osaka", "Lyon", "Munich", "Denver", "Kyoto"]


def _body(i: int, max_tokens: int, constrained: bool, long: bool = False
          ) -> dict[str, Any]:
    """Chat request ``i``; ``long`` asks for more than the JSON (so that a free answer
    does not end before ``max_tokens`` either)."""
    ask = f"Make up user number {i}, who lives in {CITIES[i % len(CITIES)]}."
    if long:
        ask += " Then tell a long story about their week, day by day."
    messages = [
        {"role": "system", "content": "You answer with one JSON object describing a user: "
                                      "name, role (admin, editor or viewer), age, address "
                                      "(city, country code), tags, active."},
        {"role": "user", "content": ask}]
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens,
                            "temperature": 0}
    if constrained:
        body["response_format"] = FORMAT
    return body


async def phase(url: str, requests: int, streams: int, max_tokens: int,
                constrained: bool, validate: bool = False, long: bool = False
                ) -> dict[str, Any]:
    """``requests`` chat requests through ``streams`` closed-loop clients; with
    ``validate``, every answer is parsed and checked against :data:`SCHEMA`."""
    import jsonschema

    todo = iter(range(requests))
    answers: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:
            r = await client.post(f"{url}/v1/chat/completions",
                                  json=_body(i, max_tokens, constrained, long))
            r.raise_for_status()
            answers.append(r.json())

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(streams)))
        wall = time.perf_counter() - start
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    out: dict[str, Any] = {"constrained": constrained, "requests": len(answers),
                           "completion_tokens": tokens, "wall_s": round(wall, 2),
                           "tok_per_s": round(tokens / wall, 1)}
    reasons = [a["choices"][0]["finish_reason"] for a in answers]
    out["finish_reasons"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    if validate:
        valid = 0
        for a in answers:
            try:
                jsonschema.validate(json.loads(a["choices"][0]["message"]["content"]),
                                    SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                log.warning("invalid answer (%s): %r", exc,
                            a["choices"][0]["message"]["content"][:200])
        out["valid"] = valid
        out["example"] = answers[0]["choices"][0]["message"]["content"]
    return out


def run_artifact(artifact: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start a server for ``artifact``, run the validity phase and the alternating
    cost phases, stop it."""
    from bench.server import ServerProcess

    log_path = Path(tempfile.mkdtemp(prefix="mp-structured-")) / "server.log"
    server = ServerProcess(artifact, log_path)
    try:
        server.wait_ready(300)
        asyncio.run(phase(server.url, 2, 2, 16, True))  # warm-up (grammar tokenizer)
        asyncio.run(phase(server.url, 2, 2, 16, False))
        validity = asyncio.run(phase(server.url, args.requests, args.streams,
                                     args.max_tokens, True, validate=True))
        log.info("%s validity: %s", artifact.name, json.dumps(validity))
        natural = asyncio.run(phase(server.url, args.requests, args.streams,
                                    args.max_tokens, False))
        log.info("%s natural lengths, free: %s", artifact.name, json.dumps(natural))
        phases = []
        for _ in range(args.rounds):
            for constrained in (False, True):
                result = asyncio.run(phase(server.url, args.speed_requests, args.streams,
                                           args.speed_tokens, constrained, long=True))
                log.info("%s cost: %s", artifact.name, json.dumps(result))
                phases.append(result)
    finally:
        server.stop()
    free = statistics.median(p["tok_per_s"] for p in phases if not p["constrained"])
    bound = statistics.median(p["tok_per_s"] for p in phases if p["constrained"])
    return {"artifact": str(artifact), "streams": args.streams, "validity": validity,
            "natural_free": natural,
            "natural_ratio": round(validity["tok_per_s"] / natural["tok_per_s"], 3),
            "cost_phases": phases, "tok_per_s_free_median": free,
            "tok_per_s_constrained_median": bound, "ratio": round(bound / free, 3)}


def main(argv: list[str] | None = None) -> None:
    """Measure every artifact given; print (and write with ``--out``) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--speed-requests", type=int, default=24)
    parser.add_argument("--speed-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results = [run_artifact(a, args) for a in args.artifacts]
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for r in results:
        log.info("%s: %d/%d valid; tok/s free %.1f, constrained %.1f (ratio %.3f; "
                 "natural lengths %.3f)", Path(r["artifact"]).name, r["validity"]["valid"],
                 r["validity"]["requests"], r["tok_per_s_free_median"],
                 r["tok_per_s_constrained_median"], r["ratio"], r["natural_ratio"])


if __name__ == "__main__":
    main()
