"""Step-level LM speed: aggregate decode tok/s of ``StepLM`` with 1 vs N slots.

For each LM artifact (torch or ONNX), through ``runtime.step_lm()``:

* ``static`` — N chat prompts prefilled, then ``--tokens`` greedy tokens each, every decode
  step one batched forward over all N slots (EOS ignored: a fixed token count);
* ``staggered`` — the same N requests, but request k joins ``--join-every`` steps after
  request k-1 (continuous batching: each join re-lays the batch out);
* ``peer`` — the runtime's own static-batch ``generate`` (today's served path) on the same
  prompts, ``max_new_tokens=--tokens`` (it stops at EOS: tokens are counted as returned).

Aggregate tok/s = generated tokens / wall time (prefill included). ``--check`` also decodes
every prompt alone and reports whether the batched greedy ids equal the lone ids.

``--join L`` instead times a long sequence joining running streams (the decode groups of
:mod:`serve.runtime.slot_table`): ``--slots`` N streams decode ``--tokens`` steps, an
L-token prompt is prefilled in 512-token chunks and joins, ``--tokens`` more steps run;
reported: the median step before the join, the join step, the median step after it. Then
one sequence decodes alone at KV lengths 64...L (``kv_sweep``): a step costs about
``a + b x tokens``, and ``a / b`` is the decode groups' ``pass_tokens``. Only the StepLM
protocol is used, so the same file times an older checkout (``PYTHONPATH=<checkout>
python bench/step_lm.py ...``).

Usage::

    python -m bench.step_lm build/bench/artifacts-smollm2/merge \\
        build/bench/artifacts-smollm2/onnx-fp32 --slots 1 8 --tokens 128
    python -m bench.step_lm build/bench/artifacts-smollm2/onnx-fp32 --slots 8 --tokens 16 \\
        --join 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works.",
    "What are the three most important things to know about the ocean? Answer in detail.",
    "Describe a day in the life of a medieval baker.",
    "Give me a recipe for a simple tomato soup and explain each step.",
    "Why is the sky blue?",
    "Write a letter to a friend about your summer holiday by the sea, with details.",
    "List some tips for learning a new language and explain why they work.",
]


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` chat prompts as token ids (the tokenizer's chat template when it has one)."""
    out = []
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out


def run_static(step: Any, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    """All prompts prefilled, then decoded together; (seconds, generated ids per prompt)."""
    start = time.perf_counter()
    seqs = [[int(step.prefill(slot, p).argmax())] for slot, p in enumerate(prompts)]
    slots = list(range(len(prompts)))
    for _ in range(tokens - 1):
        rows = step.decode(slots, [s[-1] for s in seqs])
        for seq, row in zip(seqs, rows, strict=True):
            seq.append(int(row.argmax()))
    seconds = time.perf_counter() - start
    for slot in slots:
        step.free(slot)
    return seconds, seqs


def run_staggered(step: Any, prompts: list[list[int]], tokens: int,
                  join_every: int) -> tuple[float, list]:
    """Request k joins ``k * join_every`` steps in; each leaves after ``tokens`` tokens."""
    seqs: list[list[int]] = [[] for _ in prompts]
    running: list[int] = []
    start = time.perf_counter()
    number = 0
    while number == 0 or running:
        if number % join_every == 0 and number // join_every < len(prompts):
            slot = number // join_every
            seqs[slot].append(int(step.prefill(slot, prompts[slot]).argmax()))
            running.append(slot)
        todo = [s for s in running if len(seqs[s]) < tokens]
        if todo:
            rows = step.decode(todo, [seqs[s][-1] for s in todo])
            for slot, row in zip(todo, rows, strict=True):
                seqs[slot].append(int(row.argmax()))
        for slot in [s for s in running if len(seqs[s]) >= tokens]:
            step.free(slot)
            running.remove(slot)
        number += 1
    return time.perf_counter() - start, seqs


def long_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` prompt token ids of plain text."""
    text = " ".join(QUESTIONS)
    ids = list(tokenizer(text)["input_ids"])
    return (ids * (n // len(ids) + 1))[:n]


def _timed_step(step: Any, slots: list[int], seqs: dict[int, list[int]]) -> float:
    """One greedy decode step over ``slots``; its seconds."""
    start = time.perf_counter()
    rows = step.decode(slots, [seqs[s][-1] for s in slots])
    seconds = time.perf_counter() - start
    for slot, row in zip(slots, rows, strict=True):
        seqs[slot].append(int(row.argmax()))
    return seconds


def _prefill(step: Any, slot: int, ids: list[int], chunk: int = 512) -> int:
    """Prefill ``ids`` into ``slot`` in chunks; the greedy next token."""
    for start in range(0, len(ids), chunk):
        logits = step.prefill(slot, ids[start:start + chunk], start)
    return int(logits.argmax())


def run_join(step: Any, prompts: list[list[int]], long: list[int],
             steps: int) -> dict[str, Any]:
    """Streams decode, a long prompt joins them; step times in ms (see the module doc)."""
    seqs = {slot: [int(step.prefill(slot, p).argmax())] for slot, p in enumerate(prompts)}
    slots = list(seqs)
    before = [_timed_step(step, slots, seqs) for _ in range(steps)]
    start = time.perf_counter()
    seqs[len(prompts)] = [_prefill(step, len(prompts), long)]
    prefill = time.perf_counter() - start
    slots.append(len(prompts))
    join = _timed_step(step, slots, seqs)
    after = [_timed_step(step, slots, seqs) for _ in range(steps)]
    groups = [len(g.rows) for g in getattr(step.table, "groups", ())] or "one batch"
    for slot in slots:
        step.free(slot)
    return {"before_ms": round(1000 * statistics.median(before), 1),
            "join_ms": round(1000 * join, 1),
            "after_ms": round(1000 * statistics.median(after), 1),
            "long_prefill_s": round(prefill, 2), "groups": groups}


def kv_sweep(step: Any, long: list[int], lengths: list[int], steps: int = 8) -> dict:
    """Median decode step (ms) of one sequence at each KV length, and the least-squares
    ``a + b x tokens`` fit's ``a / b`` (token-rows one more forward costs)."""
    times = []
    for n in lengths:
        seqs = {0: [_prefill(step, 0, long[:n])]}
        times.append(statistics.median(_timed_step(step, [0], seqs) for _ in range(steps)))
        step.free(0)
    slope, intercept = statistics.linear_regression(lengths, times)
    return {"step_ms": {n: round(1000 * t, 1) for n, t in zip(lengths, times, strict=True)},
            "ms_per_1k_tokens": round(1e6 * slope, 2), "pass_ms": round(1000 * intercept, 1),
            "pass_tokens": round(intercept / slope)}


def run_peer(runtime: Any, prompts: list[list[int]], tokens: int) -> tuple[float, int]:
    """The runtime's static-batch ``generate``; (seconds, completion tokens)."""
    from serve.runtime.protocol import GenerationParams

    texts = [runtime.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    start = time.perf_counter()
    out = runtime.generate(texts, GenerationParams(max_new_tokens=tokens))
    return time.perf_counter() - start, sum(g.completion_tokens for g in out)


def bench_artifact(path: Path, slots: list[int], tokens: int, join_every: int,
                   check: bool, peer: bool) -> list[dict[str, Any]]:
    """Rows (one per scenario and slot count) for one artifact."""
    from serve.runtime.loader import load_runtime

    runtime = load_runtime(path, device="cpu")
    step = runtime.step_lm()
    name = f"{runtime.manifest.format}-{runtime.manifest.precision}"
    run_static(step, chat_prompts(runtime.tokenizer, 1), 4)  # warm-up
    rows = []
    for n in slots:
        prompts = chat_prompts(runtime.tokenizer, n)
        seconds, seqs = run_static(step, prompts, tokens)
        row = {"artifact": str(path), "runtime": name, "scenario": "static", "slots": n,
               "tokens": n * tokens, "seconds": round(seconds, 2),
               "tok_s": round(n * tokens / seconds, 1)}
        if check:
            row["equal_to_alone"] = sum(run_static(step, [p], tokens)[1][0] == s
                                        for p, s in zip(prompts, seqs, strict=True))
        rows.append(row)
        if n > 1:
            seconds, _ = run_staggered(step, prompts, tokens, join_every)
            rows.append({**row, "scenario": f"staggered/{join_every}",
                         "seconds": round(seconds, 2), "tok_s": round(n * tokens / seconds, 1)})
            rows[-1].pop("equal_to_alone", None)
        if peer:
            seconds, count = run_peer(runtime, prompts, tokens)
            rows.append({"artifact": str(path), "runtime": name, "scenario": "peer generate",
                         "slots": n, "tokens": count, "seconds": round(seconds, 2),
                         "tok_s": round(count / seconds, 1)})
        log.info("%s", rows[-1])
    if step.table.lengths:
        raise RuntimeError(f"slots left allocated: {sorted(step.table.lengths)}")
    return rows


def join_artifact(path: Path, streams: int, steps: int, long: int) -> dict[str, Any]:
    """``run_join`` and ``kv_sweep`` on one artifact (after a warm-up)."""
    from serve.runtime.loader import load_runtime

    runtime = load_runtime(path, device="cpu")
    step = runtime.step_lm()
    run_static(step, chat_prompts(runtime.tokenizer, 1), 4)  # warm-up
    ids = long_ids(runtime.tokenizer, long)
    row = {"artifact": str(path), "runtime": type(step).__name__,
           **run_join(step, chat_prompts(runtime.tokenizer, streams), ids, steps),
           "kv_sweep": kv_sweep(step, ids, sorted({64, long // 4, long // 2, long}))}
    log.info("%s", row)
    return row


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (prints a Markdown table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--slots", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--join-every", type=int, default=8)
    parser.add_argument("--check", action="store_true",
                        help="also decode each prompt alone and compare greedy ids")
    parser.add_argument("--peer", action="store_true",
                        help="also time the runtime's static-batch generate")
    parser.add_argument("--join", type=int, default=0, metavar="L",
                        help="time an L-token prompt joining --slots streams instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.join:
        print(json.dumps([join_artifact(path, max(args.slots), args.tokens, args.join)
                          for path in args.artifacts], indent=1))
        return
    rows = []
    for path in args.artifacts:
        rows += bench_artifact(path, args.slots, args.tokens, args.join_every, args.check,
                               args.peer)
    print("| runtime | scenario | slots | tokens | s | tok/s | x 1 slot | equal to alone |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r["tok_s"] for r in rows if r["runtime"] == row["runtime"]
                    and r["scenario"] == "static" and r["slots"] == min(args.slots))
        print(f"| {row['runtime']} | {row['scenario']} | {row['slots']} | {row['tokens']} | "
              f"{row['seconds']} | {row['tok_s']} | {row['tok_s'] / base:.2f} | "
              f"{row.get('equal_to_alone', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
