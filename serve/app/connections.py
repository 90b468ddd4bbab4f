"""Connection guards of the worker's HTTP server: a header deadline, the keep-alive
timeout and a connection cap.

uvicorn arms no timer before a request's headers are complete and keeps any number of
connections open: a client that sends part of its headers, or connects and sends
nothing, holds a connection (a file descriptor) for ever, and enough of them exhaust the
worker's open-file limit (issue 20). The guards, per worker:

* ``header_timeout_s``: a request's headers must be complete this long after its first
  byte (or after the connection opens); past it the connection is closed, with a 408
  when part of a request had come. The deadline is total, so a byte every few seconds
  does not extend it. The body has its own deadline (``body_timeout_s``).
* ``keep_alive_timeout_s``: an idle connection between requests is closed after this.
* ``max_connections``: connections past it get a 503 and are closed at once; it is
  lowered to the open-file limit less a reserve for the model's and the server's files.

BentoML builds the worker's ``uvicorn.Config`` itself and passes none of these (only
``--timeout-keep-alive``), and leaves uvicorn's ``http`` option at ``"auto"``.
:func:`install`, called in the worker before that (from
:func:`serve.app.asgi.direct_routes_service`), points uvicorn's ``"auto"`` HTTP protocol
at a subclass of the one it would choose (h11 or httptools) with the guards; the unit
tests pin both behaviours.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from serve.api.http_errors import error_bytes
from serve.settings import ConnectionLimits

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for model files, sockets to the engine, logs


def connection_cap(limit: int) -> int:
    """``limit``, lowered to the soft open-file limit less :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, soft - FD_RESERVE))


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer with the error object that closes the connection."""
    body = error_bytes(message, status, code)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type:
    """A subclass of uvicorn's HTTP protocol ``base`` with the connection guards."""
    cap = connection_cap(limits.max_connections)
    if cap < limits.max_connections:
        log.warning("max_connections lowered from %d to %d (open-file limit)",
                    limits.max_connections, cap)

    class GuardedProtocol(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = limits.keep_alive_timeout_s
            self.header_timer: asyncio.TimerHandle | None = None
            self.partial = False
            self.refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                self.refuse_connection()
                return
            self.arm()

        def refuse_connection(self) -> None:
            # Answer, stop writing, and drop what the client sends until it closes (or
            # 1 s): closing with its request unread would reset the connection and lose
            # the answer.
            self.refused = True
            self.transport.write(raw_error(503, "Service Unavailable",
                                           "connection: too many connections; retry later",
                                           "server_overloaded"))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.header_timer = asyncio.get_running_loop().call_later(
                1.0, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self.disarm()  # headers in: the body deadline is the app's
            elif not self.transport.is_closing():
                self.partial = True
                if self.header_timer is None:
                    self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.header_timer = asyncio.get_running_loop().call_later(
                limits.header_timeout_s, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            self.partial = False

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            if self.partial:
                self.transport.write(raw_error(
                    408, "Request Timeout",
                    f"headers: not complete within header_timeout_s="
                    f"{limits.header_timeout_s:g} s", "request_timeout"))
            self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


guarded: type | None = None  # what uvicorn's "auto" protocol resolves to once installed


def install(limits: ConnectionLimits) -> type:
    """Make uvicorn's ``"auto"`` HTTP protocol the guarded one (in this process).

    Returns:
        The guarded protocol class.
    """
    global guarded
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    guarded = guarded_protocol(AutoHTTPProtocol, limits)
    HTTP_PROTOCOLS["auto"] = f"{__name__}:guarded"
    log.info("connection guards: header_timeout_s=%g keep_alive_timeout_s=%g "
             "max_connections=%d", limits.header_timeout_s, limits.keep_alive_timeout_s,
             connection_cap(limits.max_connections))
    return guarded
