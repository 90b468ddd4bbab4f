"""Inputs of the offline benchmark recipes, built once into ``build/bench``.

* ``minilm-cls``: all-MiniLM-L6-v2 with a 2-label head (seeded, untrained: the LoRA
  fine-tune of the demo is not used here, so accuracy is near chance; latency, size,
  agreement and KL against the reference are what this measures).
* ``sentiment-test.jsonl``: the Rotten Tomatoes demo test split (compress.data).
* ``smollm2-135m-instruct``: SmolLM2 converted from the shipped GGUF (compress.demo.assets).
* ``lm-eval.jsonl``: 24 passages of Hamlet (scattertext) for perplexity.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

def minilm_classifier(dst: Path) -> Path:
    """MiniLM with a seeded 2-label classification head, saved as safetensors."""
    if (dst / "model.safetensors").is_file():
        return dst
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compress.demo.assets import minilm_path

    torch.manual_seed(0)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(dst)
    return dst


def lm_texts(dst: Path, n: int = 24, chars: int = 600) -> Path:
    """``n`` consecutive passages of about ``chars`` characters from Hamlet (scattertext)."""
    if dst.is_file() and dst.stat().st_size:
        return dst
    from compress.demo.assets import package_dir

    words = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(
        encoding="utf-8", errors="ignore").split()
    start = len(words) // 4  # skip the front matter
    passages, current = [], []
    for word in words[start:]:
        current.append(word)
        if sum(len(w) + 1 for w in current) >= chars:
            passages.append(" ".join(current))
            current = []
            if len(passages) == n:
                break
    dst.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return dst


def main() -> None:
    """Build everything the bench recipes under recipes/bench-*.yaml need."""
    from compress.data import sentiment_splits
    from compress.demo.assets import smollm2_folder

    logging.basicConfig(level=logging.INFO)
    root = Path("build/bench")
    root.mkdir(parents=True, exist_ok=True)
    minilm_classifier(root / "minilm-cls")
    splits = sentiment_splits(root / "sentiment")
    shutil.copy2(splits["test"], root / "sentiment-test.jsonl")
    lm_texts(root / "lm-eval.jsonl")
    smollm2_folder(root)
    log.info("bench inputs ready in %s", root)


if __name__ == "__main__":
    main()
