"""Export: the reference model as ONNX (optimum) or as an onnxruntime-genai folder.

* ``export_onnx`` — optimum-onnx's exporter (``text-classification`` or
  ``text-generation-with-past``), then a check of ONNX Runtime against torch on sample
  inputs: max abs logit difference within a tolerance and, for causal LMs, the same greedy
  continuation token for token.
* ``convert_fp16`` — an fp32 ONNX model converted to fp16 (I/O kept fp32) for CUDA targets.
* onnxruntime-genai's model builder (format ``onnx-genai``) is in
  :mod:`compress.stages.genai_build`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError, StageFailed
from compress.models import sample_texts

log = logging.getLogger(__name__)

OPTIMUM_TASKS = {"text-classification": "text-classification",
                 "text-generation": "text-generation-with-past"}
#: Files an ONNX artifact keeps besides the graph (tokenizer, configs).
SIDE_FILES = (".json", ".jinja", ".txt", ".model")


class ExportError(InputError):
    """The model cannot be exported as asked (architecture, task or option)."""


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and config files (not weights) from ``src`` to ``dst``."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in SIDE_FILES:
            shutil.copy2(path, dst / path.name)


def _quiet():
    """Silence the exporters' prints and tracer warnings (they go to the debug log)."""
    buffer = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(buffer))
    stack.enter_context(contextlib.redirect_stderr(buffer))  # the builder's tqdm bars
    import warnings

    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack, buffer


def export_onnx(src: Path, dst: Path, task: str) -> dict[str, Any]:
    """Export a Hugging Face model folder to ONNX with optimum-onnx.

    Args:
        src: The reference model folder (safetensors + tokenizer).
        dst: Output folder (gets ``model.onnx``, config and tokenizer files).
        task: ``text-classification`` or ``text-generation``.

    Returns:
        Details for the manifest (optimum task, opset).

    Raises:
        ExportError: optimum cannot export this architecture for this task.
    """
    from optimum.exporters.onnx import main_export

    optimum_task = OPTIMUM_TASKS[task]
    stack, buffer = _quiet()
    try:
        with stack:
            main_export(str(src), dst, task=optimum_task, do_validation=False,
                        local_files_only=True, library_name="transformers")
    except (ValueError, KeyError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ExportError(f"optimum cannot export this model for {optimum_task} ({first}); "
                          "use a torch variant (nf4/int8-bnb) or a supported "
                          "architecture") from None
    log.debug("optimum export output: %s", buffer.getvalue()[-2000:])
    if not (dst / "model.onnx").is_file():
        raise ExportError(f"optimum exported no model.onnx for {src} ({optimum_task})")
    import onnx

    opset = max((o.version for o in onnx.load(dst / "model.onnx", load_external_data=False)
                 .opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {"exporter": "optimum-onnx", "optimum_task": optimum_task, "opset": opset}


def _session(model: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def check_classifier(torch_dir: Path, onnx_dir: Path, tolerance: float,
                     n: int = 8) -> dict[str, Any]:
    """Compare ONNX Runtime logits with torch logits on sample texts.

    Raises:
        StageFailed: NaN/inf or a max abs difference above ``tolerance``.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    batch = tok(sample_texts(n), padding=True, truncation=True, max_length=128,
                return_tensors="np")
    session = _session(onnx_dir / "model.onnx")
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.astype(np.int64) for k, v in batch.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    onnx_logits = session.run(None, feed)[0].astype(np.float64)
    model = AutoModelForSequenceClassification.from_pretrained(torch_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model.eval()(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
    ref = ref.double().numpy()
    diff = float(np.abs(onnx_logits - ref).max())
    limit = tolerance * max(1.0, float(np.abs(ref).max()))
    agreement = float((onnx_logits.argmax(-1) == ref.argmax(-1)).mean())
    if not np.isfinite(onnx_logits).all() or diff > limit:
        raise StageFailed(f"ONNX Runtime logits differ from torch by {diff:.3g} "
                          f"(allowed {limit:.3g})")
    return {"max_abs_diff": diff, "top1_agreement": agreement, "samples": n,
            "allowed_abs_diff": limit}


def greedy_torch(torch_dir: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) of the torch reference, one by one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(torch_dir)
    model = AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(seq[0, ids["input_ids"].shape[1]:].tolist())
    return out


def check_causal_lm(torch_dir: Path, onnx_dir: Path, tolerance: float, n: int = 4,
                    max_new_tokens: int = 12) -> dict[str, Any]:
    """Compare optimum's ORT causal LM with torch: logits and greedy continuations.

    Raises:
        StageFailed: a logit difference above ``tolerance`` or a different continuation.
    """
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    prompts = sample_texts(n)
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    model = AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    diff = limit = 0.0
    same = 0
    for prompt, ref_ids in zip(prompts, greedy_torch(torch_dir, prompts, max_new_tokens),
                               strict=True):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = model(**ids).logits.double().numpy()
            got = ort_model(**ids).logits.double().numpy()
            seq = ort_model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     min_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if not np.isfinite(got).all():
            raise StageFailed("ONNX Runtime logits contain NaN/inf")
        diff = max(diff, float(np.abs(got - ref).max()))
        limit = max(limit, tolerance * max(1.0, float(np.abs(ref).max())))
        same += seq[0, ids["input_ids"].shape[1]:].tolist() == ref_ids
    if diff > limit or same < n:
        raise StageFailed(f"ONNX Runtime differs from torch: max logit diff {diff:.3g} "
                          f"(allowed {limit:.3g}), identical greedy continuations "
                          f"{same}/{n}")
    return {"max_abs_diff": diff, "greedy_identical": same / n, "samples": n,
            "max_new_tokens": max_new_tokens, "allowed_abs_diff": limit}


def convert_fp16(src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """Convert ``src_dir/model.onnx`` (fp32) to fp16 in ``dst_dir`` (inputs/outputs stay fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src_dir / "model.onnx")
    stack, _ = _quiet()
    with stack:
        half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, dst_dir / "model.onnx")
    copy_side_files(src_dir, dst_dir)
    return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}
