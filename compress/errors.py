"""Errors raised while reading a recipe or running a stage."""

from serve.errors import ModelpressError


class RecipeError(ModelpressError):
    """The recipe (or an input it names) is invalid; the message names each location."""


class InputError(ModelpressError):
    """A model, adapter or data file named by the recipe cannot be used as given."""


class StageFailed(ModelpressError):
    """A stage ran but its own check failed (fidelity, NaN/inf, tolerance)."""


class VariantFailed(StageFailed):
    """A variant could not be built or checked; the others are still built.

    Raised ``from`` the original exception (kept as ``cause``), whatever its type: the
    message is ``variant NAME: <what went wrong>``.

    Attributes:
        variant: The variant's name.
        cause: The original exception.
    """

    def __init__(self, variant: str, cause: BaseException):
        text = str(cause).strip()
        if not isinstance(cause, ModelpressError):
            first = text.splitlines()[0][:300] if text else ""
            text = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        text = text.removeprefix(f"variant {variant}: ")
        super().__init__(f"variant {variant}: {text}")
        self.variant = variant
        self.cause = cause
