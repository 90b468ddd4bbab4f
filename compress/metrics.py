"""Pure metric functions (numpy only): task metrics, bootstrap confidence intervals, KL.

Usable without a model; ``compress.evaluate`` builds the scores from them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import numpy as np

N_RESAMPLES = 1000
_EPS = 1e-12


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of predictions equal to the gold labels."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    return float((y_true == y_pred).mean())


def per_class(y_true: Sequence[int], y_pred: Sequence[int],
              num_labels: int) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class id ``0..num_labels-1``.

    A class never predicted has precision 0; one absent from the gold labels has recall 0.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = []
    for k in range(num_labels):
        tp = float(np.sum((y_pred == k) & (y_true == k)))
        predicted, support = float(np.sum(y_pred == k)), float(np.sum(y_true == k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"precision": precision, "recall": recall, "f1": f1, "support": int(support)})
    return out


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over the classes present in gold or predictions
    (or over ``0..num_labels-1`` when given)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if num_labels is None:
        classes = np.union1d(y_true, y_pred).astype(int)
        stats = per_class(y_true, y_pred, int(classes.max()) + 1 if classes.size else 0)
        return float(np.mean([stats[k]["f1"] for k in classes])) if classes.size else 0.0
    return float(np.mean([s["f1"] for s in per_class(y_true, y_pred, num_labels)]))


def bootstrap_distribution(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0,
                           n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """``statistic(indices)`` over ``n_resamples`` resamples (with replacement) of ``0..n-1``.

    Passing the same seed for two statistics gives *paired* resamples (same rows).
    """
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_resamples)])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap samples (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float], seed: int = 0, n_resamples: int = N_RESAMPLES,
                 statistic: Callable[[np.ndarray], float] | None = None,
                 level: float = 0.95) -> list[float]:
    """95% percentile bootstrap interval of ``statistic`` (default: the mean) of ``values``.

    Args:
        values: Per-example values (rows are resampled).
        seed: Random seed (the same seed gives the same interval).
        n_resamples: Bootstrap resamples.
        statistic: Function of the resampled values; the mean if None.
        level: Confidence level.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    stat = statistic or np.mean
    samples = bootstrap_distribution(lambda idx: stat(values[idx]), len(values), seed,
                                     n_resamples)
    return percentile_ci(samples, level)


def paired_bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0,
                        n_resamples: int = N_RESAMPLES) -> list[float]:
    """Interval of a paired statistic, e.g. ``lambda idx: ref_acc(idx) - cand_acc(idx)``:
    both models are scored on the same resampled rows."""
    if n == 0:
        return [float("nan"), float("nan")]
    return percentile_ci(bootstrap_distribution(statistic, n, seed, n_resamples))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) of probability rows (natural log)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0)
    q = np.clip(np.asarray(q, dtype=np.float64), _EPS, 1.0)
    # KL >= 0; rounding of nearly equal rows can give -1e-9.
    return np.maximum(np.sum(p * (np.log(p) - np.log(q)), axis=-1), 0.0)


def topk_kl(ref_ids: np.ndarray, ref_lp: np.ndarray, cand_ids: np.ndarray,
            cand_lp: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per-position KL(ref || cand) from top-k log-probs of each model.

    The reference's top-k tokens plus one lumped "rest" bucket; a token missing from the
    candidate's top-k gets the candidate's leftover mass spread evenly over the tokens
    outside its top-k. Exact when ``k >= vocab_size``.

    Args:
        ref_ids, ref_lp: [T, k] token ids and log-probs of the reference.
        cand_ids, cand_lp: [T, k] of the candidate.
        vocab_size: Vocabulary size.
    """
    k = cand_ids.shape[1]
    cand_rest = np.clip(1.0 - np.exp(cand_lp.astype(np.float64)).sum(1), _EPS, 1.0)
    floor = np.log(cand_rest / max(vocab_size - k, 1))  # [T]
    match = ref_ids[:, :, None] == cand_ids[:, None, :]  # [T, k_ref, k_cand]
    found = match.any(2)
    q_at = np.where(found, np.take_along_axis(cand_lp, match.argmax(2), 1), floor[:, None])
    p = np.exp(ref_lp.astype(np.float64))
    kl = np.sum(p * (ref_lp - q_at), axis=1)
    p_rest = np.clip(1.0 - p.sum(1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(q_at).sum(1), _EPS, 1.0)
    kl += np.where(p_rest > _EPS, p_rest * (np.log(np.maximum(p_rest, _EPS)) - np.log(q_rest)),
                   0.0)
    return np.maximum(kl, 0.0)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity: exp(total negative log-likelihood / total scored tokens)."""
    total = float(np.sum(token_counts))
    return float(np.exp(np.sum(nll_sums) / total)) if total else float("nan")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def contains_answer(prediction: str, answer: str) -> float:
    """1.0 when the normalised answer occurs (on word boundaries) in the prediction."""
    pred, ans = f" {normalize_answer(prediction)} ", f" {normalize_answer(answer)} "
    return float(ans.strip() != "" and ans in pred)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-pair ROUGE-L F-measure (``rouge-score`` package, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references, strict=True)])
