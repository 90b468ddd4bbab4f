"""Loading and saving Hugging Face models for the stages: safetensors only, offline."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(folder: Path, what: str) -> list[Path]:
    """Check that ``folder`` holds readable safetensors weights.

    Args:
        folder: A model or adapter folder.
        what: How the error names the folder (``base.path``, ``adapters[0].path``).

    Returns:
        The safetensors files.

    Raises:
        InputError: No safetensors file, or one whose header cannot be read.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.suffix in UNSAFE_WEIGHTS]
        hint = f" (found {pickled[0]}: convert it to safetensors)" if pickled else ""
        raise InputError(f"{what}: {folder}: no .safetensors weights; modelpress loads only "
                         f"safetensors{hint}")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    fh.get_slice(key)
        except Exception as exc:  # safetensors raises several types for a bad header
            raise InputError(f"{what}: {path}: corrupt safetensors file "
                             f"({str(exc).splitlines()[0]})") from None
    return files


def model_class(task: str):
    """The transformers auto class for a task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "text-classification":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def load_model(task: str, path: Path, *, gguf_file: str | None = None,
               trust_remote_code: bool = False, **kwargs: Any):
    """Load a model in fp32, eval mode, from safetensors (or a GGUF file, dequantized).

    Raises:
        InputError: The folder cannot be loaded as a model for ``task``.
    """
    import torch

    cls = model_class(task)
    try:
        if gguf_file:
            model = cls.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32,
                                        trust_remote_code=trust_remote_code, **kwargs)
            # GGUF weights arrive dequantized; drop the quantizer so it saves as plain fp32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model = cls.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                        trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{path}: cannot load as a {task} model "
                         f"({str(exc).strip().splitlines()[0]})") from None
    return model.eval()


def load_tokenizer(*folders: Path, gguf_file: str | None = None):
    """Load the tokenizer from the first folder that has tokenizer files.

    Else the one converted from ``gguf_file`` (in the last folder), checked against the
    GGUF's own tokenization (``gguf_tokenizer.checked_tokenizer``: rebuilt from the GGUF
    vocabulary where transformers' conversion is wrong).

    Raises:
        InputError: No tokenizer, or a GGUF whose converted tokenizer differs from its own
            tokenization and cannot be rebuilt.
    """
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(folder)
    if gguf_file:
        from compress.stages.gguf_tokenizer import checked_tokenizer

        converted = AutoTokenizer.from_pretrained(folders[-1], gguf_file=gguf_file)
        return checked_tokenizer(converted, folders[-1] / gguf_file)
    raise InputError(f"{folders[-1]}: no tokenizer files found")


def save_model(model, tokenizer, dst: Path) -> None:
    """Save a model (safetensors) and its tokenizer in ``save_pretrained`` layout."""
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)


def copy_model_folder(src: Path, dst: Path) -> None:
    """Copy a model folder's safetensors, configs and tokenizer files (no pickled weights)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".jinja", ".txt",
                                              ".model"):
            shutil.copy2(path, dst / path.name)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, raising InputError naming it when it is invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from None


def sample_texts(n: int) -> list[str]:
    """Fixed, varied English inputs for fidelity checks (no dataset needed)."""
    base = [
        "the movie was great and the music was wonderful",
        "what is the capital of france ?",
        "a boring plot , but the actress is brilliant",
        "i really hate this film",
        "one two three",
        "the best city in the country is paris",
        "it was not very funny and quite dull",
        "who was the actor in that scene ?",
    ]
    return [base[i % len(base)] + (" ." * (i // len(base))) for i in range(n)]
