"""Helpers shared by the export/quantize tests: tiny eval data and recipe runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from compress.tiny import WORDS


def write_texts(path: Path, n: int, labels: bool, seed: int = 0) -> Path:
    """Write ``n`` random tiny-vocabulary sentences (with random labels) as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            row = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))}
            if labels:
                row["label"] = rng.choice(["negative", "positive"])
            fh.write(json.dumps(row) + "\n")
    return path


def run(recipe_text: str, root: Path):
    """Write and run a recipe under ``root``; return (out folder, records by name)."""
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = root / "out"
    records = run_recipe(load_recipe(recipe), out)
    return out, {r.name: r for r in records}


def run_lm_variants(tiny: dict[str, Path], root: Path, variants: list[str],
                    eval_texts: int = 8):
    """The tiny Llama + LoRA merged (``merge``, torch fp32) and the given variant lines
    (YAML flow mappings) built under ``root``, evaluated on ``eval_texts`` tiny texts;
    returns (artifacts folder, records by name)."""
    write_texts(root / "eval.jsonl", eval_texts, labels=False)
    lines = "".join(f"  - {v}\n" for v in variants)
    return run(f"""
name: lm
task: text-generation
base: {{path: {tiny["llama"]}}}
adapters: [{{path: {tiny["llama-lora"]}}}]
data: {{eval: {{path: eval.jsonl, label: null}}}}
gates: {{min_agreement: 0.3, max_metric_drop: 1.0}}
variants:
{lines}""", root)


def build_lm_variants(tiny: dict[str, Path], root: Path, variants: list[str]) -> Path:
    """:func:`run_lm_variants` with 8 eval texts; returns the artifacts folder."""
    return run_lm_variants(tiny, root, variants)[0]
