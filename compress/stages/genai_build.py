"""onnxruntime-genai 0.18's model builder: the ``onnx-genai`` format.

* ``check_genai_supported`` — one line naming why the builder cannot take a model.
* ``normalise_config`` — the rewrites of a transformers 5 config that the builder needs
  (recorded in the manifest): Gemma 3's per-layer-type ``rope_parameters`` flattened,
  its ``rope_local_base_freq`` restored.
* ``build_genai`` — the builder itself, fp32 / int4 (MatMulNBits), or int8 (the fp32
  build with per-channel dynamic int8 MatMuls, which the builder itself does not offer).

Every model is built with ``windowed_kv_cache=false``: a sliding-window layer then keeps
a full-length KV cache (its attention still sees only the window), the layout the
serving engine's :class:`serve.step_lm_genai.GenaiStepLM` binds in place; 0.18's default
window-sized ring buffers would need the runtime's own cache management.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError

log = logging.getLogger(__name__)

#: Architectures verified on tiny random models (tests/unit/test_genai_archs.py).
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                       "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM",
                       "Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM",
                       "GraniteForCausalLM", "HunYuanDenseV1ForCausalLM")
#: Architectures transformers 5 runs that 0.18's builder does not give a working model for.
_QWEN35 = ("a build (as Qwen3_5ForConditionalGeneration, the only class its builder "
           "takes) does not run on onnxruntime 1.31: RotaryEmbedding rejects its 3-D MRoPE "
           "position_ids")
_NOT_BUILT = {
    "Qwen3_5ForCausalLM": _QWEN35,
    "Qwen3_5ForConditionalGeneration": _QWEN35,
    "OlmoForCausalLM": "its OLMo graph's log-probs differ from transformers 5's by ~9 "
                       "nats (measured on a tiny model)",
    "Gemma4ForCausalLM": "its builder takes only Gemma4ForConditionalGeneration "
                         "checkpoints (weights under model.language_model) and has no "
                         "per-layer input embeddings",
}


class GenaiBuildError(InputError):
    """onnxruntime-genai's builder cannot build the model as asked."""


def _read_config(src: Path) -> dict[str, Any]:
    from compress.models import read_json

    return read_json(src / "config.json")


def check_genai_supported(src: Path) -> None:
    """Raise GenaiBuildError (one line) when onnxruntime-genai's builder cannot build this
    model."""
    config = _read_config(src)
    arch = (config.get("architectures") or ["?"])[0]
    others = "use format: onnx or a torch variant (nf4/int8-bnb) instead"
    if arch in _NOT_BUILT:
        raise GenaiBuildError(f"onnxruntime-genai 0.18 cannot build {arch}: "
                              f"{_NOT_BUILT[arch]}; {others}")
    if arch not in GENAI_ARCHITECTURES:
        raise GenaiBuildError(f"onnxruntime-genai cannot build architecture {arch}; {others}")
    if arch == "SmolLM3ForCausalLM" and 0 in (config.get("no_rope_layers") or []):
        # 0.18's SmolLM3 builder turns a no-RoPE layer into a layer with an external
        # RoPE op fed by a position_ids input it has removed (KeyError: 'position_ids')
        raise GenaiBuildError("onnxruntime-genai 0.18's builder cannot build a "
                              "SmolLM3ForCausalLM with no-RoPE layers (no_rope_layers has "
                              f"0 entries: it fails on position_ids); {others}")
    heads = config.get("num_attention_heads") or 1
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    if head_size % 16:
        raise GenaiBuildError(f"onnxruntime-genai's GroupQueryAttention needs a head size "
                              f"that is a multiple of 16 (this model has {head_size}); "
                              f"{others}")


def normalise_config(config: Any) -> list[str]:
    """Rewrite, in place, the transformers config object the builder reads; one note per
    rewrite (empty: used as is).

    transformers 5 holds Gemma 3's ``rope_parameters`` per layer type
    (``{"full_attention": {...}, "sliding_attention": {...}}``) and folds a checkpoint's
    ``rope_local_base_freq`` into it; 0.18's Gemma 3 builder reads
    ``rope_parameters["rope_type"]`` (KeyError) and ``rope_local_base_freq``. The config
    on disk is untouched (the builder loads the weights with transformers, which wants
    the nested form).
    """
    rope = getattr(config, "rope_parameters", None)
    notes: list[str] = []
    if (getattr(config, "model_type", None) == "gemma3_text" and isinstance(rope, dict)
            and "full_attention" in rope):
        config.rope_parameters = dict(rope["full_attention"])
        notes.append("rope_parameters: its full_attention entry (the per-layer-type dict "
                     "flattened)")
        local = rope.get("sliding_attention", {}).get("rope_theta")
        if local is not None and getattr(config, "rope_local_base_freq", None) is None:
            config.rope_local_base_freq = local
            notes.append(f"rope_local_base_freq: {local} (the sliding_attention rope_theta)")
    return notes


def build_genai(src: Path, dst: Path, precision: str, device: str = "cpu",
                block_size: int = 32, symmetric: bool = True,
                algorithm: str | None = None) -> dict[str, Any]:
    """Build an onnxruntime-genai model folder with its model builder.

    Args:
        src: The reference causal LM folder (safetensors + tokenizer).
        dst: Output folder (``model.onnx`` + data, ``genai_config.json``, tokenizer).
        precision: ``fp32``, ``fp16`` (CUDA only), ``int8`` or ``int4``.
        device: ``cpu`` or ``cuda`` (the execution provider the model is built for).
        block_size: Block size of int4 weight quantization.
        symmetric: Symmetric int4 quantization.
        algorithm: The builder's ``algo_config`` (``rtn``, ``k_quant``,
            ``k_quant_mixed``, ...); None keeps its default RTN.

    Returns:
        Details for the manifest (builder options, config normalisations).

    Raises:
        GenaiBuildError: the builder cannot build this model.
    """
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    check_genai_supported(src)
    builder_precision = "fp32" if precision == "int8" else precision
    options: dict[str, Any] = {"hf_remote": False, "windowed_kv_cache": False}
    if precision == "int4":
        options.update(block_size=block_size, is_symmetric=symmetric,
                       accuracy_level=4 if device == "cpu" else 0)
        if algorithm:
            options["algo_config"] = algorithm
    cache = dst.parent / f"{dst.name}-builder-cache"
    buffer = io.StringIO()
    try:
        # the builder prints progress and tqdm bars: they go to the debug log
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            prepared = parse_extra_options(
                "", str(src), str(dst), builder_precision, device, str(cache),
                [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in options.items()])
            notes = normalise_config(prepared["hf_details"]["hf_config"])
            create_model("", str(src), str(dst), builder_precision, device, str(cache),
                         **prepared)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GenaiBuildError(f"onnxruntime-genai builder failed: {type(exc).__name__}: "
                              f"{first}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    log.debug("genai builder output: %s", buffer.getvalue()[-2000:])
    details: dict[str, Any] = {"builder": "onnxruntime_genai.models.builder",
                               "builder_precision": builder_precision,
                               "execution_provider": device, "options": options,
                               "config_normalisations": notes}
    if precision == "int8":
        from compress.stages.quantize import int8_dynamic_inplace

        details["int8"] = int8_dynamic_inplace(dst)
    return details
