"""Client-chosen text (paths, field names) made safe to put in a log line.

A request path or a JSON key may hold a newline (a forged log line), control characters
(a NUL in a log file) or a megabyte of text. :func:`for_log` escapes and cuts one string;
:func:`names_for_log` bounds a list of names.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

MAX_CHARS = 200
MAX_NAMES = 16


def for_log(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` on one line: backslash escapes for control and non-ASCII characters
    (``\\n``, ``\\x00``, ``\\u2028``), cut to ``limit`` characters with the full length."""
    escaped = text.encode("unicode_escape").decode("ascii")
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(text)} chars)"


def names_for_log(names: Iterable[str], total: int, limit: int = MAX_NAMES,
                  chars: int = 64) -> str:
    """The first ``limit`` of ``total`` names, each through :func:`for_log`, comma
    separated, with how many were left out."""
    shown = sorted(for_log(name, chars) for name in islice(names, limit))
    more = f" (+{total - len(shown)} more)" if total > len(shown) else ""
    return ", ".join(shown) + more
