"""Merge stage: LoRA adapter(s) folded into the base weights.

Semantics of several adapters with weights ``w_i``: adapters are merged one after the
other, adapter ``i`` with its LoRA scaling multiplied by ``w_i``, so every adapted weight
ends as ``W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i`` — the weighted sum of the adapters'
own deltas. Whole modules an adapter replaces (``modules_to_save``, e.g. a classifier
head) are not scaled: they are taken from the last adapter that carries them.

Every merge step is checked: logits of the merged model against the unmerged
base+adapter forward pass on sample inputs (max abs diff, top-1 agreement).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compress.errors import InputError, StageFailed
from compress.models import (
    check_safetensors,
    copy_model_folder,
    load_model,
    load_tokenizer,
    read_json,
    sample_texts,
    save_model,
)
from compress.recipe import Recipe
from compress.recipe_sections import MergeConfig
from compress.stages.base import StageContext, StageResult

log = logging.getLogger(__name__)

HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def _adapter_head_labels(adapter: Path) -> int | None:
    """Number of labels of a classifier head saved in an adapter, if any."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            if key.endswith(HEAD_SUFFIXES) and "lora_" not in key:
                return int(fh.get_slice(key).get_shape()[0])
    return None


def _check_head(recipe: Recipe, files: list[Path]) -> None:
    """Refuse a classification base that has no classifier head and no adapter with one.

    Without head weights every load draws a new random head: the variants would then
    "differ" from the reference for no reason the user could see.
    """
    from safetensors import safe_open

    if recipe.task != "text-classification" or any(
            _adapter_head_labels(a.path) is not None for a in recipe.adapters):
        return
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            if any(key.endswith(HEAD_SUFFIXES) for key in fh.keys()):  # noqa: SIM118
                return
    raise InputError(f"base.path: {recipe.base.path} has no classifier head weights (none of "
                     f"{', '.join(HEAD_SUFFIXES)}): it is an encoder, not a fine-tuned "
                     "classifier, and every load would draw a new random head; give a "
                     "fine-tuned classification checkpoint, or an adapter trained with the "
                     "head in modules_to_save")


def _label_kwargs(recipe: Recipe) -> dict[str, Any]:
    """num_labels / id2label for a classifier, from the recipe, adapters or base config."""
    if recipe.task != "text-classification":
        return {}
    num = None
    for adapter in recipe.adapters:
        num = _adapter_head_labels(adapter.path) or num
    labels = recipe.labels
    if labels is None:
        config = read_json(recipe.base.path / "config.json")
        id2label = config.get("id2label") or {}
        if id2label and (num is None or len(id2label) == num):
            labels = [id2label[str(i)] for i in range(len(id2label))]
    if labels is not None and num is not None and len(labels) != num:
        raise InputError(f"labels: recipe names {len(labels)} labels but the adapter head "
                         f"has {num} outputs")
    if labels is None:
        labels = [f"LABEL_{i}" for i in range(num or 2)]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def fake_quantize_4bit(weight, scheme: str, block_size: int = 64):
    """Round-trip a weight through blockwise 4-bit quantization (absmax per block).

    This is the bitsandbytes NF4/FP4 algorithm (nearest code value after absmax scaling
    over contiguous blocks of 64) written in torch, because bitsandbytes 0.50's CPU
    4-bit kernels give wrong dequantized values (measured: mean abs error 0.28 vs 0.075).
    """
    import bitsandbytes.functional as bnbf
    import torch

    code = bnbf.get_4bit_type(scheme, device="cpu").to(torch.float32)
    flat = weight.detach().to(torch.float32).flatten()
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    out = (code[idx] * absmax).flatten()[: flat.numel()]
    return out.view_as(weight).to(weight.dtype)


def dequantized_base(model, scheme: str) -> list[str]:
    """Replace each Linear weight that bitsandbytes would quantize by its 4-bit round trip.

    Returns:
        Names of the modules that were round-tripped.
    """
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model))
    done = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(
                    name == s or name.startswith(s + ".") or name.endswith("." + s)
                    for s in skip):
                module.weight.copy_(fake_quantize_4bit(module.weight, scheme))
                done.append(name)
    return done


def _logits(model, batch) -> Any:
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def _compare(reference, merged, mask) -> dict[str, float]:
    import torch

    if not torch.isfinite(merged).all():
        raise StageFailed("merge: merged model produces NaN/inf logits")
    if mask is not None and reference.dim() == 3:
        keep = mask.bool()
        reference, merged = reference[keep], merged[keep]
    diff = (reference - merged).abs().max().item()
    agree = (reference.argmax(-1) == merged.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "top1_agreement": agree}


def _apply_adapter(model, adapter: Path, weight: float, name: str, what: str):
    """Wrap ``model`` with one adapter, its LoRA scaling multiplied by ``weight``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        if "size mismatch" in str(exc):
            first = "size mismatch: " + str(exc).split("size mismatch", 1)[1].splitlines()[0]
        raise InputError(f"{what}: {adapter}: adapter does not fit this base model "
                         f"({first[:300]})") from None
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.scaling[name] *= weight
    return peft_model.eval()


def merge(config: MergeConfig, src: Path, dst: Path, ctx: StageContext) -> StageResult:
    """Merge the recipe's adapters into the base model at ``src`` and save to ``dst``.

    Args:
        config: Merge settings (tolerance, number of check samples).
        src: The base model folder.
        dst: Empty output folder.
        ctx: Stage context (the recipe).

    Returns:
        Fidelity metrics per adapter and which base weights were used.

    Raises:
        InputError: Unreadable base or adapter, an adapter made for another base, or a
            classification base without classifier head weights (and no adapter head).
        StageFailed: NaN/inf or a logits difference above ``config.tolerance``.
    """
    recipe = ctx.recipe
    base = recipe.base
    if not base.gguf_file:
        _check_head(recipe, check_safetensors(src, "base.path"))
    for i, adapter in enumerate(recipe.adapters):
        check_safetensors(adapter.path, f"adapters[{i}].path")

    details: dict[str, Any] = {"base": str(src), "adapters": [
        {"path": str(a.path), "weight": a.weight} for a in recipe.adapters]}
    if not recipe.adapters and not base.gguf_file and not base.trained_quantization:
        ctx.report("full fine-tune: copying the model unchanged")
        copy_model_folder(src, dst)
        details["base_weights"] = "unchanged (full fine-tune, no adapters)"
        return StageResult(metrics={"adapters": 0}, details=details)

    ctx.report("loading base model")
    model = load_model(recipe.task, src, gguf_file=base.gguf_file,
                       trust_remote_code=base.trust_remote_code, **_label_kwargs(recipe))
    tokenizer = load_tokenizer(*[a.path for a in reversed(recipe.adapters)], src,
                               gguf_file=base.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base.trained_quantization:
        ctx.report(f"dequantizing base ({base.trained_quantization} round trip)")
        modules = dequantized_base(model, base.trained_quantization)
        details["base_weights"] = (f"{base.trained_quantization} quantize/dequantize round trip "
                                   f"(blocksize 64, absmax fp32) of {len(modules)} Linear layers")
    else:
        details["base_weights"] = "original"

    batch = tokenizer(sample_texts(config.check_samples), return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    mask = batch["attention_mask"] if recipe.task == "text-generation" else None
    base_logits = _logits(model, batch)
    checks = []
    for i, adapter in enumerate(recipe.adapters):
        ctx.report(f"merging adapter {i + 1}/{len(recipe.adapters)}")
        peft_model = _apply_adapter(model, adapter.path, adapter.weight, f"a{i}",
                                    f"adapters[{i}].path")
        reference = _logits(peft_model, batch)
        model = peft_model.merge_and_unload(safe_merge=True)
        check = _compare(reference, _logits(model, batch), mask)
        check["adapter"] = str(adapter.path)
        checks.append(check)
        if check["max_abs_diff"] > config.tolerance:
            raise StageFailed(f"merge: adapters[{i}]: merged logits differ from base+adapter "
                              f"by {check['max_abs_diff']:.3g} > tolerance {config.tolerance}")
    # How much the adapters change the outputs: a merge that changed nothing is suspicious.
    details["delta_vs_base_max_abs"] = (base_logits - _logits(model, batch)).abs().max().item()
    ctx.report("saving merged model")
    save_model(model, tokenizer, dst)
    metrics = {
        "adapters": len(recipe.adapters),
        "max_abs_diff": max((c["max_abs_diff"] for c in checks), default=0.0),
        "top1_agreement": min((c["top1_agreement"] for c in checks), default=1.0),
        "check_samples": config.check_samples,
        "per_adapter": checks,
    }
    return StageResult(metrics=metrics, details=details)
