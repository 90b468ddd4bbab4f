"""LoRA fine-tuning that makes the demo's "fine-tuned checkpoint" — what a user brings.

Two recipes: a MiniLM sentence classifier (LoRA on every attention/FFN Linear plus a
trained classification head) and a causal LM taught to answer with one word (loss on the
answer tokens only). Both save a standard PEFT adapter folder plus the tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve.artifact import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Settings of a LoRA fine-tune.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        learning_rate: AdamW peak learning rate (linear warm-up, then linear decay).
        warmup: Fraction of steps spent warming up.
        rank: LoRA rank (alpha = 2 * rank).
        max_length: Tokens per example (longer ones are truncated).
        seed: Seed for initialisation and shuffling.
    """

    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup: float = 0.06
    rank: int = 16
    max_length: int = 96
    seed: int = 0


def _schedule(step: int, cfg: FinetuneConfig) -> float:
    warm = max(1, int(cfg.steps * cfg.warmup))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def _batches(n: int, cfg: FinetuneConfig):
    rng = random.Random(cfg.seed)
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield order[: cfg.batch_size]
        order = order[cfg.batch_size:]


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Causal-LM loss on the answer tokens, with logits computed only where they are needed.

    Sequences are left-padded, so every answer (and its EOS) sits in the last positions.
    The LM head then runs on the last ``answer + 1`` positions only (``logits_to_keep``)
    instead of all of them: the same mean cross-entropy as the model's own ``labels=`` loss,
    without a (batch × length × 49k-vocab) logit tensor and its backward pass.

    Args:
        model: A causal LM (or its PEFT wrapper) whose forward takes ``logits_to_keep``.
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers).

    Returns:
        The scalar loss tensor.
    """
    import torch

    labels = batch["labels"]
    answer = int((labels != -100).sum(dim=1).max())
    keep = answer + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    # logits[:, j] predicts the token after position L - keep + j.
    targets = labels[:, -(keep - 1):]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=-100)


def _train(model, make_batch, n: int, cfg: FinetuneConfig, desc: str,
           loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None) -> list[float]:
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, cfg))
    model.train()
    losses = []
    bar = tqdm(_batches(n, cfg), total=cfg.steps, desc=desc, unit="step")
    for indices in bar:
        batch = make_batch(indices)
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def _save(peft_model, tokenizer, out: Path, summary: dict[str, Any]) -> Path:
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def finetune_classifier(base: Path, texts: list[str], labels: list[int], label_names: list[str],
                        out: Path, cfg: FinetuneConfig) -> Path:
    """LoRA-fine-tune a sequence classifier and save the adapter (head in modules_to_save).

    Args:
        base: HF encoder folder (e.g. all-MiniLM-L6-v2).
        texts: Training texts.
        labels: Label ids, aligned with ``texts``.
        label_names: Names of the label ids.
        out: Adapter folder to write (atomically).
        cfg: Training settings.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, use_safetensors=True)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.rank, lora_alpha=2 * cfg.rank,
                      lora_dropout=0.1, target_modules=["query", "key", "value", "dense"])
    peft_model = get_peft_model(model, lora)

    def make_batch(indices: list[int]) -> dict[str, Any]:
        batch = tokenizer([texts[i] for i in indices], padding=True, truncation=True,
                          max_length=cfg.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in indices])
        return batch

    losses = _train(peft_model, make_batch, len(texts), cfg, "fine-tune classifier")
    summary = {"base": str(base), "config": asdict(cfg), "examples": len(texts),
               "final_loss": sum(losses[-20:]) / len(losses[-20:]), "labels": label_names}
    return _save(peft_model, tokenizer, out, summary)


def finetune_lm(base: Path, prompts: list[str], answers: list[str], out: Path,
                cfg: FinetuneConfig) -> Path:
    """LoRA-fine-tune a causal LM to continue each prompt with its answer (+ EOS).

    The loss covers only the answer and EOS tokens; prompts are already formatted (chat
    template applied) by the caller.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.rank, lora_alpha=2 * cfg.rank,
                      lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, lora)
    # End answers with the token generation stops on, not whatever the tokenizer calls EOS.
    eos = model.generation_config.eos_token_id
    eos = (eos[0] if isinstance(eos, list) else eos) if eos is not None else \
        tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        p_ids = p_ids[-(cfg.max_length - len(a_ids)):]
        encoded.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))

    def make_batch(indices: list[int]) -> dict[str, Any]:
        width = max(len(encoded[i][0]) for i in indices)
        ids, labels, mask = [], [], []
        for i in indices:
            seq, lab = encoded[i]
            gap = width - len(seq)  # left padding, as at generation time
            ids.append([pad] * gap + seq)
            labels.append([-100] * gap + lab)
            mask.append([0] * gap + [1] * len(seq))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask)}

    losses = _train(peft_model, make_batch, len(encoded), cfg, "fine-tune LM", answer_loss)
    summary = {"base": str(base), "config": asdict(cfg), "examples": len(encoded),
               "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "perplexity_of_answers": math.exp(sum(losses[-20:]) / len(losses[-20:]))}
    return _save(peft_model, tokenizer, out, summary)
