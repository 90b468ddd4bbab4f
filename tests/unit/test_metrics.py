"""Metric functions against hand-computed values; CIs; paired comparison; perplexity."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from compress.data import Example
from compress.evaluate import Predictions, predict, score
from compress.metrics import (
    accuracy,
    bootstrap_ci,
    contains_answer,
    exact_match,
    kl_divergence,
    macro_f1,
    per_class,
    perplexity,
    rouge_l,
    topk_kl,
)


def test_accuracy_macro_f1_per_class_by_hand():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: P 1/2 R 1/2 F1 .5; class 1: P 2/3 R 1 F1 .8; class 2: never predicted, F1 0
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    stats = per_class(y_true, y_pred, 3)
    assert stats[1]["precision"] == pytest.approx(2 / 3) and stats[1]["recall"] == 1.0
    assert stats[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_text_metrics_by_hand():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("It is Paris, France", "paris") == 0.0
    assert contains_answer("It is Paris, France", "paris") == 1.0
    assert contains_answer("Parisian food", "paris") == 0.0
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6
    scores = rouge_l(["the cat on the mat", "dogs bark"], ["the cat sat on the mat", "a cat"])
    assert scores[0] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert scores[1] == 0.0


def test_kl_by_hand_and_topk_estimate():
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    assert kl_divergence(p, q)[0] == pytest.approx(0.5 * math.log(0.5 / 0.9)
                                                    + 0.5 * math.log(0.5 / 0.1))
    assert kl_divergence(p, p)[0] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    logits_p, logits_q = rng.normal(size=(5, 50)), rng.normal(size=(5, 50))
    lp = logits_p - np.log(np.exp(logits_p).sum(1, keepdims=True))
    lq = logits_q - np.log(np.exp(logits_q).sum(1, keepdims=True))
    exact = kl_divergence(np.exp(lp), np.exp(lq))
    order_p, order_q = np.argsort(-lp, 1), np.argsort(-lq, 1)
    full = topk_kl(order_p, np.take_along_axis(lp, order_p, 1), order_q,
                   np.take_along_axis(lq, order_q, 1), 50)
    np.testing.assert_allclose(full, exact, rtol=1e-6)  # k = vocabulary: exact
    part = topk_kl(order_p[:, :40], np.take_along_axis(lp, order_p[:, :40], 1), order_q[:, :40],
                   np.take_along_axis(lq, order_q[:, :40], 1), 50)
    np.testing.assert_allclose(part, exact, rtol=0.25)


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    rng = np.random.default_rng(1)
    small, large = rng.random(40) < 0.7, rng.random(4000) < 0.7
    lo_s, hi_s = bootstrap_ci(small.astype(float))
    lo_l, hi_l = bootstrap_ci(large.astype(float))
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert bootstrap_ci(small.astype(float), seed=3) == bootstrap_ci(small.astype(float), seed=3)


def _cls_predictions(probs):
    return Predictions(task="text-classification", labels=["negative", "positive"],
                       probabilities=np.asarray(probs, dtype=float))


def test_classification_score_with_reference():
    examples = [Example(text=f"t{i}", label=["negative", "positive"][i % 2]) for i in range(40)]
    gold = np.array([i % 2 for i in range(40)])
    ref_probs = np.eye(2)[gold] * 0.8 + 0.1  # always right
    cand_guess = gold.copy()
    cand_guess[:8] = 1 - cand_guess[:8]  # 8 of 40 wrong
    cand_probs = np.eye(2)[cand_guess] * 0.6 + 0.2
    self_score = score("text-classification", examples, _cls_predictions(ref_probs),
                       reference=_cls_predictions(ref_probs))
    assert self_score["value"] == 1.0 and self_score["metric"] == "accuracy"
    assert self_score["reference"]["agreement"] == 1.0 and self_score["reference"]["kl"] == 0.0
    result = score("text-classification", examples, _cls_predictions(cand_probs),
                   reference=_cls_predictions(ref_probs))
    assert result["value"] == pytest.approx(32 / 40)
    lo, hi = result["ci95"]
    assert lo <= 0.8 <= hi < 1.0
    ref = result["reference"]
    assert ref["agreement"] == pytest.approx(32 / 40)
    assert ref["metric_drop"] == pytest.approx(0.2)
    assert 0 < ref["drop_ci95"][0] <= 0.2 <= ref["drop_ci95"][1]
    # reference with its labels in the other order is aligned by name
    swapped = Predictions(task="text-classification", labels=["positive", "negative"],
                          probabilities=ref_probs[:, ::-1])
    assert score("text-classification", examples, _cls_predictions(cand_probs),
                 reference=swapped)["reference"] == ref


class KnownLogits:
    """A word-level 'model' whose next-token distribution is known: probability ``p_next``
    on the true next token, the rest spread evenly over a vocabulary of ``vocab`` ids."""

    def __init__(self, p_next: float, vocab: int = 10, max_length: int = 16, bos: bool = True):
        self.p_next, self.vocab, self.max_length, self.bos = p_next, vocab, max_length, bos
        self.manifest = type("M", (), {"task": "text-generation"})()

    def _ids(self, text):
        ids = [1 + (hash(w) % (self.vocab - 1)) for w in text.split()]
        return [0, *ids] if self.bos else ids

    def count_tokens(self, text):
        return len(self._ids(text))

    def next_token_logprobs(self, texts, max_length=256):
        out = []
        for text in texts:
            ids = np.array(self._ids(text)[:max_length])
            lp = np.full((len(ids) - 1, self.vocab), math.log((1 - self.p_next) / (self.vocab - 1)))
            lp[np.arange(len(ids) - 1), ids[1:]] = math.log(self.p_next)
            out.append((ids, lp))
        return out


@pytest.mark.parametrize("bos", [True, False])
def test_perplexity_of_known_logits_with_sliding_windows(bos):
    docs = [Example(text=" ".join(f"w{i}" for i in range(n))) for n in (5, 40, 90)]
    model = KnownLogits(0.5, bos=bos)
    pred = predict(model, docs, progress=False)
    # every token after the first real one is scored exactly once (BOS is context only)
    assert [len(t) for t in pred.token_logprobs] == [model.count_tokens(d.text) - 1 for d in docs]
    result = score("text-generation", docs, pred)
    assert result["metric"] == "perplexity" and result["higher_is_better"] is False
    assert result["value"] == pytest.approx(2.0)
    worse = predict(KnownLogits(0.25, bos=bos), docs, progress=False)
    vs = score("text-generation", docs, worse, reference=pred)
    assert vs["value"] == pytest.approx(4.0)
    assert vs["reference"]["metric_drop"] == pytest.approx(4.0 / 2.0 - 1)
    assert vs["reference"]["agreement"] == 1.0  # same argmax everywhere
    assert vs["reference"]["kl"] > 0
    assert perplexity([math.log(3) * 4], [4]) == pytest.approx(3.0)


def test_answers_score_and_reference():
    examples = [Example(text="q1", answer="Paris"), Example(text="q2", answer="three"),
                Example(text="q3", answer="blue")]
    cand = Predictions(task="text-generation", texts=["paris.", "two", "it is blue"])
    ref = Predictions(task="text-generation", texts=["Paris", "three", "blue"])
    result = score("text-generation", examples, cand, reference=ref)
    assert result["metric"] == "contains_answer" and result["value"] == pytest.approx(2 / 3)
    assert result["metrics"]["exact_match"]["value"] == pytest.approx(1 / 3)
    assert result["reference"]["agreement"] == 0.0
    assert result["reference"]["metric_drop"] == pytest.approx(1 / 3)


def test_evaluation_modules_import_without_torch():
    code = ("import sys, compress.data, compress.evaluate, compress.metrics; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
