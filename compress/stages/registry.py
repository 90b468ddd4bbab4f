"""The variant method registry: one entry per way of building a variant.

A method is a pydantic options model, a ``plan`` (checks the variant against the recipe
and machine, returns the artifact's ``(format, precision)``), a ``build`` function that
writes the model files, and a version that enters the variant's cache key. The recipe
validates a variant's ``method`` (``kind: quantize``) or ``format`` (``kind: export``)
through this registry, and ``variants.build_variant`` dispatches through it, so adding a
method is one ``@register(...)`` in a module listed in ``BUILTIN_MODULES`` — the way
torchao registers a handler per config class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

#: Modules whose import registers the built-in methods.
BUILTIN_MODULES = ("compress.stages.methods",)


@dataclass
class BuildContext:
    """Everything a method's ``build`` function may use.

    Attributes:
        recipe: The validated recipe.
        variant: The variant being built (``QuantizeVariant`` or ``ExportVariant``).
        options: The variant's validated options (the method's config model).
        reference_dir: The reference artifact folder (last stage output).
        reference: The reference's manifest.
        dst: The (temporary) output folder.
        report: Progress callback.
    """

    recipe: Any
    variant: Any
    options: BaseModel
    reference_dir: Path
    reference: Any
    dst: Path
    report: Callable[[str], None] = field(default=lambda m: None)


@dataclass(frozen=True)
class Method:
    """One registered way of building a variant."""

    kind: str
    name: str
    config: type[BaseModel]
    build: Callable[[BuildContext], dict[str, Any]]
    plan: Callable[[Any, Any], tuple[str, str]]
    version: int = 1
    summary: str = ""


_METHODS: dict[tuple[str, str], Method] = {}


def register(kind: str, name: str, *, config: type[BaseModel],
             plan: Callable[[Any, Any], tuple[str, str]], version: int = 1,
             summary: str = "") -> Callable:
    """Decorator registering ``build`` as the method ``name`` of variants of ``kind``.

    Args:
        kind: ``quantize`` or ``export``.
        name: The recipe's ``method`` (quantize) or ``format`` (export) value.
        config: Pydantic model of the method's options (``extra="forbid"``).
        plan: ``plan(recipe, variant) -> (format, precision)``; raises on a variant
            that cannot be built as declared.
        version: Bumped when the method's output changes (invalidates cached variants).
        summary: One line for error messages and docs.
    """
    def wrap(build: Callable[[BuildContext], dict[str, Any]]):
        key = (kind, name)
        if key in _METHODS:
            raise ValueError(f"method {kind}/{name} is registered twice")
        _METHODS[key] = Method(kind, name, config, build, plan, version, summary)
        return build
    return wrap


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    """Registered method names of ``kind``, sorted."""
    _load_builtin()
    return sorted(n for k, n in _METHODS if k == kind)


def get(kind: str, name: str) -> Method:
    """The method ``name`` of ``kind``.

    Raises:
        KeyError: Unknown method; the message lists the registered ones.
    """
    _load_builtin()
    try:
        return _METHODS[(kind, name)]
    except KeyError:
        raise KeyError(f"unknown {kind} method {name!r}; registered: "
                       f"{', '.join(names(kind))}") from None


def method_of(variant: Any) -> Method:
    """The registered method that builds ``variant``."""
    return get(variant.kind, variant.method if variant.kind == "quantize" else variant.format)
