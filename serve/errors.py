"""Error types shared by every part of modelpress.

Each carries a message meant for a person: the CLI prints it as one line, the server
returns it in a 4xx body.
"""

from __future__ import annotations

import re


class ModelpressError(Exception):
    """Base class for errors that a user can act on (bad input, bad artifact, failed gate)."""


class ArtifactError(ModelpressError):
    """An artifact folder is missing, incomplete, or its files do not match its manifest."""


class RequestError(ModelpressError):
    """A request the server refuses, with the HTTP status to answer.

    Args:
        message: For a person; starts with the offending field (``texts[2]: ...``).
        status: HTTP status.
        param: The field, for OpenAI's ``error.param`` (default: the message's prefix
            before ``": "`` when it names a field).
        code: OpenAI's ``error.code`` (default: one per status).
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param if param is not None else _param_of(message)
        self.code = code


def _param_of(message: str) -> str | None:
    head, sep, _ = message.partition(": ")
    if sep and head != "body" and re.fullmatch(r"[A-Za-z_][\w.\[\]/]*", head):
        return head
    return None
