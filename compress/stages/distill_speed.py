"""Teacher vs student forward time: the distillation stage's (and benchmark's) speed ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, run in alternation so drift hits them alike.

    Args:
        calls: Name → zero-argument function to time.
        repeats: Timed rounds.
        warmup: Untimed rounds first.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def speed_summary(runtime: str, batch_size: int, seq_len: int,
                  times: dict[str, list[float]]) -> dict[str, Any]:
    """Median teacher and student times (ms) of :func:`time_interleaved` and their ratio."""
    teacher_ms = statistics.median(times["teacher"]) * 1e3
    student_ms = statistics.median(times["student"]) * 1e3
    return {"runtime": runtime, "batch_size": batch_size, "seq_len": seq_len,
            "teacher_ms": round(teacher_ms, 2), "student_ms": round(student_ms, 2),
            "speed_ratio": round(teacher_ms / student_ms, 3)}


def speed(teacher, student, tokenizer, texts: list[str], batch_size: int,
          max_length: int, repeats: int = 5) -> dict[str, Any]:
    """Median forward time of teacher and student on one fixed padded batch (torch, CPU)."""
    import torch

    texts = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        times = time_interleaved({"teacher": lambda: teacher(**batch),
                                  "student": lambda: student(**batch)}, repeats)
    return speed_summary(f"torch fp32 cpu, {torch.get_num_threads()} threads", batch_size,
                         int(batch["input_ids"].shape[1]), times)
