"""The recipe: what to compress and how, as validated pydantic models loaded from YAML.

Relative paths in a recipe resolve against the recipe file's folder. ``--set`` overrides
(``stages[1].student_layers=3``) are applied to the raw YAML before validation, and every
validation error is reported at once with its location.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from compress.errors import RecipeError
from compress.recipe_sections import (
    DistillConfig,
    Gates,
    MergeConfig,
    StageConfig,
    Strict,
    Variant,
    format_errors,
    location,
)
from serve.artifact import Task


class BaseSpec(Strict):
    """The base model.

    Attributes:
        path: Hugging Face model folder (safetensors), or the folder holding ``gguf_file``.
        gguf_file: A GGUF file inside ``path`` to load (dequantized) instead of safetensors.
        trained_quantization: The 4-bit scheme the adapters were trained against (QLoRA):
            adapters are then merged onto the base weights after a bitsandbytes
            quantize/dequantize round trip, the exact weights training saw.
        trust_remote_code: Allow model code from the folder (off unless asked for).
    """

    path: Path
    gguf_file: str | None = None
    trained_quantization: Literal["nf4", "fp4"] | None = None
    trust_remote_code: bool = False


class AdapterSpec(Strict):
    """One LoRA adapter (a PEFT folder) and its weight in a weighted merge."""

    path: Path
    weight: float = 1.0


class DataFile(Strict):
    """A local dataset file (JSONL, CSV/TSV, optionally .gz/.bz2) and its field names."""

    path: Path
    text: str = "text"
    label: str | None = "label"
    samples: int | None = Field(default=None, gt=0)


class DataSpec(Strict):
    """Datasets used by distillation (train), calibration and evaluation."""

    train: DataFile | None = None
    calibration: DataFile | None = None
    eval: DataFile | None = None




















class Recipe(Strict):
    """A whole compression recipe.

    Attributes:
        name: Recipe name (used in reports).
        task: ``text-classification`` or ``text-generation``.
        base: The base model.
        adapters: LoRA adapters to merge (empty for a full fine-tune).
        labels: Class names in label-id order (classification), if the checkpoint lacks them.
        data: Datasets for distillation, calibration and evaluation.
        stages: Stages run in order, each kind at most once (each writes ``OUT/<kind>``);
            the last one's output is the reference for variants.
        variants: Deployable artifacts built from the reference.
        gates: Acceptance thresholds.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    task: Task
    base: BaseSpec
    adapters: list[AdapterSpec] = Field(default_factory=list)
    labels: list[str] | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageConfig] = Field(default_factory=lambda: [MergeConfig()])
    variants: list[Variant] = Field(default_factory=list)
    gates: Gates = Field(default_factory=Gates)

    @field_validator("stages")
    @classmethod
    def _one_stage_per_kind(cls, stages: list[StageConfig]) -> list[StageConfig]:
        kinds = [s.kind for s in stages]
        for index, kind in enumerate(kinds):
            if kind in kinds[:index]:
                # Both would write OUT/<kind>, so each run would rebuild both.
                raise ValueError(f"kind {kind!r} appears twice (stages[{kinds.index(kind)}] "
                                 f"and stages[{index}]); each stage kind may appear once")
        return stages

    @model_validator(mode="after")
    def _check_names(self) -> Recipe:
        names = [v.name for v in self.variants]
        stage_kinds = {s.kind for s in self.stages}
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"variant name {name!r} is used twice")
            if name in stage_kinds:
                raise ValueError(f"variant name {name!r} clashes with the {name} stage folder")
        if not self.stages or self.stages[0].kind != "merge":
            raise ValueError("the first stage must be {kind: merge} (it is a pass-through "
                             "for a full fine-tune)")
        return self






def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``path.to.key=value`` override (list indices as ``stages[1]``) in place.

    Raises:
        RecipeError: The assignment is malformed or its path does not exist.
    """
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment}: expected KEY=VALUE")
    key, value = assignment.split("=", 1)
    parts: list[str | int] = []
    for token in key.replace("]", "").split("."):
        name, *indices = token.split("[")
        if name:
            parts.append(name)
        parts.extend(int(i) for i in indices if i.isdigit())
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        try:
            node = node[part] if isinstance(part, int) else node.setdefault(part, {})
        except (IndexError, KeyError, TypeError, AttributeError):
            where = location(tuple(parts[: i + 1]))
            raise RecipeError(f"--set {assignment}: {where} does not exist") from None
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {assignment}: index {last} out of range")
    elif not isinstance(node, dict):
        raise RecipeError(f"--set {assignment}: {key} is not a mapping key")
    node[last] = _parse_scalar(value)


def _resolve_paths(recipe: Recipe, root: Path) -> list[str]:
    errors = []

    def fix(path: Path) -> Path:
        return path if path.is_absolute() else (root / path).resolve()

    recipe.base.path = fix(recipe.base.path)
    if not recipe.base.path.is_dir():
        errors.append(f"base.path: no such directory: {recipe.base.path}")
    elif recipe.base.gguf_file and not (recipe.base.path / recipe.base.gguf_file).is_file():
        errors.append(f"base.gguf_file: no such file: {recipe.base.path / recipe.base.gguf_file}")
    for i, adapter in enumerate(recipe.adapters):
        adapter.path = fix(adapter.path)
        if not (adapter.path / "adapter_config.json").is_file():
            errors.append(f"adapters[{i}].path: not a PEFT adapter folder "
                          f"(no adapter_config.json): {adapter.path}")
    for section in ("train", "calibration", "eval"):
        spec = getattr(recipe.data, section)
        if spec is not None:
            spec.path = fix(spec.path)
            if not spec.path.is_file():
                errors.append(f"data.{section}.path: no such file: {spec.path}")
    for i, variant in enumerate(recipe.variants):
        options = getattr(variant, "options", None)
        for field in type(options).model_fields if isinstance(options, BaseModel) else ():
            value = getattr(options, field)
            if isinstance(value, Path):  # method options name files relative to the recipe
                setattr(options, field, fix(value))
                if not getattr(options, field).exists():
                    errors.append(f"variants[{i}].{field}: no such file: "
                                  f"{getattr(options, field)}")
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, DistillConfig) and stage.student_path is not None:
            stage.student_path = fix(stage.student_path)
            if not stage.student_path.is_dir():
                errors.append(f"stages[{i}].student_path: no such directory: "
                              f"{stage.student_path}")
    return errors


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file.

    Args:
        path: The YAML recipe.
        overrides: ``KEY=VALUE`` strings applied before validation.

    Returns:
        The validated recipe with absolute paths.

    Raises:
        RecipeError: One message listing every problem with its location.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = " ".join(str(exc).split())
        raise RecipeError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: " + "; ".join(format_errors(exc))) from None
    errors = _resolve_paths(recipe, path.resolve().parent)
    if errors:
        raise RecipeError(f"{path}: " + "; ".join(errors))
    return recipe
