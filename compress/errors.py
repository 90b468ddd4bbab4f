"""Errors raised while reading a recipe or running a stage."""

from serve.errors import ModelpressError


class RecipeError(ModelpressError):
    """The recipe (or an input it names) is invalid; the message names each location."""


class InputError(ModelpressError):
    """A model, adapter or data file named by the recipe cannot be used as given."""


class StageFailed(ModelpressError):
    """A stage ran but its own check failed (fidelity, NaN/inf, tolerance)."""
