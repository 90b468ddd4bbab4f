"""The distillation training loop: KD losses, AdamW with warm-up/decay, validation, early
stopping, best checkpoint, and resume from the last checkpoint after an interruption.

Reproducible on CPU: the data order of every epoch is derived from (seed, epoch), and the
torch RNG state (dropout) is saved in each checkpoint, so a run resumed from step ``s``
ends with the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import StageFailed
from compress.recipe_sections import DistillConfig

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
BEST = "best.pt"
TEACHER_LOGITS = "teacher_logits.pt"


@dataclass
class Encoded:
    """Tokenized examples (unpadded) and, for classification, label ids."""

    input_ids: list[list[int]]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Validator:
    """Scores a model on the validation set.

    Attributes:
        metric: Name of the metric (``accuracy``, ``perplexity``).
        higher_is_better: Direction of improvement.
        score: Function model -> metric value.
    """

    metric: str
    higher_is_better: bool
    score: Callable[[Any], float]


@dataclass
class TrainOutcome:
    """What the training loop did, for the manifest."""

    steps: int
    epochs: float
    best_step: int
    best_value: float
    metric: str
    stopped_early: bool
    resumed_from_step: int | None
    first_loss: float | None
    last_loss: float | None
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary."""
        return asdict(self)


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (special tokens added, truncated), unpadded."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, Any]:
    """A right-padded batch: input_ids, attention_mask and (if any) labels."""
    import torch

    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if data.labels is not None:
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return batch


def kd_loss(student_logits, teacher_logits, temperature: float, mask=None):
    """KL(teacher || student) of temperature-softened distributions, times T².

    Args:
        student_logits: ``[..., C]``.
        teacher_logits: Same shape.
        temperature: Softening temperature.
        mask: Boolean ``[...]`` selecting the positions that count (padding excluded).
    """
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * temperature**2


def distill_loss(student_out, teacher_logits, batch, config: DistillConfig, task: str,
                 teacher_hidden=None, hidden_map: list[int] | None = None):
    """The weighted loss and its parts (as floats) for one batch.

    Classification: alpha·KD + (1-alpha)·CE(labels). Causal LM: the same over next-token
    distributions, padding masked. Plus hidden_weight·MSE(student layer j, teacher layer
    hidden_map[j]) over real tokens.
    """
    import torch.nn.functional as F

    logits = student_out.logits
    mask = batch["attention_mask"].bool()
    if task == "text-generation":
        valid = mask[:, 1:] & mask[:, :-1]
        kd = kd_loss(logits[:, :-1], teacher_logits[:, :-1], config.temperature, valid)
        ce = F.cross_entropy(logits[:, :-1][valid].float(), batch["input_ids"][:, 1:][valid])
    else:
        kd = kd_loss(logits, teacher_logits, config.temperature)
        ce = F.cross_entropy(logits.float(), batch["labels"])
    loss = config.alpha * kd + (1 - config.alpha) * ce
    parts = {"kd": kd.item(), "ce": ce.item()}
    if hidden_map is not None and teacher_hidden is not None:
        mse = sum(F.mse_loss(student_out.hidden_states[j + 1][mask],
                             teacher_hidden[t + 1][mask]) for j, t in enumerate(hidden_map))
        mse = mse / len(hidden_map)
        loss = loss + config.hidden_weight * mse
        parts["hidden_mse"] = mse.item()
    parts["loss"] = loss.item()
    return loss, parts


def _save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def teacher_logits_cache(teacher, data: Encoded, batch_size: int, pad_id: int,
                         folder: Path | None) -> Any:
    """The teacher's logits on every training example ``[n, C]``, computed once (on disk)."""
    import torch
    from tqdm.auto import tqdm

    path = folder / TEACHER_LOGITS if folder else None
    if path is not None and path.is_file():
        cached = torch.load(path)
        if cached.shape[0] == len(data):
            return cached
    rows = []
    with torch.no_grad():
        for start in tqdm(range(0, len(data), batch_size), desc="teacher logits", unit="batch"):
            batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)
            batch.pop("labels", None)
            rows.append(teacher(**batch).logits.float())
    logits = torch.cat(rows)
    if path is not None:
        _save(logits, path)
    return logits


def _order(n: int, epoch: int, seed: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _improved(value: float, best: float | None, higher: bool) -> bool:
    if best is None:
        return True
    return value > best if higher else value < best


def train(student, teacher, data: Encoded, validator: Validator, config: DistillConfig, *,
          task: str, pad_id: int, checkpoint_dir: Path, hidden_map: list[int] | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainOutcome:
    """Distill ``teacher`` into ``student`` in place; the student ends with its best weights.

    Args:
        student: The model to train (its weights are replaced by the best checkpoint).
        teacher: The frozen teacher.
        data: Tokenized training examples.
        validator: Validation metric, evaluated every ``config.eval_every`` steps.
        config: Distillation settings.
        task: ``text-classification`` or ``text-generation``.
        pad_id: Padding token id.
        checkpoint_dir: Where ``last.pt``/``best.pt`` live; a run finding ``last.pt``
            there resumes from it.
        hidden_map: Teacher layer per student layer for the hidden-state MSE (None: off).
        on_step: Called after every optimizer step (and its checkpoint) with the step.

    Raises:
        StageFailed: The loss became NaN/inf.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(config.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    micro_per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.max_steps
    if config.max_epochs is not None:
        total = min(total, math.ceil(config.max_epochs * micro_per_epoch / config.grad_accum_steps))
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total),
                                                total)
    cached = None
    if config.cache_teacher_logits:
        cached = teacher_logits_cache(teacher, data, config.batch_size * 2, pad_id,
                                      checkpoint_dir)

    state = {"step": 0, "best_value": None, "best_step": 0, "bad_evals": 0, "curve": [],
             "loss_sum": 0.0, "loss_count": 0, "first_loss": None, "last_loss": None,
             "seconds": 0.0}
    resumed = None
    if (checkpoint_dir / CHECKPOINT).is_file():
        saved = torch.load(checkpoint_dir / CHECKPOINT)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        resumed = state["step"]
        log.info("distill: resuming from step %d (%s)", resumed, checkpoint_dir)

    def validate_and_checkpoint() -> None:
        now = time.perf_counter()
        state["seconds"] += now - clock[0]  # training time, summed over resumed runs
        clock[0] = now
        value = float(validator.score(student))
        mean_loss = state["loss_sum"] / state["loss_count"] if state["loss_count"] else None
        state["curve"].append({"step": state["step"], "train_loss": mean_loss,
                               validator.metric: value})
        state["loss_sum"], state["loss_count"] = 0.0, 0
        if _improved(value, state["best_value"], validator.higher_is_better):
            state["best_value"], state["best_step"], state["bad_evals"] = value, state["step"], 0
            _save(student.state_dict(), checkpoint_dir / BEST)
        else:
            state["bad_evals"] += 1
        _save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
               "state": state}, checkpoint_dir / CHECKPOINT)
        bar.set_postfix({"loss": f"{mean_loss:.4f}" if mean_loss is not None else "-",
                         validator.metric: f"{value:.4f}"})

    def stop_early() -> bool:
        return config.patience is not None and state["bad_evals"] >= config.patience

    clock = [time.perf_counter()]
    bar = tqdm(total=total, initial=state["step"], desc="distill", unit="step")
    teacher.eval()
    if not state["curve"]:
        student.eval()
        validate_and_checkpoint()  # step 0: the freshly built student is the baseline
    stopped = stop_early()
    while state["step"] < total and not stopped:
        student.train()
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.grad_accum_steps):
            index = state["step"] * config.grad_accum_steps + micro
            epoch, offset = divmod(index, micro_per_epoch)
            order = _order(len(data), epoch, config.seed)
            rows = order[offset * config.batch_size:(offset + 1) * config.batch_size]
            batch = collate(data, rows, pad_id)
            labels = batch.pop("labels", None)
            need_hidden = hidden_map is not None
            if cached is not None:
                teacher_logits, teacher_hidden = cached[rows], None
            else:
                with torch.no_grad():
                    out = teacher(**batch, output_hidden_states=need_hidden)
                teacher_logits, teacher_hidden = out.logits, out.hidden_states
            student_out = student(**batch, output_hidden_states=need_hidden)
            if labels is not None:
                batch["labels"] = labels
            loss, parts = distill_loss(student_out, teacher_logits, batch, config, task,
                                       teacher_hidden, hidden_map)
            if not math.isfinite(parts["loss"]):
                raise StageFailed(f"distill: loss became {parts['loss']} at step "
                                  f"{state['step']}; lower learning_rate")
            (loss / config.grad_accum_steps).backward()
            state["loss_sum"] += parts["loss"]
            state["loss_count"] += 1
            state["last_loss"] = parts["loss"]
            if state["first_loss"] is None:
                state["first_loss"] = parts["loss"]
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        bar.update(1)
        if state["step"] % config.eval_every == 0 or state["step"] == total:
            student.eval()
            validate_and_checkpoint()
            stopped = stop_early()
        if on_step is not None:
            on_step(state["step"])
    bar.close()
    student.load_state_dict(torch.load(checkpoint_dir / BEST))
    student.eval()
    epochs = state["step"] * config.grad_accum_steps / micro_per_epoch
    return TrainOutcome(
        steps=state["step"], epochs=round(epochs, 3), best_step=state["best_step"],
        best_value=state["best_value"], metric=validator.metric,
        stopped_early=stopped and state["step"] < total, resumed_from_step=resumed,
        first_loss=state["first_loss"], last_loss=state["last_loss"],
        seconds=round(state["seconds"], 2), curve=state["curve"])
