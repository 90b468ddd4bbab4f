"""The LM fine-tune's answer-only loss equals the model's own full-logits loss."""

from __future__ import annotations

import pytest
import torch

from compress.demo.finetune import answer_loss


def test_answer_loss_matches_full_logits_loss(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval()
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    # Left-padded rows with answers of different lengths (1 and 3 tokens) at the end.
    ids = torch.randint(3, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = torch.full_like(ids, -100)
    labels[0, -1:] = ids[0, -1:]
    labels[1, -3:] = ids[1, -3:]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        full = model(**batch).loss
        kept = answer_loss(model, batch)
    assert float(kept) == pytest.approx(float(full), rel=1e-5, abs=1e-6)
    assert float(full) > 0
