"""Start ``modelpress serve`` for one artifact, watch its memory, stop it by PID.

The server runs as a subprocess on a free 127.0.0.1 port; readiness is BentoML's
``/readyz``. Peak RSS is sampled over the server's whole process tree (``modelpress
serve`` → ``bentoml serve`` → its API-server workers) by a background thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from serve.errors import ModelpressError

log = logging.getLogger(__name__)


class ServerError(ModelpressError):
    """The server exited or did not become ready; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval_s``; keeps the peak, and
    with ``keep_samples`` every ``(time.monotonic(), bytes)`` sample (for soak runs)."""

    def __init__(self, pid: int, interval_s: float = 0.2, keep_samples: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak_bytes = pid, interval_s, 0
        self.keep_samples = keep_samples
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while not self._stop_event.is_set():
            total = 0
            for proc in _tree(self.pid):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += proc.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, total)
            if self.keep_samples and total:
                self.samples.append((time.monotonic(), total))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes


class ServerProcess:
    """A running ``modelpress serve`` subprocess.

    Attributes:
        url: Base URL, ``http://127.0.0.1:PORT``.
        pid: PID of the ``modelpress serve`` process.
        log_path: File receiving the server's stdout and stderr.
        command: The command line the server was started with.
        ready_path: Path that answers 200 once the server is ready.
    """

    ready_path = "/readyz"

    def __init__(self, artifact: Path, log_path: Path, extra_args: list[str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-c", "from compress.cli import main; main()", "serve",
               str(artifact), "--host", "127.0.0.1", "--port", str(self.port),
               *(extra_args or [])]
        self._start(cmd, log_path, {"BENTOML_DO_NOT_TRACK": "true"})

    def _start(self, cmd: list[str], log_path: Path, env_extra: dict[str, str]) -> None:
        """Start ``cmd`` (which must listen on ``self.port``), its output to ``log_path``."""
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.command = log_path, cmd
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 — closed in stop()
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      cwd=Path(__file__).resolve().parents[1])
        self.pid = self._proc.pid
        self._known: dict[int, psutil.Process] = {}

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        """Whether the ``modelpress serve`` process is still running."""
        return self._proc.poll() is None

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Poll :attr:`ready_path` until it answers 200.

        Returns:
            Seconds until ready.

        Raises:
            ServerError: The process exited or ``timeout_s`` passed (with the log tail).
        """
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if not self.alive():
                raise ServerError(f"server exited with code {self._proc.returncode} before "
                                  f"ready: {self.log_tail(1)} (log {self.log_path})\n"
                                  f"{self.log_tail()}")
            self._remember_tree()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return time.monotonic() - start
            time.sleep(0.5)
        raise ServerError(f"server not ready after {timeout_s:.0f} s: {self.log_tail(1)} "
                          f"(log {self.log_path})\n{self.log_tail()}")

    def _remember_tree(self) -> None:
        for proc in _tree(self.pid):
            self._known.setdefault(proc.pid, proc)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server, wait, then SIGKILL it and any of its children left over.

        Only processes of this server's tree (seen while it ran) are signalled, by PID.

        Returns:
            The server's exit code (None if it had to be killed).
        """
        self._remember_tree()
        code = None
        if self.alive():
            self._proc.send_signal(signal.SIGTERM)
            try:
                code = self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server %s did not stop in %.0f s; killing it", self.pid, timeout_s)
                self._proc.kill()
                self._proc.wait(timeout=10)
        else:
            code = self._proc.returncode
        leftovers = [p for p in self._known.values() if p.pid != self.pid]
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if proc.is_running():
                    proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        self._log.close()
        return code
