"""Distill stage: train a smaller student from the (merged) teacher and measure retention.

The student is a layer subset of the teacher (``every-other``, ``first-k`` or an explicit
list; weights copied) or a user-given smaller model sharing the tokenizer. It is trained on
``data.train`` with temperature-softened KL to the teacher (weight ``alpha``) plus
cross-entropy on the labels (classification) or next tokens (causal LM), optionally plus
hidden-state MSE; see :mod:`compress.stages.distill_train` for the loop.

Checkpoints live in ``OUT/.distill-checkpoints/<key>/`` (outside the stage's temporary
folder) so a killed run resumes from its last checkpoint; they are removed on success.
The manifest records the student's size and layer map, the training curve, teacher vs
student metric with 95% CIs and agreement (through the evaluation module and the same
runtimes that serve the artifact), and the offline forward-time speed ratio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError, RecipeError, StageFailed
from compress.models import check_safetensors, load_model, load_tokenizer, save_model
from compress.recipe import DataFile
from compress.recipe_sections import DistillConfig
from compress.stages.base import StageContext, StageResult
from compress.stages.distill_speed import speed
from compress.stages.distill_student import build_student, count_parameters, hidden_map
from compress.stages.distill_train import Encoded, Validator, collate, encode, train
from serve.artifact import MANIFEST_NAME, Manifest, read_manifest, sha256_file, tree_digest

log = logging.getLogger(__name__)

CHECKPOINTS = ".distill-checkpoints"


def _texts(examples: list[Any], task: str) -> list[str]:
    if task == "text-generation":
        return [e.text + (" " + e.answer if getattr(e, "answer", None) else "") for e in examples]
    return [e.text for e in examples]


def label_ids(examples: list[Any], labels: list[str], what: str) -> list[int]:
    """Map dataset labels to the teacher's label ids (names, case-insensitive, or ids).

    Raises:
        InputError: A row without a label (names the field), or an unknown label.
    """
    from compress.data import map_labels

    for i, example in enumerate(examples):
        if example.label is None:
            raise InputError(f"{what}.label: example {i + 1} ({example.source}) has no label; "
                             "distilling a text-classification model needs labelled data")
    return map_labels(examples, labels)


def load_split(spec: DataFile | None, what: str) -> list[Any]:
    """Examples of one data section, with the distillation-specific checks.

    Raises:
        RecipeError: The section is missing.
        InputError: The file holds no examples.
    """
    from compress.data import load_examples

    if spec is None:
        raise RecipeError(f"{what}: the distill stage needs this data file "
                          f"({what}: {{path: ..., text: ..., label: ...}})")
    examples = load_examples(spec)
    if not examples:
        raise InputError(f"{what}: {spec.path}: no examples; the training set is empty")
    return examples


def holdout(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split examples into (train, validation) with a seeded shuffle."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    if n_val >= len(examples):
        raise InputError(f"data.train: {len(examples)} examples are too few to hold out "
                         f"{fraction:.0%} for validation")
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def make_validator(task: str, data: Encoded, pad_id: int, batch_size: int) -> Validator:
    """Validation metric on tokenized data: accuracy (classification) or perplexity (LM)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def batches():
        for start in range(0, len(data), batch_size):
            yield collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)

    if task == "text-classification":
        from compress.evaluate import accuracy

        def score(model) -> float:
            predicted = []
            with torch.no_grad():
                for batch in batches():
                    batch.pop("labels")
                    predicted.append(model(**batch).logits.argmax(-1).numpy())
            return float(accuracy(np.array(data.labels), np.concatenate(predicted)))

        return Validator("accuracy", True, score)

    from compress.evaluate import perplexity

    def corpus_perplexity(model) -> float:
        nll, count = [], []
        with torch.no_grad():
            for batch in batches():
                logits = model(**batch).logits[:, :-1].float()
                mask = batch["attention_mask"].bool()
                valid = mask[:, 1:] & mask[:, :-1]
                nll.append(F.cross_entropy(logits[valid], batch["input_ids"][:, 1:][valid],
                                           reduction="sum").item())
                count.append(int(valid.sum()))
        return perplexity(nll, count)

    return Validator("perplexity", False, corpus_perplexity)


def checkpoint_key(config: DistillConfig, src: Path, ctx: StageContext) -> str:
    """Identity of a training run: config, task, teacher files and data files."""
    if (src / MANIFEST_NAME).is_file():
        teacher = tree_digest(read_manifest(src).files)
    else:
        teacher = [(p.name, sha256_file(p)) for p in sorted(src.glob("*")) if p.is_file()]
    data = ctx.recipe.data
    files = [sha256_file(s.path) if s else None for s in (data.train, data.eval)]
    fields = [s.model_dump(mode="json", exclude={"path"}) if s else None
              for s in (data.train, data.eval)]
    blob = json.dumps([config.model_dump(mode="json"), ctx.recipe.task, ctx.recipe.labels,
                       teacher, files, fields], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _runtime(path: Path, task: str, name: str):
    from serve.runtime.runtime_torch import TorchRuntime

    manifest = (read_manifest(path) if (path / MANIFEST_NAME).is_file()
                else Manifest(name=name, task=task, format="torch", precision="fp32"))
    return TorchRuntime(path, manifest, "cpu")


def retention(task: str, teacher_dir: Path, student_dir: Path, examples: list[Any],
              seed: int) -> dict[str, Any]:
    """Teacher and student scored on the same examples through the serving runtimes."""
    from compress.evaluate import predict, score

    teacher_pred = predict(_runtime(teacher_dir, task, "teacher"), examples)
    student_pred = predict(_runtime(student_dir, task, "distill"), examples)
    teacher_score = score(task, examples, teacher_pred, seed=seed)
    student_score = score(task, examples, student_pred, reference=teacher_pred, seed=seed)
    ref = student_score.get("reference", {})
    out = {"metric": student_score["metric"], "n": student_score["n"],
           "teacher": {"value": teacher_score["value"], "ci95": teacher_score["ci95"]},
           "student": {"value": student_score["value"], "ci95": student_score["ci95"]},
           "agreement": ref.get("agreement"), "kl": ref.get("kl"),
           "metric_drop": ref.get("metric_drop"), "drop_ci95": ref.get("drop_ci95")}
    if teacher_score["value"]:
        ratio = student_score["value"] / teacher_score["value"]
        out["retention"] = ratio if student_score["higher_is_better"] else 1 / ratio
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def distill(config: DistillConfig, src: Path, dst: Path, ctx: StageContext) -> StageResult:
    """Distill the model at ``src`` into a smaller student saved to ``dst``.

    Args:
        config: Distillation settings.
        src: The teacher (the previous stage's output).
        dst: Empty output folder (temporary; its parent is the run's output folder).
        ctx: Stage context (the recipe and the stage's index).

    Returns:
        Student size, layer map, training summary, teacher vs student metrics and speed.

    Raises:
        RecipeError: No training data in the recipe.
        InputError: Bad student request or training data (names the field).
        StageFailed: NaN loss, or a metric drop above ``config.max_metric_drop``.
    """
    import torch

    recipe, task, where = ctx.recipe, ctx.recipe.task, f"stages[{ctx.index}]"
    spec = recipe.data.train
    if spec is None:
        raise RecipeError("data.train: the distill stage needs training data")
    if task == "text-classification" and spec.label is None:
        raise InputError("data.train.label: distilling a text-classification model needs "
                         "labelled training data; name the label column")
    cacheable = task == "text-classification" and not config.hidden_weight
    if config.cache_teacher_logits and not cacheable:
        raise InputError(f"{where}.cache_teacher_logits: only for text-classification "
                         "without hidden_weight (else the teacher must run every step)")
    if config.cache_teacher_logits is None:
        config = config.model_copy(update={"cache_teacher_logits": cacheable})
    check_safetensors(src, "distill teacher")
    ctx.report("loading teacher")
    teacher = load_model(task, src)
    tokenizer = load_tokenizer(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student, layer_map = build_student(config, teacher, tokenizer, task, where)
    mse_map = hidden_map(config, layer_map, student, teacher, where)
    for param in teacher.parameters():
        param.requires_grad_(False)

    examples = load_split(spec, "data.train")
    if config.validation_fraction > 0:
        train_ex, val_ex = holdout(examples, config.validation_fraction, config.seed)
    else:
        val_ex = load_split(recipe.data.eval, "data.eval")
        train_ex = examples
    names = ([teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
             if task == "text-classification" else [])

    def encoded(items: list[Any], what: str) -> Encoded:
        ids = encode(tokenizer, _texts(items, task), config.max_length)
        labels = label_ids(items, names, what) if names else None
        return Encoded(ids, labels)

    train_data = encoded(train_ex, "data.train")
    val_data = encoded(val_ex, "data.eval" if config.validation_fraction == 0 else "data.train")
    validator = make_validator(task, val_data, tokenizer.pad_token_id, config.batch_size * 2)
    ckpt = dst.parent / CHECKPOINTS / checkpoint_key(config, src, ctx)
    ctx.report(f"training {len(train_data)} examples, validating on {len(val_data)} "
               f"(checkpoints in {ckpt})")
    outcome = train(student, teacher, train_data, validator, config, task=task,
                    pad_id=tokenizer.pad_token_id, checkpoint_dir=ckpt, hidden_map=mse_map)
    ctx.report(f"best {outcome.metric} {outcome.best_value:.4f} at step {outcome.best_step}; "
               "saving student")
    save_model(student, tokenizer, dst)

    eval_ex = load_split(recipe.data.eval, "data.eval") if recipe.data.eval else val_ex
    ctx.report(f"comparing teacher and student on {len(eval_ex)} examples")
    compared = retention(task, src, dst, eval_ex, config.seed)
    timing = speed(teacher, student, tokenizer, _texts(eval_ex[: config.speed_batch_size], task),
                   config.speed_batch_size, config.max_length)
    metrics: dict[str, Any] = {
        # Headline (student vs teacher), as the CLI table and reports read it.
        "metric": compared["metric"], "value": compared["student"]["value"],
        "ci95": compared["student"]["ci95"], "teacher_value": compared["teacher"]["value"],
        "agreement": compared["agreement"], "metric_drop": compared["metric_drop"],
        "retention": compared.get("retention"), "speed_ratio": timing["speed_ratio"],
        "student": {"layers": int(student.config.num_hidden_layers),
                    "params": count_parameters(student), "bytes": _folder_bytes(dst)},
        "teacher": {"layers": int(teacher.config.num_hidden_layers),
                    "params": count_parameters(teacher), "bytes": _folder_bytes(src)},
        "layer_map": layer_map, "hidden_layer_map": mse_map,
        "training": outcome.summary(), "eval": compared, "speed": timing,
        "eval_data": "data.eval" if recipe.data.eval else "held-out part of data.train",
    }
    details = {"teacher": str(src), "student_path": str(config.student_path or ""),
               "train_examples": len(train_data), "validation_examples": len(val_data),
               "torch_threads": torch.get_num_threads()}
    drop = compared.get("metric_drop")
    if config.max_metric_drop is not None and drop is not None and drop > config.max_metric_drop:
        raise StageFailed(f"distill: student {compared['metric']} is worse than the teacher's "
                          f"by {drop:.4f} > max_metric_drop {config.max_metric_drop}")
    shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
        ckpt.parent.rmdir()
    return StageResult(metrics=metrics, details=details)
