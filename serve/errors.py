"""Error types shared by every part of modelpress.

Each carries a message meant for a person: the CLI prints it as one line, the server
returns it in a 4xx body.
"""


class ModelpressError(Exception):
    """Base class for errors that a user can act on (bad input, bad artifact, failed gate)."""


class ArtifactError(ModelpressError):
    """An artifact folder is missing, incomplete, or its files do not match its manifest."""
