"""Distillation: student construction, KD losses, early stopping, resume, bad input."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from compress.errors import InputError, RecipeError
from compress.recipe_sections import DistillConfig
from serve.errors import ModelpressError

torch = pytest.importorskip("torch")

POSITIVE = ["great", "good", "wonderful", "fun", "funny", "brilliant", "best"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "dull", "worst", "sad"]
SUBJECTS = ["the movie", "this film", "the story", "the plot", "the music", "that scene"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Labelled sentences made of the tiny tokenizer's words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        adverb = rng.choice(["", "very ", "really ", "quite "])
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {adverb}{word}", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def four_layer_teacher(tiny, task: str):
    """A 4-layer version of the tiny model (same tokenizer), seeded."""
    from compress.models import load_model, load_tokenizer

    folder = tiny["bert"] if task == "text-classification" else tiny["llama"]
    small = load_model(task, folder)
    config = copy.deepcopy(small.config)
    config.num_hidden_layers = 4
    config.initializer_range = 0.3  # confident outputs, so KD has something to match
    torch.manual_seed(0)
    return type(small)(config).eval(), load_tokenizer(folder)


def layer_state(model, prefix: str, index: int) -> dict:
    start = f"{prefix}{index}."
    return {k[len(start):]: v for k, v in model.state_dict().items() if k.startswith(start)}


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
@pytest.mark.parametrize(("settings", "expected"), [
    ({"student_layers": 2}, [1, 3]),
    ({"student_layers": 3, "strategy": "first-k"}, [0, 1, 2]),
    ({"strategy": "explicit", "layers": [0, 3]}, [0, 3]),
])
def test_student_starts_as_the_chosen_teacher_layers(tiny, task, settings, expected):
    from compress.stages.distill_student import build_student, layer_prefix

    teacher, tokenizer = four_layer_teacher(tiny, task)
    student, layer_map = build_student(DistillConfig(**settings), teacher, tokenizer, task,
                                       "stages[1]")
    assert layer_map == expected
    assert student.config.num_hidden_layers == len(expected)
    prefix = layer_prefix(teacher)
    assert layer_prefix(student) == prefix
    for j, t in enumerate(expected):
        s_layer, t_layer = layer_state(student, prefix, j), layer_state(teacher, prefix, t)
        assert s_layer.keys() == t_layer.keys() and s_layer
        for name in s_layer:
            assert torch.equal(s_layer[name], t_layer[name]), name
    # Everything outside the layer list (embeddings, head, final norm) is copied too.
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith(prefix):
            assert torch.equal(value, t_state[key]), key


@pytest.mark.parametrize(("settings", "field"), [
    ({"student_layers": 4}, "student_layers"),
    ({"student_layers": 9}, "student_layers"),
    ({"strategy": "explicit", "layers": [1, 4]}, "layers"),
    ({"strategy": "explicit", "layers": [0, 1, 2, 3]}, "layers"),
])
def test_out_of_range_student_is_rejected(tiny, settings, field):
    from compress.stages.distill_student import build_student

    teacher, tokenizer = four_layer_teacher(tiny, "text-classification")
    with pytest.raises(InputError, match=rf"stages\[1\]\.{field}"):
        build_student(DistillConfig(**settings), teacher, tokenizer, "text-classification",
                      "stages[1]")


def test_recipe_level_student_checks():
    with pytest.raises(ValueError, match="layers: must be increasing"):
        DistillConfig(strategy="explicit", layers=[2, 1])
    with pytest.raises(ValueError, match="student_layers: required"):
        DistillConfig()


def test_user_student_must_be_smaller_and_share_the_tokenizer(tiny, tmp_path):
    from compress.models import load_model, load_tokenizer
    from compress.stages.distill_student import build_student
    from compress.tiny import build_bert

    task = "text-classification"
    teacher, tokenizer = load_model(task, tiny["bert"]), load_tokenizer(tiny["bert"])
    bigger, _ = four_layer_teacher(tiny, task)
    bigger.save_pretrained(tmp_path / "big", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "big")
    with pytest.raises(InputError, match=r"stages\[1\]\.student_path: .*not fewer than"):
        build_student(DistillConfig(student_path=tmp_path / "big"), teacher, tokenizer, task,
                      "stages[1]")

    other = build_bert(tmp_path / "other")
    with pytest.raises(InputError, match=r"student_path: .*tokenizer does not match"):
        build_student(DistillConfig(student_path=other), teacher,
                      load_tokenizer(tiny["llama"]), task, "stages[1]")


def encoded_rows(tokenizer, rows, task):
    from compress.stages.distill_train import Encoded, encode

    ids = encode(tokenizer, [r["text"] for r in rows], 32)
    labels = ([0 if r["label"] == "negative" else 1 for r in rows]
              if task == "text-classification" else None)
    return Encoded(ids, labels)


def fixed_kd_loss(student, teacher, data, pad_id, task, temperature=2.0):
    from compress.stages.distill_train import collate, kd_loss

    batch = collate(data, list(range(len(data))), pad_id)
    batch.pop("labels", None)
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    if task == "text-generation":
        mask = batch["attention_mask"].bool()
        return kd_loss(s[:, :-1], t[:, :-1], temperature, mask[:, 1:] & mask[:, :-1]).item()
    return kd_loss(s, t, temperature).item()


def constant_validator(values):
    from compress.stages.distill_train import Validator

    sequence = iter(values)
    return Validator("accuracy", True, lambda model: next(sequence))


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
def test_kd_steps_reduce_the_kd_loss(tiny, tmp_path, task):
    from compress.stages.distill_student import build_student
    from compress.stages.distill_train import train

    teacher, tokenizer = four_layer_teacher(tiny, task)
    config = DistillConfig(student_layers=1, strategy="first-k", alpha=1.0, max_steps=25,
                           max_epochs=None,
                           learning_rate=3e-3, batch_size=8, eval_every=100, patience=None,
                           warmup_ratio=0.0)
    student, _ = build_student(config, teacher, tokenizer, task, "stages[1]")
    data = encoded_rows(tokenizer, sentiment_rows(16), task)
    pad = tokenizer.pad_token_id
    before = fixed_kd_loss(student, teacher, data, pad, task)
    outcome = train(student, teacher, data, constant_validator([0.1, 0.2]), config, task=task,
                    pad_id=pad, checkpoint_dir=tmp_path / "ckpt")
    after = fixed_kd_loss(student, teacher, data, pad, task)
    assert outcome.steps == 25
    assert outcome.best_step == 25
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "ckpt" / "last.pt").is_file()


def test_early_stopping_keeps_the_best_step(tiny, tmp_path):
    from compress.stages.distill_student import build_student
    from compress.stages.distill_train import train

    task = "text-classification"
    teacher, tokenizer = four_layer_teacher(tiny, task)
    config = DistillConfig(student_layers=2, max_steps=50, eval_every=1, patience=2,
                           learning_rate=1e-3, batch_size=4)
    student, _ = build_student(config, teacher, tokenizer, task, "stages[1]")
    data = encoded_rows(tokenizer, sentiment_rows(16), task)
    snapshots = {}
    outcome = train(student, teacher, data, constant_validator([0.5, 0.7, 0.6, 0.7, 0.9]),
                    config, task=task, pad_id=tokenizer.pad_token_id,
                    checkpoint_dir=tmp_path / "ckpt",
                    on_step=lambda step: snapshots.setdefault(step, copy.deepcopy(
                        student.state_dict())))
    assert outcome.stopped_early
    assert outcome.steps == 3  # step 0: 0.5, step 1: 0.7 (best), steps 2-3: no gain
    assert outcome.best_step == 1 and outcome.best_value == 0.7
    assert [c["step"] for c in outcome.curve] == [0, 1, 2, 3]
    for name, value in student.state_dict().items():
        assert torch.equal(value, snapshots[1][name]), name
    assert not torch.equal(snapshots[1]["classifier.weight"], snapshots[3]["classifier.weight"])


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny, tmp_path):
    from compress.stages.distill_student import build_student
    from compress.stages.distill_train import train

    task = "text-classification"
    teacher, tokenizer = four_layer_teacher(tiny, task)
    # Dropout on, gradient accumulation and several epochs: all must be restored exactly.
    config = DistillConfig(student_layers=2, max_steps=10, max_epochs=None, eval_every=3,
                           patience=None, learning_rate=1e-3, batch_size=4,
                           grad_accum_steps=2, seed=7, hidden_weight=0.5)
    data = encoded_rows(tokenizer, sentiment_rows(20), task)
    pad = tokenizer.pad_token_id

    improving = constant_validator(range(100))  # shared: every validation is a new best

    def run(folder, on_step=None):
        student, layer_map = build_student(config, teacher, tokenizer, task, "stages[1]")
        outcome = train(student, teacher, data, improving, config, task=task, pad_id=pad,
                        checkpoint_dir=folder, hidden_map=layer_map, on_step=on_step)
        return student, outcome

    reference, full = run(tmp_path / "a")
    assert full.resumed_from_step is None and full.steps == 10

    def interrupt(step):
        if step == 7:
            raise Interrupted
    with pytest.raises(Interrupted):
        run(tmp_path / "b", interrupt)
    resumed, outcome = run(tmp_path / "b")
    assert outcome.resumed_from_step == 6  # the last checkpoint before the interruption
    assert outcome.steps == 10
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [c["step"] for c in outcome.curve] == [0, 3, 6, 9, 10]


def test_max_epochs_bound_and_cached_teacher_logits(tiny, tmp_path):
    from compress.stages.distill_student import build_student
    from compress.stages.distill_train import TEACHER_LOGITS, train

    task = "text-classification"
    teacher, tokenizer = four_layer_teacher(tiny, task)
    data = encoded_rows(tokenizer, sentiment_rows(16), task)
    from compress.stages.distill_train import collate

    batch = collate(data, list(range(len(data))), tokenizer.pad_token_id)
    batch.pop("labels")
    logits = []
    for cache in (False, True):
        config = DistillConfig(student_layers=2, max_steps=100, max_epochs=2, batch_size=4,
                               eval_every=100, patience=None, learning_rate=1e-3,
                               cache_teacher_logits=cache)
        student, _ = build_student(config, teacher, tokenizer, task, "stages[1]")
        outcome = train(student, teacher, data, constant_validator(range(10)), config,
                        task=task, pad_id=tokenizer.pad_token_id,
                        checkpoint_dir=tmp_path / str(cache))
        assert outcome.steps == 8 and outcome.epochs == 2.0  # 16 examples / 4 per step, twice
        with torch.no_grad():
            logits.append(student(**batch).logits)
    assert (tmp_path / "True" / TEACHER_LOGITS).is_file()
    # Cached logits were computed on other batches (other padding): equal up to rounding,
    # so the two students end (nearly) the same.
    assert torch.allclose(logits[0], logits[1], atol=2e-3), (logits[0] - logits[1]).abs().max()


def test_losses_mask_padding():
    from compress.stages.distill_train import kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s_noisy = s.clone()
    s_noisy[0, 3:] = 100.0  # padding positions must not matter
    assert kd_loss(s, t, 2.0, mask).item() == pytest.approx(kd_loss(s_noisy, t, 2.0, mask).item())
    assert kd_loss(t, t, 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)


def distill_recipe(tmp_path: Path, tiny, stage: str, train: str | None,
                   label: str | None = "label") -> Path:
    """A merge → distill recipe on the tiny BERT + LoRA with tiny sentiment data."""
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(60, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(24, seed=2))
    label_field = "null" if label is None else label
    train_line = (f"  train: {{path: {train}, text: text, label: {label_field}}}\n"
                  if train else "")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: tiny-distill\ntask: text-classification\n"
        f"base: {{path: {tiny['bert']}}}\nadapters: [{{path: {tiny['bert-lora']}}}]\n"
        f"data:\n{train_line}  eval: {{path: eval.jsonl, text: text, label: label}}\n"
        f"stages: [{{kind: merge}}, {stage}]\n")
    return path


STAGE = ("{kind: distill, student_layers: 1, max_steps: 12, eval_every: 4, batch_size: 8, "
         "learning_rate: 0.002, speed_batch_size: 8}")


def test_distill_stage_writes_a_measured_student(tiny, tmp_path):
    pytest.importorskip("compress.evaluate")
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe
    from serve.artifact import load_artifact
    from serve.runtime.loader import load_runtime

    recipe = load_recipe(distill_recipe(tmp_path, tiny, STAGE, "train.jsonl"))
    out = tmp_path / "out"
    records = run_recipe(recipe, out)
    assert [(r.name, r.status) for r in records] == [("merge", "built"), ("distill", "built")]
    manifest = load_artifact(out / "distill").manifest
    metrics = manifest.metrics
    assert metrics["layer_map"] == [1]
    assert metrics["student"]["layers"] == 1 and metrics["teacher"]["layers"] == 2
    assert 0 < metrics["student"]["params"] < metrics["teacher"]["params"]
    assert 0 < metrics["student"]["bytes"] < metrics["teacher"]["bytes"]
    training = metrics["training"]
    assert training["curve"][0]["step"] == 0 and training["steps"] <= 12
    assert training["best_step"] in [c["step"] for c in training["curve"]]
    assert metrics["speed"]["speed_ratio"] > 0 and metrics["speed"]["batch_size"] == 8
    compared = metrics["eval"]
    assert compared["metric"] == "accuracy" and compared["n"] == 24
    for who in ("teacher", "student"):
        lo, hi = compared[who]["ci95"]
        assert lo <= compared[who]["value"] <= hi
    assert not (out / ".distill-checkpoints").exists()  # removed once the stage succeeded

    # The recorded agreement is what the served runtimes give on the eval texts.
    texts = [json.loads(line)["text"] for line in (tmp_path / "eval.jsonl").open()]
    teacher = [c.label for c in load_runtime(out / "merge", device="cpu").classify(texts)]
    student = [c.label for c in load_runtime(out / "distill", device="cpu").classify(texts)]
    agreement = sum(a == b for a, b in zip(teacher, student, strict=True)) / len(texts)
    assert compared["agreement"] == pytest.approx(agreement)

    again = run_recipe(load_recipe(tmp_path / "recipe.yaml"), out)
    assert [r.status for r in again] == ["cached", "cached"]


@pytest.mark.parametrize(("train", "label", "error", "message"), [
    (None, "label", RecipeError, r"data\.train: the distill stage needs training data"),
    ("empty.jsonl", "label", ModelpressError, r"empty\.jsonl"),
    ("train.jsonl", None, InputError, r"data\.train\.label: .*needs labelled"),
])
def test_distill_stage_bad_training_data(tiny, tmp_path, train, label, error, message):
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    (tmp_path / "empty.jsonl").write_text("")
    recipe = load_recipe(distill_recipe(tmp_path, tiny, STAGE, train, label))
    with pytest.raises(error, match=message):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_distill_stage_student_layers_out_of_range(tiny, tmp_path):
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    stage = "{kind: distill, student_layers: 2}"
    recipe = load_recipe(distill_recipe(tmp_path, tiny, stage, "train.jsonl"))
    with pytest.raises(InputError, match=r"stages\[1\]\.student_layers: 2 is out of range"):
        run_recipe(recipe, tmp_path / "out")


def test_distill_stage_causal_lm_on_plain_text(tiny, tmp_path):
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe
    from serve.artifact import load_artifact

    rows = [{"text": r["text"] + " and the music was " + random.Random(i).choice(POSITIVE)}
            for i, r in enumerate(sentiment_rows(40, seed=3))]
    write_jsonl(tmp_path / "train.jsonl", rows[:30])
    write_jsonl(tmp_path / "eval.jsonl", rows[30:])
    (tmp_path / "recipe.yaml").write_text(
        "name: tiny-lm-distill\ntask: text-generation\n"
        f"base: {{path: {tiny['llama']}}}\nadapters: [{{path: {tiny['llama-lora']}}}]\n"
        "data:\n  train: {path: train.jsonl, text: text, label: null}\n"
        "  eval: {path: eval.jsonl, text: text, label: null}\n"
        "stages: [{kind: merge}, {kind: distill, student_layers: 1, max_steps: 6, "
        "eval_every: 3, batch_size: 8, learning_rate: 0.003, hidden_weight: 0.1, "
        "speed_batch_size: 4}]\n")
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out")
    metrics = load_artifact(tmp_path / "out" / "distill").manifest.metrics
    assert metrics["layer_map"] == [1] and metrics["hidden_layer_map"] == [1]
    compared = metrics["eval"]
    assert compared["metric"] == "perplexity" and compared["n"] == 10
    assert compared["teacher"]["value"] > 1 and compared["student"]["value"] > 1
    assert 0 <= compared["agreement"] <= 1
    curve = metrics["training"]["curve"]
    assert [c["step"] for c in curve] == [0, 3, 6]
    assert all(c["perplexity"] > 1 for c in curve)


def test_teacher_logit_cache_is_classification_only(tiny, tmp_path):
    from compress.recipe import Recipe
    from compress.stages.base import StageContext
    from compress.stages.distill import distill

    recipe = Recipe(name="x", task="text-generation", base={"path": tiny["llama"]},
                    stages=[{"kind": "merge"}, {"kind": "distill", "student_layers": 1,
                                                 "cache_teacher_logits": True}],
                    data={"train": {"path": write_jsonl(tmp_path / "t.jsonl",
                                                        [{"text": "a b"}])}})
    with pytest.raises(InputError, match=r"stages\[1\]\.cache_teacher_logits"):
        distill(recipe.stages[1], tiny["llama"], tmp_path / "dst", StageContext(recipe, 1))


def test_speed_timing_alternates_calls_and_skips_warmup():
    from compress.stages.distill_speed import speed_summary, time_interleaved

    order: list[str] = []
    times = time_interleaved({"teacher": lambda: order.append("t"),
                              "student": lambda: order.append("s")}, repeats=3, warmup=2)
    assert order == ["t", "s"] * 5
    assert [len(v) for v in times.values()] == [3, 3]
    summary = speed_summary("x", 4, 9, {"teacher": [0.004, 0.002, 0.003],
                                        "student": [0.001, 0.002, 0.001]})
    assert summary["teacher_ms"] == 3.0 and summary["student_ms"] == 1.0
    assert summary["speed_ratio"] == 3.0
