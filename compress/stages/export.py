"""Export: the reference model as ONNX or as an onnxruntime-genai folder.

* ``export_onnx`` — one ONNX graph traced by transformers' exporter
  (:mod:`compress.stages.onnx_export`): a sequence classifier, or a causal LM with its KV
  cache under optimum-onnx's I/O names; then a check of ONNX Runtime against torch on
  sample inputs: max abs logit difference within a tolerance and, for causal LMs, the same
  greedy continuation token for token, decoded as a batch by the serving engine's
  :class:`serve.runtime.step_lm_onnx.OnnxStepLM`.
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

#: Files an ONNX artifact keeps besides the graph (tokenizer, configs).
SIDE_FILES = (".json", ".jinja", ".txt", ".model")
#: Models are traced through their eager attention: the SDPA path's graph (the boolean
#: mask rebuilt, a Where per layer for fully masked rows, more Slice/Reshape/Concat) ran
#: slower in ONNX Runtime: MiniLM int8 ~8% at batch 16, SmolLM2 fp32 decode 1.07x (1
#: stream) and 1.49x (8 streams) faster eager, medians of 5 rounds (docs/benchmarks.md,
#: "transformers 5 stack: idle-machine A/B" and "Causal LMs traced eager").
EXPORT_ATTENTION = "eager"
#: Bumped when :func:`export_onnx`'s graphs change: a cached fp32 export of another version
#: is not reused (:func:`compress.stages.variant_inputs.fp32_onnx`). 2: eager classifiers;
#: 3: eager causal LMs.
EXPORT_VERSION = 3
#: Loggers of the tracer, quiet during an export (their warnings go to the debug log).
TRACER_LOGGERS = ("torch.export", "torch._export", "torch.onnx", "torch._dynamo",
                  "torch.fx", "transformers")


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
    for name in TRACER_LOGGERS:
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    return stack, buffer


def export_onnx(src: Path, dst: Path, task: str) -> dict[str, Any]:
    """Export a Hugging Face model folder to ONNX (``dst/model.onnx`` + side files).

    A classifier takes ``input_ids``, ``attention_mask`` (+ ``token_type_ids``) and gives
    ``logits``; a causal LM is one graph with a KV cache (see
    :func:`compress.stages.onnx_export.export_causal_lm`). Batch, sequence and past axes
    are dynamic; a graph past 2 GB keeps its weights in ``model.onnx.data``.

    Args:
        src: The reference model folder (safetensors + tokenizer).
        dst: Output folder (gets ``model.onnx``, config and tokenizer files).
        task: ``text-classification`` or ``text-generation``.

    Returns:
        Details for the manifest (exporter, opset).

    Raises:
        ExportError: the exporter does not take this architecture for this task.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from compress.models import read_json
    from compress.stages import onnx_export

    try:
        arch = onnx_export.check_exportable(read_json(src / "config.json"), task)
    except onnx_export.UnsupportedArchitecture as exc:
        raise ExportError(str(exc)) from None
    cls = (AutoModelForSequenceClassification if task == "text-classification"
           else AutoModelForCausalLM)
    stack, buffer = _quiet()
    try:
        with stack:
            model = cls.from_pretrained(src, dtype=torch.float32,
                                        attn_implementation=EXPORT_ATTENTION).eval()
            program = (onnx_export.export_classifier(model) if task == "text-classification"
                       else onnx_export.export_causal_lm(model))
    except onnx_export.UnsupportedArchitecture as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # torch.export / onnxscript raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"format onnx could not export {arch} for {task} ({first}); "
                          "use a torch variant (nf4/int8-bnb)") from None
    log.debug("exporter output: %s", buffer.getvalue()[-2000:])
    onnx_export.save(program, dst)
    copy_side_files(src, dst)
    return {"exporter": onnx_export.EXPORTER, "opset": onnx_export.opset(program),
            "architecture": arch, "attention": EXPORT_ATTENTION}


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
    """Compare the ONNX causal LM with torch: logits and greedy continuations.

    The logits are those of each whole prompt (an empty past); the greedy continuations
    are decoded for all ``n`` prompts together by :class:`serve.runtime.step_lm_onnx.OnnxStepLM`
    (left-padded batch rows, KV cache), and must equal torch's, prompt by prompt.

    Raises:
        StageFailed: a logit difference above ``tolerance`` or a different continuation.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.runtime.step_lm_onnx import OnnxStepLM

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    prompts = sample_texts(n)
    session = _session(onnx_dir / "model.onnx")
    model = AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    rows = [tok(prompt)["input_ids"] for prompt in prompts]
    step = OnnxStepLM(session, max(len(r) for r in rows) + max_new_tokens + 1)
    diff = limit = 0.0
    for row in rows:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([row])).logits[0].double().numpy()
        got = step.prompt_logits(row).astype(np.float64)
        if not np.isfinite(got).all():
            raise StageFailed("ONNX Runtime logits contain NaN/inf")
        diff = max(diff, float(np.abs(got - ref).max()))
        limit = max(limit, tolerance * max(1.0, float(np.abs(ref).max())))
    # torch's reference runs with min_new_tokens = max_new_tokens, which masks EOS
    eos = model.generation_config.eos_token_id
    eos_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]

    def pick(logits: np.ndarray) -> int:
        logits = logits.copy()
        logits[..., eos_ids] = -np.inf
        return int(np.argmax(logits))

    greedy = [[pick(step.prefill(slot, row))] for slot, row in enumerate(rows)]
    slots = list(range(len(rows)))
    for _ in range(max_new_tokens - 1):
        logits = step.decode(slots, [g[-1] for g in greedy])
        for out, row in zip(greedy, logits, strict=True):
            out.append(pick(row))
    same = sum(got == ref for got, ref in zip(
        greedy, greedy_torch(torch_dir, prompts, max_new_tokens), strict=True))
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
