"""onnxruntime-genai 0.18's model builder: the ``onnx-genai`` format.

* ``check_genai_supported`` — one line naming why the builder cannot take a model.
* ``normalise_config`` / ``_builder_input`` — the rewrites of a transformers 5 config that
  the builder needs (recorded in the manifest): Gemma 3's per-layer-type
  ``rope_parameters`` flattened, its ``rope_local_base_freq`` restored; Phi-3 LongRoPE's
  ``rope_type`` also under its old key ``type``; a text-only Qwen3.5 presented as the
  ``Qwen3_5ForConditionalGeneration`` the builder takes, with MRoPE sections; SmolLM3's
  no-RoPE layers built with RoPE, then their attention's rotation switched off.
* ``build_genai`` — the builder itself, fp32 / int4 (MatMulNBits), or int8 (the fp32
  build with per-channel dynamic int8 MatMuls, which the builder itself does not offer).

Every model is built with ``windowed_kv_cache=false``: a sliding-window layer then keeps
a full-length KV cache (its attention still sees only the window), the layout the
serving engine's :class:`serve.runtime.step_lm_genai.GenaiStepLM` binds in place; 0.18's default
window-sized ring buffers would need the runtime's own cache management.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError

log = logging.getLogger(__name__)

#: Architectures verified on tiny random models (tests/unit/test_genai_archs.py).
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                       "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM",
                       "Gemma2ForCausalLM", "Gemma3ForCausalLM", "SmolLM3ForCausalLM",
                       "GraniteForCausalLM", "HunYuanDenseV1ForCausalLM",
                       "Qwen3_5ForCausalLM")
#: Architectures transformers 5 runs that 0.18's builder does not give a working model for.
_NOT_BUILT = {
    "OlmoForCausalLM": "its OLMo graph's log-probs differ from transformers 5's by ~9 "
                       "nats (measured on a tiny model)",
    "Gemma4ForCausalLM": "its builder takes only Gemma4ForConditionalGeneration "
                         "checkpoints, and staged as one it reads head_dim globally, which "
                         "transformers 5's per-layer Gemma 4 config refuses "
                         "(AmbiguousGlobalPerLayerAttributeError)",
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
    ``rope_parameters["rope_type"]`` (KeyError) and ``rope_local_base_freq``; its Phi-3
    LongRoPE builder reads ``rope_parameters["type"]``. The config
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
    if (isinstance(rope, dict) and rope.get("rope_type") == "longrope"
            and "type" not in rope):
        # 0.18's Phi-3 LongRoPE builder still reads the transformers 4 key ``type``
        config.rope_parameters = {**rope, "type": "longrope"}
        notes.append("rope_parameters.type: longrope (the transformers 4 name of rope_type)")
    return notes


def _rope_in_every_layer(config: Any) -> list[int]:
    """SmolLM3's no-RoPE layers (``no_rope_layers[i] == 0``), after setting every layer to
    RoPE in the config object: 0.18's builder turns a no-RoPE layer into one with an
    external RoPE op fed by a ``position_ids`` input it has removed (KeyError), so the
    model is built with RoPE everywhere and :func:`_disable_rotary` takes it out again."""
    flags = list(getattr(config, "no_rope_layers", None) or [])
    if getattr(config, "model_type", None) != "smollm3" or all(flags):
        return []
    config.no_rope_layers = [1] * len(flags)
    return [i for i, flag in enumerate(flags) if not flag]


def _disable_rotary(dst: Path, layers: list[int]) -> None:
    """Set ``do_rotary=0`` on the GroupQueryAttention of each of ``layers`` in
    ``dst/model.onnx`` (its weights stay in their external data file)."""
    import onnx

    model = onnx.load(dst / "model.onnx", load_external_data=False)
    done = set()
    for node in model.graph.node:
        match = re.match(r"/model/layers\.(\d+)/", node.name)
        if node.op_type == "GroupQueryAttention" and match and int(match[1]) in layers:
            for attribute in node.attribute:
                if attribute.name == "do_rotary":
                    attribute.i = 0
                    done.add(int(match[1]))
    if done != set(layers):
        raise GenaiBuildError(f"onnxruntime-genai build: no fused-RoPE GroupQueryAttention "
                              f"found for no-RoPE layers {sorted(set(layers) - done)}")
    onnx.save(model, dst / "model.onnx")


def _qwen35_mrope_section(text: dict[str, Any]) -> list[int]:
    """transformers' default MRoPE sections (a text-only Qwen3.5 config may carry none), or
    three near-equal ones where those do not fit the rotary size; text positions are the
    same in every section, so any split gives the same rotation."""
    rope = text.get("rope_parameters") or {}
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
    if half == 32:
        return [11, 11, 10]
    return [half - 2 * (half // 3), half // 3, half // 3]


def _builder_input(src: Path, staging: Path) -> tuple[Path, list[str]]:
    """The folder the builder reads: ``src``, or for a text-only Qwen3.5 ``staging`` (links
    to ``src``'s files under a ``Qwen3_5ForConditionalGeneration`` config, the only Qwen3.5
    class 0.18's builder takes; transformers maps the text checkpoint's weight names)."""
    config = _read_config(src)
    if (config.get("architectures") or ["?"])[0] != "Qwen3_5ForCausalLM":
        return src, []
    notes = ["architectures: Qwen3_5ForConditionalGeneration (this config nested as its "
             "text_config, a minimal vision_config the builder does not export)"]
    text = {k: v for k, v in config.items() if k not in ("architectures",
                                                         "transformers_version")}
    rope = dict(text.get("rope_parameters") or {})
    if "mrope_section" not in rope:
        rope.update(mrope_section=_qwen35_mrope_section(text), mrope_interleaved=True)
        text["rope_parameters"] = rope
        notes.append(f"rope_parameters.mrope_section: {rope['mrope_section']} "
                     "(interleaved; text positions are the same in every section)")
    staging.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != "config.json":
            (staging / path.name).symlink_to(path.resolve())
    (staging / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "text_config": text, "tie_word_embeddings": text.get("tie_word_embeddings", False),
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                          "num_heads": 1, "out_hidden_size": text["hidden_size"]}},
        indent=2))
    return staging, notes


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
    staging = dst.parent / f"{dst.name}-builder-input"
    shutil.rmtree(staging, ignore_errors=True)
    buffer = io.StringIO()
    try:
        builder_src, notes = _builder_input(src, staging)
        # the builder prints progress and tqdm bars: they go to the debug log
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            prepared = parse_extra_options(
                "", str(builder_src), str(dst), builder_precision, device, str(cache),
                [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in options.items()])
            notes += normalise_config(prepared["hf_details"]["hf_config"])
            no_rope = _rope_in_every_layer(prepared["hf_details"]["hf_config"])
            create_model("", str(builder_src), str(dst), builder_precision, device,
                         str(cache), **prepared)
        if no_rope:
            _disable_rotary(dst, no_rope)
            notes.append(f"no_rope_layers: built with RoPE in every layer, then "
                         f"GroupQueryAttention do_rotary=0 in layers {no_rope}")
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GenaiBuildError(f"onnxruntime-genai builder failed: {type(exc).__name__}: "
                              f"{first}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    if builder_src != src:
        # the builder re-saves the tokenizer it loads from the staged folder, whose config
        # can pick another tokenizer class (Qwen3_5Tokenizer): keep the model's own files
        for path in dst.iterdir():
            if path.name != "genai_config.json" and (src / path.name).is_file():
                shutil.copy2(src / path.name, path)
    log.debug("genai builder output: %s", buffer.getvalue()[-2000:])
    details: dict[str, Any] = {"builder": "onnxruntime_genai.models.builder",
                               "builder_precision": builder_precision,
                               "execution_provider": device, "options": options,
                               "config_normalisations": notes}
    if precision == "int8":

        details["int8"] = int8_dynamic_inplace(dst)
    return details


def int8_dynamic_inplace(folder: Path) -> dict[str, Any]:
    """Quantize ``folder/model.onnx`` (+ external data) to dynamic int8 MatMuls in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = folder / "model.onnx"
    tmp = folder / "model.int8.onnx"
    quantize_dynamic(src, tmp, per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    for data in folder.glob("model.onnx.data"):
        data.unlink()
    tmp.replace(src)
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "per_channel": True,
            "weight_type": "QInt8", "op_types_to_quantize": ["MatMul"]}
