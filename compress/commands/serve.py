"""`modelpress serve ARTIFACT`: a real ``bentoml serve`` of serve.app.service, in the foreground."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from serve.errors import ModelpressError


def command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder to serve.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    max_batch_size: Annotated[int, typer.Option(
        help="Adaptive batching: largest batch (texts/prompts).")] = 32,
    max_latency_ms: Annotated[int, typer.Option(
        help="Adaptive batching: latency budget of a queued request (503 past it).")] = 10_000,
    no_batching: Annotated[bool, typer.Option(
        "--no-batching", help="Run each request alone (baseline).")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (each loads the model).")] = 1,
    max_concurrency: Annotated[int, typer.Option(
        help="Requests in flight before answering 429.")] = 64,
    max_items: Annotated[int, typer.Option(help="Texts/prompts per request.")] = 64,
    max_input_tokens: Annotated[int, typer.Option(help="Tokens per text/prompt.")] = 512,
    long_input: Annotated[str, typer.Option(
        help="Inputs over --max-input-tokens: truncate or reject.")] = "truncate",
    max_new_tokens: Annotated[int, typer.Option(
        help="Cap on max_new_tokens / max_tokens.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(
        help="Request body size (413 past it).")] = 1_048_576,
    body_timeout_s: Annotated[float, typer.Option(
        help="Longest time to receive a request body (408 past it; slow clients hold "
             "no slot meanwhile).")] = 30.0,
    max_running: Annotated[int, typer.Option(
        help="Generation: sequences decoded together per engine step.")] = 32,
    max_kv_tokens: Annotated[int, typer.Option(
        help="Generation: KV budget in tokens (running sequences' prompt and generated "
             "tokens, plus the prefix cache); it grows per token, preempting the latest "
             "sequence when full.")] = 65_536,
    max_waiting: Annotated[int, typer.Option(
        help="Generation: requests waiting for admission before 503s.")] = 256,
    queue_timeout_s: Annotated[float, typer.Option(
        help="Generation: longest wait for admission (503 with Retry-After).")] = 30.0,
    max_num_batched_tokens: Annotated[int, typer.Option(
        help="Generation: tokens per engine step (one per decoding stream plus prompt "
             "chunks): long prompts are prefilled in chunks between decode steps.")] = 2048,
    max_prefill_tokens: Annotated[int | None, typer.Option(
        help="Deprecated: prompt tokens per engine step alone (replaces "
             "--max-num-batched-tokens when given).", show_default=False)] = None,
    prefix_cache: Annotated[bool, typer.Option(
        help="Generation: reuse the KV of prompt prefixes shared across requests.")] = True,
    header_timeout_s: Annotated[float, typer.Option(
        help="Longest time for a request's headers to arrive (the connection is closed "
             "past it).")] = 10.0,
    keep_alive_timeout_s: Annotated[float, typer.Option(
        help="Close a connection idle this long between requests.")] = 5.0,
    max_connections: Annotated[int, typer.Option(
        help="Open connections per worker; more get 503 (lowered to the open-file "
             "limit less 256).")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    api_key: Annotated[str, typer.Option(
        envvar="MODELPRESS_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on every route but /readyz, /livez, "
             "/healthz and /metrics (prefer the environment variable: a command line is "
             "visible to other users).")] = "",
) -> None:
    """Serve an artifact over HTTP (BentoML, adaptive batching) until Ctrl+C / SIGTERM."""
    from pydantic import ValidationError
    from rich.console import Console

    from serve.api.schemas import Limits, ServeSettings
    from serve.app import start_failure
    from serve.app.launcher import ServerHandle, server_home, spawn
    from serve.artifact import load_artifact

    console = Console(stderr=True)
    manifest = load_artifact(artifact).manifest  # hashes verified: a bad artifact stops here
    try:
        settings = ServeSettings(
            artifact=str(artifact.resolve()), device=device, batching=not no_batching,
            max_batch_size=max_batch_size, max_latency_ms=max_latency_ms, workers=workers,
            access_log=access_log, max_running=max_running, max_kv_tokens=max_kv_tokens,
            max_waiting=max_waiting, queue_timeout_s=queue_timeout_s, api_key=api_key,
            max_num_batched_tokens=max_num_batched_tokens, prefix_cache=prefix_cache,
            max_prefill_tokens=max_prefill_tokens, header_timeout_s=header_timeout_s,
            keep_alive_timeout_s=keep_alive_timeout_s, max_connections=max_connections,
            limits=Limits(max_items=max_items, max_input_tokens=max_input_tokens,
                          long_input=long_input, max_new_tokens=max_new_tokens,
                          max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
                          body_timeout_s=body_timeout_s))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ModelpressError(f"--{str(err['loc'][-1]).replace('_', '-')}: "
                              f"{err['msg']}") from None
    home = server_home(port)  # its own metrics store
    failure_file = home / start_failure.FILE_NAME
    process = spawn(settings, host, port,
                    env={**os.environ, start_failure.ENV: str(failure_file)}, home=home)
    stopping: list[Literal[True]] = []
    failure: str | None = None

    def forward(signum: int, frame: object) -> None:
        stopping.append(True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        batching = (f"adaptive batching max_batch_size={max_batch_size} "
                    f"max_latency_ms={max_latency_ms}" if not no_batching else "no batching")
        console.print(f"serving {manifest.name} ({manifest.task}, {manifest.format}/"
                      f"{manifest.precision}) at http://{host}:{port} — {batching}"
                      f"{', API key required' if api_key else ''}, "
                      f"pid {process.pid}; Ctrl+C to stop", highlight=False)
        while process.poll() is None and failure is None:
            failure = start_failure.read(failure_file)
            time.sleep(0.2)
        code = process.returncode
    finally:
        # SIGTERM, wait, kill what is left of its process group (the workers), remove home
        ServerHandle(url="", pid=process.pid, port=port, process=process,
                     home=home).stop(timeout=30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure is not None:
        raise ModelpressError(f"the server worker cannot load {artifact} (server stopped, "
                              f"not restarted): {failure}")
    if stopping:
        console.print("server stopped", highlight=False)
        return
    if code != 0:
        raise ModelpressError(f"the server exited with code {code}; see its output above")
