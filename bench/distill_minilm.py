"""Benchmark of the distill stage: MiniLM-L6 sentiment teacher → 3-layer student.

Teacher: all-MiniLM-L6-v2 LoRA-fine-tuned on the Rotten Tomatoes train split (an adapter
given with ``--adapter``, else one trained here with the demo's fine-tune recipe). The
recipe ``merge → distill`` runs through the real pipeline; the student's and teacher's
test accuracy (with 95% CIs) come from the stage's manifest, and the speed ratio is
measured on ONNX fp32 exports of both (ONNX Runtime CPU, batch 32, median of repeats).

Usage::

    .venv/bin/python -m bench.distill_minilm --out build/bench-distill
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("bench.distill_minilm")


def teacher_adapter(out: Path, train: Path, steps: int) -> Path:
    """The LoRA teacher: reuse ``out/teacher-lora`` or fine-tune it (demo recipe)."""
    from compress.data import load_examples
    from compress.demo.assets import minilm_path
    from compress.demo.finetune import FinetuneConfig, finetune_classifier
    from compress.recipe import DataFile

    dst = out / "teacher-lora"
    if (dst / "adapter_config.json").is_file():
        return dst
    examples = load_examples(DataFile(path=train))
    names = ["negative", "positive"]
    finetune_classifier(minilm_path(), [e.text for e in examples],
                        [names.index(e.label) for e in examples], names, dst,
                        FinetuneConfig(steps=steps))
    return dst


def onnx_speed(teacher_dir: Path, student_dir: Path, texts: list[str], out: Path,
               threads: int, batch_size: int = 32, repeats: int = 20) -> dict:
    """Median ONNX Runtime (CPU EP, fp32) forward time of both models on one batch."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from compress.stages.distill_speed import speed_summary, time_interleaved
    from compress.stages.export import export_onnx

    sessions = {}
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        dst = out / f"onnx-{name}"
        if not (dst / "model.onnx").is_file():
            dst.mkdir(parents=True, exist_ok=True)
            export_onnx(folder, dst, "text-classification")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(str(dst / "model.onnx"), options,
                                              providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    batch = tokenizer(texts[:batch_size], padding=True, truncation=True, max_length=128,
                      return_tensors="np")
    feeds = {name: {k.name: batch[k.name].astype("int64") for k in session.get_inputs()}
             for name, session in sessions.items()}
    times = time_interleaved({name: (lambda s=session, f=feeds[name]: s.run(None, f))
                              for name, session in sessions.items()}, repeats, warmup=2)
    return speed_summary(f"onnxruntime {ort.__version__} CPU EP fp32, {threads} threads",
                         batch_size, int(batch["input_ids"].shape[1]), times)


def main() -> None:
    """Run the benchmark and print/write ``OUT/results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench-distill"))
    parser.add_argument("--adapter", type=Path, help="existing LoRA teacher adapter")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT threads")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="recipe override, e.g. stages[1].max_epochs=2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)

    from compress.data import sentiment_splits
    from compress.demo.assets import minilm_path
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe
    from serve.artifact import load_artifact

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    splits = sentiment_splits(out / "data")
    adapter = args.adapter or teacher_adapter(out, splits["train"], args.teacher_steps)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(
        "name: minilm-sentiment-distill\ntask: text-classification\n"
        f"base: {{path: {minilm_path()}}}\nadapters: [{{path: {adapter.resolve()}}}]\n"
        "labels: [negative, positive]\n"
        f"data:\n  train: {{path: {splits['train']}, text: text, label: label}}\n"
        f"  eval: {{path: {splits['test']}, text: text, label: label}}\n"
        "stages:\n  - {kind: merge}\n"
        "  - {kind: distill, student_layers: 3, strategy: every-other, max_epochs: 2,\n"
        "     max_steps: 100000, batch_size: 32, learning_rate: 1.0e-4, eval_every: 100,\n"
        "     patience: 4, alpha: 0.5, temperature: 2.0, cache_teacher_logits: true}\n")
    recipe = load_recipe(recipe_path, args.overrides)
    artifacts = out / "artifacts"
    start = time.perf_counter()
    run_recipe(recipe, artifacts, report=log.info)
    wall = time.perf_counter() - start
    metrics = load_artifact(artifacts / "distill").manifest.metrics
    texts = [json.loads(line)["text"] for line in splits["test"].open()]
    results = {
        "recipe": str(recipe_path), "overrides": args.overrides, "threads": args.threads,
        "stages_wall_seconds": round(wall, 1),
        "training": {k: v for k, v in metrics["training"].items() if k != "curve"},
        "curve": metrics["training"]["curve"], "eval": metrics["eval"],
        "torch_speed": metrics["speed"],
        "onnx_speed": onnx_speed(artifacts / "merge", artifacts / "distill", texts, out,
                                 args.threads),
        "student": metrics["student"], "teacher": metrics["teacher"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
