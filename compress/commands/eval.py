"""`modelpress eval` (not built yet)."""

from serve.errors import ModelpressError


def command() -> None:
    """Not available yet."""
    raise ModelpressError("`modelpress eval` is not available in this version yet")
