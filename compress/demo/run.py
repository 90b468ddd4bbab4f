"""`modelpress demo`: a real fine-tuned model end to end, offline.

classification: LoRA-fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes → recipe (merge →
distill 6→3 → ONNX fp32 / int8 dynamic / int8 static / int4 / NF4) → serve and bench each
variant → report. generation: LoRA-tune SmolLM2-135M-Instruct to answer a review's
sentiment in one word → merge → variants → serve and bench with streaming → report. The
generation bench keeps that one-word task for load and accuracy, and adds decode-bound chat
levels (long answers, fixed ``max_tokens``: bench/decode.py) that show what a chat user
would see: output tok/s, time to first token and inter-token latency.

Everything expensive is cached under ``--out``: the data splits, the converted SmolLM2
folder, the fine-tuned adapter (keyed by its settings, base model and training split) and
every pipeline stage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compress.demo.finetune import FinetuneConfig
from compress.errors import InputError

log = logging.getLogger(__name__)
Report = Callable[[str], None]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class DemoPlan:
    """How big the demo is: full by default, reduced with ``--quick``.

    Attributes:
        finetune: Settings of the LoRA fine-tune that makes the user's checkpoint.
        train_limit: Training examples used by the fine-tune (None: all).
        overrides: Recipe ``--set`` overrides on top of the shipped recipe.
        users: Closed-loop concurrency levels of the benchmark.
        duration_s: Seconds per load level.
        warmup_s: Warm-up seconds per artifact.
        repeats: Runs per load level.
        eval_samples: Examples in the benchmark's accuracy pass (None: the whole split).
        variants: Names of the recipe's variants to build (None: all of them).
        decode_users: Decode-bound chat levels (concurrent streams; generation only).
        decode_max_tokens: ``max_tokens`` of each decode-bound request.
    """

    finetune: FinetuneConfig
    train_limit: int | None = None
    overrides: list[str] = field(default_factory=list)
    users: list[int] = field(default_factory=lambda: [1, 8, 32])
    duration_s: float = 10.0
    warmup_s: float = 3.0
    repeats: int = 1
    eval_samples: int | None = 300
    variants: list[str] | None = None
    decode_users: list[int] = field(default_factory=list)
    decode_max_tokens: int = 128


def plan(task: str, quick: bool) -> DemoPlan:
    """The demo's sizes for a task."""
    if task == "classification":
        if quick:
            return DemoPlan(FinetuneConfig(steps=80, batch_size=32, learning_rate=1e-3),
                            overrides=["stages[1].max_steps=40", "stages[1].eval_every=20",
                                       "data.train.samples=2000", "data.eval.samples=300"],
                            users=[1, 8], duration_s=4, warmup_s=1, eval_samples=200)
        # The accuracy pass covers the whole test split (1,275 reviews): on a 300-review
        # sample, one-point drops are inside the noise and flipped the recommendation.
        return DemoPlan(FinetuneConfig(steps=400, batch_size=32, learning_rate=1e-3),
                        eval_samples=None)
    if quick:
        # torch-nf4 is left to the full run: bitsandbytes' CPU 4-bit kernels make it the
        # slowest variant here by far (a CUDA format), and the quick run must fit 5 minutes.
        # genai-int4 is left to the full run too: its builder alone takes about 2 minutes,
        # and so are the decode-bound chat levels (about 30 s more, past the 5 minutes).
        return DemoPlan(FinetuneConfig(steps=24, batch_size=8, learning_rate=1e-3, rank=8,
                                       max_length=160),
                        train_limit=192, overrides=["data.eval.samples=40"], users=[1, 4],
                        duration_s=3, warmup_s=1, eval_samples=40,
                        variants=["onnx-fp32", "onnx-int8-dynamic", "onnx-int4"])
    return DemoPlan(FinetuneConfig(steps=200, batch_size=8, learning_rate=1e-3, rank=8,
                                   max_length=160),
                    train_limit=1600, overrides=["data.eval.samples=200"], users=[1, 8],
                    duration_s=10, eval_samples=200, decode_users=[1, 8])


def _adapter(out: Path, cfg: FinetuneConfig, base: Path, train_file: Path,
             limit: int | None, train: Callable[[Path], Path]) -> Path:
    """Reuse the adapter in ``out`` if it was trained with the same settings and inputs.

    The key covers the fine-tune settings, the base model's files and the training split,
    so a new model or data package (or an edited split) retrains instead of reusing.
    """
    from serve.artifact import list_files, sha256_file, tree_digest

    key = {"config": asdict(cfg), "base": tree_digest(list_files(base)),
           "train": sha256_file(train_file), "limit": limit}
    key_file = out / "demo-key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) == key:
        log.info("reusing fine-tuned adapter %s", out)
        return out
    adapter = train(out)
    # Written after the adapter lands: an interrupted run retrains, it never reuses a
    # half-written adapter.
    tmp = key_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=2) + "\n")
    tmp.replace(key_file)
    return adapter


def classification_checkpoint(work: Path, p: DemoPlan, report: Report) -> dict[str, Path]:
    """Rotten Tomatoes splits and the LoRA-fine-tuned MiniLM adapter (the user's checkpoint)."""
    from compress.data import load_examples, map_labels, sentiment_splits
    from compress.demo.assets import minilm_path
    from compress.demo.finetune import finetune_classifier
    from compress.recipe import DataFile

    report("writing Rotten Tomatoes splits")
    splits = sentiment_splits(work / "data")
    labels = ["negative", "positive"]

    def train(dst: Path) -> Path:
        report(f"fine-tuning MiniLM with LoRA ({p.finetune.steps} steps)")
        examples = load_examples(DataFile(path=splits["train"]), limit=p.train_limit)
        return finetune_classifier(minilm_path(), [e.text for e in examples],
                                   map_labels(examples, labels), labels, dst, p.finetune)

    adapter = _adapter(work / "checkpoints" / "minilm-sentiment-lora", p.finetune, minilm_path(),
                       splits["train"], p.train_limit, train)
    return {"base": minilm_path(), "adapter": adapter, **splits}


def generation_checkpoint(work: Path, p: DemoPlan, report: Report) -> dict[str, Path]:
    """SmolLM2 as a safetensors folder, one-word sentiment prompts, and the LoRA adapter."""
    from transformers import AutoTokenizer

    from compress.data import load_examples, sentiment_splits
    from compress.demo.assets import smollm2_folder
    from compress.demo.finetune import finetune_lm
    from compress.demo.prompts import write_prompt_split
    from compress.recipe import DataFile

    report("converting SmolLM2-135M-Instruct (GGUF → safetensors, once)")
    base = smollm2_folder(work / "build")
    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = sentiment_splits(work / "data")
    prompts = {name: write_prompt_split(tokenizer, splits[name],
                                        work / "data" / f"sentiment-prompts-{name}.jsonl")
               for name in ("train", "validation", "test")}

    def train(dst: Path) -> Path:
        report(f"fine-tuning SmolLM2 with LoRA ({p.finetune.steps} steps)")
        examples = load_examples(DataFile(path=prompts["train"], label=None),
                                 limit=p.train_limit)
        return finetune_lm(base, [e.text for e in examples], [e.answer for e in examples],
                           dst, p.finetune)

    adapter = _adapter(work / "checkpoints" / "smollm2-sentiment-lora", p.finetune, base,
                       prompts["train"], p.train_limit, train)
    return {"base": base, "adapter": adapter, **prompts}


def run_demo(task: str, quick: bool, work: Path, report: Report) -> Path:
    """Run the whole demo and return the path of the benchmark report.

    Args:
        task: ``classification`` or ``generation``.
        quick: Reduced sizes (fewer steps, shorter load levels).
        work: Output folder (data, checkpoints, artifacts, report).
        report: Progress callback.
    """
    from bench.run import BenchConfig, run_bench
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    if task not in ("classification", "generation"):
        raise InputError(f"--task: expected classification or generation, got {task!r}")
    work = Path(work).resolve() / task
    p = plan(task, quick)
    make = classification_checkpoint if task == "classification" else generation_checkpoint
    paths = make(work, p, report)
    overrides = [f"base.path={paths['base']}", f"adapters[0].path={paths['adapter']}",
                 f"data.train.path={paths['train']}",
                 f"data.calibration.path={paths['validation']}",
                 f"data.eval.path={paths['test']}", *p.overrides]
    recipe = load_recipe(RECIPES / f"demo-{task}.yaml", overrides)
    if p.variants is not None:
        recipe = recipe.model_copy(
            update={"variants": [v for v in recipe.variants if v.name in p.variants]})
    records = run_recipe(recipe, work / "artifacts", report)
    built = [Path(r.path) for r in records if r.status != "failed"]
    # The reference (last stage) first: accuracy drops are measured against it.
    artifacts = [built[len(recipe.stages) - 1], *built[len(recipe.stages):]]
    config = BenchConfig(artifacts=artifacts, out=work / "report", data=paths["test"],
                         label_field="label" if task == "classification" else None,
                         eval_samples=p.eval_samples, users=p.users, duration_s=p.duration_s,
                         warmup_s=p.warmup_s, repeats=p.repeats, slo="p95<200ms"
                         if task == "classification" else "p95<2000ms",
                         max_accuracy_drop=0.01 if task == "classification" else 0.05,
                         max_new_tokens=4 if task == "generation" else 32,
                         decode_users=p.decode_users, decode_max_tokens=p.decode_max_tokens)
    run_bench(config, lambda message, steps: report(message))
    return work / "report" / "report.md"
