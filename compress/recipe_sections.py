"""The stage and variant sections of a recipe (``stages:``, ``variants:``, ``gates:``).

:mod:`compress.recipe` assembles them into the whole :class:`compress.recipe.Recipe` and
loads it from YAML; the stages and variant methods import their own section from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors (catches YAML typos)."""

    model_config = ConfigDict(extra="forbid")


class MergeConfig(Strict):
    """Merge LoRA adapters into the base (no-op pass-through for a full fine-tune).

    Attributes:
        tolerance: Max allowed abs difference between merged and base+adapter logits.
        check_samples: Number of sample inputs used for the fidelity check.
    """

    kind: Literal["merge"] = "merge"
    tolerance: float = Field(default=1e-3, gt=0)
    check_samples: int = Field(default=8, gt=0)


class DistillConfig(Strict):
    """Distill the current model into a smaller student (see ``stages/distill.py``).

    Attributes:
        student_layers: Number of transformer layers the student keeps.
        strategy: Which teacher layers initialise the student: ``every-other`` (evenly
            spread, last layer kept), ``first-k`` or ``explicit`` (``layers``).
        layers: Explicit teacher layer indices, increasing (for ``strategy: explicit``).
        student_path: A user-given smaller model sharing the tokenizer, instead of slicing.
        temperature: Softmax temperature of the KD loss.
        alpha: Weight of the KD loss (1 - alpha weights the label/next-token cross-entropy).
        hidden_weight: Weight of the hidden-state MSE loss (0 turns it off).
        hidden_layer_map: Teacher layer matched to each student layer by the MSE loss
            (defaults to the teacher layers the student was cut from).
        max_steps: Upper bound on optimizer steps.
        max_epochs: Upper bound on passes over the training data (None: max_steps only).
            The defaults (2 epochs, batch 32, lr 1e-4) kept 99% of the MiniLM sentiment
            teacher's accuracy with 3 of 6 layers (docs/benchmarks.md).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps with linear warm-up (then linear decay to 0).
        batch_size: Examples per micro-batch.
        grad_accum_steps: Micro-batches per optimizer step.
        max_length: Tokens per example (longer texts are truncated).
        eval_every: Validate (and checkpoint) every this many optimizer steps.
        patience: Stop after this many validations without improvement (None: never).
        validation_fraction: Part of ``data.train`` held out for validation; 0 validates
            on ``data.eval`` instead.
        cache_teacher_logits: Compute the teacher's logits on the training set once and
            reuse them every epoch (classification only; None: on for classification
            without hidden_weight).
        max_metric_drop: Fail the stage when the student's metric is worse than the
            teacher's by more than this (None: record only).
        speed_batch_size: Batch size of the offline teacher/student speed measurement.
        seed: Random seed (data order, dropout, held-out split).
    """

    kind: Literal["distill"] = "distill"
    student_layers: int | None = Field(default=None, gt=0)
    strategy: Literal["every-other", "first-k", "explicit"] = "every-other"
    layers: list[int] | None = None
    student_path: Path | None = None
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    hidden_weight: float = Field(default=0.0, ge=0)
    hidden_layer_map: list[int] | None = None
    max_steps: int = Field(default=1000, gt=0)
    max_epochs: int | None = Field(default=2, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    batch_size: int = Field(default=32, gt=0)
    grad_accum_steps: int = Field(default=1, gt=0)
    max_length: int = Field(default=128, gt=1)
    eval_every: int = Field(default=100, gt=0)
    patience: int | None = Field(default=4, gt=0)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    cache_teacher_logits: bool | None = None
    max_metric_drop: float | None = Field(default=None, ge=0)
    speed_batch_size: int = Field(default=32, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_student(self) -> DistillConfig:
        if self.strategy == "explicit" and self.layers is None and self.student_path is None:
            raise ValueError("layers: required with strategy: explicit")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers: must not be empty")
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError("layers: must be increasing without duplicates")
            if self.student_layers is not None and self.student_layers != len(self.layers):
                raise ValueError(f"student_layers: {self.student_layers} does not match the "
                                 f"{len(self.layers)} entries of layers")
        if self.student_layers is None and self.layers is None and self.student_path is None:
            raise ValueError("student_layers: required (or layers, or student_path)")
        return self


StageConfig = Annotated[MergeConfig | DistillConfig, Field(discriminator="kind")]


class ExportVariant(Strict):
    """An ONNX export of the reference model.

    Attributes:
        format: ``onnx`` (transformers' ONNX exporter, fp32/fp16) or ``onnx-genai``
            (onnxruntime-genai model builder, causal LMs only: fp32/int8/int4 on CPU,
            fp16/int4 on CUDA); any export method registered in ``compress/stages/registry.py``.
        precision: Weight precision of the exported model.
        device: Execution provider an ``onnx-genai`` model is built for.
        block_size: Block size of int4 weights (``onnx-genai``, precision int4).
        symmetric: Symmetric int4 quantization (``onnx-genai``, precision int4).
        algorithm: The builder's int4 algorithm (``onnx-genai``, precision int4): ``rtn``,
            ``k_quant``, ``k_quant_mixed`` (int8 for the LM head and llama.cpp's sensitive
            layers), ``k_quant_last`` (int8 LM head); None: the builder's default RTN.
            (GPTQ, HQQ and GGUF block import for this runtime: ``kind: quantize``,
            ``method: int4-weight-only``, ``graph: genai``.)
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["export"] = "export"
    format: str = "onnx"
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"
    device: Literal["cpu", "cuda"] = "cpu"
    block_size: int = Field(default=32, gt=0)
    symmetric: bool = True
    algorithm: str | None = None
    gates: Gates | None = None  # overrides the recipe's gates for this variant

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return _registered("export", "format", value)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str | None) -> str | None:
        from compress.stages.int4 import GENAI_ALGORITHMS

        if value is not None and value not in GENAI_ALGORITHMS:
            raise ValueError(f"unknown onnx-genai int4 algorithm {value!r}; choose one of "
                             f"{', '.join(GENAI_ALGORITHMS)}")
        return value


_COMMON_VARIANT_KEYS = ("name", "kind", "method", "gates")


def _registered(kind: str, field: str, value: str) -> str:
    """``value`` if the registry has it for ``kind``, else a ValueError naming the choices."""
    from compress.stages import registry

    if value not in registry.names(kind):
        raise ValueError(f"unknown {field} {value!r}; choose one of "
                         f"{', '.join(registry.names(kind))}")
    return value


class QuantizeVariant(Strict):
    """A quantized variant of the reference model.

    ``method`` names a method registered in ``compress/stages/registry.py`` (int8-dynamic,
    int8-static, int4-weight-only, nf4, int8-bnb, ...); the variant's other keys are that
    method's options, validated by its config model and kept in ``options``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["quantize"] = "quantize"
    method: str
    gates: Gates | None = None  # overrides the recipe's gates for this variant
    options: Any = None

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and "options" not in data:
            options = {k: v for k, v in data.items() if k not in _COMMON_VARIANT_KEYS}
            data = {k: v for k, v in data.items() if k in _COMMON_VARIANT_KEYS}
            data["options"] = options
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _registered("quantize", "method", value)

    @model_validator(mode="after")
    def _validate_options(self) -> QuantizeVariant:
        from compress.stages import registry

        config = registry.get("quantize", self.method).config
        if not isinstance(self.options, config):
            try:
                self.options = config.model_validate(self.options or {})
            except ValidationError as exc:
                raise ValueError("; ".join(format_errors(exc))) from None
        return self


Variant = Annotated[ExportVariant | QuantizeVariant, Field(discriminator="kind")]


class Gates(Strict):
    """Acceptance thresholds for variants against the reference model."""

    max_metric_drop: float = Field(default=0.01, ge=0)
    min_agreement: float = Field(default=0.98, ge=0)


def location(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the recipe path a user writes (``stages[1].alpha``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("merge", "distill", "export", "quantize") and out.endswith("]"):
            continue  # discriminator tag: `stages[1].distill.x` reads better as `stages[1].x`
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


def format_errors(exc: ValidationError) -> list[str]:
    """One ``location: message`` line per validation error."""
    msgs = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg.replace("Input should be greater than", "must be >")
        msg = msg.replace("Extra inputs are not permitted", "unknown field")
        msgs.append(f"{location(tuple(err['loc']))}: {msg}")
    return msgs
