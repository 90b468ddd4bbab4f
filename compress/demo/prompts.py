"""The generation demo's task: answer a movie review's sentiment in one word.

Prompts are built from the Rotten Tomatoes splits with the model's own chat template, so
the same prompt text is used for fine-tuning, offline evaluation and the served benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

QUESTION = ("Is the sentiment of this movie review positive or negative? "
            "Answer with one word.\n\nReview: {review}")


def format_prompt(tokenizer, review: str) -> str:
    """The chat-formatted prompt asking for the sentiment of ``review``."""
    messages = [{"role": "user", "content": QUESTION.format(review=review)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def write_prompt_split(tokenizer, src: Path, dst: Path, limit: int | None = None) -> Path:
    """Turn a sentiment split (``text``, ``label``) into ``{"text": prompt, "answer"}`` rows.

    Written once; an existing file is reused.
    """
    if dst.is_file():
        return dst
    rows = []
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            rows.append({"text": format_prompt(tokenizer, item["text"]),
                         "answer": item["label"]})
            if limit is not None and len(rows) >= limit:
                break
    tmp = dst.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(dst)
    return dst
