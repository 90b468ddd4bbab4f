"""A server worker that cannot load its artifact tells its launcher, which stops the server.

BentoML restarts a worker whose service fails to initialise, forever; an artifact that
passed its hash check but cannot be loaded (a truncated weight file re-hashed, an
architecture this transformers does not know) fails the same way on every restart. So the
launcher (``modelpress serve``, :func:`serve.app.launcher.start_server`) names a file in the
server's own ``BENTOML_HOME`` in ``MODELPRESS_START_FAILURE_FILE``; the service's
``__init__`` (wrapped by :func:`reported`) writes one line there when it raises, and the
launcher, polling with :func:`read`, stops the server and reports that line. Without the
variable (a plain ``bentoml serve``) nothing changes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from serve.errors import ModelpressError

ENV = "MODELPRESS_START_FAILURE_FILE"
#: The file's name inside the server's own ``BENTOML_HOME`` (removed when it stops).
FILE_NAME = "modelpress-start-failure"
MAX_CHARS = 500

F = TypeVar("F", bound=Callable[..., Any])


def describe(exc: BaseException) -> str:
    """One line for ``exc``: a modelpress error's message, else ``Type: first line``."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, ModelpressError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{type(exc).__name__}: {' '.join(first.split())}" if first \
            else type(exc).__name__
    return text[:MAX_CHARS]


def record(exc: BaseException, env: dict[str, str] | None = None) -> None:
    """Write ``describe(exc)`` to the launcher's failure file, if one was named.

    The first failing worker's line is kept (later workers find the file present).
    """
    path = (os.environ if env is None else env).get(ENV)
    if not path:
        return
    try:
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(describe(exc) + "\n")
    except OSError:  # already written by another worker, or the launcher is gone
        pass


def read(path: Path | None) -> str | None:
    """The recorded failure line, or None while no worker has failed."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def reported(init: F) -> F:
    """Wrap a service's ``__init__`` so that an exception is recorded, then re-raised."""

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return init(*args, **kwargs)
        except Exception as exc:
            record(exc)
            raise

    return wrapper  # type: ignore[return-value]
