"""Building the distillation student: a layer subset of the teacher, or a user-given model.

A sliced student is a fresh instance of the teacher's class with ``num_hidden_layers``
set to the kept count (so per-layer attributes such as the KV-cache layer index are
right), loaded with the teacher's weights: embeddings, head and final norm unchanged,
student layer ``j`` = teacher layer ``layer_map[j]``.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.models import load_model, load_tokenizer
from compress.recipe_sections import DistillConfig

log = logging.getLogger(__name__)


def num_layers(model) -> int:
    """Number of transformer layers of a Hugging Face model."""
    return int(model.config.num_hidden_layers)


def layer_prefix(model) -> str:
    """State-dict prefix of the model's transformer layer list (``bert.encoder.layer.``)."""
    import torch

    count = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return name + "."
    raise InputError(f"{type(model).__name__}: cannot find its list of {count} transformer "
                     "layers to slice; give a student_path instead")


def choose_layers(config: DistillConfig, teacher_layers: int, where: str) -> list[int]:
    """Teacher layer indices the student keeps, in order.

    ``every-other`` spreads the kept layers evenly and always keeps the last one
    (6 → 3 keeps 1, 3, 5), which preserves the representation the head was trained on.

    Raises:
        InputError: The request is out of range for this teacher (names the field).
    """
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < teacher_layers]
        if bad:
            raise InputError(f"{where}.layers: index {bad[0]} out of range for a teacher with "
                             f"{teacher_layers} layers (0..{teacher_layers - 1})")
        if len(config.layers) >= teacher_layers:
            raise InputError(f"{where}.layers: keeps {len(config.layers)} of "
                             f"{teacher_layers} teacher layers; a student must be smaller")
        return list(config.layers)
    k = config.student_layers
    if k is None:
        raise InputError(f"{where}.student_layers: required to slice the teacher")
    if k >= teacher_layers:
        raise InputError(f"{where}.student_layers: {k} is out of range: the student must have "
                         f"fewer layers than the teacher's {teacher_layers}")
    if config.strategy == "first-k":
        return list(range(k))
    # Evenly spaced, ending at the last layer: round((i + 1) * n / k) - 1.
    return [round((i + 1) * teacher_layers / k) - 1 for i in range(k)]


#: Config lists with one entry per layer (transformers 5): kept entries follow the layers.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def student_config(teacher, layer_map: list[int]):
    """The teacher's config for the layers ``layer_map``: the layer count and every
    per-layer setting (``layer_types`` with its sliding-window pattern, SmolLM3's
    ``no_rope_layers``, Gemma 4's ``per_layer_config`` and KV-sharing tail) follow the kept
    layers."""
    config = copy.deepcopy(teacher.config)
    n_teacher = num_layers(teacher)
    config.num_hidden_layers = len(layer_map)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == n_teacher:
            setattr(config, name, [values[i] for i in layer_map])
    teacher_types = set(getattr(teacher.config, "layer_types", None) or ())
    missing = sorted(teacher_types - set(getattr(config, "layer_types", None) or ()))
    if missing:  # e.g. a Qwen3.5 student of linear-attention layers only does not run
        raise InputError(f"{type(teacher).__name__}: the layers {layer_map} keep no "
                         f"{', '.join(missing)} layer of the teacher's; choose layers that "
                         "keep every layer type (strategy: explicit, layers: [...])")
    per_layer = getattr(config, "per_layer_config", None)
    if isinstance(per_layer, dict) and per_layer:
        width = len(next(iter(per_layer)))
        config.per_layer_config = {f"{new:0{width}d}": per_layer[f"{old:0{width}d}"]
                                   for new, old in enumerate(layer_map)
                                   if f"{old:0{width}d}" in per_layer}
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    if shared:  # layers reusing earlier layers' keys/values are the teacher's last ones
        config.num_kv_shared_layers = sum(i >= n_teacher - shared for i in layer_map)
    return config


def _per_layer_rows(value, layer_map: list[int], n_teacher: int, shape):
    """``value`` with the per-layer blocks of the layers ``layer_map`` kept along the one
    dimension whose size is the layer count times a block (Gemma 4's per-layer inputs), or
    None when no dimension is."""
    import torch

    for dim, (size, want) in enumerate(zip(value.shape, shape, strict=True)):
        if size != want and size % n_teacher == 0 \
                and want == size // n_teacher * len(layer_map):
            blocks = value.unflatten(dim, (n_teacher, size // n_teacher))
            kept = blocks.index_select(dim, torch.tensor(layer_map, dtype=torch.long))
            return kept.flatten(dim, dim + 1).clone()
    return None


def slice_teacher(teacher, layer_map: list[int]):
    """A student made of the teacher's layers ``layer_map`` (weights copied, config updated).

    Raises:
        InputError: The architecture cannot keep these layers (a per-layer setting the
            subset breaks, or a weight outside the layer list that depends on the count).
    """
    name = type(teacher).__name__
    config = student_config(teacher, layer_map)
    try:
        student = type(teacher)(config)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{name}: cannot keep layers {layer_map}: "
                         f"{str(exc).strip().splitlines()[0]}; choose other layers or give a "
                         "student_path") from None
    prefix = layer_prefix(teacher)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    new_index = {old: new for new, old in enumerate(layer_map)}
    shapes = {key: value.shape for key, value in student.state_dict().items()}
    n_teacher = num_layers(teacher)
    state: dict[str, Any] = {}
    for key, value in teacher.state_dict().items():
        match = pattern.fullmatch(key)
        if match is None:
            if key in shapes and value.shape != shapes[key]:
                rows = _per_layer_rows(value, layer_map, n_teacher, shapes[key])
                if rows is None:
                    raise InputError(f"{name}: cannot slice {key} {tuple(value.shape)} to "
                                     f"{tuple(shapes[key])} for {len(layer_map)} layers; "
                                     "give a student_path instead")
                state[key] = rows
            else:
                state[key] = value.clone()
        elif int(match.group(1)) in new_index:
            state[f"{prefix}{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    student.load_state_dict(state, strict=True)
    return student.eval()


def count_parameters(model) -> int:
    """Unique parameters of a model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _same_tokenizer(a, b) -> str | None:
    """None when both tokenizers encode identically, else what differs."""
    if a.get_vocab() != b.get_vocab():
        return f"vocabularies differ ({len(a)} vs {len(b)} tokens)"
    for attr in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token", "unk_token"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} differs ({getattr(a, attr, None)!r} vs {getattr(b, attr, None)!r})"
    return None


def user_student(path: Path, task: str, teacher, teacher_tokenizer, where: str):
    """Load a user-given student and check it shares the tokenizer and labels.

    Raises:
        InputError: Different tokenizer, label set, or a student that is not smaller.
    """
    kwargs: dict[str, Any] = {}
    if task == "text-classification":
        kwargs = {"num_labels": teacher.config.num_labels,
                  "id2label": dict(teacher.config.id2label),
                  "label2id": dict(teacher.config.label2id)}
    student = load_model(task, path, **kwargs)
    try:
        tokenizer = load_tokenizer(path)
    except InputError:
        raise InputError(f"{where}.student_path: {path}: no tokenizer files; the student "
                         "must ship the teacher's tokenizer") from None
    problem = _same_tokenizer(teacher_tokenizer, tokenizer)
    if problem:
        raise InputError(f"{where}.student_path: {path}: tokenizer does not match the "
                         f"teacher's: {problem}")
    if student.get_input_embeddings().num_embeddings < len(teacher_tokenizer):
        raise InputError(f"{where}.student_path: {path}: embedding table smaller than the "
                         "shared tokenizer's vocabulary")
    return student


def build_student(config: DistillConfig, teacher, teacher_tokenizer, task: str,
                  where: str) -> tuple[Any, list[int] | None]:
    """The student and, when sliced, the teacher layer each student layer came from.

    Args:
        config: Distillation settings.
        teacher: The teacher model.
        teacher_tokenizer: The teacher's tokenizer.
        task: The recipe task.
        where: How errors name the stage (``stages[1]``).

    Raises:
        InputError: Out-of-range layers, a student not smaller than the teacher, or a
            user-given student with another tokenizer.
    """
    if config.student_path is not None:
        student = user_student(config.student_path, task, teacher, teacher_tokenizer, where)
        layer_map = None
    else:
        layer_map = choose_layers(config, num_layers(teacher), where)
        student = slice_teacher(teacher, layer_map)
    student_params, teacher_params = count_parameters(student), count_parameters(teacher)
    if student_params >= teacher_params:
        field = "student_path" if config.student_path is not None else "student_layers"
        raise InputError(f"{where}.{field}: the student has {student_params:,} parameters, "
                         f"not fewer than the teacher's {teacher_params:,}")
    log.info("student: %d layers, %d params (teacher %d layers, %d params)",
             num_layers(student), student_params, num_layers(teacher), teacher_params)
    return student, layer_map


def hidden_map(config: DistillConfig, layer_map: list[int] | None, student, teacher,
               where: str) -> list[int] | None:
    """Teacher layer matched to each student layer by the hidden-state MSE (None if off).

    Raises:
        InputError: A map of the wrong length or range, or different hidden sizes.
    """
    if config.hidden_weight == 0:
        return None
    mapping = config.hidden_layer_map or layer_map
    n_student, n_teacher = num_layers(student), num_layers(teacher)
    if mapping is None:  # user-given student: spread evenly like every-other
        mapping = [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]
    if len(mapping) != n_student:
        raise InputError(f"{where}.hidden_layer_map: has {len(mapping)} entries for a student "
                         f"with {n_student} layers")
    bad = [i for i in mapping if not 0 <= i < n_teacher]
    if bad:
        raise InputError(f"{where}.hidden_layer_map: index {bad[0]} out of range for a "
                         f"teacher with {n_teacher} layers")
    if student.config.hidden_size != teacher.config.hidden_size:
        raise InputError(f"{where}.hidden_weight: hidden-state MSE needs equal hidden sizes "
                         f"(student {student.config.hidden_size}, teacher "
                         f"{teacher.config.hidden_size}); set hidden_weight: 0")
    return list(mapping)
