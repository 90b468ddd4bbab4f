"""`modelpress serve ARTIFACT`: a real ``bentoml serve`` of serve.app.service, in the foreground."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from serve.errors import ModelpressError
from serve.settings import option_name, settings_from, with_cli_options


@with_cli_options  # one option per serve.settings.ServeSettings field
def command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder to serve.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    **options: Any,
) -> None:
    """Serve an artifact over HTTP (BentoML, adaptive batching) until Ctrl+C / SIGTERM."""
    from rich.console import Console

    from serve.app import start_failure
    from serve.app.launcher import ServerHandle, server_home, spawn
    from serve.artifact import load_artifact
    from serve.runtime.loader import check_format

    settings = settings_from({**options, "artifact": str(artifact.resolve())}, option_name)
    console = Console(stderr=True)
    manifest = load_artifact(artifact).manifest  # hashes verified: a bad artifact stops here
    check_format(manifest.format, artifact)
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
        batching = (f"adaptive batching max_batch_size={settings.max_batch_size} "
                    f"max_latency_ms={settings.max_latency_ms}" if settings.batching
                    else "no batching")
        console.print(f"serving {manifest.name} ({manifest.task}, {manifest.format}/"
                      f"{manifest.precision}) at http://{host}:{port} — {batching}"
                      f"{', API key required' if settings.api_key else ''}, "
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
