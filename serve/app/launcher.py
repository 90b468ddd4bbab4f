"""Start and stop a real ``bentoml serve`` of :mod:`serve.app.service` as a subprocess.

Used by ``modelpress serve`` (foreground), the benchmark and the integration tests::

    handle = start_server("artifacts/merge", max_batch_size=32)   # free loopback port
    httpx.post(f"{handle.url}/classify", json={"texts": ["great"]})
    handle.stop()

The server runs in its own process group; :meth:`ServerHandle.stop` sends SIGTERM to the
server's PID, waits for it to exit, and only then kills what is left of that group.

Each server gets its own ``BENTOML_HOME`` (a temporary folder, removed when it stops):
``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, and
that folder is where every worker's metrics live, so two servers sharing it would wipe
and then mix each other's ``/metrics`` (issue 20). BentoML derives that folder from
``BENTOML_HOME`` only (``BentoMLContainer.prometheus_multiproc_dir``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from serve.app import start_failure
from serve.errors import ModelpressError
from serve.settings import ServeSettings, settings_from

log = logging.getLogger(__name__)

SERVICE = "serve.app.service:Modelpress"
ROOT = Path(__file__).resolve().parents[2]


class ServerStartError(ModelpressError):
    """The server exited or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_command(host: str, port: int) -> list[str]:
    """The ``bentoml serve`` command line for the service."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host,
            "--port", str(port), "--working-dir", str(ROOT)]


def server_home(port: int) -> Path:
    """A new, empty ``BENTOML_HOME`` for one server (its metrics store)."""
    return Path(tempfile.mkdtemp(prefix=f"modelpress-server-{port}-"))


def server_env(settings: ServeSettings, base: dict[str, str] | None = None,
               home: Path | None = None) -> dict[str, str]:
    """Environment for the server process: ``MODELPRESS_*`` settings, the server's own
    ``BENTOML_HOME`` (when ``home`` is given), tracking off."""
    env = dict(os.environ if base is None else base)
    env.update(settings.to_env())
    if home is not None:
        env["BENTOML_HOME"] = str(home)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


@dataclass
class ServerHandle:
    """A running server: its URL, PID and log file."""

    url: str
    pid: int
    port: int
    process: subprocess.Popen = field(repr=False)
    log_path: Path | None = None
    remove_log: bool = False
    home: Path | None = None

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server, wait for it, then kill leftovers of its process group.

        Returns:
            The server's exit code (None if it had to be killed).
        """
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("server %d did not stop in %.0f s; killing it", self.pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # its workers, if any survived it
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        if self.remove_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
        return code

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log (empty if it was not captured)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def startup_error(log_text: str) -> str:
    """The one line that says why a server failed to start (last error line of its log)."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for marker in ("ArtifactError:", "ModelpressError:", "Error:", "error:"):
        for line in reversed(lines):
            if marker in line:
                return line[line.index(marker) + len(marker):].strip() or line
    return lines[-1] if lines else "no output"


def spawn(settings: ServeSettings, host: str, port: int, stdout: IO | None = None,
          env: dict[str, str] | None = None, home: Path | None = None) -> subprocess.Popen:
    """Start ``bentoml serve`` in a new process group (does not wait for readiness).

    Args:
        home: The server's ``BENTOML_HOME`` (:func:`server_home`; the caller removes it).
    """
    cmd = serve_command(host, port)
    log.info("starting %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=server_env(settings, env, home), cwd=ROOT, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=True)


STARTUP_FAILED = "Application startup failed"


def wait_ready(process: subprocess.Popen, url: str, timeout: float,
               log_path: Path | None = None, failure_file: Path | None = None) -> None:
    """Poll ``/readyz`` until it answers 200.

    Args:
        process: The ``bentoml serve`` process.
        url: The server's base URL.
        timeout: Seconds to wait.
        log_path: The server's log, scanned for a worker's failed start-up.
        failure_file: The server's ``MODELPRESS_START_FAILURE_FILE``
            (:mod:`serve.app.start_failure`).

    Raises:
        ServerStartError: The process exited first, a worker failed to start (its line in
            ``failure_file``, or seen in ``log_path``; BentoML would keep restarting it),
            or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server exited with code {process.returncode}")
        reason = start_failure.read(failure_file)
        if reason is not None:
            raise ServerStartError(f"a server worker failed to start: {reason}")
        if log_path is not None and STARTUP_FAILED in log_path.read_text(errors="replace"):
            raise ServerStartError("a server worker failed to start")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServerStartError(f"server not ready after {timeout:.0f} s")


def start_server(artifact: Path | str, port: int | None = None, host: str = "127.0.0.1",
                 ready_timeout: float = 180.0, log_path: Path | None = None,
                 env: dict[str, str] | None = None, **opts: Any) -> ServerHandle:
    """Start the service for ``artifact`` and wait until it is ready.

    Args:
        artifact: Artifact folder.
        port: TCP port; a free one when None.
        host: Interface to bind (loopback by default).
        ready_timeout: Seconds to wait for ``/readyz``.
        log_path: File for the server's output (when None, a temp file that
            :meth:`ServerHandle.stop` deletes).
        env: Base environment (default: this process's).
        **opts: :class:`serve.settings.ServeSettings` fields (``batching``,
            ``max_batch_size``, ``max_concurrency``, ``max_kv_tokens``, ...).

    Raises:
        SettingsError: An unknown setting or a bad value (named), before anything starts.
        ServerStartError: The server failed to start; the message is its error line.
    """
    settings = settings_from({**opts, "artifact": str(Path(artifact).resolve())})
    port = port or free_port(host)
    temp_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="modelpress-serve-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    home = server_home(port)
    failure_file = home / start_failure.FILE_NAME
    with open(log_path, "wb") as out:
        process = spawn(settings, host, port, stdout=out,
                        env={**(os.environ if env is None else env),
                             start_failure.ENV: str(failure_file)}, home=home)
    handle = ServerHandle(url=f"http://{host}:{port}", pid=process.pid, port=port,
                          process=process, log_path=log_path, remove_log=temp_log, home=home)
    try:
        wait_ready(process, handle.url, ready_timeout, log_path, failure_file)
    except ServerStartError as exc:
        handle.remove_log = False  # kept for the user to read
        reason = start_failure.read(failure_file)  # before stop() removes the home folder
        handle.stop()
        detail = (f"{reason} (log: {log_path})" if reason is not None else
                  f"{startup_error(handle.log_tail(200))} ({exc}; log: {log_path})")
        raise ServerStartError(f"{artifact}: server failed to start: {detail}") from None
    return handle
