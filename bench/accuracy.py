"""The accuracy pass: the eval set sent through the HTTP endpoint, scored offline.

Predictions come back over HTTP; the metric and its confidence interval come from
``compress.evaluate.score`` — the same code ``modelpress eval`` uses — so served and
offline accuracy can be compared number for number.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import numpy as np

from serve.errors import ModelpressError

log = logging.getLogger(__name__)


class AccuracyError(ModelpressError):
    """The server answered the accuracy pass with an error."""


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(path, json=body)
    if resp.status_code != 200:
        raise AccuracyError(f"{path} answered HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()


def http_predictions(url: str, task: str, texts: list[str], batch_size: int = 16,
                     max_new_tokens: int = 32, timeout_s: float = 300.0) -> Any:
    """Predict every text through the server.

    Args:
        url: Server base URL.
        task: ``text-classification`` or ``text-generation``.
        texts: Inputs in order.
        batch_size: Texts per request.
        max_new_tokens: Generation length (greedy, temperature 0).
        timeout_s: Per-request timeout.

    Returns:
        A ``compress.evaluate.Predictions`` built from the responses: the probability
        matrix over the server's label order (classification) or the generated texts.

    Raises:
        AccuracyError: A request failed.
    """
    from compress.evaluate import Predictions

    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        if task == "text-classification":
            labels: list[str] | None = None
            rows = []
            for i in range(0, len(texts), batch_size):
                body = {"texts": texts[i:i + batch_size], "all_scores": True}
                for result in _post(client, "/classify", body)["results"]:
                    scores = result["scores"]
                    labels = labels or list(scores)
                    rows.append([scores[name] for name in labels])
            return Predictions(task=task, labels=labels or [],
                               probabilities=np.asarray(rows, dtype=np.float64))
        outputs = []
        for i in range(0, len(texts), batch_size):
            body = {"prompts": texts[i:i + batch_size], "max_new_tokens": max_new_tokens,
                    "temperature": 0.0}
            outputs += [r["text"] for r in _post(client, "/generate", body)["results"]]
        return Predictions(task=task, texts=outputs)


def accuracy_pass(url: str, task: str, examples: list[Any], reference: Any | None = None,
                  max_new_tokens: int = 32) -> tuple[dict[str, Any] | None, Any]:
    """Score the served model on ``examples``.

    Args:
        url: Server base URL.
        task: The artifact's task.
        examples: ``compress.data.Example`` items.
        reference: Predictions of the reference variant (for drop and agreement).
        max_new_tokens: Generation length.

    Returns:
        ``(summary, predictions)``, both None for generation data without answers
        (perplexity data cannot be scored through HTTP). Summary has ``metric``,
        ``value``, ``ci95``, ``n``, ``higher_is_better``, ``metrics``, and with a reference
        ``drop``, ``drop_ci95``, ``agreement``; predictions can serve as the reference for
        later variants.
    """
    from compress.evaluate import data_kind, score

    if data_kind(task, examples) == "perplexity":
        log.warning("accuracy not measured: perplexity needs token log-probs, which the HTTP "
                    "API does not return; give --data a file with an 'answer' field")
        return None, None
    preds = http_predictions(url, task, [e.text for e in examples],
                             max_new_tokens=max_new_tokens)
    scored = score(task, examples, preds, reference=reference)
    ref = scored.get("reference") or {}
    summary = {key: scored.get(key) for key in ("metric", "value", "ci95", "n",
                                                "higher_is_better", "metrics")}
    summary.update({"drop": ref.get("metric_drop"), "drop_ci95": ref.get("drop_ci95"),
                    "agreement": ref.get("agreement")})
    return summary, preds
