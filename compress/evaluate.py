"""Evaluate a runtime on examples: predictions, task metrics with 95% bootstrap CIs, and a
paired comparison against a reference (agreement, mean KL, metric drop with its CI).

Three kinds of data, chosen from the task and the examples:

* ``classification`` (text-classification): accuracy (headline), macro-F1, per-class
  precision/recall; reference: label agreement, mean KL of the class distributions.
* ``answers`` (text-generation, rows with ``answer``): greedy completions scored by
  contains-answer (headline for short answers), exact match and ROUGE-L (headline for
  long answers such as summaries); reference: identical-completion rate.
* ``perplexity`` (text-generation, no answers): corpus perplexity over sliding windows;
  reference: top-1 next-token agreement and mean next-token KL.

numpy only at import time; models run through ``serve.runtime.protocol`` (the served code path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.data import DataError, Example, map_labels
from compress.metrics import (
    accuracy,
    bootstrap_ci,
    contains_answer,
    exact_match,
    kl_divergence,
    macro_f1,
    paired_bootstrap_ci,
    per_class,
    perplexity,
    rouge_l,
    topk_kl,
)

__all__ = ["Predictions", "accuracy", "bootstrap_ci", "data_kind", "evaluate", "macro_f1",
           "perplexity", "predict", "score"]

log = logging.getLogger(__name__)

TOP_K = 128
LONG_ANSWER_WORDS = 8


@dataclass
class Predictions:
    """What a model produced on a list of examples.

    Attributes:
        task: The artifact's task.
        labels: Label names, the columns of ``probabilities`` (classification).
        probabilities: [n, num_labels] class probabilities (classification).
        texts: Generated completions (generation with answers).
        token_logprobs: Per example, the log-prob of each scored token (perplexity).
        top_ids: Per example, [scored tokens, k] ids of the k most likely next tokens.
        top_logprobs: Per example, their log-probs.
        vocab_size: Vocabulary size (for the KL estimate from top-k).
    """

    task: str
    labels: list[str] | None = None
    probabilities: np.ndarray | None = None
    texts: list[str] | None = None
    token_logprobs: list[np.ndarray] | None = None
    top_ids: list[np.ndarray] | None = None
    top_logprobs: list[np.ndarray] | None = None
    vocab_size: int | None = None


def data_kind(task: str, examples: list[Example]) -> str:
    """``classification``, ``answers`` or ``perplexity`` (see the module docstring)."""
    if task == "text-classification":
        return "classification"
    return "answers" if any(e.answer is not None for e in examples) else "perplexity"


def _bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not progress, leave=False)


def _windows(runtime: Any, text: str, max_length: int) -> list[tuple[str, int]]:
    """Split a long text into overlapping word windows: (window text, first scored row).

    Each window after the first repeats the previous half window as context; its context
    tokens are not scored again (row ``count_tokens(context) - 1`` predicts the first new
    token, with or without a BOS the tokenizer adds).
    """
    total = runtime.count_tokens(text)
    if total <= max_length:
        return [(text, 0)]
    words = text.split()
    per_window = max(2, int(len(words) * 0.85 * max_length / total))
    step = max(1, per_window // 2)
    out, start = [], 0
    while start < len(words):
        context = words[max(0, start - (per_window - step)):start] if start else []
        target = words[start:start + (step if start else per_window)]
        first = runtime.count_tokens(" ".join(context)) - 1 if context else 0
        out.append((" ".join(context + target), max(first, 0)))
        start += len(target)
    return out


def _predict_perplexity(runtime: Any, examples: list[Example], batch_size: int,
                        progress: bool, max_length: int, top_k: int) -> Predictions:
    jobs = [(i, w, first) for i, ex in enumerate(examples)
            for w, first in _windows(runtime, ex.text, max_length)]
    token_lp: list[list[np.ndarray]] = [[] for _ in examples]
    top_ids: list[list[np.ndarray]] = [[] for _ in examples]
    top_lp: list[list[np.ndarray]] = [[] for _ in examples]
    vocab = None
    with _bar(len(jobs), progress, "perplexity") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            outs = runtime.next_token_logprobs([w for _, w, _ in batch], max_length=max_length)
            for (i, _, first), (ids, lp) in zip(batch, outs, strict=True):
                lp = np.asarray(lp, dtype=np.float32)[first:]
                targets = np.asarray(ids)[first + 1:]
                vocab = lp.shape[1]
                k = min(top_k, vocab)
                idx = np.argpartition(-lp, k - 1, axis=1)[:, :k]
                idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(lp, idx, 1), 1), 1)
                token_lp[i].append(np.take_along_axis(lp, targets[:, None], 1)[:, 0])
                top_ids[i].append(idx.astype(np.int32))
                top_lp[i].append(np.take_along_axis(lp, idx, 1))
            bar.update(len(batch))
    return Predictions(task=runtime.manifest.task,
                       token_logprobs=[np.concatenate(x) for x in token_lp],
                       top_ids=[np.concatenate(x) for x in top_ids],
                       top_logprobs=[np.concatenate(x) for x in top_lp], vocab_size=vocab)


def predict(runtime: Any, examples: list[Example], batch_size: int = 32, progress: bool = True,
            max_new_tokens: int | None = None, max_length: int = 256,
            top_k: int = TOP_K) -> Predictions:
    """Run a runtime over examples in batches (with a progress bar).

    Args:
        runtime: A ``serve.runtime.protocol.Runtime``.
        examples: The data.
        batch_size: Examples per runtime call (perplexity windows: at most 8).
        progress: Show a progress bar.
        max_new_tokens: Completion length for answers (default 32, 128 for long answers).
        max_length: Token window for perplexity.
        top_k: Next-token log-probs kept per position (for agreement/KL).
    """
    from serve.runtime.protocol import GenerationParams

    kind = data_kind(runtime.manifest.task, examples)
    if kind == "perplexity":
        max_length = min(max_length, getattr(runtime, "max_length", None) or max_length)
        return _predict_perplexity(runtime, examples, min(batch_size, 8), progress, max_length,
                                   top_k)
    texts = [e.text for e in examples]
    if kind == "answers" and max_new_tokens is None:
        words = np.mean([len((e.answer or "").split()) for e in examples])
        max_new_tokens = 128 if words > LONG_ANSWER_WORDS else 32
    params = GenerationParams(max_new_tokens=max_new_tokens or 32)
    rows: list[Any] = []
    with _bar(len(texts), progress, kind) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            if kind == "classification":
                rows.append(np.asarray(runtime.class_probabilities(batch), dtype=np.float64))
            else:
                rows.extend(g.text for g in runtime.generate(batch, params))
            bar.update(len(batch))
    if kind == "classification":
        probs = np.concatenate(rows) if rows else np.zeros((0, len(runtime.labels)))
        return Predictions(task=runtime.manifest.task, labels=list(runtime.labels),
                           probabilities=probs)
    return Predictions(task=runtime.manifest.task, texts=rows)


def _ci_metric(values: np.ndarray, seed: int, statistic=None) -> dict[str, Any]:
    value = float(statistic(values) if statistic else np.mean(values))
    return {"value": value, "ci95": bootstrap_ci(values, seed=seed, statistic=statistic)}


def _score_classification(examples, pred: Predictions, reference: Predictions | None,
                          seed: int) -> dict[str, Any]:
    labels = pred.labels or []
    gold = np.array(map_labels(examples, labels))
    guess = pred.probabilities.argmax(1)
    correct = (gold == guess).astype(np.float64)
    pairs = np.stack([gold, guess], 1)
    f1 = _ci_metric(pairs, seed, lambda p: macro_f1(p[:, 0], p[:, 1], len(labels)))
    classes = per_class(gold, guess, len(labels))
    out = {"metric": "accuracy", "higher_is_better": True,
           "metrics": {"accuracy": _ci_metric(correct, seed), "macro_f1": f1},
           "per_class": dict(zip(labels, classes, strict=True))}
    if reference is not None:
        order = [reference.labels.index(name) for name in labels] if reference.labels else None
        if order is None or sorted(reference.labels) != sorted(labels):
            raise DataError(f"reference labels {reference.labels} differ from {labels}")
        ref_probs = reference.probabilities[:, order]
        ref_correct = (gold == ref_probs.argmax(1)).astype(np.float64)
        out["reference"] = {
            "agreement": float(np.mean(ref_probs.argmax(1) == guess)),
            "kl": float(np.mean(kl_divergence(ref_probs, pred.probabilities))),
            "metric_drop": float(ref_correct.mean() - correct.mean()),
            "drop_ci95": paired_bootstrap_ci(
                lambda idx: ref_correct[idx].mean() - correct[idx].mean(), len(gold), seed)}
    return out


def _score_answers(examples, pred: Predictions, reference: Predictions | None,
                   seed: int) -> dict[str, Any]:
    answers = [e.answer or "" for e in examples]
    texts = pred.texts or []

    def per_example(outputs: list[str]) -> dict[str, np.ndarray]:
        return {"contains_answer": np.array([contains_answer(t, a) for t, a in
                                             zip(outputs, answers, strict=True)]),
                "exact_match": np.array([exact_match(t, a) for t, a in
                                         zip(outputs, answers, strict=True)]),
                "rouge_l": rouge_l(outputs, answers)}

    values = per_example(texts)
    long = np.mean([len(a.split()) for a in answers]) > LONG_ANSWER_WORDS
    headline = "rouge_l" if long else "contains_answer"
    out = {"metric": headline, "higher_is_better": True,
           "metrics": {name: _ci_metric(v, seed) for name, v in values.items()}}
    if reference is not None:
        ref_values = per_example(reference.texts or [])[headline]
        cand = values[headline]
        out["reference"] = {
            "agreement": float(np.mean([a == b for a, b in
                                        zip(reference.texts or [], texts, strict=True)])),
            "kl": None,
            "metric_drop": float(ref_values.mean() - cand.mean()),
            "drop_ci95": paired_bootstrap_ci(
                lambda idx: ref_values[idx].mean() - cand[idx].mean(), len(cand), seed)}
    return out


def _score_perplexity(pred: Predictions, reference: Predictions | None,
                      seed: int) -> dict[str, Any]:
    if pred.token_logprobs is None:
        raise DataError("perplexity data needs next-token log-probs; these predictions "
                        "have only generated texts")
    nll = np.array([-float(lp.sum()) for lp in pred.token_logprobs])
    counts = np.array([len(lp) for lp in pred.token_logprobs])
    value = perplexity(nll, counts)
    ci = paired_bootstrap_ci(lambda idx: perplexity(nll[idx], counts[idx]), len(nll), seed)
    out = {"metric": "perplexity", "higher_is_better": False,
           "metrics": {"perplexity": {"value": value, "ci95": ci},
                       "scored_tokens": {"value": int(counts.sum()), "ci95": None}}}
    if reference is not None:
        ref_nll = np.array([-float(lp.sum()) for lp in reference.token_logprobs])
        agree, kls = [], []
        for r_ids, r_lp, c_ids, c_lp in zip(reference.top_ids, reference.top_logprobs,
                                            pred.top_ids, pred.top_logprobs, strict=True):
            n = min(len(r_ids), len(c_ids))
            agree.append(r_ids[:n, 0] == c_ids[:n, 0])
            kls.append(topk_kl(r_ids[:n], r_lp[:n], c_ids[:n], c_lp[:n],
                               pred.vocab_size or r_ids.shape[1]))
        out["reference"] = {
            "agreement": float(np.mean(np.concatenate(agree))),
            "kl": float(np.mean(np.concatenate(kls))),
            "metric_drop": value / perplexity(ref_nll, counts) - 1,
            "drop_ci95": paired_bootstrap_ci(
                lambda idx: perplexity(nll[idx], counts[idx])
                / perplexity(ref_nll[idx], counts[idx]) - 1, len(nll), seed)}
    return out


def score(task: str, examples: list[Example], predictions: Predictions,
          reference: Predictions | None = None, seed: int = 0) -> dict[str, Any]:
    """Metrics of ``predictions`` on ``examples`` (and against ``reference``), JSON-able.

    Returns:
        ``{"n", "kind", "metric", "value", "ci95", "higher_is_better",
        "metrics": {name: {"value", "ci95"}}}`` plus ``"reference": {"agreement", "kl",
        "metric_drop", "drop_ci95"}`` with a reference (``metric_drop`` > 0 means worse:
        reference − candidate, or candidate/reference − 1 for perplexity).

    Raises:
        DataError: Labels unknown to the model, or predictions of the wrong kind.
    """
    kind = data_kind(task, examples)
    if kind == "classification":
        out = _score_classification(examples, predictions, reference, seed)
    elif kind == "answers":
        out = _score_answers(examples, predictions, reference, seed)
    else:
        out = _score_perplexity(predictions, reference, seed)
    headline = out["metrics"][out["metric"]]
    return {"n": len(examples), "kind": kind, "metric": out["metric"],
            "value": headline["value"], "ci95": headline["ci95"], **out}


def evaluate(runtime: Any, examples: list[Example], reference_runtime: Any | None = None,
             seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """``predict`` (with the reference too, if given) then ``score``.

    Args:
        runtime: The runtime to evaluate.
        examples: The data.
        reference_runtime: A runtime to compare with on the same inputs.
        seed: Bootstrap seed.
        **kwargs: Passed to :func:`predict`.
    """
    reference = predict(reference_runtime, examples, **kwargs) if reference_runtime else None
    predictions = predict(runtime, examples, **kwargs)
    return score(runtime.manifest.task, examples, predictions, reference, seed)
